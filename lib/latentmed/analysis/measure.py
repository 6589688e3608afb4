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


def fixed(name: str, ivs, form: str = "generate") -> Condition:
    """A condition that applies the same interventions to every item."""
    ivs = as_interventions(ivs)
    return Condition(name, lambda i: ivs, form)


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


def clean_runs(reasoner, prompts, config: DecodeConfig, batch_size: int = 16) -> list:
    """The clean trace of every prompt (one batched pass)."""
    return [ts[0] for ts in sweep_many(reasoner, prompts, [[[]] for _ in prompts], config, batch_size)]


def measure(reasoner, queries: list, conditions: list[Condition], run: Run, config: DecodeConfig,
            batch_size: int = 16, keep_latents: bool = True, progress: bool = False, clean=None) -> list:
    """Run every missing (query, condition) of `run`; returns the clean traces (for donors)."""
    prompts = [reasoner.prompt(q) for q in queries]
    answers = [p.query.answer for p in prompts]
    ids = [q.id for q in queries]
    clean = clean if clean is not None else clean_runs(reasoner, prompts, config, batch_size)
    base = [dict(item=i, family=p.query.family) for i, p in zip(ids, prompts)]
    if run.missing([(i, "clean") for i in ids]):
        rows, tensors = [], {}
        for n, (b, t, a) in enumerate(zip(base, clean, answers)):
            rows.append({**b, "condition": "clean", "form": "generate", "interventions": [], **outcome(a, t)})
            if keep_latents and t.segments and t.segments[0].z_in is not None:
                tensors[n] = {"z_in": t.segments[0].z_in, "z_out": t.segments[0].z_out}
        run.add(rows, tensors)
    todo = [c for c in conditions if c.name != "clean" and run.missing([(i, c.key) for i in ids])]
    bar = tqdm(total=len(todo), desc=f"{reasoner.spec.method}: conditions", disable=not progress, leave=False)
    gen = [c for c in todo if c.form == "generate"]
    if gen:
        per = [[c.make(n) for c in gen] for n in range(len(prompts))]
        out = sweep_many(reasoner, prompts, per, config, batch_size)
        for j, c in enumerate(gen):
            run.add([{**b, "condition": c.key, "form": c.form, "interventions": [iv.to_dict() for iv in per[n][j]],
                      **outcome(answers[n], out[n][j])} for n, b in enumerate(base)])
            bar.update()
    for c in (c for c in todo if c.form == "replay"):
        edits = [c.make(n) for n in range(len(prompts))]
        res = replay_many(reasoner, clean, edits)
        run.add([{**b, "condition": c.key, "form": c.form, "interventions": [iv.to_dict() for iv in e],
                  **outcome(answers[n], r)}
                 for n, (b, e, r) in enumerate(zip(base, edits, res))])
        bar.update()
    bar.close()
    return clean


