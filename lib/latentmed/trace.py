"""`Trace`: the record of one run, and the two cheap ways to re-run it.

A trace holds the prompt and generated ids, the cleaned text (latent junk span replaced by
`<latent>`), the parsed answer, each segment (start/end positions, slot positions, the fed
vectors Z_in [K, H] and the produced ones Z_out [K, H], triggered or forced, how it ended),
the option tokens' log-probs at every step, and a NaN flag. It saves as JSON with tensors in a
safetensors sidecar, or as one dict with tensors as lists (`to_dict`).

`replay` runs ONE teacher-forced forward over prompt + generated ids with the latent slots
filled from the trace (or edited): answer log-probs without re-generating (cheap Z -> Y).
`continue_from` re-decodes after a segment with new latents (or an edited text span).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import answers
from .interventions import Cursor, FeedContext, ShuffleLatents, as_interventions, by_point, residual_hooks

SEG_TENSORS = ("z_in", "z_out", "layers")
TRACE_TENSORS = ("step_option_logprobs", "logits")


@dataclass
class Segment:
    """One latent (or text-imagination) segment; positions index the full sequence."""

    start: int  # start marker
    end: int | None = None  # end marker (None: no marker, e.g. LVR quota or a cut run)
    slots: list[int] = field(default_factory=list)  # latent slots / imagination tokens
    z_in: torch.Tensor | None = None  # [K, H] fed at the slots
    z_out: torch.Tensor | None = None  # [K, H] final post-norm hidden at the slots
    layers: torch.Tensor | None = None  # [K, L+1, H] all-layer states (when recorded)
    forced: bool = False  # opened by force_latent
    triggered: bool = True  # the model's own top choice was the start token
    p_start: float | None = None  # its probability at that step
    ended: str = ""  # forced | model | cap | quota | eos | max_new_tokens | nan | continued
    kind: str = "latent"  # latent | text

    @property
    def last(self) -> int:
        """Last position that belongs to the segment."""
        return self.end if self.end is not None else max(self.slots, default=self.start)


@dataclass
class Trace:
    method: str
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str
    clean_text: str
    answer: str | None  # option letter
    answer_index: int | None
    unparsed: bool
    segments: list[Segment]
    options: list[str] | None = None
    option_ids: list[int] | None = None
    answer_step: int | None = None  # generated index whose logits score the answer
    answer_logprobs: list[float] | None = None
    step_option_logprobs: torch.Tensor | None = None  # [n_generated, n_options]
    nan: bool = False
    stop: str = ""
    config: dict = field(default_factory=dict)
    interventions: list[dict] = field(default_factory=list)
    logits: torch.Tensor | None = None  # [n_generated, V] when recorded
    inputs: Any = field(default=None, repr=False)  # the Prompt it ran on (not serialised)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.generated_ids

    @property
    def triggered(self) -> bool:
        """Was the start token the model's own top choice where the first segment opened?"""
        return bool(self.segments) and self.segments[0].triggered

    @classmethod
    def build(cls, reasoner, prompt: list[int], gen: list[int], segments: list[Segment], **kw) -> "Trace":
        """Assemble a trace: decode and clean the text, parse the answer, find the answer step."""
        tok, spec, enc = reasoner.tokenizer, reasoner.spec, kw.pop("inputs", None)
        for s in segments:
            if s.kind == "text" and s.slots:
                s.z_in = reasoner.embed(torch.tensor(prompt + gen)[s.slots])
        clean = clean_text(tok, len(prompt), gen, segments)
        options = getattr(enc, "options", None)
        opt_ids = kw.pop("option_ids", None)
        parsed = answers.parse_answer(clean, spec.answer_format, options)
        t = cls(spec.method, list(prompt), list(gen), tok.decode(gen, skip_special_tokens=False), clean,
                parsed.letter, parsed.index, parsed.unparsed, segments, options, opt_ids, inputs=enc, **kw)
        if opt_ids and t.step_option_logprobs is not None:
            t.answer_step = answer_step(gen, segments, len(prompt), opt_ids)
            if t.answer_step is not None:
                t.answer_logprobs = t.step_option_logprobs[t.answer_step].tolist()
        return t

    # ---- serialisation ----
    def to_dict(self, tensors: str = "list") -> dict:
        """Plain dict; tensors as nested lists ("list") or left out for a sidecar ("omit")."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("inputs", "segments")}
        out["segments"] = [{f.name: getattr(s, f.name) for f in fields(s)} for s in self.segments]
        for d in [out] + out["segments"]:
            for k, v in d.items():
                if isinstance(v, torch.Tensor):
                    d[k] = v.float().tolist() if tensors == "list" else None
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Trace":
        d = dict(d)
        segs = [Segment(**{k: _tensor(v) if k in SEG_TENSORS else v for k, v in s.items()})
                for s in d.pop("segments")]
        return cls(segments=segs, **{k: _tensor(v) if k in TRACE_TENSORS else v for k, v in d.items()})

    def save(self, path: str | Path) -> Path:
        """JSON at `path`, tensors in `<path>.safetensors` next to it."""
        path = Path(path)
        flat = {k: getattr(self, k) for k in TRACE_TENSORS if getattr(self, k) is not None}
        for i, s in enumerate(self.segments):
            flat.update({f"segments.{i}.{k}": v for k in SEG_TENSORS if (v := getattr(s, k)) is not None})
        save_file({k: v.detach().float().contiguous().cpu() for k, v in flat.items()}, f"{path}.safetensors")
        path.write_text(json.dumps(self.to_dict(tensors="omit")))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        path = Path(path)
        try:
            t = cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError, KeyError) as exc:
            raise ValueError(f"{path}: not a saved trace ({exc})") from exc
        side = Path(f"{path}.safetensors")
        flat = load_file(side) if side.exists() else {}
        for k, v in flat.items():
            parts = k.split(".")
            target = t if len(parts) == 1 else t.segments[int(parts[1])]
            setattr(target, parts[-1], v)
        return t


def _tensor(v):
    return None if v is None else torch.tensor(v, dtype=torch.float32)


def trigger_rate(traces) -> float:
    """Natural trigger rate: share of runs whose first segment the model chose to open."""
    traces = list(traces)
    return sum(t.triggered for t in traces) / len(traces) if traces else float("nan")


def clean_text(tokenizer, prompt_len: int, gen: list[int], segments: list[Segment]) -> str:
    """Generated text with each latent segment (markers, junk ids) replaced by `<latent>`."""
    pieces, cursor = [], 0
    for s in segments:
        if s.kind != "latent":
            continue
        a, b = s.start - prompt_len, s.last - prompt_len + 1
        pieces += [tokenizer.decode(gen[cursor:a], skip_special_tokens=True), "<latent>"]
        cursor = b
    pieces.append(tokenizer.decode(gen[cursor:], skip_special_tokens=True))
    return "".join(pieces).strip()


def answer_step(gen: list[int], segments: list[Segment], prompt_len: int, 
                option_ids: list[int]) -> int | None:
    """First generated index after the last segment holding an option token (else right after)."""
    after = segments[-1].last - prompt_len + 1 if segments else 0
    ids = set(option_ids)
    for i in range(after, len(gen)):
        if gen[i] in ids:
            return i
    return after if after < len(gen) else None


# ---- replay: one teacher-forced forward -----------------------------------------------------

@dataclass
class ReplayResult:
    """Option log-probs of a replay: at the answer step, and at every generated step."""

    answer_logprobs: list[float] | None
    margins: list[float] | None
    answer_index: int | None  # argmax over the options at the answer step
    step_option_logprobs: torch.Tensor | None  # [n_generated, n_options]
    ids: list[int]  # the (edited, sanitized) sequence that was run
    hidden: torch.Tensor  # [T, H] final post-norm hidden states


@dataclass
class _Seq:
    """A sequence under edit: ids, vectors fed at latent slots, and each entry's old position."""

    ids: list[int]
    vecs: dict[int, torch.Tensor]
    origin: list[int | None]


def _edited_sequence(reasoner, trace: Trace, edits) -> _Seq:
    """Sanitized ids of the trace, with segment, span and latent-feed edits applied."""
    ids, fill = list(trace.ids), reasoner.ids.fill
    drop, insert, vecs = set(), {}, {}
    for si, s in enumerate(trace.segments):
        if s.kind == "text":  # CapImagine: span edits replace the tokens between the markers
            span_edits = by_point(edits, "span")
            new = [ids[p] for p in s.slots]
            for e in span_edits:
                new = e.edit_span(new, reasoner.tokenizer)
            if span_edits:
                drop.update(s.slots)
                insert[s.start] = new
            continue
        for p in s.slots:
            ids[p] = fill if p != s.start else ids[p]  # junk ids could be vision ids: sanitize
        K, z = len(s.slots), s.z_in
        k = K
        for e in by_point(edits, "segment"):
            k = None if k is None else e.segment_k(k)
        if k is None:
            drop.update(range(s.start, s.last + 1))
            continue
        if k > K:
            raise ValueError(f"replay cannot add latents (K {K} -> {k}); use continue_from")
        drop.update(p for p in s.slots[k:] if p != s.start)
        for i in range(k):
            zi = z[i]
            for e in by_point(edits, "latent"):
                if isinstance(e, ShuffleLatents) and e.source is None:
                    e = replace(e, source=z[:k].tolist())
                zi = e.feed(zi, FeedContext(k=i, segment=si))
            vecs[s.slots[i]] = zi
    seq = _Seq([], {}, [])
    for p, t in enumerate(ids):
        if p not in drop:
            if p in vecs:
                seq.vecs[len(seq.ids)] = vecs[p]
            seq.ids.append(t)
            seq.origin.append(p)
        for t2 in insert.get(p, []):
            seq.ids.append(t2)
            seq.origin.append(None)
    return seq


def knockout_mask(seq: _Seq, knockouts, image_id: int, dtype) -> torch.Tensor | None:
    """4-D additive mask [1, 1, T, T]: causal, plus each knockout's (query, key) pairs blocked."""
    if not knockouts:
        return None
    T = len(seq.ids)
    latent = torch.zeros(T, dtype=torch.bool)
    latent[list(seq.vecs)] = True
    after = torch.zeros(T, dtype=torch.bool)
    if seq.vecs:
        after[max(seq.vecs) + 1:] = True
    groups = {"latents": latent, "after_segment": after, "image": torch.tensor(seq.ids) == image_id}
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    for ko in knockouts:
        allowed &= ~(groups[ko.query][:, None] & groups[ko.key][None, :])
    mask = torch.zeros(T, T, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def replay(reasoner, trace: Trace, edits=(), inputs=None) -> ReplayResult:
    """One teacher-forced forward over the trace's sequence, latent slots from the trace or edits."""
    edits = as_interventions(edits)
    enc = inputs if inputs is not None else trace.inputs
    if enc is None:
        raise ValueError("replay needs the trace's inputs (pass inputs=reasoner.build_inputs(...))")
    seq = _edited_sequence(reasoner, trace, edits)
    ids = torch.tensor([seq.ids])
    P = len(trace.prompt_ids)
    with torch.inference_mode():
        feats = reasoner.image_features([enc], [edits])
        mask4d = knockout_mask(seq, by_point(edits, "knockout"), reasoner.ids.image, reasoner.dtype)
        latent = torch.zeros(1, len(seq.ids), dtype=torch.bool)
        latent[0, list(seq.vecs)] = True
        overrides = [(0, p, v) for p, v in seq.vecs.items()]
        with residual_hooks(reasoner.layers, [by_point(edits, "residual")], Cursor([0], latent)):
            out, _ = reasoner.forward(ids, None, enc.image_grid_thw, feats, overrides, attn4d=mask4d)
        hidden = out.last_hidden_state[0]
        opt_ids = trace.option_ids
        step_lp = None
        if opt_ids and len(seq.ids) > P:
            step_lp = answers.option_logprobs(reasoner.model.lm_head(hidden[P - 1:-1]), opt_ids)
    result = ReplayResult(None, None, None, step_lp, seq.ids, hidden)
    if step_lp is not None and trace.answer_step is not None:
        old = P + trace.answer_step
        new = seq.origin.index(old) if old in seq.origin else None
        if new is not None:
            lp = step_lp[new - P]
            result.answer_logprobs = lp.tolist()
            result.margins = answers.margins(lp).tolist()
            result.answer_index = answers.score_options(lp)
    return result


# ---- continue_from: re-decode after a segment ------------------------------------------------

def continue_from(reasoner, trace: Trace, new_latents=None, edits=(), segment: int = -1,
                  inputs=None, **decode_kw) -> Trace:
    """Cut the run after segment `segment`, refill it (new latents or an edited span), decode on."""
    from .decode import DecodeConfig, Decoder, Prompt

    edits = as_interventions(edits)
    enc = inputs if inputs is not None else trace.inputs
    if enc is None:
        raise ValueError("continue_from needs the trace's inputs (pass inputs=...)")
    if not trace.segments:
        raise ValueError("continue_from: the trace has no segment to continue from")
    si = segment % len(trace.segments)
    old, spec, ids = trace.segments[si], reasoner.spec, reasoner.ids
    P = len(trace.prompt_ids)
    head = trace.ids[:old.start + 1]  # up to and including the start marker
    seg = Segment(start=old.start, forced=old.forced, triggered=old.triggered, p_start=old.p_start,
                  ended="continued", kind=old.kind)
    overrides = []
    if old.kind == "text":
        span = [trace.ids[p] for p in old.slots]
        for e in by_point(edits, "span"):
            span = e.edit_span(span, reasoner.tokenizer)
        seg.slots = list(range(len(head), len(head) + len(span)))
        body = head + span + [ids.end]
    else:
        z = old.z_in if new_latents is None else torch.as_tensor(new_latents, dtype=reasoner.dtype)
        z = torch.zeros(0, reasoner.hidden_size) if z is None else z
        z = torch.stack([_feed_all(edits, zi, k, si) for k, zi in enumerate(z)]) if len(z) else z
        first = old.start if spec.placement == "overwrite_start" and len(z) else old.start + 1
        body = head + [ids.fill] * (first + len(z) - len(head))
        seg.slots = list(range(first, first + len(z)))
        overrides = [(0, p, v) for p, v in zip(seg.slots, z)]
        seg.z_in = z if len(z) else None
        if spec.end_rule != "after_k_sample":
            body.append(ids.end)
    seg.end = len(body) - 1 if body[-1] == ids.end else None
    cfg = DecodeConfig(**{**trace.config, **decode_kw})
    prompt = Prompt(torch.tensor([body]), enc.pixel_values, enc.image_grid_thw, enc.text,
                    question=getattr(enc, "question", ""), options=getattr(enc, "options", None),
                    option_ids=trace.option_ids, prompt_len=P)
    with torch.inference_mode():
        dec = Decoder(reasoner, cfg).prefill([prompt], [edits], overrides=overrides)
        if seg.slots:
            seg.z_out = dec.full_hidden[0, seg.slots]
        dec.rows[0].segments = list(trace.segments[:si]) + [seg]
        out = dec.run()[0]
    out.inputs = enc
    return out


def _feed_all(edits, z: torch.Tensor, k: int, segment: int) -> torch.Tensor:
    for e in by_point(edits, "latent"):
        z = e.feed(z, FeedContext(k=k, segment=segment))
    return z
