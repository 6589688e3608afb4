"""Answer extraction and multiple-choice scoring, with an explicit "unparsed" outcome.

Each method answers in its own format (`\\boxed{}`, `<answer>…</answer>`, an option letter, or
the testbed's option content word). `parse_answer` first cuts the method's answer field, then
maps it to an option index with a letter cascade (after lmms-eval's `extract_answer_letter`)
or a content-word match. Nothing matched is `None`: counted as unparsed, never guessed.
A second, parse-free score is the argmax over the option tokens' log-probs (`score_options`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from .memo import token_ids

LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class Parsed:
    """An extracted answer: option index (None = unparsed) and the text it came from."""

    index: int | None
    text: str | None

    @property
    def unparsed(self) -> bool:
        return self.index is None

    @property
    def letter(self) -> str | None:
        return None if self.index is None else LETTERS[self.index]


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces balanced; None if there is none."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, j = 1, i + len("\\boxed{")
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j:k].strip()
    return None


def extract_answer_tag(text: str) -> str | None:
    """Text after the last `<answer>`, cut at `</answer>` (LVR's rule); None if no tag."""
    i = text.rfind("<answer>")
    if i < 0:
        return None
    return text[i + len("<answer>"):].split("</answer")[0].strip()


def extract_letter(text: str, n_options: int = 4) -> str | None:
    """Option letter by a cascade of patterns, most explicit first; None if nothing fits.

    Unlike lmms-eval, the last two stages (lone letters, any letter) must be unambiguous:
    "maybe B or D" is unparsed rather than B.
    """
    L = f"[{LETTERS[:n_options]}]"
    s = text.strip()
    lone = set(re.findall(rf"(?:^|[\s(])({L})(?=[\s.):,]|$)", s))
    if len(lone) > 1:  # "B or C", "(A) or (D)": more than one option letter stands alone
        return None
    patterns = [
        rf"^\(?({L})\)?(?:[.):\s]|$)",  # leading letter: "B", "B.", "(B) ..."
        rf"(?i:answer|choice|option)(?:\s+is)?\s*[:\s]\s*\(?({L})\b",  # "the answer is B"
        rf"\(({L})\)",  # "(B)"
        rf"\b({L})[.)]",  # "B." / "B)"
    ]
    for p in patterns:
        m = re.search(p, s)
        if m:
            return m.group(1)
    for p in (rf"(?:^|\s)({L})(?=\s|$)", rf"\b({L})\b"):  # a lone letter, then any single letter
        found = set(re.findall(p, s))
        if len(found) == 1:
            return found.pop()
        if found:
            return None
    return None


def match_option(text: str, options: list[str]) -> int | None:
    """Index of the one option whose content word(s) occur in `text` as whole words."""
    t = text.strip().lower().rstrip(".")
    exact = [i for i, o in enumerate(options) if t == o.lower()]
    if exact:
        return exact[0]
    hits = [i for i, o in enumerate(options) if re.search(rf"\b{re.escape(o.lower())}\b", t)]
    return hits[0] if len(hits) == 1 else None


def answer_field(text: str, fmt: str) -> str | None:
    """The part of a reply that holds the answer in format `fmt` (None: the field is missing)."""
    if fmt == "boxed":
        return extract_boxed(text)
    if fmt == "answer_tag":
        return extract_answer_tag(text)
    return text


def parse_answer(text: str, fmt: str, options: list[str] | None = None) -> Parsed:
    """Option index from a reply: the answer field, read as a content word and as a letter; when
    both readings give an option and they disagree ("A. blue" where blue is C), it is unparsed."""
    return _parse(text, fmt, None if options is None else tuple(options))


@functools.lru_cache(maxsize=65536)
def _parse(text: str, fmt: str, options: tuple[str, ...] | None) -> Parsed:
    """`parse_answer`, memoised (a sweep's variants mostly write the same few replies)."""
    field_ = answer_field(text, fmt)
    if field_ is None and fmt in ("boxed", "answer_tag"):
        field_ = text  # fall back to the whole reply, as the official graders do
    n = len(options) if options else 4
    word = match_option(field_, options) if options else None
    letter = extract_letter(field_, n)
    by_letter = None if letter is None else LETTERS.index(letter)
    if word is not None and by_letter is not None and word != by_letter and not _is_word(field_, options[word]):
        return Parsed(None, field_)
    return Parsed(word if word is not None else by_letter, field_)


def _is_word(field_: str, option: str) -> bool:
    """The field is just the option's content word (a one-letter option word is not a letter)."""
    return field_.strip().lower().rstrip(".") == option.lower()


def option_token_ids(tokenizer, options: list[str], leading_space: bool = False) -> list[int]:
    """First token id of each option (with or without a leading space); duplicates are an error."""
    ids = [token_ids(tokenizer, (" " if leading_space else "") + o)[0] for o in options]
    if len(set(ids)) != len(ids):
        raise ValueError(f"options {options} share a first token; score them by text instead")
    return ids


def option_logprobs(logits: torch.Tensor, option_ids: list[int]) -> torch.Tensor:
    """Log-probs (over the full vocabulary) of the option tokens: [..., n_options]."""
    return torch.log_softmax(logits.float(), -1)[..., option_ids]


def margins(logprobs: torch.Tensor) -> torch.Tensor:
    """Per option: its log-prob minus the best other option's (positive = it wins)."""
    lp = torch.as_tensor(logprobs, dtype=torch.float32)
    out = torch.empty_like(lp)
    for i in range(lp.shape[-1]):
        others = torch.cat([lp[..., :i], lp[..., i + 1:]], -1)
        out[..., i] = lp[..., i] - others.max(-1).values
    return out


def score_options(logprobs) -> int:
    """Multiple-choice answer by the option tokens' scores (argmax; needs no parsing)."""
    return int(torch.as_tensor(logprobs).argmax())
