"""The zoo: registry, one tiny end-to-end run (train, skip, evaluate, statistics), CLI, errors."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from latentmed import layouts, stats, zoo
from latentmed.evaluate import evaluate_zoo, headline_tests, summarize
from latentmed.testbed import TestbedConfig

CFG = TestbedConfig(n_objects=(3, 8), n_train=8, n_val=8, n_test=16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    df = zoo.train_zoo(root, budget="ci", config=CFG, progress=False, model_size="test")
    return root, df


def test_registry_has_every_method_with_its_spec_and_k():
    assert zoo.METHODS == ("base", "direct", "capimagine", "monet-style", "lvr-style", "mirage-style",
                           "positive-control", "negative-control")
    k = {m: zoo.SPECS[m].n_latents for m in zoo.METHODS}
    assert (k["monet-style"], k["lvr-style"], k["mirage-style"]) == (10, 8, 4)
    assert zoo.SPECS["mirage-style"].end_rule == "model_or_cap"
    assert [s.cfg.name for s in zoo.method_stages("monet-style")] == ["sft-crop", "latent-with-crop", "latent"]
    assert layouts.latent_source(zoo.SPECS["positive-control"]) == "evidence_crop"
    assert layouts.latent_source(zoo.SPECS["negative-control"]) == "constant"
    for m in zoo.METHODS:
        assert layouts.is_testbed(zoo.SPECS[m]) and zoo.SPECS[m].answer_format == "word"


def test_unknown_method_and_budget_are_named():
    with pytest.raises(ValueError, match="unknown method 'coconut'.*known: base, direct"):
        zoo.method_stages("coconut")
    with pytest.raises(ValueError, match="unknown budget 'huge'"):
        zoo.method_stages("direct", "huge")
    with pytest.raises(ValueError, match="unknown method 'coconut'"):
        zoo.train_zoo("unused", methods=["coconut"])


def test_zoo_trains_every_model_with_a_complete_checkpoint(trained):
    root, df = trained
    assert list(df["model"]) == list(zoo.METHODS)
    for m in zoo.METHODS:
        folder = root / m
        for f in ("config.json", "model.safetensors", "tokenizer.json", "latent_spec.json", "zoo.json",
                  "curves.csv", "preprocessor_config.json"):
            assert (folder / f).exists(), (m, f)
        info = json.loads((folder / "zoo.json").read_text())
        assert info["complete"] and info["seconds"] > 0 and info["settings"]["seed"] == 0
        assert not (folder / "runs").exists()
    assert (root / "negative-control" / layouts.CONSTANT_FILE).exists()
    curves = pd.read_csv(root / "monet-style" / "curves.csv")
    assert list(pd.unique(curves["stage"])) == ["sft-crop", "latent-with-crop", "latent"]


def test_second_run_skips_models_trained_with_the_same_settings(trained):
    root, _ = trained
    df = zoo.train_zoo(root, budget="ci", config=CFG, progress=False, model_size="test",
                       methods=["direct"])
    assert df["skipped"].all()


def test_changed_settings_retrain(trained, tmp_path):
    root, _ = trained
    s1 = zoo.settings("direct", "ci", 0, CFG, "h")
    s2 = zoo.settings("direct", "ci", 1, CFG, "h")
    assert zoo.settings_hash(s1) != zoo.settings_hash(s2)
    assert not zoo.is_trained(root / "direct", zoo.settings_hash(s2))


def test_tower_is_shared_and_frozen_across_the_zoo(trained):
    from latentmed.train import load_model, state_hash

    root, _ = trained
    towers = {state_hash(load_model(root / m)[0].model.visual) for m in zoo.METHODS}
    assert len(towers) == 1


def test_evaluation_reports_accuracy_intervals_trigger_k_and_nan(trained):
    root, _ = trained
    recs = evaluate_zoo(root, budget="ci", per_family=2)
    assert set(recs["model"]) == set(zoo.METHODS)
    summ = summarize(recs)
    row = summ[(summ["model"] == "lvr-style") & (summ["family"] == "all")].iloc[0]
    assert row["n"] == 8 and row["ci_low"] <= row["accuracy"] <= row["ci_high"]
    assert row["k_mean"] == 8 and row["nonfinite"] == 0 and 0 <= row["trigger_rate"] <= 1
    assert np.isnan(summ[(summ["model"] == "direct") & (summ["family"] == "all")]["trigger_rate"].iloc[0])
    mir = recs[recs["model"] == "mirage-style"]
    assert mir["k"].between(0, 8).all()
    tests = headline_tests(recs)
    assert {"capimagine"} <= set(tests["model_a"]) and "p_holm" in tests
    assert (tests["p_holm"] >= tests["p_value"] - 1e-12).all()
    again = evaluate_zoo(root, budget="ci", per_family=2)  # cached, same numbers
    assert again["correct"].tolist() == recs["correct"].tolist()


def test_checkpoints_load_through_the_engine_loader(trained):
    loading = pytest.importorskip("latentmed.loading")
    root, _ = trained
    for m in ["direct", "lvr-style", "mirage-style", "capimagine"]:
        r = loading.LatentReasoner.from_pretrained(root / m)
        assert r.spec.method == m and r.spec.n_latents == zoo.SPECS[m].n_latents


def test_a_base_with_another_tokenizer_is_refused_naming_the_folder(trained, tmp_path):
    import shutil

    from latentmed.tokenizer import build_tokenizer

    root, _ = trained
    bad = tmp_path / "base"
    shutil.copytree(root / "base", bad)
    build_tokenizer(vocab_size=400).save_pretrained(bad)
    z = zoo.Zoo(tmp_path / "z", budget="ci", config=CFG, progress=False, model_size="test")
    with pytest.raises(ValueError, match=rf"{bad}: the model does not match the tokenizer"):
        z.train_method("direct", base_folder=bad)


def test_incomplete_zoo_checkpoint_is_named(trained, tmp_path):
    import shutil

    root, _ = trained
    bad = tmp_path / "base"
    shutil.copytree(root / "base", bad)
    (bad / "model.safetensors").unlink()
    z = zoo.Zoo(tmp_path / "z", budget="ci", config=CFG, progress=False, model_size="test")
    with pytest.raises(FileNotFoundError, match=rf"{bad}: incomplete checkpoint folder, missing model.safetensors"):
        z.train_method("direct", base_folder=bad)


def test_cli_help_lists_methods_and_budgets():
    out = subprocess.run([sys.executable, "-m", "latentmed.zoo", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--budget" in out and "monet-style" in out and "negative-control" in out


def test_stats_wilson_mcnemar_holm_match_statsmodels():
    lo, hi = stats.wilson(8, 10)
    assert round(lo, 3) == 0.490 and round(hi, 3) == 0.943
    r = stats.mcnemar_paired([1, 1, 1, 0, 1, 1], [0, 0, 1, 0, 0, 1])
    assert r["a_only"] == 3 and r["b_only"] == 0 and r["exact"] and round(r["p_value"], 3) == 0.25
    p_adj, rej = stats.holm([0.01, 0.04, 0.03])
    assert np.allclose(p_adj, [0.03, 0.06, 0.06])
    df = pd.DataFrame(dict(model=["a"] * 4 + ["b"] * 4, family=["attr", "attr", "glyph", "glyph"] * 2,
                           correct=[1, 1, 0, 1, 0, 1, 0, 0]))
    t = stats.accuracy_table(df)
    assert list(t.columns[:3]) == ["model", "family", "n"] and t["above_chance"].dtype == bool


@pytest.mark.parametrize("method", ["direct", "lvr-style", "mirage-style"])
def test_engine_generate_and_replay_agree_with_the_evaluation_forward(trained, method):
    """The engine's own loop (loading.LatentReasoner) on the testbed layout decides the same K as
    `train.predict`, and where it writes the key words again as trained, its teacher-forced
    replay gives the same answer log-probs."""
    loading = pytest.importorskip("latentmed.loading")
    from latentmed import train
    from latentmed.testbed import make_item

    root, _ = trained
    # LVR's released loop samples the token after K latents; force the end on both sides so an
    # untrained model's free text does not decide where the segment ends
    override = {"end_rule": "force_after_k"} if method == "lvr-style" else {}
    r = loading.LatentReasoner.from_pretrained(root / method, **override)
    model, tok, spec = train.load_model(root / method)
    spec = spec.with_overrides(**override)
    bank = train.build_bank(model, CFG, "test", 1, kinds=("main",), progress=False)
    recs = train.predict(model, tok, bank, train.Plan(spec, n_latents=spec.n_latents))
    compared = 0
    for rec in recs:
        item = make_item(CFG, "test", rec["family"], 0)
        prompt = r.item_inputs(item)
        oid = prompt.option_ids
        trace = r.generate(prompt, force_latent=spec.has_latents, option_ids=oid,
                           max_new_tokens=spec.k_target + 6 if spec.has_latents else 2)
        k = len(trace.segments[0].slots) if trace.segments else 0
        assert k == rec["k"], (rec["id"], k, rec["k"])
        step = trace.segments[0].last - len(trace.prompt_ids) + 1 if trace.segments else 0
        restated = r.tokenizer.encode(layouts.answer_prefix(item, spec), add_special_tokens=False)
        if trace.generated_ids[step:step + len(restated)] != restated:
            continue  # the (barely trained) model wrote something else after the segment
        lp = r.replay(trace).step_option_logprobs[step + len(restated)]
        lp = lp - lp.logsumexp(0)  # the engine's log-probs are over the vocabulary
        assert np.allclose(lp.numpy(), rec["logprobs"], atol=1e-4), rec["id"]
        compared += 1
    assert compared > 0 or method != "direct"


def test_only_zoo_specs_use_the_testbed_layout():
    from latentmed.spec import PRESETS

    assert not any(layouts.is_testbed(s) for s in PRESETS.values())
    assert all(layouts.is_testbed(zoo.SPECS[m]) for m in zoo.METHODS)


def test_item_inputs_refuses_chat_models(tmp_path):
    from latentmed.loading import LatentReasoner
    from latentmed.testbed import make_item
    from latentmed.tiny import make_tiny_checkpoint

    r = LatentReasoner.from_pretrained(make_tiny_checkpoint(tmp_path / "ck"), method="lvr")
    with pytest.raises(ValueError, match="chat template"):
        r.item_inputs(make_item(CFG, "test", "attr", 0))
