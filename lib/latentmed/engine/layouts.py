"""The testbed prompt layout: one builder for training and for inference.

A testbed prompt (``LatentSpec.template == "testbed"``) is, in this order::

    <|vision_start|><|image_pad|><|vision_end|> A o1 B o2 C o3 D o4 <question> <key words>

The question's key words come last (the shape for attr, the colour(s) for relpos, count and
glyph), so the last prompt token is itself the query that looks the evidence up in the image
(``reference/training-feasibility.md``: this layout plus attention supervision is what made
retrieval learnable at this size). The method's segment follows the prompt; after it the key
words are restated and the answer follows the last of them. The answer is the right option's
content word (one token, scored over the four option tokens)::

    base, direct      prompt                                               " red"
    capimagine        prompt <imagine> the star is red</imagine> " star"   " red"
    latent methods    prompt <start> <pad>*K <end> " star"                 " red"
    monet-style SFT   prompt <start> <|vision_start|><crop><|vision_end|> <end> " star"  " red"

Restating the key words after the segment keeps the base's answering circuit (the answer is
read at a key word, which looks at the evidence itself) for every method, with the segment
between the question and the answer, where a step that first retrieves the evidence could
help (layout B in docs/zoo-notes.md; with the answer straight after the segment, layout A,
the 2-layer models could not learn a new readout in the budget).

Position conventions (the engine relies on them):

* the prompt (what `testbed_prompt` returns) ends with the last key word; generation starts
  right after it. Direct answers are predicted at that position; latent methods predict their
  start token there (the natural trigger) and CapImagine its ``<imagine>`` marker.
* latent slots follow the start token (placement ``after_start``): the input at slot i is the
  final post-norm hidden state of the position before it; K slots, then the end token.
* after the end marker the model writes the key words again (`answer_prefix`); the answer
  token is predicted at the last of them. None of the key words is an option, so "the first
  option token generated after the segment" finds the answer. The answer is followed by the
  tokenizer's end-of-turn token (``<|im_end|>``), so free generation stops there.

Where a method's latents come from at run time and which image its prompt shows are fields of
its spec (`LatentSpec.latent_source`, `LatentSpec.prompt_image`); `degrade` is the positive
control's degraded image.
"""

from __future__ import annotations


from PIL import Image

from .answers import option_token_ids as first_token_ids
from .memo import token_ids

LETTERS = "ABCD"
IMAGE_SEGMENT = "<|vision_start|><|image_pad|><|vision_end|>"
DEGRADE_PX = 56  # positive control: the main image is box-averaged to this side and back
# id written at latent slots when a spec has no pad token of its own (LVR's released loop
# writes whatever was sampled; we keep a plain, deterministic id)
DEFAULT_SLOT_TOKEN = {"<|lvr_start|>": "<|lvr|>", "<abs_vis_token>": "<abs_vis_token_pad>",
                      "<|latent_start|>": "<|latent_pad|>"}

def _field(item, name: str, default=None):
    """Read a field from an `Item`, a dict or any object with attributes."""
    if isinstance(item, dict):
        return item.get(name, default)
    return getattr(item, name, default)


def _require(item, name: str, why: str):
    """A field the method needs; missing (None or an empty string/list) is a clear error."""
    value = _field(item, name)
    if value is None or (isinstance(value, (str, list, tuple)) and len(value) == 0):
        ident = _field(item, "id", "<item>")
        raise ValueError(f"item {ident}: field {name!r} is missing or empty ({why})")
    return value


def option_text(options) -> str:
    """' A red B green C blue D yellow'."""
    if len(options) != 4:
        raise ValueError(f"a testbed prompt needs 4 options, got {len(options)}: {options!r}")
    return "".join(f" {letter} {word}" for letter, word in zip(LETTERS, options))


def question_text(item) -> str:
    """' <question> <kw1> <kw2>': the question, then its key words, the last one last."""
    question = _require(item, "question", "the prompt needs the question")
    keywords = _require(item, "keywords", "the prompt ends with the question's key words")
    return f" {question}" + "".join(f" {k}" for k in keywords)


def testbed_prompt(tokenizer, item, spec=None) -> str:
    """The prompt up to (and including) the last key word; the same for every method.

    `tokenizer` is only used to check that every key word is one token (the position
    conventions rely on it); `spec` is accepted for symmetry with the chat template and is
    not needed (every method shares this prompt).
    """
    options = _require(item, "options", "the prompt lists the four options")
    text = IMAGE_SEGMENT + option_text(options) + question_text(item)
    if tokenizer is not None:
        for word in list(options) + list(_field(item, "keywords")):
            n = len(token_ids(tokenizer, " " + word))
            if n != 1:
                raise ValueError(f"item {_field(item, 'id', '<item>')}: word {word!r} is {n} tokens in this "
                                 "tokenizer; the testbed layout needs one token per option and key word")
    return text


def answer_text(word: str) -> str:
    """The answer as it follows the segment: the option's content word with its space."""
    return f" {word}"


def slot_token(spec) -> str:
    """The token written at latent slots (the spec's pad, else the method family's pad)."""
    if spec.pad_token:
        return spec.pad_token
    return DEFAULT_SLOT_TOKEN.get(spec.start_token, spec.start_token)


def segment_text(spec, item=None, n_latents: int | None = None, with_crop: bool = False) -> str:
    """The method's segment as text: latent markers + slots, or the caption between markers.

    `with_crop` puts the evidence crop (an image) right after the start token, as in Monet's
    first SFT stage (and, followed by latents, its second stage).
    """
    if spec.placement == "none":
        return ""
    if spec.placement == "text":
        caption = _require(item, "caption", f"method {spec.method!r} imagines the crop's caption")
        return f"{spec.start_token} {caption}{spec.end_token}"
    k = spec.n_latents if n_latents is None else n_latents
    crop = IMAGE_SEGMENT if with_crop else ""
    return f"{spec.start_token}{crop}{slot_token(spec) * k}{spec.end_token}"


def answer_prefix(item, spec) -> str:
    """What comes between the segment and the answer: the key words again ('' without a segment)."""
    if spec is None or spec.placement == "none":
        return ""
    return "".join(f" {k}" for k in _require(item, "keywords", "the key words are restated"))


def training_text(tokenizer, item, spec, n_latents: int | None = None, with_crop: bool = False) -> str:
    """Prompt + segment + restated key words + answer: the whole teacher-forced sequence."""
    word = _require(item, "answer_word", "training needs the answer's content word")
    return (testbed_prompt(tokenizer, item, spec) + segment_text(spec, item, n_latents, with_crop)
            + answer_prefix(item, spec) + answer_text(word))


def option_token_ids(tokenizer, options) -> list[int]:
    """Ids of ' o1' .. ' o4' (what multiple choice is scored over)."""
    bad = [w for w in options if len(token_ids(tokenizer, answer_text(w))) != 1]
    if bad:
        raise ValueError(f"options {bad} are not single tokens in this tokenizer")
    return first_token_ids(tokenizer, list(options), leading_space=True)


def degrade(image: Image.Image, side: int = DEGRADE_PX) -> Image.Image:
    """Box-average the image down to `side` px and back up (small things become unreadable)."""
    w, h = image.size
    return image.convert("RGB").resize((side, side), Image.BOX).resize((w, h), Image.NEAREST)


def evidence_crop(item) -> Image.Image:
    """The evidence crop (Monet's auxiliary image, Mirage's helper image, the positive control)."""
    return _require(item, "crop", "this method uses the evidence crop")


def testbed_spec(spec, **overrides):
    """`spec` with `overrides` and the testbed template."""
    return spec.with_overrides(template="testbed", **overrides)


def is_testbed(spec) -> bool:
    """Whether a spec uses this layout rather than a chat template."""
    return spec.template == "testbed"
