"""Chapter 5: what the latents contain, read by linear probes against the testbed's ground truth.

A probe is a scikit-learn pipeline (StandardScaler + LogisticRegression) fitted on one
representation of each item (the vector fed at latent slot k, `z_in[k]`; the mean over the slots;
the merged image tokens at the evidence cells; the prompt's last state; CapImagine's imagination-
span states) to one fact of the item's queried object (`TASKS`). It is cross-validated with seeded
folds that never split an item (`folds`), so every item gets one out-of-fold prediction, and it is
reported against three baselines on the same items:

* **control task** (Hewitt and Liang 2019): every distinct *object type* (what the queried object
  is: its facts except where it is, `object_type`) gets one fixed random label, the types' own
  labels permuted across types (`control_labels`). A probe that memorises types scores well on it;
  **selectivity** = accuracy - control accuracy says how much of the accuracy the representation,
  not the probe's capacity, explains;
* **majority**: the training folds' most common label;
* **chance**: one over the number of labels.

Some facts can only come from the image (the colour asked about, the digit, the count, where the
object is, the relation); others are named in the question (the colour of a counted object, the
shape asked about). Probes of the second kind say whether a representation carries the question;
only the first kind says whether it carries what the image shows (`ProbeTask.source`).

Intervals are percentile bootstraps over items (`boot_mean`, the same draws as
`stats.bootstrap_interval`); selectivity is also tested with McNemar's test on the paired
probe/control outcomes, Holm over every probe of the chapter (`summary`). The paper's own probe
(the model answering derived questions from the latents alone) is in `derived`; the runs through
the engine and the results store are in `probe_study`.
"""

from __future__ import annotations

import hashlib
import warnings
import zlib
from dataclasses import dataclass

import altair as alt
import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ..testbed.items import MAX_COUNT, NUMBER_WORDS, RELATIONS
from ..testbed.scenes import COLOUR_NAMES, SHAPES
from . import plots
from .stats import ALPHA, bootstrap_interval, holm, mcnemar_paired

N_SPLITS = 5
C_REG = 1.0  # inverse L2 strength of the probes (scikit-learn's default)
N_BOOT = 2000
GRID_CELLS = tuple(range(8))  # rows and columns of the 224-px testbed (28-px cells)


@dataclass(frozen=True)
class ProbeTask:
    """One fact of the queried object, on the families where it is defined and varies."""

    name: str
    fact: str  # key of `Item.facts`
    families: tuple[str, ...]
    source: str  # "image": only the image says it; "question": the question names it
    labels: tuple  # the label space (chance = 1 / len)
    what: str

    def label(self, item) -> int | None:
        """Index of the item's value in the label space; None when the task does not apply."""
        if item.family not in self.families:
            return None
        v = item.facts.get(self.fact)
        return None if v is None else self.labels.index(v)


TASKS = (
    ProbeTask("colour", "colour", ("attr",), "image", COLOUR_NAMES, "colour of the shape asked about (attr)"),
    ProbeTask("digit", "glyph", ("glyph",), "image", tuple(range(10)), "digit in the box asked about (glyph)"),
    ProbeTask("count", "count", ("count",), "image", tuple(range(MAX_COUNT + 1)),
              "how many objects of the colour asked about (count)"),
    ProbeTask("relation", "relation", ("relpos",), "image", RELATIONS, "where A is relative to B (relpos)"),
    ProbeTask("row", "row", ("attr", "relpos", "glyph"), "image", GRID_CELLS,
              "grid row of the queried object (attr, relpos, glyph)"),
    ProbeTask("col", "col", ("attr", "relpos", "glyph"), "image", GRID_CELLS,
              "grid column of the queried object (attr, relpos, glyph)"),
    ProbeTask("asked shape", "shape", ("attr", "relpos"), "question", SHAPES,
              "shape named in the question (attr, relpos)"),
    ProbeTask("asked colour", "colour", ("relpos", "count", "glyph"), "question", COLOUR_NAMES,
              "colour named in the question (relpos, count, glyph)"),
)
TASK = {t.name: t for t in TASKS}
assert len(NUMBER_WORDS) >= 10


def object_type(item) -> tuple:
    """What the queried object is (for the control task): the family and every fact except its
    position (row, col). Items of one type share a control label."""
    return (item.family,) + tuple(item.facts.get(k) for k in ("colour", "shape", "glyph", "count", "relation"))


def _seed(seed: int, name: str) -> int:
    return int(zlib.crc32(f"{seed}:{name}".encode()))


def control_labels(types: list, labels, seed: int = 0, name: str = "") -> tuple[np.ndarray, dict]:
    """Hewitt and Liang's control task: each distinct type gets one fixed random label. The labels
    are the types' own (each type's first item's label) permuted across the types, seeded, so the
    control task has the real task's label distribution over types (drawing them independently, as
    Hewitt and Liang do with thousands of word types, gives a few dozen types a lopsided
    distribution whose majority alone beats the real task's). Returns every item's control label
    and the map."""
    labels = np.asarray(labels)
    first: dict = {}
    for t, y in zip(types, labels):
        first.setdefault(t, int(y))
    distinct = sorted(first, key=repr)
    rng = np.random.default_rng(_seed(seed, f"control:{name}"))
    drawn = rng.permutation([first[t] for t in distinct])
    table = {t: int(v) for t, v in zip(distinct, drawn)}
    return np.array([table[t] for t in types], dtype=int), table


def folds(groups, y, n_splits: int = N_SPLITS, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded stratified folds that never put one item (group) on both sides; fewer folds when
    there are fewer items, unstratified ones when no class has as many items as there are folds."""
    groups, y = np.asarray(groups), np.asarray(y)
    k = min(n_splits, len(np.unique(groups)))
    if k < 2:
        return []
    rs = _seed(seed, "folds") % 2**31
    if np.unique(y, return_counts=True)[1].max() < k:  # no class fills the folds: groups only
        cv = GroupKFold(n_splits=k, shuffle=True, random_state=rs)
    else:
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=rs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return [(tr, te) for tr, te in cv.split(np.zeros(len(y)), y, groups)]


def _majority(y) -> int:
    values, counts = np.unique(y, return_counts=True)
    return int(values[np.argmax(counts)])  # ties: the smallest label


def cross_validated(X, y, groups, seed: int = 0, n_splits: int = N_SPLITS, C: float = C_REG):
    """Out-of-fold predictions of the probe and of the majority baseline (-1 where an item was
    never held out: fewer than two items)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    pred, maj = np.full(len(y), -1), np.full(len(y), -1)
    # one BLAS thread: these matrices are tiny, and idle BLAS threads spinning next to other jobs
    # made a fit 100 times slower (measured on the shared 2-core machine)
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        for tr, te in folds(groups, y, n_splits, seed):
            maj[te] = _majority(y[tr])
            if len(np.unique(y[tr])) < 2:  # one class to learn: the probe can only say it
                pred[te] = y[tr][0]
                continue
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=300, tol=1e-3))
            pred[te] = probe.fit(X[tr], y[tr]).predict(X[te])
    return pred, maj


def probe(X, y, types, groups, seed: int = 0, name: str = "", n_splits: int = N_SPLITS,
          C: float = C_REG) -> pd.DataFrame:
    """The probe and its control task on the same items and folds: one row per item."""
    y = np.asarray(y, dtype=int)
    ctrl, _ = control_labels(types, y, seed, name)
    pred, maj = cross_validated(X, y, groups, seed, n_splits, C)
    cpred, _ = cross_validated(X, ctrl, groups, seed, n_splits, C)
    return pd.DataFrame(dict(item=list(groups), label=y, pred=pred, correct=pred == y, control_label=ctrl,
                             control_pred=cpred, control_correct=cpred == ctrl, majority_correct=maj == y,
                             held_out=pred >= 0))


# ---------------------------------------------------------------- representations

def evidence_vector(tokens: np.ndarray, task: ProbeTask, family: str) -> np.ndarray:
    """The image-token representation of one item for a task, from the merged tokens at its evidence
    cells [n, H] (in the item's evidence order): for the relation A's and B's tokens side by side;
    for a count item the sum over the counted objects (zeros for none); otherwise the queried
    object's token."""
    H = tokens.shape[-1]
    if task.name == "relation":
        pair = list(tokens[:2]) + [np.zeros(H)] * (2 - min(2, len(tokens)))
        return np.concatenate(pair)
    if family == "count":
        return tokens.sum(0) if len(tokens) else np.zeros(H)
    return tokens[0] if len(tokens) else np.zeros(H)


def representations(states: dict, task: ProbeTask, min_share: float = 0.5) -> dict[str, tuple[list, np.ndarray]]:
    """Name -> (items, X) for one task from a model's states (item -> dict of arrays: "z" [K, H]
    the vectors per step, "image" [n, H] the evidence tokens, "prompt" [H]). Step k holds the items
    whose run reached it (a model may end its segment early); a step is probed when at least
    `min_share` of the items have it."""
    items = [i for i, s in states.items() if s["label"].get(task.name) is not None]
    out: dict[str, tuple[list, np.ndarray]] = {}
    if not items:
        return out
    K = max(len(states[i]["z"]) for i in items)
    for k in range(K):
        have = [i for i in items if len(states[i]["z"]) > k]
        if len(have) >= min_share * len(items):
            out[f"step {k}"] = (have, np.stack([states[i]["z"][k] for i in have]))
    have = [i for i in items if len(states[i]["z"])]
    if have:
        out["mean over steps"] = (have, np.stack([states[i]["z"].mean(0) for i in have]))
    out["image tokens"] = (items, np.stack([evidence_vector(states[i]["image"], task, states[i]["family"])
                                            for i in items]))
    out["prompt state"] = (items, np.stack([states[i]["prompt"] for i in items]))
    return out


def probe_rows(states: dict, seed: int = 0, n_splits: int = N_SPLITS, C: float = C_REG, tasks=TASKS,
               have: dict | None = None, memo: dict | None = None, n_jobs: int = 1):
    """Every (representation, task) probe of one model's states: yields its condition name and one
    row per item. A condition whose rows `have` (condition -> rows stored) already holds for every
    item is not fitted again; `memo` (shared across models) keeps fitted probes by their inputs, so
    the same vectors (one tower's image tokens in every model) are fitted once. The probes are
    independent: `n_jobs` processes fit them (joblib), with the same results as one."""
    have = {} if have is None else have
    memo = {} if memo is None else memo
    jobs = []
    for task in tasks:
        for rep, (items, X) in representations(states, task).items():
            cond = f"{rep}|{task.name}"
            if have.get(cond) == len(items):
                continue
            y = [states[i]["label"][task.name] for i in items]
            types = [states[i]["type"] for i in items]
            key = (cond, tuple(items), hashlib.sha1(np.ascontiguousarray(X).tobytes()).hexdigest(), seed, n_splits, C)
            jobs.append((cond, task, rep, items, X, y, types, key))
    todo = {j[-1]: j for j in jobs if j[-1] not in memo}
    if todo:
        fitted = Parallel(n_jobs=n_jobs)(delayed(probe)(X, y, types, items, seed, cond, n_splits, C)
                                         for cond, _, _, items, X, y, types, _ in todo.values())
        memo.update(zip(todo, fitted))
    for cond, task, rep, items, _, _, _, key in jobs:
        step = int(rep.split()[1]) if rep.startswith("step ") else None
        fam = [states[i]["family"] for i in items]
        yield cond, [dict(r, condition=cond, representation=rep, step=step, task=task.name, family=f)
                     for r, f in zip(memo[key].to_dict("records"), fam)]


# ---------------------------------------------------------------- summaries

def boot_mean(values, n_boot: int = N_BOOT, alpha: float = ALPHA, seed: int = 0) -> tuple[float, float, float]:
    """Mean with its percentile bootstrap interval over items (`stats.bootstrap_interval`)."""
    return bootstrap_interval(np.asarray(values, dtype=float), n_boot=n_boot, alpha=alpha, seed=seed)


def summary(rows: pd.DataFrame, seed: int = 0, n_boot: int = N_BOOT) -> pd.DataFrame:
    """Per (model, representation, task): n, chance, majority, accuracy, control accuracy and
    selectivity with bootstrap intervals over items, McNemar on probe vs control (Holm over the
    table)."""
    out = []
    rows = rows[rows["held_out"].astype(bool)]
    for (model, rep, task), g in rows.groupby(["model", "representation", "task"], sort=False):
        a, c = g["correct"].astype(bool).to_numpy(), g["control_correct"].astype(bool).to_numpy()
        acc, acc_lo, acc_hi = boot_mean(a, n_boot, seed=seed)
        ctl, ctl_lo, ctl_hi = boot_mean(c, n_boot, seed=seed + 1)
        sel, sel_lo, sel_hi = boot_mean(a.astype(float) - c, n_boot, seed=seed + 2)
        step = g["step"].iloc[0]
        out.append(dict(model=model, representation=rep, step=None if pd.isna(step) else int(step), task=task,
                        source=TASK[task].source, n=len(g), chance=1 / len(TASK[task].labels),
                        majority=float(g["majority_correct"].mean()), accuracy=acc, acc_low=acc_lo, acc_high=acc_hi,
                        control=ctl, control_low=ctl_lo, control_high=ctl_hi, selectivity=sel, sel_low=sel_lo,
                        sel_high=sel_hi, p_mcnemar=mcnemar_paired(a, c)["p_value"]))
    table = pd.DataFrame(out)
    if len(table):
        table["p_holm"], table["reject"] = holm(table["p_mcnemar"].to_numpy())
    return table


def kind_of(model: str) -> str:
    from ..zoo.recipes import KINDS
    return KINDS.get(model, "other")


KIND_ORDER = ("latent, bypass open", "latent, bypass closed", "control", "text imagination")


def model_order(models) -> list[str]:
    """Models grouped by kind (bypass open, bypass closed, controls, text imagination), each group
    in the order given."""
    models = list(pd.unique(pd.Series(list(models), dtype=object)))
    rank = {k: i for i, k in enumerate(KIND_ORDER)}
    return sorted(models, key=lambda m: (rank.get(kind_of(m), len(rank)), models.index(m)))


def table(s: pd.DataFrame, representations=None) -> pd.DataFrame:
    """The chapter's probe table: one row per model, representation and task, intervals in brackets."""
    from .report import ci, p

    if representations is not None:
        s = s[s["representation"].isin(representations)]
    return pd.DataFrame({
        "model": s["model"], "kind": s["model"].map(kind_of), "representation": s["representation"],
        "task": s["task"], "source": s["source"], "n": s["n"], "chance": s["chance"].round(3),
        "majority": s["majority"].round(3),
        "accuracy [95% CI]": [ci(x, lo, hi) for x, lo, hi in zip(s["accuracy"], s["acc_low"], s["acc_high"])],
        "control [95% CI]": [ci(x, lo, hi) for x, lo, hi in zip(s["control"], s["control_low"], s["control_high"])],
        "selectivity [95% CI]": [ci(x, lo, hi, signed=True)
                                 for x, lo, hi in zip(s["selectivity"], s["sel_low"], s["sel_high"])],
        "McNemar p (Holm)": [p(x) for x in s["p_holm"]],
    }).reset_index(drop=True)


def headline(s: pd.DataFrame, rep: str = "mean over steps", seed: int = 0, rows: pd.DataFrame | None = None,
             n_boot: int = N_BOOT) -> pd.DataFrame:
    """Per model, the latents' selectivity for the facts only the image holds, from `rep` (the mean
    over steps, fixed in advance): the best fact's (chosen after the fact, so optimistic) with its
    interval and n, and, given the probe `rows`, the mean over those facts with a bootstrap interval
    over items (each item's mean of probe minus control over its facts)."""
    img = s[(s["source"] == "image") & (s["representation"] == rep)]
    out = []
    for m in model_order(img["model"]):
        g = img[img["model"] == m].sort_values(["selectivity", "task"], ascending=[False, True])
        b = g.iloc[0]
        row = dict(model=m, kind=kind_of(m), representation=rep, best_fact=b["task"], best=b["selectivity"],
                   best_low=b["sel_low"], best_high=b["sel_high"], best_n=int(b["n"]))
        if rows is not None:
            r = rows[(rows["model"] == m) & (rows["representation"] == rep) & rows["held_out"].astype(bool)
                     & rows["task"].isin(g["task"])]
            per_item = (r["correct"].astype(float) - r["control_correct"].astype(float)).groupby(r["item"]).mean()
            row["mean"], row["mean_low"], row["mean_high"] = boot_mean(per_item.to_numpy(), n_boot, seed=seed)
            row["mean_n"] = len(per_item)
        out.append(row)
    return pd.DataFrame(out)


def describe_tasks(tasks=TASKS) -> pd.DataFrame:
    """The probed facts: what each is, where it is defined, where it comes from, chance."""
    return pd.DataFrame([dict(fact=t.name, what=t.what, families=", ".join(t.families),
                              source="the image only" if t.source == "image" else "named in the question",
                              labels=len(t.labels), chance=round(1 / len(t.labels), 3)) for t in tasks])


def selectivity_table(s: pd.DataFrame, source: str = "image", representations=None) -> pd.DataFrame:
    """Selectivity [95% CI] per model and representation (rows) and fact (columns)."""
    from .report import ci

    s = s[s["source"] == source]
    if representations is not None:
        s = s[s["representation"].isin(representations)]
    cell = [ci(x, lo, hi, signed=True) for x, lo, hi in zip(s["selectivity"], s["sel_low"], s["sel_high"])]
    wide = s.assign(cell=cell, kind=s["model"].map(kind_of)).pivot_table(
        index=["model", "kind", "representation"], columns="task", values="cell", aggfunc="first", sort=False)
    return wide.reindex(columns=[t.name for t in TASKS if t.name in wide.columns]).reset_index()


def claims(s: pd.DataFrame, source: str = "image", rep: str = "mean over steps") -> str:
    """One line per model: each fact's selectivity from `rep` (fixed in advance: the mean over the
    latent steps) with its interval, test and n, the range over the single steps, and the image
    tokens' selectivity beside it (generated from `summary`)."""
    from .report import ci, p

    lines = []
    for m in pd.unique(s["model"]):
        parts = []
        for t in (t.name for t in TASKS if t.source == source):
            g = s[(s["model"] == m) & (s["task"] == t)].set_index("representation")
            if rep not in g.index:
                continue
            r, steps = g.loc[rep], g[g["step"].notna()]["selectivity"]
            part = (f"*{t}* {ci(r['selectivity'], r['sel_low'], r['sel_high'], signed=True)} (accuracy "
                    f"{r['accuracy']:.3f}, control {r['control']:.3f}, McNemar p_holm {p(r['p_holm'])}, n = {int(r['n'])})")
            if len(steps):
                part += f", single steps {steps.min():+.3f} to {steps.max():+.3f}"
            if "image tokens" in g.index:
                img = g.loc["image tokens"]
                part += f", image tokens {ci(img['selectivity'], img['sel_low'], img['sel_high'], signed=True)}"
            parts.append(part)
        if parts:
            lines.append(f"* **{m}** ({kind_of(m)}), selectivity of the {rep}: " + "; ".join(parts) + ".")
    return "\n".join(lines)


# ---------------------------------------------------------------- figures (altair, plots' style)

def selectivity_chart(s: pd.DataFrame, source: str = "image", title: str = "") -> alt.Chart:
    """Selectivity per latent step (lines, one per task) in one panel per model, with the image
    tokens' selectivity per task as a dashed reference at the right."""
    data = s[(s["source"] == source) & s["step"].notna()].copy()
    order = model_order(data["model"])
    tasks = [t.name for t in TASKS if t.source == source]
    base = alt.Chart().encode(color=alt.Color("task:N", sort=tasks, title="fact"))
    line = base.mark_line(point=True).encode(
        x=alt.X("step:O", title="latent step"),
        y=alt.Y("selectivity:Q", scale=alt.Scale(domain=[-1, 1]), title="selectivity (accuracy - control)"))
    band = base.mark_errorbar().encode(x="step:O", y=alt.Y("sel_low:Q", title="selectivity (accuracy - control)"),
                                       y2="sel_high:Q")
    zero = alt.Chart().mark_rule(color="grey", strokeDash=[4, 3]).encode(y=alt.datum(0))
    chart = alt.layer(band, line, zero, data=data).properties(width=150, height=plots.HEIGHT).facet(
        facet=alt.Facet("model:N", sort=order, title=None), columns=4)
    return chart.properties(title=title) if title else chart


def comparison_chart(s: pd.DataFrame, source: str = "image", title: str = "",
                     reps=("mean over steps", "image tokens", "prompt state")) -> alt.Chart:
    """Selectivity of the latents' mean over steps, the image tokens and the prompt state, per fact
    (panel column) and model (panel row), with 95% intervals."""
    reps = list(reps)
    data = s[(s["source"] == source) & s["representation"].isin(reps)]
    order = model_order(s["model"])
    x = alt.X("representation:N", sort=reps, title=None, axis=alt.Axis(labels=False, ticks=False))
    colour = alt.Color("representation:N", sort=reps, title="representation")
    bars = alt.Chart().mark_bar().encode(x=x, y=alt.Y("selectivity:Q", scale=alt.Scale(domain=[-1, 1]),
                                                       title="selectivity"), color=colour)
    whisk = alt.Chart().mark_rule(color="black").encode(x=x, y=alt.Y("sel_low:Q", title="selectivity"), y2="sel_high:Q")
    chart = alt.layer(bars, whisk, data=data).properties(width=60, height=90).facet(
        row=alt.Row("model:N", sort=order, title=None),
        column=alt.Column("task:N", sort=[t.name for t in TASKS if t.source == source], title=None))
    return chart.properties(title=title) if title else chart
