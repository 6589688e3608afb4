"""The base of every intervention: fields checked when made, a dict form, and which entry point
applies which point (`check_supported`)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch

from ..query import Query

REGISTRY: dict[str, type["Intervention"]] = {}
ENTRY_POINTS = ("generate", "sweep", "replay", "continue_from", "regenerate")


@dataclass
class FeedContext:
    """Where a latent is being fed: latent index k in segment `segment` of batch row `row`."""
    k: int
    segment: int = 0
    row: int = 0
    first: torch.Tensor | None = None  # the vector fed at this segment's first slot (k > 0)


def _bad(obj, name: str, msg: str):
    raise ValueError(f"{type(obj).__name__}.{name}: {msg}")


def _check_number(obj, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    v = getattr(obj, name)
    if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool) or not math.isfinite(v):
        _bad(obj, name, f"must be a finite number, got {v!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        _bad(obj, name, f"must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and v > hi:
        _bad(obj, name, f"must be <= {hi}, got {v!r}")


def _check_int(obj, name: str, lo: int = 0, optional: bool = False):
    v = getattr(obj, name)
    if optional and v is None:
        return
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
        _bad(obj, name, f"must be an integer >= {lo}, got {v!r}")


def _check_choice(obj, name: str, choices):
    if getattr(obj, name) not in choices:
        _bad(obj, name, f"must be one of {', '.join(map(repr, choices))}, got {getattr(obj, name)!r}")


@dataclass
class Intervention:
    """Base class: every hook is a no-op, subclasses override the one at their `point`."""
    point: ClassVar[str] = "none"

    def __init_subclass__(cls, abstract: bool = False, **kw):
        """Every concrete subclass can be rebuilt from its dict form (`from_dict`)."""
        super().__init_subclass__(**kw)
        if not abstract:
            REGISTRY[cls.__name__] = cls

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the fields (subclasses extend it); raise ValueError naming the field."""

    def to_dict(self) -> dict:
        out = {"kind": type(self).__name__}
        for f in fields(self):
            if f.metadata.get("serialise", True):
                v = getattr(self, f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def feed(self, z: torch.Tensor, ctx: FeedContext) -> torch.Tensor:
        return z

    def segment_k(self, k: int) -> int | None:
        return k

    def acts_on(self, segment: int) -> bool:
        """Whether a segment edit acts on the run's segment number `segment` (0 = the first)."""
        return True

    def edit_query(self, query: Query) -> Query:
        return query

    def edit_features(self, feats: torch.Tensor) -> torch.Tensor:
        return feats

    def edit_span(self, ids: list[int], tokenizer) -> list[int]:
        return ids

    @property
    def shares_prefix(self) -> bool:
        """True when it cannot change anything before a latent segment opens (sweeps share it)."""
        return self.point in ("latent", "segment", "none")


def from_dict(d: dict) -> Intervention:
    """Rebuild an intervention from `to_dict` output; unknown kinds or fields are a clear error."""
    if not isinstance(d, dict):
        raise TypeError(f"an intervention dict is expected, got {type(d).__name__} {d!r}")
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in REGISTRY:
        raise ValueError(f"unknown intervention kind {kind!r}; known: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[kind]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{kind}: unknown field(s) {unknown}; its fields are {sorted(known)}")
    return cls(**d)


def as_interventions(items) -> list[Intervention]:
    """Accept interventions or their dicts (papermill parameters); anything else is an error."""
    if items is None:
        return []
    if isinstance(items, (Intervention, dict)):
        items = [items]
    out = []
    for x in items:
        if isinstance(x, dict):
            x = from_dict(x)
        if not isinstance(x, Intervention):
            raise TypeError(f"not an intervention: {type(x).__name__} {x!r}")
        out.append(x)
    return out


def by_point(ivs, point: str) -> list:
    """The interventions of `ivs` that act at `point`."""
    return [iv for iv in ivs if iv.point == point]


# ---- which entry point applies what ----------------------------------------------------------

_HOW = {
    "span": "it edits a generated imagination: use continue_from(trace, edits=...) to re-generate after "
            "the edited span, or replay(trace, edits=...) for a teacher-forced run",
    "segment": "continue_from keeps the segment it continues from: pass new_latents of another length, "
               "or use generate/regenerate (re-decoded) or replay (fewer latents, teacher-forced)",
}
_REFUSED = {("span", "generate"), ("span", "sweep"), ("span", "regenerate"), ("segment", "continue_from")}


def check_supported(ivs, entry: str) -> None:
    """Raise a clear error for an intervention that `entry` cannot apply (see `_REFUSED`)."""
    for iv in ivs:
        if (iv.point, entry) in _REFUSED:
            raise ValueError(f"{type(iv).__name__} cannot be applied by {entry}: {_HOW[iv.point]}")


def _vectors(obj, name: str, rank: int) -> None:
    v = getattr(obj, name)
    try:
        t = torch.as_tensor(v, dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        _bad(obj, name, f"must be numbers ({exc})")
    if t.dim() != rank or t.numel() == 0:
        _bad(obj, name, f"must be a non-empty {'vector' if rank == 1 else 'list of vectors'}, got shape {tuple(t.shape)}")


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) with no fixed point (identity for n < 2)."""
    if n < 2:
        return list(range(n))
    rng = random.Random(seed)
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return perm


def _vec(values, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    if v.shape != like.shape:
        raise ValueError(f"latent vector has shape {tuple(v.shape)}, expected {tuple(like.shape)}")
    return v


def _colour(obj, name: str) -> None:
    v = getattr(obj, name)
    if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(
            isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in v):
        _bad(obj, name, f"must be three integers 0-255, got {v!r}")


def _check_boxes(obj, name: str) -> None:
    boxes = getattr(obj, name)
    if not isinstance(boxes, (list, tuple)) or not boxes:
        _bad(obj, name, f"must be a non-empty list of [x0, y0, x1, y1] boxes, got {boxes!r}")
    for b in boxes:
        if (not isinstance(b, (list, tuple)) or len(b) != 4
                or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in b) or b[0] >= b[2] or b[1] >= b[3]):
            _bad(obj, name, f"each box is [x0, y0, x1, y1] as fractions of the image with x0 < x1, y0 < y1; got {b!r}")


def _check_positions(obj, name: str) -> None:
    v = getattr(obj, name)
    if v in ("latents", "all"):
        return
    if not isinstance(v, (list, tuple)) or not v or not all(
            isinstance(p, (int, np.integer)) and not isinstance(p, bool) and p >= 0 for p in v):
        _bad(obj, name, f"must be 'latents', 'all' or a list of sequence indices >= 0, got {v!r}")
