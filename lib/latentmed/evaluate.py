"""Held-out evaluation of the testbed zoo: accuracy per family with 95% Wilson intervals,
trigger rates of the segment, K per instance, non-finite values.

Every model is run as at inference (`latentmed.train.predict`): latents produced by the fed-back
loop (or the control's source), CapImagine's imagination generated greedily; multiple choice is
scored over the four option tokens at the answer position. The natural trigger is whether the
model's own top token after the prompt opens the segment; the segment is opened in any case
(forced), so accuracy is measured on every item and the trigger rate is reported beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import layouts
from .stats import accuracy_table, paired_comparisons
from .train import FeatureBank, Plan, build_bank, load_model, predict, set_threads, state_hash

CHANCE = 0.25


def test_bank(model, config, split: str = "test", per_family: int | None = None,
              cache_dir: Path | None = None, progress: bool = False) -> FeatureBank:
    """The held-out split's items with tower tokens (scene, crop, degraded scene)."""
    n = per_family if per_family is not None else config.split_size(split) // len(config.families)
    return build_bank(model, config, split, max(1, n), kinds=("main", "crop", "degraded"), cache_dir=cache_dir,
                      progress=progress)


def evaluate_model(folder: str | Path, bank: FeatureBank | None = None, config=None, split: str = "test",
                   per_family: int | None = None, cache_dir: Path | None = None) -> pd.DataFrame:
    """Per-item records of one checkpoint folder on `split` (or on a given bank)."""
    from .zoo import read_info, testbed_config

    set_threads()
    folder = Path(folder)
    model, tok, spec = load_model(folder)
    config = config or testbed_config()
    if bank is None:
        bank = test_bank(model, config, split, per_family, cache_dir)
    k = spec.n_latents if spec.has_latents else 0
    constant = layouts.load_constant(folder) if layouts.latent_source(spec) == "constant" else None
    plan = Plan(spec, n_latents=k, latent_fill={"evidence_crop": "crop", "constant": "constant"}.get(
        layouts.latent_source(spec), "hidden"), image="degraded" if spec.method == layouts.POSITIVE_CONTROL else "main")
    recs = pd.DataFrame(predict(model, tok, bank, plan, constant=constant))
    try:
        recs.insert(0, "model", read_info(folder).get("name", folder.name))
    except FileNotFoundError:
        recs.insert(0, "model", folder.name)
    recs["has_segment"] = spec.placement != "none"
    return recs


def summarize(records: pd.DataFrame) -> pd.DataFrame:
    """Per model and family: accuracy with 95% Wilson interval, trigger rate, K, non-finite."""
    acc = accuracy_table(records, by=("model", "family"), chance=CHANCE)
    overall = accuracy_table(records.assign(family="all"), by=("model", "family"), chance=CHANCE)
    acc = pd.concat([acc, overall], ignore_index=True)
    extra = []
    for (m, fam), g in list(records.groupby(["model", "family"], sort=False)) + [
            ((m, "all"), g) for m, g in records.groupby("model", sort=False)]:
        seg = bool(g["has_segment"].iloc[0])
        extra.append(dict(model=m, family=fam,
                          trigger_rate=float(g["trigger"].astype(float).mean()) if seg else np.nan,
                          k_mean=float(g["k"].mean()) if seg else np.nan,
                          k_min=float(g["k"].min()) if seg else np.nan,
                          k_max=float(g["k"].max()) if seg else np.nan,
                          ended_rate=float(g["ended"].astype(float).mean()) if seg else np.nan,
                          nonfinite=int(g["nonfinite"].sum())))
    return acc.merge(pd.DataFrame(extra), on=["model", "family"])


def evaluate_zoo(root: str | Path | None = None, budget: str = "default", methods=None, split: str = "test",
                 per_family: int | None = None, save: bool = True) -> pd.DataFrame:
    """Evaluate every trained model of a zoo folder; returns all per-item records.

    Records are written to `<zoo>/eval-<split>.csv` (reused when every model is unchanged).
    """
    from .testbed import TestbedConfig
    from .zoo import METHODS, Zoo, read_info

    zoo = Zoo(Path(root) if root else None, budget=budget, progress=False)
    names = [m for m in (methods or METHODS) if (zoo.folder(m) / "zoo.json").exists()]
    if not names:
        raise FileNotFoundError(f"{zoo.root}: no trained models (run `python -m latentmed.zoo` first)")
    # the testbed the models were trained on (recorded in zoo.json) defines the test split
    zoo.config = TestbedConfig.from_dict(read_info(zoo.folder(names[0]))["settings"]["testbed"])
    key = {m: read_info(zoo.folder(m))["hash"] for m in names}
    key["per_family"], key["split"] = per_family, split
    out_csv, key_file = zoo.root / f"eval-{split}.csv", zoo.root / f"eval-{split}.json"
    if out_csv.exists() and key_file.exists() and json.loads(key_file.read_text()) == key:
        return pd.read_csv(out_csv, converters={"logprobs": json.loads})
    base_model, _, _ = load_model(zoo.folder(names[0]))
    tower = state_hash(base_model.model.visual)
    bank = test_bank(base_model, zoo.config, split, per_family, zoo.root / "_features")
    frames = []
    for m in names:
        model, _, _ = load_model(zoo.folder(m))
        same_tower = state_hash(model.model.visual) == tower
        frames.append(evaluate_model(zoo.folder(m), bank if same_tower else None, zoo.config, split, per_family,
                                     zoo.root / "_features"))
    recs = pd.concat(frames, ignore_index=True)
    if save:
        recs.assign(logprobs=recs["logprobs"].map(json.dumps)).to_csv(out_csv, index=False)
        key_file.write_text(json.dumps(key))
    return recs


def headline_tests(records: pd.DataFrame, reference: str = "capimagine", others=None) -> pd.DataFrame:
    """Paired McNemar tests: `reference` vs each latent model and vs direct, and each latent
    model vs direct; Holm-corrected over the whole family of comparisons."""
    models = list(pd.unique(records["model"]))
    latent = [m for m in (others or models) if m.endswith("-style")]
    pairs = [(reference, m) for m in latent + ["direct"] if reference in models and m in models]
    pairs += [(m, "direct") for m in latent if "direct" in models]
    return paired_comparisons(records, pairs)
