"""Input -> latent (chapter 3): runs and tables.

For every model with a segment (latent slots, or CapImagine's imagination span), the clean run
and every input perturbation of `conditions.INPUT` (plus a blank image) are decoded with the
engine, recording the merged image tokens (`vision.hook_out`) and the final states of the
prompt (`ln_final.hook_normalized`). The store keeps per run: the latents Z_in [K, H] (for a
text span, the span's final states), the mean image token, the prompt's last state and the
mean final state over the prompt's text tokens. The tables compare how far Z moves with how far
the image features and the prompt's states move (`similarity.movement`, `similarity.distance`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..engine import interventions as I
from ..engine.reasoner import LatentReasoner, evidence_tokens
from ..store import ResultsStore
from ..zoo.evaluate import decode_config
from . import conditions as C
from . import similarity as S
from .measure import Condition, measure
from .study import model_hash

RECORD = I.Record(hooks=["vision.hook_out", "ln_final.hook_normalized"], positions="all")
PERTURBATIONS = (*C.INPUT, "blank")


def summaries(image_id: int, token_px: int = 28):
    """What chapter 3 keeps of a run: the latents (for a text span, its final states), the mean
    merged image token at the evidence cells (none for an item without evidence), the prompt's
    last final state and the mean over its text tokens."""
    def keep(trace) -> dict[str, torch.Tensor]:
        out = {}
        seg = trace.segments[0] if trace.segments else None
        if seg is not None:
            z = seg.z_in if seg.kind == "latent" else seg.z_out
            if z is not None and len(z):
                out["z"] = z
        img = trace.records.get("vision.hook_out")
        q = getattr(trace.inputs, "query", None)
        if img is not None and len(img) and q is not None and q.evidence_boxes:
            at = evidence_tokens(q.evidence_boxes, q.images[0].size, trace.inputs.image_grid_thw[0], token_px)
            out["image"] = img[at].mean(0)  # the image tokens where the evidence is
        states = trace.records.get("ln_final.hook_normalized")
        where = trace.record_positions.get("ln_final.hook_normalized", [])
        P = len(trace.prompt_ids)
        prompt = [j for j, q in enumerate(where) if q < P]
        if states is not None and prompt:
            out["prompt_last"] = states[prompt[-1]]
            text = [j for j in prompt if trace.prompt_ids[where[j]] != image_id]
            if text:
                out["text"] = states[text].mean(0)
        return out

    return keep


def input_conditions(queries: list, seed: int = 0) -> list[Condition]:
    """Chapter 3's perturbations: `conditions.INPUT` graded from pixel noise to another item,
    and a blank image (the constant-X floor)."""
    return C.input_conditions(queries, seed) + [Condition("blank", lambda i: [I.BlankImage()], "generate")]


def run_input_study(root: str | Path, store_dir: str | Path, qs: list, models: list[str], seed: int = 0,
                    device: str = "cpu", progress: bool = False) -> pd.DataFrame:
    """Every perturbation on every model with a segment; returns the store's rows of these runs."""
    store = ResultsStore(store_dir)
    frames = []
    conds = input_conditions(qs, seed)
    for m in tqdm(models, desc="models", disable=not progress):
        folder = Path(root) / m
        run = store.run(m, model_hash(folder), dict(chapter=3, items=[q.id for q in qs], seed=seed))
        if run.missing([(q.id, k) for q in qs for k in ["clean"] + [c.key for c in conds]]):
            r = LatentReasoner.from_pretrained(folder, device=device)
            measure(r, qs, conds, run, decode_config(r), record=[RECORD], keep=summaries(r.ids.image),
                    progress=progress)
        frames.append(run.frame().assign(run_key=run.key))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def tensors_of(store_dir: str | Path, rows: pd.DataFrame, names=("z", "image", "prompt_last", "text")) -> dict:
    """name -> {(model, item, condition): tensor} for the kept tensors of `rows`."""
    runs = {r.key: r for r in ResultsStore(store_dir).runs()}
    out: dict[str, dict] = {n: {} for n in names}
    for key, g in rows.groupby("run_key", sort=False):
        recs = g.to_dict("records")
        for rec, ts in zip(recs, runs[key].tensors_many(recs)):
            for n in names:
                if n in ts:
                    out[n][(rec["model"], rec["item"], rec["condition"])] = ts[n]
    return out


def latents_by(rows: pd.DataFrame, tensors: dict, model: str, condition: str, items: list[str]):
    """[N, K, H] latents and mask of `model` under `condition`, in the order of `items`."""
    return S.stack([tensors.get((model, i, condition)) for i in items])


def similarity_table(rows: pd.DataFrame, z: dict, items: list[str]) -> pd.DataFrame:
    """Per model and step: inter- and intra-instance similarity, similarity to the next step, norm."""
    frames = []
    for m in pd.unique(rows["model"]):
        Z, M = latents_by(rows, z, m, "clean", items)
        if M.any():
            frames.append(S.profile(Z, M).assign(model=m))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def baselines(rows: pd.DataFrame, vec: dict[str, dict], items: list[str]) -> pd.DataFrame:
    """Inter-instance similarity of the reference vectors (image tokens, prompt's last state,
    prompt's text states) of the clean runs, per model: what "highly similar" is measured against."""
    out = []
    for m in pd.unique(rows["model"]):
        row = dict(model=m)
        for name, table in vec.items():
            X = [table.get((m, i, "clean")) for i in items]
            X = np.stack([x.double().numpy() for x in X if x is not None]) if any(x is not None for x in X) else None
            row[f"inter_{name}"] = float(S.inter(X[:, None], np.ones((len(X), 1), bool))[0]) if X is not None else np.nan
        out.append(row)
    return pd.DataFrame(out)


def movement_table(rows: pd.DataFrame, z: dict, vec: dict[str, dict], items: list[str],
                   conditions=PERTURBATIONS) -> pd.DataFrame:
    """Per model and perturbation: how far Z moves (mean over steps of 1 - cos, and the norm ratio)
    next to how far the image tokens and the prompt's last state move."""
    out = []
    for m in pd.unique(rows["model"]):
        Z, M = latents_by(rows, z, m, "clean", items)
        for c in conditions:
            key = f"{c}/generate"
            Zp, Mp = latents_by(rows, z, m, key, items)
            mv = S.movement(Z, M, Zp, Mp) if M.any() and Mp.any() else pd.DataFrame()
            row = dict(model=m, perturbation=c, n=int(mv["n"].max()) if len(mv) else 0,
                       z_distance=float(mv["distance"].mean()) if len(mv) else np.nan,
                       z_norm_ratio=float(mv["norm_ratio"].mean()) if len(mv) else np.nan)
            for name, table in vec.items():
                pairs = [(table.get((m, i, "clean")), table.get((m, i, key))) for i in items]
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
                row[f"{name}_distance"] = S.distance(np.stack([a.double().numpy() for a, _ in pairs]),
                                                     np.stack([b.double().numpy() for _, b in pairs])) if pairs else np.nan
            out.append(row)
    return pd.DataFrame(out)


def similarity_text(table: pd.DataFrame, sim: pd.DataFrame) -> str:
    """One sentence per model: mean inter-instance similarity of its latents next to its image-token
    baseline, the collapse step, and the permutation test."""
    from .report import p

    lines = []
    for m, r in table.iterrows():
        step = "never reaches 0.9" if pd.isna(r["collapse_step"]) else f"reaches 0.9 at step {int(r['collapse_step'])}"
        lines.append(f"* **{m}**: latents of different instances have mean cosine {r['mean_inter_latent']:.3f} "
                     f"(image tokens {r['inter_image']:.3f}, prompt's last state {r['inter_prompt_last']:.3f}); "
                     f"inter-instance similarity {step}; intra minus inter {r['intra_minus_inter']:+.3f} "
                     f"(permutation p_holm {p(r['p_holm'])}, n = {int(sim[sim['model'] == m]['n'].max())}).")
    return "\n".join(lines)


def movement_text(mv: pd.DataFrame, mild: str = "mask_evidence", strong: str = "other_item") -> str:
    """One sentence per model: how far its latents move under masking the evidence and under
    another instance, against the image tokens' movement."""
    lines = []
    for m, g in mv.groupby("model", sort=False):
        g = g.set_index("perturbation")
        if mild in g.index and strong in g.index:
            a, b = g.loc[mild], g.loc[strong]
            lines.append(f"* **{m}**: masking the evidence moves its latents by {a['z_distance']:.3f} "
                         f"(image tokens {a['image_distance']:.3f}); another instance moves them by "
                         f"{b['z_distance']:.3f} (image tokens {b['image_distance']:.3f}; n = {int(b['n'])}).")
    return "\n".join(lines)


def supervision_table(models: list[str]) -> pd.DataFrame:
    """What the last training stage of each model supervised (from the zoo's recipes)."""
    from ..zoo.recipes import KINDS, method_stages

    rows = []
    for m in models:
        plan = method_stages(m)[-1].plan
        rows.append(dict(model=m, kind=KINDS.get(m, "other"), ground_slots=plan.ground_slots,
                         key_word_attention=plan.attn_weight, hop_weight=plan.hop_weight,
                         evidence_in=plan.evidence_in, align=plan.align or "-",
                         bottleneck=plan.bottleneck, latent_fill=plan.latent_fill))
    return pd.DataFrame(rows)
