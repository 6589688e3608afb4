"""Training losses beside the answer's cross-entropy: attention supervision and latent alignment."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .bank import FeatureBank
from .batching import Batch, collate
from .forward import Out, forward


def attention_loss(attn: tuple, batch: Batch) -> torch.Tensor:
    """Cross-entropy of the head-mean attention at the key-word positions onto their targets.

    Targets marked 1 share one mass (-log of the total attention on them); targets marked 2
    each get an equal share (-mean log attention, i.e. cross-entropy to a uniform target).
    """
    out, layer = attn
    valid = batch.attn_q >= 0
    if not valid.any():
        return out.hidden.new_zeros(())
    b_idx, q_idx = valid.nonzero(as_tuple=True)
    rows = attention_rows(out, layer, b_idx, batch.attn_q[b_idx, q_idx], batch.ids.shape[1])  # [n, L]
    tgt = batch.attn_target[b_idx, q_idx]
    mass = -(rows * (tgt == 1)).sum(-1).clamp_min(1e-6).log()
    each = tgt == 2
    spread = -(rows.clamp_min(1e-6).log() * each).sum(-1) / each.sum(-1).clamp_min(1)
    loss = torch.where(each.any(-1), spread, mass)
    return loss.mean()


def attention_rows(out: "Out", layer: int, b_idx: torch.Tensor, q_pos: torch.Tensor, L: int) -> torch.Tensor:
    """Head-mean attention rows [n, L] of `layer` at query positions (prefix, latent-step or suffix
    call). One gather per call: a backward of one indexing op per row would write a zero tensor
    of the whole attention map per row (measured: half of a training step's time)."""
    b_idx, q_pos = torch.as_tensor(b_idx), torch.as_tensor(q_pos)
    found = torch.zeros(len(q_pos), dtype=torch.bool)
    parts, order = [], []
    for start, att in out.attn_parts:
        a = att[layer]
        sel = (~found & (q_pos >= start) & (q_pos < start + a.shape[2])).nonzero(as_tuple=True)[0]
        if len(sel):
            found[sel] = True
            r = a[b_idx[sel], :, q_pos[sel] - start].mean(1)  # [n_sel, T_keys]
            parts.append(F.pad(r, (0, L - r.shape[-1])))
            order.append(sel)
    if not found.all():
        raise ValueError(f"no attention recorded at position {int(q_pos[~found][0])}")
    return torch.cat(parts)[torch.argsort(torch.cat(order))]


def hop_loss(out: "Out", layer: int, batch: Batch) -> torch.Tensor:
    """-log(head-mean layer-2 attention mass of the answering positions on their targets)."""
    valid = batch.hop_q >= 0
    if not valid.any():
        return out.hidden.new_zeros(())
    b_idx, j = valid.nonzero(as_tuple=True)
    L = batch.ids.shape[1]
    rows = attention_rows(out, layer, b_idx, batch.hop_q[b_idx, j], L)
    mass = (rows * batch.hop_target[b_idx, j]).sum(-1)
    return -(mass.clamp_min(1e-6)).log().mean()


def cosine_loss(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    c = 1 - F.cosine_similarity(a, b, dim=-1)  # [B, K]
    if mask is None:
        return c.mean()
    m = mask.float()
    return (c * m).sum() / m.sum().clamp_min(1)


@dataclass
class Stats:
    mean: torch.Tensor
    std: torch.Tensor


def token_stats(bank: FeatureBank) -> Stats:
    x = bank.main.reshape(-1, bank.main.shape[-1])
    return Stats(x.mean(0), x.std(0).clamp_min(1e-6))


def lvr_targets(bank: FeatureBank, batch: Batch, K: int, grid: int, stats: Stats):
    """Evidence-cell tokens of the scene, cycled over K slots, standardised; mask rows without."""
    B, H = len(batch.bank_index), bank.main.shape[-1]
    tgt = torch.zeros(B, K, H)
    mask = torch.zeros(B, K, dtype=torch.bool)
    for b, i in enumerate(batch.bank_index.tolist()):
        cells = bank.items[i].evidence_cells
        if not cells:
            continue
        toks = bank.main[i, [r * grid + c for r, c in cells]]
        tgt[b] = (toks[torch.arange(K) % len(cells)] - stats.mean) / stats.std
        mask[b] = True
    return tgt, mask


def alignment_loss(model, tok, plan, batch, out, bank, idx, stats, grid, teacher, teacher_plan):
    K, s0 = batch.n_latents, batch.slot_start
    if plan.align == "lvr_mse":  # LVR: regress latents onto (standardised) evidence-cell tokens
        tgt, mask = lvr_targets(bank, batch, K, grid, stats)
        if not mask.any():
            return out.hidden.new_zeros(())
        return (out.z_in - tgt).pow(2).mean(-1)[mask].mean()
    if plan.align == "mirage_cos":  # Mirage stage 1: hidden before each slot -> pooled helper tokens
        z_out = out.hidden[:, s0 - 1:s0 + K - 1]
        tgt = bank.crop[idx]
        tgt = tgt[:, torch.arange(K) % tgt.shape[1]]
        return cosine_loss(z_out, tgt)
    with torch.no_grad():
        tb = collate(tok, bank, idx, teacher_plan)
        t_out = forward(teacher, tb, teacher_plan)
    if plan.align == "monet_crop_cos":  # Monet stage 2: latents -> teacher's states at the crop
        reps = t_out.hidden[torch.arange(len(idx))[:, None], tb.crop_slots_pos]  # [B, Tc, H]
        tgt = reps[:, torch.arange(K) % reps.shape[1]]
        return cosine_loss(out.z_in, tgt)
    if plan.align == "monet_latent_cos":  # Monet stage 3: latents -> stage-2 model's latents
        return cosine_loss(out.z_in, t_out.z_in)
    raise ValueError(f"unknown alignment {plan.align!r}")
