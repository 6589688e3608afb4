"""Scaling curves: cost of the shared-work sweep and of the naive loop as the number of instances,
of interventions per instance and of latent steps K grow (K set by `ChangeK`).

Three axes, each from a trained latent zoo model under the forced protocol:

* instances N (M = 16 interventions each): `sweep_many` (one batched prefill per chunk of 16
  instances, every row decoded together) against every run alone;
* interventions per instance M (one instance): `shared_sweep` against `naive_sweep`;
* latent steps K (one instance, M = 16: `ChangeK(K)` with a latent edit each): the same two.

Per point: best wall and CPU time of `--scaling-repeats` (the process's CPU time: one thread, so
it is the work done, and other jobs on a shared machine inflate it far less than wall time; the
curves and fits use it), CPU time per measurement, the peak memory the call
added (RSS sampled every 2 ms by a thread, on CPU; the allocator's peak on CUDA) and the KV
cache the rows hold at the end (computed from the shapes). The naive loop is measured up to
`--naive-max` runs per point (beyond that it is linear by construction and is not run). Per
axis and way: a least-squares line through the CPU times (slope, intercept, R^2), the marginal
cost between points, and the knee: the smallest x whose time per measurement is within 25% of
the lowest one measured (past it, adding work no longer amortises the fixed costs).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import torch

from . import common, workload
from .common import log

AXES = dict(instances=(1, 2, 4, 8, 16, 32), interventions=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            k=(1, 2, 4, 8, 16, 32, 64))
QUICK = dict(instances=(1, 2, 4), interventions=(1, 2, 4, 8), k=(1, 2, 4))


class PeakMemory:
    """Peak memory added while inside: RSS sampled by a thread (CPU) or the CUDA allocator's peak."""

    def __init__(self, device: str = "cpu", every: float = 0.002):
        self.device, self.every, self.peak_mb = device, every, 0.0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return self
        self.base = common.current_rss_mb()
        self.top, self.stop = self.base, threading.Event()

        def sample():
            while not self.stop.is_set():
                self.top = max(self.top, common.current_rss_mb())
                time.sleep(self.every)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20 - self.base
            return False
        self.top = max(self.top, common.current_rss_mb())
        self.stop.set()
        self.thread.join()
        self.peak_mb = self.top - self.base
        return False


def kv_cache_mb(r, rows: int, seq_len: int) -> float:
    """Size of the KV cache of `rows` sequences of `seq_len` (keys and values of every layer)."""
    c = r.model.config.text_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * torch.finfo(r.dtype).bits // 8
    return rows * seq_len * per_token / 2**20


def trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so that RSS growth shows new allocations."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_point(fn, repeats: int, device: str) -> dict:
    """Peak memory of a first (warm-up) call, then the best time of `repeats` calls."""
    import gc

    gc.collect()
    trim()
    with PeakMemory(device) as pm:
        fn()
    st, out = common.timed(fn, repeats, warmup=0, device=device)
    return dict(time=st, peak_mb=pm.peak_mb, output=out)


def fit(xs, ts) -> dict:
    """Least-squares line t = a + b x, its R^2, marginal costs and the knee of t / x."""
    x, t = np.asarray(xs, float), np.asarray(ts, float)
    if len(x) < 2:
        return dict(slope_s=None, intercept_s=None, r2=None, marginal_s=[], knee=None)
    b, a = np.polyfit(x, t, 1)
    pred = a + b * x
    ss = float(((t - t.mean()) ** 2).sum())
    r2 = 1 - float(((t - pred) ** 2).sum()) / ss if ss > 0 else 1.0
    per = t / x
    knee = next(int(xi) for xi, p in zip(x, per) if p <= 1.25 * per.min())
    marginal = [float((t[i + 1] - t[i]) / (x[i + 1] - x[i])) for i in range(len(x) - 1)]
    return dict(slope_s=float(b), intercept_s=float(a), r2=r2, marginal_s=marginal, knee=knee)


def run_axis(axis: str, xs, r, cfg, prompts, pools, repeats: int, naive_max: int, device: str) -> dict:
    from latentmed.engine import interventions as I
    from latentmed.engine.sweep import naive_sweep, shared_sweep, sweep_many

    points = []
    for x in xs:
        if axis == "instances":
            ps, vs, c = prompts[:x], [p[:16] for p in pools[:x]], cfg
            fast = lambda: sweep_many(r, ps, vs, c)  # noqa: E731
            slow = lambda: [naive_sweep(r, p, v, c) for p, v in zip(ps, vs)]  # noqa: E731
            runs, rows = x * 16, x * 16
        else:
            p = prompts[0]
            if axis == "interventions":
                v, c = pools[0][:x], cfg
            else:  # K: ChangeK(x) with one latent edit per variant
                edits = [[I.ZeroLatent()]] + [[I.NoiseLatent(scale=s, mode=m, seed=j)]
                                               for j, (s, m) in enumerate([(s, m) for m in ("replace", "add")
                                                                           for s in (0.1, 0.3, 1.0, 3.0, 10.0)] * 2)]
                v = [[I.ChangeK(k=x)] + e for e in edits[:16]]
                c = replace(cfg, max_new_tokens=x + 2 + len(p.after_segment_ids or []) + 2)
            fast = lambda: shared_sweep(r, p, v, c)  # noqa: E731
            slow = lambda: naive_sweep(r, p, v, c)  # noqa: E731
            runs, rows = len(v), len(v)
        f = measure_point(fast, repeats, device)
        point = dict(x=x, runs=runs, **_way("fast", f, runs))
        traces = f["output"] if axis != "instances" else [t for per in f["output"] for t in per]
        seq = max(len(t.prompt_ids) + len(t.generated_ids) for t in traces)
        point["kv_cache_mb"] = kv_cache_mb(r, rows, seq)
        point["generated_tokens"] = int(np.mean([len(t.generated_ids) for t in traces]))
        if runs <= naive_max:
            s = measure_point(slow, max(1, repeats - 1), device)
            slow_traces = s["output"] if axis != "instances" else [t for per in s["output"] for t in per]
            eq = common.compare_traces(traces, slow_traces)
            point.update(**_way("naive", s, runs), ratio=s["time"]["best_s"] / f["time"]["best_s"],
                         ratio_cpu=s["time"]["cpu_best_s"] / f["time"]["cpu_best_s"],
                         outputs_equal=eq["equal"], tokens_equal=eq["tokens_equal"], max_logprob_diff=eq["max_logprob_diff"])
        points.append(point)
        log(f"scaling {axis}={x}: fast {point['fast_ms_per_run']:.1f} CPU ms/run, peak +{point['fast_peak_mb']:.0f} MB"
            + (f", naive {point['naive_ms_per_run']:.1f} CPU ms/run ({point['ratio_cpu']:.1f}x CPU, "
               f"{point['ratio']:.1f}x wall; equal {point['outputs_equal']})" if "naive_s" in point else ", naive not run"))
    naive = [p for p in points if "naive_s" in p]
    return dict(axis=axis, points=points,
                fast_fit=fit([p["x"] for p in points], [p["fast_cpu_s"] for p in points]),
                naive_fit=fit([p["x"] for p in naive], [p["naive_cpu_s"] for p in naive]),
                fast_wall_fit=fit([p["x"] for p in points], [p["fast_s"] for p in points]),
                naive_wall_fit=fit([p["x"] for p in naive], [p["naive_s"] for p in naive]))


def _way(name: str, m: dict, runs: int) -> dict:
    """A way's fields at one point: wall and CPU seconds (best), spread, per run (CPU), peak memory."""
    t = m["time"]
    return {f"{name}_s": t["best_s"], f"{name}_cpu_s": t["cpu_best_s"], f"{name}_spread": t["spread"],
            f"{name}_ms_per_run": 1000 * t["cpu_best_s"] / runs, f"{name}_wall_ms_per_run": 1000 * t["best_s"] / runs,
            f"{name}_peak_mb": m["peak_mb"]}


def main(args) -> dict:
    from latentmed.analysis.measure import clean_runs

    root = workload.find_zoo(args.zoo)
    model = workload.pick_model(root, args.model)
    axes = QUICK if args.quick else AXES
    if args.scaling_axes:
        axes = {k: v for k, v in axes.items() if k in args.scaling_axes}
    result = dict(benchmark="scaling", **common.provenance(args.device))
    r, cfg = workload.load(root, model, args.device)
    n_inst = max(axes.get("instances", (1,)))
    qs = workload.interleave_families(workload.queries(root, max(1, -(-n_inst // 4))))[:n_inst]
    prompts = [r.prompt(q) for q in qs]
    clean = clean_runs(r, prompts, cfg)
    pools = workload.variant_pool(clean, [q.family for q in qs], max(max(axes.get("interventions", (16,))), 16))
    log(f"scaling: {model} of {common.rel(root)}; axes {', '.join(f'{k} {list(v)}' for k, v in axes.items())}")
    out = [run_axis(a, xs, r, cfg, prompts, pools, args.scaling_repeats, args.naive_max, args.device)
           for a, xs in axes.items()]
    equal = [p["outputs_equal"] for ax in out for p in ax["points"] if "outputs_equal" in p]
    result.update(zoo=workload.zoo_info(root), model=model,
                  setting=dict(protocol="forced", k_default=r.spec.k_target, repeats=args.scaling_repeats,
                               naive_max_runs=args.naive_max, m_for_instances=16, m_for_k=16,
                               memory="peak RSS added during one call, sampled every 2 ms" if args.device == "cpu"
                               else "CUDA allocator peak added during one call"),
                  axes=out, outputs_equal=all(equal) if equal else None)
    return common.finish(result)
