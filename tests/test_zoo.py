"""The zoo: registry, one tiny end-to-end run (train, skip, evaluate, statistics), CLI, errors."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from latentmed import zoo
from latentmed.analysis import stats
from latentmed.engine import checkpoint, layouts
from latentmed.files import settings_hash, state_hash
from latentmed.testbed import VOCABULARY, TestbedConfig
from latentmed.zoo import bank as B
from latentmed.zoo import batching, predict
from latentmed.zoo.evaluate import evaluate_zoo, headline_tests, summarize

CFG = TestbedConfig(n_objects=(3, 8), n_train=8, n_val=8, n_test=16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    df = zoo.train_zoo(root, budget="ci", config=CFG, progress=False, model_size="test")
    return root, df


def test_registry_has_every_method_with_its_spec_and_k():
    assert zoo.METHODS == ("base", "direct", "capimagine", "monet-style", "lvr-style", "mirage-style",
                           "positive-control", "negative-control", "grounded-closed", "lvr-closed")
    assert set(zoo.KINDS) == set(zoo.SPECS) == set(zoo.METHODS) | set(zoo.DOSE_METHODS)
    assert all(zoo.SPECS[m].after_segment == "segment" for m in zoo.METHODS if zoo.KINDS[m].endswith("closed"))
    k = {m: zoo.SPECS[m].n_latents for m in zoo.METHODS}
    assert (k["monet-style"], k["lvr-style"], k["mirage-style"]) == (10, 8, 4)
    assert zoo.SPECS["mirage-style"].end_rule == "model_or_cap"
    assert [s.cfg.name for s in zoo.method_stages("monet-style")] == ["sft-crop", "latent-with-crop", "latent"]
    assert zoo.SPECS["positive-control"].latent_source == "evidence_tokens"
    assert zoo.SPECS["positive-control"].prompt_image == "degraded"
    assert zoo.SPECS["negative-control"].latent_source == "constant"
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
    assert (root / "negative-control" / checkpoint.CONSTANT_FILE).exists()
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
    assert settings_hash(s1) != settings_hash(s2)
    assert not zoo.is_trained(root / "direct", settings_hash(s2))


def test_tower_is_shared_and_frozen_across_the_zoo(trained):
    root, _ = trained
    towers = {state_hash(checkpoint.load(root / m).model.model.visual) for m in zoo.METHODS}
    assert len(towers) == 1


def test_evaluation_reports_accuracy_intervals_trigger_k_and_nan(trained):
    root, _ = trained
    recs = evaluate_zoo(root, per_family=2)
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
    again = evaluate_zoo(root, per_family=2)  # cached, same numbers
    assert again["correct"].tolist() == recs["correct"].tolist()


def test_checkpoints_load_through_the_engine_loader(trained):
    loading = pytest.importorskip("latentmed.engine.reasoner")
    root, _ = trained
    for m in ["direct", "lvr-style", "mirage-style", "capimagine"]:
        r = loading.LatentReasoner.from_pretrained(root / m)
        assert r.spec.method == m and r.spec.n_latents == zoo.SPECS[m].n_latents


def test_a_base_with_another_tokenizer_is_refused_naming_the_folder(trained, tmp_path):
    import shutil

    from latentmed.engine.tokenizer import build_tokenizer

    root, _ = trained
    bad = tmp_path / "base"
    shutil.copytree(root / "base", bad)
    build_tokenizer(VOCABULARY, vocab_size=400).save_pretrained(bad)
    z = zoo.Zoo(tmp_path / "z", budget="ci", config=CFG, progress=False, model_size="test")
    with pytest.raises(ValueError, match=rf"{bad}: tokenizer/config mismatch"):
        z.train_method("direct", base_folder=bad)


def test_incomplete_zoo_checkpoint_is_named(trained, tmp_path):
    import shutil

    root, _ = trained
    bad = tmp_path / "base"
    shutil.copytree(root / "base", bad)
    (bad / "model.safetensors").unlink()
    z = zoo.Zoo(tmp_path / "z", budget="ci", config=CFG, progress=False, model_size="test")
    with pytest.raises(FileNotFoundError, match=rf"{bad}: no model weights"):
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


@pytest.mark.parametrize("method", [m for m in zoo.METHODS])
def test_engine_and_the_fast_training_path_agree_item_for_item(trained, method):
    """Chapter 2 measures through the engine (`LatentReasoner`); training validates with the
    batched `predict`. Both give the same answer, K, trigger and option log-probs per item."""
    from latentmed.zoo.evaluate import evaluate_model, test_items

    root, _ = trained
    x = checkpoint.load(root / method)
    spec = x.spec
    fill = B.FILL_OF_SOURCE[spec.latent_source]
    plan = batching.Plan(spec, n_latents=spec.n_latents if spec.has_latents else 0, latent_fill=fill,
                         image="degraded" if spec.prompt_image == "degraded" else "main")
    bank = B.build_bank(x.model, CFG, "test", 3, kinds=("main", "crop", "degraded"), progress=False)
    fast = pd.DataFrame(predict.predict(x.model, x.tokenizer, bank, plan, constant=x.constant))
    eng = evaluate_model(root / method, test_items(CFG, "test", 3))
    assert fast["id"].tolist() == eng["id"].tolist()
    assert fast["pred"].tolist() == eng["pred"].tolist(), method
    assert fast["k"].tolist() == eng["k"].tolist(), method
    np.testing.assert_allclose(np.array(fast["logprobs"].tolist()), np.array(eng["logprobs"].tolist()), atol=1e-4)
    if spec.has_segments:
        assert fast["trigger"].tolist() == eng["trigger"].tolist()
        assert fast["ended"].tolist() == eng["ended"].tolist()


def test_only_zoo_specs_use_the_testbed_layout():
    from latentmed.engine.spec import PRESETS

    assert not any(layouts.is_testbed(s) for s in PRESETS.values())
    assert all(layouts.is_testbed(zoo.SPECS[m]) for m in zoo.METHODS)


def test_item_inputs_refuses_chat_models(tmp_path):
    from latentmed.engine.reasoner import LatentReasoner
    from latentmed.engine.tiny import make_tiny_checkpoint
    from latentmed.testbed import make_item

    r = LatentReasoner.from_pretrained(make_tiny_checkpoint(tmp_path / "ck"), method="lvr")
    with pytest.raises(ValueError, match="chat template"):
        r.item_inputs(make_item(CFG, "test", "attr", 0))


def test_the_evaluation_table_reads_back_equal(trained):
    root, _ = trained
    first = evaluate_zoo(root, per_family=2)
    again = evaluate_zoo(root, per_family=2)  # read back from the stored table
    pd.testing.assert_frame_equal(first.reset_index(drop=True), again.reset_index(drop=True), check_dtype=False)
    (root / "eval-test-forced.json").write_text("{damaged")
    assert len(evaluate_zoo(root, per_family=2)) == len(first)  # a damaged key means: compute again


def test_parallel_training_gives_the_models_sequential_training_gives(trained, tmp_path):
    """Two worker processes (one thread each, as the tests run) train the same weights."""
    import shutil

    from latentmed.files import file_hash

    root, _ = trained
    par = tmp_path / "par"
    shutil.copytree(root / "base", par / "base")
    shutil.copytree(root / "_features", par / "_features")
    df = zoo.train_zoo(par, budget="ci", config=CFG, progress=False, model_size="test", verbose=False,
                       methods=["direct", "negative-control", "grounded-closed"], workers=2)
    assert not df.set_index("model").loc[["direct", "negative-control", "grounded-closed"], "skipped"].any()
    for m in ("direct", "negative-control", "grounded-closed"):
        assert file_hash(par / m / "model.safetensors") == file_hash(root / m / "model.safetensors"), m
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        zoo.train_zoo(par, budget="ci", config=CFG, workers=0)
