"""Chapter 10's verdict logic on tables whose answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd

from latentmed.analysis import dose


def table(nies, highs, ps, inference="closed"):
    doses = [0.0, 0.25, 0.5, 0.75, 1.0]
    return pd.DataFrame(dict(model=[f"m{d}" for d in doses], dose=doses, inference=inference, nie=nies,
                             nie_low=np.array(nies) - 0.05, nie_high=highs, p_nie_holm=ps, n=100))


def test_onset_is_the_first_dose_with_a_significant_drop():
    t = table([0.0, -0.02, -0.2, -0.4, -0.5], [0.02, 0.01, -0.1, -0.3, -0.4], [1, 0.5, 0.001, 1e-6, 1e-8])
    assert dose.onset(t) == dict(inference="closed", dose=0.5, model="m0.5")
    none = table([0.0] * 5, [0.02] * 5, [1.0] * 5)
    assert dose.onset(none)["dose"] is None
    not_significant = table([0.0, -0.2, -0.3, -0.4, -0.5], [0.02, -0.1, -0.2, -0.3, -0.4], [1, 0.2, 0.01, 0.01, 0.01])
    assert dose.onset(not_significant)["dose"] == 0.5  # the drop at 0.25 does not survive Holm


def test_cost_is_a_paired_difference_on_the_same_items():
    medi = pd.DataFrame([dict(model=m, item=f"i{i}", condition="clean", correct=v)
                         for m, vals in [("a", [1, 1, 0, 0]), ("b", [1, 1, 1, 1])] for i, v in enumerate(vals)])
    d, lo, hi, n = dose.cost(medi, "a", "b")
    assert n == 4 and d == -0.5 and lo < -0.5 < hi
