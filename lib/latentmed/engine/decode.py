"""Our own decode loop over the stock HF Qwen2.5-VL, with a latent segment and intervention points.

One prefill (image + prompt) fills an explicit KV cache; then every step feeds one input per
batch row as `inputs_embeds` [B, 1, H]: the embedding of the chosen token, or, at a latent slot,
the latent: the final-layer post-norm hidden state of the previous position (through an optional
head), the evidence crop's image tokens or a stored constant (`LatentSpec.latent_source`), then
the row's latent-feed interventions. Positions are explicit M-RoPE ids: `get_rope_index` for the
prefill, then `pos` (= tokens so far + the image's rope delta) for every later slot, so no model
state (`rope_deltas`) is ever read. Attention rules (the spec's bottleneck, `Knockout`) become a
4-D mask (`attention.allowed`). Per-row state lives in `_Row`; `LatentSpec` says where latents sit
and how a segment ends. Greedy or seeded sampling (transformers' temperature and top-p warpers).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from .attention import additive, allowed, rules_for
from .hooks import Cursor, Recorder, installed, records_pattern
from .inputs import Prompt
from .interventions import (
    FeedContext,
    Intervention,
    as_interventions,
    by_point,
    check_supported,
    feed_rows,
)
from .kvcache import SharedPrefixCache, new_cache, shared_attention
from .trace import Segment, Trace


@dataclass
class DecodeConfig:
    """Knobs of one decode run (stored in every trace); checked on construction."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    force_latent: bool = False  # open the first segment right after the prompt (Monet may never open it)
    force_suffix: bool = False  # after a segment, feed the prompt's `after_segment_ids` (testbed layout)
    stop_after_answer: bool = False  # end a row once its answer token is chosen (studies need no more)
    option_ids: list[int] | None = None  # tokens whose log-probs score the answer (default: the prompt's)

    def __post_init__(self) -> None:
        def bad(name, msg):
            raise ValueError(f"DecodeConfig.{name}: {msg}, got {getattr(self, name)!r}")

        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
            bad("temperature", "must be a number > 0")
        p = self.top_p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            bad("seed", "must be an integer")
        for name in ("do_sample", "force_latent", "force_suffix", "stop_after_answer"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")
        if self.option_ids is not None and (not isinstance(self.option_ids, (list, tuple)) or not all(
                isinstance(i, int) and i >= 0 for i in self.option_ids)):
            bad("option_ids", "must be a list of token ids")


def config_of(config: DecodeConfig | None, kw: dict) -> DecodeConfig:
    """A config from an object or keywords (not both); unknown keywords are a clear error."""
    if config is not None and kw:
        raise ValueError(f"pass either config= or keyword settings, not both (got {sorted(kw)})")
    if config is not None:
        return config
    known = set(DecodeConfig.__dataclass_fields__)
    unknown = sorted(set(kw) - known)
    if unknown:
        raise ValueError(f"unknown decode setting(s) {unknown}; known: {sorted(known)}")
    return DecodeConfig(**kw)


# ---- model calls --------------------------------------------------------------------------------

def collate(encs: list[Prompt], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts to one [B, T] tensor and its 2-D padding mask."""
    T = max(e.input_ids.shape[1] for e in encs)
    ids = torch.full((len(encs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encs), T), dtype=torch.long)
    for r, e in enumerate(encs):
        n = e.input_ids.shape[1]
        ids[r, T - n:], mask[r, T - n:] = e.input_ids[0], 1
    return ids, mask


def pick(logits: torch.Tensor, cfg: DecodeConfig, gen: torch.Generator | None) -> int:
    """Greedy argmax, or a seeded sample after transformers' temperature and top-p warpers."""
    if not cfg.do_sample:
        return int(logits.argmax())
    x = logits.float()[None]
    if cfg.temperature != 1.0:
        x = TemperatureLogitsWarper(cfg.temperature)(None, x)
    if cfg.top_p < 1.0:
        x = TopPLogitsWarper(cfg.top_p)(None, x)
    return int(torch.multinomial(torch.softmax(x[0], -1), 1, generator=gen))


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
    opt_lp: list = field(default_factory=list)  # option log-probs of steps before this decoder's own
    opt_from: int | None = None  # the decoder's step blocks (`Decoder._opt`) this row recorded: from here
    opt_n: int = 0  # ... this many
    logits: list = field(default_factory=list)
    nan: bool = False
    stop: str | None = None
    generator: torch.Generator | None = None
    option_ids: list[int] | None = None
    suffix: list[int] = field(default_factory=list)  # tokens still to force after the segment
    after_ids: list[int] | None = None  # the prompt's after-segment tokens
    answer_at: int | None = None  # generated index that scores the answer (forced protocol)
    rules: list = field(default_factory=list)  # attention rules (attention.py)
    recorder: Recorder = field(default_factory=Recorder)
    want_logits: bool = False  # a Record of "unembed.hook_logits"
    source: torch.Tensor | None = None  # [n, H] vectors of a non-hidden latent source
    image: torch.Tensor | None = None  # True at the prompt's image tokens, zeros after (`Decoder._image_mask`)

    @property
    def seq_pos(self) -> int:
        """Sequence index of the next slot (prompt + generated so far)."""
        return len(self.prompt) + len(self.gen)


class Decoder:
    """A batch of rows decoded together; `branch` copies the state for shared-work sweeps."""

    def __init__(self, reasoner, cfg: DecodeConfig):
        self.r, self.cfg, self.spec, self.ids = reasoner, cfg, reasoner.spec, reasoner.ids
        self.cfg_dict = asdict(cfg)  # once per decoder (a deep copy; a 256-row sweep made 256 of them)
        self.rows: list[_Row] = []
        self.encs: list[Prompt] = []
        self.pads: list[int] = []
        self.cache = self.h = self.logits = self.pos = self.mask = None
        self.latent_in: list[bool] = []  # per row: the last forward's input slot was a latent
        self.image_feats: list[torch.Tensor | None] = []
        self._opt: dict[tuple, list[torch.Tensor]] = {}  # per option list: its [B, n] log-probs, step by step
        self._opt_stacked: dict[tuple, torch.Tensor] = {}  # the same stacked [steps, B, n] (built for traces)
        self._feeds: list[tuple[int, _Row, FeedContext]] = []  # latents queued for the next slot (`_feed`)

    # -- setup --
    def prefill(self, encs: list[Prompt], row_ivs: list[list[Intervention]], overrides=(),
                segments: list[list[Segment]] | None = None) -> "Decoder":
        """Run the prompts (plus any teacher-forced generated ids, whose known `segments` the
        attention rules need) through the model once."""
        row_ivs = [as_interventions(x) for x in row_ivs]
        ids, mask = collate(encs, self.ids.eos[0] if self.ids.eos else 0)
        self.mask = mask.to(self.r.device)
        B, T = ids.shape
        self.pads = [T - e.input_ids.shape[1] for e in encs]
        self.encs = list(encs)
        for r, (e, ivs) in enumerate(zip(encs, row_ivs)):
            self.rows.append(self._new_row(e, ivs))
            if segments is not None:
                self.rows[-1].segments = list(segments[r])
        feats, self.image_feats = self.r.image_features(encs, row_ivs)
        self._set_sources(encs, row_ivs)
        latent = torch.zeros(ids.shape, dtype=torch.bool)
        for r, t, _ in overrides:
            latent[r, t] = True
        mask4d = self._prefill_mask(ids) if any(row.rules for row in self.rows) else None
        self.cache = new_cache(self.r.model.config, room=T + self.cfg.max_new_tokens)
        cursor = Cursor(start=[-p for p in self.pads], latent=latent)
        with self._hooks(cursor):
            out, self.pos = self.r.forward(ids, self.mask, _cat([e.image_grid_thw for e in encs]), feats, overrides,
                                           self.cache, attn4d=mask4d,
                                           text_from=[p + len(row.prompt) for p, row in zip(self.pads, self.rows)])
        self.full_hidden = out.last_hidden_state
        self._set_outputs(out)
        for r, row in enumerate(self.rows):
            P = len(row.prompt)
            if row.option_ids and row.gen:  # teacher-forced ids: their option log-probs from the prefill
                h = self.full_hidden[r, self.pads[r] + P - 1:-1]
                row.opt_lp = list(torch.log_softmax(self.r.model.lm_head(h).float(), -1)[:, row.option_ids])
        self.latent_in = [False] * B
        return self

    def _new_row(self, e: Prompt, ivs: list[Intervention]) -> _Row:
        all_ids = e.input_ids[0].tolist()
        P = e.prompt_len or len(all_ids)
        row = _Row(ivs, all_ids[:P], gen=all_ids[P:])
        row.option_ids = self.cfg.option_ids or e.option_ids
        row.after_ids = e.after_segment_ids
        row.rules = rules_for(self.spec, ivs)
        row.want_logits = _wants(ivs, "unembed.hook_logits")
        if self.cfg.do_sample:
            row.generator = torch.Generator().manual_seed(self.cfg.seed)
        return row

    def _set_sources(self, encs: list[Prompt], row_ivs) -> None:
        """Per row, the vectors a non-hidden latent source feeds (crop tokens or the constant)."""
        src = self.spec.latent_source
        for r, (e, row) in enumerate(zip(encs, self.rows)):
            if src == "constant":
                if self.r.constant is None:
                    raise ValueError(f"method {self.spec.method!r} feeds constant latents but the reasoner has none")
                row.source = self.r.constant
            elif src in ("evidence_crop", "evidence_tokens"):
                if getattr(e, "source_grid", None) is None:
                    raise ValueError(f"method {self.spec.method!r} feeds the evidence's image tokens: build the "
                                     "prompt from a query with its evidence (reasoner.prompt / item_inputs)")
                row.source = self.r.source_features(e)

    def _prefill_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, T] additive mask: padding, causality and each row's attention rules."""
        B, T = ids.shape
        full = torch.zeros(B, T, T, dtype=torch.bool)
        for r, row in enumerate(self.rows):
            p = self.pads[r]
            n = row.seq_pos
            full[r, p:, p:] = allowed(range(n), n, self._image_mask(row), row.segments, row.rules)
            full[r, :p, :p] = torch.eye(p, dtype=torch.bool)  # padding rows attend to themselves
        return additive(full, self.r.dtype)[:, None].to(self.r.device)

    def _step_mask(self) -> torch.Tensor | None:
        """[B, 1, 1, T] additive mask for the next step, or None when no row has a rule."""
        if not any(row.rules for row in self.rows):
            return None
        ok = self.mask.bool().cpu().clone()
        for r, row in enumerate(self.rows):
            if not row.rules or row.mode == "done":
                continue
            n, segs = row.seq_pos, row.segments + ([row.seg] if row.seg is not None else [])
            keys = allowed([n - 1], n, self._image_mask(row), segs, row.rules)[0]  # the position fed now
            ok[r, self.pads[r]:self.pads[r] + n] &= keys
        return additive(ok, self.r.dtype)[:, None, None].to(self.r.device)

    def _image_mask(self, row: _Row) -> torch.Tensor:
        """[>= seq_len] True at the prompt's image tokens (generated ids are always text); built
        once per row with room for the decode (a rule's mask is built at every step)."""
        if row.image is None or len(row.image) < row.seq_pos:
            m = torch.zeros(row.seq_pos + self.cfg.max_new_tokens, dtype=torch.bool)
            m[:len(row.prompt)] = torch.tensor(row.prompt) == self.ids.image
            row.image = m
        return row.image

    def _hooks(self, cursor: Cursor):
        return installed(self.r.model, [by_point(row.ivs, "hook") for row in self.rows],
                         [by_point(row.ivs, "record") for row in self.rows], [row.recorder for row in self.rows],
                         cursor)

    def _set_outputs(self, out) -> None:
        h = out.last_hidden_state[:, -1]
        self.h, self.logits = h, self.r.model.lm_head(h).float()

    # -- the loop --
    def run(self) -> list[Trace]:
        """Decode until every row stops; returns one trace per row."""
        cursor = Cursor(start=[0] * len(self.rows))
        with torch.inference_mode(), self._hooks(cursor):
            for _ in range(self.cfg.max_new_tokens):  # every step adds a token to each live row
                if self.done:
                    break
                self.advance(cursor)
        for row in self.rows:
            if row.mode != "done":
                self._stop(row, "max_new_tokens")
        return [self.trace(r) for r in range(len(self.rows))]

    @property
    def done(self) -> bool:
        return all(row.mode == "done" for row in self.rows)

    def advance(self, cursor: Cursor | None = None) -> None:
        """Choose every row's next input from the last forward, then run the next forward."""
        B = len(self.rows)
        bad = (~torch.isfinite(self.logits.sum(-1) + self.h.float().sum(-1))).tolist()
        greedy = _argmax_rows(self.logits)
        lsm = self._option_logprobs()
        filler = self.ids.eos[0] if self.ids.eos else 0
        next_ids, live = [filler] * B, []
        for r, row in enumerate(self.rows):
            if row.mode == "done":
                continue
            if bad[r]:
                row.nan = True
                self._stop(row, "nan")
                continue
            self._record_outputs(r, row, lsm)
            tok = self._decide(r, row, greedy[r])
            row.gen.append(tok)
            next_ids[r] = tok
            live.append(row)
        fed = self._feed_all()  # one batch for every row's latent, before a stop can close its segment
        for row in live:
            self._check_stop(row, row.gen[-1])
        if not self.done:
            self._forward(next_ids, fed, cursor)

    def _option_logprobs(self) -> dict | None:
        """Every row's option log-probs at this step, one gather per distinct option list (rows of
        one sweep share theirs), kept as one [B, n options] block per list and step (`_opt`);
        returns {tuple of option ids: index of this step's block}."""
        wanted = {tuple(row.option_ids) for row in self.rows if row.option_ids and row.mode != "done"}
        if not wanted:
            return None
        lsm = torch.log_softmax(self.logits, -1)
        at = {}
        for ids in wanted:
            blocks = self._opt.setdefault(ids, [])
            blocks.append(lsm[:, list(ids)])
            at[ids] = len(blocks) - 1
        return at

    def _record_outputs(self, r: int, row: _Row, at) -> None:
        if row.option_ids:  # a live row records at every step: its blocks are consecutive
            if row.opt_from is None:
                row.opt_from = at[tuple(row.option_ids)]
            row.opt_n += 1
        if row.want_logits:
            row.logits.append(self.logits[r].cpu())
        if self.latent_in[r]:
            row.z_out.append(self.h[r])

    def _forward(self, next_ids: list[int], fed: tuple[list[int], torch.Tensor] | None, cursor: Cursor | None) -> None:
        """Embed the chosen tokens, write the fed latents (rows, [n, H]) over theirs, run one step."""
        emb = self.r.model.get_input_embeddings()(torch.tensor(next_ids, device=self.r.device)[:, None])
        latent_in = [False] * len(self.rows)
        if fed is not None:
            rows, z = fed
            emb[torch.tensor(rows, device=emb.device), 0] = z.to(emb.dtype)
            for r in rows:
                latent_in[r] = True
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        if cursor is not None:
            cursor.start = [row.seq_pos - 1 for row in self.rows]
            cursor.latent = torch.tensor(latent_in)[:, None]
        mask = self._step_mask()
        if isinstance(self.cache, SharedPrefixCache):  # a branch over a shared prefix: 4-D mask, own attention
            mask = additive(self.mask.bool(), self.r.dtype)[:, None, None] if mask is None else mask
            with shared_attention(self.r.model.model.language_model):
                out = self.r.step(emb, self.pos, mask, self.cache, shared_prefix=self.cache)
        else:
            out = self.r.step(emb, self.pos, self.mask if mask is None else mask, self.cache)
        self.pos = self.pos + 1
        self.latent_in = latent_in
        self._set_outputs(out)

    # -- decisions --
    def _decide(self, r: int, row: _Row, greedy: int) -> int:
        """The token recorded at the next slot; a row that feeds a latent there queues it (`_feed`)."""
        if row.mode == "latent":
            tok = self._latent_step(r, row, greedy)
            if tok is not None:
                return tok
        elif row.mode == "span":
            tok = self._span_step(r, row, greedy)
            if tok is not None:
                return tok
        if row.suffix:
            return self._suffix_step(row)
        return self._text_step(r, row, greedy)

    def _suffix_step(self, row: _Row) -> int:
        """The next forced after-segment token; the answer is chosen right after the last one."""
        tok = row.suffix.pop(0)
        if not row.suffix:
            row.answer_at = len(row.gen) + 1
        return tok

    def _pick(self, r: int, row: _Row, greedy: int) -> int:
        return greedy if not self.cfg.do_sample else pick(self.logits[r], self.cfg, row.generator)

    def _text_step(self, r: int, row: _Row, greedy: int) -> int:
        spec, start = self.spec, self.ids.start
        allowed = spec.has_segments and (spec.max_segments is None or len(row.segments) < spec.max_segments)
        K = spec.k_target
        edits = [iv for iv in by_point(row.ivs, "segment") if iv.acts_on(len(row.segments))]
        for iv in edits:
            K = None if K is None else iv.segment_k(K)
        forced = allowed and K is not None and self.cfg.force_latent and not row.segments and not row.gen
        if forced:
            tok = start
        elif allowed and K is None:  # segment dropped: ban the start token
            if self.cfg.force_latent and not row.segments and not row.gen and self.cfg.force_suffix:
                self._after_segment(row, next_index=0)  # forced protocol: the suffix comes at once
                if row.suffix:
                    return self._suffix_step(row)
            logits = self.logits[r].clone()
            logits[start] = -float("inf")
            tok = pick(logits, self.cfg, row.generator)
        else:
            tok = self._pick(r, row, greedy)
        if not (allowed and K is not None and tok == start):
            if self.cfg.force_suffix and not spec.has_segments and not row.gen and row.answer_at is None:
                row.answer_at = 0  # no segment: the answer is the first token after the prompt
            return tok
        p_start = float(torch.softmax(self.logits[r], -1)[start])
        row.seg = Segment(start=row.seq_pos, forced=forced, triggered=(greedy == start) if forced else True,
                          p_start=p_start, kind="text" if spec.placement == "text" else "latent")
        row.k, row.K, row.exact = 0, K, bool(edits)
        row.z_in, row.z_out = [], []
        if spec.placement == "text":
            row.mode = "span"
            return start
        row.mode = "latent"
        if spec.placement == "overwrite_start" and K > 0:
            self._feed(r, row)  # the first latent sits on the start slot itself
        return start

    def _latent_step(self, r: int, row: _Row, greedy: int) -> int | None:
        """Inside a latent segment: end it (returns the end token, or None to sample) or feed."""
        spec, end = self.spec, self.ids.end
        if row.k >= row.K:
            how = "quota" if spec.end_rule == "after_k_sample" and not self.cfg.force_suffix else \
                "cap" if spec.end_rule == "model_or_cap" and not row.exact else "forced"
            self._close(row, how, end_pos=None if how == "quota" else row.seq_pos, own_end=greedy == end)
            return None if how == "quota" else end
        tok = self._pick(r, row, greedy)
        early_ok = not row.exact and spec.end_rule != "after_k_sample" and row.source is None and \
            (row.k > 0 or spec.end_rule == "model_or_cap")  # an outside source always gives its K vectors
        if tok == end and early_ok:
            self._close(row, "model", end_pos=row.seq_pos, own_end=True)
            return end
        self._feed(r, row)
        return self.ids.pad if self.ids.pad is not None else tok

    def _span_step(self, r: int, row: _Row, greedy: int) -> int | None:
        """Inside CapImagine's text imagination: record the span, close it on the end marker."""
        if row.k > 0:
            row.z_out.append(self.h[r])
        tok = self._pick(r, row, greedy)
        cap = self.spec.max_latents
        eos_forced = tok in self.ids.eos and self.cfg.force_suffix  # forced protocol: EOS ends the span, not the run
        if tok == self.ids.end or (cap and row.k >= cap) or eos_forced:
            own = tok == self.ids.end
            how = "model" if own else "eos_forced" if eos_forced else "cap"
            self._close(row, how, end_pos=row.seq_pos, own_end=own)
            return self.ids.end
        row.seg.slots.append(row.seq_pos)
        row.k += 1
        if tok in self.ids.eos:
            self._close(row, "eos", end_pos=None)
        return tok

    def _feed(self, r: int, row: _Row) -> None:
        """Queue row r's next latent for `_feed_all` (its slot and index are taken now)."""
        ctx = FeedContext(k=row.k, segment=len(row.segments), row=r, first=row.z_in[0] if row.z_in else None)
        self._feeds.append((r, row, ctx))
        row.seg.slots.append(row.seq_pos)
        row.k += 1

    def _feed_all(self) -> tuple[list[int], torch.Tensor] | None:
        """Every queued latent as one block: its source (hidden -> head, crop tokens, constant),
        then the rows' latent edits (`feed_rows`); returns (rows, [n, H]) or None."""
        if not self._feeds:
            return None
        rows = [r for r, _, _ in self._feeds]
        z = self.h[torch.tensor(rows, device=self.h.device)]
        if self.r.head is not None:
            on = [i for i, (_, row, c) in enumerate(self._feeds)
                  if row.source is None and (c.k > 0 or self.spec.head_on_first)]
            if on:
                z[on] = self.r.head(z[on])
        for i, (_, row, c) in enumerate(self._feeds):
            if row.source is not None:
                z[i] = row.source[c.k % len(row.source)].to(z.dtype)
        z = feed_rows([by_point(row.ivs, "latent") for _, row, _ in self._feeds], z, [c for _, _, c in self._feeds])
        for i, (_, row, _) in enumerate(self._feeds):
            row.z_in.append(z[i])
        self._feeds = []
        return rows, z

    def _option_rows(self, r: int, row: _Row) -> list[torch.Tensor]:
        """Row r's option log-probs, one [n options] tensor per step it recorded."""
        if not row.opt_n:
            return list(row.opt_lp)
        blocks = self._opt[tuple(row.option_ids)]
        return list(row.opt_lp) + [b[r] for b in blocks[row.opt_from:row.opt_from + row.opt_n]]

    def _close(self, row: _Row, how: str, end_pos: int | None, own_end: bool | None = None) -> None:
        seg = row.seg
        seg.end, seg.ended, seg.own_end = end_pos, how, own_end
        seg.z_in = torch.stack(row.z_in).cpu() if row.z_in else None
        seg.z_out = torch.stack(row.z_out).cpu() if row.z_out else None
        row.segments.append(seg)
        row.seg, row.mode = None, "text"
        if how not in ("eos", "nan", "max_new_tokens"):
            self._after_segment(row, next_index=len(row.gen) + 1)  # after the end marker about to be written

    def _after_segment(self, row: _Row, next_index: int) -> None:
        """Forced protocol: queue the prompt's after-segment tokens once the first segment closes
        (or at once when the segment is dropped); without any, the answer is chosen at generated
        index `next_index`."""
        if not self.cfg.force_suffix or len(row.segments) > 1 or row.answer_at is not None:
            return
        if row.after_ids:
            row.suffix = list(row.after_ids)
        else:
            row.answer_at = next_index

    def _stop(self, row: _Row, why: str) -> None:
        if row.seg is not None:
            self._close(row, why, end_pos=None)
        row.mode, row.stop = "done", why

    def _check_stop(self, row: _Row, tok: int) -> None:
        if row.mode == "text" and not row.suffix and tok in self.ids.eos:
            self._stop(row, "eos")
        elif len(row.gen) >= self.cfg.max_new_tokens:
            self._stop(row, "max_new_tokens")
        elif self.cfg.stop_after_answer and row.mode == "text" and self._answered(row):
            self._stop(row, "answer")

    def _answered(self, row: _Row) -> bool:
        """The answer token has just been chosen (forced protocol: at its step; free: an option token)."""
        if row.answer_at is not None:
            return len(row.gen) > row.answer_at
        return bool(row.option_ids) and row.gen[-1] in row.option_ids and (
            not self.spec.has_segments or bool(row.segments))

    # -- sweeps --
    def at_branch_point(self, r: int = 0) -> bool:
        """True when row r's next decision would open a segment (nothing has differed yet)."""
        row, spec = self.rows[r], self.spec
        if row.mode != "text" or not spec.has_segments or row.suffix:
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

    def branch(self, row_ivs: list[list[Intervention]], src: list[int] | None = None) -> "Decoder":
        """A new decoder whose rows continue the state of rows `src` (default: row 0 for all),
        each with its own interventions."""
        src = [0] * len(row_ivs) if src is None else list(src)
        if len(src) != len(row_ivs):
            raise ValueError(f"branch: {len(row_ivs)} intervention lists for {len(src)} source rows")
        if isinstance(self.cache, SharedPrefixCache):
            raise ValueError("branch: this decoder is itself a branch; branch its source decoder instead")
        idx = torch.tensor(src, dtype=torch.long)
        new = copy.copy(self)
        if any(records_pattern(by_point(ivs, "record")) for ivs in row_ivs):  # eager attention: copy the prefix
            new.cache = copy.deepcopy(self.cache)
            new.cache.batch_select_indices(idx.to(self.r.device))
        else:  # the prefix stays once per source row (kvcache.SharedPrefixCache)
            new.cache = SharedPrefixCache(self.cache, src, room=self.cfg.max_new_tokens)
        dev = idx.to(self.h.device)
        new.h, new.logits = self.h[dev], self.logits[dev]
        new.pos, new.latent_in = self.pos[dev], [self.latent_in[i] for i in src]
        new.mask = self.mask[dev]
        new.pads = [self.pads[i] for i in src]
        new.image_feats = [self.image_feats[i] for i in src]
        new.rows, new.encs = [], [self.encs[i] for i in src]
        new._opt, new._opt_stacked, new._feeds = {}, {}, []  # its own (copy.copy shares the source's)
        for i, ivs in zip(src, row_ivs):
            old = self.rows[i]
            row = copy.copy(old)
            row.ivs = as_interventions(ivs)
            row.rules = rules_for(self.spec, row.ivs)
            row.want_logits = _wants(row.ivs, "unembed.hook_logits")
            row.gen, row.segments, row.opt_lp, row.logits = list(old.gen), list(old.segments), \
                self._option_rows(i, old), list(old.logits)
            row.opt_from, row.opt_n = None, 0
            row.suffix = list(old.suffix)
            row.recorder = copy.deepcopy(old.recorder) if old.recorder.found else Recorder()
            if old.generator is not None:
                row.generator = torch.Generator()
                row.generator.set_state(old.generator.get_state())
            new.rows.append(row)
        return new

    # -- results --
    def trace(self, r: int) -> Trace:
        row = self.rows[r]
        opt = self._option_matrix(r, row)
        records, where = row.recorder.tensors()
        records, where = self._engine_records(r, row, records, where)
        applied, skipped = _applied(row)
        return Trace.build(self.r, row.prompt, row.gen, row.segments, answer_at=row.answer_at,
                           config=self._config_dict(), interventions=applied, skipped=skipped,
                           step_option_logprobs=opt, nan=row.nan, stop=row.stop or "max_new_tokens",
                           option_ids=row.option_ids, records=records, record_positions=where, inputs=self.encs[r])

    def _option_matrix(self, r: int, row: _Row) -> torch.Tensor | None:
        """[steps, n options]: row r's option log-probs (one slice of the stacked step blocks)."""
        if not row.opt_n:
            return torch.stack(row.opt_lp).cpu() if row.opt_lp else None
        ids = tuple(row.option_ids)
        stacked = self._opt_stacked.get(ids)
        if stacked is None or len(stacked) != len(self._opt[ids]):
            stacked = self._opt_stacked[ids] = torch.stack(self._opt[ids])
        own = stacked[row.opt_from:row.opt_from + row.opt_n, r]
        return (torch.cat([torch.stack(row.opt_lp), own]) if row.opt_lp else own.clone()).cpu()

    def _config_dict(self) -> dict:
        """The config as a trace stores it: its own dict and option list."""
        d = dict(self.cfg_dict)
        if d["option_ids"] is not None:
            d["option_ids"] = list(d["option_ids"])
        return d

    def _engine_records(self, r: int, row: _Row, records: dict, where: dict):
        """Fill the engine's own hook points (latent.hook_in/out, vision.hook_out) that were asked for."""
        names = {h for rec in by_point(row.ivs, "record") for h in rec.hooks}
        segs = [s for s in row.segments if s.kind == "latent"]
        for name, attr in (("latent.hook_in", "z_in"), ("latent.hook_out", "z_out")):
            if name in names:
                zs = [getattr(s, attr) for s in segs if getattr(s, attr) is not None]
                records[name] = torch.cat(zs).float() if zs else torch.zeros(0)
                where[name] = [p for s in segs for p in s.slots][:len(records[name])]
        if "unembed.hook_logits" in names:
            records["unembed.hook_logits"] = torch.stack(row.logits) if row.logits else torch.zeros(0)
            where["unembed.hook_logits"] = [len(row.prompt) + i for i in range(len(row.logits))]
        if "vision.hook_out" in names and self.image_feats[r] is not None:
            records["vision.hook_out"] = self.image_feats[r].float().cpu().clone()  # never the memo's own tensor
            where["vision.hook_out"] = [i for i, t in enumerate(row.prompt) if t == self.ids.image]
        return records, where


def _applied(row: _Row) -> tuple[list[dict], list[dict]]:
    """The row's interventions split into those that acted and those whose point the run never
    reached (a latent edit in a run that opened no latent segment), with the reason."""
    latent = any(s.kind == "latent" and s.slots for s in row.segments)
    opened = bool(row.segments)
    applied, skipped = [], []
    for iv in row.ivs:
        why = None
        if iv.point == "latent" and not latent:
            why = "no latent segment was opened"
        elif iv.point == "segment" and iv.segment_k(1) is not None and not opened:
            why = "no segment was opened"
        (applied if why is None else skipped).append(iv.to_dict() if why is None else {**iv.to_dict(), "why": why})
    return applied, skipped


def _argmax_rows(logits: torch.Tensor) -> list[int]:
    """Every row's argmax (the first maximum, as torch's): numpy's on CPU, where torch's argmax
    over a [256, vocab] block cost as much as a layer's matmuls (measured 390 vs 24 us)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return logits.numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


def _wants(ivs, name: str) -> bool:
    return any(name in rec.hooks for rec in by_point(ivs, "record"))


def _cat(xs):
    xs = [x for x in xs if x is not None]
    return torch.cat(xs) if xs else None


def generate(reasoner, inputs: Prompt | list[Prompt], interventions=(), config: DecodeConfig | None = None,
             **kw) -> Trace | list[Trace]:
    """Decode one prompt (-> Trace) or a batch (-> list); `interventions` shared by every row, or
    one list per row. Input edits rebuild each row's prompt from its query first."""
    cfg = config_of(config, kw)
    single = isinstance(inputs, Prompt)
    encs = [inputs] if single else list(inputs)
    if not encs:
        return []
    ivs = list(interventions) if not isinstance(interventions, (Intervention, dict)) else [interventions]
    per_row = bool(ivs) and all(isinstance(x, (list, tuple)) for x in ivs)
    row_ivs = [as_interventions(x) for x in ivs] if per_row else [as_interventions(ivs)] * len(encs)
    if len(row_ivs) != len(encs):
        raise ValueError(f"{len(row_ivs)} intervention lists for {len(encs)} prompts")
    for v in row_ivs:
        check_supported(v, "generate")
    encs = [reasoner.with_input_edits(e, v) for e, v in zip(encs, row_ivs)]
    with torch.inference_mode():
        traces = Decoder(reasoner, cfg).prefill(encs, row_ivs).run()
    return traces[0] if single else traces
