"""The benchmark code (benchmarks/): its equality checks fail on planted differences, its result
files carry what they must, its roofline arithmetic matches hand-computed values, and the sweep
benchmark runs end to end on a tiny random model. Nothing here is timed: the benchmark command
measures, these tests check that what it reports is computed right."""

from __future__ import annotations

import copy
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import OPTIONS
from latentmed.paths import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks import bench_scaling, bench_sweep, charts, common, gpu, main_build, report, run  # noqa: E402

FAMILIES = ["attr", "relpos", "count"]


# ---------------------------------------------------------------- a tiny sweep, end to end

@pytest.fixture(scope="module")
def tiny_sweep(load, images):
    """The sweep benchmark at M = 1, 2 on a random tiny model (monet layout, forced segment)."""
    r = load("monet")
    cfg = common_cfg()
    prompts = [r.build_inputs(im, "What colour is the square?", OPTIONS) for im in images]
    from latentmed.analysis.measure import clean_runs

    clean = clean_runs(r, prompts, cfg)
    from benchmarks import workload

    pools = workload.variant_pool(clean, FAMILIES, 2)
    return r, cfg, prompts, pools


def common_cfg():
    from latentmed.engine.decode import DecodeConfig

    return DecodeConfig(max_new_tokens=14, force_latent=True, stop_after_answer=False)


def test_sweep_benchmark_runs_end_to_end_and_checks_equal_outputs(tiny_sweep):
    r, cfg, prompts, pools = tiny_sweep
    rows = bench_sweep.run_sweep(r, cfg, prompts, pools, ms=(1, 2), repeats=1, progress=False)
    assert [x["m"] for x in rows] == [1, 2]
    for x in rows:
        assert x["outputs_equal"] and x["equal_shared"]["tokens_equal"] and x["equal_many"]["n"] == 3 * x["m"]
        assert x["equal_shared"]["max_logprob_diff"] <= common.TOL
        assert x["ratio_shared"] == pytest.approx(x["naive_s"] / x["shared_s"])
        assert x["ratio_shared_range"][0] <= x["ratio_shared_range"][1]
    assert rows[1]["distinct_outputs"] > 1  # the interventions really change the runs


def test_sweep_benchmark_reports_a_planted_difference(tiny_sweep, monkeypatch):
    r, cfg, prompts, pools = tiny_sweep
    from latentmed.engine import sweep

    real = sweep.naive_sweep

    def off_by_one(*a, **kw):  # the naive way now gives one different token in its first run
        out = real(*a, **kw)
        out[0] = copy.copy(out[0])
        out[0].generated_ids = list(out[0].generated_ids[:-1]) + [out[0].generated_ids[-1] + 1]
        return out

    monkeypatch.setattr(sweep, "naive_sweep", off_by_one)
    rows = bench_sweep.run_sweep(r, cfg, prompts[:1], pools[:1], ms=(2,), repeats=1, progress=False)
    assert rows[0]["outputs_equal"] is False and rows[0]["equal_shared"]["mismatches"] == [0]


# ---------------------------------------------------------------- equality checks

@pytest.fixture(scope="module")
def traces(load, images):
    r = load("monet")
    p = r.build_inputs(images[0], "What colour is the square?", OPTIONS)
    from latentmed.engine import interventions as I

    return [r.generate(p, v, max_new_tokens=12, force_latent=True) for v in ([], [I.ZeroLatent()])]


def test_compare_traces_passes_equal_runs_and_fails_planted_differences(traces):
    same = common.compare_traces(traces, [copy.deepcopy(t) for t in traces])
    assert same["equal"] and same["max_logprob_diff"] == 0.0
    tok = copy.deepcopy(traces)
    tok[1].generated_ids = list(tok[1].generated_ids)
    tok[1].generated_ids[-1] += 1
    res = common.compare_traces(traces, tok)
    assert not res["equal"] and not res["tokens_equal"] and res["mismatches"] == [1]
    lp = copy.deepcopy(traces)
    lp[0].step_option_logprobs = lp[0].step_option_logprobs + 2e-4  # just over the tolerance
    res = common.compare_traces(traces, lp)
    assert not res["equal"] and res["tokens_equal"] and res["max_logprob_diff"] == pytest.approx(2e-4, rel=1e-2)
    small = copy.deepcopy(traces)
    small[0].step_option_logprobs = small[0].step_option_logprobs + 5e-5
    assert common.compare_traces(traces, small)["equal"]
    assert not common.compare_traces(traces, traces[:1])["equal"]


def _row(**kw):
    row = dict(model="m", item="i1", condition="zero/generate", chosen=1, k=4, triggered=False, nonfinite=False,
               logprobs=[-1.0, -0.5, -2.0, -3.0], margin=-0.5)
    row.update(kw)
    return row


def test_compare_rows_fails_on_a_changed_choice_log_prob_or_missing_row():
    a = [_row(), _row(item="i2")]
    assert common.compare_rows(a, copy.deepcopy(a))["equal"]
    assert not common.compare_rows(a, [_row(chosen=2), _row(item="i2")])["equal"]
    assert not common.compare_rows(a, [_row(logprobs=[-1.0, -0.5, -2.0, -3.001]), _row(item="i2")])["equal"]
    assert common.compare_rows(a, [_row(logprobs=[-1.0, -0.5, -2.0, -3.00001]), _row(item="i2")])["equal"]
    missing = common.compare_rows(a, a[:1])
    assert not missing["equal"] and missing["n_unmatched"] == 1
    # a results frame turns None into NaN: both mean "no answer"
    assert common.compare_rows([_row(chosen=None, margin=None)], [_row(chosen=float("nan"), margin=float("nan"))])["equal"]


def test_compare_replays_fails_on_a_planted_difference(load, images):
    r = load("monet")
    p = r.build_inputs(images[1], "What colour is the square?", OPTIONS)
    t = r.generate(p, max_new_tokens=12, force_latent=True, force_suffix=True)
    from latentmed.engine import interventions as I

    a = [r.replay(t, [I.ZeroLatent()])]
    b = [r.replay(t, [I.ZeroLatent()])]
    assert common.compare_replays(a, b)["equal"]
    c = copy.deepcopy(b)
    c[0].step_option_logprobs = c[0].step_option_logprobs + 1e-3
    assert not common.compare_replays(a, c)["equal"]


# ---------------------------------------------------------------- result files

def test_result_files_need_their_fields_and_the_committed_ones_have_them(tmp_path):
    with pytest.raises(ValueError, match="lacks the required fields"):
        common.write_result(dict(benchmark="x"), "x", out_dir=tmp_path)
    result = common.finish(dict(benchmark="x", outputs_equal=True, value=float("nan"), path=ROOT / "benchmarks",
                                **common.provenance("cpu")))
    path = common.write_result(result, "x", out_dir=tmp_path)
    back = json.loads(path.read_text())
    assert path.name == "x-cpu.json" and back["value"] == "nan" and back["path"] == "benchmarks"
    assert len(back["git_commit"]) == 40 and back["threads"] >= 1 and back["cpu_model"]
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert files, "benchmarks/results holds no result"
    for f in files:
        res = json.loads(f.read_text())
        assert common.check_result(res) == [], f"{f.name} lacks {common.check_result(res)}"
        assert "/work/" not in f.read_text() and "/tmp/" not in f.read_text(), f"{f.name} holds a machine path"


# ---------------------------------------------------------------- roofline arithmetic

TEXT_7B = gpu.QWEN25_VL_7B["text"]


def test_7b_parameter_and_byte_counts_match_hand_computed_values():
    p = gpu.text_params(TEXT_7B)
    # per layer: q,o 2 x 3584^2; q bias 3584; k,v 2 x (3584 x 512 + 512); MLP 3 x 3584 x 18944; 2 norms
    assert p["per_layer"] == 2 * 12_845_056 + 3_584 + 2 * 1_835_520 + 3 * 67_895_296 + 7_168 == 233_057_792
    assert p["read_per_token"] == 28 * 233_057_792 + 3_584 + 152_064 * 3_584 == 7_070_619_136
    assert p["total"] == 7_615_616_512  # Qwen2.5-7B's language model: 7.62 B
    assert gpu.bytes_per_token(TEXT_7B) == 14_141_238_272
    assert gpu.kv_bytes_per_token(TEXT_7B) == 2 * 28 * 4 * 128 * 2 == 57_344
    assert gpu.bytes_per_token(TEXT_7B, context=1000) == 14_141_238_272 + 57_344_000


def test_rooflines_and_mfu_match_hand_computed_values():
    assert gpu.roofline_tokens_per_s(3350, 14_141_238_272) == pytest.approx(236.895, abs=1e-3)
    assert gpu.roofline_tokens_per_s(4800, 14_141_238_272) == pytest.approx(339.433, abs=1e-3)
    matmul = 28 * (2 * 12_845_056 + 2 * 1_835_008 + 3 * 67_895_296) + 544_997_376
    assert gpu.flops_per_token(TEXT_7B, 0) == 2 * matmul == 14_140_571_648
    assert gpu.flops_per_token(TEXT_7B, 100) == 2 * matmul + 4 * 28 * 100 * 3584
    assert gpu.mfu(989e12, 2.0, 989) == pytest.approx(0.5)
    assert gpu.sweep_flops(TEXT_7B, 2, 1, 3) == pytest.approx(gpu.flops_per_token(TEXT_7B, 0) +
                                                              gpu.flops_per_token(TEXT_7B, 1) +
                                                              3 * gpu.flops_per_token(TEXT_7B, 2))


def test_the_built_7b_model_has_the_counted_parameters():
    """The config the GPU benchmark builds, on the meta device (no memory): its parameters are
    what the arithmetic counts."""
    r = gpu.build_reasoner("monet", "7b", "meta")
    counted = gpu.counted_params(r)
    assert counted["read_per_token"] == gpu.text_params(gpu.text_config_dict(r))["read_per_token"] == 7_070_619_136
    assert 8.2e9 < counted["total"] < 8.4e9  # Qwen2.5-VL-7B: 8.29 B with the vision tower


@pytest.mark.parametrize("name,want", [("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
                                       ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
                                       ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
                                       ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"), ("NVIDIA L40S", "L40S"),
                                       ("NVIDIA L4", "L4"), ("NVIDIA A10", "A10"), ("Tesla T4", None)])
def test_card_table_lookup(name, want):
    got = gpu.card(name)
    assert (got or {}).get("card") == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_benchmark_refuses_without_cuda_and_records_why(tmp_path):
    with pytest.raises(gpu.NoCuda, match="no CUDA device"):
        gpu.main(SimpleNamespace(device="cuda", gpu_config="7b"))
    assert run.main(["--device", "cuda", "--out", str(tmp_path)]) == 1
    rec = json.loads((tmp_path / "gpu-cuda.json").read_text())
    assert rec["status"] == "not run" and "no CUDA device" in rec["reason"] and common.check_result(rec) == []
    assert gpu.report(rec)[0].startswith("Not run: --device cuda: no CUDA device")
    rec.update(status="run")  # a real GPU result is never replaced by a "not run" record
    (tmp_path / "gpu-cuda.json").write_text(json.dumps(rec))
    run.main(["--device", "cuda", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "gpu-cuda.json").read_text())["status"] == "run"


def test_gpu_report_says_what_each_figure_is():
    res = dict(status="run", config="7b", dtype="bfloat16", device_name="NVIDIA H100 80GB HBM3", git_commit="a" * 40,
               date="2026-12-01T00:00:00+00:00", card=gpu.card("NVIDIA H100 80GB HBM3"),
               decode=[dict(way="ours", tokens_per_s=120.0, roofline_fraction=0.5), dict(way="x", error="boom")],
               sweep=[dict(m=64, decode_tokens_per_s=4000.0, mfu=0.123)])
    lines = gpu.report(res)
    assert "3350 GB/s" in lines[0] and "aaaaaaaaaa" in lines[0]
    assert lines[1] == "ours: 120.0 tokens/s, 50% of the bandwidth roofline."
    assert lines[2].startswith("x: did not run (boom") and lines[3] == "sweep M=64: 4000 decode tokens/s, MFU 12.3%."


# ---------------------------------------------------------------- scaling fit, main-build parsing, charts

def test_scaling_fit_finds_a_linear_cost_and_its_knee():
    xs = [1, 2, 4, 8, 16, 32]
    f = bench_scaling.fit(xs, [0.1 + 0.01 * x for x in xs])  # fixed 100 ms + 10 ms per unit
    assert f["r2"] == pytest.approx(1.0) and f["slope_s"] == pytest.approx(0.01) and f["intercept_s"] == pytest.approx(0.1)
    # per unit: 110, 60, 35, 22.5, 16.25, 13.1 ms: within 25% of the lowest (13.1) from x = 16
    assert f["knee"] == 16 and f["marginal_s"] == pytest.approx([0.01] * 5)
    assert bench_scaling.fit([1], [1.0])["knee"] is None


def test_kv_cache_size_from_the_config(load):
    r = load("monet")
    c = r.model.config.text_config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert bench_scaling.kv_cache_mb(r, 3, 10) == pytest.approx(3 * 10 * per_token / 2**20)


BUILD_LOG = """[env] ready in 95.0 s
[build] 5 jobs, up to 2 at a time; each job's output in build/main/logs/
[job] testbed: started (1 thread, log build/main/logs/testbed.log)
[job] testbed: done in 30.5 s
[job] model base: started (2 threads, log build/main/logs/model-base.log)
[job] model base: done in 300.0 s
[job] chapter 01_testbed: started (1 thread, log build/main/logs/chapter-01_testbed.log)
[job] model monet-style: started (1 thread, log build/main/logs/model-monet-style.log)
[job] model direct: up to date
[job] chapter 01_testbed: done in 100.0 s
[job] model monet-style: done in 200.0 s
[job] html: started (1 thread, log build/main/logs/html.log)
[job] html: done in 40.0 s
[build] done in 700.0 s: 4 run, 1 up to date, 0 failed"""


def test_main_build_stages_are_read_from_the_build_output():
    times = [1, 96, 97, 98, 128, 129, 430, 431, 431, 432, 531, 632, 633, 673, 674]
    lines = list(zip(times, ["Collecting ..."] + BUILD_LOG.splitlines()))
    got = main_build.parse(lines, total=700.0)
    st = {s["stage"]: s for s in got["stages"]}
    assert st["environment"]["seconds"] == 95 and st["data (testbed)"]["seconds"] == 30.5
    assert st["model base"]["seconds"] == 300 and st["model base"]["start"] == 129
    assert st["model monet-style"]["seconds"] == 200 and "model direct" not in st  # up to date: not a stage
    assert st["chapter 01_testbed"]["start"] == 431 and st["chapter 01_testbed"]["kind"] == "chapter"
    assert st["book build (HTML)"]["seconds"] == 40.0 and got["total_s"] == 700.0
    assert got["totals"] == dict(data=30.5, model=500.0, chapter=100.0, book=40.0, build=700.0)
    assert [s["stage"] for s in got["stages"]][:3] == ["environment", "data (testbed)", "model base"]
    no_env = main_build.parse([(12.0, "[job] testbed: started"), (15.0, "[job] testbed: done in 3 s")], total=20.0)
    assert no_env["stages"][0] == dict(stage="environment", kind="environment", seconds=12.0, start=0.0)


def test_main_build_records_each_models_accuracy_and_compares_it_with_the_last_build(tmp_path):
    from latentmed.testbed import TestbedConfig

    def model(name, seconds, best, weights="h", folder="zoo", config=TestbedConfig()):
        d = tmp_path / "models" / folder / name
        d.mkdir(parents=True)
        info = dict(seconds=seconds, weights_hash=weights, stages=[dict(best_val=0.1), dict(best_val=best)],
                    settings=dict(val=100, testbed=config.to_dict()))
        (d / "zoo.json").write_text(json.dumps(info))

    model("base", 240.0, 0.825)
    model("direct", 50.0, 0.795)
    model("base", 9.0, 0.5, folder="small", config=TestbedConfig(n_val=8))  # 2 validation items a family
    (tmp_path / "models" / "zoo" / "_features").mkdir()
    recs = main_build.zoo_records(tmp_path / "models")
    assert recs["zoo/base"] == dict(seconds=240.0, best_val=0.825, n_val=400, weights_hash="h")  # the last stage's
    assert recs.pop("small/base")["n_val"] == 2 * len(TestbedConfig().families)  # as the zoo scored it
    assert set(recs) == {"zoo/base", "zoo/direct"}
    after = {"zoo/base": dict(recs["zoo/base"], best_val=0.80, weights_hash="x"),  # -0.025: inside +-0.037
             "zoo/direct": dict(recs["zoo/direct"], best_val=0.74),  # -0.055: a drop beyond the half-width
             "zoo/new": dict(recs["zoo/base"])}  # no earlier record: no row
    rows = {r["model"]: r for r in main_build.accuracy_table(recs, after)}
    assert set(rows) == {"zoo/base", "zoo/direct"}
    assert rows["zoo/base"]["half_width"] == pytest.approx(1.96 * (0.825 * 0.175 / 400) ** 0.5, abs=1e-4)
    assert rows["zoo/base"]["within"] and not rows["zoo/base"]["same_weights"]
    assert not rows["zoo/direct"]["within"] and rows["zoo/direct"]["same_weights"]
    assert rows["zoo/direct"]["change"] == pytest.approx(-0.055)
    assert all(r["within"] for r in main_build.accuracy_table(recs, recs))
    prev = tmp_path / "main-cpu.json"
    assert main_build.previous_build(prev) is None
    prev.write_text(json.dumps(dict(status="failed", zoo=recs)))
    assert main_build.previous_build(prev) is None  # a failed build is no baseline
    prev.write_text(json.dumps(dict(status="run", zoo=recs, build_commit="abc", date="d", cpu_model="X", total_s=60)))
    got = main_build.previous_build(prev)
    assert got["zoo"] == recs and got["build_commit"] == "abc" and got["cpu_model"] == "X"
    r = dict(zoo=after, accuracy=list(rows.values()), before=dict(got, zoo=None), cpu_model="X", total_s=60,
             build_commit="def")
    assert "1 model(s) dropped by more than the half-width: zoo/direct" in report.accuracy_text(r)
    assert "no model dropped" in report.accuracy_text(dict(r, accuracy=[rows["zoo/base"]]))
    assert "another CPU" in report.accuracy_text(dict(r, cpu_model="Y"))  # not the code's change
    assert len(report.accuracy_frame(r)) == 2 and len(report.accuracy_frame(dict(zoo=after))) == 3


def test_main_build_refuses_on_a_loaded_machine(monkeypatch):
    monkeypatch.setattr(common, "load_average", lambda: [99.0, 99.0, 99.0])
    args = SimpleNamespace(main_env="reuse", main_profile="ci", main_max_load=4.0)
    res = main_build.main(args)
    assert res["status"] == "not run" and "load average 99.0" in res["reason"] and common.check_result(res) == []


def test_chart_tables_carry_the_numbers_of_the_results():
    sweep = dict(model="m", device_name="cpu", rows=[dict(m=4, runs=8, shared_s=0.1, many_s=0.05, naive_s=0.8,
                                                         ratio_shared=8.0, ratio_many=16.0, ratio_shared_range=[7, 9],
                                                         ratio_many_range=[15, 17], outputs_equal=True)])
    df = charts.sweep_frame(sweep)
    assert df["ratio"].tolist() == [8.0, 16.0] and df["fast_ms_per_run"].tolist() == pytest.approx([12.5, 6.25])
    scaling = dict(model="m", device_name="cpu", axes=[dict(
        axis="k", points=[dict(x=2, runs=16, fast_s=0.2, fast_cpu_s=0.19, fast_ms_per_run=12.5, fast_peak_mb=3.0,
                               kv_cache_mb=1.0, naive_s=1.6, naive_cpu_s=1.5, naive_ms_per_run=100.0, naive_peak_mb=1.0)],
        fast_fit=bench_scaling.fit([2], [0.2]), naive_fit=bench_scaling.fit([2], [1.6]))])
    sf = charts.scaling_frame(scaling)
    assert set(sf["way"]) == set(charts.WAYS.values()) and sf["cpu_seconds"].tolist() == [0.19, 1.5]
    assert charts.memory_frame(scaling)["peak_mb"].tolist() == [3.0, 1.0, 1.0]
    assert set(charts.charts_of("scaling", scaling)) == {"scaling-time", "scaling-per-run", "scaling-memory"}
