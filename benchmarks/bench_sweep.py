"""(a) Intervention sweep on a trained zoo model: shared work against the naive loop.

For M = 1, 4, 16, 64 interventions per instance (chapter 4's latent interventions, then seeded
noise variants), on a latent zoo model in the testbed layout under the forced protocol the study
runs (`zoo.evaluate.decode_config`), three ways, interleaved in every repeat:

* shared:  `shared_sweep` per instance (one prefill, branch at the segment, M rows together);
* many:    `sweep_many` over all instances at once (what the study calls: one batched prefill);
* naive:   `naive_sweep` per instance (every variant decoded alone with `generate`).

The headline is naive / shared and naive / many (best of the repeats) with the spread of the
per-repeat ratios; outputs of each fast way are checked against the naive one (same tokens and
segments, step log-probs within 1e-4). The image tower runs once per prompt in every way (the
engine caches a prompt's image features), so the ratios measure decoding work only.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from . import common, workload
from .common import log


def run_sweep(r, cfg, prompts: list, pools: list[list], ms=(1, 4, 16, 64), repeats: int = 3,
              device: str = "cpu", progress: bool = True) -> list[dict]:
    """The three ways at every M; one row per M."""
    from latentmed.engine.sweep import naive_sweep, shared_sweep, sweep_many

    rows = []
    for m in ms:
        vs = [pool[:m] for pool in pools]
        ways = {
            "shared": lambda: [shared_sweep(r, p, v, cfg) for p, v in zip(prompts, vs)],
            "many": lambda: sweep_many(r, prompts, vs, cfg),
            "naive": lambda: [naive_sweep(r, p, v, cfg) for p, v in zip(prompts, vs)],
        }
        t0 = time.perf_counter()
        res = common.interleaved(ways, repeats, device=device)
        out = res.pop("outputs")
        flat = {k: [t for per in v for t in per] for k, v in out.items()}
        eq_shared = common.compare_traces(flat["shared"], flat["naive"])
        eq_many = common.compare_traces(flat["many"], flat["naive"])
        n = len(prompts) * m
        row = dict(m=m, instances=len(prompts), runs=n, **{f"{k}_s": v["best_s"] for k, v in res.items() if k in ways},
                   timings={k: v for k, v in res.items() if k in ways},
                   ratio_shared=res["naive"]["best_s"] / res["shared"]["best_s"],
                   ratio_many=res["naive"]["best_s"] / res["many"]["best_s"],
                   ratio_shared_range=res["ratios"]["naive/shared"], ratio_many_range=res["ratios"]["naive/many"],
                   ratio_shared_cpu=res["naive"]["cpu_best_s"] / res["shared"]["cpu_best_s"],
                   ratio_many_cpu=res["naive"]["cpu_best_s"] / res["many"]["cpu_best_s"],
                   ratio_shared_cpu_range=res["cpu_ratios"]["naive/shared"],
                   ratio_many_cpu_range=res["cpu_ratios"]["naive/many"],
                   runs_per_s={k: n / res[k]["best_s"] for k in ways},
                   equal_shared=eq_shared, equal_many=eq_many, outputs_equal=eq_shared["equal"] and eq_many["equal"],
                   distinct_outputs=distinct(flat["naive"]))
        rows.append(row)
        if progress:
            log(f"sweep M={m:3d}: naive/shared {row['ratio_shared']:.1f}x (CPU time {row['ratio_shared_cpu']:.1f}x), "
                f"naive/many {row['ratio_many']:.1f}x (CPU time {row['ratio_many_cpu']:.1f}x) "
                f"(equal: {row['outputs_equal']}, {time.perf_counter() - t0:.0f} s)")
    return rows


def distinct(traces) -> int:
    """How many different outcomes the runs gave (tokens and last-step option log-probs to 3
    decimals): more than one means the interventions really changed something."""
    def key(t):
        lp = t.step_option_logprobs
        return tuple(t.generated_ids), () if lp is None or not len(lp) else tuple(round(float(x), 3) for x in lp[-1])
    return len({key(t) for t in traces})


def main(args) -> dict:
    root = workload.find_zoo(args.zoo)
    model = workload.pick_model(root, args.model)
    result = dict(benchmark="sweep", **common.provenance(args.device))
    log(f"sweep: {model} of {common.rel(root)}, instances {args.instances}, M {args.ms}")
    r, cfg = workload.load(root, model, args.device)
    qs = workload.interleave_families(workload.queries(root, max(1, -(-args.instances // 4))))[:args.instances]
    prompts = [r.prompt(q) for q in qs]
    from latentmed.analysis.measure import clean_runs

    clean = clean_runs(r, prompts, cfg)
    pools = workload.variant_pool(clean, [q.family for q in qs], max(args.ms))
    rows = run_sweep(r, cfg, prompts, pools, args.ms, args.repeats, args.device)
    result.update(zoo=workload.zoo_info(root), model=model,
                  setting=dict(protocol="forced", decode=asdict(cfg),
                               k=r.spec.k_target, instances=len(prompts), items=[q.id for q in qs],
                               prompt_tokens=[int(p.input_ids.shape[1]) for p in prompts], repeats=args.repeats,
                               interventions="chapter 4's generate-form conditions, then seeded noise variants"),
                  rows=rows, outputs_equal=all(x["outputs_equal"] for x in rows))
    return common.finish(result)
