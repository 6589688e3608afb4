"""Chapter 6's estimators recover a planted mediator in a synthetic structural model, and find no
indirect effect where the outcome ignores the mediator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from latentmed.analysis import mediation as Med

P = "mask_evidence"


def structural(n: int, a: float, b: float, c: float, seed: int = 0):
    """Z = a X + noise (a 3-vector), Y = 1[b z_0 + c X + noise > 0.5]: the four potential outcomes
    of every unit in the store's row format, and Z(X), Z(X') as tensors."""
    rng = np.random.default_rng(seed)
    u_z, u_y = rng.normal(0, 0.5, size=(n, 3)), rng.normal(0, 0.3, size=n)

    def z(x):
        return a * x * np.array([1.0, 0.0, 0.0]) + u_z

    def y(x, zz):
        return (b * zz[:, 0] + c * x + u_y > 0.5).astype(float)

    z0, z1 = z(0), z(1)
    runs = {"clean": y(0, z0), f"{P}:xp_zxp/generate": y(1, z1), f"{P}:x_zxp/generate": y(0, z1),
            f"{P}:xp_zx/generate": y(1, z0)}
    rows = pd.DataFrame([dict(model="m", item=f"i{i}", condition=cond, correct=bool(v[i]), margin=float(v[i]))
                         for cond, v in runs.items() for i in range(n)])
    tensors = {("m", f"i{i}", "clean"): torch.tensor(z0[i])[None].float() for i in range(n)}
    tensors.update({("m", f"i{i}", f"{P}:xp_zxp/generate"): torch.tensor(z1[i])[None].float() for i in range(n)})
    truth = dict(te=runs[f"{P}:xp_zxp/generate"].mean() - runs["clean"].mean(),
                 nie=runs[f"{P}:x_zxp/generate"].mean() - runs["clean"].mean(),
                 nde=runs[f"{P}:xp_zx/generate"].mean() - runs["clean"].mean())
    return rows, tensors, truth


def test_counterfactual_patching_recovers_a_planted_mediator():
    rows, _, truth = structural(400, a=2.0, b=1.0, c=0.3)
    e = Med.estimates(rows, P, n_boot=500).iloc[0]
    for k in ("te", "nie", "nde"):
        assert e[f"{k}_low"] <= truth[k] <= e[f"{k}_high"], (k, truth[k], e[k])
    assert e["nie_low"] > 0.2 and e["pm_low"] > 0.5 and e["p_nie"] < 1e-6


def test_no_indirect_effect_when_the_outcome_ignores_the_mediator():
    rows, _, truth = structural(400, a=2.0, b=0.0, c=1.0)
    e = Med.estimates(rows, P, n_boot=500).iloc[0]
    assert truth["nie"] == 0 and e["nie"] == 0 and e["nie_low"] == e["nie_high"] == 0 and e["p_nie"] == 1
    assert e["nde_low"] > 0.5


def test_statsmodels_mediation_agrees_on_the_planted_model():
    rows, tensors, truth = structural(150, a=2.0, b=1.0, c=0.3, seed=1)
    sm = Med.statsmodels_estimate(rows, tensors, P, "m", sims=60)
    assert sm["acme_low"] > 0 and sm["acme"] > 0.2
    null_rows, null_tensors, _ = structural(150, a=2.0, b=0.0, c=1.0, seed=1)
    null = Med.statsmodels_estimate(null_rows, null_tensors, P, "m", sims=60)
    assert null["acme_low"] <= 0 <= null["acme_high"] and null["ade_low"] > 0.3


def test_holm_over_the_family():
    t = pd.DataFrame(dict(p_nie=[0.01, 0.04, 0.03]))
    out = Med.correct_family(t)
    assert np.allclose(out["p_nie_holm"], [0.03, 0.06, 0.06])
