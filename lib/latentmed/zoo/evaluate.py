"""Held-out evaluation of the testbed zoo through the engine: accuracy per family with 95%
Wilson intervals, trigger rates of the segment, K per instance, non-finite values.

Every model runs in the engine's decode loop (`LatentReasoner`) as at inference: latents from
the model's own loop (or the control's source, `LatentSpec.latent_source`), CapImagine's
imagination generated greedily. Two protocols:

* "forced" (the default, what the zoo was trained for): the segment is opened right after the
  prompt and, once it closes, the question's key words are written again (teacher-forced); the
  answer is scored at the last of them;
* "free": nothing is forced; the model decides whether to open the segment and what to write
  after it; the answer is scored at the first option token it writes after the segment.

The natural trigger is whether the model's own top token after the prompt opens the segment.
Multiple choice is scored over the four option tokens (`Trace.answer_index`); the answer parsed
from the free text is kept beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..analysis.stats import accuracy_table, paired_comparisons
from ..engine.decode import DecodeConfig
from ..engine.reasoner import LatentReasoner
from ..files import atomic_write_json, atomic_write_text, read_json, set_threads
from ..testbed.items import TestbedConfig, make_item
from .build import ZOO_FILE, read_info, testbed_config
from .recipes import METHODS

CHANCE = 0.25
PROTOCOLS = ("forced", "free")


def test_items(config: TestbedConfig, split: str = "test", per_family: int | None = None) -> list:
    """The held-out split's items (with images), `per_family` of each family (None: all)."""
    counts = config.family_counts(split)
    return [make_item(config, split, f, i) for f, n in counts.items()
            for i in range(n if per_family is None else min(n, per_family))]


def decode_config(reasoner: LatentReasoner, protocol: str = "forced", max_new_tokens: int | None = None) -> DecodeConfig:
    """The decode settings of an evaluation protocol (greedy; stops once the answer is chosen)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    spec = reasoner.spec
    seg = spec.k_target + 2 if spec.has_latents else (spec.max_latents or 16) + 2 if spec.placement == "text" else 0
    forced = protocol == "forced"
    return DecodeConfig(max_new_tokens=max_new_tokens or seg + 8, force_latent=forced and spec.has_segments,
                        force_suffix=forced, stop_after_answer=True)


def trace_record(item, trace) -> dict:
    """One evaluation row from a trace: the scored answer, its log-probs and the segment."""
    answer = item.options.index(item.answer_word)
    seg = trace.segments[0] if trace.segments else None
    return dict(id=item.id, family=item.family, answer=answer, pred=trace.answer_index,
                correct=trace.answer_index == answer,
                logprobs=None if trace.answer_logprobs is None else [round(v, 6) for v in trace.answer_logprobs],
                trigger=None if seg is None else bool(seg.triggered), k=0 if seg is None else seg.k,
                ended=None if seg is None else bool(seg.own_end), nonfinite=bool(trace.nan),
                parsed=trace.parsed_index, unparsed=bool(trace.unparsed), scored=trace.answer_step is not None,
                opened=seg is not None)


def evaluate_model(folder: str | Path, items: list, protocol: str = "forced", batch_size: int = 32,
                   progress: bool = False) -> pd.DataFrame:
    """Per-item records of one checkpoint folder on `items`, through the engine."""
    set_threads()
    folder = Path(folder)
    r = LatentReasoner.from_pretrained(folder)
    cfg = decode_config(r, protocol)
    rows = []
    bar = tqdm(total=len(items), desc=f"{folder.name} ({protocol})", disable=not progress, leave=False)
    with torch.inference_mode():
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            traces = r.generate([r.item_inputs(it) for it in chunk], config=cfg)
            rows += [trace_record(it, t) for it, t in zip(chunk, traces)]
            bar.update(len(chunk))
    bar.close()
    recs = pd.DataFrame(rows)
    try:
        recs.insert(0, "model", read_info(folder).get("name", folder.name))
    except FileNotFoundError:
        recs.insert(0, "model", folder.name)
    recs.insert(1, "protocol", protocol)
    recs["has_segment"] = r.spec.has_segments
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
        opened = g[g["opened"]] if "opened" in g else g
        extra.append(dict(model=m, family=fam,
                          trigger_rate=float(g["trigger"].astype(float).mean()) if seg else np.nan,
                          opened_rate=float(g["opened"].astype(float).mean()) if seg and "opened" in g else np.nan,
                          k_mean=float(opened["k"].mean()) if seg and len(opened) else np.nan,
                          k_min=float(opened["k"].min()) if seg and len(opened) else np.nan,
                          k_max=float(opened["k"].max()) if seg and len(opened) else np.nan,
                          ended_rate=float(opened["ended"].astype(float).mean()) if seg and len(opened) else np.nan,
                          unparsed=int(g["unparsed"].sum()) if "unparsed" in g else 0,
                          nonfinite=int(g["nonfinite"].sum())))
    return acc.merge(pd.DataFrame(extra), on=["model", "family"])


def evaluate_zoo(root: str | Path | None = None, methods=None, split: str = "test", per_family: int | None = None,
                 protocol: str = "forced", save: bool = True, progress: bool = False) -> pd.DataFrame:
    """Evaluate every trained model of a zoo folder; returns all per-item records.

    Records are written to `<zoo>/eval-<split>-<protocol>.jsonl` (reused when every model is
    unchanged: the key holds each model's settings and weights hashes; a damaged key is stale).
    """
    from ..paths import models_dir

    root = Path(root) if root else models_dir() / "zoo"
    names = [m for m in (methods or METHODS) if (root / m / ZOO_FILE).exists()]
    if not names:
        raise FileNotFoundError(f"{root}: no trained models (run `python -m latentmed.zoo` first)")
    # the testbed the models were trained on (recorded in zoo.json) defines the test split
    config = TestbedConfig.from_dict(read_info(root / names[0])["settings"]["testbed"])
    infos = {m: read_info(root / m) for m in names}
    key = {m: [i["hash"], i.get("weights_hash")] for m, i in infos.items()}
    key.update(per_family=per_family, split=split, protocol=protocol)
    out, key_file = root / f"eval-{split}-{protocol}.jsonl", root / f"eval-{split}-{protocol}.json"
    if out.exists() and _key(key_file) == key:
        return pd.read_json(out, orient="records", lines=True, dtype=False)
    items = test_items(config, split, per_family)
    recs = pd.concat([evaluate_model(root / m, items, protocol, progress=progress) for m in names],
                     ignore_index=True)
    if save:
        atomic_write_text(out, recs.to_json(orient="records", lines=True))
        atomic_write_json(key_file, key)
    return recs


def _key(path: Path):
    """The stored key of an evaluation table, or None when missing or damaged (then it is redone)."""
    try:
        return read_json(path, "evaluation key")
    except (OSError, ValueError):
        return None


def headline_tests(records: pd.DataFrame, reference: str = "capimagine", others=None) -> pd.DataFrame:
    """Paired McNemar tests: `reference` vs each latent model and vs direct, and each latent
    model vs direct; Holm-corrected over the whole family of comparisons."""
    models = list(pd.unique(records["model"]))
    latent = [m for m in (others or models) if m.endswith("-style")]
    pairs = [(reference, m) for m in latent + ["direct"] if reference in models and m in models]
    pairs += [(m, "direct") for m in latent if "direct" in models]
    return paired_comparisons(records, pairs)


__all__ = ["CHANCE", "PROTOCOLS", "decode_config", "evaluate_model", "evaluate_zoo", "headline_tests",
           "summarize", "test_items", "testbed_config"]
