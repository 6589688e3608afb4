"""(b) The study's own workload: chapter 4's (model x item x intervention) grid.

Fast: `analysis.study.run_latent_study` itself, one model at a time into a fresh results store
(clean runs, every latent condition in both forms: generate through `sweep_many`, replay through
`replay_many`; rows written to the store as the chapter writes them). The time spent inside
`sweep_many` and `replay_many` is recorded by wrapping them (nothing else changes).

Naive: the same grid with every run alone: each clean run and each (item, condition) decoded
with `generate`, each replay with `replay`, one at a time; the conditions are built from the
naive clean runs by the same `latent_conditions`, and the rows by the same `measure.outcome`.

Both give one row per (model, item, condition); they are compared (same chosen option, K,
trigger and non-finite flag; option log-probs and margin within 1e-4). The headline is
measurements per second of each and their ratio; a subset of the test split (`--study-items`
per family) is run, and the full grid's time is extrapolated from it.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

from . import common, workload
from .common import log


@contextlib.contextmanager
def instrument():
    """Accumulate the seconds spent in `measure`'s calls of sweep_many and replay_many."""
    from latentmed.analysis import measure as M

    spent = {"sweep_many": 0.0, "replay_many": 0.0}
    orig = {k: getattr(M, k) for k in spent}

    def wrap(name):
        def inner(*a, **kw):
            t0 = time.perf_counter()
            try:
                return orig[name](*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0
        return inner

    for k in spent:
        setattr(M, k, wrap(k))
    try:
        yield spent
    finally:
        for k, fn in orig.items():
            setattr(M, k, fn)


def fast_study(root: Path, qs: list, model: str, store_dir: Path, device: str = "cpu") -> tuple[list[dict], dict]:
    """`run_latent_study` on one model into `store_dir`: rows and the time split."""
    from latentmed.analysis import study

    with instrument() as spent, common.Clock(device) as c:
        df = study.run_latent_study(root, store_dir, qs, [model], seed=0, device=device)
    rows = df.to_dict("records")
    return rows, dict(total_s=c.wall, cpu_s=c.cpu, sweep_many_s=spent["sweep_many"], replay_many_s=spent["replay_many"],
                      other_s=c.wall - spent["sweep_many"] - spent["replay_many"])


def naive_study(root: Path, qs: list, model: str, device: str = "cpu") -> tuple[list[dict], dict]:
    """The same grid, every run alone (see the module docstring): rows and the time split."""
    from latentmed.analysis import conditions as C
    from latentmed.analysis.measure import FORMS, outcome
    from latentmed.engine.decode import generate
    from latentmed.engine.replay import replay

    t0, c0 = time.perf_counter(), time.process_time()
    r, cfg = workload.load(root, model, device)
    prompts = [r.prompt(q) for q in qs]
    answers = [p.query.answer for p in prompts]
    base = [dict(model=model, item=q.id, family=q.family) for q in qs]
    t1 = time.perf_counter()
    clean = [generate(r, p, [], cfg) for p in prompts]
    rows = [{**b, "condition": "clean", "form": "generate", **outcome(a, t)} for b, a, t in zip(base, answers, clean)]
    t2 = time.perf_counter()
    conds = C.latent_conditions(clean, [q.family for q in qs], FORMS, 0)
    gen_s = rep_s = 0.0
    for c in conds:
        t = time.perf_counter()
        for i, (p, b, a) in enumerate(zip(prompts, base, answers)):
            res = generate(r, p, c.make(i), cfg) if c.form == "generate" else replay(r, clean[i], c.make(i))
            rows.append({**b, "condition": c.key, "form": c.form, **outcome(a, res)})
        if c.form == "generate":
            gen_s += time.perf_counter() - t
        else:
            rep_s += time.perf_counter() - t
    total = time.perf_counter() - t0
    return rows, dict(total_s=total, cpu_s=time.process_time() - c0, load_s=t1 - t0, clean_s=t2 - t1, generate_s=gen_s, replay_s=rep_s)


def run_study(root: Path, qs: list, models: list[str], repeats: int = 2, device: str = "cpu",
              progress: bool = True) -> list[dict]:
    """Fast and naive, interleaved per model; one row per model."""
    out = []
    for m in models:
        fast_t, naive_t, fast_c, naive_c, fast_rows, naive_rows, splits = [], [], [], [], None, None, []
        for rep in range(repeats):
            tmp = Path(tempfile.mkdtemp(prefix="bench-study-"))
            try:
                fast_rows, split = fast_study(root, qs, m, tmp / "store", device)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            fast_t.append(split["total_s"])
            fast_c.append(split["cpu_s"])
            splits.append(split)
            naive_rows, nsplit = naive_study(root, qs, m, device)
            naive_t.append(nsplit["total_s"])
            naive_c.append(nsplit["cpu_s"])
        for row in fast_rows:
            row["model"] = m
        eq = common.compare_rows(fast_rows, naive_rows)
        n = len(fast_rows)
        best = min(range(repeats), key=lambda i: fast_t[i])
        row = dict(model=m, items=len(qs), measurements=n, fast=common.stats(fast_t, fast_c),
                   naive=common.stats(naive_t, naive_c), ratio_cpu=min(naive_c) / min(fast_c),
                   fast_split=splits[best], naive_split=nsplit,
                   fast_per_s=n / min(fast_t), naive_per_s=n / min(naive_t), ratio=min(naive_t) / min(fast_t),
                   ratio_range=[min(b / a for a, b in zip(fast_t, naive_t)), max(b / a for a, b in zip(fast_t, naive_t))],
                   equal=eq, outputs_equal=eq["equal"])
        out.append(row)
        if progress:
            log(f"study {m}: {n} measurements, run_latent_study {row['fast_per_s']:.1f}/s, naive "
                f"{row['naive_per_s']:.1f}/s: {row['ratio']:.1f}x (CPU time {row['ratio_cpu']:.1f}x; equal: {eq['equal']}, max diff "
                f"{eq['max_logprob_diff']:.1e})")
    return out


def main(args) -> dict:
    from latentmed.analysis import conditions as C

    root = workload.find_zoo(args.zoo)
    models = workload.latent_models(root) if not args.study_models else args.study_models
    qs = workload.queries(root, args.study_items)
    log(f"study: models {', '.join(models)}; {len(qs)} items; {len(C.latent_keys()) + 1} measurements per item")
    result = dict(benchmark="study", **common.provenance(args.device))
    rows = run_study(root, qs, models, args.study_repeats, args.device)
    n_fast = sum(x["measurements"] for x in rows)
    t_fast = sum(x["fast"]["best_s"] for x in rows)
    t_naive = sum(x["naive"]["best_s"] for x in rows)
    c_fast = sum(x["fast"]["cpu_best_s"] for x in rows)
    c_naive = sum(x["naive"]["cpu_best_s"] for x in rows)
    from latentmed.testbed import TestbedConfig
    from latentmed import zoo as Z

    config = TestbedConfig.from_dict(Z.read_info(root / "base")["settings"]["testbed"])
    full_items = sum(config.family_counts("test").values())
    per_item = len(C.latent_keys()) + 1
    full = len(models) * full_items * per_item
    result.update(zoo=workload.zoo_info(root), models=models,
                  setting=dict(items_per_family=args.study_items, items=[q.id for q in qs], forms=["generate", "replay"],
                               measurements_per_item=per_item, repeats=args.study_repeats, protocol="forced"),
                  rows=rows,
                  total=dict(measurements=n_fast, fast_s=t_fast, naive_s=t_naive, fast_per_s=n_fast / t_fast,
                             naive_per_s=n_fast / t_naive, ratio=t_naive / t_fast, fast_cpu_s=c_fast,
                             naive_cpu_s=c_naive, ratio_cpu=c_naive / c_fast),
                  full_grid=dict(models=len(models), items=full_items, measurements=full,
                                 fast_s_estimate=full / (n_fast / t_fast), naive_s_estimate=full / (n_fast / t_naive),
                                 fast_cpu_s_estimate=full / (n_fast / c_fast),
                                 naive_cpu_s_estimate=full / (n_fast / c_naive),
                                 note="extrapolated from the subset's measurements per second"),
                  outputs_equal=all(x["outputs_equal"] for x in rows))
    return common.finish(result)
