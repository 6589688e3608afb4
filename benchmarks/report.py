"""What chapter 9 says about the result files: provenance, tables and generated sentences."""

from __future__ import annotations

import pandas as pd

ORDER = ("engine", "sweep", "study", "loop", "train", "scaling", "main", "gpu")
COMMANDS = {n: f".venv/bin/python -m benchmarks --only {n}" for n in ORDER}
COMMANDS["main"] = ".venv/bin/python -m benchmarks --only main"
COMMANDS["gpu"] = ".venv/bin/python -m benchmarks --device cuda --only gpu"


def latest(results: dict[str, dict], name: str, device: str = "cpu") -> dict | None:
    """The result of benchmark `name` on `device` (file <name>-<device>.json), if any."""
    return results.get(f"{name}-{device}")


def caption(r: dict) -> str:
    """Where and when a figure was taken (device, threads, load, date, commit)."""
    dirty = " with uncommitted changes" if r.get("git_dirty") else ""
    load = r.get("load_before") or []
    return (f"Taken on {r['device_name']} ({r['device']}, {r['threads']} thread(s) of {r.get('cpu_count', '?')} "
            f"cores, load average {load[0] if load else '?'} at the start), torch {r['torch']}, transformers "
            f"{r['transformers']}, on {r['date'][:10]} at commit `{r['git_commit'][:10]}`{dirty}.")


def provenance_frame(results: dict[str, dict]) -> pd.DataFrame:
    rows = []
    name = lambda stem: stem.rsplit("-", 1)[0]  # noqa: E731  <benchmark>-<device>
    for stem, r in sorted(results.items(), key=lambda kv: (ORDER.index(name(kv[0])) if name(kv[0]) in ORDER else 99,
                                                           kv[0])):
        rows.append(dict(file=f"{stem}.json", benchmark=name(stem), device=r["device_name"],
                         threads=r["threads"], load_start=(r.get("load_before") or [None])[0],
                         load_end=(r.get("load_after") or [None])[0], date=r["date"][:10], commit=r["git_commit"][:10],
                         uncommitted=bool(r.get("git_dirty")), status=r.get("status", "run"),
                         outputs_equal=r.get("outputs_equal")))
    return pd.DataFrame(rows)


def missing(name: str) -> str:
    return f"No result file for this benchmark yet: `{COMMANDS[name]}` writes it."


# ---------------------------------------------------------------- tables

def sweep_table(r: dict) -> pd.DataFrame:
    return pd.DataFrame([dict(M=x["m"], runs=x["runs"], naive_ms_per_run=1000 * x["naive_s"] / x["runs"],
                              shared_ms_per_run=1000 * x["shared_s"] / x["runs"],
                              many_ms_per_run=1000 * x["many_s"] / x["runs"],
                              naive_over_shared=x["ratio_shared"],
                              shared_range=f"{x['ratio_shared_range'][0]:.1f}-{x['ratio_shared_range'][1]:.1f}",
                              naive_over_many=x["ratio_many"],
                              many_range=f"{x['ratio_many_range'][0]:.1f}-{x['ratio_many_range'][1]:.1f}",
                              cpu_naive_over_shared=x.get("ratio_shared_cpu"), cpu_naive_over_many=x.get("ratio_many_cpu"),
                              max_logprob_diff=max(x["equal_shared"]["max_logprob_diff"],
                                                   x["equal_many"]["max_logprob_diff"]),
                              outputs_equal=x["outputs_equal"]) for x in r["rows"]])


def study_table(r: dict) -> pd.DataFrame:
    return pd.DataFrame([dict(model=x["model"], measurements=x["measurements"], study_per_s=x["fast_per_s"],
                              naive_per_s=x["naive_per_s"], ratio=x["ratio"], cpu_ratio=x.get("ratio_cpu"),
                              ratio_range=f"{x['ratio_range'][0]:.1f}-{x['ratio_range'][1]:.1f}",
                              in_sweep_many_s=x["fast_split"]["sweep_many_s"],
                              in_replay_many_s=x["fast_split"]["replay_many_s"], other_s=x["fast_split"]["other_s"],
                              naive_generate_s=x["naive_split"]["generate_s"] + x["naive_split"]["clean_s"],
                              naive_replay_s=x["naive_split"]["replay_s"],
                              max_logprob_diff=x["equal"]["max_logprob_diff"], outputs_equal=x["outputs_equal"])
                         for x in r["rows"]])


def loop_table(loop: dict | None, engine: dict | None) -> pd.DataFrame:
    rows = []
    if loop:
        rows.append(dict(model=f"zoo {loop['model']} (trained)", prompt_tokens=loop["prompt_tokens"],
                         new_tokens=loop["new_tokens"], ours_ms=1000 * loop["ours"]["best_s"],
                         hf_generate_ms=1000 * loop["hf_generate"]["best_s"], ours_over_hf=loop["ratio"],
                         cpu_ours_over_hf=loop.get("ratio_cpu"),
                         range=f"{loop['ratio_range'][0]:.2f}-{loop['ratio_range'][1]:.2f}",
                         tokens_equal=loop["tokens_equal"]))
    if engine:
        o = engine["loop_overhead"]
        rows.append(dict(model=engine["model"], prompt_tokens=o["setting"]["prompt_tokens"],
                         new_tokens=o["setting"]["new_tokens"], ours_ms=1000 * o["ours_s"],
                         hf_generate_ms=1000 * o["hf_generate_s"], ours_over_hf=o["ratio"], range="(median of repeats)",
                         tokens_equal=o["tokens_equal"]))
    return pd.DataFrame(rows)


def train_table(r: dict) -> pd.DataFrame:
    return pd.DataFrame([dict(method=m["method"], samples_per_s=m["samples_per_s"],
                              cpu_samples_per_s=m.get("cpu_samples_per_s"),
                              stages=" | ".join(f"{s['stage']} {s['samples_per_s']:.0f}" for s in m["stages"]),
                              steps_at_default_budget=sum(s["budget_steps"] for s in m["stages"]),
                              est_step_seconds=m["est_budget_s"], est_validation_seconds=m.get("est_eval_s"),
                              recorded_seconds=m["recorded_s"],
                              steps_share_of_recorded=m["loop_share"]) for m in r["rows"]])


def main_table(r: dict) -> pd.DataFrame:
    df = pd.DataFrame(r.get("stages", []))
    if len(df):
        df = df.assign(minutes=df["seconds"] / 60, share=df["seconds"] / r["total_s"])
    return df


def accuracy_frame(r: dict) -> pd.DataFrame:
    """Each model's validation accuracy in this timed build against the build timed before it
    (`accuracy`), or this build's alone when there is no earlier record."""
    if r.get("accuracy"):
        return pd.DataFrame(r["accuracy"])
    return pd.DataFrame([dict(model=k, accuracy=v.get("best_val"), n=v.get("n_val"), seconds=v.get("seconds"))
                         for k, v in sorted((r.get("zoo") or {}).items())])


def accuracy_text(r: dict) -> str:
    """Whether any model's accuracy dropped by more than its 95% half-width since the last timed build."""
    rows, before = r.get("accuracy"), r.get("before") or {}
    if not rows:
        return ("No earlier timed build with recorded accuracies to compare with: the table lists this build's "
                "validation accuracies (the next timed build is compared with them).")
    if before.get("cpu_model") != r.get("cpu_model"):
        return (f"The timed build before this one ran on another CPU ({before.get('cpu_model')}): training's "
                "last bits differ with the machine's arithmetic and grow into different models, so the change "
                "below is not the code's.")
    bad = [x["model"] for x in rows if not x["within"]]
    same = sum(x["same_weights"] for x in rows)
    verdict = (f"**{len(bad)} model(s) dropped by more than the half-width: {', '.join(bad)}**" if bad else
               "no model dropped by more than the 95% half-width of its earlier accuracy")
    return (f"Validation accuracy of {len(rows)} models, this build (commit `{r.get('build_commit', '')[:10]}`, "
            f"{r['total_s'] / 60:.1f} min) "
            f"against the timed build before it on the same CPU (commit `{before.get('build_commit', '')[:10]}`, "
            f"{before.get('date', '')[:10]}, {before.get('total_s', 0) / 60:.1f} min): {verdict}; {same} of "
            f"{len(rows)} have bit-identical weights.")


# ---------------------------------------------------------------- sentences

def sweep_text(r: dict) -> str:
    by_m = {x["m"]: x for x in r["rows"]}
    parts = [f"M = {m}: {x['ratio_shared']:.1f}x per instance, {x['ratio_many']:.1f}x over the instances"
             + (f" (CPU time: {x['ratio_shared_cpu']:.1f}x and {x['ratio_many_cpu']:.1f}x)" if "ratio_shared_cpu" in x else "")
             for m, x in sorted(by_m.items())]
    eq = "equal in every run" if r["outputs_equal"] else "**not equal in some runs** (see the table)"
    return (f"On {r['model']} (K = {r['setting']['k']}, forced protocol), the shared-work sweep against every "
            f"run alone: " + "; ".join(parts) + f". Outputs (tokens, segments, option log-probs within 1e-4): {eq}.")


def study_text(r: dict) -> str:
    t, f = r["total"], r["full_grid"]
    return (f"Chapter 4's grid on {len(r['models'])} models x {r['rows'][0]['items']} items x "
            f"{r['setting']['measurements_per_item']} measurements: `run_latent_study` makes "
            f"{t['fast_per_s']:.1f} measurements/s, every run alone {t['naive_per_s']:.1f}/s "
            f"(**{t['ratio']:.1f}x**" + (f"; {t['ratio_cpu']:.1f}x in CPU time" if "ratio_cpu" in t else "") + "). The full grid ({f['models']} models x {f['items']} test items, "
            f"{f['measurements']:,} measurements) would take about {f['fast_s_estimate'] / 60:.0f} min through the "
            f"study and {f['naive_s_estimate'] / 60:.0f} min naively at these rates "
            f"({'outputs equal' if r['outputs_equal'] else '**outputs differ**'}).")


def scaling_text(r: dict) -> str:
    lines = []
    names = {"instances": "instances", "interventions": "interventions per instance", "k": "latent steps K"}
    for ax in r["axes"]:
        f, n = ax["fast_fit"], ax["naive_fit"]
        pts = ax["points"]
        per = [p["fast_ms_per_run"] for p in pts]
        mem = [p["fast_peak_mb"] for p in pts]
        s = (f"* **{names[ax['axis']]}** ({pts[0]['x']} to {pts[-1]['x']}): shared work costs "
             f"{per[0]:.1f} CPU ms per measurement at {pts[0]['x']} and {per[-1]:.1f} ms at {pts[-1]['x']}; a line fits "
             f"its CPU time with R^2 = {f['r2']:.3f} ({1000 * f['slope_s']:.2f} ms per unit)")
        if ax["axis"] == "k":
            s += " (each added latent step is one more decode step for all 16 rows)"
        elif f["knee"] is not None:
            s += f"; the knee (cost per measurement within 25% of its lowest) is at {f['knee']}"
        if n["r2"] is not None:
            s += f". The naive loop: {1000 * n['slope_s']:.2f} ms per unit, R^2 = {n['r2']:.3f}"
        s += f". Peak memory added: {min(mem):.0f} to {max(mem):.0f} MB."
        lines.append(s)
    return "\n".join(lines)
