"""Scores of real-track evaluations, beside the paper's reference accuracies (chapter 8).

Each benchmark is scored as its harness scores it:

* V* Bench: accuracy per category (direct_attributes, relative_position) and over all items.
* HR-Bench 4K/8K: within each `cycle_category` the accuracy over all items and per category
  (single = FSP, cross = FCP), then each averaged over the cycles (VLMEvalKit's
  `report_acc_hrbench`, lmms-eval's aggregate); with cycles of equal size this equals the
  accuracy over all rows.
* MME-RealWorld-Lite: accuracy over all items, per task (Perception / Reasoning) and per subtask.

The main column is the harness's answer (`correct`); the engine's strict parse
(`correct_strict`) and the option with the highest log-prob at the answer step
(`correct_logprob`) are given beside it, with the number of unparsed replies and of replies
where the harness and the strict parser read different letters (a third-party Monet run found
spurious answer flips from parsing). Intervals are 95% Wilson intervals over the rows (for
HR-Bench the rotated copies of a question are not independent, so its interval is too narrow).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from ..analysis.stats import holm, mcnemar_paired, wilson
from ..files import settings_hash
from ..store import ResultsStore
from .benchmarks import BENCHMARKS
from .evaluate import CONDITION, MODEL_INFO, base_params, read_rows
from .presets import PRESETS

# DESIGN.md section 4: CapImagine / Monet / LVR / Qwen2.5-VL-7B, in percent.
PAPER = {
    "vstar": {"CapImagine": 85.9, "Monet": 83.3, "LVR": 81.7, "Qwen2.5-VL-7B": 76.4},
    "hrbench4k": {"CapImagine": 74.1, "Monet": 71.0, "LVR": 70.8, "Qwen2.5-VL-7B": 68.0},
    "hrbench8k": {"CapImagine": 70.7, "Monet": 68.0, "LVR": 63.0, "Qwen2.5-VL-7B": 63.8},
    "mme-realworld-lite": {"CapImagine": 54.8, "Monet": 46.9, "LVR": 50.6, "Qwen2.5-VL-7B": 45.8},
}
SCORES = ("correct", "correct_strict", "correct_logprob")


def paper_table() -> pd.DataFrame:
    """The paper's accuracies: one row per model, one column per benchmark."""
    return pd.DataFrame(PAPER).rename_axis("model")


def paper_accuracy(method: str, benchmark: str) -> float | None:
    col = PRESETS[method].paper if method in PRESETS else None
    return PAPER.get(benchmark, {}).get(col) if col else None


def score(rows: pd.DataFrame, benchmark: str, column: str = "correct") -> dict:
    """{"overall": accuracy, <category>: accuracy, ...} as the benchmark's harness computes it."""
    x = rows[column].astype(float)
    if benchmark.startswith("hrbench") and "cycle" in rows:
        out: dict[str, list[float]] = {}
        for _, g in rows.assign(_x=x).groupby("cycle", sort=True):
            out.setdefault("overall", []).append(g["_x"].mean())
            for cat, gc in g.groupby("category", sort=True):
                out.setdefault(cat, []).append(gc["_x"].mean())
        return {k: float(np.mean(v)) for k, v in out.items()}
    res = {"overall": float(x.mean())}
    groups = ["task", "category"] if benchmark == "mme-realworld-lite" else ["category"]
    for by in groups:
        if by in rows and rows[by].notna().any():
            res.update({str(k): float(v) for k, v in x.groupby(rows[by], sort=True).mean().items()})
    return res


def runs_frame(out: str | Path) -> tuple[pd.DataFrame, int]:
    """Rows of every finished (merged or one-process) real-track run in the store at `out`, with the
    run's model, model hash and settings; and the number of shard rows not merged yet."""
    runs = [r for r in ResultsStore(out).runs() if r.meta["params"].get("track") == "real"]
    ident = lambda r: (r.meta["model"], r.meta["model_hash"], settings_hash(base_params(r)))
    frames, merged = [], {}
    for r in runs:
        if "shard" in r.meta["params"]:
            continue
        rows = [x for x in read_rows(r) if x.get("condition") == CONDITION]
        merged[ident(r)] = {x["item"] for x in rows}
        if rows:
            frames.append(pd.DataFrame(rows).assign(model=r.meta["model"], model_hash=r.meta["model_hash"],
                                                    force_latent=r.meta["params"]["force_latent"], run=r.folder.name))
    pending = sum(x["item"] not in merged.get(ident(r), set()) for r in runs if "shard" in r.meta["params"]
                  for x in read_rows(r))
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), pending


KEYS = ["model", "method", "benchmark", "harness", "force_latent"]


def summary(out: str | Path, model: str | None = None) -> pd.DataFrame:
    """One row per evaluation: n, accuracy with its interval, the paper's number, the strict and
    log-prob accuracies, unparsed and disagreeing replies, trigger rate, K, NaN."""
    df, pending = runs_frame(out)
    if model is not None and len(df):
        df = df[df["model"] == model]
    rows = []
    for key, g in df.groupby(KEYS, sort=False) if len(df) else []:
        d = dict(zip(KEYS, key))
        acc = score(g, d["benchmark"])["overall"]
        lo, hi = wilson(int(g["correct"].sum()), len(g))
        paper = paper_accuracy(d["method"], d["benchmark"])
        seg = g[g["segments"].astype(bool)]
        d.update(n=len(g), n_correct=int(g["correct"].sum()), accuracy=acc, ci_low=lo, ci_high=hi,
                 paper=None if paper is None else paper / 100,
                 diff=None if paper is None else acc - paper / 100,
                 accuracy_strict=score(g, d["benchmark"], "correct_strict")["overall"],
                 accuracy_logprob=score(g, d["benchmark"], "correct_logprob")["overall"],
                 unparsed=int(g["unparsed"].sum()), unparsed_strict=int(g["unparsed_strict"].sum()),
                 disagree=int((g["pred"].fillna("-") != g["pred_strict"].fillna("-")).sum()),
                 trigger_rate=float(seg["triggered"].astype(float).mean()) if len(seg) else None,
                 opened=int(g["opened"].sum()), k_mean=float(seg["k"].mean()) if len(seg) else None,
                 nan=int(g["nan"].sum()), seconds=float(g["seconds"].mean()))
        rows.append(d)
    table = pd.DataFrame(rows)
    if len(table):
        order = {b: i for i, b in enumerate(BENCHMARKS)}
        methods = {m: i for i, m in enumerate(PRESETS)}
        table = table.sort_values(["benchmark", "method", "model", "force_latent"],
                                  key=lambda c: c.map(order) if c.name == "benchmark" else
                                  c.map(methods) if c.name == "method" else c).reset_index(drop=True)
    table.attrs["pending_shard_rows"] = pending
    return table


def loads(out: str | Path) -> pd.DataFrame:
    """What each finished run loaded: device and versions, the method's token ids, LVR's head,
    pixel bounds, and the loader's count of missing and unexpected weights (a released
    checkpoint should load with none missing)."""
    import json

    rows = []
    for r in ResultsStore(out).runs():
        p = r.meta["params"]
        f = r.folder / MODEL_INFO
        if p.get("track") != "real" or "shard" in p or not f.exists():
            continue
        m = json.loads(f.read_text())
        rep = m.get("load_report") or {}
        rows.append(dict(model=r.meta["model"], benchmark=p["benchmark"], method=p["method"],
                         force_latent=p["force_latent"], device=m.get("gpu") or m.get("device"),
                         torch=m.get("torch"), transformers=m.get("transformers"), start_id=m["ids"]["start"],
                         end_id=m["ids"]["end"], head=m.get("head"), min_pixels=m.get("min_pixels"),
                         max_pixels=m.get("max_pixels"), missing=len(rep.get("missing", [])),
                         unexpected=len(rep.get("unexpected", []))))
    df = pd.DataFrame(rows)
    if len(df):
        df[["start_id", "end_id"]] = df[["start_id", "end_id"]].astype("Int64")
    return df


def compare_to_paper(table: pd.DataFrame) -> pd.DataFrame:
    """The summary's rows that have a paper number, with an exact two-sided binomial test of our
    accuracy against it (the paper's number taken as fixed; Holm over the rows)."""
    t = table[table["paper"].notna()].copy() if len(table) else table
    if not len(t):
        return t
    t["p_value"] = [binomtest(int(k), int(n), float(p)).pvalue for k, n, p in zip(t["n_correct"], t["n"], t["paper"])]
    t["p_holm"], t["differs"] = holm(t["p_value"])
    return t[KEYS + ["n", "accuracy", "ci_low", "ci_high", "paper", "diff", "p_value", "p_holm", "differs"]]


def forced_vs_free(out: str | Path) -> pd.DataFrame:
    """McNemar on the same items between a run with the segment forced and the same run without
    (Monet may never open it on its own): accuracies, difference with its interval, p (Holm)."""
    df, _ = runs_frame(out)
    rows = []
    if len(df):
        for key, g in df.groupby(["model", "method", "benchmark", "harness"], sort=False):
            if set(g["force_latent"]) != {True, False}:
                continue
            wide = g.pivot_table(index="item", columns="force_latent", values="correct", aggfunc="first").dropna()
            r = mcnemar_paired(wide[True].astype(bool), wide[False].astype(bool))
            free = g[~g["force_latent"].astype(bool)]
            rows.append({**dict(zip(["model", "method", "benchmark", "harness"], key)),
                         "trigger_rate": float(free["triggered"].astype(float).mean()),
                         **{k: r[k] for k in ("n", "acc_a", "acc_b", "diff", "diff_low", "diff_high", "p_value")}})
    res = pd.DataFrame(rows).rename(columns={"acc_a": "acc_forced", "acc_b": "acc_free"})
    if len(res):
        res["p_holm"], _ = holm(res["p_value"])
    return res


def disagreements(out: str | Path, limit: int = 10, width: int = 120) -> pd.DataFrame:
    """Replies where the harness's rule and the strict parser read different answers."""
    df, _ = runs_frame(out)
    if not len(df):
        return df
    d = df[df["pred"].fillna("-") != df["pred_strict"].fillna("-")]
    printable = lambda t: "".join(c if c.isprintable() else " " for c in str(t))[:width]  # noqa: E731
    d = d.assign(reply=d["clean_text"].map(printable), pred=d["pred"].fillna("-"),
                 pred_strict=d["pred_strict"].fillna("-"))
    return d[["model", "benchmark", "item", "answer", "pred", "pred_strict", "pred_logprob", "reply"]].head(limit)


def categories(out: str | Path) -> pd.DataFrame:
    """Accuracy per category (and per task, per cycle-averaged category for HR-Bench)."""
    df, _ = runs_frame(out)
    rows = []
    for key, g in df.groupby(KEYS, sort=False) if len(df) else []:
        for cat, acc in score(g, key[2]).items():
            if cat != "overall":
                n = int((g["category"] == cat).sum() or (g.get("task", pd.Series(dtype=str)) == cat).sum())
                rows.append({**dict(zip(KEYS, key)), "category": cat, "n": n, "accuracy": acc})
    return pd.DataFrame(rows)


def format_summary(table: pd.DataFrame) -> str:
    """A plain-text version of `summary` for the terminal."""
    cols = ["model", "method", "benchmark", "force_latent", "n", "accuracy", "paper", "accuracy_strict",
            "accuracy_logprob", "unparsed", "disagree", "trigger_rate", "k_mean", "nan"]
    text = table[[c for c in cols if c in table]].to_string(index=False, float_format=lambda v: f"{v:.3f}")
    pending = table.attrs.get("pending_shard_rows", 0)
    if pending:
        text += f"\n({pending} rows of sharded runs are not merged yet: python -m latentmed.real merge --out ...)"
    return text


def commands(model_dirs: dict[str, str] | None = None, data_dirs: dict[str, str] | None = None,
             out: str = "results/real", force_latent_for=("monet",)) -> str:
    """The shell commands that produce a full results folder for chapter 8 (one per model and
    benchmark; Monet also with its segment forced)."""
    model_dirs = model_dirs or {m: f"/models/{p.checkpoint.split('/')[-1]}" for m, p in PRESETS.items()
                                if p.paper is not None}
    data_dirs = data_dirs or {"vstar": "/data/vstar_bench", "hrbench4k": "/data/HR-Bench",
                              "hrbench8k": "/data/HR-Bench", "mme-realworld-lite": "/data/MME-RealWorld-Lite"}
    lines = []
    for method, folder in model_dirs.items():
        for bench, data in data_dirs.items():
            base = (f"accelerate launch --multi_gpu --num_processes 8 -m latentmed.real eval --model {folder} "
                    f"--method {method} --benchmark {bench} --data {data} --out {out}")
            lines.append(base)
            if method in force_latent_for:
                lines.append(base + " --force-latent")
    lines.append(f"python -m latentmed.real report --out {out}")
    return "\n".join(lines)


def accuracy_chart(table: pd.DataFrame):
    """Our accuracy per model with its 95% interval (bars, whiskers) and the paper's (black tick),
    one panel per benchmark."""
    import altair as alt

    t = table.assign(run=[f"{m}{' (forced)' if f else ''}" for m, f in zip(table["model"], table["force_latent"])])
    y = alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="accuracy")
    x = alt.X("run:N", sort=None, title=None)
    bars = alt.Chart().mark_bar().encode(x=x, y=y, color=alt.Color("method:N", sort=list(PRESETS)))
    whisk = alt.Chart().mark_rule(color="black").encode(x=x, y="ci_low:Q", y2="ci_high:Q")
    paper = alt.Chart().mark_tick(color="black", thickness=3, size=18).encode(x=x, y="paper:Q")
    return (alt.layer(bars, whisk, paper, data=t).properties(width=180, height=200)
            .facet(column=alt.Column("benchmark:N", sort=list(BENCHMARKS), title=None))
            .properties(title="Accuracy (bars, 95% Wilson intervals) and the paper's (ticks)"))


LAYOUT = """\
/models/Qwen2.5-VL-7B-Instruct   /models/Monet-7B   /models/LVR-7B   /models/CapImagine-7B   (each: config.json,
                                 *.safetensors [+ index], tokenizer files, preprocessor_config.json)
/data/vstar_bench/test_questions.jsonl, direct_attributes/*.jpg, relative_position/*.jpg     (craigwu/vstar_bench)
/data/HR-Bench/hr_bench_4k.tsv, hr_bench_8k.tsv                                              (DreamMr/HR-Bench)
/data/MME-RealWorld-Lite/data/MME-RealWorld-Lite.json, data/imgs/...   (yifanzhang114/MME-RealWorld-Lite, data.zip)"""


def instructions(out: str = "results/real") -> str:
    """Markdown: how to produce a results folder for this chapter on a GPU machine."""
    checks = "\n".join(f"python -m latentmed.real check --benchmark {b} --data {d} --images" for b, d in
                       (("vstar", "/data/vstar_bench"), ("hrbench4k", "/data/HR-Bench"),
                        ("hrbench8k", "/data/HR-Bench"), ("mme-realworld-lite", "/data/MME-RealWorld-Lite")))
    return f"""On a machine with GPUs and the downloaded files (nothing is downloaded by the code):

**1. Files** in their published layouts, for example

```
{LAYOUT}
```

**2. Check the benchmark files** (every row; `--images` decodes every image):

```
{checks}
```

**3. Evaluate** every model on every benchmark (one process per GPU; rows are written as they
are computed, a killed command resumes where it stopped, the shards are merged at the end;
Monet runs twice, free and with its latent segment forced):

```
{commands(out=out)}
```

On one GPU, drop `accelerate launch --multi_gpu --num_processes 8 -m` and run `python -m latentmed.real eval ...`.
Options: `--limit N` (the first N questions), `--harness lmms-eval` (lmms-eval's prompts and answer rules
instead of VLMEvalKit's), `--max-pixels` / `--min-pixels` (default: each model's released evaluation setting),
`--save-latents`. A sharded run whose processes did not all finish: run it again, or
`python -m latentmed.real merge --out {out}`.

**4. Render this chapter** with the folder:

```
papermill notebooks/08_real.ipynb 08_real.ipynb -p results_dir "{out if out.startswith('/') else '$PWD/' + out}"
```
"""
