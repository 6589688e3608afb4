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

from ..analysis.stats import wilson
from ..files import settings_hash
from ..store import ResultsStore
from .evaluate import CONDITION, base_params, read_rows
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
        d.update(n=len(g), accuracy=acc, ci_low=lo, ci_high=hi, paper=None if paper is None else paper / 100,
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
    table.attrs["pending_shard_rows"] = pending
    return table


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
            base = (f"accelerate launch --num_processes 8 -m latentmed.real eval --model {folder} --method {method} "
                    f"--benchmark {bench} --data {data} --out {out}")
            lines.append(base)
            if method in force_latent_for:
                lines.append(base + " --force-latent")
    lines.append(f"python -m latentmed.real report --out {out}")
    return "\n".join(lines)
