"""The real track end to end on tiny random checkpoints of each released layout and tiny fixtures in
each benchmark's format: presets load through the engine, evaluation writes one row per instance,
a killed run resumes without losing or duplicating a row, and a two-process `accelerate launch`
run merges to the one-process result."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from latentmed.real import evaluate as E
from latentmed.real import fixtures, load_benchmark, load_model, report
from latentmed.real.cli import main as cli
from latentmed.real.evaluate import VOLATILE, Settings, evaluate, merge, read_rows
from latentmed.store import ResultsStore
from safetensors import safe_open

METHODS = ["direct", "monet", "monet-sft", "lvr", "mirage", "capimagine"]
SMALL = ["--max-new-tokens", "16", "--min-pixels", "784", "--max-pixels", "12544", "--no-progress"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", LATENTMED_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    data = dict(vstar=fixtures.write_vstar(root / "vstar", n=4),
                hrbench4k=fixtures.write_hrbench(root / "hr", n_questions=2, cycles=2).parent,
                hrbench8k=fixtures.write_hrbench(root / "hr", "hrbench8k", n_questions=1, cycles=2).parent,
                **{"mme-realworld-lite": fixtures.write_mme_lite(root / "mme", n=3)})
    ckpt = {m: fixtures.method_checkpoint(root / "ckpt" / m, m, seed=1, lvr_head=m == "lvr") for m in METHODS}
    ckpt["lvr-nohead"] = fixtures.method_checkpoint(root / "ckpt" / "lvr-nohead", "lvr", seed=1)
    return dict(root=root, data=data, ckpt=ckpt)


def settings(fx, out, method="monet", benchmark="vstar", **kw):
    kw = dict(dict(max_new_tokens=16, min_pixels=784, max_pixels=12544, progress=False), **kw)
    return Settings(model=fx["ckpt"][method], method=method, benchmark=benchmark, data=fx["data"][benchmark],
                    out=out, **kw)


def stable(rows) -> pd.DataFrame:
    """Rows without the fields that may differ between equal runs, in benchmark order."""
    df = pd.DataFrame(rows)
    return df.drop(columns=[c for c in VOLATILE if c in df]).sort_values("position").reset_index(drop=True)


def final_run(out):
    runs = [r for r in ResultsStore(out).runs() if "shard" not in r.meta["params"]]
    assert len(runs) == 1
    return runs[0]


# ---------------------------------------------------------------- presets through the engine

def test_each_released_layout_loads_with_its_tokens_config_and_template(fx):
    ck = fx["ckpt"]
    monet = load_model(ck["monet"], "monet", "vstar")
    assert monet.spec.placement == "overwrite_start" and monet.spec.n_latents == 10
    assert monet.ids.start == json.loads((ck["monet"] / "config.json").read_text())["latent_start_id"]
    assert "\\boxed{}" in monet.spec.system_prompt
    lvr = load_model(ck["lvr"], "lvr", "vstar")
    assert lvr.head is not None and lvr.spec.head == "lvr_head" and lvr.spec.answer_format == "answer_tag"
    assert load_model(ck["lvr-nohead"], "lvr", "vstar").head is None
    mirage = load_model(ck["mirage"], "mirage", "vstar")
    assert mirage.model.config.text_config.vocab_size == len(mirage.tokenizer), "Mirage resizes its embedding"
    assert mirage.spec.end_rule == "model_or_cap" and mirage.spec.max_latents == 8
    cap = load_model(ck["capimagine"], "capimagine", "vstar")
    assert "<imagine>" not in cap.tokenizer.get_vocab() and cap.spec.placement == "none"
    assert cap.spec.answer_format == "boxed"
    direct = load_model(ck["direct"], "direct", "mme-realworld-lite", "lmms-eval")
    assert not direct.spec.has_segments and direct.spec.harness == "lmms-eval"
    # pixel bounds: the method's released evaluation unless given
    from latentmed.real.preprocess import EVAL_PIXELS, pixel_bounds

    assert pixel_bounds(monet.processor) == EVAL_PIXELS["monet"]
    assert pixel_bounds(load_model(ck["mirage"], "mirage", "vstar", max_pixels=5000).processor)[1] == 5000


@pytest.mark.parametrize("method", ["direct", "monet"])
def test_checkpoints_saved_by_older_transformers_load_to_the_same_model(fx, tmp_path, method):
    """Qwen2.5-VL-7B-Instruct is published with a flat config.json and weight names without
    `language_model`; the loader must read that layout into the same model."""
    old = fixtures.method_checkpoint(tmp_path / "old", method, seed=1, legacy=True)
    cfg = json.loads((old / "config.json").read_text())
    assert "text_config" not in cfg and cfg["rope_scaling"]["type"] == "mrope"
    with safe_open(str(old / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys() and any(k.startswith("visual.") for k in f.keys())
    a, b = load_model(old, method, "vstar"), load_model(fx["ckpt"][method], method, "vstar")
    assert a.load_report == {"missing": [], "unexpected": []}
    ex = load_benchmark("vstar", fx["data"]["vstar"])[0]
    ta = a.generate(a.prompt(ex.query()), max_new_tokens=12, force_latent=method == "monet")
    tb = b.generate(b.prompt(ex.query()), max_new_tokens=12, force_latent=method == "monet")
    assert ta.generated_ids == tb.generated_ids and ta.answer_logprobs == pytest.approx(tb.answer_logprobs, abs=1e-5)


def test_checkpoint_errors_are_clear(fx, tmp_path):
    # a stock Qwen2.5-VL tokenizer has no Monet tokens
    with pytest.raises(ValueError, match="tokenizer has no start token '<abs_vis_token>'"):
        load_model(fx["ckpt"]["direct"], "monet", "vstar")
    bad = shutil.copytree(fx["ckpt"]["mirage"], tmp_path / "mirage")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["latent_start_id"] += 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mirage: tokenizer/config mismatch: config.json latent_start_id="):
        load_model(bad, "mirage", "vstar")
    bad = shutil.copytree(fx["ckpt"]["monet"], tmp_path / "monet")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["latent_end_id"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json latent_end_id=3"):
        load_model(bad, "monet", "vstar")


# ---------------------------------------------------------------- end to end on every fixture

@pytest.mark.parametrize("benchmark", ["vstar", "hrbench4k", "hrbench8k", "mme-realworld-lite"])
@pytest.mark.parametrize("method", METHODS)
def test_eval_end_to_end(fx, tmp_path, method, benchmark):
    n = {"vstar": 4, "hrbench4k": 4, "hrbench8k": 2, "mme-realworld-lite": 3}[benchmark]
    forced = method == "monet"
    done = evaluate(settings(fx, tmp_path, method, benchmark, force_latent=forced))
    assert (done["written"], done["examples"], done["world"]) == (n, n, 1)
    rows = read_rows(final_run(tmp_path))
    assert [r["position"] for r in rows] == list(range(n)) and len({r["item"] for r in rows}) == n
    for r in rows:
        assert r["benchmark"] == benchmark and r["method"] == method and r["condition"] == "eval"
        assert r["correct"] == (r["pred"] == r["answer"]) and r["unparsed"] == (r["pred"] is None)
        assert len(r["logprobs"]) == r["n_options"] and r["pred_logprob"] in "ABCDE"
        assert r["grid"][0] == 1 and r["image_tokens"] * 4 == r["grid"][1] * r["grid"][2]
        if method in ("direct", "capimagine"):
            assert r["segments"] is False and r["triggered"] is None and r["k"] == 0
        elif forced:
            assert r["opened"] and r["forced"] and r["k"] == 10 and isinstance(r["triggered"], bool)
        else:
            assert r["opened"] == r["triggered"], "unforced: a segment opens only when the model chooses it"
        if benchmark.startswith("hrbench"):
            assert r["cycle"].startswith("cycle_") and r["category"] in ("single", "cross")
    table = report.summary(tmp_path)
    assert len(table) == 1 and table["n"].iloc[0] == n
    paper = report.paper_accuracy(method, benchmark)
    assert (table["paper"].iloc[0] is None) if paper is None else table["paper"].iloc[0] == pytest.approx(paper / 100)


def test_forced_and_free_monet_runs_report_the_natural_trigger(fx, tmp_path):
    evaluate(settings(fx, tmp_path, "monet", force_latent=True))
    evaluate(settings(fx, tmp_path, "monet", force_latent=False))
    table = report.summary(tmp_path).set_index("force_latent")
    assert set(table.index) == {True, False}
    assert table.loc[True, "opened"] == 4 and table.loc[True, "k_mean"] == 10
    # the natural trigger is the same measurement in both runs (the model's own top token after the prompt)
    assert table.loc[True, "trigger_rate"] == table.loc[False, "trigger_rate"]
    assert table.loc[False, "opened"] == round(4 * table.loc[False, "trigger_rate"])
    fvf = report.forced_vs_free(tmp_path)
    assert len(fvf) == 1 and fvf["n"].iloc[0] == 4
    assert fvf["acc_forced"].iloc[0] == table.loc[True, "accuracy"] and 0 <= fvf["p_value"].iloc[0] <= 1
    cmp = report.compare_to_paper(report.summary(tmp_path))
    assert list(cmp["paper"]) == [0.833, 0.833] and cmp["p_holm"].between(0, 1).all()


def test_save_latents_stores_z_with_the_row(fx, tmp_path):
    evaluate(settings(fx, tmp_path, "monet", force_latent=True, save_latents=True, limit=2))
    run = final_run(tmp_path)
    rows = read_rows(run)
    z = run.tensors(rows[0])
    assert set(z) == {"z_in", "z_out"} and z["z_in"].shape == (10, 64)


# ---------------------------------------------------------------- resume

def test_resume_after_a_crash_loses_and_duplicates_nothing(fx, tmp_path, monkeypatch):
    evaluate(settings(fx, tmp_path / "whole", "lvr", "hrbench4k"))
    whole = read_rows(final_run(tmp_path / "whole"))
    calls = {"n": 0}
    real_row = E.row_of

    def crash_on_third(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_row(*a, **kw)

    monkeypatch.setattr(E, "row_of", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        evaluate(settings(fx, tmp_path / "resumed", "lvr", "hrbench4k"))
    run = final_run(tmp_path / "resumed")
    assert len(read_rows(run)) == 2
    with open(run.folder / "rows.jsonl", "a") as f:  # a kill in the middle of writing a row
        f.write('{"item": "2", "condition": "eval", "pos')
    monkeypatch.setattr(E, "row_of", real_row)
    done = evaluate(settings(fx, tmp_path / "resumed", "lvr", "hrbench4k"))
    assert (done["todo"], done["written"]) == (2, 2)
    resumed = read_rows(final_run(tmp_path / "resumed"))
    assert len(resumed) == 4 and len({r["item"] for r in resumed}) == 4
    pd.testing.assert_frame_equal(stable(resumed), stable(whole))
    assert evaluate(settings(fx, tmp_path / "resumed", "lvr", "hrbench4k"))["written"] == 0, "nothing left to do"


def test_resume_after_sigkill_of_the_command(fx, tmp_path, capsys):
    data = fixtures.write_vstar(tmp_path / "vstar12", n=12)
    args = ["eval", "--model", str(fx["ckpt"]["monet"]), "--method", "monet", "--benchmark", "vstar", "--data",
            str(data), "--out", str(tmp_path / "out"), "--force-latent", "--max-new-tokens", "32", "--min-pixels",
            "784", "--max-pixels", "12544"]
    proc = subprocess.Popen([sys.executable, "-m", "latentmed.real", *args, "--no-progress"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        files = list((tmp_path / "out").glob("*/rows.jsonl"))
        if files and files[0].read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_rows(final_run(tmp_path / "out"))
    assert 2 <= len(before) < 12, "the kill must land in the middle of the run"
    capsys.readouterr()
    assert cli(args) == 0  # the same command again (in this process, to save a start-up)
    out, err = capsys.readouterr()
    assert f"{12 - len(before)} rows written ({12 - len(before)} to do of 12)" in err
    assert "monet vstar" in err and ("it/s" in err or "s/it" in err), "a progress bar"
    after = read_rows(final_run(tmp_path / "out"))
    assert sorted(int(r["item"]) for r in after) == list(range(12))
    assert stable(after).iloc[:len(before)].equals(stable(before))
    assert "accuracy" in out and "0.833" in out, "the summary with the paper's V* number for Monet"


# ---------------------------------------------------------------- sharding

def test_two_process_accelerate_launch_merges_to_the_one_process_result(fx, tmp_path):
    exe = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    args = ["-m", "latentmed.real", "eval", "--model", str(fx["ckpt"]["lvr"]), "--method", "lvr", "--benchmark",
            "hrbench4k", "--data", str(fx["data"]["hrbench4k"]), "--out", str(tmp_path / "sharded"), *SMALL]
    # without a GPU, accelerate's multi-process launcher (torchrun) gives each process gloo
    cmd = [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[eval 1/2]" in res.stderr and "[eval 2/2]" in res.stderr
    store = ResultsStore(tmp_path / "sharded")
    shards = sorted(tuple(r.meta["params"]["shard"]) for r in store.runs() if "shard" in r.meta["params"])
    assert shards == [(0, 2), (1, 2)]
    merged = final_run(tmp_path / "sharded")
    evaluate(settings(fx, tmp_path / "one", "lvr", "hrbench4k", max_pixels=12544))
    one = final_run(tmp_path / "one")
    assert merged.folder.name == one.folder.name and merged.meta == one.meta, "the same run key"
    pd.testing.assert_frame_equal(stable(read_rows(merged)), stable(read_rows(one)))
    assert [r["position"] for r in read_rows(merged)] == [0, 1, 2, 3]
    info = json.loads((merged.folder / "model.json").read_text())
    assert info["method"] == "lvr" and info["head"] is True and info["load_report"]["missing"] == []
    assert info["min_pixels"] == 784 and info["torch"] and info["device"] == "cpu"
    loaded = report.loads(tmp_path / "sharded")
    assert len(loaded) == 1 and loaded["missing"].iloc[0] == 0 and loaded["head"].iloc[0]
    # merging again adds nothing; the report counts no pending shard rows
    assert merge(tmp_path / "sharded")[0]["added"] == 0
    assert report.summary(tmp_path / "sharded").attrs["pending_shard_rows"] == 0


def test_manual_merge_and_conflicting_shards(fx, tmp_path, monkeypatch, capsys):
    # two "processes" by hand: shard runs written with accelerate's state faked
    class State:
        def __init__(self, rank):
            self.process_index, self.num_processes, self.device = rank, 2, "cpu"

        def wait_for_everyone(self):
            pass

    for rank in (1, 0):
        monkeypatch.setattr(E, "_process_state", lambda device, rank=rank: (rank, 2, "cpu", State(rank)))
        if rank == 1:  # rank 1 finishes; rank 0 would merge at its end: simulate it never got there
            evaluate(settings(fx, tmp_path, "direct", "vstar"))
    assert cli(["report", "--out", str(tmp_path)]) == 0
    assert "no finished real-track runs" in capsys.readouterr().out
    store = ResultsStore(tmp_path)
    shard = next(r for r in store.runs() if "shard" in r.meta["params"])
    assert [r["item"] for r in read_rows(shard)] == ["1", "3"]
    assert cli(["merge", "--out", str(tmp_path)]) == 0
    assert "2 rows added" in capsys.readouterr().out
    # a one-process run now only does the other half
    monkeypatch.setattr(E, "_process_state", lambda device: (0, 1, "cpu", None))
    done = evaluate(settings(fx, tmp_path, "direct", "vstar"))
    assert done["todo"] == 2 and len(read_rows(final_run(tmp_path))) == 4
    # a shard that disagrees with the merged rows is an error naming both runs
    rows = read_rows(shard)
    rows[0]["pred"] = "Z"
    (shard.folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"item '1' \(eval\) is stored with different results in .* and .*"):
        merge(tmp_path)


# ---------------------------------------------------------------- the command line

def test_help_lists_subcommands_and_eval_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("eval", "merge", "check", "report", "presets", "accelerate launch"):
        assert name in out
    with pytest.raises(SystemExit):
        cli(["eval", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--method", "--benchmark", "--data", "--out", "--limit", "--device", "--force-latent",
                 "--harness", "--max-pixels", "monet-sft", "mme-realworld-lite"):
        assert flag in out


def test_cli_bad_inputs_are_one_line_errors(fx, tmp_path, capsys):
    base = ["eval", "--benchmark", "vstar", "--data", str(fx["data"]["vstar"]), "--out", str(tmp_path), *SMALL]
    assert cli([*base, "--model", str(fx["ckpt"]["direct"]), "--method", "direct", "--force-latent"]) == 2
    assert "has no latent segment; --force-latent does not apply" in capsys.readouterr().err
    assert cli([*base, "--model", str(tmp_path / "nowhere"), "--method", "monet"]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err
    assert cli(["eval", "--model", str(fx["ckpt"]["monet"]), "--method", "monet", "--benchmark", "hrbench8k",
                "--data", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no hr_bench_8k.tsv" in err
    with pytest.raises(SystemExit):
        cli([*base, "--model", str(fx["ckpt"]["monet"]), "--method", "vlm-r1"])
    assert "invalid choice: 'vlm-r1'" in capsys.readouterr().err


def test_presets_command(capsys):
    assert cli(["presets"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint=NOVAglow646/Monet-7B" in out and "min_pixels=200704" in out and "method=capimagine" in out


def test_commands_for_chapter_8_cover_every_paper_model_and_benchmark():
    how = report.instructions("/runs/real")
    assert "check --benchmark hrbench8k" in how and '-p results_dir "$PWD//runs/real"' not in how
    assert "--out /runs/real" in how and "papermill notebooks/08_real.ipynb" in how
    text = report.commands()
    assert text.count("--method monet ") == 8 and "--force-latent" in text  # 4 benchmarks, free and forced
    for m in ("direct", "lvr", "capimagine"):
        assert text.count(f"--method {m} ") == 4
    assert text.strip().endswith("report --out results/real")
