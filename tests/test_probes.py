"""Chapter 5's probes (analysis/probes, derived, probe_study): a planted feature is found and a
random one is not, the control task is a fixed random map of types, folds never split an item,
derived questions carry the right answers, and the runs through a tiny model store and reuse."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from latentmed.analysis import derived as D
from latentmed.analysis import probe_study as PS
from latentmed.analysis import probes as P
from latentmed.analysis.stats import bootstrap_interval
from latentmed.engine.query import Query
from latentmed.testbed.items import NUMBER_WORDS, VOCABULARY, TestbedConfig, cell_labels, make_item
from latentmed.testbed.scenes import COLOUR_NAMES, SHAPES

CONFIG = TestbedConfig(n_train=0, n_val=0, n_test=80)
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
TEMPLATES = {"attr": r"What colour is the (\w+)\?", "count": r"How many (\w+) objects are there\?",
             "relpos": r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?",
             "glyph": r"Which digit is inside the (\w+) square\?"}


def synthetic(n=400, n_types=100, d=32, seed=0, plant="label"):
    """Items of `n_types` types, label = type % 4; X is unit noise plus, per `plant`, the label
    planted along one direction per label ("label"), the type one-hot ("type"), or nothing ("none")."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, n)
    y = types % 4
    X = rng.normal(size=(n, d))
    if plant == "label":
        X[np.arange(n), y] += 4.0
    elif plant == "type":
        X = np.concatenate([X * 0.1, 3.0 * np.eye(n_types)[types]], axis=1)
    items = [f"item-{i:04d}" for i in range(n)]
    return X, y, [("t", int(t)) for t in types], items


def test_a_planted_feature_is_found_with_high_selectivity():
    X, y, types, items = synthetic(plant="label")
    df = P.probe(X, y, types, items, seed=0, name="planted")
    acc, ctl = df["correct"].mean(), df["control_correct"].mean()
    assert acc > 0.95 and ctl < 0.4 and acc - ctl > 0.5, (acc, ctl)
    assert df["held_out"].all() and df["majority_correct"].mean() < 0.35


def test_a_random_feature_is_not_found():
    X, y, types, items = synthetic(plant="none")
    df = P.probe(X, y, types, items, seed=0, name="random")
    sel, lo, hi = P.boot_mean(df["correct"].astype(float) - df["control_correct"], seed=0)
    assert abs(sel) < 0.1 and lo < 0 < hi, (sel, lo, hi)
    assert df["correct"].mean() < 0.4


def test_a_probe_that_memorises_types_scores_on_the_control_task():
    """What the control task is for: a representation that names the type supports any labelling of
    types, so its control accuracy is high and its selectivity is small."""
    X, y, types, items = synthetic(n=400, n_types=40, plant="type")
    df = P.probe(X, y, types, items, seed=0, name="memorise")
    assert df["control_correct"].mean() > 0.8 and df["correct"].mean() - df["control_correct"].mean() < 0.2


def test_the_control_task_maps_each_type_to_one_fixed_random_label():
    rng = np.random.default_rng(1)
    types = [("t", int(t)) for t in rng.integers(0, 30, 300)]
    labels = rng.integers(0, 5, 300)
    ctrl, table = P.control_labels(types, labels, seed=3, name="x")
    assert set(table) == set(types)
    for t, c in zip(types, ctrl):
        assert c == table[t]  # one label per type
    assert set(ctrl) <= set(labels.tolist())
    again, _ = P.control_labels(types, labels, seed=3, name="x")
    other, _ = P.control_labels(types, labels, seed=4, name="x")
    assert np.array_equal(ctrl, again) and not np.array_equal(ctrl, other)
    assert not np.array_equal(ctrl, labels)  # random, not the real task
    first = {}
    for t, y in zip(types, labels):
        first.setdefault(t, int(y))
    assert sorted(table.values()) == sorted(first.values())  # the real labels' distribution over types


@pytest.mark.parametrize("n_classes", [3, 40])  # stratified folds; too few items per class: grouped only
def test_cross_validation_folds_never_share_an_item(n_classes):
    rng = np.random.default_rng(0)
    items = np.repeat([f"i{k}" for k in range(60)], 3)  # each item thrice (e.g. several steps pooled)
    y = np.repeat(rng.integers(0, n_classes, 60), 3)
    fs = P.folds(items, y, n_splits=5, seed=0)
    assert len(fs) == 5
    seen = []
    for tr, te in fs:
        assert not set(items[tr]) & set(items[te])
        seen += list(te)
    assert sorted(seen) == list(range(len(items)))  # every row held out exactly once
    assert [t.tolist() for _, t in fs] == [t.tolist() for _, t in P.folds(items, y, 5, 0)]  # seeded


def test_folds_shrink_with_few_items_and_one_class_is_predicted_as_itself():
    assert len(P.folds(["a", "b", "c"], [0, 1, 0], n_splits=5)) == 3 and P.folds(["a"], [0]) == []
    pred, maj = P.cross_validated(np.zeros((4, 2)), [1, 1, 1, 1], ["a", "b", "c", "d"])
    assert (pred == 1).all() and (maj == 1).all()


def test_boot_mean_draws_as_a_per_resample_bootstrap():
    v = np.random.default_rng(0).integers(0, 2, 57).astype(float)
    one_by_one = bootstrap_interval((v,), lambda x: float(np.mean(x)), 500, seed=7)  # a lambda: the loop
    assert P.boot_mean(v, n_boot=500, seed=7) == one_by_one


def test_summary_has_intervals_control_and_holm():
    X, y, types, items = synthetic(plant="label")
    df = P.probe(X, y, types, items, name="s").assign(model="m", representation="step 0", step=0, task="relation")
    s = P.summary(df, n_boot=200)
    r = s.iloc[0]
    assert r["acc_low"] <= r["accuracy"] <= r["acc_high"] and r["sel_low"] > 0.4 and r["p_holm"] < 1e-4
    assert r["chance"] == 0.25 and r["n"] == len(df)


def test_tasks_label_the_items_facts():
    for f in CONFIG.families:
        it = make_item(CONFIG, "test", f, 0)
        for t in P.TASKS:
            lab = t.label(it)
            assert (lab is None) == (f not in t.families)
            if lab is not None:
                assert t.labels[lab] == it.facts[t.fact]
    tokens = np.arange(12, dtype=float).reshape(3, 4)
    assert P.evidence_vector(tokens, P.TASK["relation"], "relpos").tolist() == list(range(8))
    assert P.evidence_vector(tokens, P.TASK["count"], "count").tolist() == tokens.sum(0).tolist()
    assert P.evidence_vector(tokens, P.TASK["asked colour"], "count").tolist() == tokens.sum(0).tolist()
    assert P.evidence_vector(np.zeros((0, 4)), P.TASK["count"], "count").tolist() == [0, 0, 0, 0]
    assert P.evidence_vector(tokens, P.TASK["asked colour"], "relpos").tolist() == [0, 1, 2, 3]
    assert P.evidence_vector(tokens, P.TASK["colour"], "attr").tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------- derived questions

def test_derived_questions_are_valid_queries_with_the_right_answer():
    g = CONFIG.grid
    kinds = {f: set() for f in CONFIG.families}
    for f in CONFIG.families:
        for i in range(20):
            it = make_item(CONFIG, "test", f, i)
            qs = D.derived_questions(it)
            assert qs[0].kind == "same" and qs[0].query.options[qs[0].query.answer] == it.answer_word
            for d in qs:
                q = d.query
                kinds[f].add(d.kind)
                assert isinstance(q, Query) and q.id == f"{it.id}|{d.kind}" and d.item == it.id
                assert len(set(q.options)) == 4 and all(w in VOCABULARY for w in q.options + q.keywords)
                m = re.fullmatch(TEMPLATES[q.family], q.question)
                assert m, q.question
                word = q.options[q.answer]
                if d.kind == "same":
                    continue
                labels = cell_labels(it, g)
                if q.family == "count":  # the number of cells holding that colour
                    colour = m.group(1)
                    assert colour == it.facts["colour"]
                    assert word == NUMBER_WORDS[int((labels["colour"] == COLOUR_NAMES.index(colour)).sum())]
                elif q.family == "relpos":  # the reverse of the item's own relation
                    assert word == OPPOSITE[it.answer_word]
                    assert q.keywords == [m.group(1), m.group(3)] == [it.keywords[1], it.keywords[0]]
                elif q.family == "attr":  # a counted object's colour; its shape is unique in the scene
                    shape = m.group(1)
                    assert word == it.facts["colour"] and (labels["shape"] == SHAPES.index(shape)).sum() == 1
                    cell = labels["shape"] == SHAPES.index(shape)
                    assert labels["colour"][cell][0] == COLOUR_NAMES.index(word)
    assert kinds["attr"] == kinds["relpos"] == kinds["glyph"] == {"same", "related"}


# ---------------------------------------------------------------- through a tiny model

@pytest.fixture(scope="module")
def closed_model(ckpt, tmp_path_factory):
    """The tiny random checkpoint with the zoo's bypass-closed spec (a forced segment of 4 latents)."""
    import shutil

    from latentmed.zoo.recipes import SPECS
    root = tmp_path_factory.mktemp("zoo")
    shutil.copytree(ckpt, root / "closed")
    SPECS["grounded-closed"].save(root / "closed")
    return root


def test_states_derived_rows_and_probes_through_the_store(closed_model, tmp_path):
    from latentmed.engine.reasoner import LatentReasoner

    items = [make_item(CONFIG, "test", f, i) for f in CONFIG.families for i in range(3)]
    tasks = [P.TASK["relation"], P.TASK["asked colour"]]
    st, dr, pr = PS.run_probe_study(closed_model, tmp_path, items, ["closed"], ["closed"], n_splits=3, tasks=tasks)
    assert len(st) == len(items) and set(dr["condition"]) == set(D.CONDITIONS)
    n_q = sum(len(D.derived_questions(it)) for it in items)
    assert len(dr) == 4 * n_q and set(pr["task"]) == {"relation", "asked colour"}
    assert set(pr["representation"]) == {"step 0", "step 1", "step 2", "step 3", "mean over steps", "image tokens",
                                         "prompt state"}
    # the sidecar holds what the engine recorded: the tower's tokens at the evidence cells
    r = LatentReasoner.from_pretrained(closed_model / "closed")
    run = PS.ResultsStore(tmp_path).run("closed", PS.model_hash(closed_model / "closed"),
                                        PS._params("states", items, 0))
    row = next(x for x in run.rows() if x["item"] == items[0].id)
    t = run.tensors(row)
    p = r.prompt(items[0])
    with torch.inference_mode():
        feats, _ = r.image_features([p], [[]])
    assert t["z"].shape == (4, r.hidden_size) and t["prompt"].shape == (1, r.hidden_size)
    assert torch.allclose(t["image"][0], feats[(items[0].evidence_cells[0][0]) * 8 + items[0].evidence_cells[0][1]],
                          atol=1e-5)
    # replay with the image blanked and the clean latents: the answer reads only the segment (bypass
    # closed), so zeroing the latents must move the log-probs, and the same row re-run is equal
    lat = dr[dr["condition"] == "latents"].set_index("item")["logprobs"]
    zero = dr[dr["condition"] == "zero"].set_index("item")["logprobs"]
    assert any(not np.allclose(lat[i], zero[i]) for i in lat.index)
    # re-running reuses every row: nothing is recomputed (no model is even loaded)
    import latentmed.analysis.probe_study as mod
    orig = mod.LatentReasoner.from_pretrained
    mod.LatentReasoner.from_pretrained = lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed"))
    try:
        st2, dr2, pr2 = PS.run_probe_study(closed_model, tmp_path, items, ["closed"], ["closed"], n_splits=3,
                                           tasks=tasks)
    finally:
        mod.LatentReasoner.from_pretrained = orig
    assert len(pr2) == len(pr) and len(dr2) == len(dr)
    pd.testing.assert_frame_equal(P.summary(pr2, n_boot=50), P.summary(pr, n_boot=50))
