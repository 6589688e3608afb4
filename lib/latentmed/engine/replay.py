"""Re-running a trace with edits: three ways, named so that they cannot be confused.

* `replay` (teacher-forced): ONE forward over the recorded sequence. The latent slots get the
  recorded latents (or edited ones) and every later token stays as recorded, so an edit of
  latent k does not change latents k+1.. nor the text: it measures the effect of the edited
  vectors themselves on the answer's log-probs (cheap Z -> Y).
* `continue_from` (cut and re-decode): the run is cut right after a segment, the segment is
  refilled (new latents, or an edited text span), and decoding continues: the answer may change,
  the segment itself stays as given.
* `regenerate` (decode again): the prompt is decoded from scratch with the edits, so an edit of
  latent k propagates to every later latent and to the text.

Input edits (another image, question, masked evidence...) rebuild the prompt in all three; in
`replay` and `continue_from` the recorded latents then meet the edited input (the mixed runs
of mediation analysis: X' with Z from X).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .answers import margins, option_logprobs, score_options
from .attention import additive, allowed, rules_for
from .decode import DecodeConfig, Decoder, config_of, generate
from .hooks import Cursor, Recorder, installed
from .inputs import Prompt
from .interventions import (
    FeedContext,
    ShuffleLatents,
    as_interventions,
    by_point,
    check_supported,
)
from .trace import Segment, Trace


@dataclass
class ReplayResult:
    """Option log-probs of a replay at the answer step (over the options and over the
    vocabulary), the answer they choose, and at every generated step."""

    answer_logprobs: list[float] | None
    answer_logprobs_vocab: list[float] | None
    margins: list[float] | None
    answer_index: int | None  # argmax over the options at the answer step (None: no step, or NaN)
    step_option_logprobs: torch.Tensor | None  # [n_generated, n_options], over the vocabulary
    ids: list[int]  # the (edited, sanitized) sequence that was run
    hidden: torch.Tensor  # [T, H] final post-norm hidden states
    segments: list[Segment] = field(default_factory=list)  # positions in the edited sequence
    nan: bool = False  # non-finite latents or log-probs
    records: dict[str, torch.Tensor] = field(default_factory=dict)
    record_positions: dict[str, list[int]] = field(default_factory=dict)

    @property
    def margin(self) -> float | None:
        return None if self.margins is None or self.answer_index is None else self.margins[self.answer_index]


@dataclass
class _Seq:
    """A sequence under edit: ids, vectors fed at latent slots, and each entry's old position."""

    ids: list[int]
    vecs: dict[int, torch.Tensor]
    origin: list[int | None]
    segments: list[Segment]


def _inputs(reasoner, trace: Trace, inputs, edits, entry: str) -> tuple[Prompt, int]:
    """The prompt to run (the trace's, or given; rebuilt when there are input edits) and the
    shift of every generated position (new prompt length - old)."""
    enc = inputs if inputs is not None else trace.inputs
    if enc is None:
        raise ValueError(f"{entry} needs the trace's inputs (pass inputs=reasoner.prompt(...))")
    enc = reasoner.with_input_edits(enc, edits)
    return enc, enc.input_ids.shape[1] - len(trace.prompt_ids)


def _check_kinds(trace: Trace, edits, entry: str, segments=None) -> None:
    """Refuse edits whose point this trace does not have (so none is silently a no-op)."""
    segs = trace.segments if segments is None else segments
    has = {"latent": any(s.kind == "latent" for s in segs), "span": any(s.kind == "text" for s in segs),
           "segment": bool(segs)}
    what = {"latent": "a latent segment", "span": "a text imagination span", "segment": "a segment"}
    for e in edits:
        if e.point in has and not has[e.point]:
            raise ValueError(f"{type(e).__name__} ({entry}) edits {what[e.point]}, and this trace has none")


def _edited_sequence(reasoner, trace: Trace, enc: Prompt, shift: int, edits) -> _Seq:
    """The new prompt + the trace's generated ids, with segment, span and latent-feed edits."""
    P_old = len(trace.prompt_ids)
    ids = enc.input_ids[0].tolist() + list(trace.generated_ids)
    at = lambda p: p + shift if p >= P_old else p  # noqa: E731  old position -> position in `ids`
    fill = reasoner.ids.fill
    drop, insert, vecs, new_segs = set(), {}, {}, []
    for si, s in enumerate(trace.segments):
        start, slots, end = at(s.start), [at(p) for p in s.slots], None if s.end is None else at(s.end)
        if s.kind == "text":  # CapImagine: span edits replace the tokens between the markers
            span_edits = by_point(edits, "span")
            new = [ids[p] for p in slots]
            for e in span_edits:
                new = e.edit_span(new, reasoner.tokenizer)
            if span_edits:
                drop.update(slots)
                insert[start] = new
            new_segs.append((si, start, slots, end, "text", new if span_edits else None))
            continue
        for p in slots:
            ids[p] = fill if p != start else ids[p]  # junk ids could be vision ids: sanitize
        K, z = len(slots), s.z_in
        k = K
        for e in (e for e in by_point(edits, "segment") if e.acts_on(si)):
            k = None if k is None else e.segment_k(k)
        if k is None:
            drop.update(range(start, (end if end is not None else max(slots, default=start)) + 1))
            continue
        if k > K:
            raise ValueError(f"replay cannot add latents (K {K} -> {k}): use regenerate(trace, edits) "
                             "or continue_from(trace, new_latents)")
        drop.update(p for p in slots[k:] if p != start)
        for i in range(k):
            zi = z[i]
            ctx = FeedContext(k=i, segment=si, first=vecs[slots[0]] if i > 0 else None)
            for e in by_point(edits, "latent"):
                if isinstance(e, ShuffleLatents) and e.source is None:
                    e = replace(e, source=z[:k].tolist())
                zi = e.feed(zi, ctx)
            vecs[slots[i]] = zi
        new_segs.append((si, start, slots[:k], end, "latent", None))
    seq = _Seq([], {}, [], [])
    where: dict[int, int] = {}
    for p, t in enumerate(ids):
        if p not in drop:
            where[p] = len(seq.ids)
            if p in vecs:
                seq.vecs[len(seq.ids)] = vecs[p]
            seq.ids.append(t)
            seq.origin.append(p - shift if p >= P_old + shift else None)  # generated positions only
        for t2 in insert.get(p, []):
            seq.ids.append(t2)
            seq.origin.append(None)
    for si, start, slots, end, kind, new in new_segs:
        s0 = where[start]
        new_slots = list(range(s0 + 1, s0 + 1 + len(new))) if new is not None else [where[p] for p in slots]
        seq.segments.append(Segment(start=s0, end=None if end is None else where.get(end),
                                    slots=new_slots, kind=kind, ended=trace.segments[si].ended or "replayed"))
    return seq


def replay(reasoner, trace: Trace, edits=(), inputs=None) -> ReplayResult:
    """Teacher-forced: one forward over the trace's sequence, latent slots from the trace or the
    edits, later latents and tokens as recorded (see the module docstring)."""
    return replay_many(reasoner, [trace], [edits], [inputs])[0]


def replay_many(reasoner, traces: list[Trace], edits: list, inputs: list | None = None,
                batch_size: int = 64) -> list[ReplayResult]:
    """`replay` of many (trace, edits) pairs, `batch_size` sequences per forward (left-padded)."""
    if len(edits) != len(traces):
        raise ValueError(f"replay_many: {len(edits)} edit lists for {len(traces)} traces")
    inputs = inputs or [None] * len(traces)
    out = []
    for s in range(0, len(traces), batch_size):
        part = range(s, min(s + batch_size, len(traces)))
        out += _replay_batch(reasoner, [traces[i] for i in part], [edits[i] for i in part], [inputs[i] for i in part])
    return out


def _replay_batch(reasoner, traces, edit_lists, inputs) -> list[ReplayResult]:
    rows = []  # (trace, edits, prompt, sequence)
    for trace, edits, given in zip(traces, edit_lists, inputs):
        edits = as_interventions(edits)
        check_supported(edits, "replay")
        _check_kinds(trace, edits, "replay")
        enc, shift = _inputs(reasoner, trace, given, edits, "replay")
        rows.append((trace, edits, enc, _edited_sequence(reasoner, trace, enc, shift, edits)))
    B, T = len(rows), max(len(seq.ids) for *_, seq in rows)
    pads = [T - len(seq.ids) for *_, seq in rows]
    ids = torch.full((B, T), reasoner.ids.eos[0] if reasoner.ids.eos else 0, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    latent = torch.zeros((B, T), dtype=torch.bool)
    overrides, ok = [], torch.zeros(B, T, T, dtype=torch.bool)
    any_rules = False
    for r, ((trace, edits, enc, seq), p) in enumerate(zip(rows, pads)):
        ids[r, p:], mask[r, p:] = torch.tensor(seq.ids), 1
        latent[r, [p + q for q in seq.vecs]] = True
        overrides += [(r, p + q, v) for q, v in seq.vecs.items()]
        rules = rules_for(reasoner.spec, edits)
        any_rules = any_rules or bool(rules)
        P, n = enc.input_ids.shape[1], len(seq.ids)
        image = (torch.tensor(seq.ids) == reasoner.ids.image) & (torch.arange(n) < P)
        ok[r, p:, p:] = allowed(range(n), n, image, seq.segments, rules)
        ok[r, :p, :p] = torch.eye(p, dtype=torch.bool)
    recs = [Recorder() for _ in rows]
    with torch.inference_mode():
        feats, _ = reasoner.image_features([enc for _, _, enc, _ in rows], [e for _, e, _, _ in rows])
        grids = [enc.image_grid_thw for _, _, enc, _ in rows if enc.image_grid_thw is not None]
        mask4d = additive(ok, reasoner.dtype)[:, None] if any_rules or any(pads) else None
        with installed(reasoner.model, [by_point(e, "hook") for _, e, _, _ in rows],
                       [by_point(e, "record") for _, e, _, _ in rows], recs, Cursor([-p for p in pads], latent)):
            out, _ = reasoner.forward(ids, mask, torch.cat(grids) if grids else None, feats, overrides,
                                      attn4d=mask4d, text_from=[p + enc.input_ids.shape[1]
                                                                for (_, _, enc, _), p in zip(rows, pads)])
        hidden_all = out.last_hidden_state
        results = []
        for r, ((trace, edits, enc, seq), p) in enumerate(zip(rows, pads)):
            hidden = hidden_all[r, p:]
            P = enc.input_ids.shape[1]
            opt_ids = enc.option_ids if enc is not trace.inputs and enc.option_ids else trace.option_ids
            step_lp = None
            if opt_ids and len(seq.ids) > P:
                step_lp = option_logprobs(reasoner.model.lm_head(hidden[P - 1:-1]), opt_ids).cpu()
            results.append(_result(trace, seq, hidden, step_lp, P, recs[r]))
    return results


def _result(trace: Trace, seq: _Seq, hidden, step_lp, P: int, rec: Recorder) -> ReplayResult:
    """The replay's answer at the trace's answer step (found by its old position)."""
    records, where = rec.tensors()
    nan = bool(any(not torch.isfinite(v).all() for v in seq.vecs.values()))
    result = ReplayResult(None, None, None, None, step_lp, seq.ids, hidden, seq.segments, nan, records, where)
    if step_lp is not None and trace.answer_step is not None:
        old = len(trace.prompt_ids) + trace.answer_step
        new = seq.origin.index(old) if old in seq.origin else None
        if new is not None:
            vocab = step_lp[new - P]
            result.answer_logprobs_vocab = vocab.tolist()
            opts = vocab - vocab.logsumexp(0)
            result.answer_logprobs = opts.tolist()
            result.margins = margins(opts).tolist()
            result.nan = result.nan or not bool(torch.isfinite(vocab).all())
            result.answer_index = None if result.nan else score_options(vocab)
    return result


def continue_from(reasoner, trace: Trace, new_latents=None, edits=(), segment: int = -1, inputs=None,
                  config: DecodeConfig | None = None, **decode_kw) -> Trace:
    """Cut the run after segment `segment`, refill it (new latents, or an edited span) and decode
    on with the trace's settings (or `decode_kw`); later text is re-generated."""
    edits = as_interventions(edits)
    check_supported(edits, "continue_from")
    if not trace.segments:
        raise ValueError("continue_from: the trace has no segment to continue from")
    enc, shift = _inputs(reasoner, trace, inputs, edits, "continue_from")
    cfg = config_of(config, {**_kw(trace), **decode_kw} if config is None else {})
    si = segment % len(trace.segments)
    old, spec, ids = trace.segments[si], reasoner.spec, reasoner.ids
    _check_kinds(trace, edits, "continue_from", [old])
    P_old = len(trace.prompt_ids)
    at = lambda p: p + shift if p >= P_old else p  # noqa: E731
    head = enc.input_ids[0].tolist() + list(trace.generated_ids[:old.start + 1 - P_old])
    start = at(old.start)
    seg = Segment(start=start, forced=old.forced, triggered=old.triggered, p_start=old.p_start,
                  ended="continued", kind=old.kind)
    overrides = []
    if old.kind == "text":
        span = [trace.ids[p] for p in old.slots]
        for e in by_point(edits, "span"):
            span = e.edit_span(span, reasoner.tokenizer)
        seg.slots = list(range(len(head), len(head) + len(span)))
        body = head + span + [ids.end]
    else:
        z = old.z_in if new_latents is None else torch.as_tensor(new_latents, dtype=torch.float32)
        z = torch.zeros(0, reasoner.hidden_size) if z is None else z
        if z.dim() != 2 or (len(z) and z.shape[1] != reasoner.hidden_size):
            raise ValueError(f"continue_from: new_latents must be [K, {reasoner.hidden_size}], got {tuple(z.shape)}")
        fed = []
        for k, zi in enumerate(z):
            ctx = FeedContext(k=k, segment=si, first=fed[0] if fed else None)
            for e in by_point(edits, "latent"):
                if isinstance(e, ShuffleLatents) and e.source is None:
                    e = replace(e, source=z.tolist())
                zi = e.feed(zi, ctx)
            fed.append(zi)
        z = torch.stack(fed) if fed else z
        first = start if spec.placement == "overwrite_start" and len(z) else start + 1
        body = head + [ids.fill] * (first + len(z) - len(head))
        seg.slots = list(range(first, first + len(z)))
        overrides = [(0, p, v) for p, v in zip(seg.slots, z)]
        seg.z_in = z if len(z) else None
        if spec.end_rule != "after_k_sample" or cfg.force_suffix:
            body.append(ids.end)
    seg.end = len(body) - 1 if body[-1] == ids.end else None
    opt_ids = enc.option_ids if enc is not trace.inputs and enc.option_ids else trace.option_ids
    prompt = replace(enc, input_ids=torch.tensor([body]), prompt_len=enc.input_ids.shape[1], option_ids=opt_ids)
    segs = list(trace.segments[:si]) + [seg]
    with torch.inference_mode():
        dec = Decoder(reasoner, cfg).prefill([prompt], [edits], overrides=overrides, segments=[segs])
        if seg.slots:
            seg.z_out = dec.full_hidden[0, seg.slots].cpu()
        row = dec.rows[0]
        if cfg.force_suffix and si == 0:
            dec._after_segment(row, next_index=len(row.gen))
        out = dec.run()[0]
    out.inputs = enc
    return out


def regenerate(reasoner, trace: Trace, edits=(), inputs=None, config: DecodeConfig | None = None,
               **decode_kw) -> Trace:
    """Decode the trace's prompt again from scratch with `edits` (and its decode settings): an
    edit of latent k propagates to every later latent and to the text."""
    edits = as_interventions(edits)
    check_supported(edits, "regenerate")
    enc = inputs if inputs is not None else trace.inputs
    if enc is None:
        raise ValueError("regenerate needs the trace's inputs (pass inputs=reasoner.prompt(...))")
    cfg = config_of(config, {**_kw(trace), **decode_kw} if config is None else {})
    return generate(reasoner, enc, edits, cfg)


def _kw(trace: Trace) -> dict:
    """The decode settings recorded in a trace (what continue_from and regenerate reuse)."""
    known = set(DecodeConfig.__dataclass_fields__)
    return {k: v for k, v in (trace.config or {}).items() if k in known}


