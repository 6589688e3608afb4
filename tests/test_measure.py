"""The study's measurement pipeline (analysis/measure, conditions, effects) finds a planted mediator
and finds nothing where the answer cannot read the latents; a killed run resumes exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import OPTIONS, scene

from latentmed.analysis import conditions as C
from latentmed.analysis.effects import correct, effects, mean_ci, paired
from latentmed.analysis.measure import Condition, measure
from latentmed.engine.decode import DecodeConfig
from latentmed.engine.query import Query
from latentmed.store import ResultsStore

CFG = DecodeConfig(max_new_tokens=8, force_latent=True, force_suffix=True, stop_after_answer=True)


def queries(n: int = 24):
    colours = [(220, 30, 30), (30, 70, 220), (30, 160, 50), (200, 200, 30)]
    return [Query(images=[scene(colours[i % 4], seed=i)], question="What colour is the square?", options=OPTIONS,
                  answer=i % 4, id=f"q{i:02d}", family="attr" if i % 2 else "glyph",
                  evidence_boxes=[[10, 10, 34, 34]]) for i in range(n)]


def run_study(fresh, tmp_path, after: str, names=("swap", "zero", "noise")):
    r = fresh("monet-sft", n_latents=4, after_segment=after)
    qs = queries()
    run = ResultsStore(tmp_path / after).run(r.spec.method, "h", {"after": after})
    clean = measure(r, qs, [], run, CFG)
    conds = C.latent_conditions(clean, [q.family for q in qs], names=names)
    measure(r, qs, conds, run, CFG, clean=clean)
    return run.frame()


def test_donors_are_a_derangement_within_each_family():
    fam = ["a"] * 5 + ["b"] * 3 + ["c"]
    d = C.donors(fam, seed=3)
    assert all(fam[d[i]] == fam[i] for i in range(len(fam)))
    assert all(d[i] != i for i in range(8)) and d[8] == 8
    assert sorted(d[:5]) == [0, 1, 2, 3, 4] and not np.array_equal(d, C.donors(fam, seed=4))


def test_a_planted_mediator_is_found_and_an_unreadable_one_is_not(fresh, tmp_path):
    """With the bottleneck the answer reads only the segment: swapping latents flips answers.
    With after_segment="no_slots" it cannot read the slots: nothing changes, exactly."""
    closed = effects(run_study(fresh, tmp_path, "segment"))
    blind = effects(run_study(fresh, tmp_path, "no_slots"))
    for cond in ("swap/generate", "swap/replay", "noise/generate"):
        c = closed.set_index("condition").loc[cond]  # the answer moves: flips, or a margin shift off zero
        assert c["flip_low"] > 0 or c["margin_low"] > 0 or c["margin_high"] < 0, (cond, c.to_dict())
        b = blind.set_index("condition").loc[cond]
        assert b["flip_rate"] == 0 and b["margin_change"] == pytest.approx(0, abs=1e-3) and b["diff"] == 0  # batch-order noise only
        assert b["diff_low"] <= 0 <= b["diff_high"]
    fam = correct(closed)
    assert (fam["p_mcnemar_holm"] >= fam["p_mcnemar"] - 1e-12).all()


def test_a_killed_measurement_resumes_without_loss_or_duplicates(fresh, tmp_path, monkeypatch):
    r = fresh("monet-sft", n_latents=4)
    qs = queries(8)
    whole = ResultsStore(tmp_path / "a").run("m", "h", {})
    clean = measure(r, qs, [], whole, CFG)
    conds = C.latent_conditions(clean, [q.family for q in qs], names=("zero", "swap", "markers"))
    measure(r, qs, conds, whole, CFG, clean=clean)
    part = ResultsStore(tmp_path / "b").run("m", "h", {})
    real_add, calls = part.add, {"n": 0}

    def dying_add(rows, tensors=None):
        calls["n"] += 1
        if calls["n"] == 3:  # the clean rows and one condition are written, then the process dies
            raise KeyboardInterrupt
        return real_add(rows, tensors)

    monkeypatch.setattr(part, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        measure(r, qs, conds, part, CFG)
    monkeypatch.setattr(part, "add", real_add)
    again = ResultsStore(tmp_path / "b").run("m", "h", {})
    assert len(again.rows()) == 2 * len(qs)
    measure(r, qs, conds, again, CFG)
    a, b = whole.frame(), again.frame()
    assert len(b) == len(a) == len(qs) * (1 + len(conds)) and not b.duplicated(["item", "condition"]).any()
    key = ["item", "condition"]
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True)[["chosen", "margin", "k"]],
                                  b.sort_values(key).reset_index(drop=True)[["chosen", "margin", "k"]])


def test_effect_statistics_against_values_computed_by_hand():
    ref = pd.DataFrame(dict(item=list("abcdefgh"), correct=[1, 1, 1, 1, 1, 1, 0, 0], chosen=[0] * 8,
                            margin=[1.0] * 8, unparsed=False, nonfinite=False))
    cond = ref.assign(correct=[0, 0, 0, 1, 1, 1, 0, 1], chosen=[1, 1, 1, 0, 0, 0, 0, 0], margin=[0.0] * 8)
    e = paired(ref, cond)
    assert e["n"] == 8 and e["diff"] == pytest.approx(-2 / 8) and e["flip_rate"] == pytest.approx(3 / 8)
    assert e["margin_change"] == pytest.approx(-1.0) and e["margin_low"] == e["margin_high"] == -1.0
    assert e["p_mcnemar"] == pytest.approx(0.625)  # exact binomial: 3 vs 1 discordant, two-sided
    m, lo, hi = mean_ci([0, 1] * 50 + [float("nan")], seed=0)  # non-finite values are left out
    assert m == 0.5 and 0.39 < lo < 0.45 and 0.55 < hi < 0.61  # ~ 0.5 +- 1.96 * 0.05
    assert e["diff_low"] < e["diff"] < e["diff_high"] < 0.2
    assert Condition("x", lambda i: []).key == "x/generate"
    with pytest.raises(ValueError, match="form must be one of"):
        Condition("x", lambda i: [], "teacher")


def test_contrast_with_a_comparator_on_the_same_items():
    from latentmed.analysis.effects import contrast

    items = [f"i{n}" for n in range(6)]
    rows = pd.DataFrame([dict(model=m, item=i, condition=c, correct=v)
                         for m, clean, edit in [("a", [1] * 6, [0, 0, 0, 1, 1, 1]), ("neg", [1] * 6, [1, 1, 1, 1, 1, 0])]
                         for c, vals in [("clean", clean), ("swap", edit)] for i, v in zip(items, vals)])
    c = contrast(rows, "a", "neg", "swap")
    assert c["change"] == pytest.approx(-0.5) and c["comparator_change"] == pytest.approx(-1 / 6)
    assert c["contrast"] == pytest.approx(-0.5 + 1 / 6) and c["contrast_low"] <= c["contrast"] <= c["contrast_high"]


def test_prompts_built_once_give_the_rows_of_prompts_built_per_call(fresh, tmp_path, monkeypatch):
    r = fresh("monet-sft", n_latents=4)
    qs = queries(8)
    own = ResultsStore(tmp_path / "own").run("m", "h", {})
    clean = measure(r, qs, [], own, CFG)
    conds = C.latent_conditions(clean, [q.family for q in qs], names=("zero", "swap"))
    measure(r, qs, conds, own, CFG, clean=clean)
    prompts = [r.prompt(q) for q in qs]
    built = []
    real = type(r).prompt
    monkeypatch.setattr(type(r), "prompt", lambda self, q, edits=(): built.append(q) or real(self, q, edits))
    given = ResultsStore(tmp_path / "given").run("m", "h", {})
    measure(r, qs, [], given, CFG, prompts=prompts)
    measure(r, qs, conds, given, CFG, clean=clean, prompts=prompts)
    assert built == []  # the given prompts are used, none rebuilt
    key = ["item", "condition"]
    cols = ["chosen", "margin", "k", "correct"]
    pd.testing.assert_frame_equal(own.frame().sort_values(key).reset_index(drop=True)[cols],
                                  given.frame().sort_values(key).reset_index(drop=True)[cols])
    with pytest.raises(ValueError, match="7 prompts for 8 queries"):
        measure(r, qs, conds, ResultsStore(tmp_path / "bad").run("m", "h", {}), CFG, prompts=prompts[:7])
