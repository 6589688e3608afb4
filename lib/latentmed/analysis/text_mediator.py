"""Chapter 7: is CapImagine's text imagination a mediator of the answer?

The paper's protocol (arXiv 2602.22766, CapImagine): cut the answer, rewrite the imagined text so
that it leads to a wrong conclusion, and continue generation from the edited trace. On the
testbed the rewrite is exact: in the span the model actually generated, the word that states the
answer (the item's `caption_answer_word`) is replaced by another option's word
(`CorruptWord(old, new)`); on real checkpoints a local language model rewrites the span
(`LMRewriter`). Both are `Rewriter`s, so chapter 8 can plug either in.

Every condition is a `continue_from` of the clean trace (cut after the span, refill it, decode
on with the forced protocol: the question's key words are written again after the span and the
answer is scored over the option tokens), fixed before any result is computed:

    refill           the span as generated (no edit): the reference of every other condition
    rewrite          the answer word of the generated span replaced by a wrong option's word
                     (only where the span holds the answer word; other items are recorded as
                     not applicable, with the reason)
    delete           the span emptied (the markers stay)
    shuffle          the span's tokens in a seeded order that moves every token
    swap             another item's generated span (same family, a seeded derangement)
    caption          the item's ground-truth caption (the imagination the model was trained to write)
    caption_rewrite  that caption with the answer word replaced by the same wrong word as in
                     `rewrite`: defined on every item, including those whose span lacks the word

Rows go to the results store in chapter 4's format (`measure.outcome`: chosen, correct, logprobs,
margin, ...), one per (item, condition), plus the span before and after the edit, the planted
word, whether the answer followed it, and whether the edit was applied (`applied`, `status`).
A killed run resumes where it stopped. Analysis: `span_table`, `instrument_check`,
`text_effects`, `latent_rows` (chapter 4's rows of the same items), `comparison`,
`side_by_side`, `contrasts`.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..engine import interventions as I
from ..engine.decode import DecodeConfig, Decoder
from ..engine.query import Query
from ..engine.trace import Segment
from ..store import ResultsStore, Run
from .conditions import donors
from .effects import mean_ci, paired
from .measure import outcome
from .rewrite import (  # noqa: F401  (re-exported: the chapter's notebook and tests use one module)
    PROMPT,
    ExactWordRewriter,
    LMRewriter,
    Rewrite,
    Rewriter,
    RewriteRequest,
    content,
    planted_word,
    replace_word,
    word_spans,
)
from .stats import ALPHA, holm, mcnemar_paired, paired_difference, wilson

FORM = "continue"
CONDITIONS = ("refill", "rewrite", "delete", "shuffle", "swap", "caption", "caption_rewrite")
REFERENCE = f"refill/{FORM}"
WHAT = {
    "refill": "the span as generated, cut and refilled, generation continued (the reference)",
    "rewrite": "the generated span's answer word replaced by a wrong option's word (CorruptWord)",
    "delete": "the span emptied, the markers kept (DeleteSpan)",
    "shuffle": "the span's own tokens in a seeded order that moves every token (ShuffleSpan)",
    "swap": "another item's generated span, same family, seeded derangement (ReplaceSpan)",
    "caption": "the item's ground-truth caption (ReplaceSpan)",
    "caption_rewrite": "the ground-truth caption with the answer word replaced by the planted wrong word (ReplaceSpan)",
}
# Chapter 4's latent conditions matched to the text conditions (decoded with the edit: "generate").
MATCHES = (
    ("another item's content", "swap", "swap"),
    ("content removed, markers kept", "delete", "markers"),
    ("own content shuffled", "shuffle", "shuffle"),
    ("content zeroed", None, "zero"),
    ("content replaced by noise", None, "noise"),
    ("wrong conclusion written", "rewrite", None),
)
LATENT_FORM = "generate"
CH4_FORMS = ("generate", "replay")  # the forms chapter 4 runs (part of its store key)
NOT_APPLIED = "not applied"


def key(name: str) -> str:
    """A text condition's name in the store."""
    return name if name == "clean" else f"{name}/{FORM}"


def describe(names=CONDITIONS) -> pd.DataFrame:
    """The chapter's text conditions as a table."""
    return pd.DataFrame([dict(condition=n, what=WHAT[n]) for n in names])


def span_ids(trace) -> list[int]:
    """The token ids of the trace's imagination span (empty without one)."""
    seg = next((s for s in trace.segments if s.kind == "text"), None)
    return [] if seg is None else [trace.ids[p] for p in seg.slots]


def span_end(trace) -> str:
    """How the imagination span ended: 'model' (its end marker), 'cap', 'eos', ... ('' without one)."""
    seg = next((s for s in trace.segments if s.kind == "text"), None)
    return "" if seg is None else seg.ended


# ---- the runner ---------------------------------------------------------------------------------------

def _answer_word(item) -> str:
    return getattr(item, "caption_answer_word", None) or item.answer_word


def _caption(item) -> str | None:
    return getattr(item, "caption", None)


def _plan(name: str, n: int, item, clean, spans, don, seed: int, rewriter: Rewriter, tokenizer):
    """The edits of condition `name` for item n: (edits, status, how, planted word)."""
    opts, ans = item.options, _answer_word(item)
    planted = planted_word(opts, ans, seed, n) if name in ("rewrite", "caption_rewrite") else None
    if name == "refill":
        return [], "ok", "no edit", None
    if name == "delete":
        return [I.DeleteSpan()], "ok", "DeleteSpan", None
    if name == "shuffle":
        if len(spans[n]) < 2:
            return [], f"{NOT_APPLIED}: a span of {len(spans[n])} token(s) cannot be shuffled", "", None
        return [I.ShuffleSpan(seed=seed + n)], "ok", "ShuffleSpan", None
    if name == "swap":
        if don[n] == n:
            return [], f"{NOT_APPLIED}: no other item of family {item.family!r} to take a span from", "", None
        return [I.ReplaceSpan(ids=list(spans[don[n]]))], "ok", "ReplaceSpan (another item's span)", None
    if name in ("caption", "caption_rewrite"):
        cap = _caption(item)
        if not cap:
            return [], f"{NOT_APPLIED}: the item has no ground-truth caption", "", planted
        if name == "caption_rewrite":
            if not word_spans(cap, ans):
                return [], f"{NOT_APPLIED}: the caption does not hold {ans!r}", "", planted
            cap = re.sub(rf"(?<![A-Za-z0-9]){re.escape(ans)}(?![A-Za-z0-9])", planted, cap)
        return [I.ReplaceSpan(text=" " + cap)], "ok", "ReplaceSpan (caption)", planted
    if name == "rewrite":
        text = tokenizer.decode(spans[n])
        req = RewriteRequest(list(spans[n]), text, item.question, list(opts), ans, planted, item.id)
        rw = rewriter.rewrite(req, tokenizer)
        if not rw.applied:
            return [], f"{NOT_APPLIED}: {rw.status}", rw.how, planted
        return rw.edits, "ok", rw.how, planted
    raise ValueError(f"unknown text condition {name!r}; known: {', '.join(CONDITIONS)}")


def _empty_outcome() -> dict:
    return dict(chosen=None, correct=None, logprobs=None, margin=None, k=None, triggered=None, unparsed=None,
                nonfinite=None)


def continue_many(reasoner, traces: list, edit_lists: list, config: DecodeConfig, batch_size: int = 32) -> list:
    """`continue_from(trace, edits=..., config=config)` of many traces at their imagination span,
    `batch_size` continuations decoded together (left-padded): the same cut, refill and forced
    key words as `continue_from`, without one prefill per item (tests check that the two agree)."""
    if len(edit_lists) != len(traces):
        raise ValueError(f"continue_many: {len(edit_lists)} edit lists for {len(traces)} traces")
    tok, end, out = reasoner.tokenizer, reasoner.ids.end, []
    for s in range(0, len(traces), batch_size):
        prompts, edits, segs = [], [], []
        for t, e in zip(traces[s:s + batch_size], edit_lists[s:s + batch_size]):
            e = I.as_interventions(e)
            I.check_supported(e, "continue_from")
            if any(x.point != "span" for x in e):
                raise ValueError("continue_many applies span edits only; use continue_from for the others")
            if t.inputs is None or len(t.segments) != 1 or t.segments[0].kind != "text":
                raise ValueError("continue_many continues traces with their inputs and one imagination span")
            old, P = t.segments[0], len(t.prompt_ids)
            head = t.inputs.input_ids[0].tolist() + list(t.generated_ids[:old.start + 1 - P])
            span = [t.ids[p] for p in old.slots]
            for x in e:
                span = x.edit_span(span, tok)
            seg = Segment(start=old.start, forced=old.forced, triggered=old.triggered, p_start=old.p_start,
                          ended="continued", kind="text", slots=list(range(len(head), len(head) + len(span))))
            body = head + span + [end]
            seg.end = len(body) - 1
            prompts.append(replace(t.inputs, input_ids=torch.tensor([body]), prompt_len=P, option_ids=t.option_ids))
            edits.append(e)
            segs.append([seg])
        with torch.inference_mode():
            dec = Decoder(reasoner, config).prefill(prompts, edits, segments=segs)
            for r, (row, seg) in enumerate(zip(dec.rows, segs)):
                if seg[0].slots:
                    seg[0].z_out = dec.full_hidden[r, [dec.pads[r] + q for q in seg[0].slots]].cpu()
                if config.force_suffix:
                    dec._after_segment(row, next_index=len(row.gen))
            res = dec.run()
        for t, r in zip(traces[s:s + batch_size], res):
            r.inputs = t.inputs
        out += res
    return out


def clean_traces(reasoner, queries: list, config: DecodeConfig, batch_size: int = 16) -> list:
    """The clean forced-protocol trace of every query (fixed batches: the same every time)."""
    out = []
    for s in range(0, len(queries), batch_size):
        out += reasoner.generate([reasoner.prompt(q) for q in queries[s:s + batch_size]], config=config)
    return out


def run_text_study(reasoner, items: list, run: Run, config: DecodeConfig | None = None,
                   rewriter: Rewriter | None = None, seed: int = 0, conditions=CONDITIONS, clean: list | None = None,
                   chunk: int = 64, batch_size: int = 32, progress: bool = False) -> pd.DataFrame:
    """Every missing (item, condition) of `run` for a text-imagination reasoner; returns the run's rows.

    `items` are testbed items (or objects with id, family, question, options, answer_word and
    optionally caption / caption_answer_word) that `Query.of` turns into prompts. `clean` may give
    the clean traces (else they are decoded with `config`, the forced protocol by default). Rows
    are appended `chunk` at a time, so a killed run loses at most one chunk and resumes."""
    from ..zoo.evaluate import decode_config

    if reasoner.spec.placement != "text":
        raise ValueError(f"method {reasoner.spec.method!r} has no text imagination (placement "
                         f"{reasoner.spec.placement!r}); chapter 4 intervenes on latents")
    rewriter = rewriter if rewriter is not None else ExactWordRewriter()
    if not isinstance(rewriter, Rewriter):
        raise TypeError(f"rewriter {type(rewriter).__name__} has no name or rewrite(request, tokenizer)")
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad:
        raise ValueError(f"unknown text condition(s) {bad}; known: {', '.join(CONDITIONS)}")
    queries = [Query.of(it) for it in items]
    ids = [q.id for q in queries]
    if any(i is None for i in ids) or len(set(ids)) != len(ids):
        raise ValueError("every item needs its own id (rows are keyed by item)")
    wanted = [(i, "clean") for i in ids] + [(i, key(c)) for c in conditions for i in ids]
    if not run.missing(wanted) and clean is None:
        return run.frame()
    cfg = config or decode_config(reasoner, "forced")
    clean = clean if clean is not None else clean_traces(reasoner, queries, cfg, batch_size)
    if len(clean) != len(items):
        raise ValueError(f"{len(clean)} clean traces for {len(items)} items")
    tok = reasoner.tokenizer
    spans = [span_ids(t) for t in clean]
    _check_stored_clean(run, ids, spans)
    don = donors([q.family for q in queries], seed)
    base = [dict(item=q.id, family=q.family, answer_word=_answer_word(it)) for q, it in zip(queries, items)]
    answers = [q.answer for q in queries]

    def span_fields(sp: list[int], n: int) -> dict:
        text = tok.decode(sp)
        return dict(span=text, span_ids=list(sp), content=content(text, items[n].options, _answer_word(items[n])))

    if run.missing([(i, "clean") for i in ids]):
        run.add([{**b, "condition": "clean", "form": "generate", "interventions": [], "applied": True, "status": "ok",
                  "how": "generated", "span_end": span_end(t), "planted": None, "followed": None,
                  **span_fields(spans[n], n), **outcome(answers[n], t)}
                 for n, (b, t) in enumerate(zip(base, clean))])
    todo = [(c, [n for n, i in enumerate(ids) if run.missing([(i, key(c))])]) for c in conditions]
    bar = tqdm(total=sum(len(t) for _, t in todo), desc=f"{reasoner.spec.method}: text conditions",
               disable=not progress, leave=False)
    for name, ns in todo:
        for s in range(0, len(ns), chunk):
            part = ns[s:s + chunk]
            plans = {n: _plan(name, n, items[n], clean, spans, don, seed, rewriter, tok) for n in part}
            ran = [n for n in part if plans[n][1] == "ok"]
            out = dict(zip(ran, continue_many(reasoner, [clean[n] for n in ran], [plans[n][0] for n in ran], cfg,
                                              batch_size)))
            rows = []
            for n in part:
                edits, status, how, planted = plans[n]
                pl = None if planted is None else items[n].options.index(planted)
                row = {**base[n], "condition": key(name), "form": FORM, "interventions": [e.to_dict() for e in edits],
                       "applied": n in out, "status": status, "how": how, "planted_word": planted, "planted": pl}
                if n in out:
                    o = outcome(answers[n], out[n])
                    row.update(span_end=span_end(out[n]), **span_fields(span_ids(out[n]), n), **o,
                               followed=None if pl is None or o["chosen"] is None else bool(o["chosen"] == pl))
                else:
                    row.update(span_end=None, span=None, span_ids=None, content=None, **_empty_outcome(),
                               followed=None)
                rows.append(row)
            run.add(rows)
            bar.update(len(part))
    bar.close()
    return run.frame()


def _check_stored_clean(run: Run, ids: list[str], spans: list[list[int]]) -> None:
    """A resumed run must continue the same clean traces it started from."""
    stored = {r["item"]: r.get("span_ids") for r in run.rows() if r["condition"] == "clean"}
    diff = [i for i, sp in zip(ids, spans) if i in stored and stored[i] is not None and stored[i] != list(sp)]
    if diff:
        raise ValueError(f"{run.folder}: the stored clean spans of {len(diff)} item(s) (e.g. {diff[0]}) differ from "
                         "the ones decoded now; the run was made under other settings (remove the run folder)")


def run_capimagine(root: str | Path, store_dir: str | Path, items: list, model: str = "capimagine", seed: int = 0,
                   device: str = "cpu", rewriter: Rewriter | None = None, progress: bool = False) -> pd.DataFrame:
    """Chapter 7's text conditions on a zoo model, rows in the store (params with chapter=7)."""
    from ..engine.reasoner import LatentReasoner
    from .study import model_hash

    folder = Path(root) / model
    if not (folder / "zoo.json").exists():
        raise FileNotFoundError(f"{folder}: no trained {model!r} model (train the zoo first: python -m latentmed.zoo)")
    rewriter = rewriter if rewriter is not None else ExactWordRewriter()
    params = dict(chapter=7, items=[it.id for it in items], seed=seed, protocol="forced", rewriter=rewriter.name,
                  conditions=list(CONDITIONS))
    run = ResultsStore(store_dir).run(model, model_hash(folder), params)
    wanted = [(it.id, "clean") for it in items] + [(it.id, key(c)) for c in CONDITIONS for it in items]
    if not run.missing(wanted):
        return run.frame()
    r = LatentReasoner.from_pretrained(folder, device=device)
    return run_text_study(r, items, run, rewriter=rewriter, seed=seed, progress=progress)


# ---- chapter 4's rows of the same items ---------------------------------------------------------------

def latent_rows(root: str | Path, store_dir: str | Path, queries: list, models: list[str], seed: int = 0,
                device: str = "cpu", progress: bool = False) -> pd.DataFrame:
    """Chapter 4's rows of `models` on these queries (column `source`): read from the store when
    chapter 4 stored them with the same items and seed; else only the matched conditions are
    measured, the same way, into a chapter-7 run (not chapter 4's whole grid: this chapter reads
    five of its conditions, in one form)."""
    from .study import model_hash

    store = ResultsStore(store_dir)
    frames = []
    for m in models:
        params = dict(chapter=4, items=[q.id for q in queries], seed=seed, forms=list(CH4_FORMS))
        run = store.run(m, model_hash(Path(root) / m), params)
        wanted = [(q.id, c) for q in queries for c in ["clean"] + [f"{x}/{LATENT_FORM}" for x in LATENT_MATCHED]]
        if not run.missing(wanted):
            frames.append(run.frame().assign(source="chapter 4"))
        else:
            frames.append(_matched_rows(root, store, queries, m, seed, device, progress)
                          .assign(source="chapter 7 (chapter 4 did not run these items)"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


LATENT_MATCHED = tuple(c for _, _, c in MATCHES if c)


def _matched_rows(root, store: ResultsStore, queries: list, m: str, seed: int, device: str, progress: bool):
    """The matched latent conditions of one model ("generate" form), measured as chapter 4 measures
    them, into a chapter-7 run of the store."""
    from . import conditions as C
    from .measure import measure
    from .study import load_for_study, model_hash

    folder = Path(root) / m
    run = store.run(m, model_hash(folder), dict(chapter=7, part="matched latent conditions", seed=seed,
                                                items=[q.id for q in queries], conditions=list(LATENT_MATCHED)))
    x = load_for_study(folder, queries, device)
    conds = C.latent_conditions(x.clean, [q.family for q in queries], (LATENT_FORM,), seed, names=LATENT_MATCHED)
    measure(x.reasoner, queries, conds, run, x.config, clean=x.clean, progress=progress, prompts=x.prompts)
    return run.frame()


# ---- analysis -----------------------------------------------------------------------------------------

def applied(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows whose edit was applied (non-applied rows carry no outcome)."""
    return rows[rows["applied"].astype(bool)] if "applied" in rows else rows


def span_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per family (and all): what the generated spans state, how they ended, and on how many items
    each rewrite applies (the others are named with their reason in `not_applied`)."""
    clean = rows[rows["condition"] == "clean"]
    out = []
    for fam, g in list(clean.groupby("family", sort=False)) + [("all", clean)]:
        items = set(g["item"])
        n = len(g)
        cnt = g["content"].value_counts()
        rw = rows[(rows["condition"] == key("rewrite")) & rows["item"].isin(items)]
        cr = rows[(rows["condition"] == key("caption_rewrite")) & rows["item"].isin(items)]
        out.append({"family": fam, "n": n,
                    "span holds the answer word": int(cnt.get("answer word", 0)),
                    "another option's word": int(cnt.get("another option's word", 0)),
                    "no option word": int(cnt.get("no option word", 0)),
                    "closed by its marker": int((g["span_end"] == "model").sum()),
                    "clean answer scored": int(g["chosen"].notna().sum()),
                    "rewrite applied": int(rw["applied"].astype(bool).sum()),
                    "as CorruptWord": int((rw["how"] == "CorruptWord").sum()),
                    "rewrite not applied": int((~rw["applied"].astype(bool)).sum()),
                    "caption_rewrite applied": int(cr["applied"].astype(bool).sum())})
    return pd.DataFrame(out)


def not_applied(rows: pd.DataFrame) -> pd.DataFrame:
    """Every (condition, reason) for which an edit was not applied, with its count."""
    na = rows[~rows["applied"].astype(bool)] if "applied" in rows else rows.iloc[:0]
    if na.empty:
        return pd.DataFrame(columns=["condition", "status", "items"])
    return na.groupby(["condition", "status"], sort=False).size().rename("items").reset_index()


def instrument_check(rows: pd.DataFrame) -> pd.DataFrame:
    """The clean (generated) run against the refilled continuation, item for item: on items whose
    span closed by its marker they must be the same run; items whose span ended otherwise (end of
    text, no answer in the clean run) are counted apart."""
    c = rows[rows["condition"] == "clean"]
    r = rows[rows["condition"] == REFERENCE]
    both = c.merge(r, on="item", suffixes=("_clean", "_refill"), how="inner")
    out = []
    closed = both["span_end_clean"].isin(["model", "cap"])
    for what, g in (("span closed by its marker (or the cap)", both[closed]),
                    ("span ended otherwise (clean run unanswered)", both[~closed])):
        lp = [np.max(np.abs(np.subtract(a, b))) for a, b in zip(g["logprobs_clean"], g["logprobs_refill"])
              if a is not None and b is not None]
        worst = max(lp) if lp else None
        out.append({"items": what, "n": len(g),
                    "same answer": int((g["chosen_clean"].astype("Int64") == g["chosen_refill"].astype("Int64"))
                                       .fillna(False).sum()),
                    "clean answered": int(g["chosen_clean"].notna().sum()),
                    "log-probs agree to 1e-4": worst is not None and bool(worst < 1e-4),
                    "max |log-prob difference| below": "n/a" if worst is None else _magnitude(worst)})
    return pd.DataFrame(out)


def _magnitude(x: float) -> str:
    """The power of ten just above `x` ("1e-06" for 8e-07): float noise shown as its size, so the
    table reads the same on machines whose last bits differ."""
    return "0" if x == 0 else f"{10.0 ** np.ceil(np.log10(x)):.0e}"


def _follow(ref: pd.DataFrame, cond: pd.DataFrame) -> dict:
    """Share of answers that follow the planted word under the edit, against the share that chose
    the same (wrong) option in the reference, on the same items (McNemar)."""
    both = ref[["item", "chosen"]].merge(cond[["item", "chosen", "planted"]], on="item", suffixes=("_ref", "_cond"))
    pl = both["planted"].to_numpy()
    a = (both["chosen_cond"].to_numpy() == pl)
    b = (both["chosen_ref"].to_numpy() == pl)
    n, k = len(both), int(a.sum())
    lo, hi = wilson(k, n)
    d, dlo, dhi = paired_difference(a, b)
    return dict(follow=k / n if n else np.nan, follow_low=lo, follow_high=hi,
                follow_ref=float(b.mean()) if n else np.nan, follow_diff=d, follow_diff_low=dlo,
                follow_diff_high=dhi, p_follow=mcnemar_paired(a, b)["p_value"] if n else np.nan)


def text_effects(rows: pd.DataFrame, model: str = "capimagine", ref: str = REFERENCE, seed: int = 0) -> pd.DataFrame:
    """Every text condition against the refilled reference on the items where it applied:
    `effects.paired` (accuracy change with Newcombe's interval and McNemar, flip rate, margin change
    with a bootstrap interval and Wilcoxon) plus, for the rewrites, the share of answers that
    follow the planted word."""
    ok = applied(rows)
    base = ok[ok["condition"] == ref]
    out = []
    for c in [key(n) for n in CONDITIONS if key(n) != ref]:
        cond = ok[ok["condition"] == c]
        if cond.empty:
            continue
        row = dict(model=model, condition=c, **paired(base, cond, seed))
        if cond["planted"].notna().any():
            row.update(_follow(base, cond))
        out.append(row)
    return pd.DataFrame(out)


def comparison(text_table: pd.DataFrame, latent_table: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """The chapter's family: capimagine's text conditions (against the refill) and the matched
    latent conditions of every latent model (against its clean run). Holm over the family: all
    McNemar tests (accuracy, and following the planted word) together, the Wilcoxon tests apart."""
    lat = {c for _, _, c in MATCHES if c}
    lt = latent_table[latent_table["condition"].isin([f"{c}/{LATENT_FORM}" for c in lat])]
    table = pd.concat([text_table, lt], ignore_index=True)
    table["edit"] = [edit_class(c) for c in table["condition"]]
    pm = list(table["p_mcnemar"])
    pf = list(table["p_follow"]) if "p_follow" in table else [np.nan] * len(table)
    fam = [p for p in pm] + [p for p in pf if pd.notna(p)]
    adj, _ = holm(fam, alpha)
    table["p_mcnemar_holm"] = adj[:len(pm)]
    it = iter(adj[len(pm):])
    table["p_follow_holm"] = [next(it) if pd.notna(p) else np.nan for p in pf]
    table["p_wilcoxon_holm"], _ = holm(table["p_wilcoxon"].fillna(1.0), alpha)
    return table


def edit_class(condition: str) -> str | None:
    """The edit class of a text or latent condition (`MATCHES`), None for the others."""
    name, _, form = condition.partition("/")
    for what, text, lat in MATCHES:
        if (form == FORM and name == text) or (form == LATENT_FORM and name == lat):
            return what
    return None


def side_by_side(table: pd.DataFrame, value: str = "diff") -> pd.DataFrame:
    """Models (with their kind) by edit class: `value` with its interval ("diff": accuracy change,
    "flip_rate", "margin_change"), Holm-corrected McNemar p in brackets."""
    from .report import ci, kind, p

    bounds = {"diff": ("diff_low", "diff_high", True), "flip_rate": ("flip_low", "flip_high", False),
              "margin_change": ("margin_low", "margin_high", True)}[value]
    t = table[table["edit"].notna()].copy()
    t["kind"] = t["model"].map(kind)
    t["cell"] = [f"{ci(x, lo, hi, signed=bounds[2])} (p {p(q)})" for x, lo, hi, q in
                 zip(t[value], t[bounds[0]], t[bounds[1]], t["p_mcnemar_holm"])]
    kinds = ["text imagination", "latent, bypass open", "latent, bypass closed", "control"]
    t["rank"] = [kinds.index(k) if k in kinds else len(kinds) for k in t["kind"]]
    order = [w for w, _, _ in MATCHES if w in set(t["edit"])]
    wide = t.pivot_table(index=["rank", "kind", "model"], columns="edit", values="cell", aggfunc="first")
    return wide.reindex(columns=order).fillna("n/a").droplevel("rank")


def contrasts(text_rows: pd.DataFrame, latent: pd.DataFrame, models: list[str], model: str = "capimagine",
              seed: int = 0) -> pd.DataFrame:
    """For each matched edit class: capimagine's accuracy change minus a latent model's, on the same
    items (difference in differences, 95% bootstrap interval over items)."""
    def change(rows, m, ref, cond):
        g = applied(rows[rows["model"] == m]) if "model" in rows else applied(rows)
        a = g[g["condition"] == ref].set_index("item")["correct"].astype(float)
        b = g[g["condition"] == cond].set_index("item")["correct"].astype(float)
        return (b - a).dropna()

    out = []
    for what, text, lat in MATCHES:
        if not text or not lat:
            continue
        tc = change(text_rows.assign(model=model), model, REFERENCE, key(text))
        for m in models:
            lc = change(latent, m, "clean", f"{lat}/{LATENT_FORM}")
            d = pd.concat([tc, lc], axis=1, keys=["t", "l"], join="inner")
            if d.empty:
                continue
            x, lo, hi = mean_ci((d["t"] - d["l"]).to_numpy(), seed)
            out.append(dict(edit=what, model=m, n=len(d), text_change=float(d["t"].mean()),
                            latent_change=float(d["l"].mean()), contrast=x, contrast_low=lo, contrast_high=hi))
    return pd.DataFrame(out)


def effects_table(table: pd.DataFrame) -> pd.DataFrame:
    """The chapter's effects table (report.effects_table) with the follow-the-planted-word columns."""
    from .report import ci, p
    from .report import effects_table as base

    out = base(table)
    out.insert(3, "edit", table["edit"].fillna("").to_numpy())
    if "follow" in table:
        out["follows planted word [95% CI] (reference)"] = [
            "" if pd.isna(f) else f"{ci(f, lo, hi)} ({r:.3f})"
            for f, lo, hi, r in zip(table["follow"], table["follow_low"], table["follow_high"], table["follow_ref"])]
        out["follow McNemar p (Holm)"] = ["" if pd.isna(x) else p(x) for x in table["p_follow_holm"]]
    return out


def summary_text(table: pd.DataFrame, spans: pd.DataFrame, model: str = "capimagine") -> str:
    """The chapter's findings, generated from the numbers."""
    from .report import ci, claim, kind, p

    lines = []
    allrow = spans[spans["family"] == "all"].iloc[0]
    lines.append(f"* **What {model} imagines.** Of {int(allrow['n'])} generated spans, "
                 f"{int(allrow['span holds the answer word'])} state the answer word, "
                 f"{int(allrow['another option' + chr(39) + 's word'])} another option's word and "
                 f"{int(allrow['no option word'])} no option word; the rewrite of the generated span applies to those "
                 f"{int(allrow['rewrite applied'])} items ({int(allrow['as CorruptWord'])} as `CorruptWord`); the "
                 f"others are counted, not dropped, and the rewrite of the ground-truth caption covers all "
                 f"{int(allrow['caption_rewrite applied'])}.")
    t = table.set_index(["model", "condition"])
    follows = {}
    for cond in (key("rewrite"), key("caption_rewrite")):
        if (model, cond) in t.index:
            r = t.loc[(model, cond)]
            follows[cond] = bool(r["p_follow_holm"] < ALPHA and r["follow_diff_low"] > 0)
            verdict = "the answer follows the text" if follows[cond] else "no detectable pull of the planted word"
            lines.append(f"* **{cond.split('/')[0]}** ({model}): {claim(r)}; answers that follow the planted word "
                         f"{ci(r['follow'], r['follow_low'], r['follow_high'])} against {r['follow_ref']:.3f} in the "
                         f"reference (McNemar p_holm {p(r['p_follow_holm'])}); the right option's margin "
                         f"{ci(r['margin_change'], r['margin_low'], r['margin_high'], signed=True)} (Wilcoxon p_holm "
                         f"{p(r['p_wilcoxon_holm'])}): {verdict}.")
    if key("rewrite") in follows:
        r = t.loc[(model, key("rewrite"))]
        if follows[key("rewrite")]:
            verdict = "reproduced on the testbed (the answers follow the planted word)"
        elif r["follow_high"] < 0.5:  # fewer than half the answers follow it, with 95% confidence
            verdict = (f"not reproduced on the testbed: the answers follow the planted word on at most "
                       f"{r['follow_high']:.3f} of the items (95% upper bound, n = {int(r['n'])})")
        else:
            verdict = f"inconclusive at this sample size (n = {int(r['n'])})"
        lines.insert(0, f"* **The paper's test** (rewriting the imagined text to a wrong conclusion changes the "
                        f"answer): {verdict}.")
    for what, text, lat in MATCHES:
        if not text or not lat:
            continue
        parts = []
        sub = table[table["edit"] == what]
        for _, r in sub.iterrows():
            moved = "changes the answer" if r["p_mcnemar_holm"] < ALPHA else "no detectable change"
            change = ci(r["diff"], r["diff_low"], r["diff_high"], signed=True)
            parts.append(f"{r['model']} ({kind(r['model'])}) {change}, {moved}")
        if parts:
            lines.append(f"* **{what}** (accuracy change [95% CI]): " + "; ".join(parts) + ".")
    return "\n".join(lines)


def by_family(rows: pd.DataFrame, conditions=("rewrite", "caption_rewrite", "swap"), model: str = "capimagine",
              seed: int = 0) -> pd.DataFrame:
    """`text_effects` of some conditions per task family (uncorrected: a breakdown, not a test family)."""
    out = []
    for fam, g in rows.groupby("family", sort=False):
        t = text_effects(g, model, seed=seed)
        t = t[t["condition"].isin([key(c) for c in conditions])]
        out.append(t.assign(family=fam))
    t = pd.concat(out, ignore_index=True) if out else pd.DataFrame()
    if t.empty:
        return t
    cols = ["family", "condition", "n", "acc_clean", "acc", "diff", "flip_rate"]
    cols += [c for c in ("follow", "follow_ref") if c in t]
    return t[cols].rename(columns={"acc_clean": "accuracy (refill)", "acc": "accuracy (edited)",
                                   "diff": "change", "flip_rate": "flip rate", "follow": "follows planted word",
                                   "follow_ref": "chose that option anyway (refill)"})


def examples(rows: pd.DataFrame, items: list, per_family: int = 1) -> pd.DataFrame:
    """The first items of each family: ground-truth caption, the span the model wrote, what it
    states, the planted word, the span after the rewrite and the answers before and after."""
    by = {it.id: it for it in items}
    r = rows.set_index(["item", "condition"])
    out = []
    seen: dict[str, int] = {}
    for it in items:
        if seen.get(it.family, 0) >= per_family or (it.id, "clean") not in r.index:
            continue
        seen[it.family] = seen.get(it.family, 0) + 1
        c, ref, rw = r.loc[(it.id, "clean")], r.loc[(it.id, REFERENCE)], r.loc[(it.id, key("rewrite"))]
        cr = r.loc[(it.id, key("caption_rewrite"))]
        def word(x, opt=by[it.id].options):
            return "-" if x is None or pd.isna(x) else opt[int(x)]

        out.append({"item": it.id, "question": it.question, "ground-truth caption": it.caption,
                    "generated span": c["span"], "states": c["content"], "planted word": cr["planted_word"],
                    "span after the rewrite": rw["span"] if rw["applied"] else f"({rw['status']})",
                    "answer (refill)": word(ref["chosen"]), "answer (rewrite)": word(rw["chosen"]),
                    "answer (caption rewritten)": word(cr["chosen"]), "right answer": it.answer_word})
    return pd.DataFrame(out)


def agreement(rows: pd.DataFrame, items: list) -> pd.DataFrame:
    """Before any edit: on items whose generated span states exactly one option's word, how often
    the refilled run answers that option (the right one or not), with a Wilson interval. A model
    whose answer follows its own imagination agrees also where the imagination is wrong."""
    opts = {it.id: it.options for it in items}
    clean = rows[rows["condition"] == "clean"].set_index("item")
    ref = rows[rows["condition"] == REFERENCE].set_index("item")
    recs = []
    for i, c in clean.iterrows():
        said = [k for k, o in enumerate(opts[i]) if word_spans(c["span"] or "", o)]
        if len(said) == 1 and i in ref.index:
            recs.append(dict(states=c["content"], agrees=ref.loc[i, "chosen"] == said[0]))
    d = pd.DataFrame(recs, columns=["states", "agrees"])
    out = []
    for what, g in list(d.groupby("states", sort=False)) + [("either", d)]:
        k, n = int(g["agrees"].sum()), len(g)
        lo, hi = wilson(k, n)
        out.append({"span states": what, "n": n, "answer is the stated option": k,
                    "share": k / n if n else np.nan, "95% CI": f"[{lo:.3f}, {hi:.3f}]" if n else "n/a"})
    return pd.DataFrame(out)
