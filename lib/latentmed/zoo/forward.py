"""The training-side forward: teacher-forced, with the latent segment run as a fed-back loop.

A latent segment is a differentiable loop over an explicit KV cache: the final post-norm hidden
state of the previous position is fed back as the next input embedding (gradients flow through
the cache), or the slots are filled from outside (the controls' crop tokens or constants).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..engine.attention import SPEC_RULES, additive, allowed
from ..engine.trace import Segment
from .batching import Batch, Plan


@dataclass
class Out:
    hidden: torch.Tensor  # [B, L', H] final post-norm hidden states
    z_in: torch.Tensor | None  # [B, K, H] vectors written at the latent slots
    attn: tuple | None  # per layer [B, heads, L, L] attention weights of the prefix
    attn_parts: list = field(default_factory=list)  # (first query position, per-layer attentions)


def embed(model, batch: Batch) -> torch.Tensor:
    emb = model.model.get_input_embeddings()(batch.ids)
    mask = (batch.ids == model.config.image_token_id)
    emb = emb.masked_scatter(mask.unsqueeze(-1), batch.image_feats.to(emb.dtype))
    return emb


def segment_mask(batch: Batch, rules, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] additive mask: causal attention with padding and the spec's rules after the
    segment (e.g. the bottleneck: every position from the end marker on sees only the segment and
    later positions), exactly as the engine applies them (`engine.attention.allowed`)."""
    B, L = batch.ids.shape
    P, s0, K = batch.prompt_end + 1, batch.slot_start, batch.n_latents
    seg = Segment(start=P, slots=list(range(s0, s0 + K)) if K else [], end=batch.seg_end)
    rule = allowed(range(L), L, torch.zeros(L, dtype=torch.bool), [seg], rules)
    am = batch.attention_mask.bool()
    ok = rule[None] & am[:, None, :]
    ok |= torch.eye(L, dtype=torch.bool)[None]  # padding rows attend to themselves
    return additive(ok, dtype)[:, None]


def bottleneck_mask(batch: Batch, plan: Plan, dtype: torch.dtype, bottleneck: bool | None = None):
    """`segment_mask` of the plan's spec rules (or of the bottleneck closed / open), None without rules."""
    rules = SPEC_RULES[plan.spec.after_segment] if bottleneck is None else \
        SPEC_RULES["segment" if bottleneck else "all"]
    return segment_mask(batch, rules, dtype) if rules and batch.seg_end >= 0 else None


def forward(model, batch: Batch, plan: Plan, fill: torch.Tensor | None = None, need_attn: bool = False,
            bottleneck: bool | None = None) -> Out:
    """Teacher-forced forward; latent slots are filled from `fill` or by the fed-back loop.
    `bottleneck` (default: the plan's spec) closes every route around the segment."""
    lm = model.model.language_model
    emb = embed(model, batch)
    pos, am = batch.position_ids, batch.attention_mask
    K, s0 = batch.n_latents, batch.slot_start
    kw = dict(output_attentions=True) if need_attn else {}
    mask4 = bottleneck_mask(batch, plan, emb.dtype, bottleneck)
    if K == 0 or plan.latent_fill != "hidden":
        z = None
        if K > 0:
            z = fill.to(emb.dtype)
            emb = torch.cat([emb[:, :s0], z, emb[:, s0 + K:]], dim=1)
        out = lm(inputs_embeds=emb, position_ids=pos, attention_mask=am if mask4 is None else mask4, **kw)
        att = out.attentions if need_attn else None
        return Out(out.last_hidden_state, z, att, [(0, att)] if need_attn else [])
    return after_segment(model, batch, emb, latent_loop(lm, emb, batch, K, kw), mask4, kw)


@dataclass
class Loop:
    """The prefix and the fed-back steps of `latent_loop`: the cache after them, the hidden
    states (the prefix's [B, s0, H], then one [B, 1, H] per step), the vectors fed, attentions."""
    cache: DynamicCache
    hs: list
    zs: list
    attn: tuple | None = None
    parts: list = field(default_factory=list)


def latent_loop(lm, emb: torch.Tensor, batch: Batch, K: int, kw: dict, stop=None) -> Loop:
    """The prompt up to the first slot, then up to K steps that feed the last hidden state back
    as the next input. `stop(k, h) -> bool`, asked before step k with the last hidden state
    [B, 1, H], ends the loop early (the evaluation's model-decided end)."""
    pos, am, s0 = batch.position_ids, batch.attention_mask, batch.slot_start
    cache = DynamicCache(config=lm.config)
    out = lm(inputs_embeds=emb[:, :s0], position_ids=pos[:, :, :s0], attention_mask=am[:, :s0], cache=cache,
             use_cache=True, **kw)
    attn = out.attentions if kw.get("output_attentions") else None
    loop = Loop(cache, [out.last_hidden_state], [], attn, [(0, attn)] if attn is not None else [])
    h = out.last_hidden_state[:, -1:]
    for k in range(K):
        if stop is not None and stop(k, h):
            break
        loop.zs.append(h)
        o = lm(inputs_embeds=h, position_ids=pos[:, :, s0 + k:s0 + k + 1], attention_mask=am[:, :s0 + k + 1],
               cache=cache, use_cache=True, **kw)
        if attn is not None:
            loop.parts.append((s0 + k, o.attentions))
        h = o.last_hidden_state
        loop.hs.append(h)
    return loop


def after_segment(model, batch: Batch, emb: torch.Tensor, loop: Loop, mask4=None, kw=None) -> Out:
    """The positions after a fed-back segment, on the cache of `loop` (the prefix and the
    segment's K steps): the end of `forward`, also run by the evaluation on its own stopping
    loop when every row ran the whole segment (the same calls, so the same numbers)."""
    kw, hs, parts = kw or {}, list(loop.hs), list(loop.parts)
    K, s0, am = batch.n_latents, batch.slot_start, batch.attention_mask
    if emb.shape[1] > s0 + K:
        rest = am if mask4 is None else mask4[:, :, s0 + K:]
        o = model.model.language_model(inputs_embeds=emb[:, s0 + K:], position_ids=batch.position_ids[:, :, s0 + K:],
                                       attention_mask=rest, cache=loop.cache, use_cache=True, **kw)
        hs.append(o.last_hidden_state)
        if kw.get("output_attentions"):
            parts.append((s0 + K, o.attentions))
    return Out(torch.cat(hs, dim=1), torch.cat(loop.zs, dim=1), loop.attn, parts)


def logits_at(model, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """lm_head at one position per row: [B, V]."""
    return model.lm_head(hidden[torch.arange(hidden.shape[0]), positions])
