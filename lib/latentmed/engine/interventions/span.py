"""CapImagine's text imagination: token-level edits of the span between the markers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Intervention, _bad, _check_int, derangement

# ---- CapImagine text imagination --------------------------------------------------------------

@dataclass
class SpanEdit(Intervention, abstract=True):
    point: ClassVar[str] = "span"


@dataclass
class DeleteSpan(SpanEdit):
    """Empty the imagination span (markers stay)."""
    def edit_span(self, ids, tokenizer):
        return []


@dataclass
class ShuffleSpan(SpanEdit):
    """Shuffle the span's tokens in a seeded order that moves every token."""
    seed: int = 0

    def validate(self):
        _check_int(self, "seed")

    def edit_span(self, ids, tokenizer):
        return [ids[i] for i in derangement(len(ids), self.seed)]


@dataclass
class ReplaceSpan(SpanEdit):
    """Replace the span by another instance's caption (token ids, or text to tokenize)."""
    ids: list[int] | None = None
    text: str | None = None

    def validate(self):
        if (self.ids is None) == (self.text is None):
            _bad(self, "ids", "give exactly one of ids and text")
        if self.ids is not None and not all(isinstance(i, (int, np.integer)) and i >= 0 for i in self.ids):
            _bad(self, "ids", f"must be token ids >= 0, got {self.ids!r}")

    def edit_span(self, ids, tokenizer):
        if self.ids is not None:
            return list(self.ids)
        return tokenizer.encode(self.text, add_special_tokens=False)


@dataclass
class CorruptWord(SpanEdit):
    """Replace a described word (e.g. the attribute that states the answer) by a wrong one."""
    old: str = ""
    new: str = ""

    def validate(self):
        if not isinstance(self.old, str) or not self.old:
            _bad(self, "old", "must be a non-empty string")
        if not isinstance(self.new, str):
            _bad(self, "new", "must be a string")

    def edit_span(self, ids, tokenizer):
        text = tokenizer.decode(ids)
        if self.old not in text:
            raise ValueError(f"CorruptWord: {self.old!r} does not occur in the span {text!r}")
        return tokenizer.encode(text.replace(self.old, self.new), add_special_tokens=False)
