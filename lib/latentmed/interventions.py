"""Interventions as small serialisable objects, one class per edit, grouped by where they act.

Each class names its intervention point (`point`) and overrides the one method called there;
every other method is a no-op. `to_dict`/`from_dict` turn them into plain dicts, so a notebook
can take a list of them as a papermill parameter. Points (DESIGN §3):

    latent    feed(z, ctx)           right before a latent is written as the next input
    segment   segment_k(K)           loop control: new K, 0 = markers only, None = drop
    input     edit_item(item)        when building inputs (image, question, options)
    features  edit_features(f)       on the visual encoder's merged image tokens [N, H]
    residual  edit(x, i)             decoder layer outputs at chosen positions (`residual_hooks`)
    knockout  (replay mask)          who may not attend to whom in a teacher-forced replay
    record    (flags)                read-only: all-layer states at latent slots, full logits
    span      edit_span(ids, tok)    CapImagine's text imagination, token level
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
from PIL import Image

REGISTRY: dict[str, type["Intervention"]] = {}


@dataclass
class FeedContext:
    """Where a latent is being fed: latent index k in segment `segment` of batch row `row`."""
    k: int
    segment: int = 0
    row: int = 0


@dataclass
class Item:
    """What `build_inputs` turns into a prompt; input edits map one Item to another."""
    images: list[Image.Image]
    question: str
    options: list[str] | None = None


@dataclass
class Intervention:
    """Base class: every hook is a no-op, subclasses override the one at their `point`."""
    point: ClassVar[str] = "none"

    def __init_subclass__(cls, abstract: bool = False, **kw):
        """Every concrete subclass can be rebuilt from its dict form (`from_dict`)."""
        super().__init_subclass__(**kw)
        if not abstract:
            REGISTRY[cls.__name__] = cls

    def to_dict(self) -> dict:
        out = {"kind": type(self).__name__}
        for f in fields(self):
            if f.metadata.get("serialise", True):
                out[f.name] = getattr(self, f.name)
        return out

    def feed(self, z: torch.Tensor, ctx: FeedContext) -> torch.Tensor:
        return z

    def segment_k(self, k: int) -> int | None:
        return k

    def edit_item(self, item: Item) -> Item:
        return item

    def edit_features(self, feats: torch.Tensor) -> torch.Tensor:
        return feats

    def edit_span(self, ids: list[int], tokenizer) -> list[int]:
        return ids

    @property
    def shares_prefix(self) -> bool:
        """True when it cannot change anything before a latent segment opens (sweeps share it)."""
        return self.point in ("latent", "segment", "record", "none")


def from_dict(d: dict) -> Intervention:
    """Rebuild an intervention from `to_dict` output; unknown kinds are a clear error."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in REGISTRY:
        raise ValueError(f"unknown intervention kind {kind!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[kind](**d)


def as_interventions(items) -> list[Intervention]:
    """Accept interventions or their dicts (papermill parameters)."""
    return [from_dict(x) if isinstance(x, dict) else x for x in (items or [])]


# ---- latent feed ---------------------------------------------------------------------------

@dataclass(kw_only=True)
class LatentFeed(Intervention, abstract=True):
    """Base of latent-feed edits; `steps` limits it to some latent indices (None = all)."""
    point: ClassVar[str] = "latent"
    steps: list[int] | None = None

    def feed(self, z: torch.Tensor, ctx: FeedContext) -> torch.Tensor:
        return z if self.steps is not None and ctx.k not in self.steps else self.apply(z, ctx)

    def apply(self, z: torch.Tensor, ctx: FeedContext) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class ZeroLatent(LatentFeed):
    """Feed a zero vector."""
    def apply(self, z, ctx):
        return torch.zeros_like(z)


@dataclass
class FixedLatent(LatentFeed):
    """Feed one fixed tensor at every latent slot (the paper's 'set all latents to one tensor')."""
    vector: list[float] = field(default_factory=list)

    def apply(self, z, ctx):
        return _vec(self.vector, z)


@dataclass
class NoiseLatent(LatentFeed):
    """Gaussian direction with norm `scale * ||z||`, added to z or replacing it."""
    scale: float = 1.0
    mode: str = "add"  # "add": z + noise; "replace": noise only
    seed: int = 0

    def noise(self, z: torch.Tensor, ctx: FeedContext) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.segment * 1009 + ctx.k)
        d = torch.randn(z.shape[-1], generator=g, dtype=torch.float32)
        return (d / d.norm() * self.scale * z.float().norm()).to(z.dtype).to(z.device)

    def apply(self, z, ctx):
        n = self.noise(z, ctx)
        return z + n if self.mode == "add" else n


@dataclass
class ExtremeLatent(LatentFeed):
    """Extreme values: every entry set to `value` ("constant") or z multiplied by it ("scale")."""
    value: float = 1e3
    mode: str = "constant"

    def apply(self, z, ctx):
        return torch.full_like(z, self.value) if self.mode == "constant" else z * self.value


@dataclass
class MeanLatent(FixedLatent):
    """Feed the mean latent (see `mean_latent`), the paper's 'Z = mean': a FixedLatent by name."""


@dataclass
class SwapLatent(LatentFeed):
    """Feed another instance's latent k (its Z_in rows); slots beyond its length stay unchanged."""
    source: list[list[float]] = field(default_factory=list)

    def apply(self, z, ctx):
        return _vec(self.source[ctx.k], z) if ctx.k < len(self.source) else z


@dataclass
class ShuffleLatents(LatentFeed):
    """Feed the latents of `source` (or the trace's own, in replay) in a seeded shuffled order."""
    seed: int = 0
    source: list[list[float]] | None = None

    def order(self, n: int) -> list[int]:
        perm = list(range(n))
        random.Random(self.seed).shuffle(perm)
        return perm

    def apply(self, z, ctx):
        if self.source is None:
            raise ValueError("ShuffleLatents while decoding needs `source` latents "
                             "(in a replay the trace's own latents are shuffled)")
        perm = self.order(len(self.source))
        return _vec(self.source[perm[ctx.k]], z) if ctx.k < len(perm) else z


def _vec(values, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    if v.shape != like.shape:
        raise ValueError(f"latent vector has shape {tuple(v.shape)}, expected {tuple(like.shape)}")
    return v


def mean_latent(traces, segment: int = 0) -> list[float]:
    """Mean of the fed latents (Z_in) over a set of traces, for `MeanLatent`."""
    zs = [t.segments[segment].z_in for t in traces if len(t.segments) > segment]
    return torch.cat([z.float() for z in zs if z is not None and len(z)]).mean(0).tolist()


# ---- segment control -------------------------------------------------------------------------

@dataclass
class ChangeK(Intervention):
    """Exactly `k` latents in every segment (sampled end tokens before k are ignored)."""
    point: ClassVar[str] = "segment"
    k: int = 0

    def segment_k(self, k):
        return self.k


@dataclass
class DropSegment(Intervention):
    """No segment at all: the start token is banned (decode) or the span removed (replay)."""
    point: ClassVar[str] = "segment"

    def segment_k(self, k):
        return None


@dataclass
class MarkersOnly(Intervention):
    """Keep the start and end markers, no latent slots between them (2606.01287 ablation)."""
    point: ClassVar[str] = "segment"

    def segment_k(self, k):
        return 0


# ---- input edits (when building inputs) -------------------------------------------------------

@dataclass
class InputEdit(Intervention, abstract=True):
    point: ClassVar[str] = "input"


@dataclass
class BlankImage(InputEdit):
    """Replace every image by a uniform one of the same size."""
    colour: tuple[int, int, int] = (128, 128, 128)

    def edit_item(self, item):
        return replace(item, images=[Image.new("RGB", im.size, tuple(self.colour)) for im in item.images])


@dataclass
class NoiseImage(InputEdit):
    """Add (or replace by) seeded Gaussian pixel noise of std `std` levels."""
    std: float = 64.0
    mode: str = "add"
    seed: int = 0

    def edit_item(self, item):
        g = torch.Generator().manual_seed(self.seed)
        out = []
        for im in item.images:
            x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32))
            n = torch.randn(x.shape, generator=g) * self.std
            x = (x + n if self.mode == "add" else 128 + n).clamp(0, 255).round().to(torch.uint8)
            out.append(Image.fromarray(x.numpy()))
        return replace(item, images=out)


@dataclass
class OtherImage(InputEdit):
    """Use another image (a file path, or an in-memory `image` that is not serialised)."""
    path: str | None = None
    image: Any = field(default=None, repr=False, compare=False, metadata={"serialise": False})

    def edit_item(self, item):
        im = self.image if self.image is not None else _open_image(self.path)
        return replace(item, images=[im] + list(item.images[1:]))


def _open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read image ({exc})") from exc


@dataclass
class MaskPatches(InputEdit):
    """Paint boxes (x0, y0, x1, y1 as fractions of the image) with a uniform colour."""
    boxes: list[list[float]] = field(default_factory=list)
    colour: tuple[int, int, int] = (128, 128, 128)

    def edit_item(self, item):
        out = []
        for im in item.images:
            im = im.convert("RGB").copy()
            w, h = im.size
            for x0, y0, x1, y1 in self.boxes:
                im.paste(tuple(self.colour), (round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)))
            out.append(im)
        return replace(item, images=out)


@dataclass
class SwapQuestion(InputEdit):
    """Ask another question about the same image."""
    question: str = ""

    def edit_item(self, item):
        return replace(item, question=self.question)


@dataclass
class ShuffleOptions(InputEdit):
    """Present the options in a seeded random order (`order` gives the permutation)."""
    seed: int = 0

    def order(self, n: int) -> list[int]:
        perm = list(range(n))
        random.Random(self.seed).shuffle(perm)
        return perm

    def edit_item(self, item):
        opts = item.options or []
        return replace(item, options=[opts[i] for i in self.order(len(opts))])


def apply_item_edits(item: Item, edits) -> Item:
    for e in edits:
        item = e.edit_item(item)
    return item


# ---- visual encoder output --------------------------------------------------------------------

@dataclass
class MaskImageTokens(Intervention):
    """Zero (or set to their mean) the merged image tokens at `indices` (None = all)."""
    point: ClassVar[str] = "features"
    indices: list[int] | None = None
    mode: str = "zero"

    def edit_features(self, feats):
        feats = feats.clone()
        idx = slice(None) if self.indices is None else torch.as_tensor(self.indices)
        feats[idx] = 0.0 if self.mode == "zero" else feats.mean(0)
        return feats


@dataclass
class NoiseImageFeatures(Intervention):
    """Add Gaussian noise of norm `scale * ||token||` to every merged image token."""
    point: ClassVar[str] = "features"
    scale: float = 1.0
    seed: int = 0

    def edit_features(self, feats):
        g = torch.Generator().manual_seed(self.seed)
        d = torch.randn(feats.shape, generator=g).to(feats)
        return feats + d / d.norm(dim=-1, keepdim=True) * self.scale * feats.norm(dim=-1, keepdim=True)


# ---- residual stream --------------------------------------------------------------------------

@dataclass
class ResidualEdit(Intervention):
    """Edit decoder layer `layer`'s output at `positions` (sequence indices, or "latents").

    op: "zero", "add" (value [H]), "set" (value [H] or one row per position), "scale" (factor).
    """

    point: ClassVar[str] = "residual"
    layer: int = 0
    positions: list[int] | str = "latents"
    op: str = "zero"
    value: list | None = None
    factor: float = 1.0

    @property
    def shares_prefix(self) -> bool:
        return self.positions == "latents"

    def edit(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """New value of one position's vector x [H]; i indexes `value` rows for "set"."""
        if self.op == "zero":
            return torch.zeros_like(x)
        if self.op == "scale":
            return x * self.factor
        v = torch.as_tensor(self.value, dtype=x.dtype, device=x.device)
        v = v[i] if v.dim() == 2 else v
        return x + v if self.op == "add" else v


@dataclass
class Cursor:
    """What the current forward covers, per row: first sequence index and latent-slot mask."""
    start: list[int]
    latent: torch.Tensor | None = None  # [B, T] bool, True where the input slot is a latent


@contextmanager
def residual_hooks(layers, row_edits: list[list[ResidualEdit]], cursor: Cursor) -> Iterator[None]:
    """Temporary forward hooks on decoder `layers` that apply each row's residual edits."""
    by_layer: dict[int, list[tuple[int, ResidualEdit]]] = {}
    for r, edits in enumerate(row_edits):
        for e in edits:
            by_layer.setdefault(e.layer, []).append((r, e))
    handles = []
    try:
        for li, items in by_layer.items():
            handles.append(layers[li].register_forward_hook(_make_hook(items, cursor)))
        yield
    finally:
        for h in handles:
            h.remove()


def _make_hook(items: list[tuple[int, ResidualEdit]], cursor: Cursor):
    """Forward hook: decoder layers return a tensor [B, T, H] in transformers 5."""
    def hook(module, args, out):
        out = out.clone()
        T = out.shape[1]
        for r, e in items:
            if e.positions == "latents":
                cols = [] if cursor.latent is None else cursor.latent[r].nonzero().flatten().tolist()
            else:
                cols = [p - cursor.start[r] for p in e.positions]
            for i, t in enumerate(cols):
                if 0 <= t < T:
                    out[r, t] = e.edit(out[r, t], i)
        return out

    return hook


# ---- attention knockout (replay) --------------------------------------------------------------

@dataclass
class Knockout(Intervention):
    """In a replay, `query` positions may not attend to `key` positions.

    query: "after_segment" (everything after the last segment: the answer) or "latents";
    key: "latents" or "image".
    """

    point: ClassVar[str] = "knockout"
    query: str = "after_segment"
    key: str = "latents"


# ---- recorders --------------------------------------------------------------------------------

@dataclass
class RecordLayers(Intervention):
    """Record all-layer hidden states [L+1, H] at every latent slot (read-only)."""
    point: ClassVar[str] = "record"


@dataclass
class RecordLogits(Intervention):
    """Record the full logits of every generated step (read-only)."""
    point: ClassVar[str] = "record"


# ---- CapImagine text imagination --------------------------------------------------------------

@dataclass
class SpanEdit(Intervention, abstract=True):
    point: ClassVar[str] = "span"


@dataclass
class DeleteSpan(SpanEdit):
    """Empty the imagination span (markers stay)."""
    def edit_span(self, ids, tokenizer):
        return []


@dataclass
class ShuffleSpan(SpanEdit):
    """Shuffle the span's tokens in a seeded order."""
    seed: int = 0

    def edit_span(self, ids, tokenizer):
        ids = list(ids)
        random.Random(self.seed).shuffle(ids)
        return ids


@dataclass
class ReplaceSpan(SpanEdit):
    """Replace the span by another instance's caption (token ids, or text to tokenize)."""
    ids: list[int] | None = None
    text: str | None = None

    def edit_span(self, ids, tokenizer):
        if self.ids is not None:
            return list(self.ids)
        return tokenizer.encode(self.text or "", add_special_tokens=False)


@dataclass
class CorruptWord(SpanEdit):
    """Replace a described attribute word (e.g. the colour) by a wrong one, in the span's text."""
    old: str = ""
    new: str = ""

    def edit_span(self, ids, tokenizer):
        text = tokenizer.decode(ids)
        if self.old not in text:
            raise ValueError(f"CorruptWord: {self.old!r} does not occur in the span {text!r}")
        return tokenizer.encode(text.replace(self.old, self.new), add_special_tokens=False)


def by_point(ivs, point: str) -> list:
    """The interventions of `ivs` that act at `point`."""
    return [iv for iv in ivs if iv.point == point]
