"""The resolution argument: the evidence is small and unreadable after downscaling.

A reader that knows where the target is reads it by nearest-template matching after the whole
scene is box-filtered down by a factor and upscaled back; `readability` reports its accuracy per
family and factor against chance (`testbed.evidence_fraction` gives the evidence's share of the
image).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from PIL import Image

from .items import Item
from .scenes import (
    MAX_SIZE,
    MIN_DIGIT_SIZE,
    MIN_SIZE,
    SHAPES,
    SceneObject,
    cell_box,
    degrade,
    region,
    render_region,
)


def _target(item: Item) -> SceneObject:
    """The object whose box is the item's (first) evidence box."""
    box = list(item.evidence_bboxes[0])
    return next(o for o in item.scene_objects() if list(o.bbox) == box)


def _candidates(item: Item) -> tuple[list[SceneObject], int]:
    """Every object the target could be, centred where it is: (what, size) pairs, and the truth.

    The reader knows where the target is and its colour (what retrieval would give a model)
    but not its size or identity: candidates are the 10 digit boxes (glyph) or the 4 shapes
    (attr) at every size the generator draws.
    """
    t = _target(item)
    low = MIN_DIGIT_SIZE if t.kind == "digit" else MIN_SIZE
    twice_cx, twice_cy = t.bbox[0] + t.bbox[2], t.bbox[1] + t.bbox[3]
    cands, truth = [], []
    for size in range(low, MAX_SIZE + 1):
        x0, y0 = (twice_cx - size) // 2, (twice_cy - size) // 2
        box = (x0, y0, x0 + size, y0 + size)
        if item.family == "glyph":
            cands += [dataclasses.replace(t, digit=d, bbox=box) for d in range(10)]
            truth += list(range(10))
        else:
            cands += [dataclasses.replace(t, shape=s, bbox=box) for s in SHAPES]
            truth += list(range(len(SHAPES)))
    return cands, truth, (t.digit if item.family == "glyph" else SHAPES.index(t.shape))


def _read_target(item: Item, image: Image.Image, factors) -> dict[int, bool]:
    """Nearest-template reading of the target's cell after each downscale factor: right or wrong."""
    cands, labels, truth = _candidates(item)
    size = image.size[0]
    box = cell_box(tuple(item.evidence_cells[0]))
    templates = np.stack([render_region([c], size, box) for c in cands])
    out = {}
    for f in factors:
        seen = region(degrade(image, f), box)
        dist = ((templates - seen[None]) ** 2).sum(axis=(1, 2, 3))
        out[f] = labels[int(np.argmin(dist))] == truth
    return out


def readability(items: list[Item], images=None, factors=(1, 2, 4, 8)) -> pd.DataFrame:
    """How well the target can be read after downscaling: glyph digits and attr shapes.

    The whole image is box-filtered down by each factor and bilinearly upscaled back, then the
    evidence box is matched against the clean renderings of every candidate (10 digit boxes of
    the target's colour, or its 4 shapes) at the same place. Returns one row per family and
    factor: accuracy, n, chance. Near 1 at factor 1; near chance at factor 4 (56 px) for glyph.
    """
    images = [it.image for it in items] if images is None else list(images)
    hits: dict[tuple[str, int], list[bool]] = {}
    for item, image in zip(items, images):
        if item.family not in ("glyph", "attr"):
            continue
        if image is None:
            raise ValueError(f"item {item.id}: no image; pass images or attach them")
        for f, ok in _read_target(item, image, factors).items():
            hits.setdefault((item.family, f), []).append(ok)
    rows = [dict(family=fam, factor=f, side_px=(images[0].size[0] // f), accuracy=float(np.mean(v)),
                 n=len(v), chance=1 / (10 if fam == "glyph" else 4))
            for (fam, f), v in sorted(hits.items())]
    return pd.DataFrame(rows, columns=["family", "factor", "side_px", "accuracy", "n", "chance"])
