"""Chapter 6's estimators recover a planted mediator in a synthetic structural model, and find no
indirect effect where the outcome ignores the mediator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
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


def test_statsmodels_estimate_equals_statsmodels_own_formula_models(monkeypatch):
    """The estimate passes design matrices; statsmodels' formula route must give the same numbers."""
    import statsmodels.api as sm
    from statsmodels.stats import mediation as smm

    rows, tensors, _ = structural(150, a=2.0, b=1.0, c=0.3, seed=2)
    ours = Med.statsmodels_estimate(rows, tensors, P, "m", seed=3, sims=40)
    seen = {}

    class Formula(smm.Mediation):  # the same data through "correct ~ treat + m" and "m ~ treat"
        def __init__(self, outcome, mediator, exposure, med):
            y, X = outcome.endog, outcome.exog
            df = pd.DataFrame(dict(correct=y, treat=X[:, 1], m=X[:, 2]))
            seen["design"] = (X[:, 0].tolist() == [1.0] * len(y), mediator.exog.shape[1])
            super().__init__(sm.GLM.from_formula("correct ~ treat + m", df, family=sm.families.Binomial()),
                             sm.OLS.from_formula("m ~ treat", df), "treat", "m")

    monkeypatch.setattr(smm, "Mediation", Formula)
    theirs = Med.statsmodels_estimate(rows, tensors, P, "m", seed=3, sims=40)
    assert seen["design"] == (True, 2)
    for k in ("acme", "acme_low", "acme_high", "ade", "ade_low", "ade_high"):
        assert ours[k] == pytest.approx(theirs[k], abs=1e-9), k
    assert Med.statsmodels_estimate(rows, tensors, P, "m", seed=4, sims=40)["acme_low"] != theirs["acme_low"]


def test_holm_over_the_family():
    t = pd.DataFrame(dict(p_nie=[0.01, 0.04, 0.03]))
    out = Med.correct_family(t)
    assert np.allclose(out["p_nie_holm"], [0.03, 0.06, 0.06])


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    from latentmed import zoo
    from latentmed.analysis import study
    from latentmed.testbed import TestbedConfig

    cfg = TestbedConfig(n_objects=(3, 8), n_train=8, n_val=8, n_test=16)
    root = tmp_path_factory.mktemp("medzoo")
    zoo.train_zoo(root, budget="ci", config=cfg, progress=False, model_size="test", verbose=False,
                  methods=["negative-control"], workers=1)
    return root, study.queries(cfg, "test", 2)


def _rows(df):
    return df.drop(columns=["tensors", "key"]).sort_values(["item", "condition"]).reset_index(drop=True)


def test_a_mediation_run_another_chapter_measured_is_copied_not_recomputed(small_zoo, tmp_path, monkeypatch):
    from latentmed.analysis import mediation as M
    from latentmed.store import ResultsStore

    root, qs = small_zoo
    fresh = M.run_mediation(root, tmp_path / "fresh", qs, ["negative-control"], ("mask_evidence",), chapter=10)
    M.run_mediation(root, tmp_path / "shared", qs, ["negative-control"], ("other_image", "mask_evidence"), chapter=6)

    def no_model(*a, **k):
        raise AssertionError("the rows are stored already: the model must not be loaded")

    from latentmed.engine.reasoner import LatentReasoner

    monkeypatch.setattr(LatentReasoner, "from_pretrained", no_model)
    copied = M.run_mediation(root, tmp_path / "shared", qs, ["negative-control"], ("mask_evidence",), chapter=10)
    assert len(copied) == len(fresh) == 4 * len(qs)
    pd.testing.assert_frame_equal(_rows(copied), _rows(fresh))  # the rows a fresh run computes
    runs = {r.meta["params"]["chapter"]: r for r in ResultsStore(tmp_path / "shared").runs()}
    z = [(t.get("z_in")) for t in runs[10].tensors_many(runs[10].rows())]
    z6 = {(r["item"], r["condition"]): t.get("z_in") for r, t in
          zip(runs[6].rows(), runs[6].tensors_many(runs[6].rows()))}
    assert sum(x is not None for x in z) > 0 and all(
        torch.equal(a, z6[(r["item"], r["condition"])]) for r, a in zip(runs[10].rows(), z) if a is not None)
    with pytest.raises(AssertionError, match="must not be loaded"):  # another seed: nothing to copy
        M.run_mediation(root, tmp_path / "shared", qs, ["negative-control"], ("mask_evidence",), seed=1, chapter=10)


def test_two_studies_sharing_a_model_load_and_decode_it_once(small_zoo, tmp_path, monkeypatch):
    from latentmed.analysis import measure as measure_mod
    from latentmed.analysis import mediation as M
    from latentmed.analysis import study

    root, qs = small_zoo
    alone_lat = study.run_latent_study(root, tmp_path / "a", qs, ["negative-control"], forms=("generate",),
                                       names=("swap", "zero"))
    alone_med = M.run_mediation(root, tmp_path / "a", qs, ["negative-control"], ("mask_evidence",), chapter=10)
    decodes = []
    real = measure_mod.clean_runs
    monkeypatch.setattr(study, "clean_runs", lambda *a, **k: decodes.append(1) or real(*a, **k))
    monkeypatch.setattr(measure_mod, "clean_runs", lambda *a, **k: decodes.append(1) or real(*a, **k))
    shared: dict = {}
    lat = study.run_latent_study(root, tmp_path / "b", qs, ["negative-control"], forms=("generate",),
                                 names=("swap", "zero"), shared=shared)
    med = M.run_mediation(root, tmp_path / "b", qs, ["negative-control"], ("mask_evidence",), chapter=10, shared=shared)
    assert len(decodes) == 1 and len(shared) == 1
    pd.testing.assert_frame_equal(_rows(lat), _rows(alone_lat))
    pd.testing.assert_frame_equal(_rows(med), _rows(alone_med))
    M.run_mediation(root, tmp_path / "c", qs[:3], ["negative-control"], ("mask_evidence",), chapter=10, shared=shared)
    assert len(shared) == 2 and len(decodes) == 2  # other items: loaded and decoded for themselves
