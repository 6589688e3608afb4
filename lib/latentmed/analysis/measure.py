"""Measurements through the engine, one row per (model, item, condition), kept in the results store.

A *condition* is a named list of interventions per item, run in one of two forms:

* "generate": decoded with the edit (the shared-work sweep; an edit of latent k propagates to
  the later latents): what the model does when its latents are different;
* "replay": teacher-forced on the clean run (`replay`): later latents and tokens stay as
  recorded, so only the edited vectors themselves change.

Every row holds the item, its family, the condition, the form, the interventions as dicts, and
the outcome: the chosen option (argmax over the options' log-probs at the answer position),
whether it is right, the options' log-probs, the margin of the right option (its log-prob minus
the best other's), K, whether the model itself opened the segment, whether its text parses, and
non-finite values. The clean run's latents go to the store's tensor sidecar. A killed run
resumes where it stopped (`store.Run.missing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tqdm import tqdm

from ..engine.decode import DecodeConfig
from ..engine.interventions import Intervention, as_interventions
from ..engine.replay import replay_many
from ..engine.sweep import sweep_many
from ..store import Run

FORMS = ("generate", "replay")


@dataclass(frozen=True)
class Condition:
    """A named intervention per item (`make(i)` for item index i), run in `form`."""

    name: str
    make: Callable[[int], list[Intervention]]
    form: str = "generate"

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"Condition {self.name!r}: form must be one of {FORMS}, got {self.form!r}")

    @property
    def key(self) -> str:
        """The condition's name in the store ("clean" has no form)."""
        return self.name if self.name == "clean" else f"{self.name}/{self.form}"


def outcome(answer: int | None, res) -> dict:
    """Outcome fields of a trace or a replay result against the right option `answer`."""
    lp = res.answer_logprobs
    chosen = res.answer_index
    margin = None
    if lp is not None and answer is not None:
        others = [v for j, v in enumerate(lp) if j != answer]
        margin = float(lp[answer] - max(others))
    segs = getattr(res, "segments", None) or []
    seg = segs[0] if segs else None
    return dict(chosen=chosen, correct=None if answer is None else bool(chosen == answer), logprobs=lp,
                margin=margin, k=0 if seg is None else len(seg.slots),
                triggered=None if seg is None or not hasattr(seg, "triggered") else bool(seg.triggered),
                unparsed=bool(getattr(res, "unparsed", False)), nonfinite=bool(getattr(res, "nan", False)))


def clean_runs(reasoner, prompts, config: DecodeConfig, batch_size: int = 16, record=()) -> list:
    """The clean trace of every prompt (one batched pass), with `record` interventions if any."""
    record = as_interventions(record)
    return [ts[0] for ts in sweep_many(reasoner, prompts, [[record] for _ in prompts], config, batch_size)]


def latents(trace) -> dict:
    """What the store keeps of a run by default: the first segment's fed and produced vectors."""
    seg = trace.segments[0] if trace.segments else None
    if seg is None or seg.z_in is None:
        return {}
    return {"z_in": seg.z_in, **({"z_out": seg.z_out} if seg.z_out is not None else {})}


def measure(reasoner, queries: list, conditions: list[Condition], run: Run, config: DecodeConfig,
            batch_size: int = 16, progress: bool = False, clean=None, record=(), keep=None,
            prompts: list | None = None) -> list:
    """Run every missing (query, condition) of `run`, `batch_size` items at a time, writing each
    chunk's rows as soon as it is done (a killed run resumes there). `record` interventions are
    added to the clean run and every generate-form condition (and left out of the rows); `keep`
    says which tensors of those runs the store keeps (default: the clean run's latents);
    `prompts` are the queries' prompts when the caller has built them (`reasoner.prompt`).
    Returns the clean traces (donors and replays come from them)."""
    record = as_interventions(record)
    prompts = prompts if prompts is not None else [reasoner.prompt(q) for q in queries]
    if len(prompts) != len(queries):
        raise ValueError(f"measure: {len(prompts)} prompts for {len(queries)} queries")
    answers = [p.query.answer for p in prompts]
    ids = [q.id for q in queries]
    clean = clean if clean is not None else clean_runs(reasoner, prompts, config, batch_size, record)
    base = [dict(item=i, family=p.query.family) for i, p in zip(ids, prompts)]
    if run.missing([(i, "clean") for i in ids]):
        rows, tensors = [], {}
        for n, (b, t, a) in enumerate(zip(base, clean, answers)):
            rows.append({**b, "condition": "clean", "form": "generate", "interventions": [], **outcome(a, t)})
            kept = (keep or latents)(t)
            if kept:
                tensors[n] = kept
        run.add(rows, tensors)
    todo = [c for c in conditions if c.name != "clean" and run.missing([(i, c.key) for i in ids])]
    bar = tqdm(total=len(ids), desc=f"{reasoner.spec.method}: conditions", disable=not progress or not todo,
               leave=False)
    for s in range(0, len(ids), batch_size):
        chunk = range(s, min(s + batch_size, len(ids)))
        _measure_chunk(reasoner, chunk, todo, run, config, batch_size, prompts, answers, base, clean, record, keep)
        bar.update(len(chunk))
    bar.close()
    return clean


def _measure_chunk(reasoner, chunk, todo, run, config, batch_size, prompts, answers, base, clean, record, keep):
    """The missing conditions of a few items: generate-form ones as one shared-work sweep, then
    the replays; rows (and kept tensors) written per condition."""
    have = {c.key: {k[0] for k in run.missing([(base[n]["item"], c.key) for n in chunk])} for c in todo}
    gen = [c for c in todo if c.form == "generate" and have[c.key]]
    if gen:
        made = {n: [c.make(n) for c in gen] for n in chunk}
        out = sweep_many(reasoner, [prompts[n] for n in chunk], [[v + record for v in made[n]] for n in chunk],
                         config, batch_size)
        for j, c in enumerate(gen):
            rows, tensors = [], {}
            for n, traces in zip(chunk, out):
                if base[n]["item"] not in have[c.key]:
                    continue
                t = traces[j]
                rows.append({**base[n], "condition": c.key, "form": c.form,
                             "interventions": [iv.to_dict() for iv in made[n][j]], **outcome(answers[n], t)})
                if keep is not None and keep(t):
                    tensors[len(rows) - 1] = keep(t)
            run.add(rows, tensors)
    for c in (c for c in todo if c.form == "replay" and have[c.key]):
        ns = [n for n in chunk if base[n]["item"] in have[c.key]]
        edits = [c.make(n) for n in ns]
        res = replay_many(reasoner, [clean[n] for n in ns], edits)
        run.add([{**base[n], "condition": c.key, "form": c.form, "interventions": [iv.to_dict() for iv in e],
                  **outcome(answers[n], r)} for n, e, r in zip(ns, edits, res)])
