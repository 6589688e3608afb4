"""`Query`: the one item type that prompts are built from and that every input edit acts on.

A query is what the model is asked: its images, the question, the options and, for the testbed
layout, the question's key words (written last and restated after the segment). It may carry
what some methods or edits need beside that: the evidence crop (the positive control's latent
source), the evidence boxes (masking the evidence) and the right option (scoring). Testbed items
and real benchmark examples become queries with `Query.of(...)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

MAX_OPTIONS = 8  # option letters A-H
MAX_ASPECT = 200  # Qwen2.5-VL's processor refuses images more elongated than this


def as_image(x, where: str = "image") -> Image.Image:
    """A PIL image from a PIL image, a file path or an HxWx3 uint8 array; anything else is an error."""
    if isinstance(x, Image.Image):
        im = x
    elif isinstance(x, (str, Path)):
        try:
            with Image.open(x) as f:
                f.load()
                im = f.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ValueError(f"{x}: cannot read image ({exc})") from exc
    elif isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in (1, 3, 4)):
            raise ValueError(f"{where}: a numpy image must be uint8 HxW or HxWx(1|3|4), got {x.dtype} {x.shape}")
        im = Image.fromarray(x.squeeze(-1) if x.ndim == 3 and x.shape[2] == 1 else x)
    else:
        raise TypeError(f"{where}: expected a PIL image, a file path or a numpy array, got {type(x).__name__}")
    w, h = im.size
    if w < 1 or h < 1:
        raise ValueError(f"{where}: empty image ({w}x{h})")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise ValueError(f"{where}: aspect ratio {max(w, h) / min(w, h):.0f}:1 is beyond {MAX_ASPECT}:1, "
                         "which Qwen2.5-VL's processor cannot tile; crop or pad the image")
    return im.convert("RGB") if im.mode != "RGB" else im


def _words(x, name: str, ident: str) -> list[str] | None:
    if x is None:
        return None
    if isinstance(x, str) or not isinstance(x, (list, tuple)):
        raise TypeError(f"{ident}: {name} must be a list of strings, got {type(x).__name__} {x!r}")
    out = list(x)
    bad = [w for w in out if not isinstance(w, str) or not w.strip()]
    if bad:
        raise ValueError(f"{ident}: {name} must be non-empty strings, got {bad!r}")
    return out


def _boxes(x, ident: str) -> list[list[float]] | None:
    """Evidence boxes as [x0, y0, x1, y1] pixel lists with x0 < x1 and y0 < y1 (None: no boxes)."""
    if x is None:
        return None
    if isinstance(x, (str, bytes)) or not isinstance(x, (list, tuple)):
        raise TypeError(f"{ident}: evidence_boxes must be a list of [x0, y0, x1, y1] boxes, got {type(x).__name__}")
    out = []
    for b in x:
        ok = isinstance(b, (list, tuple)) and len(b) == 4 and all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)
            for v in b)
        if not ok or b[0] >= b[2] or b[1] >= b[3]:
            raise ValueError(f"{ident}: evidence box {b!r} is not [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
        out.append([float(v) if isinstance(v, (float, np.floating)) else int(v) for v in b])
    return out


@dataclass
class Query:
    """What one prompt asks; validated on construction."""

    images: list = field(default_factory=list)
    question: str = ""
    options: list[str] | None = None
    keywords: list[str] | None = None
    crop: Image.Image | None = field(default=None, repr=False)
    evidence_boxes: list[list[float]] | None = None  # pixel boxes (x0, y0, x1, y1) of the evidence
    answer: int | None = None  # index of the right option, when known
    id: str | None = None
    family: str | None = None

    def __post_init__(self) -> None:
        ident = f"query {self.id}" if self.id else "query"
        if isinstance(self.images, (Image.Image, str, Path, np.ndarray)):
            self.images = [self.images]
        self.images = [as_image(im, f"{ident} image {i}") for i, im in enumerate(self.images or [])]
        if self.crop is not None:
            self.crop = as_image(self.crop, f"{ident} crop")
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"{ident}: the question is empty")
        self.options = _words(self.options, "options", ident)
        if self.options is not None:
            if not 2 <= len(self.options) <= MAX_OPTIONS:
                raise ValueError(f"{ident}: {len(self.options)} options; between 2 and {MAX_OPTIONS} are supported")
            if len(set(self.options)) != len(self.options):
                raise ValueError(f"{ident}: duplicate options {self.options!r}")
        self.keywords = _words(self.keywords, "keywords", ident)
        self.evidence_boxes = _boxes(self.evidence_boxes, ident)
        if self.answer is not None:
            n = len(self.options or [])
            if not isinstance(self.answer, (int, np.integer)) or not 0 <= self.answer < n:
                raise ValueError(f"{ident}: answer index {self.answer!r} is not one of the {n} options")

    @classmethod
    def of(cls, item) -> "Query":
        """A query from a testbed `Item`, a dict with the same fields, or a query (returned as is)."""
        if isinstance(item, Query):
            return item
        get = item.get if isinstance(item, dict) else (lambda k, d=None: getattr(item, k, d))
        if get("question") is None:
            raise TypeError(f"cannot make a query from {type(item).__name__}: it has no 'question'")
        image = get("image")
        images = get("images") if image is None else [image]
        options, word = get("options"), get("answer_word")
        answer = options.index(word) if options and word in options else None
        return cls(images=images or [], question=get("question"), options=options, keywords=get("keywords"),
                   crop=get("crop"), evidence_boxes=get("evidence_bboxes", get("evidence_boxes")), answer=answer,
                   id=get("id"), family=get("family"))

    def replace(self, **kw) -> "Query":
        return dataclasses.replace(self, **kw)
