"""Training stages: the base's vision stage, freezing the tower, and one QA / fine-tune stage.

The shared base model (the testbed's stand-in for a pretrained Qwen2.5-VL) is trained in two
steps, following what `reference/training-feasibility.md` measured to work at this size:

1. `vision_stage`: the vision tower and merger learn dense per-cell labels (colour, shape,
   digit, row, column of what each merged image token covers) on digit-rich scenes; then the
   tower is frozen and the merger's last layer is rescaled so merged image tokens have the
   norm of word embeddings.
2. `train_stage` with the base `Plan`: grounded question answering in the testbed layout,
   answer = the option's content word, plus an auxiliary loss on the last key words' layer-1
   attention onto the generator's evidence cells.

Every method is a `Plan` run by the same `train_stage` inside the resumable loop (`loop.py`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engine.tiny import image_processor
from ..testbed.items import TestbedConfig, cell_labels, make_scene
from .bank import FeatureBank, fill_for, pixel_inputs, tower_tokens
from .batching import Plan, bind_rope, check_items, collate
from .forward import forward
from .loop import StageConfig, run_loop
from .losses import alignment_loss, attention_loss, hop_loss, token_stats
from .predict import accuracy_by_family, predict

VISION_HEADS = {"colour": 7, "shape": 5, "digit": 11, "row": None, "col": None}
LLM_INIT_STD = 0.088  # re-initialisation of the language model (measured to help retrieval)
TARGET_TOKEN_NORM = 1.0  # merged image tokens are scaled to about a word embedding's norm


def vision_stage(model, config: TestbedConfig, cfg: StageConfig, run_dir: Path, progress: bool = True,
                 stop_after: int | None = None) -> tuple[dict, dict]:
    """Dense per-cell supervision of the tower on digit-rich scenes; returns (heads, summary)."""
    vcfg = replace(config, digit_rich=True)
    grid = config.grid
    hidden = model.config.vision_config.out_hidden_size
    torch.manual_seed(cfg.seed)
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, n or grid) for k, n in VISION_HEADS.items()})
    processor = image_processor()
    none_weight = 0.2

    def labels_of(objs):
        lab = cell_labels(objs, grid)
        return {k: torch.as_tensor(lab[k] + (1 if k in ("colour", "shape", "digit") else 0)) for k in VISION_HEADS}

    def step_fn(step, gen):
        model.model.visual.train()
        idx = [step * cfg.batch_size + j for j in range(cfg.batch_size)]
        scenes_ = [make_scene(vcfg, i) for i in idx]
        pv, g = pixel_inputs([im for _, im in scenes_], processor)
        toks = model.model.visual(pv, grid_thw=g).pooler_output  # [B*64, H]
        labs = [labels_of(objs) for objs, _ in scenes_]
        losses, accs = {}, {}
        for k, n in VISION_HEADS.items():
            y = torch.cat([lab[k] for lab in labs])
            logits = heads[k](toks)
            w = None
            if k in ("colour", "shape", "digit"):
                w = torch.ones(logits.shape[-1])
                w[0] = none_weight
            losses[k] = F.cross_entropy(logits, y, weight=w)
            sel = y > 0 if k in ("colour", "shape", "digit") else torch.ones_like(y, dtype=torch.bool)
            accs[f"acc_{k}"] = float((logits.argmax(-1)[sel] == y[sel]).float().mean()) if sel.any() else 0.0
        loss = sum(losses.values())
        return loss, dict(ce=float(loss.detach()), **accs)

    for p in model.model.language_model.parameters():
        p.requires_grad_(False)
    params = list(model.model.visual.parameters()) + list(heads.parameters())
    summary = run_loop({"visual": model.model.visual, "heads": heads}, params, step_fn, cfg, run_dir,
                       progress=progress, stop_after=stop_after)
    for p in model.model.language_model.parameters():
        p.requires_grad_(True)
    # held-out per-cell accuracy (on objects) of the final tower
    model.model.visual.eval()
    with torch.no_grad():
        scenes_ = [make_scene(vcfg, 10_000_000 + i) for i in range(32)]
        pv, g = pixel_inputs([im for _, im in scenes_], processor)
        toks = model.model.visual(pv, grid_thw=g).pooler_output
        labs = [labels_of(objs) for objs, _ in scenes_]
        acc = {}
        for k in VISION_HEADS:
            y = torch.cat([lab[k] for lab in labs])
            sel = y > 0 if k in ("colour", "shape", "digit") else torch.ones_like(y, dtype=torch.bool)
            acc[k] = round(float((heads[k](toks).argmax(-1)[sel] == y[sel]).float().mean()), 3)
        norm = float(toks.norm(dim=-1).mean())
    summary.update(cell_accuracy=acc, token_norm=round(norm, 3))
    return heads, summary


def freeze_and_rescale_tower(model, config: TestbedConfig, target_norm: float = TARGET_TOKEN_NORM) -> float:
    """Freeze the tower; scale the merger's last layer so merged tokens have `target_norm`."""
    with torch.no_grad():
        model.model.visual.eval()
        scenes_ = [make_scene(config, 20_000_000 + i)[1] for i in range(32)]
        norm = float(tower_tokens(model, scenes_).norm(dim=-1).mean())
        scale = target_norm / norm
        last = model.model.visual.merger.mlp[-1]
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    return scale


def reinit_language_model(model, std: float = LLM_INIT_STD, seed: int = 0) -> None:
    """Fresh normal(0, std) weights for the language model and LM head (norms stay 1)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in list(model.model.language_model.modules()) + [model.lm_head]:
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()


# ---------------------------------------------------------------- one QA / fine-tune stage

def llm_params(model) -> list:
    return list(model.model.language_model.parameters()) + list(model.lm_head.parameters())


def train_stage(model, tok, plan: Plan, train_bank: FeatureBank, val_bank: FeatureBank | None,
                cfg: StageConfig, run_dir: Path, teacher=None, teacher_plan: Plan | None = None,
                constant: torch.Tensor | None = None, progress: bool = True,
                stop_after: int | None = None) -> dict:
    """Train the language model on `plan` (tower frozen); keep the best by validation."""
    check_items(train_bank.items, plan, source=f"training data for {plan.spec.method}")
    bind_rope(model)
    stats = token_stats(train_bank) if plan.align == "lvr_mse" else None
    grid = train_bank.grid[1] // 2
    set_eager(model)
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    if teacher is not None:
        teacher.eval()
        set_eager(teacher)

    def step_fn(step, gen):
        model.train()
        idx = torch.randint(len(train_bank), (cfg.batch_size,), generator=gen).tolist()
        batch = collate(tok, train_bank, idx, plan)
        fill = fill_for(plan.latent_fill, train_bank, idx, batch.n_latents, constant)
        need_attn = plan.attn_weight > 0 or plan.hop_weight > 0
        frac = plan.bottleneck
        closed = frac >= 1.0 or (frac > 0 and bool(torch.rand((), generator=gen) < frac))
        out = forward(model, batch, plan, fill=fill, need_attn=need_attn, bottleneck=closed)
        sup = batch.labels != -100
        logits = model.lm_head(out.hidden[sup])
        ce = (F.cross_entropy(logits, batch.labels[sup], reduction="none") * batch.weights[sup]).sum() / len(idx)
        loss, scalars = ce, {"ce": float(ce.detach())}
        if plan.attn_weight > 0:
            a = attention_loss((out, plan.attn_layer), batch)
            loss = loss + plan.attn_weight * a
            scalars["attn"] = float(a.detach())
        if plan.hop_weight > 0:
            hl = hop_loss(out, plan.attn_layer + 1, batch)
            loss = loss + plan.hop_weight * hl
            scalars["hop"] = float(hl.detach())
        if batch.n_latents > 1 and plan.latent_fill == "hidden" and plan.spec.end_rule != "after_k_sample" \
                and plan.segment_weight > 0:
            # Monet's and Mirage's loops stop when the model picks the end token before a latent:
            # teach it to keep the segment open for its K steps (-log(1 - p_end) before each)
            s0, K = batch.slot_start, batch.n_latents
            end_id = tok.convert_tokens_to_ids(plan.spec.end_token)
            p_end = torch.softmax(model.lm_head(out.hidden[:, s0 - 1:s0 + K - 1]), -1)[..., end_id]
            open_loss = -(1 - p_end).clamp_min(1e-6).log().mean()
            loss = loss + plan.segment_weight * open_loss
        if plan.align:
            al = alignment_loss(model, tok, plan, batch, out, train_bank, idx, stats, grid, teacher, teacher_plan)
            loss = loss + plan.align_weight * al
            scalars["align"] = float(al.detach())
        return loss, scalars

    def eval_fn():
        recs = predict(model, tok, val_bank, plan, constant=constant)
        acc = accuracy_by_family(recs)
        return acc["all"], acc

    return run_loop({"llm": model.model.language_model, "lm_head": model.lm_head}, llm_params(model), step_fn,
                    cfg, run_dir, eval_fn if val_bank is not None else None, progress, stop_after)


def set_eager(model) -> None:
    """Eager attention (attention weights for the supervision); numerically equal to sdpa here."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"
