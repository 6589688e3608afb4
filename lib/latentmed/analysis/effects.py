"""Paired effects of a condition against the clean run on the same items, with intervals and tests.

For each (model, condition): accuracy with and without the edit and their difference with
Newcombe's 95% interval for paired proportions (`stats.paired_difference`), McNemar's test on
the paired correct/incorrect outcomes (statsmodels, through `stats.mcnemar_paired`), the
flip rate (share of items whose chosen option changes) with a Wilson interval, and the change in
the right option's log-prob margin with a bootstrap interval and Wilcoxon's signed-rank test
(scipy). Unparsed and non-finite outcomes are counted, never silently folded into "wrong".
Families of comparisons are corrected with Holm (statsmodels) by `correct`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

from .stats import ALPHA, bootstrap_interval, holm, mcnemar_paired, paired_difference, wilson

N_BOOT = 2000


def mean_ci(d, seed: int = 0, n_boot: int = N_BOOT, alpha: float = ALPHA) -> tuple[float, float, float]:
    """Mean of the finite per-item values with its percentile bootstrap interval over items."""
    d = np.asarray(d, dtype=float)
    return bootstrap_interval(d[np.isfinite(d)], n_boot=n_boot, alpha=alpha, seed=seed)


def paired(ref: pd.DataFrame, cond: pd.DataFrame, seed: int = 0) -> dict:
    """Effect of one condition against the reference rows on the items both have (keyed by item)."""
    both = ref.merge(cond, on="item", suffixes=("_ref", "_cond"), how="inner")
    n = len(both)
    a, b = both["correct_ref"].astype(bool).to_numpy(), both["correct_cond"].astype(bool).to_numpy()
    mc = mcnemar_paired(b, a)
    diff, lo, hi = paired_difference(b, a)
    flips = int((both["chosen_ref"].to_numpy() != both["chosen_cond"].to_numpy()).sum())
    f_lo, f_hi = wilson(flips, n)
    dm = (both["margin_cond"] - both["margin_ref"]).to_numpy(dtype=float)
    m, m_lo, m_hi = mean_ci(dm, seed + 1)
    finite = dm[np.isfinite(dm)]
    w_p = float(wilcoxon(finite).pvalue) if len(finite) > 1 and np.any(finite != 0) else 1.0
    return dict(n=n, acc_clean=float(a.mean()) if n else np.nan, acc=float(b.mean()) if n else np.nan,
                diff=diff, diff_low=lo, diff_high=hi, p_mcnemar=mc["p_value"], exact=mc["exact"],
                flip_rate=flips / n if n else np.nan, flip_low=f_lo, flip_high=f_hi,
                margin_change=m, margin_low=m_lo, margin_high=m_hi, p_wilcoxon=w_p,
                unparsed=int(both["unparsed_cond"].sum()), nonfinite=int(both["nonfinite_cond"].sum()))


def effects(rows: pd.DataFrame, conditions=None, ref: str = "clean", by=("model",), seed: int = 0) -> pd.DataFrame:
    """`paired` for every condition (or those given) against `ref`, per group of `by`."""
    out = []
    for key, g in rows.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        base = g[g["condition"] == ref]
        if base.empty:
            continue
        for c in conditions or [c for c in pd.unique(g["condition"]) if c != ref]:
            cond = g[g["condition"] == c]
            if cond.empty:
                continue
            out.append({**dict(zip(by, key)), "condition": c, **paired(base, cond, seed)})
    return pd.DataFrame(out)


def correct(table: pd.DataFrame, columns=("p_mcnemar", "p_wilcoxon"), alpha: float = ALPHA) -> pd.DataFrame:
    """Holm over every row of the table (one family), for each p-value column: `<col>_holm`."""
    table = table.copy()
    for c in columns:
        if c in table and len(table):
            table[f"{c}_holm"], table[f"{c}_reject"] = holm(table[c].to_numpy(), alpha)
    return table


def contrast(rows: pd.DataFrame, model: str, comparator: str, condition: str, ref: str = "clean",
             seed: int = 0) -> dict:
    """Difference in differences on the same items: (accuracy change of `model` under `condition`)
    minus (the comparator's change), with a bootstrap interval over items. With the negative
    control as comparator this removes what the segment's format alone costs."""
    def change(m):
        g = rows[rows["model"] == m]
        a = g[g["condition"] == ref].set_index("item")["correct"].astype(float)
        b = g[g["condition"] == condition].set_index("item")["correct"].astype(float)
        return (b - a).dropna()

    d = pd.concat([change(model), change(comparator)], axis=1, keys=["m", "c"], join="inner")
    x, lo, hi = mean_ci((d["m"] - d["c"]).to_numpy(), seed)
    return dict(model=model, comparator=comparator, condition=condition, n=len(d), change=float(d["m"].mean()),
                comparator_change=float(d["c"].mean()), contrast=x, contrast_low=lo, contrast_high=hi)
