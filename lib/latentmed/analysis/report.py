"""Numbers as the book shows them: an effect with its interval, tables of effects, short claims.

Every sentence a chapter states about a result is built here from the rows that carry it, so
the text cannot drift from the numbers.
"""

from __future__ import annotations

import math

import pandas as pd

from ..zoo.recipes import KINDS


def ci(x: float, lo: float, hi: float, digits: int = 3, signed: bool = False) -> str:
    """'0.123 [0.100, 0.150]' (with a sign when `signed`)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(x)} [{f.format(lo)}, {f.format(hi)}]"


def p(x: float) -> str:
    """A p-value: '<1e-4' below that, else three significant digits."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return "<1e-4" if x < 1e-4 else f"{x:.3g}"


def kind(model: str) -> str:
    return KINDS.get(model, "other")


def effects_table(e: pd.DataFrame) -> pd.DataFrame:
    """The chapter's effects table: one row per model and condition, intervals in brackets."""
    out = pd.DataFrame({
        "model": e["model"], "kind": e["model"].map(kind), "condition": e["condition"], "n": e["n"],
        "accuracy clean -> edited": [f"{a:.3f} -> {b:.3f}" for a, b in zip(e["acc_clean"], e["acc"])],
        "change [95% CI]": [ci(x, lo, hi, signed=True) for x, lo, hi in zip(e["diff"], e["diff_low"], e["diff_high"])],
        "flip rate [95% CI]": [ci(x, lo, hi) for x, lo, hi in zip(e["flip_rate"], e["flip_low"], e["flip_high"])],
        "margin change [95% CI]": [ci(x, lo, hi, signed=True)
                                   for x, lo, hi in zip(e["margin_change"], e["margin_low"], e["margin_high"])],
        "McNemar p (Holm)": [p(x) for x in e.get("p_mcnemar_holm", e["p_mcnemar"])],
        "Wilcoxon p (Holm)": [p(x) for x in e.get("p_wilcoxon_holm", e["p_wilcoxon"])],
    })
    return out.reset_index(drop=True)


def claim(row: pd.Series, what: str = "accuracy") -> str:
    """One effect as a sentence fragment: 'accuracy 0.880 -> 0.240 (change -0.640 [-0.690, -0.590], McNemar p_holm <1e-4, n = 400)'."""
    return (f"{what} {row['acc_clean']:.3f} -> {row['acc']:.3f} (change "
            f"{ci(row['diff'], row['diff_low'], row['diff_high'], signed=True)}, McNemar p_holm "
            f"{p(row.get('p_mcnemar_holm', row['p_mcnemar']))}, n = {int(row['n'])})")
