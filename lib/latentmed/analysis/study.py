"""The study's runs on the zoo: which models, which items, and the measurements of each chapter,
all written to (and read back from) the results store.

A run's key holds the model's checkpoint hash (its zoo.json records the hash of its weights) and
the chapter's parameters, so re-running a chapter reuses every row of an unchanged model and
recomputes a changed one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..engine.query import Query
from ..engine.reasoner import LatentReasoner
from ..files import file_hash, read_json
from ..store import ResultsStore
from ..testbed.items import TestbedConfig, make_item
from ..zoo.evaluate import decode_config
from . import conditions as C
from .measure import clean_runs, measure

LATENT_KINDS = ("latent", "control")
# Test items per family each study chapter runs on at default settings (None: the whole split),
# and in a small (CI) run; the scorecard reads the same runs back.
ITEMS = {3: 100, 4: 100, 6: 100, 10: 100}
CI_ITEMS = 5


def items_per_family(chapter: int, small_run: bool = False, given: int | None = None) -> int | None:
    """A chapter's items per family: the parameter when given, else its default (or the CI size)."""
    if given is not None:
        return given
    return CI_ITEMS if small_run else ITEMS[chapter]


def model_hash(folder: str | Path) -> str:
    """The hash of a checkpoint's weights (recorded in its zoo.json, else computed)."""
    folder = Path(folder)
    info = folder / "zoo.json"
    if info.exists():
        h = read_json(info, "zoo checkpoint record").get("weights_hash")
        if h:
            return h
    return file_hash(folder / "model.safetensors")


def queries(config: TestbedConfig, split: str = "test", per_family: int | None = None) -> list[Query]:
    """The held-out items as engine queries (with images, crops and evidence boxes)."""
    counts = config.family_counts(split)
    return [Query.of(make_item(config, split, f, i)) for f, n in counts.items()
            for i in range(n if per_family is None else min(n, per_family))]


def trained(root: str | Path, names) -> list[str]:
    """The models of `names` that have a finished checkpoint under `root`."""
    root = Path(root)
    return [m for m in names if (root / m / "zoo.json").exists()]


def latent_models(root: str | Path, names) -> list[str]:
    """Trained models whose segment holds latent slots (chapter 4 intervenes on them)."""
    out = []
    for m in trained(root, names):
        spec = read_json(Path(root) / m / "latent_spec.json", "latent spec")
        if spec.get("placement") in ("after_start", "overwrite_start"):
            out.append(m)
    return out


@dataclass
class Loaded:
    """A model ready to be measured: its reasoner, decode config, the queries' prompts and clean traces."""

    reasoner: LatentReasoner
    config: object
    prompts: list
    clean: list


def load_for_study(folder: str | Path, qs: list[Query], device: str = "cpu", overrides: dict | None = None,
                   shared: dict | None = None) -> Loaded:
    """Load the model of `folder` (with spec `overrides`) and decode the queries once, clean. With
    `shared` (a dict a chapter keeps), a second study of the same checkpoint, overrides and items
    gets the same objects: chapter 10 measures every model of its series twice (latent
    interventions, then mediation) and decoded each clean run twice."""
    key = (str(Path(folder).resolve()), model_hash(folder), repr(sorted((overrides or {}).items())),
           tuple(q.id for q in qs), device)
    if shared is not None and key in shared:
        return shared[key]
    r = LatentReasoner.from_pretrained(folder, device=device, **(overrides or {}))
    cfg = decode_config(r)
    prompts = [r.prompt(q) for q in qs]
    out = Loaded(r, cfg, prompts, clean_runs(r, prompts, cfg))
    if shared is not None:
        shared[key] = out
    return out


def run_latent_study(root: str | Path, store_dir: str | Path, qs: list[Query], models: list[str],
                     forms=("generate", "replay"), seed: int = 0, device: str = "cpu", progress: bool = False,
                     overrides: dict | None = None, suffix: str = "", names=C.LATENT,
                     shared: dict | None = None) -> pd.DataFrame:
    """Chapter 4: every latent condition on every model, rows in the store; returns them.
    `overrides` change the spec at inference (e.g. after_segment="all": the bottleneck open); the
    rows are then stored under the model's name plus `suffix`. A model whose rows are all stored
    is not loaded; `shared` as in `load_for_study`."""
    store = ResultsStore(store_dir)
    frames = []
    keys = ["clean"] + C.latent_keys(forms, names)
    for m in tqdm(models, desc="models", disable=not progress):
        folder = Path(root) / m
        params = dict(chapter=4, items=[q.id for q in qs], seed=seed, forms=list(forms), overrides=overrides or {},
                      **({} if tuple(names) == C.LATENT else {"conditions": list(names)}))
        run = store.run(m + suffix, model_hash(folder), params)
        if run.missing([(q.id, k) for q in qs for k in keys]):
            x = load_for_study(folder, qs, device, overrides, shared)
            conds = C.latent_conditions(x.clean, [q.family for q in qs], forms, seed, names)
            measure(x.reasoner, qs, conds, run, x.config, clean=x.clean, progress=progress, prompts=x.prompts)
        frames.append(run.frame())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def norms(root: str | Path, models: list[str], qs: list[Query], device: str = "cpu") -> pd.DataFrame:
    """Per model: mean norm of its latents, of its word embeddings and of its merged image tokens
    (a noise or replacement vector must be matched to the first, not to the others)."""
    rows = []
    for m in models:
        x = load_for_study(Path(root) / m, qs, device)
        r, prompts = x.reasoner, x.prompts
        z = [t.segments[0].z_in for t in x.clean if t.segments and t.segments[0].z_in is not None]
        zn = torch.cat(z).norm(dim=-1) if z else torch.zeros(0)
        with torch.inference_mode():
            words = r.model.get_input_embeddings().weight[: len(r.tokenizer)].norm(dim=-1)
            feats, _ = r.image_features(prompts[:32], [[]] * min(32, len(prompts)))
        rows.append(dict(model=m, latent_norm=float(zn.mean()) if len(zn) else np.nan,
                         word_norm=float(words.mean()), image_token_norm=float(feats.norm(dim=-1).mean()),
                         latent_over_word=float(zn.mean() / words.mean()) if len(zn) else np.nan))
    return pd.DataFrame(rows)


def verdict(row) -> str:
    """'changes the answer' when the McNemar test (Holm) rejects, else 'no detectable change'."""
    p = row.get("p_mcnemar_holm", row["p_mcnemar"])
    return "changes the answer" if p < 0.05 else "no detectable change"


def summary_text(table: pd.DataFrame, rows: pd.DataFrame, conditions=("swap/generate", "noise/generate",
                                                                       "zero/generate", "markers/generate")) -> str:
    """Chapter 4's findings, one line per model kind and condition, generated from the effects."""
    from ..zoo.recipes import KINDS
    from .report import claim

    lines = []
    for m in pd.unique(table["model"]):
        sub = table[table["model"] == m].set_index("condition")
        parts = [f"*{c.split('/')[0]}*: {claim(sub.loc[c])}, {verdict(sub.loc[c])}" for c in conditions
                 if c in sub.index]
        if parts:
            lines.append(f"* **{m}** ({KINDS.get(m, 'other')}): " + "; ".join(parts) + ".")
    return "\n".join(lines)
