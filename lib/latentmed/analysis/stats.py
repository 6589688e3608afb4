"""Statistics for the book, as tidy DataFrames: Wilson intervals, paired McNemar tests with the
paired difference and its 95% interval, bootstrap intervals over items, tests against chance,
Holm.

Tests and single-proportion intervals come from statsmodels. Written here (statsmodels has no
paired version): Newcombe's square-and-add interval for the difference of two paired
proportions (Newcombe 1998, method 10), built from statsmodels' Wilson intervals, and a
percentile bootstrap over items. `tests/test_stats.py` checks both against published values
and against scipy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from statsmodels.stats.contingency_tables import mcnemar as _mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import binom_test, proportion_confint

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

    With `chance`, adds `above_chance`: the cell's own 95% Wilson interval lies above chance.
    That is one uncorrected comparison per cell; for a table of many cells use `chance_tests`
    (one-sided exact binomial tests, Holm-corrected over the cells).
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


def paired_difference(a, b, alpha: float = ALPHA) -> tuple[float, float, float]:
    """Accuracy of a minus accuracy of b on the same items, with Newcombe's interval.

    Newcombe's square-and-add (hybrid score) interval for paired proportions, method 10 of
    Newcombe (1998), with its correlation correction phi; the Wilson intervals of the two
    marginal proportions come from statsmodels. Returns (difference, low, high); nan for n = 0.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have the same length, got {a.shape} and {b.shape}")
    n = int(a.size)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    r, s = int((a & b).sum()), int((a & ~b).sum())  # both right; only a right
    t, u = int((~a & b).sum()), int((~a & ~b).sum())  # only b right; both wrong
    p1, p2 = (r + s) / n, (r + t) / n
    l1, u1 = wilson(r + s, n, alpha)
    l2, u2 = wilson(r + t, n, alpha)
    denom = (r + s) * (t + u) * (r + t) * (s + u)
    phi = 0.0
    if denom > 0:
        B = r * u - s * t
        C = B - n / 2 if B > n / 2 else (B if B < 0 else 0.0)
        phi = C / np.sqrt(float(denom))
    d = p1 - p2
    lo = d - np.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + np.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return float(d), float(max(-1.0, lo)), float(min(1.0, hi))


BOOT_CHUNK = 500  # resamples drawn into one array at a time by the vectorised mean (bounds memory)


def bootstrap_interval(values, statistic=np.mean, n_boot: int = 10_000, alpha: float = ALPHA,
                       seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap over items: (statistic, low, high).

    `values` is one array (items along axis 0) or a tuple of arrays of equal length resampled
    together (paired designs: the same items for every array); `statistic` takes the same
    arguments. Fixed seed: the same inputs give the same interval.
    """
    arrays = tuple(np.asarray(v) for v in (values if isinstance(values, tuple) else (values,)))
    n = len(arrays[0])
    if any(len(v) != n for v in arrays):
        raise ValueError("paired arrays must have the same length")
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    est = float(statistic(*arrays))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    if statistic is np.mean and len(arrays) == 1 and (arrays[0].dtype.kind in "biu" or arrays[0].dtype == np.float64):
        # the common case, vectorised: the same numbers (float64 and integer sums reduce row by row
        # in the same order; float32's do not, so they take the loop)
        boots = np.concatenate([arrays[0][idx[s:s + BOOT_CHUNK]].mean(axis=1) for s in range(0, n_boot, BOOT_CHUNK)])
    else:
        boots = np.array([statistic(*(v[i] for v in arrays)) for i in idx], dtype=float)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return est, float(lo), float(hi)


def chance_tests(table: pd.DataFrame, chance: float | str = "chance", correct: str = "n_correct",
                 n: str = "n", alpha: float = ALPHA) -> pd.DataFrame:
    """Is each cell's accuracy above chance? One-sided exact binomial tests, Holm over the cells.

    `table` has one row per cell (e.g. `accuracy_table`'s model x family rows) with counts of
    right answers and items; `chance` is a number or a column. Adds `p_chance` (one-sided,
    H1: accuracy > chance), `p_chance_holm` (Holm over all rows of `table`: the family is the
    table) and `above_chance_holm` (p_chance_holm < alpha).
    """
    out = table.copy()
    ch = out[chance] if isinstance(chance, str) else pd.Series(chance, index=out.index)
    p = [float(binom_test(int(k), int(m), float(c), alternative="larger")) if m else float("nan")
         for k, m, c in zip(out[correct], out[n], ch)]
    out["p_chance"] = p
    p_adj, reject = holm(out["p_chance"].fillna(1.0), alpha)
    out["p_chance_holm"], out["above_chance_holm"] = p_adj, reject
    return out


def mcnemar_paired(a, b, exact: bool | None = None) -> dict:
    """McNemar's test on paired correct/incorrect outcomes of two models on the same items.

    `exact` defaults to the binomial test when the discordant pairs are fewer than 25.
    Returns n, both accuracies, the discordant counts, the accuracy difference a - b with
    its 95% Newcombe interval (`diff_low`, `diff_high`, see `paired_difference`), the statistic
    and the p-value.
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
    d, lo, hi = paired_difference(a, b)
    return dict(n=int(a.size), acc_a=float(a.mean()) if a.size else float("nan"),
                acc_b=float(b.mean()) if b.size else float("nan"), a_only=n10, b_only=n01,
                diff=d, diff_low=lo, diff_high=hi, statistic=stat, p_value=p, exact=bool(exact))


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
