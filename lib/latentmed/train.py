"""One training loop for the whole testbed zoo: vision stage, grounded QA, method fine-tunes.

The shared base model (the testbed's stand-in for a pretrained Qwen2.5-VL) is trained in two
steps, following what `reference/training-feasibility.md` measured to work at this size:

1. `vision_stage`: the vision tower and merger learn dense per-cell labels (colour, shape,
   digit, row, column of what each merged image token covers) on digit-rich scenes; then the
   tower is frozen and the merger's last layer is rescaled so merged image tokens have the
   norm of word embeddings.
2. `train_stage` with the base `Plan`: grounded question answering in the testbed layout
   (`latentmed.layouts`), answer = the option's content word, plus an auxiliary loss on the
   last key words' layer-1 attention onto the generator's evidence cells.

Every method is a `Plan` (what the sequence holds, where latents come from, which losses) run
by the same `train_stage`. The tower is frozen after the vision stage, so its merged tokens are
computed once per item (`FeatureBank`) and training runs the language model only; a latent
segment is run as a differentiable loop over an explicit KV cache, feeding the final post-norm
hidden state of the previous position back as the next input embedding.

Stages run in the resumable loop of `latentmed.loop`; the 7B SFT path is `latentmed.sft`.
"""

from __future__ import annotations

import os

# Busy-waiting OpenMP threads make a shared 2-core machine crawl (measured: a tower forward of
# 32 images took 4.3 s with the default policy next to another job, 0.86 s with PASSIVE).
# Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import DynamicCache

from . import layouts
from .loop import StageConfig, _atomic_save, run_loop
from .spec import LatentSpec
from .testbed import FAMILIES, TestbedConfig, cell_labels, make_item, make_scene
from .tiny import image_processor

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "latent_spec.json")
VISION_HEADS = {"colour": 7, "shape": 5, "digit": 11, "row": None, "col": None}
LLM_INIT_STD = 0.088  # re-initialisation of the language model (measured to help retrieval)
TARGET_TOKEN_NORM = 1.0  # merged image tokens are scaled to about a word embedding's norm


def set_threads() -> None:
    """LATENTMED_THREADS, when set, fixes torch's thread count (otherwise torch's default,
    or what the caller chose, e.g. the test suite's single thread)."""
    if os.environ.get("LATENTMED_THREADS"):
        torch.set_num_threads(int(os.environ["LATENTMED_THREADS"]))


# ---------------------------------------------------------------- checkpoint helpers

def check_checkpoint(path: str | Path, required=REQUIRED_FILES) -> Path:
    """A checkpoint folder with every file training and the engine need, or a clear error."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint folder does not exist")
    missing = [f for f in required if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"{path}: incomplete checkpoint folder, missing {', '.join(missing)}")
    return path


def load_model(path: str | Path):
    """Tokenizer + model (safetensors only) + spec from a checkpoint folder, with clear errors."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .tokenizer import load_tokenizer

    from transformers.utils import logging as hf_logging

    path = check_checkpoint(path)
    tok = load_tokenizer(path)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no per-load bars in notebooks and logs
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), use_safetensors=True,
                                                                   local_files_only=True)
    except Exception as exc:  # name the folder whatever went wrong inside transformers
        raise ValueError(f"{path}: cannot load the model ({type(exc).__name__}: {exc})") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    check_tokenizer_matches(model, tok, path)
    return model.eval(), tok, LatentSpec.load(path)


def check_tokenizer_matches(model, tok, where) -> None:
    """The model's special ids and vocabulary must fit this tokenizer."""
    cfg = model.config
    problems = []
    for name, token in (("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
                        ("vision_end_token_id", "<|vision_end|>")):
        want = tok.convert_tokens_to_ids(token)
        if getattr(cfg, name, None) != want:
            problems.append(f"{name}={getattr(cfg, name, None)} but the tokenizer has {token}={want}")
    vocab = model.get_input_embeddings().weight.shape[0]
    if vocab < len(tok):
        problems.append(f"embedding has {vocab} rows but the tokenizer has {len(tok)} tokens")
    if problems:
        raise ValueError(f"{where}: the model does not match the tokenizer: {'; '.join(problems)}")


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- image features

def pixel_inputs(images, processor):
    out = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


@torch.no_grad()
def tower_tokens(model, images, processor=None, batch_size: int = 32) -> torch.Tensor:
    """Merged image tokens [N, T, H] of same-size images, as the model scatters them."""
    processor = processor or image_processor()
    out = []
    for i in range(0, len(images), batch_size):
        pv, grid = pixel_inputs(images[i:i + batch_size], processor)
        feats = model.model.visual(pv, grid_thw=grid).pooler_output
        out.append(feats.view(len(grid), -1, feats.shape[-1]))
    return torch.cat(out)


@dataclass
class FeatureBank:
    """Items of one split with their merged image tokens (the tower is frozen)."""

    items: list  # Item (images dropped to save memory)
    main: torch.Tensor  # [N, T, H] tokens of the scene
    crop: torch.Tensor | None = None  # [N, Tc, H] tokens of the evidence crop
    degraded: torch.Tensor | None = None  # [N, T, H] tokens of the degraded scene
    grid: tuple = (1, 16, 16)
    crop_grid: tuple = (1, 4, 4)

    def __len__(self) -> int:
        return len(self.items)

    def family_index(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, it in enumerate(self.items):
            out.setdefault(it.family, []).append(i)
        return out


def build_bank(model, config: TestbedConfig, split: str, per_family: int | dict, kinds=("main",),
               cache_dir: Path | None = None, progress: bool = True, offset: int = 0) -> FeatureBank:
    """Make items (`make_item`) and compute their tower tokens, each kind cached on disk.

    kinds: "main" (the scene), "crop" (the evidence crop), "degraded" (the scene box-averaged
    to 56 px and back). The cache key is a hash of the tower's weights, the testbed config,
    the split, the item counts and the kind.
    """
    counts = per_family if isinstance(per_family, dict) else {f: per_family for f in config.families}
    keys = [(f, offset + i) for f in config.families for i in range(counts.get(f, 0))]
    base_key = dict(tower=state_hash(model.model.visual), config=config.to_dict(), split=split, counts=counts,
                    offset=offset)
    paths = {k: (Path(cache_dir) / f"bank-{split}-{k}-{settings_hash(dict(base_key, kind=k))}.safetensors"
                 if cache_dir else None) for k in kinds}
    tensors = {k: load_file(str(p))["tokens"] for k, p in paths.items() if p is not None and p.exists()}
    todo = [k for k in kinds if k not in tensors]
    processor = image_processor()
    parts: dict[str, list] = {k: [] for k in todo}
    items, chunk = [], 64
    bar = tqdm(total=len(keys), desc=f"tower tokens {split} {'+'.join(todo)}", disable=not progress or not todo,
               leave=False)
    for s in range(0, len(keys), chunk):
        part = [make_item(config, split, f, i) for f, i in keys[s:s + chunk]]
        for k in todo:
            imgs = {"main": lambda it: it.image, "crop": lambda it: it.crop,
                    "degraded": lambda it: layouts.degrade(it.image)}[k]
            parts[k].append(tower_tokens(model, [imgs(it) for it in part], processor))
        for it in part:
            it.image = it.crop = None
        items.extend(part)
        bar.update(len(part))
    bar.close()
    for k in todo:
        tensors[k] = torch.cat(parts[k]) if parts[k] else torch.zeros(0)
        if paths[k] is not None:
            paths[k].parent.mkdir(parents=True, exist_ok=True)
            _atomic_save({"tokens": tensors[k].contiguous()}, paths[k])
    g = config.grid * 2
    return FeatureBank(items, tensors.get("main"), tensors.get("crop"), tensors.get("degraded"), (1, g, g),
                       (1, config.crop_size // 14, config.crop_size // 14))


# ---------------------------------------------------------------- plans (per-method collation)

@dataclass(frozen=True)
class Plan:
    """What one training stage feeds the model and what it supervises."""

    spec: LatentSpec
    n_latents: int = 0
    latent_fill: str = "hidden"  # hidden | crop (teacher tokens) | constant
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
    evidence_in: str = "image"  # where the restated key words' attention is sent: image | slots
    align: str | None = None  # lvr_mse | mirage_cos | monet_crop_cos | monet_latent_cos
    align_weight: float = 0.0
    align_on: str = "in"  # latents compared: "in" (fed vectors z) ; mirage stage 1 uses outputs

    def needs(self) -> set[str]:
        """Item fields this plan needs (checked before training starts)."""
        need = {"question", "options", "keywords", "answer_word"}
        if self.attn_weight > 0:
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

    def expand(seq, n):
        out = []
        for t in seq:
            out.extend([image_id] * n if t == image_id else [t])
        return out

    rows = []
    for it in items:
        prompt = tok.encode(layouts.testbed_prompt(None, it, spec), add_special_tokens=False)
        seg = tok.encode(layouts.segment_text(spec, it, plan.n_latents, plan.with_crop), add_special_tokens=False)
        tail = tok.encode(layouts.answer_prefix(it, spec), add_special_tokens=False) if seg else []
        # the answer, then end-of-turn: trained so free generation stops after the answer
        ans = tok.encode(layouts.answer_text(it.answer_word), add_special_tokens=False) + [tok.eos_token_id]
        rows.append((expand(prompt, n_img), expand(seg, n_crop) + tail, ans, len(tail)))
    B = len(items)
    P = max(len(r[0]) for r in rows)
    L = max(P + len(r[1]) + len(r[2]) for r in rows)
    ids = torch.full((B, L), tok.pad_token_id, dtype=torch.long)
    am = torch.zeros((B, L), dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    weights = torch.zeros((B, L))
    answer_pos = torch.zeros(B, dtype=torch.long)
    max_q = 4
    attn_q = torch.full((B, max_q), -1, dtype=torch.long)
    attn_target = torch.zeros((B, max_q, L))
    hop_q = torch.full((B, 2), -1, dtype=torch.long)
    hop_target = torch.zeros((B, 2, L))
    feats, grids, crop_pos = [], [], []
    for b, (it, (prompt_x, seg_x, ans, n_tail)) in enumerate(zip(items, rows)):
        off = P - len(prompt_x)
        seq = prompt_x + seg_x + ans
        ids[b, off:off + len(seq)] = torch.tensor(seq)
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
        if plan.attn_weight > 0:
            q_i = 0
            for s_i, kw_pos in enumerate(kw_sets):
                if plan.evidence_in == "slots" and s_i == 1:  # positive control: the evidence is in Z
                    attn_q[b, q_i] = kw_pos[-1]
                    attn_target[b, q_i, P + n_seg - 1 - plan.n_latents:P + n_seg - 1] = 1.0
                    q_i += 1
                    continue
                if plan.evidence_in == "slots":
                    continue
                for q, targets, uniform in _keyword_targets(it, grid, off + 1, kw_pos, plan.count_attention):
                    if q_i < max_q:
                        attn_q[b, q_i] = q
                        attn_target[b, q_i, targets] = 2.0 if uniform else 1.0  # 2: each gets 1/n
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
    mm = (ids == image_id).int()
    pos = _rope_positions(ids, mm, torch.tensor(grids), am)
    option_ids = torch.tensor([layouts.option_token_ids(tok, it.options) for it in items])
    answer_index = torch.tensor([it.options.index(it.answer_word) for it in items])
    has_k = spec.has_latents and plan.n_latents > 0
    slot_start = P + 1 + (n_crop + 2 if plan.with_crop else 0) if has_k else -1
    return Batch(ids, am, pos, torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]), labels, weights,
                 answer_pos, P - 1, slot_start, plan.n_latents if has_k else 0, attn_q, attn_target,
                 option_ids, answer_index, torch.as_tensor(idx), [it.family for it in items],
                 torch.tensor(crop_pos) if crop_pos else None, hop_q, hop_target)


_ROPE_MODEL = {}


def _rope_positions(ids, mm, grid, am):
    """3-D rope positions exactly as Qwen2.5-VL computes them (padding ignored)."""
    fn = _ROPE_MODEL.get("fn")
    if fn is None:
        raise RuntimeError("call train.bind_rope(model) before collate()")
    return fn(ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=am)[0]


def bind_rope(model) -> None:
    _ROPE_MODEL["fn"] = model.model.get_rope_index


# ---------------------------------------------------------------- forward with a latent loop

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


def forward(model, batch: Batch, plan: Plan, fill: torch.Tensor | None = None, need_attn: bool = False,
            layer_hidden: bool = False) -> Out:
    """Teacher-forced forward; latent slots are filled from `fill` or by the fed-back loop."""
    lm = model.model.language_model
    emb = embed(model, batch)
    pos, am = batch.position_ids, batch.attention_mask
    K, s0 = batch.n_latents, batch.slot_start
    kw = dict(output_attentions=True) if need_attn else {}
    if K == 0 or plan.latent_fill != "hidden":
        z = None
        if K > 0:
            z = fill.to(emb.dtype)
            emb = torch.cat([emb[:, :s0], z, emb[:, s0 + K:]], dim=1)
        out = lm(inputs_embeds=emb, position_ids=pos, attention_mask=am, **kw)
        att = out.attentions if need_attn else None
        return Out(out.last_hidden_state, z, att, [(0, att)] if need_attn else [])
    cache = DynamicCache(config=lm.config)
    out = lm(inputs_embeds=emb[:, :s0], position_ids=pos[:, :, :s0], attention_mask=am[:, :s0], cache=cache,
             use_cache=True, **kw)
    attn = out.attentions if need_attn else None
    hs = [out.last_hidden_state]
    h = out.last_hidden_state[:, -1:]
    zs = []
    for k in range(K):
        zs.append(h)
        o = lm(inputs_embeds=h, position_ids=pos[:, :, s0 + k:s0 + k + 1], attention_mask=am[:, :s0 + k + 1],
               cache=cache, use_cache=True)
        h = o.last_hidden_state
        hs.append(h)
    parts = [(0, attn)] if need_attn else []
    if emb.shape[1] > s0 + K:
        o = lm(inputs_embeds=emb[:, s0 + K:], position_ids=pos[:, :, s0 + K:], attention_mask=am, cache=cache,
               use_cache=True, **kw)
        hs.append(o.last_hidden_state)
        if need_attn:
            parts.append((s0 + K, o.attentions))
    return Out(torch.cat(hs, dim=1), torch.cat(zs, dim=1), attn, parts)


def logits_at(model, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """lm_head at one position per row: [B, V]."""
    return model.lm_head(hidden[torch.arange(hidden.shape[0]), positions])


# ---------------------------------------------------------------- losses

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
    """Head-mean attention rows [n, L] of `layer` at query positions (prefix or suffix call)."""
    rows = []
    for b, q in zip(b_idx.tolist(), q_pos.tolist()):
        for start, att in out.attn_parts:
            a = att[layer]
            if start <= q < start + a.shape[2]:
                r = a[b, :, q - start].mean(0)
                rows.append(F.pad(r, (0, L - r.shape[-1])))
                break
        else:
            raise ValueError(f"no attention recorded at position {q}")
    return torch.stack(rows)


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


def trivial_baselines(tgt: torch.Tensor, mask: torch.Tensor) -> dict:
    """MSE of predicting zero and the mean target (what an alignment loss must beat)."""
    t = tgt[mask]
    if t.numel() == 0:
        return {"mse_zero": float("nan"), "mse_mean": float("nan")}
    return {"mse_zero": float(t.pow(2).mean()), "mse_mean": float((t - t.mean(0)).pow(2).mean())}


# ---------------------------------------------------------------- evaluation (batched)

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
    fill = {"evidence_crop": "crop", "constant": "constant"}.get(layouts.latent_source(spec), "hidden")
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
    src = layouts.latent_source(spec)
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
        fill = None
        if src == "evidence_crop":
            fill = bank.crop[idx]
        elif src == "constant":
            fill = constant.unsqueeze(0).expand(len(idx), -1, -1)
        out = forward(model, batch, plan, fill=fill)
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
    lm = model.model.language_model
    emb = embed(model, probe)
    s0 = probe.slot_start
    cache = DynamicCache(config=lm.config)
    out = lm(inputs_embeds=emb[:, :s0], position_ids=probe.position_ids[:, :, :s0],
             attention_mask=probe.attention_mask[:, :s0], cache=cache, use_cache=True)
    trig = model.lm_head(out.last_hidden_state[:, -2]).argmax(-1) == start_id
    h = out.last_hidden_state[:, -1:]
    ks = torch.full((len(idx),), cap, dtype=torch.long)
    done = torch.zeros(len(idx), dtype=torch.bool)
    for k in range(cap):
        stop = (model.lm_head(h[:, 0]).argmax(-1) == end_id) & ~done & may_end
        ks[stop] = k
        done |= stop
        if done.all():
            break
        o = lm(inputs_embeds=h, position_ids=probe.position_ids[:, :, s0 + k:s0 + k + 1],
               attention_mask=probe.attention_mask[:, :s0 + k + 1], cache=cache, use_cache=True)
        h = o.last_hidden_state
    records = [None] * len(idx)
    for k in sorted(set(ks.tolist())):
        rows = [j for j in range(len(idx)) if ks[j] == k]
        sub = [idx[j] for j in rows]
        if k == 0:
            batch = collate(tok, bank, sub, replace(plan, n_latents=0))
            out = forward(model, batch, replace(plan, n_latents=0))
            z_ok = torch.ones(len(rows), dtype=torch.bool)
        else:
            batch = collate(tok, bank, sub, replace(plan, n_latents=k))
            out = forward(model, batch, replace(plan, n_latents=k))
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
            elif len(texts[b]) >= max_caption:
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


# ---------------------------------------------------------------- vision stage

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
        fill = None
        if batch.n_latents and plan.latent_fill == "crop":
            fill = train_bank.crop[idx]
        elif batch.n_latents and plan.latent_fill == "constant":
            fill = constant.unsqueeze(0).expand(len(idx), -1, -1)
        need_attn = plan.attn_weight > 0 or plan.hop_weight > 0
        out = forward(model, batch, plan, fill=fill, need_attn=need_attn)
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
