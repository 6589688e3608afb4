"""The tables behind chapters 1 and 2: readers of low-resolution views, relpos geometry, the zoo's
roles, training differences, comparison family, protocols and the objects effect."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from latentmed.analysis import testbed_checks, zoo_tables
from latentmed.engine import layouts
from latentmed.testbed import TestbedConfig, make_item, resolution
from latentmed.zoo import recipes


@pytest.fixture(scope="module")
def cfg():
    return TestbedConfig(n_train=8, n_val=4, n_test=8)


# ---------------------------------------------------------------- chapter 1


def test_matched_reader_reads_what_the_mismatched_one_misses(cfg):
    items = [make_item(cfg, "test", "glyph", i) for i in range(12)]
    views = {"56 px": resolution.downscaled(4)}
    df = resolution.readability(items, views).set_index("reader")
    assert df.loc["matched", "accuracy"] == 1.0
    assert df.loc["clean", "accuracy"] < 0.8  # blurred scene vs clean templates: the reader's limit


def test_matched_reader_fails_when_the_view_destroys_the_target(cfg):
    items = [make_item(cfg, "test", "glyph", i) for i in range(12)]
    blank = {"blank": lambda im: layouts.degrade(im, side=1)}  # one pixel: nothing left to read
    acc = resolution.readability(items, blank).set_index("reader").loc["matched", "accuracy"]
    assert acc <= 0.5


def test_cell_reader_answers_count_and_relpos_from_the_positive_controls_view(cfg):
    items = [make_item(cfg, "test", f, i) for f in ("count", "relpos") for i in range(10)]
    df = resolution.readability(items, {"pc": layouts.degrade})
    assert set(df["reader"]) == {"cells"} and (df["accuracy"] == 1.0).all()
    # and it is not trivially right: the wrong colour gives the wrong count
    it = next(i for i in items if i.family == "count" and i.facts["count"] > 0)
    wrong = dataclasses.replace(it, facts={**it.facts, "count": it.facts["count"] + 1})
    assert not resolution.read_cells(wrong, layouts.degrade)


def test_needle_stats_count_tokens_and_evidence(cfg):
    items = [make_item(cfg, "test", f, i) for f in ("attr", "relpos") for i in range(4)]
    df = resolution.needle_stats(items, cfg.image_size).set_index("family")
    assert (df["image_tokens"] == cfg.grid ** 2).all()
    assert df.loc["attr", "evidence_tokens_max"] == 1 and df.loc["relpos", "evidence_tokens_mean"] == 2


def test_relpos_geometry_follows_the_generators_rule(cfg):
    items = [make_item(cfg, "test", "relpos", i) for i in range(30)]
    g = testbed_checks.relpos_geometry(items)
    s = testbed_checks.relpos_summary(g)
    assert s["n"] == 30 and s["rule_agrees"] == 30 and s["min_cells_along"] >= 2
    assert s["max_cell_angle"] <= testbed_checks.RULE_DEGREES + 1e-9
    bad = dataclasses.replace(items[0], answer_word={"left": "right", "right": "left", "above": "below",
                                                     "below": "above"}[items[0].answer_word])
    assert not testbed_checks.relpos_geometry([bad])["rule_agrees"].iloc[0]


# ---------------------------------------------------------------- chapter 2


def test_roles_come_from_the_specs():
    roles = zoo_tables.model_roles().set_index("model")
    assert list(roles.index) == list(recipes.METHODS)
    assert roles.loc["direct", "role"] == "direct" and roles.loc["capimagine", "role"] == "text imagination"
    assert roles.loc["negative-control", "role"] == "negative control"
    assert roles.loc["positive-control", "role"] == "positive control"
    assert roles.loc["lvr-style", "role"] == "latent" and roles.loc["lvr-style", "image_after_segment"]


def test_training_differences_hold_every_recipe_field_and_its_value():
    d = zoo_tables.training_differences("default")
    assert set(d["model"]) == set(recipes.METHODS)
    for name in recipes.METHODS:
        stages = recipes.method_stages(name, "default")
        rows = d[(d["model"] == name) & (d["stage"] != "vision")]
        assert list(rows["stage"]) == [st.cfg.name for st in stages]
        assert list(rows["steps"]) == [st.cfg.steps for st in stages]
        assert list(rows["lr"]) == pytest.approx([st.cfg.lr for st in stages])
    plan_fields = {f.name for f in dataclasses.fields(recipes.Plan)} - {"spec"}
    named = {zoo_tables._RENAME.get(f, f) for f in plan_fields}
    assert named <= set(d.columns), named - set(d.columns)
    opt, seq = zoo_tables.training_table(d)
    assert "steps" in opt.columns and "losses" in seq.columns
    shared = zoo_tables.constant_settings(d)
    assert "steps" not in shared and shared.get("batch") == 16


def test_comparison_family_puts_the_negative_control_next_to_every_latent_model():
    roles = zoo_tables.model_roles()
    pairs = zoo_tables.comparison_pairs(roles)
    latent = list(roles.loc[roles["role"] == "latent", "model"])
    for m in latent:
        assert (m, "negative-control") in {(a, b) for a, b, _ in pairs}
        assert (m, "direct") in {(a, b) for a, b, _ in pairs}
    assert ("negative-control", "direct", "segment cost") in pairs
    assert len(zoo_tables.comparison_pairs(roles, present=["direct", "negative-control"])) == 1
    closed = roles.assign(image_after_segment=roles["model"] != "lvr-style")
    qs = {(a, b): q for a, b, q in zoo_tables.comparison_pairs(closed)}
    assert qs[("lvr-style", "direct")] == "latent (bypass closed) vs direct"


def _records(model, correct, protocol="forced", family=None, pred=None, **extra):
    n = len(correct)
    return pd.DataFrame(dict(model=model, protocol=protocol, id=[f"i{k}" for k in range(n)],
                             family=family or ["attr", "glyph"] * (n // 2), correct=correct,
                             pred=pred if pred is not None else [0] * n, **extra))


def test_protocol_agreement_and_segment_behaviour():
    forced = _records("m", [True, True, False, False], pred=[0, 1, 2, 3], trigger=[True, False, True, False],
                      opened=[True] * 4, k=[4, 4, 4, 4], ended=[True] * 4, scored=[True] * 4)
    free = _records("m", [True, False, False, True], "free", pred=[0, 2, 2, 3], trigger=[True, None, True, None],
                    opened=[True, False, True, False], k=[3, 0, 5, 0], ended=[True, None, False, None],
                    scored=[True] * 4)
    agree = zoo_tables.protocol_agreement(forced, free).iloc[0]
    assert agree["same_answer"] == 3 and agree["acc_forced"] == 0.5 and agree["acc_free"] == 0.5
    assert agree["diff_low"] <= 0 <= agree["diff_high"]
    roles = pd.DataFrame(dict(model=["m"], segment=["latents"]))
    b = zoo_tables.segment_behaviour(pd.concat([forced, free]), ["attr", "glyph"], roles).set_index(
        ["protocol", "family"])
    assert b.loc[("free", "all"), "trigger_rate"] == 0.5  # no segment opened counts as not triggered
    assert b.loc[("free", "all"), "opened_rate"] == 0.5 and b.loc[("free", "all"), "k_mean"] == 4
    assert b.loc[("forced", "attr"), "trigger_rate"] == 1.0


def test_objects_effect_finds_a_planted_slope():
    rng = np.random.default_rng(0)
    n = 600
    objects = rng.integers(6, 21, size=n)
    p = 1 / (1 + np.exp(-(3 - 0.25 * objects)))
    recs = _records("m", list(rng.random(n) < p))
    eff = zoo_tables.objects_effect(recs, pd.Series(objects, index=recs["id"])).iloc[0]
    assert eff["slope_high"] < 0 and eff["slope_low"] < -0.25 < eff["slope_high"] + 0.1
    assert eff["acc_few"] > eff["acc_many"]
    flat = _records("m", list(rng.random(n) < 0.5))
    eff = zoo_tables.objects_effect(flat, pd.Series(objects, index=flat["id"])).iloc[0]
    assert eff["slope_low"] < 0 < eff["slope_high"]


def test_accuracy_with_chance_orders_families_and_corrects_over_cells():
    recs = pd.concat([_records("a", [True] * 20 + [False] * 20), _records("b", [True] * 10 + [False] * 30)])
    t = zoo_tables.accuracy_with_chance(recs, ["attr", "glyph"], 0.25)
    assert list(t["model"]) == ["a"] * 3 + ["b"] * 3 and list(t["family"]) == ["attr", "glyph", "all"] * 2
    assert "above_chance" not in t.columns and (t["p_chance_holm"] >= t["p_chance"]).all()
