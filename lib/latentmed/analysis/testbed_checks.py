"""Checks of chapter 1's claims about the items themselves (no model involved).

`relpos_geometry` tests each relpos item against the generator's clear-cut rule
(`testbed.items.relation`): the two objects' cells are at least two cells apart on the named
axis (at least one cell between them) and at most half as far on the other axis (rounded
down), so the direction between the cell centres is within atan(1/2) = 26.6 degrees of the
axis. Objects are jittered inside their cells, so the drawn objects can lie at a larger angle;
the table reports that angle and whether the named axis still dominates in pixels.
"""

from __future__ import annotations

import math

import pandas as pd

from ..testbed.items import relation

RULE_DEGREES = math.degrees(math.atan(0.5))  # the cell rule's largest angle off the axis


def _centre(bbox) -> tuple[float, float]:
    return (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2


def relpos_geometry(items) -> pd.DataFrame:
    """One row per relpos item: cells, cell offsets, the rule's verdict, the answer, the angle off
    the named axis between the cell centres and between the drawn objects' centres."""
    rows = []
    for it in items:
        if it.family != "relpos":
            continue
        (ra, ca), (rb, cb) = (tuple(c) for c in it.evidence_cells[:2])
        (xa, ya), (xb, yb) = (_centre(b) for b in it.evidence_bboxes[:2])
        horizontal = it.answer_word in ("left", "right")
        cell_along, cell_across = (abs(ca - cb), abs(ra - rb)) if horizontal else (abs(ra - rb), abs(ca - cb))
        px_along, px_across = (abs(xa - xb), abs(ya - yb)) if horizontal else (abs(ya - yb), abs(xa - xb))
        rows.append(dict(id=it.id, answer=it.answer_word, cell_a=f"({ra}, {ca})", cell_b=f"({rb}, {cb})",
                         cells_along=cell_along, cells_across=cell_across,
                         rule_says=relation((ra, ca), (rb, cb)) or "not clear-cut",
                         cell_angle=math.degrees(math.atan2(cell_across, cell_along)),
                         pixel_angle=math.degrees(math.atan2(px_across, px_along)),
                         axis_dominates_in_pixels=px_along > px_across))
    out = pd.DataFrame(rows)
    if len(out):
        out["rule_agrees"] = out["rule_says"] == out["answer"]
    return out


def relpos_summary(geometry: pd.DataFrame) -> dict:
    """What the split-wide check found: items, agreement with the rule, largest angles."""
    if not len(geometry):
        return dict(n=0)
    return dict(n=len(geometry), rule_agrees=int(geometry["rule_agrees"].sum()),
                min_cells_along=int(geometry["cells_along"].min()),
                max_cell_angle=float(geometry["cell_angle"].max()),
                max_pixel_angle=float(geometry["pixel_angle"].max()),
                axis_dominates=int(geometry["axis_dominates_in_pixels"].sum()))


__all__ = ["RULE_DEGREES", "relpos_geometry", "relpos_summary"]
