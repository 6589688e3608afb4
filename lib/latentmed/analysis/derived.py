"""The paper's own probe on the testbed: the model answers questions about the evidence region with
the image removed and only the latents of the clean run kept.

`derived_questions(item)` builds, from an item's scene, multiple-choice questions in the testbed's
four templates (the only ones the tiny models were trained on), each with its right answer
computed from the scene:

    same      the item's own question (its latents were made for it)
    related   another template's question whose evidence includes the item's queried object:
              attr, glyph  -> "How many <colour> objects are there?" (the object's colour)
              relpos       -> the reversed relation ("Where is B relative to A?")
              count        -> "What colour is the <shape>?" for a counted object whose shape is
                              unique in the scene (none when there is no such object)

Every derived question is run under four conditions (`CONDITIONS`), all teacher-forced replays
(`replay`) of the question's run with the image, so the segment's length and the restated key
words stay as recorded and only the image and the slot vectors differ:

    image     the image kept, the model's own latents for this question (decoded)
    latents   the image blanked, the latents of the item's clean run (real image, own question)
    zero      the image blanked, zero vectors at the slots
    other     the image blanked, another item's clean latents (same family: norm-matched, uninformative)

The text-only chance rate is one in four; `zero` and `other` are the model's own text-only rates.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import altair as alt
import numpy as np
import pandas as pd

from ..engine.query import Query
from ..testbed.items import MAX_COUNT, NUMBER_WORDS, RELATIONS, Item, relation
from ..testbed.scenes import COLOUR_NAMES, SceneObject
from .stats import accuracy_table, chance_tests, holm, mcnemar_paired

KINDS = ("same", "related")
CONDITIONS = ("image", "latents", "zero", "other")
WHAT = {
    "image": "the image kept, the model's own latents for the question",
    "latents": "the image blanked, the latents of the item's clean run (real image, its own question)",
    "zero": "the image blanked, zero vectors at the latent slots",
    "other": "the image blanked, another item's clean latents (same family)",
}
RELATED = {
    "attr": "how many objects have the colour of the shape asked about",
    "glyph": "how many objects have the colour of the digit box asked about",
    "relpos": "the reversed relation (where B is relative to A)",
    "count": "the colour of a counted object whose shape is unique in the scene",
}


@dataclass
class Derived:
    """One derived question: its query (id `<item>|<kind>`), the item it derives from, its kind."""

    item: str
    kind: str
    query: Query


def _options(rng, answer: str, pool) -> list[str]:
    words = [answer] + [pool[i] for i in rng.permutation(len(pool)) if pool[i] != answer][:3]
    return [words[i] for i in rng.permutation(4)]


def _query(item: Item, kind: str, question: str, answer: str, pool, keywords, evidence, family: str,
           seed: int) -> Query:
    rng = np.random.default_rng([seed, zlib.crc32(f"{item.id}|{kind}".encode())])
    options = _options(rng, answer, list(pool))
    return Query(images=[item.image], question=question, options=options, keywords=list(keywords),
                 evidence_boxes=[list(o.bbox) for o in evidence], answer=options.index(answer),
                 id=f"{item.id}|{kind}", family=family)


def _at(objs: list[SceneObject], cell) -> SceneObject:
    return next(o for o in objs if list(o.cell) == list(cell))


def related_question(item: Item, seed: int = 0) -> Query | None:
    """The item's `related` question (module docstring), or None when the scene has none."""
    objs = item.scene_objects()
    if item.family in ("attr", "glyph"):
        colour = item.facts["colour"]
        same = [o for o in objs if o.colour == colour]
        if len(same) > MAX_COUNT:
            return None
        return _query(item, "related", f"How many {colour} objects are there?", NUMBER_WORDS[len(same)],
                      NUMBER_WORDS[:MAX_COUNT + 1], [colour], same, "count", seed)
    if item.family == "relpos":
        a, b = _at(objs, item.evidence_cells[0]), _at(objs, item.evidence_cells[1])
        rel = relation(b.cell, a.cell)
        if rel is None:
            return None
        return _query(item, "related", f"Where is the {b.label} relative to the {a.label}?", rel, RELATIONS,
                      [b.colour, a.colour], [b, a], "relpos", seed)
    if item.family == "count":
        colour = item.facts["colour"]
        for o in (o for o in objs if o.colour == colour):
            if sum(p.shape == o.shape for p in objs) == 1:
                return _query(item, "related", f"What colour is the {o.shape}?", colour, COLOUR_NAMES, [o.shape],
                              [o], "attr", seed)
        return None
    raise ValueError(f"item {item.id}: no derived question for family {item.family!r}")


def derived_questions(item: Item, seed: int = 0) -> list[Derived]:
    """The item's derived questions: its own (`same`) and, where the scene has one, `related`."""
    own = Query.of(item)
    out = [Derived(item.id, "same", own.replace(id=f"{item.id}|same"))]
    rel = related_question(item, seed)
    if rel is not None:
        out.append(Derived(item.id, "related", rel))
    return out


# ---------------------------------------------------------------- results

CHANCE = 0.25  # four options: the text-only chance rate
COMPARISONS = (("latents", "other"), ("latents", "zero"), ("image", "latents"))


def accuracy(rows: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per (model, kind, condition) with its Wilson interval, and the one-sided exact
    binomial test against the text-only chance rate (Holm over the table)."""
    t = accuracy_table(rows.assign(correct=rows["correct"].astype(bool)), by=("model", "kind", "condition"),
                       chance=CHANCE)
    return chance_tests(t)


def tests(rows: pd.DataFrame, comparisons=COMPARISONS) -> pd.DataFrame:
    """McNemar on the same derived questions for each comparison (a vs b) per model and kind:
    accuracy difference a - b with Newcombe's interval; Holm over every row (one family)."""
    out = []
    for (model, kind), g in rows.groupby(["model", "kind"], sort=False):
        wide = g.pivot_table(index="item", columns="condition", values="correct", aggfunc="first")
        for a, b in comparisons:
            if a not in wide or b not in wide:
                continue
            both = wide[[a, b]].dropna()
            r = mcnemar_paired(both[a].astype(bool), both[b].astype(bool))
            out.append(dict(model=model, kind=kind, comparison=f"{a} - {b}", **r))
    table = pd.DataFrame(out)
    if len(table):
        table["p_holm"], table["reject"] = holm(table["p_value"].to_numpy())
    return table


def accuracy_wide(acc: pd.DataFrame, rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per model and kind, one column per condition: 'accuracy [Wilson 95% CI]', the
    number of questions, and (given the `rows`) the share of the most common right answer: the
    accuracy of a text-only reader that always gives it (the related questions' answers are not
    uniform, so it can beat one in four)."""
    from .report import ci

    a = acc.assign(cell=[ci(x, lo, hi) for x, lo, hi in zip(acc["accuracy"], acc["ci_low"], acc["ci_high"])])
    wide = a.pivot_table(index=["model", "kind"], columns="condition", values="cell", aggfunc="first", sort=False)
    n = a.groupby(["model", "kind"], sort=False)["n"].max()
    wide = wide.reindex(columns=[c for c in CONDITIONS if c in wide.columns]).assign(n=n)
    if rows is not None:  # a text-only reader that always says the most common right answer
        common = rows[rows["condition"] == "image"].groupby(["model", "kind"], sort=False)["answer_word"].agg(
            lambda w: w.value_counts().iloc[0] / len(w))
        wide = wide.assign(**{"most common answer": common.round(3)})
    return wide.reset_index()


def tests_table(t: pd.DataFrame) -> pd.DataFrame:
    from .probes import kind_of
    from .report import ci, p

    return pd.DataFrame({
        "model": t["model"], "kind of model": t["model"].map(kind_of), "question": t["kind"],
        "comparison": t["comparison"], "n": t["n"],
        "difference [95% CI]": [ci(x, lo, hi, signed=True) for x, lo, hi in zip(t["diff"], t["diff_low"], t["diff_high"])],
        "McNemar p (Holm)": [p(x) for x in t["p_holm"]],
    }).reset_index(drop=True)


def claims(acc: pd.DataFrame, t: pd.DataFrame, kind: str = "same") -> str:
    """Per model: accuracy from the latents alone against chance and against another item's
    latents, each with its interval, test and n (generated from `accuracy` and `tests`)."""
    from .probes import kind_of
    from .report import ci, p

    lines = []
    for m in pd.unique(acc["model"]):
        a = acc[(acc["model"] == m) & (acc["kind"] == kind)].set_index("condition")
        if "latents" not in a.index:
            continue
        lat, img = a.loc["latents"], a.loc["image"] if "image" in a.index else None
        c = t[(t["model"] == m) & (t["kind"] == kind) & (t["comparison"] == "latents - other")]
        line = (f"* **{m}** ({kind_of(m)}): from the latents alone {ci(lat['accuracy'], lat['ci_low'], lat['ci_high'])}"
                f" (chance {CHANCE:.2f}, binomial p_holm {p(lat['p_chance_holm'])}, n = {int(lat['n'])})")
        if img is not None:
            line += f", with the image {ci(img['accuracy'], img['ci_low'], img['ci_high'])}"
        if len(c):
            c = c.iloc[0]
            line += (f"; own latents minus another item's {ci(c['diff'], c['diff_low'], c['diff_high'], signed=True)}"
                     f" (McNemar p_holm {p(c['p_holm'])}, n = {int(c['n'])})")
        lines.append(line + ".")
    return "\n".join(lines)


def chart(acc: pd.DataFrame, title: str = "") -> alt.Chart:
    """Accuracy per condition (bars, Wilson whiskers) in one panel per model, one row per kind of
    question, with the text-only chance rate dashed."""
    from .probes import model_order

    order = model_order(acc["model"])
    x = alt.X("condition:N", sort=list(CONDITIONS), title=None)
    bars = alt.Chart().mark_bar().encode(x=x, y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])),
                                         color=alt.Color("condition:N", sort=list(CONDITIONS), legend=None))
    whisk = alt.Chart().mark_rule(color="black").encode(x=x, y=alt.Y("ci_low:Q", title="accuracy"), y2="ci_high:Q")
    rule = alt.Chart().mark_rule(color="grey", strokeDash=[4, 3]).encode(y=alt.datum(CHANCE))
    chart = alt.layer(bars, whisk, rule, data=acc).properties(width=110, height=140).facet(
        column=alt.Column("model:N", sort=order, title=None), row=alt.Row("kind:N", sort=list(KINDS), title=None))
    return chart.properties(title=title) if title else chart


def describe() -> pd.DataFrame:
    """The conditions of the derived-question probe, and what the related question asks per family."""
    rows = [dict(part="condition", name=c, what=WHAT[c]) for c in CONDITIONS]
    rows += [dict(part="related question", name=f, what=RELATED[f]) for f in ("attr", "relpos", "count", "glyph")]
    return pd.DataFrame(rows)
