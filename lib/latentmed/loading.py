"""`LatentReasoner`: a checkpoint folder -> stock Qwen2.5-VL + tokenizer + image processor + spec.

The same loader reads our tiny testbed checkpoints and the real 7B ones (Monet, LVR, Mirage,
CapImagine, Qwen2.5-VL): `Qwen2_5_VLForConditionalGeneration` from safetensors only (no pickle,
no remote code), an LVR head when config.json asks for one, and every way a folder can be wrong
turned into an error that names the file. Decoding, replay and continuation live in decode.py
and trace.py; the methods here are thin entry points.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from . import answers, layouts
from .decode import DecodeConfig, Prompt, generate
from .inputs import IMAGE_PAD, chat_prompt, encode
from .interventions import Item, apply_item_edits, as_interventions, by_point
from .spec import LETTERS, METHODS, SPEC_FILE, LatentSpec, SpecIds, preset
from .tokenizer import load_tokenizer
from .trace import Trace, continue_from, replay

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# config.json field -> token the tokenizer must map to the same id
CONFIG_TOKENS = {"image_token_id": IMAGE_PAD, "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


class LVRHead(nn.Module):
    """LVR's projection head: LayerNorm -> Linear -> GELU -> Linear (names match `lvr_head.*`)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.ln_q = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x))


# ---- checks on the folder --------------------------------------------------------------------

def read_config(folder: Path) -> dict:
    """config.json as a dict, checked to be a Qwen2.5-VL config."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (every checkpoint folder needs config.json)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if cfg.get("model_type") != "qwen2_5_vl":
        archs = ", ".join(cfg.get("architectures") or []) or "none given"
        raise ValueError(f"{path}: model_type {cfg.get('model_type')!r} (architectures: {archs}) is not "
                         "Qwen2.5-VL; this loader reads qwen2_5_vl checkpoints only")
    return cfg


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files to load; pickle-only folders and missing shards are clear errors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{index}: invalid shard index ({exc})") from exc
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index}: lists shard(s) {', '.join(missing)} that are missing "
                                    f"from {folder} (partial download?)")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(f"{folder}: only pickle weights ({', '.join(pickles)}); refusing to unpickle. "
                         "Convert them to safetensors first")
    raise FileNotFoundError(f"{folder}: no model weights (model.safetensors or a shard index)")


def check_tokenizer(folder: Path, cfg: dict, tokenizer) -> None:
    """config.json's vision token ids must be the tokenizer's ids for the same tokens."""
    vocab = tokenizer.get_vocab()
    for key, token in CONFIG_TOKENS.items():
        if key in cfg and vocab.get(token) != cfg[key]:
            raise ValueError(f"{folder}: tokenizer/config mismatch: config.json {key}={cfg[key]} but the "
                             f"tokenizer maps {token} to {vocab.get(token)}")
    vocab_size = cfg.get("text_config", {}).get("vocab_size", cfg.get("vocab_size"))
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"{folder}: tokenizer has {len(tokenizer)} tokens but config.json vocab_size "
                         f"is {vocab_size}")


def load_processor(folder: Path) -> Qwen2VLImageProcessorPil:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the image processor settings)")
    try:
        return Qwen2VLImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types; name the file
        raise ValueError(f"{path}: cannot build the image processor ({exc})") from exc


def resolve_spec(folder: Path, method: str | None) -> LatentSpec:
    """The method's preset, or the folder's latent_spec.json when no method is given."""
    if method is not None:
        return preset(method)
    if (folder / SPEC_FILE).is_file():
        return LatentSpec.load(folder)
    raise ValueError(f"{folder}: no {SPEC_FILE} in the folder; pass method= one of: {', '.join(METHODS)}")


def load_head(files: list[Path], hidden: int, cfg: dict, dtype, device) -> LVRHead:
    """LVR head weights from the checkpoint's `lvr_head.*` keys."""
    if cfg.get("lvr_head_type", "simple") != "simple":
        raise ValueError(f"config.json lvr_head_type {cfg['lvr_head_type']!r} is not supported "
                         "(only 'simple')")
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            keys = [k for k in sf.keys() if k.startswith("lvr_head.")]
            state.update({k[len("lvr_head."):]: sf.get_tensor(k) for k in keys})
    if not state:
        raise ValueError(f"{files[0].parent}: config.json asks for lvr_head but no lvr_head.* weights "
                         "were found")
    head = LVRHead(hidden)
    head.load_state_dict(state)
    return head.to(device=device, dtype=dtype).eval()


# ---- the reasoner ---------------------------------------------------------------------------

class LatentReasoner:
    """A loaded model with its spec: build inputs, generate traces, replay and continue them."""

    def __init__(self, model, tokenizer, processor, spec: LatentSpec, ids: SpecIds, head=None,
                 path: Path | None = None, load_report: dict | None = None):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.spec, self.ids, self.head, self.path = spec, ids, head, path
        self.load_report = load_report or {"missing": [], "unexpected": []}

    @classmethod
    def from_pretrained(cls, path: str | Path, method: str | None = None, dtype: torch.dtype | None = None,
                        device: str = "cpu", strict: bool = True, **spec_overrides) -> "LatentReasoner":
        """Load a checkpoint folder; float32 on CPU and bfloat16 on CUDA unless `dtype` says."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: checkpoint folder not found")
        cfg = read_config(folder)
        files = weight_files(folder)
        tokenizer = load_tokenizer(folder)
        check_tokenizer(folder, cfg, tokenizer)
        spec, ids = resolve_spec(folder, method).with_overrides(**spec_overrides).resolve(tokenizer, cfg)
        processor = load_processor(folder)
        dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(folder), dtype=dtype, use_safetensors=True, local_files_only=True, output_loading_info=True,
            trust_remote_code=False, device_map=device if str(device).startswith("cuda") else None)
        unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith("lvr_head.")]
        report = {"missing": sorted(info.get("missing_keys", [])), "unexpected": sorted(unexpected)}
        if report["missing"] and strict:
            raise ValueError(f"{folder}: weights miss {len(report['missing'])} parameters of the model, "
                             f"e.g. {report['missing'][:3]} (pass strict=False to load anyway)")
        if report["missing"] or report["unexpected"]:
            warnings.warn(f"{folder}: missing keys {report['missing'][:5]}, unexpected keys "
                          f"{report['unexpected'][:5]}")
        model = model.to(device).eval()
        hidden = model.config.text_config.hidden_size
        head = load_head(files, hidden, cfg, dtype, device) if spec.head == "lvr_head" else None
        return cls(model, tokenizer, processor, spec, ids, head, folder, report)

    # ---- properties ----
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def layers(self):
        """The decoder layers, where residual-stream hooks go."""
        return self.model.model.language_model.layers

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device))

    # ---- model calls (all positions explicit: `rope_deltas` state is never read) ----
    def image_features(self, encs, row_ivs) -> torch.Tensor | None:
        """Merged image tokens of every row [N, H], each row's block edited by its feature edits."""
        blocks = []
        for e, ivs in zip(encs, row_ivs):
            if e.pixel_values is None:
                continue
            pix, grid = e.pixel_values.to(self.device), e.image_grid_thw.to(self.device)
            f = torch.cat(self.model.model.get_image_features(pix, grid).pooler_output)
            for iv in by_point(ivs, "features"):
                f = iv.edit_features(f)
            blocks.append(f)
        return torch.cat(blocks) if blocks else None

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, grid: torch.Tensor | None,
                feats: torch.Tensor | None, overrides=(), cache=None, attn4d: torch.Tensor | None = None,
                hidden_states: bool = False):
        """Whole sequences [B, T] (left-padded, `mask` [B, T]) with image features and vectors at
        `overrides` [(row, position, vector)]; returns (output, next rope position per row [B])."""
        ids = ids.to(self.device)
        emb = self.embed(ids)
        is_image = ids == self.ids.image
        if feats is not None:
            emb[is_image] = feats.to(emb.dtype)
        for r, t, v in overrides:
            emb[r, t] = v.to(emb.dtype)
        mask = None if mask is None else mask.to(self.device)
        pos, _ = self.model.model.get_rope_index(ids, is_image.int(), image_grid_thw=grid, attention_mask=mask)
        attn = attn4d.to(self.device) if attn4d is not None else mask
        out = self.model.model.language_model(inputs_embeds=emb, position_ids=pos, attention_mask=attn, cache=cache,
                                              use_cache=cache is not None, output_hidden_states=hidden_states)
        return out, pos.amax(dim=(0, 2)) + 1  # [3, B, T] -> [B]

    def step(self, emb: torch.Tensor, pos: torch.Tensor, mask, cache, hidden_states: bool = False):
        """One decode step: emb [B, 1, H] at rope positions pos [B] (same on all 3 M-RoPE axes)."""
        return self.model.model.language_model(
            inputs_embeds=emb, position_ids=pos.view(1, -1, 1).expand(3, -1, 1), attention_mask=mask,
            cache=cache, use_cache=True, output_hidden_states=hidden_states)

    # ---- inputs ----
    def option_ids(self, options: list[str], leading_space: bool | None = None) -> list[int]:
        """Option tokens as this method writes them: letters or content words (spec.option_tokens),
        with a space after `<answer>` and none elsewhere."""
        words = options if self.spec.option_tokens == "word" else list(LETTERS[:len(options)])
        space = self.spec.answer_format == "answer_tag" if leading_space is None else leading_space
        return answers.option_token_ids(self.tokenizer, words, space)

    def build_inputs(self, images: Image.Image | list[Image.Image] | None, question: str,
                     options: list[str] | None = None, edits=()) -> Prompt:
        """Prompt for one item with the spec's template; input edits act on the item first."""
        images = [images] if isinstance(images, Image.Image) else list(images or [])
        item = apply_item_edits(Item(images, question, options), by_point(as_interventions(edits), "input"))
        spec = self.spec
        text = chat_prompt(self.tokenizer, spec.format_question(item.question, item.options),
                           n_images=len(item.images), system=spec.system_prompt,
                           assistant_prefix=spec.assistant_prefix)
        enc = encode(self.tokenizer, self.processor, text, item.images)
        opt_ids = self.option_ids(item.options) if item.options else None
        return Prompt(enc.input_ids, enc.pixel_values, enc.image_grid_thw, enc.text,
                      question=item.question, options=item.options, option_ids=opt_ids)

    def item_inputs(self, item) -> Prompt:
        """Prompt for a testbed item in the zoo's layout (models whose spec.template is "testbed")."""
        if not layouts.is_testbed(self.spec):
            raise ValueError(f"method {self.spec.method!r} uses the chat template; use build_inputs")
        text = layouts.testbed_prompt(self.tokenizer, item, self.spec)
        enc = encode(self.tokenizer, self.processor, text, [layouts.prompt_image(item, self.spec)])
        return Prompt(enc.input_ids, enc.pixel_values, enc.image_grid_thw, enc.text, question=item.question,
                      options=item.options, option_ids=layouts.option_token_ids(self.tokenizer, item.options))

    # ---- runs ----
    def generate(self, inputs, interventions=(), config: DecodeConfig | None = None, **kw):
        """Decode (see decode.generate): a Trace per prompt."""
        return generate(self, inputs, interventions, config, **kw)

    def replay(self, trace: Trace, edits=(), inputs=None):
        return replay(self, trace, edits, inputs)

    def continue_from(self, trace: Trace, new_latents=None, edits=(), **kw) -> Trace:
        return continue_from(self, trace, new_latents, edits, **kw)
