"""`Trace`: the record of one run.

A trace holds the prompt and generated ids, the cleaned text (each latent segment replaced by
`<latent>`), each segment (start/end positions, slot positions, the fed vectors Z_in [K, H] and
the produced ones Z_out [K, H], triggered or forced, how it ended), the option tokens' log-probs
at every step, the answer, what was recorded at named hooks, and a NaN flag.

One scoring rule everywhere: the answer (`answer_index`) is the option with the highest
log-prob among the options at the answer position (`answer_logprobs`, normalised over the
options); `answer_logprobs_vocab` are the same tokens' log-probs over the whole vocabulary. The
answer parsed from the text is a separate field (`parsed_index`, `unparsed`).

A trace saves as JSON with its tensors in a safetensors sidecar whose hash the JSON records, so
a missing or foreign sidecar is an error. Re-running a trace: `latentmed.engine.replay`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..files import (
    DamagedFileError,
    atomic_save_tensors,
    atomic_write_text,
    load_tensors,
    tensors_hash,
)
from .answers import LETTERS, margins, parse_answer, score_options
from .memo import decoded

SEG_TENSORS = ("z_in", "z_out")
TRACE_TENSORS = ("step_option_logprobs",)


@dataclass
class Segment:
    """One latent (or text-imagination) segment; positions index the full sequence."""

    start: int  # start marker
    end: int | None = None  # end marker (None: no marker, e.g. LVR quota or a cut run)
    slots: list[int] = field(default_factory=list)  # latent slots / imagination tokens
    z_in: torch.Tensor | None = None  # [K, H] fed at the slots
    z_out: torch.Tensor | None = None  # [K, H] final post-norm hidden at the slots
    forced: bool = False  # opened by force_latent
    triggered: bool = True  # the model's own top choice was the start token
    p_start: float | None = None  # its probability at that step
    ended: str = ""  # forced | model | cap | quota | eos | max_new_tokens | nan | continued ("" = open)
    own_end: bool | None = None  # the model's own top token was the end marker where the segment ended
    kind: str = "latent"  # latent | text

    @property
    def last(self) -> int:
        """Last position that belongs to the segment."""
        return self.end if self.end is not None else max(self.slots, default=self.start)

    @property
    def k(self) -> int:
        return len(self.slots)


@dataclass
class Trace:
    method: str
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str
    clean_text: str
    answer: str | None  # letter of the scored answer
    answer_index: int | None  # argmax over the options' log-probs at the answer step
    parsed_index: int | None  # the answer parsed from the text (None: unparsed)
    unparsed: bool
    segments: list[Segment]
    options: list[str] | None = None
    option_ids: list[int] | None = None
    answer_step: int | None = None  # generated index whose logits score the answer
    answer_logprobs: list[float] | None = None  # over the options
    answer_logprobs_vocab: list[float] | None = None  # over the vocabulary
    step_option_logprobs: torch.Tensor | None = None  # [n_generated, n_options], over the vocabulary
    nan: bool = False
    stop: str = ""
    config: dict = field(default_factory=dict)
    interventions: list[dict] = field(default_factory=list)  # those applied
    skipped: list[dict] = field(default_factory=list)  # given but never reached (with "why")
    records: dict[str, torch.Tensor] = field(default_factory=dict)  # hook name -> [n_positions, ...]
    record_positions: dict[str, list[int]] = field(default_factory=dict)
    inputs: Any = field(default=None, repr=False)  # the Prompt it ran on (not serialised)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.generated_ids

    @property
    def triggered(self) -> bool:
        """Was the start token the model's own top choice where the first segment opened?"""
        return bool(self.segments) and self.segments[0].triggered

    @property
    def k(self) -> int:
        """Latents (or imagination tokens) in the first segment; 0 without one."""
        return self.segments[0].k if self.segments else 0

    @property
    def margin(self) -> float | None:
        """Log-prob (over the options) of the scored answer minus the best other option's."""
        if self.answer_logprobs is None:
            return None
        return float(margins(torch.tensor(self.answer_logprobs))[self.answer_index])

    @classmethod
    def build(cls, reasoner, prompt: list[int], gen: list[int], segments: list[Segment],
              answer_at: int | None = None, **kw) -> "Trace":
        """Assemble a trace: decode and clean the text, parse it, score the answer at its step
        (`answer_at` when the run forced it, else the first option token after the segments)."""
        tok, spec, enc = reasoner.tokenizer, reasoner.spec, kw.pop("inputs", None)
        for s in segments:
            if s.kind == "text" and s.slots:
                s.z_in = reasoner.embed(torch.tensor(prompt + gen)[s.slots]).detach().cpu()
        clean = clean_text(tok, len(prompt), gen, segments)
        options = getattr(enc, "options", None)
        opt_ids = kw.pop("option_ids", None)
        parsed = parse_answer(clean, spec.answer_format, options)
        t = cls(spec.method, list(prompt), list(gen), decoded(tok, gen, False), clean,
                None, None, parsed.index, parsed.unparsed, segments, options, opt_ids, inputs=enc, **kw)
        if opt_ids and t.step_option_logprobs is not None and len(t.step_option_logprobs):
            t.answer_step = answer_at if answer_at is not None else answer_step(gen, segments, len(prompt), opt_ids)
            if t.answer_step is not None and t.answer_step < len(t.step_option_logprobs):
                vocab = t.step_option_logprobs[t.answer_step]
                t.answer_logprobs_vocab = vocab.tolist()
                t.answer_logprobs = (vocab - vocab.logsumexp(0)).tolist()
                t.answer_index = score_options(vocab)
                t.answer = LETTERS[t.answer_index]
            else:
                t.answer_step = None
        return t

    # ---- serialisation ----
    def _tensors(self) -> dict[str, torch.Tensor]:
        flat = {k: getattr(self, k) for k in TRACE_TENSORS if getattr(self, k) is not None}
        flat.update({f"records.{k}": v for k, v in self.records.items()})
        for i, s in enumerate(self.segments):
            flat.update({f"segments.{i}.{k}": v for k in SEG_TENSORS if (v := getattr(s, k)) is not None})
        return {k: v.detach().float().contiguous().cpu() for k, v in flat.items()}

    def to_dict(self, tensors: str = "list") -> dict:
        """Plain dict; tensors as nested lists ("list") or left out for a sidecar ("omit")."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("inputs", "segments")}
        out["segments"] = [{f.name: getattr(s, f.name) for f in fields(s)} for s in self.segments]
        out["records"] = {k: (v.float().tolist() if tensors == "list" else None) for k, v in self.records.items()}
        for d in [out] + out["segments"]:
            for k, v in d.items():
                if isinstance(v, torch.Tensor):
                    d[k] = v.float().tolist() if tensors == "list" else None
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Trace":
        d = dict(d)
        d.pop("sidecar", None)
        segs = [Segment(**{k: _tensor(v) if k in SEG_TENSORS else v for k, v in s.items()})
                for s in d.pop("segments")]
        records = {k: _tensor(v) for k, v in (d.pop("records", None) or {}).items()}
        return cls(segments=segs, records=records,
                   **{k: _tensor(v) if k in TRACE_TENSORS else v for k, v in d.items()})

    def save(self, path: str | Path) -> Path:
        """JSON at `path`, tensors in `<path>.safetensors` next to it; the JSON names the sidecar's
        hash, so `load` refuses a sidecar that belongs to another trace."""
        path = Path(path)
        flat = self._tensors()
        side = Path(f"{path}.safetensors")
        atomic_save_tensors(flat, side)
        d = self.to_dict(tensors="omit")
        d["sidecar"] = {"file": side.name, "hash": tensors_hash(flat), "n": len(flat)}
        atomic_write_text(path, json.dumps(d))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            side_info = d.get("sidecar") if isinstance(d, dict) else None
            t = cls.from_dict(d)
        except (OSError, json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{path}: not a saved trace ({exc})") from exc
        if side_info is None:
            raise ValueError(f"{path}: no sidecar record (saved by an older version?); re-run it")
        side = path.with_name(side_info["file"])
        flat = load_tensors(side, "trace tensors") if side_info["n"] else {}
        if tensors_hash(flat) != side_info["hash"]:
            raise DamagedFileError(f"{side}: its tensors do not belong to {path} (hash {tensors_hash(flat)}, "
                                   f"the trace records {side_info['hash']})")
        for k, v in flat.items():
            parts = k.split(".")
            if parts[0] == "records":
                t.records[k[len("records."):]] = v
            elif len(parts) == 1:
                setattr(t, k, v)
            else:
                setattr(t.segments[int(parts[1])], parts[-1], v)
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
        pieces += [decoded(tokenizer, gen[cursor:a], True), "<latent>"]
        cursor = b
    pieces.append(decoded(tokenizer, gen[cursor:], True))
    return "".join(pieces).strip()


def answer_step(gen: list[int], segments: list[Segment], prompt_len: int, option_ids: list[int]) -> int | None:
    """First generated index after the last segment holding an option token (else right after)."""
    after = segments[-1].last - prompt_len + 1 if segments else 0
    ids = set(option_ids)
    for i in range(after, len(gen)):
        if gen[i] in ids:
            return i
    return after if after < len(gen) else None
