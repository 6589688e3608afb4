"""The fast batched evaluation path used during training (validation accuracy per family).

It runs every item as at inference (latents by the loop, captions generated greedily) on the
feature bank's tokens. The study measures through the engine (`latentmed.engine`); a test
checks that both give the same per-item answers on every zoo model.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from transformers import DynamicCache

from ..engine import layouts
from ..testbed.items import FAMILIES
from .bank import FILL_OF_SOURCE, FeatureBank, fill_for
from .batching import Plan, bind_rope, collate
from .forward import after_segment, bottleneck_mask, embed, forward, latent_loop, logits_at


@torch.no_grad()
def predict(model, tok, bank: FeatureBank, plan: Plan, batch_size: int = 64,
            constant: torch.Tensor | None = None, max_caption: int = 16) -> list[dict]:
    """Run every item as at inference (latents by the loop, captions generated greedily).

    Returns one record per item: family, correct, predicted option, option log-probs, natural
    trigger of the segment, K, whether the segment ended on its own, and non-finite values.
    """
    model.eval()
    bind_rope(model)
    spec = plan.spec
    records = []
    fill = FILL_OF_SOURCE[spec.latent_source]
    eval_plan = replace(plan, attn_weight=0.0, hop_weight=0.0, segment_weight=0.0, latent_fill=fill)
    for s in range(0, len(bank), batch_size):
        idx = list(range(s, min(s + batch_size, len(bank))))
        if spec.placement == "text":
            records += _predict_text(model, tok, bank, idx, eval_plan, max_caption)
        else:
            records += _predict_latent(model, tok, bank, idx, eval_plan, constant)
    return records


def _record(bank, batch_row_item, logits_opts, logp_full_argmax, trig, k, ended, nonfinite):
    lp = torch.log_softmax(logits_opts, -1)
    pred = int(lp.argmax())
    it = batch_row_item
    return dict(id=it.id, family=it.family, answer=it.options.index(it.answer_word), pred=pred,
                correct=bool(pred == it.options.index(it.answer_word)),
                logprobs=[round(float(v), 6) for v in lp], trigger=trig, k=k, ended=ended,
                nonfinite=bool(nonfinite))


def _predict_latent(model, tok, bank, idx, plan, constant):
    spec = plan.spec
    items = [bank.items[i] for i in idx]
    src = spec.latent_source
    K = plan.n_latents if spec.has_latents else 0
    if K == 0:
        batch = collate(tok, bank, idx, replace(plan, n_latents=0))
        out = forward(model, batch, plan)
        logits = logits_at(model, out.hidden, batch.answer_pos)
        opts = logits.gather(1, batch.option_ids)
        return [_record(bank, it, opts[b], None, None, 0, None, not torch.isfinite(logits[b]).all())
                for b, it in enumerate(items)]
    start_id = tok.convert_tokens_to_ids(spec.start_token)
    end_id = tok.convert_tokens_to_ids(spec.end_token)
    if src != "hidden":  # the controls: K vectors from outside the model, then the end marker
        batch = collate(tok, bank, idx, plan)
        out = forward(model, batch, plan, fill=fill_for(plan.latent_fill, bank, idx, K, constant))
        trig_logits = logits_at(model, out.hidden, torch.full((len(idx),), batch.prompt_end))
        end_logits = logits_at(model, out.hidden, torch.full((len(idx),), batch.slot_start + K - 1))
        logits = logits_at(model, out.hidden, batch.answer_pos)
        opts = logits.gather(1, batch.option_ids)
        z = out.z_in
        return [_record(bank, it, opts[b], None, bool(trig_logits[b].argmax() == start_id), K,
                        bool(end_logits[b].argmax() == end_id),
                        not (torch.isfinite(logits[b]).all() and torch.isfinite(z[b]).all()))
                for b, it in enumerate(items)]
    # the model's own latents, as the engine's loop runs them: before each latent the model may
    # pick the end token (model_or_cap: Mirage, up to the cap; force_after_k: Monet's loop, end
    # forced at K); after_k_sample (LVR) runs exactly K, then its next token decides.
    cap = (spec.max_latents or K) if spec.end_rule == "model_or_cap" else K
    may_end = spec.end_rule != "after_k_sample"
    probe = collate(tok, bank, idx, replace(plan, n_latents=cap))
    emb = embed(model, probe)
    ks = torch.full((len(idx),), cap, dtype=torch.long)
    done = torch.zeros(len(idx), dtype=torch.bool)

    def stop(k, h):  # the engine's rule: a model-decided end may come before any latent; otherwise after one
        can_end = may_end and (k > 0 or spec.end_rule == "model_or_cap")
        now = (model.lm_head(h[:, 0]).argmax(-1) == end_id) & ~done & can_end
        ks[now] = k
        done[now] = True
        return bool(done.all())

    loop = latent_loop(model.model.language_model, emb, probe, cap, {}, stop)
    trig = model.lm_head(loop.hs[0][:, -2]).argmax(-1) == start_id
    records = [None] * len(idx)
    for k in sorted(set(ks.tolist())):
        rows = [j for j in range(len(idx)) if ks[j] == k]
        sub = [idx[j] for j in rows]
        if k == 0:
            batch = collate(tok, bank, sub, replace(plan, n_latents=0))
            out = forward(model, batch, replace(plan, n_latents=0))
            z_ok = torch.ones(len(rows), dtype=torch.bool)
        else:
            kplan = replace(plan, n_latents=k)
            if k == cap and len(rows) == len(idx):  # every row ran the whole segment: the probe is
                # forward's own prefix and loop on this very batch, so only the rest is run
                out = after_segment(model, probe, emb, loop, bottleneck_mask(probe, kplan, emb.dtype))
                batch = probe
            else:
                batch = collate(tok, bank, sub, kplan)
                out = forward(model, batch, kplan)
            z_ok = torch.isfinite(out.z_in).flatten(1).all(1)
        logits = logits_at(model, out.hidden, batch.answer_pos)
        opts = logits.gather(1, batch.option_ids)
        # ended on its own: an early end, or the end marker as the model's choice after the cap
        own_end = (logits_at(model, out.hidden, torch.full((len(rows),), batch.slot_start + k - 1)).argmax(-1)
                   == end_id) if k > 0 else torch.ones(len(rows), dtype=torch.bool)
        for r, j in enumerate(rows):
            records[j] = _record(bank, bank.items[idx[j]], opts[r], None, bool(trig[j]), k,
                                 bool(k < cap or own_end[r]), not (torch.isfinite(logits[r]).all() and z_ok[r]))
    return records


def _predict_text(model, tok, bank, idx, plan, max_caption):
    """CapImagine: greedy imagination from the prompt (end marker forced at the cap), then the
    restated key words (forced), then the answer is scored at the last of them."""
    spec = plan.spec
    start_id = tok.convert_tokens_to_ids(spec.start_token)
    end_id = tok.convert_tokens_to_ids(spec.end_token)
    eos_ids = set(spec.resolve(tok, model.config.to_dict())[1].eos)  # the engine's EOS ids
    base = collate(tok, bank, idx, replace(plan, spec=replace(spec, placement="none")))
    lm = model.model.language_model
    P = base.prompt_end + 1
    pos = base.position_ids[:, :, :P]
    am = base.attention_mask[:, :P]
    cache = DynamicCache(config=lm.config)
    out = lm(inputs_embeds=embed(model, base)[:, :P], position_ids=pos, attention_mask=am, cache=cache,
             use_cache=True)
    logits = model.lm_head(out.last_hidden_state[:, -1])
    trig = logits.argmax(-1) == start_id
    B = len(idx)
    tails = [tok.encode(layouts.answer_prefix(bank.items[i], spec), add_special_tokens=False) for i in idx]
    last_pos = pos[:, :, -1].max(0).values  # [B] text position of the last prompt token
    answer_logits = torch.zeros(B, logits.shape[-1])
    got = [False] * B
    ended = [False] * B
    phase = [0] * B  # 0: imagining, 1: restating the key words
    fed_tail = [0] * B
    texts = [[] for _ in range(B)]
    nonfinite = (~torch.isfinite(logits).all(-1)).tolist()
    nxt = [start_id] * B  # the segment is opened (forced if needed)
    for t in range(max_caption + 2 + max(len(x) for x in tails)):
        am = torch.cat([am, torch.ones(B, 1, dtype=am.dtype)], dim=1)
        p = (last_pos + 1 + t).view(1, B, 1).expand(3, B, 1)
        o = lm(inputs_embeds=model.model.get_input_embeddings()(torch.tensor(nxt)[:, None]), position_ids=p,
               attention_mask=am, cache=cache, use_cache=True)
        logits = model.lm_head(o.last_hidden_state[:, -1])
        cand = logits.argmax(-1).tolist()
        bad = (~torch.isfinite(logits).all(-1)).tolist()
        new = []
        for b in range(B):
            if got[b]:
                new.append(tok.pad_token_id)
                continue
            nonfinite[b] = nonfinite[b] or bad[b]
            if phase[b] == 0 and nxt[b] == end_id:
                phase[b] = 1
            elif phase[b] == 0 and nxt[b] != start_id:
                texts[b].append(nxt[b])
            if phase[b] == 1:
                if fed_tail[b] == len(tails[b]):  # the last key word was just fed: the answer
                    answer_logits[b] = logits[b]
                    got[b] = True
                    new.append(tok.pad_token_id)
                else:
                    new.append(tails[b][fed_tail[b]])
                    fed_tail[b] += 1
                continue
            if cand[b] == end_id:
                ended[b] = True
                new.append(end_id)
            elif len(texts[b]) >= max_caption or cand[b] in eos_ids:  # the engine's forced protocol: cap or EOS
                new.append(end_id)
            else:
                new.append(cand[b])
        nxt = new
        if all(got):
            break
    records = []
    for b, i in enumerate(idx):
        opts = answer_logits[b].gather(0, base.option_ids[b])
        rec = _record(bank, bank.items[i], opts, None, bool(trig[b]), len(texts[b]), ended[b], nonfinite[b])
        rec["imagination"] = tok.decode(texts[b])
        records.append(rec)
    return records


def accuracy_by_family(records: list[dict]) -> dict[str, float]:
    out = {}
    for fam in FAMILIES:
        r = [x["correct"] for x in records if x["family"] == fam]
        if r:
            out[fam] = float(np.mean(r))
    out["all"] = float(np.mean([x["correct"] for x in records])) if records else float("nan")
    return out
