"""Statistics for the book, as tidy DataFrames: Wilson intervals, paired McNemar tests, Holm.

All tests come from statsmodels; this module only shapes their inputs and outputs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from statsmodels.stats.contingency_tables import mcnemar as _mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

ALPHA = 0.05


def wilson(successes: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """95% (by default) Wilson score interval of a proportion; (nan, nan) when n == 0."""
    if n == 0:
        return float("nan"), float("nan")
    lo, hi = proportion_confint(int(successes), int(n), alpha=alpha, method="wilson")
    return float(lo), float(hi)


def accuracy_table(df: pd.DataFrame, by=("model", "family"), correct: str = "correct",
                   alpha: float = ALPHA, chance: float | None = 0.25) -> pd.DataFrame:
    """Accuracy per group with Wilson intervals: by..., n, correct, accuracy, ci_low, ci_high.

    With `chance`, adds `above_chance` (the whole interval is above chance).
    """
    by = [b for b in by if b in df.columns]
    rows = []
    for key, g in df.groupby(by, sort=False) if by else [((), df)]:
        key = key if isinstance(key, tuple) else (key,)
        k, n = int(g[correct].sum()), int(len(g))
        lo, hi = wilson(k, n, alpha)
        row = dict(zip(by, key))
        row.update(n=n, n_correct=k, accuracy=k / n if n else float("nan"), ci_low=lo, ci_high=hi)
        if chance is not None:
            row["chance"] = chance
            row["above_chance"] = bool(lo > chance)
        rows.append(row)
    return pd.DataFrame(rows)


def mcnemar_paired(a, b, exact: bool | None = None) -> dict:
    """McNemar's test on paired correct/incorrect outcomes of two models on the same items.

    `exact` defaults to the binomial test when the discordant pairs are fewer than 25.
    Returns n, both accuracies, the discordant counts, the accuracy difference a - b, the
    statistic and the p-value.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have the same length, got {a.shape} and {b.shape}")
    n01, n10 = int((~a & b).sum()), int((a & ~b).sum())
    table = [[int((a & b).sum()), n10], [n01, int((~a & ~b).sum())]]
    if exact is None:
        exact = (n01 + n10) < 25
    if n01 + n10 == 0:
        stat, p = 0.0, 1.0
    else:
        res = _mcnemar(table, exact=exact, correction=not exact)
        stat, p = float(res.statistic), float(res.pvalue)
    return dict(n=int(a.size), acc_a=float(a.mean()) if a.size else float("nan"),
                acc_b=float(b.mean()) if b.size else float("nan"), a_only=n10, b_only=n01,
                diff=float(a.mean() - b.mean()) if a.size else float("nan"), statistic=stat, p_value=p,
                exact=bool(exact))


def holm(p_values, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Holm-corrected p-values and rejections."""
    p = np.asarray(p_values, dtype=float)
    if p.size == 0:
        return p, p.astype(bool)
    reject, p_adj, _, _ = multipletests(p, alpha=alpha, method="holm")
    return p_adj, reject


def paired_comparisons(records: pd.DataFrame, pairs, by: str | None = None, model: str = "model",
                       item: str = "id", correct: str = "correct", alpha: float = ALPHA) -> pd.DataFrame:
    """McNemar for each (model_a, model_b) pair on their shared items, Holm over all rows.

    `by` (e.g. "family") repeats each comparison per group as well as overall ("all").
    """
    wide = records.pivot_table(index=item, columns=model, values=correct, aggfunc="first")
    groups = records.drop_duplicates(item).set_index(item)[by] if by else None
    rows = []
    for a_name, b_name in pairs:
        if a_name not in wide.columns or b_name not in wide.columns:
            raise ValueError(f"no records for model {a_name if a_name not in wide.columns else b_name!r}")
        both = wide[[a_name, b_name]].dropna()
        parts = [("all", both)]
        if by:
            parts += [(g, both[groups.reindex(both.index) == g]) for g in pd.unique(groups.reindex(both.index))]
        for g, sub in parts:
            r = mcnemar_paired(sub[a_name].astype(bool), sub[b_name].astype(bool))
            row = {"model_a": a_name, "model_b": b_name}
            if by:
                row[by] = g
            row.update(r)
            rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out["p_holm"], out["reject"] = holm(out["p_value"], alpha)
    return out
