"""Named hook points inside the model, in TransformerLens' grammar, and the hooks that serve them.

Names are derived from the module tree, with one table per architecture mapping a name to the
Hugging Face module and what of it is read or edited:

    blocks.{i}.hook_resid_pre      input of decoder layer i (the residual stream before it)
    blocks.{i}.hook_resid_post     output of decoder layer i
    blocks.{i}.hook_attn_out       output of layer i's self-attention (before the residual add)
    blocks.{i}.hook_mlp_out        output of layer i's MLP (before the residual add)
    blocks.{i}.attn.hook_pattern   layer i's attention weights [heads, keys] (recording only;
                                   the run switches to eager attention while it is recorded)
    ln_final.hook_normalized       the final norm's output (what the LM head reads)

and points the engine serves itself (recording only; edits there are interventions of their
own kind): `latent.hook_in` (the vector fed at a latent slot: `LatentFeed` edits it),
`latent.hook_out` (the final post-norm state at a slot), `vision.hook_out` (merged image
tokens: `MaskImageTokens` and `NoiseImageFeatures` edit them) and `unembed.hook_logits` (the
full logits of every generated step).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

# name template -> (module path template under the HF model, what: "input" | "output" | "output0" | "weights")
MODULE_HOOKS: dict[str, dict[str, tuple[str, str]]] = {
    "qwen2_5_vl": {
        "blocks.{i}.hook_resid_pre": ("model.language_model.layers.{i}", "input"),
        "blocks.{i}.hook_resid_post": ("model.language_model.layers.{i}", "output"),
        "blocks.{i}.hook_attn_out": ("model.language_model.layers.{i}.self_attn", "output0"),
        "blocks.{i}.hook_mlp_out": ("model.language_model.layers.{i}.mlp", "output"),
        "blocks.{i}.attn.hook_pattern": ("model.language_model.layers.{i}.self_attn", "weights"),
        "ln_final.hook_normalized": ("model.language_model.norm", "output"),
    },
}
ENGINE_HOOKS = ("latent.hook_in", "latent.hook_out", "vision.hook_out", "unembed.hook_logits")
RECORD_ONLY = ("blocks.{i}.attn.hook_pattern", *ENGINE_HOOKS)


def _template(name: str) -> str:
    return re.sub(r"^blocks\.(\d+|\*)\.", "blocks.{i}.", name)


def records_pattern(records) -> bool:
    """Whether any of these `Record`s reads attention weights (which only eager attention gives)."""
    return any(_template(h) == "blocks.{i}.attn.hook_pattern" for rec in records for h in rec.hooks)


def check_hook_name(name: str, editable: bool = False) -> None:
    """A known hook name (any layer index, or `*` for recording); else a clear error."""
    if not isinstance(name, str):
        raise ValueError(f"hook name must be a string, got {name!r}")
    t = _template(name)
    known = set(MODULE_HOOKS["qwen2_5_vl"]) | set(ENGINE_HOOKS)
    if t not in known:
        raise ValueError(f"unknown hook {name!r}; known: {', '.join(sorted(known))} ({{i}} = layer index)")
    if editable and (t in RECORD_ONLY or "*" in name):
        raise ValueError(f"hook {name!r} can be recorded but not edited with HookEdit"
                         + (" (latent feed: use a LatentFeed intervention; image tokens: MaskImageTokens "
                            "or NoiseImageFeatures)" if t in ENGINE_HOOKS else ""))


def expand(name: str, n_layers: int) -> list[str]:
    """`blocks.*.x` -> one name per layer; other names unchanged; layer indices checked."""
    m = re.match(r"^blocks\.(\d+|\*)\.", name)
    if not m:
        return [name]
    if m.group(1) == "*":
        return [name.replace("blocks.*.", f"blocks.{i}.", 1) for i in range(n_layers)]
    if int(m.group(1)) >= n_layers:
        raise ValueError(f"hook {name!r}: the model has {n_layers} decoder layers (0-{n_layers - 1})")
    return [name]


def resolve(model, name: str) -> tuple[torch.nn.Module, str]:
    """The module a model hook name refers to, and what of it."""
    arch = getattr(model.config, "model_type", "qwen2_5_vl")
    table = MODULE_HOOKS.get(arch)
    if table is None:
        raise ValueError(f"no hook table for architecture {arch!r}")
    path, what = table[_template(name)]
    m = re.match(r"^blocks\.(\d+)\.", name)
    module = model.get_submodule(path.format(i=m.group(1)) if m else path)
    return module, what


@dataclass
class Cursor:
    """What the current forward covers, per row: first sequence index and latent-slot mask."""
    start: list[int]
    latent: torch.Tensor | None = None  # [B, T] bool, True where the input slot is a latent


@dataclass
class Recorder:
    """Tensors recorded at hooks for one row: name -> list of (position, tensor)."""
    found: dict[str, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)

    def add(self, name: str, pos: int, t: torch.Tensor) -> None:
        self.found.setdefault(name, []).append((pos, t.detach().float().cpu()))

    def add_rows(self, name: str, positions: list[int], block: torch.Tensor) -> None:
        """`add` of block[i] at positions[i] for every i, with one conversion for the block (a
        recording at every position of a 100-token prompt made 100 calls per row and forward)."""
        self.found.setdefault(name, []).extend(zip(positions, block.detach().float().cpu().unbind(0)))

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
        out, where = {}, {}
        for name, items in self.found.items():
            items = sorted(items, key=lambda x: x[0])
            ts = [t for _, t in items]
            if ts and ts[0].dim() == 2:  # attention rows of different key lengths: pad with zeros
                L = max(t.shape[-1] for t in ts)
                ts = [torch.nn.functional.pad(t, (0, L - t.shape[-1])) for t in ts]
            out[name] = torch.stack(ts) if ts else torch.zeros(0)
            where[name] = [p for p, _ in items]
        return out, where


def _columns(positions, cursor: Cursor, r: int, T: int) -> list[tuple[int, int]]:
    """(column in this forward, sequence position) pairs that `positions` selects for row r."""
    if positions == "latents":
        cols = [] if cursor.latent is None else cursor.latent[r].nonzero().flatten().tolist()
        return [(c, c + cursor.start[r]) for c in cols if 0 <= c < T]
    if positions == "all":
        return [(c, c + cursor.start[r]) for c in range(T) if c + cursor.start[r] >= 0]
    return [(p - cursor.start[r], p) for p in positions if 0 <= p - cursor.start[r] < T]


@contextmanager
def installed(model, row_edits: list[list], row_records: list[list], recorders: list[Recorder],
              cursor: Cursor) -> Iterator[None]:
    """Temporary PyTorch hooks applying each row's `HookEdit`s and filling its `Recorder` from
    its `Record`s; nothing is installed when no row asks for anything."""
    n_layers = model.config.text_config.num_hidden_layers
    wants: dict[str, list] = {}
    for r, edits in enumerate(row_edits):
        for e in edits:
            for name in expand(e.hook, n_layers):
                wants.setdefault(name, []).append(("edit", r, e))
    for r, recs in enumerate(row_records):
        for rec in recs:
            for h in rec.hooks:
                if h in ENGINE_HOOKS:
                    continue
                for name in expand(h, n_layers):
                    wants.setdefault(name, []).append(("record", r, rec))
    if not wants:
        yield
        return
    handles, eager = [], any(_template(n) == "blocks.{i}.attn.hook_pattern" for n in wants)
    old_impl = model.config._attn_implementation
    try:
        if eager:
            model.set_attn_implementation("eager")
        for name, items in wants.items():
            module, what = resolve(model, name)
            if what == "input":
                handles.append(module.register_forward_pre_hook(_pre_hook(name, items, recorders, cursor)))
            else:
                handles.append(module.register_forward_hook(_post_hook(name, what, items, recorders, cursor)))
        yield
    finally:
        for h in handles:
            h.remove()
        if eager:
            model.set_attn_implementation(old_impl)


def _apply(name, items, x: torch.Tensor, recorders, cursor, pattern: bool = False) -> torch.Tensor | None:
    """Edit and record at one hook; x is [B, T, H] (or [B, heads, T, K] for patterns)."""
    T = x.shape[2] if pattern else x.shape[1]
    out = None
    for kind, r, iv in items:
        if kind == "record":
            cols = _columns(iv.positions, cursor, r, T)
            c0 = cols[0][0] if cols else 0
            if len(cols) > 1 and all(c == c0 + i for i, (c, _) in enumerate(cols)):  # a run of columns: one block
                block = x[r, :, c0:c0 + len(cols)].transpose(0, 1) if pattern else x[r, c0:c0 + len(cols)]
                recorders[r].add_rows(name, [p for _, p in cols], block)
                continue
            for c, p in cols:
                recorders[r].add(name, p, x[r, :, c] if pattern else x[r, c])
        else:
            if out is None:
                out = x.clone()
            for i, (c, _) in enumerate(_columns(iv.positions, cursor, r, T)):
                out[r, c] = iv.edit(out[r, c], i)
    return out


def _pre_hook(name, items, recorders, cursor):
    def hook(module, args):
        new = _apply(name, items, args[0], recorders, cursor)
        return None if new is None else (new, *args[1:])
    return hook


def _post_hook(name, what, items, recorders, cursor):
    def hook(module, args, out):
        if what == "output":
            new = _apply(name, items, out, recorders, cursor)
            return new
        if what == "output0":
            new = _apply(name, items, out[0], recorders, cursor)
            return None if new is None else (new, *out[1:])
        if out[1] is None:
            raise RuntimeError(f"{name}: no attention weights (eager attention was not in effect)")
        _apply(name, items, out[1], recorders, cursor, pattern=True)
        return None
    return hook
