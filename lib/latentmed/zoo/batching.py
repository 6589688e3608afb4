"""Plans and batches: what one training stage feeds the model, collated in the testbed layout.

A `Plan` says what a method's sequence holds (segment, crop, degraded image), where latents
come from and which losses supervise it; `collate` turns items of a `FeatureBank` into one
left-padded `Batch` with labels, loss weights, attention-supervision targets and M-RoPE
positions computed exactly as Qwen2.5-VL does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..engine import layouts
from ..engine.spec import LatentSpec
from .bank import FeatureBank


@dataclass(frozen=True)
class Plan:
    """What one training stage feeds the model and what it supervises."""

    spec: LatentSpec
    n_latents: int = 0
    latent_fill: str = "hidden"  # hidden | crop (the crop's tokens) | evidence (the evidence cells' tokens) | constant
    with_crop: bool = False  # the evidence crop as an image right after the start token
    image: str = "main"  # main | degraded
    answer_weight: float = 1.0
    segment_weight: float = 1.0  # CE on start/end markers and caption tokens
    attn_weight: float = 0.0  # layer-1 attention of the key words onto the evidence cells
    attn_layer: int = 0
    count_attention: str = "sink"  # count family: its key word looks at the counted cells + a sink
    #                                (the vision-start token), uniformly: the share on the cells
    #                                is k/(k+1); "evidence": mass on the counted cells only
    hop_weight: float = 0.0  # layer-2 attention of the answering positions onto the key words:
    #   no segment: the last key word onto the other key words (relpos);
    #   with a segment: the position that predicts the answer onto the key words and the segment,
    #   and the position that opens the latents (or predicts the caption's answer word) onto the
    #   key words (where the evidence sits after layer 1)
    evidence_in: str = "image"  # image: every key word attends to the evidence cells; slots: the
    #                             restated ones attend to the slots (and the prompt's are free);
    #                             both: the prompt's to the evidence cells, the restated ones to the slots
    align: str | None = None  # lvr_mse | mirage_cos | monet_crop_cos | monet_latent_cos
    align_weight: float = 0.0
    align_on: str = "in"  # latents compared: "in" (fed vectors z) ; mirage stage 1 uses outputs
    ground_slots: bool = False  # the positions whose states become latents 1..K attend (layer 1) to
    #                             the evidence cells, cycling over them (relpos: A, B, A, B)
    bottleneck_frac: float | None = None  # share of training batches run with the bottleneck
    #                                       (None: all when spec.after_segment == "segment", else none)

    @property
    def bottleneck(self) -> float:
        """The share of batches trained with positions after the segment seeing only the segment."""
        if self.bottleneck_frac is not None:
            return self.bottleneck_frac
        return 1.0 if self.spec.after_segment == "segment" else 0.0

    def needs(self) -> set[str]:
        """Item fields this plan needs (checked before training starts)."""
        need = {"question", "options", "keywords", "answer_word"}
        if self.attn_weight > 0 or self.ground_slots or self.latent_fill == "evidence":
            need.add("evidence_cells")
        if self.spec.placement == "text":
            need.add("caption")
        if self.with_crop or self.latent_fill == "crop" or self.align in ("mirage_cos", "monet_crop_cos",
                                                                          "monet_latent_cos"):
            need.add("crop")
        if self.align == "lvr_mse":
            need.add("evidence_cells")
        return need

    def bank_kinds(self) -> tuple:
        kinds = {"degraded" if self.image == "degraded" else "main"}
        if self.latent_fill == "evidence":
            kinds.add("main")
        if "crop" in self.needs():
            kinds.add("crop")
        return tuple(sorted(kinds))


def check_items(items, plan: Plan, source: str = "dataset") -> None:
    """Every item has the fields the plan needs; otherwise name the source, item and field."""
    for it in items[:50]:
        for name in sorted(plan.needs()):
            get = (lambda k: it.get(k)) if isinstance(it, dict) else (lambda k: getattr(it, k, None))
            value = get(name)
            if name == "crop" and value is None:
                value = get("crop_box")  # feature banks drop the images but keep the crop's box
            if value is None or (name in ("caption", "question", "answer_word") and value == ""):
                ident = getattr(it, "id", None) if not isinstance(it, dict) else it.get("id")
                raise ValueError(f"{source}: item {ident} has no {name!r}, which method "
                                 f"{plan.spec.method!r} needs")
        if plan.attn_weight > 0 and not hasattr(it, "evidence_cells"):
            raise ValueError(f"{source}: items have no evidence cells (needed by the attention loss)")


@dataclass
class Batch:
    ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [3, B, L]
    image_feats: torch.Tensor  # [n_image_tokens_total, H] in sequence order
    labels: torch.Tensor  # [B, L] next-token targets at each position (-100 = none)
    weights: torch.Tensor  # [B, L] loss weight per supervised position
    answer_pos: torch.Tensor  # [B] position that predicts the answer
    prompt_end: int  # index of the last prompt token (same for all rows)
    slot_start: int  # first latent slot (or -1)
    n_latents: int
    attn_q: torch.Tensor  # [B, Q] query positions (-1 = none)
    attn_target: torch.Tensor  # [B, Q, L] 0/1 key positions to attend
    option_ids: torch.Tensor  # [B, 4]
    answer_index: torch.Tensor  # [B]
    bank_index: torch.Tensor  # [B]
    families: list
    crop_slots_pos: torch.Tensor | None = None  # [B, Tc] positions of crop image tokens (monet)
    hop_q: torch.Tensor | None = None  # [B, 2] query positions of the layer-2 hop (-1 = none)
    hop_target: torch.Tensor | None = None  # [B, 2, L] their target positions
    seg_end: int = -1  # index of the latent segment's end marker (the same in every row; -1: none)


def _keyword_targets(item, grid: int, img_start: int, kw_pos: list[int], count_mode: str):
    """(query position, key positions, uniform?) triples of the attention supervision."""
    cells = [tuple(c) for c in (item.evidence_cells or [])]
    pos = lambda c: img_start + c[0] * grid + c[1]  # noqa: E731
    if item.family == "count" and count_mode == "sink":
        return [(kw_pos[-1], [pos(c) for c in cells] + [img_start - 1], True)]
    if not cells:
        return []
    if len(cells) == len(kw_pos):
        return [(q, [pos(c)], False) for q, c in zip(kw_pos, cells)]
    return [(kw_pos[-1], [pos(c) for c in cells], False)]


def _slot_targets(item, grid: int, img_start: int, first_q: int, K: int, count_mode: str):
    """(query, key positions, uniform?) for the K positions whose states become the latents:
    each attends to an evidence cell, cycling over them; count spreads over the counted cells."""
    cells = [tuple(c) for c in (item.evidence_cells or [])]
    pos = lambda c: img_start + c[0] * grid + c[1]  # noqa: E731
    if item.family == "count" and count_mode == "sink":
        return [(first_q + k, [pos(c) for c in cells] + [img_start - 1], True) for k in range(K)]
    if not cells:
        return []
    return [(first_q + k, [pos(cells[k % len(cells)])], False) for k in range(K)]


def collate(tok, bank: FeatureBank, idx, plan: Plan) -> Batch:
    """Build one batch: left-pad prompts so the segment starts at one index, right-pad the rest."""
    spec = plan.spec
    idx = list(idx)
    items = [bank.items[i] for i in idx]
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    no_target = {image_id, tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")}
    start_id = tok.convert_tokens_to_ids(spec.start_token) if spec.start_token else None
    end_id = tok.convert_tokens_to_ids(spec.end_token) if spec.end_token else None
    grid = bank.grid[1] // 2
    n_img = grid * grid
    n_crop = bank.crop_grid[1] * bank.crop_grid[2] // 4

    rows = [_item_tokens(tok, bank, i, plan, image_id, n_img, n_crop) for i in idx]
    B = len(items)
    P = max(len(r[0]) for r in rows)
    L = max(P + len(r[1]) + len(r[2]) for r in rows)
    # filled as numpy arrays (an element write costs ~0.1 us there, ~3 us on a tensor), handed over as tensors
    ids = np.full((B, L), tok.pad_token_id, dtype=np.int64)
    am = np.zeros((B, L), dtype=np.int64)
    labels = np.full((B, L), -100, dtype=np.int64)
    weights = np.zeros((B, L), dtype=np.float32)
    answer_pos = np.zeros(B, dtype=np.int64)
    max_q = 4 + (plan.n_latents if plan.ground_slots else 0)
    attn_q = np.full((B, max_q), -1, dtype=np.int64)
    attn_target = np.zeros((B, max_q, L), dtype=np.float32)
    hop_q = np.full((B, 2), -1, dtype=np.int64)
    hop_target = np.zeros((B, 2, L), dtype=np.float32)
    feats, grids, crop_pos = [], [], []
    for b, (it, (prompt_x, seg_x, ans, n_tail, _)) in enumerate(zip(items, rows)):
        off = P - len(prompt_x)
        seq = prompt_x + seg_x + ans
        ids[b, off:off + len(seq)] = seq
        am[b, off:off + len(seq)] = 1
        a_at = P + len(seg_x)  # index of the answer token
        labels[b, a_at - 1] = ans[0]
        weights[b, a_at - 1] = plan.answer_weight
        labels[b, a_at] = ans[1]  # end of turn after the answer
        weights[b, a_at] = plan.answer_weight
        answer_pos[b] = a_at - 1
        n_seg = len(seg_x) - n_tail
        for j, t in enumerate(seg_x):  # markers, caption tokens, restated key words
            if j >= n_seg:  # the restated key words: copied from the prompt
                labels[b, P + j - 1] = t
                weights[b, P + j - 1] = plan.answer_weight
                continue
            is_slot = spec.has_latents and t not in (start_id, end_id)
            if t in no_target or is_slot or plan.segment_weight == 0:
                continue
            labels[b, P + j - 1] = t
            weights[b, P + j - 1] = plan.segment_weight
        feats.append(bank.degraded[idx[b]] if plan.image == "degraded" else bank.main[idx[b]])
        grids.append(list(bank.grid))
        if plan.with_crop:
            feats.append(bank.crop[idx[b]])
            grids.append(list(bank.crop_grid))
            crop_pos.append(list(range(P + 2, P + 2 + n_crop)))  # after start token, vision_start
        n_kw = len(it.keywords)
        kw_sets = [list(range(P - n_kw, P))]  # the prompt's key words ...
        if n_tail:  # ... and the restated ones after the segment
            kw_sets.append(list(range(P + n_seg, P + n_seg + n_tail)))
        q_i = 0
        if plan.attn_weight > 0:
            for s_i, kw_pos in enumerate(kw_sets):
                if plan.evidence_in in ("slots", "both") and s_i == 1:  # the evidence is in Z
                    attn_q[b, q_i] = kw_pos[-1]
                    attn_target[b, q_i, P + n_seg - 1 - plan.n_latents:P + n_seg - 1] = 1.0
                    q_i += 1
                    continue
                if plan.evidence_in == "slots":  # positive control: its degraded image holds no evidence
                    continue
                for q, targets, uniform in _keyword_targets(it, grid, off + 1, kw_pos, plan.count_attention):
                    if q_i < max_q:
                        attn_q[b, q_i] = q
                        attn_target[b, q_i, targets] = 2.0 if uniform else 1.0  # 2: each gets 1/n
                        q_i += 1
        if plan.ground_slots and spec.has_latents and plan.n_latents > 0:
            first = P + n_seg - plan.n_latents - 2  # the start marker: its state is latent 1
            for q, targets, uniform in _slot_targets(it, grid, off + 1, first, plan.n_latents, plan.count_attention):
                attn_q[b, q_i] = q
                attn_target[b, q_i, targets] = 2.0 if uniform else 1.0
                q_i += 1
        if plan.hop_weight > 0:
            last = kw_sets[-1]
            if n_kw > 1:  # relpos: the last key word reads the first one's object (layer 2)
                hop_q[b, 0] = last[-1]
                hop_target[b, 0, last[0]:last[-1]] = 1.0
            src = -1
            if spec.has_latents and plan.n_latents > 0:
                src = P + n_seg - plan.n_latents - 2  # the position whose state is z_1
            elif spec.placement == "text":
                word = tok.convert_tokens_to_ids(tok.tokenize(" " + it.caption_answer_word))
                hits = [j for j, t in enumerate(seg_x[:n_seg]) if t == word[0]] if len(word) == 1 else []
                src = P + hits[0] - 1 if hits else -1
            if src >= 0:  # the segment's first step reads the key words (where the evidence sits)
                hop_q[b, 1] = src
                hop_target[b, 1, P - n_kw:P] = 1.0
    pos = torch.zeros((3, B, L), dtype=torch.long)  # padding keeps position 0, as Qwen2.5-VL leaves it
    row_grids = [list(bank.grid)] + ([list(bank.crop_grid)] if plan.with_crop else [])
    for b, (i, (prompt_x, seg_x, ans, _, _)) in enumerate(zip(idx, rows)):
        off, seq = P - len(prompt_x), prompt_x + seg_x + ans
        pos[:, b, off:off + len(seq)] = _row_positions(bank, (tok, spec, plan.n_latents, plan.with_crop, i), seq,
                                                       row_grids, image_id)
    option_ids = torch.tensor([r[4] for r in rows])
    answer_index = torch.tensor([it.options.index(it.answer_word) for it in items])
    has_k = spec.has_latents and plan.n_latents > 0
    slot_start = P + 1 + (n_crop + 2 if plan.with_crop else 0) if has_k else -1
    t = torch.from_numpy
    return Batch(t(ids), t(am), pos, torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]), t(labels), t(weights),
                 t(answer_pos), P - 1, slot_start, plan.n_latents if has_k else 0, t(attn_q), t(attn_target),
                 option_ids, answer_index, torch.as_tensor(idx), [it.family for it in items],
                 torch.tensor(crop_pos) if crop_pos else None, t(hop_q), t(hop_target),
                 P + n_seg - 1 if spec.has_latents else -1)


def _item_tokens(tok, bank: FeatureBank, i: int, plan: Plan, image_id: int, n_img: int, n_crop: int) -> tuple:
    """(prompt, segment + restated key words, answer + end of turn, number restated, option ids) of
    item `i` as token ids with image pads expanded; computed once per tokenizer and layout."""
    spec = plan.spec
    key = (tok, spec, plan.n_latents, plan.with_crop, i)
    hit = bank.token_cache.get(key)
    if hit is not None:
        return hit

    def expand(seq, n):
        out = []
        for t in seq:
            out.extend([image_id] * n if t == image_id else [t])
        return tuple(out)

    it = bank.items[i]
    prompt = tok.encode(layouts.testbed_prompt(None, it, spec), add_special_tokens=False)
    seg = tok.encode(layouts.segment_text(spec, it, plan.n_latents, plan.with_crop), add_special_tokens=False)
    tail = tok.encode(layouts.answer_prefix(it, spec), add_special_tokens=False) if seg else []
    # the answer, then end-of-turn: trained so free generation stops after the answer
    ans = tok.encode(layouts.answer_text(it.answer_word), add_special_tokens=False) + [tok.eos_token_id]
    row = (expand(prompt, n_img), expand(seg, n_crop) + tuple(tail), tuple(ans), len(tail),
           tuple(layouts.option_token_ids(tok, it.options)))
    bank.token_cache[key] = row
    return row


_ROPE_MODEL = {}


def _row_positions(bank: FeatureBank, key: tuple, seq: tuple, grids: list, image_id: int) -> torch.Tensor:
    """[3, len(seq)] 3-D rope positions of one unpadded row exactly as Qwen2.5-VL computes them
    (each row's depend on its own tokens and images only); cached with the row's tokens."""
    fn, rope = _ROPE_MODEL.get("fn"), _ROPE_MODEL.get("key")
    if fn is None:
        raise RuntimeError("call train.bind_rope(model) before collate()")
    full = ("positions", rope) + key
    hit = bank.token_cache.get(full)
    if hit is None:
        ids = torch.tensor([seq])
        hit = fn(ids, mm_token_type_ids=(ids == image_id).int(), image_grid_thw=torch.tensor(grids),
                 attention_mask=torch.ones_like(ids))[0][:, 0]
        bank.token_cache[full] = hit
    return hit


def bind_rope(model) -> None:
    """Use `model`'s rope rule (its vision merge size and temporal rate are part of the cache key)."""
    v = model.config.vision_config
    _ROPE_MODEL["fn"] = model.model.get_rope_index
    _ROPE_MODEL["key"] = (v.spatial_merge_size, getattr(v, "tokens_per_second", None))
