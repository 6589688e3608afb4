"""(e) The main command end to end, stage by stage, from empty data and model folders.

`python -m benchmarks --main` clones the repository's HEAD into a temporary folder, points
LATENTMED_DATA / MODELS / RESULTS at empty temporary folders and runs `bash scripts/build.sh`
there (`--main-env fresh`: the clone installs its own .venv, as on a new machine, and that time
is the environment stage; `reuse`: this checkout's .venv runs the clone's code through
PYTHONPATH, and the environment stage is only the check). Every line the build prints is
timestamped as it arrives; the stages are read from them:

    environment   "[env] ready in N s" (else: until the build's first own line)
    each job      from its "[job] NAME: started" line, "[job] NAME: done in N s" (the build runs
                  jobs side by side: each stage has its start, and their seconds add up to more
                  than the wall time); the data, each model, the feature banks, each chapter, the HTML
    the build     "[build] done in N s"

It takes tens of minutes on 2 cores; when the 1-minute load average is above `--main-max-load`
the run is refused and the result says why (a build timed under another job's load is noise).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from statsmodels.stats.proportion import proportion_confint

from . import common
from .common import ROOT, log

ENV = re.compile(r"^\[env\] ready in ([0-9.]+) s")
JOB = re.compile(r"^\[job\] (.+?): (started|done in ([0-9.]+) s)")
BUILD = re.compile(r"^\[build\] done in ([0-9.]+) s")


def stage_of(job: str) -> tuple[str, str]:
    """(stage name, kind) of a build job's name."""
    if job == "testbed":
        return "data (testbed)", "data"
    if job == "banks":
        return "feature banks", "model"
    if job == "html":
        return "book build (HTML)", "book"
    return job, job.split(" ", 1)[0]  # "model X" / "chapter X"


def parse(lines: list[tuple[float, str]], total: float) -> dict:
    """Stages from (seconds since start, line) pairs of a build's output (see the module docstring)."""
    env = next((float(m.group(1)) for _, ln in lines if (m := ENV.match(ln.strip()))), None)
    first_own = next((t for t, ln in lines if ln.startswith("[") and not ln.startswith("[env]")), None)
    started, stages, build = {}, [], None
    for t, ln in lines:
        ln = ln.strip()
        if m := JOB.match(ln):
            if m.group(2) == "started":
                started[m.group(1)] = t
            else:
                name, kind = stage_of(m.group(1))
                secs = float(m.group(3))
                start = round(started.get(m.group(1), t - secs), 1)
                stages.append(dict(stage=name, kind=kind, seconds=secs, start=start))
        elif m := BUILD.match(ln):
            build = float(m.group(1))
    stages.sort(key=lambda s: s["start"])
    env_s = env if env is not None else (first_own if first_own is not None else 0.0)
    stages.insert(0, dict(stage="environment", kind="environment", seconds=env_s, start=0.0))
    totals = {kind: round(sum(s["seconds"] for s in stages if s["kind"] == kind), 1)
              for kind in ("data", "model", "chapter", "book")}
    if build is not None:
        totals["build"] = build
    return dict(stages=stages, totals=totals, total_s=total)


def zoo_records(models_dir: Path) -> dict:
    """What each model's zoo.json records of its training: seconds, the validation accuracy it was
    kept at (its last stage's best), the validation items behind it and its weights' hash."""
    from latentmed.testbed import TestbedConfig
    from latentmed.zoo.build import val_per_family

    out = {}
    for f in sorted(Path(models_dir).rglob("zoo.json")):
        try:
            info = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(info, dict) or "seconds" not in info:
            continue
        last = (info.get("stages") or [{}])[-1]
        s = info.get("settings", {})
        config = TestbedConfig.from_dict(s["testbed"]) if "testbed" in s else None
        n_val = val_per_family(s.get("val", 0), config) * len(config.families) if config else 0
        out[str(f.parent.relative_to(models_dir))] = dict(
            seconds=info["seconds"], best_val=last.get("best_val"), n_val=n_val or None,
            weights_hash=info.get("weights_hash"))
    return out


def accuracy_table(before: dict | None, after: dict) -> list[dict]:
    """Each model's validation accuracy in two builds' `zoo` records, the change and the 95% interval
    half-width of the earlier accuracy (normal approximation, n validation items); `within` says
    whether the change is no drop larger than that half-width (issue 21's condition)."""
    rows = []
    for name, a in sorted(after.items()):
        b = (before or {}).get(name)
        if not b or b.get("best_val") is None or a.get("best_val") is None:
            continue
        p, n = b["best_val"], b.get("n_val") or 0
        lo, hi = proportion_confint(round(p * n), n, alpha=0.05, method="normal") if n else (math.nan, math.nan)
        half = (hi - lo) / 2
        change = a["best_val"] - p
        rows.append(dict(model=name, before=p, after=a["best_val"], change=round(change, 4), n=n,
                         half_width=round(half, 4), within=bool(change >= -half),
                         same_weights=a.get("weights_hash") == b.get("weights_hash")))
    return rows


def previous_build(path: Path) -> dict | None:
    """What the last completed timed build in `path` recorded (the baseline of the next one): its
    commit, date, CPU, total and per-kind seconds and zoo records; None without one."""
    try:
        prev = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(prev, dict) or prev.get("status") != "run" or not isinstance(prev.get("zoo"), dict):
        return None
    keys = ("build_commit", "date", "cpu_model", "total_s", "totals", "zoo")
    return {k: prev.get(k) for k in keys}


def run_build(repo: Path, env: dict, args: list[str], log_file: Path) -> tuple[int, list[tuple[float, str]], float]:
    """`bash scripts/build.sh ARGS` in `repo`; every output line with the seconds since start."""
    t0 = time.perf_counter()
    lines = []
    with open(log_file, "w") as f:
        proc = subprocess.Popen(["bash", "scripts/build.sh", *args], cwd=repo, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for ln in proc.stdout:
            t = time.perf_counter() - t0
            lines.append((t, ln.rstrip("\n")))
            f.write(f"{t:9.1f} {ln}")
            if ln.startswith("["):
                log(f"main +{t:6.0f} s: {ln.rstrip()}")
        rc = proc.wait()
    return rc, lines, time.perf_counter() - t0


def main(args) -> dict:
    result = dict(benchmark="main", **common.provenance("cpu"), env_mode=args.main_env, profile=args.main_profile)
    load1 = (common.load_average() or [0.0])[0]
    if load1 > args.main_max_load:
        log(f"main: not run: load average {load1} > {args.main_max_load}")
        result.update(status="not run", reason=f"1-minute load average {load1} above --main-max-load "
                      f"{args.main_max_load} on {os.cpu_count()} cores: other jobs would dominate the timing",
                      stages=[], outputs_equal=None)
        return common.finish(result)
    prev = previous_build(common.result_path("main", "cpu", getattr(args, "out", None)))
    tmp = Path(tempfile.mkdtemp(prefix="latentmed-main-"))
    keep_log = ROOT / "build" / "bench" / "main-build.log"
    keep_log.parent.mkdir(parents=True, exist_ok=True)
    try:
        repo = tmp / "repo"
        subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(repo)], check=True)
        rev = getattr(args, "main_commit", "HEAD") or "HEAD"
        subprocess.run(["git", "checkout", "--quiet", "--detach", rev], cwd=repo, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTMED_")}
        env.update(LATENTMED_DATA=str(tmp / "data"), LATENTMED_MODELS=str(tmp / "models"),
                   LATENTMED_RESULTS=str(tmp / "results"), PYTHONUNBUFFERED="1")
        if args.main_env == "reuse":
            (repo / ".venv").symlink_to(ROOT / ".venv")
            env["PYTHONPATH"] = str(repo / "lib")
        log(f"main: bash scripts/build.sh in a clone of {commit[:10]} ({args.main_env} environment, "
            f"{args.main_profile} profile), data and models in empty temporary folders")
        import resource

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        rc, lines, total = run_build(repo, env, ["--profile", args.main_profile], tmp / "build.log")
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        shutil.copy(tmp / "build.log", keep_log)
        parsed = parse(lines, total)
        result.update(status="run" if rc == 0 else "failed", exit_code=rc, build_commit=commit, **parsed,
                      zoo=zoo_records(tmp / "models"), log=common.rel(keep_log),
                      log_tail=[ln for _, ln in lines[-40:]] if rc else [], outputs_equal=None)
        if prev:
            result.update(before={k: v for k, v in prev.items() if k != "zoo"},
                          accuracy=accuracy_table(prev["zoo"], result["zoo"]))
        log(f"main: exit {rc} after {total / 60:.1f} min")
    finally:
        keep = getattr(args, "main_keep", None)
        if keep:  # the built book, zoo and results, for a look at what the timed build produced
            shutil.rmtree(keep, ignore_errors=True)
            shutil.move(str(tmp), keep)
            log(f"main: kept the build in {keep}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return common.finish(result)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as: .venv/bin/python -m benchmarks --only main")
