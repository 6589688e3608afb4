"""Our own decode loop over the stock HF Qwen2.5-VL, with a latent segment and intervention points.

One prefill (image + prompt) fills an explicit KV cache; then every step feeds one input per
batch row as `inputs_embeds` [B, 1, H]: the embedding of the chosen token, or, at a latent slot,
the final-layer post-norm hidden state of the previous position (through an optional head and
the row's latent-feed interventions). Positions are explicit M-RoPE ids: `get_rope_index` for the
prefill, then `next_pos` (= tokens so far + the image's rope delta) for every later slot, so no
model state (`rope_deltas`) is ever read. Per-row state lives in `_Row`; `LatentSpec` says where
latents sit and how a segment ends (see spec.py). Greedy or seeded sampling per row.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace

import torch
from transformers import DynamicCache

from .inputs import Encoded
from .interventions import (Cursor, FeedContext, Intervention, RecordLayers, RecordLogits,
                            as_interventions, by_point, residual_hooks)
from .trace import Segment, Trace


@dataclass
class DecodeConfig:
    """Knobs of one decode run (stored in every trace)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    force_latent: bool = False  # mask the first step's logits to the start token
    option_ids: list[int] | None = None  # tokens whose log-probs score the answer
    record_layers: bool = False  # all-layer states at latent slots
    record_logits: bool = False  # full logits of every step


@dataclass
class Prompt(Encoded):
    """Encoded inputs plus what scoring needs: the question, options and their token ids.

    `prompt_len` < len(input_ids) marks teacher-forced generated ids after the prompt
    (used by `continue_from`).
    """

    question: str = ""
    options: list[str] | None = None
    option_ids: list[int] | None = None
    prompt_len: int | None = None


def with_records(cfg: DecodeConfig, ivs) -> DecodeConfig:
    """Turn recorder interventions into the config flags they stand for."""
    kinds = {type(iv) for iv in ivs}
    return replace(cfg, record_layers=cfg.record_layers or RecordLayers in kinds,
                   record_logits=cfg.record_logits or RecordLogits in kinds)


# ---- model calls --------------------------------------------------------------------------------

def collate(encs: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Left-pad prompts to one [B, T] tensor; the 2-D mask is None when nothing is padded."""
    T = max(e.input_ids.shape[1] for e in encs)
    ids = torch.full((len(encs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encs), T), dtype=torch.long)
    for r, e in enumerate(encs):
        n = e.input_ids.shape[1]
        ids[r, T - n:], mask[r, T - n:] = e.input_ids[0], 1
    return ids, (None if bool(mask.all()) else mask)


def pick(logits: torch.Tensor, cfg: DecodeConfig, gen: torch.Generator | None) -> int:
    """Greedy argmax, or a seeded sample with temperature and nucleus (top_p) filtering."""
    if not cfg.do_sample:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / max(cfg.temperature, 1e-6), -1)
    if cfg.top_p < 1.0:
        p, idx = probs.sort(descending=True)
        keep = p.cumsum(0) - p < cfg.top_p  # smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


# ---- per-row state ------------------------------------------------------------------------------

@dataclass
class _Row:
    """Everything one batch row carries between steps."""

    ivs: list[Intervention]
    prompt: list[int]
    gen: list[int] = field(default_factory=list)
    mode: str = "text"  # text | latent | span | done
    k: int = 0  # latents (or span tokens) fed in the open segment
    K: int = 0  # target length of the open segment
    exact: bool = False  # K set by an intervention: ignore sampled end tokens
    seg: Segment | None = None
    segments: list[Segment] = field(default_factory=list)
    z_in: list = field(default_factory=list)
    z_out: list = field(default_factory=list)
    layers: list = field(default_factory=list)
    opt_lp: list = field(default_factory=list)
    logits: list = field(default_factory=list)
    nan: bool = False
    stop: str | None = None
    generator: torch.Generator | None = None
    option_ids: list[int] | None = None

    @property
    def seq_pos(self) -> int:
        """Sequence index of the next slot (prompt + generated so far)."""
        return len(self.prompt) + len(self.gen)


class Decoder:
    """A batch of rows decoded together; `branch` copies the state for shared-work sweeps."""

    def __init__(self, reasoner, cfg: DecodeConfig):
        self.r, self.cfg, self.spec, self.ids = reasoner, cfg, reasoner.spec, reasoner.ids
        self.rows: list[_Row] = []
        self.encs: list[Encoded] = []
        self.cache = self.h = self.logits = self.pos = self.mask = None
        self.latent_in = None  # [B] bool: the last forward's input slot was a latent
        self.states = None  # all-layer states of the last forward (when recorded)

    # -- setup --
    def prefill(self, encs: list[Encoded], row_ivs: list[list[Intervention]], overrides=()) -> "Decoder":
        """Run the prompts (plus any teacher-forced generated ids) through the model once."""
        row_ivs = [as_interventions(x) for x in row_ivs]
        self.cfg = with_records(self.cfg, [iv for ivs in row_ivs for iv in ivs])
        ids, mask = collate(encs, self.ids.eos[0] if self.ids.eos else 0)
        self.mask = None if mask is None else mask.to(self.r.device)
        feats = self.r.image_features(encs, row_ivs)
        self.cache = DynamicCache(config=self.r.model.config)
        pad = [ids.shape[1] - e.input_ids.shape[1] for e in encs]
        latent = torch.zeros(ids.shape, dtype=torch.bool)
        for r, t, _ in overrides:
            latent[r, t] = True
        cursor = Cursor(start=[-p for p in pad], latent=latent)
        with residual_hooks(self.r.layers, [by_point(v, "residual") for v in row_ivs], cursor):
            out, self.pos = self.r.forward(ids, self.mask, _cat([e.image_grid_thw for e in encs]),
                                           feats, overrides, self.cache)
        self.full_hidden = out.last_hidden_state
        self._set_outputs(out)
        self.encs = list(encs)
        for r, (e, ivs) in enumerate(zip(encs, row_ivs)):
            self.rows.append(self._new_row(r, e, ivs, pad[r]))
        self.latent_in = torch.zeros(len(encs), dtype=torch.bool)
        return self

    def _new_row(self, r: int, e: Encoded, ivs: list[Intervention], pad: int) -> _Row:
        all_ids = e.input_ids[0].tolist()
        P = getattr(e, "prompt_len", None) or len(all_ids)
        row = _Row(ivs, all_ids[:P], gen=all_ids[P:])
        row.option_ids = self.cfg.option_ids or getattr(e, "option_ids", None)
        if self.cfg.do_sample:
            row.generator = torch.Generator().manual_seed(self.cfg.seed)
        if row.option_ids and row.gen:  # teacher-forced ids: their option log-probs from the prefill
            h = self.full_hidden[r, pad + P - 1:-1]
            row.opt_lp = list(torch.log_softmax(self.r.model.lm_head(h).float(), -1)[:, row.option_ids])
        return row

    def _set_outputs(self, out) -> None:
        h = out.last_hidden_state[:, -1]
        self.h, self.logits = h, self.r.model.lm_head(h).float()
        self.states = out.hidden_states

    # -- the loop --
    def run(self) -> list[Trace]:
        """Decode until every row stops; returns one trace per row."""
        cursor = Cursor(start=[0] * len(self.rows))
        edits = [by_point(row.ivs, "residual") for row in self.rows]
        with torch.inference_mode(), residual_hooks(self.r.layers, edits, cursor):
            for _ in range(self.cfg.max_new_tokens):  # every step adds a token to each live row
                if self.done:
                    break
                self.advance(cursor)
        return [self.trace(r) for r in range(len(self.rows))]

    @property
    def done(self) -> bool:
        return all(row.mode == "done" for row in self.rows)

    def advance(self, cursor: Cursor | None = None) -> None:
        """Choose every row's next input from the last forward, then run the next forward."""
        B = len(self.rows)
        bad = (~torch.isfinite(self.logits.sum(-1) + self.h.float().sum(-1))).tolist()
        greedy = self.logits.argmax(-1).tolist()
        lsm = torch.log_softmax(self.logits, -1) if any(row.option_ids for row in self.rows) else None
        filler = self.ids.eos[0] if self.ids.eos else 0
        next_ids, vecs = [filler] * B, {}
        for r, row in enumerate(self.rows):
            if row.mode == "done":
                continue
            if bad[r]:
                row.nan = True
                self._stop(row, "nan")
                continue
            self._record_outputs(r, row, lsm)
            tok, vec = self._decide(r, row, greedy[r])
            row.gen.append(tok)
            next_ids[r] = tok
            if vec is not None:
                vecs[r] = vec
            self._check_stop(row, tok)
        if not self.done:
            self._forward(next_ids, vecs, cursor)

    def _record_outputs(self, r: int, row: _Row, lsm) -> None:
        if row.option_ids:
            row.opt_lp.append(lsm[r, row.option_ids])
        if self.cfg.record_logits:
            row.logits.append(self.logits[r])
        if self.latent_in[r]:
            row.z_out.append(self.h[r])
            if self.states is not None:
                row.layers.append(torch.stack([s[r, -1] for s in self.states]))

    def _forward(self, next_ids: list[int], vecs: dict, cursor: Cursor | None) -> None:
        emb = self.r.model.get_input_embeddings()(torch.tensor(next_ids, device=self.r.device)[:, None])
        latent_in = torch.zeros(len(self.rows), dtype=torch.bool)
        for r, v in vecs.items():
            emb[r, 0] = v.to(emb.dtype)
            latent_in[r] = True
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        if cursor is not None:
            cursor.start = [row.seq_pos - 1 for row in self.rows]
            cursor.latent = latent_in[:, None]
        want = self.cfg.record_layers and bool(latent_in.any())
        out = self.r.step(emb, self.pos, self.mask, self.cache, hidden_states=want)
        self.pos = self.pos + 1
        self.latent_in = latent_in
        self._set_outputs(out)

    # -- decisions --
    def _decide(self, r: int, row: _Row, greedy: int) -> tuple[int, torch.Tensor | None]:
        """The token recorded at the next slot, and the latent to feed there (or None)."""
        if row.mode == "latent":
            out = self._latent_step(r, row, greedy)
            if out is not None:
                return out
        elif row.mode == "span":
            out = self._span_step(r, row)
            if out is not None:
                return out
        return self._text_step(r, row, greedy)

    def _pick(self, r: int, row: _Row, greedy: int) -> int:
        return greedy if not self.cfg.do_sample else pick(self.logits[r], self.cfg, row.generator)

    def _text_step(self, r: int, row: _Row, greedy: int) -> tuple[int, torch.Tensor | None]:
        spec, start = self.spec, self.ids.start
        allowed = spec.has_segments and (spec.max_segments is None or len(row.segments) < spec.max_segments)
        K = spec.k_target
        for iv in by_point(row.ivs, "segment"):
            K = None if K is None else iv.segment_k(K)
        forced = allowed and K is not None and self.cfg.force_latent and not row.segments and not row.gen
        if forced:
            tok = start
        elif allowed and K is None:  # segment dropped: ban the start token
            logits = self.logits[r].clone()
            logits[start] = -float("inf")
            tok = pick(logits, self.cfg, row.generator)
        else:
            tok = self._pick(r, row, greedy)
        if not (allowed and K is not None and tok == start):
            return tok, None
        p_start = float(torch.softmax(self.logits[r], -1)[start])
        row.seg = Segment(start=row.seq_pos, forced=forced, triggered=(greedy == start) if forced else True,
                          p_start=p_start, kind="text" if spec.placement == "text" else "latent")
        row.k, row.K, row.exact = 0, K, bool(by_point(row.ivs, "segment"))
        row.z_in, row.z_out, row.layers = [], [], []
        if spec.placement == "text":
            row.mode = "span"
            return start, None
        row.mode = "latent"
        if spec.placement == "overwrite_start" and K > 0:
            return start, self._feed(r, row)  # the first latent sits on the start slot itself
        return start, None

    def _latent_step(self, r: int, row: _Row, greedy: int) -> tuple[int, torch.Tensor | None] | None:
        """Inside a latent segment: end it (returns the end token, or None to sample) or feed."""
        spec, end = self.spec, self.ids.end
        if row.k >= row.K:
            how = "quota" if spec.end_rule == "after_k_sample" else \
                "cap" if spec.end_rule == "model_or_cap" and not row.exact else "forced"
            self._close(row, how, end_pos=None if how == "quota" else row.seq_pos)
            return None if how == "quota" else (end, None)
        tok = self._pick(r, row, greedy)
        early_ok = not row.exact and spec.end_rule != "after_k_sample" and \
            (row.k > 0 or spec.end_rule == "model_or_cap")
        if tok == end and early_ok:
            self._close(row, "model", end_pos=row.seq_pos)
            return end, None
        vec = self._feed(r, row)
        return (self.ids.pad if self.ids.pad is not None else tok), vec

    def _span_step(self, r: int, row: _Row) -> tuple[int, torch.Tensor | None] | None:
        """Inside CapImagine's text imagination: record the span, close it on the end marker."""
        if row.k > 0:
            row.z_out.append(self.h[r])
        tok = self._pick(r, row, int(self.logits[r].argmax()))
        cap = self.spec.max_latents
        if tok == self.ids.end or (cap and row.k >= cap):
            self._close(row, "model" if tok == self.ids.end else "cap", end_pos=row.seq_pos)
            return self.ids.end, None
        row.seg.slots.append(row.seq_pos)
        row.k += 1
        if tok in self.ids.eos:
            self._close(row, "eos", end_pos=None)
        return tok, None

    def _feed(self, r: int, row: _Row) -> torch.Tensor:
        """The next latent: hidden -> head (if any) -> the row's latent-feed interventions."""
        z = self.h[r]
        if self.r.head is not None and (row.k > 0 or self.spec.head_on_first):
            z = self.r.head(z)
        ctx = FeedContext(k=row.k, segment=len(row.segments), row=r)
        for iv in by_point(row.ivs, "latent"):
            z = iv.feed(z, ctx)
        row.seg.slots.append(row.seq_pos)
        row.z_in.append(z)
        row.k += 1
        return z

    def _close(self, row: _Row, how: str, end_pos: int | None) -> None:
        seg = row.seg
        seg.end, seg.ended = end_pos, how
        seg.z_in = torch.stack(row.z_in) if row.z_in else None
        seg.z_out = torch.stack(row.z_out) if row.z_out else None
        seg.layers = torch.stack(row.layers) if row.layers else None
        row.segments.append(seg)
        row.seg, row.mode = None, "text"

    def _stop(self, row: _Row, why: str) -> None:
        if row.seg is not None:
            self._close(row, why, end_pos=None)
        row.mode, row.stop = "done", why

    def _check_stop(self, row: _Row, tok: int) -> None:
        if row.mode == "text" and tok in self.ids.eos:
            self._stop(row, "eos")
        elif len(row.gen) >= self.cfg.max_new_tokens:
            self._stop(row, "max_new_tokens")

    # -- sweeps --
    def at_branch_point(self, r: int = 0) -> bool:
        """True when row r's next decision would open a segment (nothing has differed yet)."""
        row, spec = self.rows[r], self.spec
        if row.mode != "text" or not spec.has_segments:
            return False
        if spec.max_segments is not None and len(row.segments) >= spec.max_segments:
            return False
        if self.cfg.force_latent and not row.segments and not row.gen:
            return True
        state = row.generator.get_state() if row.generator is not None else None
        tok = self._pick(r, row, int(self.logits[r].argmax()))
        if state is not None:
            row.generator.set_state(state)
        return tok == self.ids.start

    def branch(self, row_ivs: list[list[Intervention]]) -> "Decoder":
        """A new decoder whose M rows continue row 0's state, each with its own interventions."""
        M, src = len(row_ivs), self.rows[0]
        new = copy.copy(self)
        new.cache = copy.deepcopy(self.cache)
        new.cache.batch_repeat_interleave(M)
        new.h, new.logits = self.h[:1].repeat(M, 1), self.logits[:1].repeat(M, 1)
        new.pos, new.latent_in = self.pos[:1].repeat(M), self.latent_in[:1].repeat(M)
        new.mask = None if self.mask is None else self.mask[:1].repeat(M, 1)
        new.states = None if self.states is None else tuple(s[:1].repeat(M, 1, 1) for s in self.states)
        new.rows, new.encs = [], [self.encs[0]] * M
        for ivs in row_ivs:
            row = copy.copy(src)
            row.ivs = as_interventions(ivs)
            row.gen, row.segments, row.opt_lp, row.logits = list(src.gen), list(src.segments), \
                list(src.opt_lp), list(src.logits)
            if src.generator is not None:
                row.generator = torch.Generator()
                row.generator.set_state(src.generator.get_state())
            new.rows.append(row)
        new.cfg = with_records(self.cfg, [iv for row in new.rows for iv in row.ivs])
        return new

    # -- results --
    def trace(self, r: int) -> Trace:
        row = self.rows[r]
        opt = torch.stack(row.opt_lp) if row.opt_lp else None
        return Trace.build(self.r, row.prompt, row.gen, row.segments, config=asdict(self.cfg),
                           interventions=[iv.to_dict() for iv in row.ivs], step_option_logprobs=opt,
                           nan=row.nan, stop=row.stop or "max_new_tokens", option_ids=row.option_ids,
                           logits=torch.stack(row.logits) if row.logits else None, inputs=self.encs[r])


def _cat(xs):
    xs = [x for x in xs if x is not None]
    return torch.cat(xs) if xs else None


def generate(reasoner, inputs: Encoded | list[Encoded], interventions=(), config: DecodeConfig | None = None,
             **kw) -> Trace | list[Trace]:
    """Decode one prompt (-> Trace) or a batch (-> list); `interventions` per row or shared."""
    cfg = config or DecodeConfig(**kw)
    single = isinstance(inputs, Encoded)
    encs = [inputs] if single else list(inputs)
    ivs = list(interventions)
    row_ivs = ivs if ivs and isinstance(ivs[0], (list, tuple)) else [ivs] * len(encs)
    with torch.inference_mode():
        traces = Decoder(reasoner, cfg).prefill(encs, row_ivs).run()
    return traces[0] if single else traces
