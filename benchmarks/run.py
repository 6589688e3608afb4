"""Run the benchmarks and write their results to benchmarks/results/<name>-<device>.json.

    .venv/bin/python -m benchmarks                       # every CPU benchmark (tens of minutes on 2 cores)
    .venv/bin/python -m benchmarks --only sweep loop     # some of them
    .venv/bin/python -m benchmarks --quick               # small sizes: a check that everything runs
    .venv/bin/python -m benchmarks --main                # also the main command end to end (tens of minutes)
    .venv/bin/python -m benchmarks --device cuda --only gpu   # GPU figures (needs CUDA)

Benchmarks: engine (shared sweep and loop overhead on a random tiny model, bench_engine.py),
sweep (a), study (b), loop (c), train (d), scaling (curves and memory, with PNG plots), gpu (7B
config in bf16 on CUDA; refused without CUDA), main (the main command, opt-in with --main).
Headlines are ratios of two ways measured in the same run; outputs of both ways are checked
equal, and the command exits with status 1 when a check fails. Chapter 9 renders the files.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from . import common, gpu
from .common import log

CPU_BENCHMARKS = ("engine", "sweep", "study", "loop", "train", "scaling")
ALL = CPU_BENCHMARKS + ("gpu", "main")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=ALL, help="run only these benchmarks")
    ap.add_argument("--skip", nargs="+", choices=ALL, default=[], help="leave these out")
    ap.add_argument("--main", action="store_true",
                    help="also run the main command (scripts/build.sh) end to end in a temporary clone")
    ap.add_argument("--quick", action="store_true", help="small sizes and one repeat (checks that all runs)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    ap.add_argument("--zoo", default=None, help="zoo folder (default: models/zoo when trained, else a CI zoo)")
    ap.add_argument("--model", default=None, help="latent zoo model for sweep and scaling (default: monet-style)")
    ap.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats, best kept (default: 3)")
    g = ap.add_argument_group("sweep (a)")
    g.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16, 64], help="interventions per instance")
    g.add_argument("--instances", type=int, default=4, help="instances (default: 4, one per family)")
    g = ap.add_argument_group("study (b)")
    g.add_argument("--study-items", type=int, default=4, help="test items per family (default: 4)")
    g.add_argument("--study-models", nargs="+", default=None, help="models (default: every latent model)")
    g.add_argument("--study-repeats", type=int, default=2, help="repeats of both ways (default: 2)")
    g = ap.add_argument_group("loop (c)")
    g.add_argument("--gen-tokens", type=int, default=32, help="new tokens (default: 32)")
    g = ap.add_argument_group("train (d)")
    g.add_argument("--train-steps", type=int, default=24, help="timed steps per stage (default: 24)")
    g.add_argument("--train-warmup", type=int, default=4, help="untimed steps first (default: 4)")
    g.add_argument("--train-pool", type=int, default=32, help="bank items per family (default: 32)")
    g.add_argument("--train-methods", nargs="+", default=None, help="methods (default: every zoo method)")
    g = ap.add_argument_group("scaling")
    g.add_argument("--scaling-axes", nargs="+", choices=["instances", "interventions", "k"], default=None)
    g.add_argument("--scaling-repeats", type=int, default=2, help="repeats per point (default: 2)")
    g.add_argument("--naive-max", type=int, default=128, help="largest naive point in runs (default: 128)")
    g = ap.add_argument_group("gpu")
    g.add_argument("--gpu-tokens", type=int, default=128, help="decode tokens per timing (default: 128)")
    g.add_argument("--gpu-config", default="7b", help="7b (default) or a size of tiny.SIZES for a dry run")
    g = ap.add_argument_group("main (e)")
    g.add_argument("--main-env", choices=["fresh", "reuse"], default="fresh",
                   help="fresh: the clone installs its own .venv (timed); reuse: link this .venv")
    g.add_argument("--main-profile", choices=["default", "ci"], default="default")
    g.add_argument("--main-keep", default=None, metavar="DIR",
                   help="keep the build's clone, data, models and results in DIR (replaced) instead of deleting them")
    g.add_argument("--main-commit", default="HEAD", metavar="REV",
                   help="time the main command of this commit (default: HEAD), e.g. an earlier one for a "
                        "before figure on this machine; the next run compares its accuracies with it")
    g.add_argument("--main-max-load", type=float, default=4.0,
                   help="refuse (and record why) when the 1-minute load average is above this (default: 4)")
    args = ap.parse_args(argv)
    if args.quick:
        args.ms, args.instances, args.repeats = [1, 2], 2, 1
        args.study_items, args.study_repeats, args.gen_tokens = 1, 1, 8
        args.train_steps, args.train_warmup, args.train_pool = 3, 1, 4
        args.scaling_repeats, args.naive_max, args.gpu_tokens = 1, 8, 16
    return args


def selected(args) -> list[str]:
    names = list(args.only) if args.only else list(CPU_BENCHMARKS) + (["main"] if args.main else [])
    if args.device.startswith("cuda") and not args.only:
        names = ["gpu"]
    return [n for n in names if n not in args.skip]


def run_one(name: str, args) -> dict:
    if name == "engine":
        from . import bench_engine

        argv = ["--device", args.device, "--threads", str(args.threads), "--repeats", str(max(args.repeats, 3)),
                "--no-write"]
        if args.quick:
            argv += ["--interventions", "2", "--instances", "1", "--gen-tokens", "8", "--repeats", "1"]
        return bench_engine.main(argv)
    module = {"sweep": "bench_sweep", "study": "bench_study", "loop": "bench_loop", "train": "bench_train",
              "scaling": "bench_scaling", "gpu": "gpu", "main": "main_build"}[name]
    import importlib

    return importlib.import_module(f"benchmarks.{module}").main(args)


def record_not_run(reason: str, args) -> None:
    """gpu-cuda.json saying the GPU figures were not taken here (a real GPU result is kept)."""
    path = common.result_path("gpu", "cuda", args.out)
    if path.exists():
        import json

        if json.loads(path.read_text()).get("status") == "run":
            log(f"kept {common.rel(path)}: it holds figures from a GPU run")
            return
    common.write_result(gpu.not_run(reason), "gpu", "cuda", args.out)
    log(f"wrote {common.rel(path)} (status: not run)")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    names = selected(args)
    log(f"benchmarks: {', '.join(names)} on {args.device} ({common.cpu_model()}, {args.threads} thread(s), "
        f"load {common.load_average()})")
    failed, unequal = [], []
    for name in names:
        t0 = time.perf_counter()
        log(f"--- {name}")
        try:
            result = run_one(name, args)
        except gpu.NoCuda as exc:  # refused: say so, and record it unless a real GPU result is there
            log(f"{name}: REFUSED: {exc}")
            record_not_run(str(exc), args)
            failed.append(name)
            continue
        except Exception as exc:  # one benchmark failing must not lose the others' results
            traceback.print_exc()
            log(f"{name}: FAILED ({type(exc).__name__}: {exc})")
            failed.append(name)
            continue
        result["wall_s"] = time.perf_counter() - t0
        path = common.write_result(result, name, args.device, args.out)
        if name == "scaling" or name in ("sweep", "train", "main"):
            from . import charts

            for png in charts.save_pngs(name, result, path.parent):
                log(f"wrote {common.rel(png)}")
        log(f"{name}: wrote {common.rel(path)} in {result['wall_s']:.0f} s")
        if result.get("outputs_equal") is False:
            unequal.append(name)
        if result.get("status") == "failed":
            failed.append(name)
    if failed or unequal:
        log(f"FAILED: {', '.join(failed) or 'none'}; outputs differ: {', '.join(unequal) or 'none'}")
        return 1
    log("all done; chapter 9 (notebooks/09_performance.ipynb) renders the results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
