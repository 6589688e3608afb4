"""What a low-resolution view of a scene still carries, measured with readers matched to it.

A *view* is a function from the scene to what a viewer sees (`downscaled(f)`: box-filtered
down by a factor and bilinearly upscaled back; the positive control's view is passed in by the
caller, `engine.layouts.degrade`). Readers answer from a view and are scored against the
generator's truth:

* `matched`: for attr and glyph, told the target's box and colour, it renders every candidate
  (the 4 shapes, or the 10 digits) into the scene in place of the target, passes each through
  the *same* view, and picks the nearest to what it sees in the target's cell: a matched filter,
  so its accuracy is what the pixels of the view still determine, not a property of the reader.
* `clean`: the same, but compared with clean (not degraded) candidates at every size the
  generator draws. It is mismatched to the view and so understates what the view carries; it is
  kept to show how much of an apparent "resolution limit" can be the reader's.
* `cells` (relpos, count): told only the colours named in the question, it classifies each
  28-px cell's dominant colour from the view (centre of the cell, residual over the equally
  degraded background) and answers from the cells: the relation of the two colours' cells
  (`items.relation`, the generator's own rule) or the number of cells of the colour.

`readability` returns one row per family, reader and view. `needle_stats` says how small the
evidence is in token terms (the share of the merged image tokens that hold it).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image

from .items import Item, relation
from .scenes import (
    CELL,
    COLOUR_NAMES,
    COLOURS,
    MAX_SIZE,
    MIN_DIGIT_SIZE,
    MIN_SIZE,
    SHAPES,
    SceneObject,
    background,
    cell_box,
    degrade,
    grid_size,
    region,
    render,
    render_region,
)

View = Callable[[Image.Image], Image.Image]
READERS = {"attr": ("matched", "clean"), "glyph": ("matched", "clean"), "relpos": ("cells",), "count": ("cells",)}
READS = {"attr": "shape of the target", "glyph": "digit in the target box", "relpos": "relation of two colours",
         "count": "number of objects of a colour"}
CHANCE = {"attr": 1 / len(SHAPES), "glyph": 0.1, "relpos": 0.25, "count": 0.25}
_CELL_MARGIN = 8  # px of each cell's border the cell reader ignores (blur from the neighbours)
_CELL_RESIDUAL = 20.0  # RGB distance from the background that counts as object ink
_CELL_MIN_PIXELS = 10  # pixels of ink in the cell's centre that make an object


def downscaled(factor: int) -> View:
    """Box-filter down by `factor` and bilinearly upscale back (`scenes.degrade`)."""
    return lambda image: degrade(image, factor)


def downscale_views(image_size: int, factors=(1, 2, 4, 8)) -> dict[str, View]:
    """The standard series of views, named by the side of the low-resolution image."""
    return {f"{image_size // f} px": downscaled(f) for f in factors}


def _target(item: Item) -> SceneObject:
    """The object whose box is the item's (first) evidence box."""
    box = list(item.evidence_bboxes[0])
    return next(o for o in item.scene_objects() if list(o.bbox) == box)


def _truth(item: Item, t: SceneObject) -> int:
    return t.digit if item.family == "glyph" else SHAPES.index(t.shape)


def _swaps(item: Item, t: SceneObject, box=None) -> list[SceneObject]:
    """The target replaced by every candidate identity (in `box`, default its own box)."""
    box = tuple(box or t.bbox)
    if item.family == "glyph":
        return [dataclasses.replace(t, digit=d, bbox=box) for d in range(10)]
    return [dataclasses.replace(t, shape=s, bbox=box) for s in SHAPES]


def read_matched(item: Item, view: View) -> bool:
    """Matched filter: every candidate rendered into the scene and passed through the same view."""
    t = _target(item)
    others = [o for o in item.scene_objects() if o != t]
    size = item.image.size[0]
    box = cell_box(tuple(item.evidence_cells[0]))
    seen = region(view(item.image), box)
    dist = [((region(view(render(others + [c], size)), box) - seen) ** 2).sum() for c in _swaps(item, t)]
    return int(np.argmin(dist)) == _truth(item, t)


def read_clean(item: Item, view: View) -> bool:
    """Mismatched reader: clean candidates (centred on the target, every size) against the view."""
    t = _target(item)
    low = MIN_DIGIT_SIZE if t.kind == "digit" else MIN_SIZE
    twice_cx, twice_cy = t.bbox[0] + t.bbox[2], t.bbox[1] + t.bbox[3]
    cands, labels = [], []
    for s in range(low, MAX_SIZE + 1):
        x0, y0 = (twice_cx - s) // 2, (twice_cy - s) // 2
        swaps = _swaps(item, t, (x0, y0, x0 + s, y0 + s))
        cands += swaps
        labels += list(range(len(swaps)))
    size = item.image.size[0]
    box = cell_box(tuple(item.evidence_cells[0]))
    templates = np.stack([render_region([c], size, box) for c in cands])
    seen = region(view(item.image), box)
    dist = ((templates - seen[None]) ** 2).sum(axis=(1, 2, 3))
    return labels[int(np.argmin(dist))] == _truth(item, t)


def cell_colours(seen: Image.Image, seen_background: Image.Image) -> dict[tuple[int, int], str]:
    """Dominant object colour of every cell of a view that holds an object (by its centre)."""
    a = np.asarray(seen, dtype=float)
    b = np.asarray(seen_background, dtype=float)
    palette = np.array([COLOURS[n] for n in COLOUR_NAMES], dtype=float)
    g, m = grid_size(a.shape[0]), _CELL_MARGIN
    out = {}
    for r in range(g):
        for c in range(g):
            x0, y0, x1, y1 = cell_box((r, c))
            px = a[y0 + m:y1 - m, x0 + m:x1 - m].reshape(-1, 3)
            bg = b[y0 + m:y1 - m, x0 + m:x1 - m].reshape(-1, 3)
            ink = np.linalg.norm(px - bg, axis=1) > _CELL_RESIDUAL
            if ink.sum() < _CELL_MIN_PIXELS:
                continue
            d = (px[ink] - bg[ink]).sum(axis=0)
            dirs = palette - bg[ink].mean(axis=0)
            cos = dirs @ d / (np.linalg.norm(dirs, axis=1) * np.linalg.norm(d) + 1e-9)
            out[(r, c)] = COLOUR_NAMES[int(np.argmax(cos))]
    return out


def read_cells(item: Item, view: View) -> bool:
    """relpos and count answered from the cells' colours in the view."""
    size = item.image.size[0]
    colours = cell_colours(view(item.image), view(Image.fromarray(background(size).copy())))
    if item.family == "count":
        return sum(v == item.facts["colour"] for v in colours.values()) == item.facts["count"]
    a = [cell for cell, v in colours.items() if v == item.keywords[0]]
    b = [cell for cell, v in colours.items() if v == item.keywords[1]]
    pred = relation(a[0], b[0]) if len(a) == 1 and len(b) == 1 else None
    return pred == item.answer_word


_READ = {"matched": read_matched, "clean": read_clean, "cells": read_cells}


def readability(items: list[Item], views: dict[str, View] | None = None, readers: dict | None = None,
                factors=None) -> pd.DataFrame:
    """Accuracy of each family's readers on each view of the items' scenes.

    Returns one row per (family, reader, view): family, reads, reader, view, accuracy, n,
    chance. Items need their images attached (`make_item` attaches them).

    `factors` without `views` is the earlier interface: the clean-template reader only, on
    attr and glyph, with columns family, factor, side_px, accuracy, n, chance.
    """
    if views is None:
        return _clean_by_factor(items, factors or (1, 2, 4, 8))
    readers = readers or READERS
    hits: dict[tuple, list[bool]] = {}
    for item in items:
        if item.image is None:
            raise ValueError(f"item {item.id}: no image; read items made by make_item or attach images")
        for reader in readers.get(item.family, ()):
            for name, view in views.items():
                hits.setdefault((item.family, reader, name), []).append(_READ[reader](item, view))
    order = {f: i for i, f in enumerate(READERS)}
    vorder = {v: i for i, v in enumerate(views)}
    rows = [dict(family=f, reads=READS[f], reader=r, view=v, accuracy=float(np.mean(h)), n=len(h), chance=CHANCE[f])
            for (f, r, v), h in sorted(hits.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] != "matched",
                                                                      vorder[kv[0][2]]))]
    return pd.DataFrame(rows, columns=["family", "reads", "reader", "view", "accuracy", "n", "chance"])


def _clean_by_factor(items: list[Item], factors) -> pd.DataFrame:
    """The clean-template reader per downscale factor (the mismatched reader, see the module doc)."""
    hits: dict[tuple[str, int], list[bool]] = {}
    for item in items:
        if item.family not in ("glyph", "attr"):
            continue
        if item.image is None:
            raise ValueError(f"item {item.id}: no image; read items made by make_item or attach images")
        for f in factors:
            hits.setdefault((item.family, f), []).append(read_clean(item, downscaled(f)))
    side = items[0].image.size[0] if items else 0
    rows = [dict(family=fam, factor=f, side_px=side // f, accuracy=float(np.mean(v)), n=len(v), chance=CHANCE[fam])
            for (fam, f), v in sorted(hits.items())]
    return pd.DataFrame(rows, columns=["family", "factor", "side_px", "accuracy", "n", "chance"])


def needle_stats(items: list[Item], image_size: int) -> pd.DataFrame:
    """Per family: merged image tokens, objects per scene, tokens holding evidence and their share."""
    tokens = grid_size(image_size) ** 2
    rows = [dict(family=it.family, objects=len(it.objects), evidence_tokens=len({tuple(c) for c in it.evidence_cells}))
            for it in items]
    df = pd.DataFrame(rows)
    out = df.groupby("family", sort=False).agg(objects_mean=("objects", "mean"), objects_min=("objects", "min"),
                                               objects_max=("objects", "max"),
                                               evidence_tokens_mean=("evidence_tokens", "mean"),
                                               evidence_tokens_max=("evidence_tokens", "max")).reset_index()
    out.insert(1, "image_tokens", tokens)
    out["evidence_share_mean"] = out["evidence_tokens_mean"] / tokens
    return out


__all__ = ["CELL", "CHANCE", "READERS", "READS", "cell_colours", "downscale_views", "downscaled", "needle_stats",
           "read_cells", "read_clean", "read_matched", "readability"]
