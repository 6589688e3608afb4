"""analysis.stats against independent reference values (published examples, scipy)."""

import numpy as np
import pandas as pd
import pytest
from latentmed.analysis import stats
from scipy import stats as sps


def _paired(r, s, t, u):
    """Outcome vectors of a and b from a paired 2x2 table: both right, a only, b only, neither."""
    a = np.array([1] * r + [1] * s + [0] * t + [0] * u, dtype=bool)
    b = np.array([1] * r + [0] * s + [1] * t + [0] * u, dtype=bool)
    return a, b


def test_newcombe_paired_interval_matches_the_published_value():
    # Fagerland, Lydersen & Laake (2017), Statistical Analysis of Contingency Tables, ch. 8;
    # R package contingencytables, Newcombe_square_and_add_CI_paired_2x2 on [[59, 6], [16, 80]]:
    # estimate = -0.0621 (95% CI -0.1186 to -0.0046)
    a, b = _paired(59, 6, 16, 80)
    d, lo, hi = stats.paired_difference(a, b)
    assert d == pytest.approx(-0.0621, abs=5e-5)
    assert lo == pytest.approx(-0.1186, abs=5e-5)
    assert hi == pytest.approx(-0.0046, abs=5e-5)
    # swapping the models mirrors the interval
    d2, lo2, hi2 = stats.paired_difference(b, a)
    assert (d2, lo2, hi2) == pytest.approx((-d, -hi, -lo))


def test_newcombe_interval_edge_cases_stay_inside_minus_one_one():
    a, b = _paired(0, 10, 0, 0)  # a always right, b never
    d, lo, hi = stats.paired_difference(a, b)
    assert d == 1.0 and -1 <= lo < 1 and hi == 1.0
    a, b = _paired(5, 0, 0, 5)  # identical outcomes
    d, lo, hi = stats.paired_difference(a, b)
    assert d == 0 and lo < 0 < hi
    assert np.isnan(stats.paired_difference([], [])[0])
    with pytest.raises(ValueError, match="same length"):
        stats.paired_difference([1, 0], [1])


def test_mcnemar_exact_matches_scipy_binomial_and_carries_the_interval():
    a, b = _paired(20, 9, 2, 9)
    r = stats.mcnemar_paired(a, b)
    ref = sps.binomtest(2, 11, 0.5).pvalue  # exact McNemar = two-sided binomial on discordant pairs
    assert r["exact"] and r["p_value"] == pytest.approx(ref)
    assert (r["a_only"], r["b_only"]) == (9, 2)
    assert r["diff"] == pytest.approx(7 / 40)
    assert r["diff_low"] < r["diff"] < r["diff_high"]


def test_chance_tests_are_one_sided_binomial_and_holm_corrected():
    table = pd.DataFrame(dict(model=["m1", "m2", "m3"], n=[40, 40, 40], n_correct=[18, 14, 10],
                              chance=[0.25] * 3))
    out = stats.chance_tests(table)
    ref = [sps.binomtest(k, 40, 0.25, alternative="greater").pvalue for k in (18, 14, 10)]
    assert out["p_chance"].tolist() == pytest.approx(ref)
    # Holm by hand: sorted p times (m - rank), made monotone, capped at 1
    order = np.argsort(ref)
    adj = np.empty(3)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, ref[i] * (3 - rank)))
        adj[i] = running
    assert out["p_chance_holm"].tolist() == pytest.approx(adj.tolist())
    assert out["above_chance_holm"].tolist() == [True, False, False]
    # an uncorrected per-cell verdict can differ from the corrected one
    assert stats.chance_tests(table.iloc[[1]])["p_chance_holm"].iloc[0] < out["p_chance_holm"].iloc[1]


def test_bootstrap_interval_agrees_with_scipy_and_is_reproducible():
    rng = np.random.default_rng(1)
    a = rng.random(300) < 0.6
    b = np.where(rng.random(300) < 0.8, a, ~a)
    diff = lambda x, y: np.mean(x) - np.mean(y)  # noqa: E731
    est, lo, hi = stats.bootstrap_interval((a.astype(float), b.astype(float)), diff, n_boot=4000, seed=3)
    ref = sps.bootstrap((a.astype(float), b.astype(float)), diff, paired=True, vectorized=False,
                        n_resamples=4000, method="percentile", random_state=5).confidence_interval
    assert est == pytest.approx(a.mean() - b.mean())
    assert lo == pytest.approx(ref.low, abs=0.01) and hi == pytest.approx(ref.high, abs=0.01)
    assert stats.bootstrap_interval((a.astype(float), b.astype(float)), diff, n_boot=4000, seed=3) == (est, lo, hi)
    # and the bootstrap of a paired difference lands near Newcombe's interval at this n
    _, nlo, nhi = stats.paired_difference(a, b)
    assert lo == pytest.approx(nlo, abs=0.02) and hi == pytest.approx(nhi, abs=0.02)


def test_paired_comparisons_report_difference_intervals_and_holm():
    ids = [f"i{k}" for k in range(30)]
    rng = np.random.default_rng(0)
    x, y = rng.random(30) < 0.7, rng.random(30) < 0.3
    recs = pd.concat([pd.DataFrame(dict(model="x", id=ids, correct=x)),
                      pd.DataFrame(dict(model="y", id=ids, correct=y))])
    out = stats.paired_comparisons(recs, [("x", "y")])
    d, lo, hi = stats.paired_difference(x, y)
    assert out.loc[0, ["diff", "diff_low", "diff_high"]].tolist() == pytest.approx([d, lo, hi])
    assert out.loc[0, "p_holm"] == pytest.approx(out.loc[0, "p_value"])


def test_mcnemar_switches_from_exact_to_corrected_chi_square_at_25_discordant_pairs():
    import numpy as np
    import scipy.stats as sps

    from latentmed.analysis.stats import mcnemar_paired

    def pairs(a_only, b_only, both=10):
        a = np.array([1] * a_only + [0] * b_only + [1] * both, bool)
        b = np.array([0] * a_only + [1] * b_only + [1] * both, bool)
        return a, b

    r24 = mcnemar_paired(*pairs(16, 8))
    assert r24["exact"] and r24["p_value"] == pytest.approx(sps.binomtest(8, 24, 0.5).pvalue)
    r25 = mcnemar_paired(*pairs(17, 8))
    chi2 = (abs(17 - 8) - 1) ** 2 / 25  # the continuity-corrected statistic
    assert not r25["exact"] and r25["statistic"] == pytest.approx(chi2)
    assert r25["p_value"] == pytest.approx(sps.chi2.sf(chi2, 1))


@pytest.mark.parametrize("kind", ["float64", "bool", "int", "float32"])
@pytest.mark.parametrize("n", [1, 9, 400, 1201])
def test_vectorised_bootstrap_mean_gives_the_numbers_of_the_per_resample_loop(kind, n):
    rng = np.random.default_rng(n)
    x = {"float64": rng.normal(size=n) * 3.7, "bool": rng.random(n) < 0.3, "int": rng.integers(0, 5, n),
         "float32": rng.normal(size=n).astype(np.float32)}[kind]
    loop = stats.bootstrap_interval((x,), lambda v: np.mean(v), n_boot=1100, seed=5)  # not np.mean: the loop
    assert stats.bootstrap_interval(x, n_boot=1100, seed=5) == loop  # bit for bit, over several chunks
    assert stats.bootstrap_interval(x, n_boot=1100, seed=6) != loop or n == 1  # the draws matter
