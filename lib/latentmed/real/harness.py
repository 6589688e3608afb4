"""Prompts and answer extraction as the standard harnesses do them (VLMEvalKit, lmms-eval).

The paper's reference numbers were taken with such harnesses (Monet's with VLMEvalKit), so the
real track asks each question the way a harness does and scores the reply with the harness's
rule, re-implemented here from the harnesses' public code (no judge model: the rule's answer
or "unparsed"):

* `vlmevalkit`, V* and HR-Bench: `Question: q\nOptions:\nA. x\nB. y\n` +
  `Please select the correct answer from the options above. \n`;
  MME-RealWorld-Lite: `q The choices are listed below:\n(A) x\n...\n(E) z\n` +
  `Select the best answer ... (A, B, C, D, or E) of the correct option. \nThe best answer is:`.
* `lmms-eval`, V*: `q\nA. x\nB. y` + `\nAnswer with the option's letter from the given choices
  directly.`; HR-Bench: `q\nA. x\nB. y\nAnswer the option letter directly.`; MME-RealWorld-Lite:
  the same text as VLMEvalKit's without the space before `\nThe best answer is: `.

Extraction: VLMEvalKit's `can_infer` for V* and HR-Bench (exactly one option letter standing
alone after punctuation is blanked, else exactly one option text contained in the reply),
`extract_characters_regex` for MME-RealWorld (answer prefixes removed, then the first capital
A-E); lmms-eval's `extract_answer_letter` cascade for V*. Their quirks are kept on purpose
(the lmms-eval V* rule reads "Based on ..." as B; MME's rule reads an empty reply as A) because
they are what produced the published numbers; the engine's strict parser
(`latentmed.engine.answers.parse_answer`) is reported beside them, and chapter 8 counts where
the two disagree.

Before a harness rule runs, the method's own answer field is cut out when present (`\\boxed{}` for
Monet, Mirage and CapImagine, `<answer>...</answer>` for LVR), as each method's grader does,
and latent segments are removed.

The method keeps its own template (system prompt, assistant prefix, answer format); the user
turn is the harness's text, whose instruction replaces the method's `user_suffix`. This is done
by `HarnessSpec`, a `LatentSpec` whose `format_question` writes the harness's text, so every
engine entry point (and every input edit that rebuilds a prompt) asks the same question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from ..engine.answers import extract_answer_tag, extract_boxed
from ..engine.spec import LatentSpec

HARNESSES = ("vlmevalkit", "lmms-eval")
LETTERS = "ABCDEFGH"

VLMEVALKIT_MCQ_TAIL = "Please select the correct answer from the options above. \n"
MME_CHOICES_HEAD = "The choices are listed below:\n"
MME_INSTRUCTION = ("Select the best answer to the above multiple-choice question based on the image. "
                   "Respond with only the letter (A, B, C, D, or E) of the correct option.")
LMMS_VSTAR_TAIL = "\nAnswer with the option's letter from the given choices directly."
LMMS_HRBENCH_TAIL = "Answer the option letter directly."


def _family(benchmark: str) -> str:
    if benchmark == "vstar":
        return "vstar"
    if benchmark.startswith("hrbench"):
        return "hrbench"
    if benchmark == "mme-realworld-lite":
        return "mme"
    raise ValueError(f"unknown benchmark {benchmark!r}")


def _check(harness: str) -> None:
    if harness not in HARNESSES:
        raise ValueError(f"unknown harness {harness!r}; known: {', '.join(HARNESSES)}")


# ---------------------------------------------------------------- prompts

def user_text(harness: str, benchmark: str, question: str, options: list[str]) -> str:
    """The user turn's text for a question with lettered options, as `harness` writes it."""
    _check(harness)
    fam = _family(benchmark)
    options = list(options or [])
    if fam == "mme":
        choices = "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
        if harness == "vlmevalkit":
            return f"{question} {MME_CHOICES_HEAD}{choices}\n{MME_INSTRUCTION} \nThe best answer is:"
        return f"{question} {MME_CHOICES_HEAD}{choices}\n{MME_INSTRUCTION}\nThe best answer is: "
    lines = "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(options))
    if harness == "vlmevalkit":
        return f"Question: {question}\nOptions:\n{lines}{VLMEVALKIT_MCQ_TAIL}"
    if fam == "vstar":
        return f"{question}\n{lines.rstrip(chr(10))}{LMMS_VSTAR_TAIL}"
    return f"{question.strip()}\n{lines}{LMMS_HRBENCH_TAIL}"


@dataclass(frozen=True)
class HarnessSpec(LatentSpec):
    """A method's spec whose user turn is a harness's question text (see the module doc)."""

    harness: str = "vlmevalkit"
    benchmark: str = "vstar"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.harness)
        _family(self.benchmark)

    def format_question(self, question: str, options: list[str] | None = None) -> str:
        return user_text(self.harness, self.benchmark, question, options or [])

    @classmethod
    def of(cls, spec: LatentSpec, harness: str, benchmark: str) -> HarnessSpec:
        base = {f.name: getattr(spec, f.name) for f in fields(LatentSpec)}
        return cls(**base, harness=harness, benchmark=benchmark)

    def base(self) -> LatentSpec:
        """The method's own spec (without the harness)."""
        return LatentSpec(**{f.name: getattr(self, f.name) for f in fields(LatentSpec)})


# ---------------------------------------------------------------- answer extraction

def method_field(text: str, answer_format: str) -> str:
    """The reply without latent segments, cut to the method's answer field when it has one."""
    text = text.replace("<latent>", " ").strip()
    if answer_format == "boxed":
        box = extract_boxed(text)
        return text if box is None else box
    if answer_format == "answer_tag":
        tag = extract_answer_tag(text)
        return text if tag is None else tag
    return text


def can_infer_option(answer: str, letters: str) -> str | None:
    """VLMEvalKit's option-letter rule: blank `.()[],:;!*#{}`, split on whitespace; exactly one
    option letter must stand alone (a refusal or a lone 'Z' is 'Z')."""
    refusals = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                "I'm sorry, but without the image provided", "Cannot determine the answer")
    if any(r in answer for r in refusals):
        return "Z"
    mod = answer
    for c in ".()[],:;!*#{}":
        mod = mod.replace(c, " ")
    splits = [s.strip() for s in mod.split()]
    found = [c for c in letters if c in splits]
    if len(found) == 1:
        return found[0]
    if not found and sum(z in splits for z in ("Z", "")) == 1:
        return "Z"
    return None


def can_infer_text(answer: str, options: list[str], length_guard: bool = True) -> str | None:
    """VLMEvalKit's option-text rule: exactly one option's text occurs in the (lowercased) reply.
    VLMEvalKit skips replies longer than twice the options' total length (`length_guard`);
    lmms-eval's copy for HR-Bench does not."""
    low = answer.lower()
    if length_guard and len(low) > 2 * sum(len(str(o)) for o in options):
        return None
    hits = [LETTERS[i] for i, o in enumerate(options) if str(o).lower() in low]
    return hits[0] if len(hits) == 1 else None


def can_infer(answer: str, options: list[str], length_guard: bool = True) -> str | None:
    """Letter (or 'Z') by the option rule, else by the text rule; None when neither decides."""
    letters = LETTERS[:len(options)]
    return can_infer_option(answer, letters) or can_infer_text(answer, options, length_guard)


def lmms_vstar_letter(response: str) -> str | None:
    """lmms-eval's V* `extract_answer_letter`: a cascade of patterns on the upper-cased reply,
    then a single A-D anywhere, then a leading A-D."""
    r = response.strip().upper()
    patterns = (r"^([A-D])\s*[\.)\]]*", r"(?:THE\s+)?(?:ANSWER|CHOICE|OPTION)(?:\s+IS)?[\s:]+([A-D])",
                r"\(([A-D])\)", r"([A-D])\s*(?:\.|\)|])", r"(?:^|\s)([A-D])(?:\s|$)")
    for p in patterns:
        m = re.search(p, r, re.IGNORECASE)
        if m:
            return m.group(1).upper()
    letters = re.findall(r"[A-D]", r)
    if len(letters) == 1:
        return letters[0]
    return r[0] if r and r[0] in "ABCD" else None


_MME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                 # the harnesses' list misses two commas, so these are joined strings:
                 "The best option isThe correct option is", "Best answer:Best option:")


def mme_letter(s: str, options: list[str]) -> str | None:
    """MME-RealWorld's `extract_characters_regex` (VLMEvalKit and lmms-eval): answer prefixes
    removed; a long reply without A-E is unparsed; else the first capital A-E; else the first
    choice '(X) text' that contains the whole reply (an empty reply is in every choice: 'A')."""
    s = s.strip()
    for p in _MME_PREFIXES:
        s = s.replace(p, "")
    if len(s.split()) > 10 and not re.search("[ABCDE]", s):
        return None
    m = re.search(r"[ABCDE]", s)
    if m is None:
        for i, o in enumerate(options):
            if s.lower() in f"({LETTERS[i]}) {o}".lower():
                return LETTERS[i]
        return None
    return m.group(0)


def extract(harness: str, benchmark: str, text: str, options: list[str], answer_format: str = "letter"
            ) -> str | None:
    """The option letter a harness reads from a reply (None: unparsed, including VLMEvalKit's
    'Z' for a refusal or a reply that matches no option)."""
    _check(harness)
    fam = _family(benchmark)
    reply = method_field(text, answer_format)
    if fam == "mme":
        if harness == "vlmevalkit" and "<answer>" in reply:  # VLMEvalKit strips this wrapper first
            reply = reply.split("<answer>")[-1].split("</answer>")[0]
        letter = mme_letter(reply, options)
    elif harness == "lmms-eval" and fam == "vstar":
        letter = lmms_vstar_letter(reply)
    else:
        letter = can_infer(reply, options, length_guard=harness == "vlmevalkit")
    if letter is None or letter == "Z":
        return None
    return letter
