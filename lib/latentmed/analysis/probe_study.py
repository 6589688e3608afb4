"""Chapter 5's runs on the zoo, written to (and read back from) the results store.

Per model, three runs of the store (parameters with chapter=5, keyed by the checkpoint's hash):

    states   one row per item: the clean run's outcome, and in the tensor sidecar the vectors fed at
             the latent slots (`z`: z_in; CapImagine: its imagination-span states z_out), the merged
             image tokens at the evidence cells (`vision.hook_out`, in evidence order) and the final
             norm's output at the prompt's last position (`ln_final.hook_normalized`)
    derived  one row per (derived question, condition) of the paper's probe (`derived`)
    probes   one row per (item, representation|task): out-of-fold predictions of the probe, its
             control task and the majority baseline (`probes`)

Re-running reuses every stored row; a killed run resumes. All the zoo's towers are the shared
base's frozen one, so the merged image tokens of an image are computed once for every model
(the engine's content-keyed memo, `engine.memo`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..engine import interventions as I
from ..engine.reasoner import LatentReasoner, evidence_tokens
from ..engine.replay import replay_many
from ..store import ResultsStore, Run
from ..testbed.items import Item
from ..zoo.evaluate import decode_config
from . import derived as D
from . import probes as P
from .conditions import donors
from .measure import outcome
from .study import model_hash

VERSION = 2  # bump when what a stored row means changes (rows of another version are not reused)
RECORD = ("vision.hook_out", "ln_final.hook_normalized")


def _batched(r, prompts, ivs, cfg, batch_size: int = 16) -> list:
    out = []
    for s in range(0, len(prompts), batch_size):
        out += r.generate(prompts[s:s + batch_size], ivs[s:s + batch_size], config=cfg)
    return out


def clean_traces(r: LatentReasoner, items: list[Item], batch_size: int = 16) -> list:
    """The clean run of every item, recording the image tokens and the prompt's last state."""
    prompts = [r.prompt(it) for it in items]
    ivs = [[I.Record(hooks=list(RECORD), positions=[p.input_ids.shape[1] - 1])] for p in prompts]
    return _batched(r, prompts, ivs, decode_config(r), batch_size)


def state_tensors(r: LatentReasoner, trace) -> dict[str, torch.Tensor]:
    """The tensors one states row keeps (see the module docstring)."""
    q, H = trace.inputs.query, r.hidden_size
    seg = trace.segments[0] if trace.segments else None
    z = None if seg is None else (seg.z_out if seg.kind == "text" else seg.z_in)
    px = getattr(r.processor, "merge_size", 2) * getattr(r.processor, "patch_size", 14)
    cells = evidence_tokens(q.evidence_boxes or [], q.images[0].size, trace.inputs.image_grid_thw[0], px)
    tokens = trace.records["vision.hook_out"]
    return {"z": (z if z is not None else torch.zeros(0, H)).float(),
            "image": tokens[cells].float() if cells else torch.zeros(0, H),
            "prompt": trace.records["ln_final.hook_normalized"].reshape(1, -1).float()}


def _params(part: str, items: list[Item], seed: int, **kw) -> dict:
    return dict(chapter=5, part=part, items=[it.id for it in items], seed=seed, version=VERSION, **kw)


def store_states(r, items, traces, run: Run, batch: int = 32) -> None:
    for s in range(0, len(items), batch):
        part = list(zip(items[s:s + batch], traces[s:s + batch]))
        rows = [dict(item=it.id, family=it.family, condition="clean", segment=t.segments[0].kind if t.segments else None,
                     **outcome(t.inputs.query.answer, t)) for it, t in part]
        run.add(rows, {n: state_tensors(r, t) for n, (_, t) in enumerate(part)})


def _swap(z, k_trace: int) -> list:
    """Latent edits that feed `z` at the slots of a trace with `k_trace` slots (fewer slots when z is
    shorter: a replay cannot add any, and a slot left as recorded would carry the image)."""
    n = 0 if z is None else len(z)
    if n == 0:
        return [I.ChangeK(k=0)]
    return ([I.ChangeK(k=n)] if n < k_trace else []) + [I.SwapLatent(source=z.tolist())]


def derived_rows(r: LatentReasoner, items: list[Item], clean: list, seed: int = 0,
                 batch_size: int = 16) -> list[dict]:
    """Every derived question of every item under every condition (`derived.CONDITIONS`)."""
    qs = [d for it in items for d in D.derived_questions(it, seed)]
    by_item = {it.id: t for it, t in zip(items, clean)}
    z = {it.id: (t.segments[0].z_in if t.segments else None) for it, t in zip(items, clean)}
    don = donors([it.family for it in items], seed)
    donor = {it.id: items[d].id for it, d in zip(items, don)}
    related = [d for d in qs if d.kind == "related"]
    prompts = [r.prompt(d.query) for d in related]
    traces = dict(zip([d.query.id for d in related], _batched(r, prompts, [[] for _ in prompts], decode_config(r),
                                                              batch_size)))
    trace = [by_item[d.item] if d.kind == "same" else traces[d.query.id] for d in qs]
    blank = [r.prompt(d.query, [I.BlankImage()]) for d in qs]
    edits = {
        "latents": [[] if d.kind == "same" else _swap(z[d.item], t.k) for d, t in zip(qs, trace)],
        "zero": [[I.ZeroLatent()] for _ in qs],
        "other": [_swap(z[donor[d.item]], t.k) for d, t in zip(qs, trace)],
    }
    rows, fam = [], {it.id: it.family for it in items}
    base = [dict(item=d.query.id, source_item=d.item, kind=d.kind, family=d.query.family, source_family=fam[d.item],
                 answer_word=d.query.options[d.query.answer]) for d in qs]
    rows += [dict(b, condition="image", **outcome(d.query.answer, t)) for b, d, t in zip(base, qs, trace)]
    for cond, e in edits.items():
        res = replay_many(r, trace, e, blank)
        rows += [dict(b, condition=cond, interventions=[iv.to_dict() for iv in x], **outcome(d.query.answer, y))
                 for b, d, x, y in zip(base, qs, e, res)]
    return rows


def load_states(run: Run, items: list[Item]) -> dict:
    """item id -> the arrays and labels `probes.representations` reads."""
    by_id = {it.id: it for it in items}
    out = {}
    for row in run.rows():
        it = by_id.get(row["item"])
        if it is None or row["condition"] != "clean":
            continue
        t = run.tensors(row)
        out[it.id] = dict(z=t["z"].numpy(), image=t["image"].numpy(), prompt=t["prompt"].numpy()[0],
                          label={task.name: task.label(it) for task in P.TASKS}, type=P.object_type(it),
                          family=it.family)
    return out


def run_probe_study(root: str | Path, store_dir: str | Path, items: list[Item], models: list[str],
                    derived_models: list[str], seed: int = 0, device: str = "cpu", n_splits: int = P.N_SPLITS,
                    tasks=P.TASKS, n_jobs: int = 2, progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame,
                                                                                     pd.DataFrame]:
    """Chapter 5 on `models` (the derived-question probe on `derived_models`, those with latent
    slots): returns the states rows, the derived rows and the probe rows, from the store. The
    probes are fitted by `n_jobs` processes (the same numbers with any number)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and more spin next to other jobs
    try:
        return _run(root, store_dir, items, models, derived_models, seed, device, n_splits, tasks, n_jobs, progress)
    finally:
        torch.set_num_threads(threads)


def _run(root, store_dir, items, models, derived_models, seed, device, n_splits, tasks, n_jobs, progress):
    store, memo = ResultsStore(store_dir), {}
    frames: dict[str, list] = {"states": [], "derived": [], "probes": []}
    ids = [it.id for it in items]
    for m in tqdm(models, desc="models", disable=not progress):
        folder = Path(root) / m
        h = model_hash(folder)
        states = store.run(m, h, _params("states", items, seed))
        derived = store.run(m, h, _params("derived", items, seed)) if m in derived_models else None
        probes = store.run(m, h, _params("probes", items, seed, n_splits=n_splits, C=P.C_REG,
                                         tasks=[t.name for t in tasks], states=states.key))
        need_derived = derived is not None and bool(derived.missing([(f"{i}|same", c) for i in ids
                                                                     for c in D.CONDITIONS]))
        if states.missing([(i, "clean") for i in ids]) or need_derived:
            r = LatentReasoner.from_pretrained(folder, device=device)
            clean = clean_traces(r, items)
            store_states(r, items, clean, states)
            if need_derived:
                derived.add(derived_rows(r, items, clean, seed))
        have = pd.Series([row["condition"] for row in probes.rows()], dtype=object).value_counts().to_dict()
        for _, rows in P.probe_rows(load_states(states, items), seed, n_splits, tasks=tasks, have=have, memo=memo,
                                    n_jobs=n_jobs):
            probes.add(rows)
        frames["states"].append(states.frame())
        frames["probes"].append(probes.frame())
        if derived is not None:
            frames["derived"].append(derived.frame())
    return tuple(pd.concat(f, ignore_index=True) if f else pd.DataFrame() for f in frames.values())


# ---------------------------------------------------------------- the chapter's settings, in one place

PER_FAMILY, CI_PER_FAMILY = 30, 5  # test items per family (about 1.5 minutes on 2 CPU cores; CI: seconds)
CI_TASKS = ("relation", "asked colour")  # the small CI run probes two facts (an image one, a question one)


def settings(small_run: bool = False, per_family: int | None = None) -> dict:
    """Items per family, folds and facts of the chapter's probes (the CI run is smaller)."""
    return dict(per_family=per_family or (CI_PER_FAMILY if small_run else PER_FAMILY),
                n_splits=3 if small_run else P.N_SPLITS,
                tasks=[P.TASK[t] for t in CI_TASKS] if small_run else list(P.TASKS))


def chapter_runs(root: str | Path, store_dir: str | Path, config, models=None, small_run: bool = False,
                 per_family: int | None = None, seed: int = 0, device: str = "cpu") -> dict:
    """Chapter 5's runs with its settings (`settings`), so that the chapter and any page that cites
    it (the scorecard) read the same stored rows: every trained model with latent slots, and
    CapImagine for its imagination-span states. Returns the items, the models and the three frames."""
    from ..zoo.recipes import METHODS
    from .study import latent_models, trained

    s = settings(small_run, per_family)
    items = test_items(config, s["per_family"])
    latent = latent_models(root, models or METHODS)
    names = latent + [m for m in trained(root, ["capimagine"]) if models is None or m in models]
    states, der, pr = run_probe_study(root, store_dir, items, names, latent, seed=seed, device=device,
                                      n_splits=s["n_splits"], tasks=s["tasks"])
    return dict(s, items=items, models=names, latent=latent, states=states, derived=der, probes=pr)


# ---------------------------------------------------------------- the chapter's tables

def test_items(config, per_family: int | None = None) -> list[Item]:
    """The held-out items (the first `per_family` of each family), in `study.queries`' order."""
    from ..testbed.items import make_item

    return [make_item(config, "test", f, i) for f, n in config.family_counts("test").items()
            for i in range(n if per_family is None else min(n, per_family))]


def clean_accuracy(states: pd.DataFrame) -> pd.DataFrame:
    """Per model: its accuracy on the probed items (Wilson interval) and its segment's length."""
    from .report import ci
    from .stats import wilson

    out = []
    for m, g in states.groupby("model", sort=False):
        k, n = int(g["correct"].sum()), len(g)
        lo, hi = wilson(k, n)
        out.append({"model": m, "kind": P.kind_of(m), "n": n, "accuracy [Wilson 95% CI]": ci(k / n, lo, hi),
                    "segment": g["segment"].dropna().iloc[0] if g["segment"].notna().any() else "none",
                    "mean K": round(float(g["k"].mean()), 2), "K range": f"{int(g['k'].min())}-{int(g['k'].max())}"})
    return pd.DataFrame(out)


def side_by_side(s: pd.DataFrame, acc: pd.DataFrame, tests: pd.DataFrame, rep: str = "mean over steps") -> pd.DataFrame:
    """One row per model, grouped by kind: each image fact's selectivity from `rep`, and the
    derived-question probe's accuracy from the latents alone and its difference to another item's
    latents (same questions)."""
    from .report import ci, p

    rows = []
    for m in pd.unique(s["model"]):
        row = {"kind": P.kind_of(m), "model": m}
        g = s[(s["model"] == m) & (s["representation"] == rep)].set_index("task")
        for t in (t.name for t in P.TASKS if t.source == "image"):
            row[f"{t} selectivity"] = (ci(g.loc[t, "selectivity"], g.loc[t, "sel_low"], g.loc[t, "sel_high"], signed=True)
                                       if t in g.index else "n/a")
        a = acc[(acc["model"] == m) & (acc["kind"] == "same") & (acc["condition"] == "latents")]
        c = tests[(tests["model"] == m) & (tests["kind"] == "same") & (tests["comparison"] == "latents - other")] \
            if len(tests) else tests
        row["own question, latents only"] = ci(*a.iloc[0][["accuracy", "ci_low", "ci_high"]]) if len(a) else "n/a"
        row["own - other latents (McNemar p_holm)"] = (
            f"{ci(*c.iloc[0][['diff', 'diff_low', 'diff_high']], signed=True)} ({p(c.iloc[0]['p_holm'])})"
            if len(c) else "n/a")
        rows.append(row)
    out = pd.DataFrame(rows).set_index("model").loc[P.model_order(s["model"])].reset_index()
    return out[["kind", "model"] + [c for c in out.columns if c not in ("kind", "model")]]
