"""(d) Training throughput of every zoo method (samples per second), from the trained base.

Each stage of each method (`zoo.recipes.method_stages`, the default budget's plans) runs
`--train-steps` steps after `--train-warmup` untimed ones, inside the zoo's own `train_stage`
and resumable loop, with no validation and no checkpoint until the last step; the rate is read
from the loop's own per-step clock (curves.csv). The base's vision stage is timed the same way.
Banks of `--train-pool` items per family (tower tokens, computed once) stand in for the budget's
pool: a step's cost does not depend on the pool's size.

The rate is wall-clock; `cpu_samples_per_s` is the same from the process's CPU time over the
whole stage (warm-up and the final checkpoint included), which a loaded machine inflates less.
Per method, the rate of every stage and the estimate of its training time at the default budget
(steps / rate, per stage), and of its validation (one validation pass timed on a few items per
family, scaled to the budget's validation set, times the number of passes the loop makes) are
recorded beside the seconds its zoo.json records for the real training: what remains is
checkpoints, feature banks and the load of the machine when the zoo was trained.
"""

from __future__ import annotations

import copy
import csv
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from . import common, workload
from .common import log


def _rate(curves: Path, warmup: int, batch: int) -> tuple[float, float]:
    """(samples/s, seconds) of the steps after `warmup` from a stage's curves.csv."""
    with open(curves) as f:
        secs = [float(r["seconds"]) for r in csv.DictReader(f)]
    n = len(secs) - warmup
    dt = secs[-1] - secs[warmup - 1] if warmup else secs[-1]
    return n * batch / dt, dt


def stage_rates(root: Path, method: str, steps: int, warmup: int, pool: int, tmp: Path) -> list[dict]:
    """Samples/s of every stage of `method` (default-budget plans) from the trained base."""
    from latentmed.engine import checkpoint
    from latentmed.zoo.bank import build_bank
    from latentmed.zoo.predict import predict
    from latentmed.zoo.recipes import BUDGETS, SPECS, bank_kinds, method_stages
    from latentmed.zoo.stages import train_stage
    from latentmed.testbed import TestbedConfig
    from latentmed import zoo as Z

    config = TestbedConfig.from_dict(Z.read_info(root / "base")["settings"]["testbed"])
    x = checkpoint.load(root / "base")
    model, tok = x.model, x.tokenizer
    stages = method_stages(method, "default")
    kinds = bank_kinds(method, "default")
    bank = build_bank(model, config, "train", pool, kinds=tuple(kinds), cache_dir=tmp / "_features", progress=False)
    val = build_bank(model, config, "val", min(pool, config.n_val // len(config.families)), kinds=tuple(kinds),
                     cache_dir=tmp / "_features", progress=False)
    budget = BUDGETS["default"]
    val_items = len(config.families) * min(budget["val"], config.n_val // len(config.families))
    constant = None
    if SPECS[method].latent_source == "constant":
        g = torch.Generator().manual_seed(7)
        constant = torch.randn(SPECS[method].n_latents, model.config.text_config.hidden_size, generator=g)
        constant = constant / constant.norm(dim=-1, keepdim=True)
    done, rows = {}, []
    for st in stages:
        cfg = replace(st.cfg, steps=warmup + steps, eval_every=10**9, save_every=10**9, keep_best=False,
                      warmup=min(st.cfg.warmup, warmup + steps))
        teacher = done.get(st.teacher) if st.teacher else None
        tplan = next((s.plan for s in stages if s.cfg.name == st.teacher), None) if st.teacher else None
        run = tmp / f"{method}-{st.cfg.name}"
        with common.Clock() as c:
            train_stage(model, tok, st.plan, bank, None, cfg, run, teacher=teacher, teacher_plan=tplan,
                        constant=constant, progress=False)
        rate, dt = _rate(run / "curves.csv", warmup, cfg.batch_size)
        with torch.no_grad(), common.Clock() as ev:  # one validation pass, as run_loop's eval_fn runs it
            predict(model, tok, val, st.plan, constant=constant)
        evals = -(-st.cfg.steps // st.cfg.eval_every)  # every eval_every steps and at the end
        eval_s = ev.wall * val_items / len(val)
        rows.append(dict(stage=st.cfg.name, samples_per_s=rate, steps_timed=steps, seconds_timed=dt,
                         cpu_samples_per_s=cfg.steps * cfg.batch_size / c.cpu, eval_items_timed=len(val),
                         eval_s_at_budget=eval_s, evals_at_budget=evals, est_eval_s=evals * eval_s,
                         batch=cfg.batch_size, budget_steps=st.cfg.steps, teacher=st.teacher,
                         est_budget_s=st.cfg.steps * cfg.batch_size / rate))
        if any(s.teacher == st.cfg.name for s in stages):
            frozen = copy.deepcopy(model).eval()
            for p in frozen.parameters():
                p.requires_grad_(False)
            done[st.cfg.name] = frozen
        shutil.rmtree(run, ignore_errors=True)
    return rows


def vision_rate(root: Path, steps: int, warmup: int, tmp: Path) -> dict:
    """Samples/s of the base's vision stage (scenes drawn on the fly, tower + heads trained)."""
    from latentmed.engine import checkpoint
    from latentmed.zoo.loop import StageConfig
    from latentmed.zoo.recipes import BUDGETS
    from latentmed.zoo.stages import vision_stage
    from latentmed.testbed import TestbedConfig
    from latentmed import zoo as Z

    config = TestbedConfig.from_dict(Z.read_info(root / "base")["settings"]["testbed"])
    model = checkpoint.load(root / "base").model
    cfg = StageConfig("vision", warmup + steps, batch_size=16, lr=3e-3, warmup=5, eval_every=10**9, save_every=10**9,
                      keep_best=False)
    with common.Clock() as c:
        vision_stage(model, config, cfg, tmp / "vision", progress=False)
    rate, dt = _rate(tmp / "vision" / "curves.csv", warmup, cfg.batch_size)
    budget = BUDGETS["default"]["vision"]
    return dict(stage="vision", samples_per_s=rate, steps_timed=steps, seconds_timed=dt, batch=16,
                cpu_samples_per_s=cfg.steps * 16 / c.cpu,
                budget_steps=budget, teacher=None, est_budget_s=budget * 16 / rate)


def main(args) -> dict:
    from latentmed.zoo import METHODS

    root = workload.find_zoo(args.zoo)
    info = workload.zoo_info(root)
    methods = args.train_methods or list(METHODS)
    result = dict(benchmark="train", **common.provenance(args.device))
    log(f"train: {len(methods)} methods from the base of {common.rel(root)}, {args.train_steps} timed steps per stage "
        f"after {args.train_warmup}")
    out = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        for m in methods:
            stages = ([vision_rate(root, args.train_steps, args.train_warmup, tmp)] if m == "base" else []) + \
                stage_rates(root, m, args.train_steps, args.train_warmup, args.train_pool, tmp)
            samples = sum(s["steps_timed"] * s["batch"] for s in stages)
            secs = sum(s["seconds_timed"] for s in stages)
            est = sum(s["est_budget_s"] for s in stages)
            est_eval = sum(s.get("est_eval_s", 0.0) for s in stages)
            rec = info["models"].get(m, {}).get("seconds") if info["budget"] == "default" else None
            cpu_rate = sum(s["steps_timed"] for s in stages) / sum(s["steps_timed"] / s["cpu_samples_per_s"] for s in stages)
            out.append(dict(method=m, samples_per_s=samples / secs, cpu_samples_per_s=cpu_rate, stages=stages,
                            est_budget_s=est, est_eval_s=est_eval,
                            recorded_s=rec, loop_share=est / rec if rec else None,
                            eval_share=est_eval / rec if rec else None))
            per = " | ".join(f"{s['stage']} {s['samples_per_s']:.0f}" for s in stages)
            log(f"train {m}: {samples / secs:.1f} samples/s ({per}); default budget about {est:.0f} s of steps and "
                f"{est_eval:.0f} s of validation" + (f", zoo.json records {rec:.0f} s" if rec else ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.update(zoo=info, setting=dict(steps=args.train_steps, warmup=args.train_warmup, pool_per_family=args.train_pool,
                                         plans="default budget", validation=False),
                  rows=out, outputs_equal=None)
    return common.finish(result)
