"""Input edits: they act on the `Query` when the prompt is built (image, question, options)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from ..memo import FeatureMemo
from ..query import Query, as_image
from .base import (
    Intervention,
    _bad,
    _check_boxes,
    _check_choice,
    _check_int,
    _check_number,
    _colour,
    derangement,
)

# ---- input edits (when the prompt is built) ---------------------------------------------------

@dataclass
class InputEdit(Intervention, abstract=True):
    point: ClassVar[str] = "input"

    @staticmethod
    def _map_images(query: Query, fn) -> Query:
        if not query.images:
            raise ValueError("this input edit needs a query with an image")
        return query.replace(images=[fn(im) for im in query.images])


@dataclass
class BlankImage(InputEdit):
    """Replace every image by a uniform one of the same size."""
    colour: tuple[int, int, int] = (128, 128, 128)

    def validate(self):
        _colour(self, "colour")

    def edit_query(self, q):
        return self._map_images(q, lambda im: Image.new("RGB", im.size, tuple(self.colour)))


@dataclass
class NoiseImage(InputEdit):
    """Add (or replace by) seeded Gaussian pixel noise of std `std` levels."""
    std: float = 64.0
    mode: str = "add"
    seed: int = 0

    def validate(self):
        _check_number(self, "std", lo=0, lo_open=True)
        _check_choice(self, "mode", ("add", "replace"))
        _check_int(self, "seed")

    def edit_query(self, q):
        draws = iter(seeded_normal(self.seed, tuple((im.height, im.width, 3) for im in q.images)))

        def noisy(im):
            x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32))
            n = next(draws) * self.std
            x = (x + n if self.mode == "add" else 128 + n).clamp(0, 255).round().to(torch.uint8)
            return Image.fromarray(x.numpy())

        return self._map_images(q, noisy)


_NORMAL = FeatureMemo(int(float(os.environ.get("LATENTMED_NOISE_MEMO_MB", "256")) * 2**20))


def seeded_normal(seed: int, shapes: tuple[tuple[int, ...], ...]) -> list[torch.Tensor]:
    """The draws `torch.randn(shape, generator)` makes for each of `shapes` in turn from a generator
    seeded with `seed` (callers must not write into them). Memoised, bounded by bytes
    (LATENTMED_NOISE_MEMO_MB, 0 turns it off): a study perturbs the same items with the same seeds
    at three noise levels for every model, and a 224 px draw costs about 1 ms."""
    if not shapes:
        return []
    key = (seed, shapes)
    flat = _NORMAL.get(key) if _NORMAL.max_bytes > 0 else None
    if flat is None:
        g = torch.Generator().manual_seed(seed)
        flat = torch.cat([torch.randn(s, generator=g).flatten() for s in shapes])
        _NORMAL.put(key, flat)
    out, i = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(flat[i:i + n].view(s))
        i += n
    return out


@dataclass
class OtherImage(InputEdit):
    """Use another image with this question (a file path, or an in-memory `image`, not serialised).
    The evidence crop and boxes belong to the old image: they are dropped, or replaced by the
    other image's `crop` (in memory, not serialised) and `evidence_boxes` when given."""
    path: str | None = None
    image: Any = field(default=None, repr=False, compare=False, metadata={"serialise": False})
    crop: Any = field(default=None, repr=False, compare=False, metadata={"serialise": False})
    evidence_boxes: list[list[float]] | None = None  # where the evidence sits in the other image
    source: str | None = None  # a name for the other image in results (e.g. its item id)

    def validate(self):
        if self.path is None and self.image is None:
            _bad(self, "path", "give a path or an image")
        if self.image is not None:
            self.image = as_image(self.image, "OtherImage.image")
        if self.crop is not None:
            self.crop = as_image(self.crop, "OtherImage.crop")

    def edit_query(self, q):
        im = self.image if self.image is not None else as_image(self.path, "OtherImage.path")
        return q.replace(images=[im] + list(q.images[1:]), crop=self.crop, evidence_boxes=self.evidence_boxes)



@dataclass
class MaskPatches(InputEdit):
    """Paint boxes (x0, y0, x1, y1 as fractions of the image) with a uniform colour."""
    boxes: list[list[float]] = field(default_factory=list)
    colour: tuple[int, int, int] = (128, 128, 128)

    def validate(self):
        _check_boxes(self, "boxes")
        _colour(self, "colour")

    def edit_query(self, q):
        def paint(im):
            im = im.convert("RGB").copy()
            w, h = im.size
            for x0, y0, x1, y1 in self.boxes:
                im.paste(tuple(self.colour), (round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)))
            return im

        return self._map_images(q, paint)


@dataclass
class MaskEvidence(InputEdit):
    """Paint the query's own evidence boxes (plus `pad` px) with a uniform colour: the answer's
    evidence is gone, the rest of the scene stays (the evidence crop, a zoom on it, goes blank)."""
    pad: int = 2
    colour: tuple[int, int, int] = (128, 128, 128)

    def validate(self):
        _check_int(self, "pad")
        _colour(self, "colour")

    def edit_query(self, q):
        if q.evidence_boxes is None:
            raise ValueError(f"MaskEvidence: query {q.id or ''} does not say where its evidence is (evidence_boxes)")
        if not q.evidence_boxes:  # nothing to see (e.g. zero objects to count): the scene stays as it is
            return q
        im = q.images[0].convert("RGB").copy()
        for x0, y0, x1, y1 in q.evidence_boxes:
            im.paste(tuple(self.colour), (int(x0) - self.pad, int(y0) - self.pad, int(x1) + self.pad, int(y1) + self.pad))
        crop = None if q.crop is None else Image.new("RGB", q.crop.size, tuple(self.colour))  # a zoom on the evidence
        return q.replace(images=[im] + list(q.images[1:]), crop=crop)


@dataclass
class SwapQuestion(InputEdit):
    """Ask another question about the same image: its key words (testbed layout) and, when given,
    its options come with it, so the key words restated after the segment stay consistent."""
    question: str = ""
    keywords: list[str] | None = None
    options: list[str] | None = None

    def validate(self):
        if not isinstance(self.question, str) or not self.question.strip():
            _bad(self, "question", "must be a non-empty string")

    def edit_query(self, q):
        kw = dict(question=self.question, keywords=self.keywords if self.keywords is not None else q.keywords)
        if self.options is not None:
            kw.update(options=list(self.options), answer=None)
        return Query(**{**q.__dict__, **kw})


@dataclass
class ShuffleOptions(InputEdit):
    """Present the options in a seeded order that moves every option (a derangement)."""
    seed: int = 0

    def validate(self):
        _check_int(self, "seed")

    def order(self, n: int) -> list[int]:
        return derangement(n, self.seed)

    def edit_query(self, q):
        if not q.options:
            raise ValueError("ShuffleOptions: the query has no options")
        perm = self.order(len(q.options))
        answer = None if q.answer is None else perm.index(q.answer)
        return q.replace(options=[q.options[i] for i in perm], answer=answer)


def apply_query_edits(query: Query, edits) -> Query:
    for e in edits:
        query = e.edit_query(query)
    return query
