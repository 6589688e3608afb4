"""`LatentReasoner`: a loaded checkpoint (stock Qwen2.5-VL + tokenizer + image processor + spec)
and the entry points every measurement goes through.

The same class serves our tiny testbed checkpoints and the real 7B ones (Monet, LVR, Mirage,
CapImagine, Qwen2.5-VL). Prompts are built from a `Query` with the spec's template (the chat
template, or the testbed layout); decoding is `decode.generate`, re-running a trace is
`replay` / `continue_from` / `regenerate` (see replay.py for how they differ).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .memo import rope_index, token_ids, tower, weights_key
from .answers import option_token_ids as first_token_ids
from .checkpoint import load
from .decode import DecodeConfig, generate
from .inputs import Prompt, chat_prompt, encode, image_inputs
from .interventions import apply_query_edits, as_interventions, by_point
from .layouts import answer_prefix, degrade, is_testbed, testbed_prompt
from .layouts import option_token_ids as testbed_option_ids
from .query import Query, as_image
from .replay import ReplayResult, continue_from, regenerate, replay
from .spec import LETTERS, LatentSpec, SpecIds
from .trace import Trace


def evidence_tokens(boxes, size: tuple[int, int], grid_thw, token_px: int) -> list[int]:
    """Merged-token indices (row-major) under the centres of pixel `boxes` of an image of `size`
    processed to `grid_thw` patches (each merged token covers `token_px` resized pixels)."""
    w, h = size
    gh, gw = int(grid_thw[1]), int(grid_thw[2])
    cols, rows = gw * 14 // token_px, gh * 14 // token_px
    out = []
    for x0, y0, x1, y1 in boxes:
        cx, cy = (x0 + x1) / 2 * gw * 14 / w, (y0 + y1) / 2 * gh * 14 / h
        i = min(int(cy // token_px), rows - 1) * cols + min(int(cx // token_px), cols - 1)
        if i not in out:
            out.append(i)
    return out


class LatentReasoner:
    """A loaded model with its spec: build prompts, generate traces, replay and continue them."""

    def __init__(self, model, tokenizer, processor, spec: LatentSpec, ids: SpecIds, head=None,
                 path: Path | None = None, load_report: dict | None = None, constant: torch.Tensor | None = None):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.spec, self.ids, self.head, self.path = spec, ids, head, path
        self.constant = constant
        self.load_report = load_report or {"missing": [], "unexpected": []}

    @classmethod
    def from_pretrained(cls, path: str | Path, method: str | None = None, dtype: torch.dtype | None = None,
                        device: str = "cpu", strict: bool = True, **spec_overrides) -> "LatentReasoner":
        """Load a checkpoint folder (see `checkpoint.load`); float32 on CPU, bfloat16 on CUDA."""
        x = load(path, method, dtype, device, strict, **spec_overrides)
        return cls(x.model, x.tokenizer, x.processor, x.spec, x.ids, x.head, Path(path), x.report, x.constant)

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
        """The decoder layers (named hooks: `latentmed.engine.hooks`)."""
        return self.model.model.language_model.layers

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device))

    # ---- model calls (all positions explicit: `rope_deltas` state is never read) ----
    def _tower(self, pix, grid: torch.Tensor, key: str | None = None, weights: str | None = None) -> torch.Tensor:
        """Merged image tokens [N, H] of `pix` (a tensor or a function giving it); memoised by
        content when the pixels carry a `key` (`memo.image_key`: the zoo's models share one tower,
        so a study computes each image once); `weights` as in `memo.tower`."""
        def compute(p, g):
            return torch.cat(self.model.model.get_image_features(p.to(self.device), g.to(self.device)).pooler_output)

        return tower(self.model, pix, grid, key, compute, weights)

    def image_features(self, encs, row_ivs) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """Merged image tokens of every row, each row's block edited by its feature edits: the
        concatenation [N, H] (what the prefill scatters) and the per-row blocks."""
        blocks, weights = [], None
        for e, ivs in zip(encs, row_ivs):
            if e.image_grid_thw is None:
                blocks.append(None)
                continue
            f = getattr(e, "features", None)
            if f is None:  # the pixels are read (computed if pending) only on a memo miss
                weights = weights or weights_key(self.model.model.visual)  # once per batch
                f = self._tower(lambda: e.pixel_values, e.image_grid_thw, getattr(e, "pixel_key", None), weights)
                if isinstance(e, Prompt):
                    e.features = f  # the tower is run once per prompt
            for iv in by_point(ivs, "features"):
                f = iv.edit_features(f)
            blocks.append(f)
        present = [b for b in blocks if b is not None]
        return (torch.cat(present) if present else None), blocks

    def source_features(self, prompt: Prompt) -> torch.Tensor:
        """The vectors a non-hidden latent source feeds [n, H]: the merged tokens of the evidence
        crop, or those of the full-resolution scene at the evidence cells."""
        f = self._tower(lambda: prompt.source_pixels, prompt.source_grid, prompt.source_key)
        if prompt.source_index is None:
            return f
        if not prompt.source_index:  # no evidence (e.g. zero objects to count): zero vectors
            return f.new_zeros(1, f.shape[-1])
        return f[torch.as_tensor(prompt.source_index, device=f.device)]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, grid: torch.Tensor | None,
                feats: torch.Tensor | None, overrides=(), cache=None, attn4d: torch.Tensor | None = None,
                text_from: list[int] | None = None):
        """Whole sequences [B, T] (left-padded, `mask` [B, T]) with image features and vectors at
        `overrides` [(row, position, vector)]; columns from `text_from[b]` on are generated text
        (an image-pad id written there by the model is a token, not an image slot). Returns
        (output, next rope position per row [B])."""
        ids = ids.to(self.device)
        emb = self.embed(ids)
        is_image = ids == self.ids.image
        if text_from is not None:
            cols = torch.arange(ids.shape[1], device=ids.device)[None, :]
            is_image &= cols < torch.as_tensor(text_from, device=ids.device)[:, None]
        if feats is not None:
            emb[is_image] = feats.to(emb.dtype)
        for r, t, v in overrides:
            emb[r, t] = v.to(emb.dtype)
        mask = None if mask is None else mask.to(self.device)
        pos = rope_index(self.model, ids, is_image, grid, mask)  # transformers' get_rope_index, memoised
        attn = attn4d.to(self.device) if attn4d is not None else mask
        out = self.model.model.language_model(inputs_embeds=emb, position_ids=pos, attention_mask=attn, cache=cache,
                                              use_cache=cache is not None)
        return out, pos.amax(dim=(0, 2)) + 1  # [3, B, T] -> [B]

    def step(self, emb: torch.Tensor, pos: torch.Tensor, mask, cache, **kw):
        """One decode step: emb [B, 1, H] at rope positions pos [B] (same on all 3 M-RoPE axes);
        `kw` reaches the attention function (the shared prefix of a branch)."""
        return self.model.model.language_model(
            inputs_embeds=emb, position_ids=pos.view(1, -1, 1).expand(3, -1, 1), attention_mask=mask,
            cache=cache, use_cache=True, **kw)

    # ---- prompts ----
    def option_ids(self, options: list[str], leading_space: bool | None = None) -> list[int]:
        """Option tokens as this method writes them: letters or content words (spec.option_tokens),
        with a space after `<answer>` and none elsewhere."""
        words = options if self.spec.option_tokens == "word" else list(LETTERS[:len(options)])
        space = self.spec.answer_format == "answer_tag" if leading_space is None else leading_space
        return first_token_ids(self.tokenizer, words, space)

    def prompt(self, query, edits=()) -> Prompt:
        """The prompt for a query (or testbed item) in the spec's template, after input edits."""
        query = apply_query_edits(Query.of(query), by_point(as_interventions(edits), "input"))
        spec = self.spec
        images = list(query.images)
        if spec.prompt_image == "degraded":
            images = [degrade(im) for im in images]
        if is_testbed(spec):
            if len(images) != 1:
                raise ValueError(f"query {query.id or ''}: the testbed layout shows one image, got {len(images)}")
            text = testbed_prompt(self.tokenizer, query)
            enc = encode(self.tokenizer, self.processor, text, images)
            after = token_ids(self.tokenizer, answer_prefix(query, spec)) or None
            opt = testbed_option_ids(self.tokenizer, query.options)
        else:
            text = chat_prompt(self.tokenizer, spec.format_question(query.question, query.options),
                               n_images=len(images), system=spec.system_prompt,
                               assistant_prefix=spec.assistant_prefix)
            enc = encode(self.tokenizer, self.processor, text, images)
            after, opt = None, (self.option_ids(query.options) if query.options else None)
        src_pix = src_grid = src_index = src_key = None
        if spec.latent_source == "evidence_crop":
            if query.crop is None:
                raise ValueError(f"query {query.id or ''}: method {spec.method!r} feeds the evidence crop's "
                                 "tokens as latents, but the query has no crop")
            src_pix, src_grid, src_key = image_inputs(self.processor, [as_image(query.crop, "evidence crop")])
        elif spec.latent_source == "evidence_tokens":
            if query.evidence_boxes is None:
                raise ValueError(f"query {query.id or ''}: method {spec.method!r} feeds the evidence cells' "
                                 "tokens as latents, but the query has no evidence boxes")
            src_pix, src_grid, src_key = image_inputs(self.processor, [as_image(query.images[0], "image 0")])
            src_index = evidence_tokens(query.evidence_boxes, query.images[0].size, src_grid[0],
                                        getattr(self.processor, "merge_size", 2) * getattr(self.processor, "patch_size", 14))
        return Prompt(enc.input_ids, enc.pixel_source(), enc.image_grid_thw, enc.text, enc.pixel_key, query=query,
                      option_ids=opt, after_segment_ids=after, source_pixels=src_pix, source_grid=src_grid,
                      source_index=src_index, source_key=src_key)

    def build_inputs(self, images: Image.Image | list[Image.Image] | None, question: str,
                     options: list[str] | None = None, edits=()) -> Prompt:
        """Prompt for images + question + options (a `Query`), after input edits."""
        return self.prompt(Query(images=images if images is not None else [], question=question, options=options),
                           edits)

    def item_inputs(self, item, edits=()) -> Prompt:
        """Prompt for a testbed item in the zoo's layout (models whose spec.template is "testbed")."""
        if not is_testbed(self.spec):
            raise ValueError(f"method {self.spec.method!r} uses the chat template; use build_inputs or prompt")
        return self.prompt(item, edits)

    def with_input_edits(self, prompt: Prompt, edits) -> Prompt:
        """`prompt` rebuilt from its query when `edits` hold input edits (else unchanged)."""
        inputs = by_point(as_interventions(edits), "input")
        if not inputs:
            return prompt
        if prompt.query is None:
            raise ValueError(f"{type(inputs[0]).__name__} is an input edit, but this prompt has no query to "
                             "rebuild: build it with reasoner.prompt / build_inputs / item_inputs")
        new = self.prompt(prompt.query, inputs)  # fresh: set in place (replace would compute pending pixels)
        if prompt.option_ids is None:
            new.option_ids = None
        return new

    # ---- runs ----
    def generate(self, inputs, interventions=(), config: DecodeConfig | None = None, **kw):
        """Decode (see decode.generate): a Trace per prompt."""
        return generate(self, inputs, interventions, config, **kw)

    def replay(self, trace: Trace, edits=(), inputs=None) -> ReplayResult:
        return replay(self, trace, edits, inputs)

    def continue_from(self, trace: Trace, new_latents=None, edits=(), **kw) -> Trace:
        return continue_from(self, trace, new_latents, edits, **kw)

    def regenerate(self, trace: Trace, edits=(), **kw) -> Trace:
        return regenerate(self, trace, edits, **kw)
