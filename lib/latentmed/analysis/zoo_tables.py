"""Chapter 2's tables about the zoo, generated from `zoo.recipes` and the evaluation records.

Nothing here is typed by hand: the training differences come from `recipes.settings` (the
same dict whose hash decides whether a model is retrained), the roles and comparison family
from each model's `LatentSpec`, so a model added to `zoo.METHODS` appears without editing the
chapter.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import stats

ROLE_ORDER = ("base", "direct", "text imagination", "latent", "positive control", "negative control")


def _recipes():
    from ..zoo import recipes  # the zoo imports analysis.stats: import it late, no cycle

    return recipes


def model_roles(methods=None) -> pd.DataFrame:
    """One row per model: its role and the segment its spec defines.

    Roles: base; direct (no segment); text imagination (a caption between markers); latent
    (fed-back hidden states); positive control (slots filled from outside with the evidence's
    tower tokens); negative control (slots filled with a constant). `image_after_segment` says
    whether positions after the segment may attend to the image (the bypass around the slots).
    """
    r = _recipes()
    rows = []
    for name in methods or r.METHODS:
        spec = r.SPECS[name]
        if name == r.BASE:
            role = "base"
        elif not spec.has_segments:
            role = "direct"
        elif spec.placement == "text":
            role = "text imagination"
        elif spec.latent_source == "constant":
            role = "negative control"
        elif spec.latent_source != "hidden":  # the slots are filled from outside with the evidence
            role = "positive control"
        else:
            role = "latent"
        seg = spec.has_segments
        rows.append(dict(model=name, role=role,
                         segment=("caption" if spec.placement == "text" else "latents") if seg else "none",
                         K=spec.n_latents if spec.has_latents else np.nan,
                         cap=(spec.max_latents or np.nan) if seg else np.nan,
                         end=spec.end_rule if seg else "",
                         slots_hold=spec.latent_source if spec.has_latents else "",
                         prompt_image=spec.prompt_image,
                         image_after_segment=(spec.after_segment != "segment") if seg else True))
    return pd.DataFrame(rows)


def _losses(plan: dict, segment: bool) -> str:
    """The losses of one stage as a short formula with their weights."""
    parts = []
    if plan["answer_weight"]:
        parts.append(f"{plan['answer_weight']:g} answer")
    if plan["segment_weight"] and segment:
        parts.append(f"{plan['segment_weight']:g} segment")
    if plan["attn_weight"]:
        parts.append(f"{plan['attn_weight']:g} attention->{plan['evidence_in']}")
    if plan["hop_weight"]:
        parts.append(f"{plan['hop_weight']:g} hop")
    if plan.get("ground_slots"):
        parts.append("slot attention->evidence")
    if plan["align"]:
        parts.append(f"{plan['align_weight']:g} {plan['align']}")
    return " + ".join(parts)


# optimiser fields that are bookkeeping, not training differences
_CFG_SKIP = ("name", "seed", "eval_every", "save_every")
_RENAME = {"batch_size": "batch", "n_latents": "latents", "latent_fill": "slots_filled_with",
           "with_crop": "crop_in_sequence", "evidence_in": "attention_onto"}


def training_differences(budget: str = "default", seed: int = 0, config=None, methods=None) -> pd.DataFrame:
    """Every training setting of every model, one row per (model, stage), from `recipes.settings`.

    Every field of each stage's optimiser config and plan is a column (a field added to the
    recipes appears without editing this), plus `losses` (the loss terms with their weights),
    `teacher` and `pool` (training items per family). `attrs["optimisation"]` names the optimiser
    columns. `differing` picks the columns that are not the same for every row;
    `constant_settings` lists the rest.
    """
    from ..testbed.items import TestbedConfig

    r = _recipes()
    config = config or TestbedConfig()
    rows, opt_cols = [], {"steps", "teacher", "pool"}
    for name in methods or r.METHODS:
        s = r.settings(name, budget, seed, config, base_hash="base")
        spec = r.SPECS[name]
        if name == r.BASE:
            rows.append(dict(model=name, stage="vision", steps=s["vision_steps"], losses="per-cell labels (dense)"))
        for st in s["stages"]:
            plan, cfg = st["plan"], st["cfg"]
            row = dict(model=name, stage=cfg["name"])
            for k, v in cfg.items():
                if k not in _CFG_SKIP:
                    row[_RENAME.get(k, k)] = v
                    opt_cols.add(_RENAME.get(k, k))
            row.update(teacher=st["teacher"] or "", pool=s["pool"], val_per_family=s["val"])
            for k, v in plan.items():
                row[_RENAME.get(k, k)] = "" if v is None else v
            if not plan.get("n_latents"):
                row["slots_filled_with"] = ""
            row["losses"] = _losses(plan, spec.has_segments or plan["with_crop"])
            rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["optimisation"] = [c for c in out.columns if c in opt_cols]
    return out


def _cell(v) -> str:
    """A table cell for reading: blank for a missing value, whole numbers without decimals."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1:
        return str(int(v))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def readable(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with every cell as text for reading (`_cell`)."""
    return df.astype(object).map(_cell)


def training_table(diffs: pd.DataFrame, drop=("answer_weight", "segment_weight", "attn_weight", "hop_weight",
                                              "attention_onto", "align", "align_weight")) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`training_differences` for reading, as two tables indexed by (model, stage): the
    optimisation settings, and what each stage feeds the model and supervises (the loss weights
    are in `losses`). Only settings that differ between stages; blanks where a stage has none."""
    shared = constant_settings(diffs)
    table = differing(diffs.drop(columns=[c for c in [*shared, *drop] if c in diffs.columns]))
    opt_names = set(diffs.attrs.get("optimisation", ()))
    out = readable(table).set_index(["model", "stage"])
    opt = [c for c in out.columns if c in opt_names]
    seq = [c for c in out.columns if c not in opt_names and c != "losses"] + (["losses"] if "losses" in out.columns else [])
    names = lambda df: df.rename(columns=lambda c: c.replace("_", " "))  # noqa: E731
    return names(out[opt]), names(out[seq])


def differing(df: pd.DataFrame, keep=("model", "stage")) -> pd.DataFrame:
    """The columns of `df` whose values are not all the same (plus `keep`)."""
    cols = [c for c in df.columns if c in keep or df[c].astype(str).nunique(dropna=False) > 1]
    return df[cols]


def constant_settings(df: pd.DataFrame, skip=("model", "stage")) -> dict:
    """The columns of `df` that hold one value in every row that has a value, with that value."""
    out = {}
    for c in df.columns:
        if c in skip:
            continue
        vals = df[c].dropna()
        if len(vals) and vals.astype(str).nunique() == 1:
            out[c] = vals.iloc[0]
    return out


def comparison_pairs(roles: pd.DataFrame, present=None) -> list[tuple[str, str, str]]:
    """The comparison family of chapter 2, from the models' roles: (model_a, model_b, question).

    Every latent model (bypass open or closed, said in the question) against direct and against
    the negative control (its comparator: a segment of the same shape without content); the text-imagination model against every
    latent model and against direct; the negative control against direct (what a content-free
    segment costs); the positive control against the negative control (do informative slots
    help). `present` restricts to models with records.
    """
    present = set(present) if present is not None else set(roles["model"])
    by = {role: [m for m in roles.loc[roles["role"] == role, "model"] if m in present] for role in ROLE_ORDER}
    closed = set(roles.loc[~roles["image_after_segment"].astype(bool), "model"])
    kind = {m: "latent (bypass closed)" if m in closed else "latent" for m in by["latent"]}
    pairs = []
    for t in by["text imagination"]:
        pairs += [(t, m, f"text vs {kind[m]}") for m in by["latent"]]
        pairs += [(t, d, "text vs direct") for d in by["direct"]]
    for m in by["latent"]:
        pairs += [(m, d, f"{kind[m]} vs direct") for d in by["direct"]]
        pairs += [(m, n, f"{kind[m]} vs negative control") for n in by["negative control"]]
    for n in by["negative control"]:
        pairs += [(n, d, "segment cost") for d in by["direct"]]
    for p in by["positive control"]:
        pairs += [(p, n, "controls") for n in by["negative control"]]
    return pairs


def comparisons(records: pd.DataFrame, roles: pd.DataFrame) -> pd.DataFrame:
    """Paired comparisons of the family on the same items: difference with its 95% Newcombe
    interval, exact or chi-square McNemar p-value, Holm over the whole family."""
    pairs = comparison_pairs(roles, pd.unique(records["model"]))
    out = stats.paired_comparisons(records, [(a, b) for a, b, _ in pairs])
    if len(out):
        out.insert(2, "question", [q for _, _, q in pairs])
    return out


def accuracy_with_chance(records: pd.DataFrame, families, chance: float) -> pd.DataFrame:
    """Accuracy per model and family (+ "all") with Wilson intervals and Holm-corrected
    one-sided binomial tests against chance over every cell of the table."""
    per = stats.accuracy_table(records, by=("model", "family"), chance=chance)
    pooled = stats.accuracy_table(records.assign(family="all"), by=("model", "family"), chance=chance)
    table = pd.concat([per, pooled], ignore_index=True).drop(columns=["above_chance"])
    table = stats.chance_tests(table)
    order = {f: i for i, f in enumerate(list(families) + ["all"])}
    models = {m: i for i, m in enumerate(pd.unique(records["model"]))}
    return table.sort_values(by=["model", "family"], key=lambda s: s.map(models if s.name == "model" else order),
                             ignore_index=True)


def segment_behaviour(records: pd.DataFrame, families, roles: pd.DataFrame) -> pd.DataFrame:
    """Per protocol, model with a segment and family (+ "all"): natural trigger rate, how often
    the segment was opened, K (latents or caption tokens) mean/min/max and own-end rate."""
    seg_models = set(roles.loc[roles["segment"] != "none", "model"])
    recs = records[records["model"].isin(seg_models)]
    rows = []
    fams = list(families) + ["all"]
    for (proto, model), g in recs.groupby(["protocol", "model"], sort=False):
        for fam in fams:
            sub = g if fam == "all" else g[g["family"] == fam]
            if not len(sub):
                continue
            opened = sub[sub["opened"].astype(bool)]
            rows.append(dict(protocol=proto, model=model, family=fam, n=len(sub),
                             # no segment opened = not triggered (the record's trigger is empty then)
                             trigger_rate=float(sub["trigger"].astype(object).fillna(False).astype(float).mean()),
                             opened_rate=float(sub["opened"].astype(float).mean()),
                             k_mean=float(opened["k"].mean()) if len(opened) else np.nan,
                             k_min=float(opened["k"].min()) if len(opened) else np.nan,
                             k_max=float(opened["k"].max()) if len(opened) else np.nan,
                             own_end_rate=float(opened["ended"].astype(float).mean()) if len(opened) else np.nan))
    return pd.DataFrame(rows)


def protocol_agreement(forced: pd.DataFrame, free: pd.DataFrame) -> pd.DataFrame:
    """Forced against free running, per model on the same items: how often the chosen option is
    the same, both accuracies and their paired difference (free - forced) with its interval."""
    rows = []
    for model in pd.unique(forced["model"]):
        a = forced[forced["model"] == model].set_index("id")
        b = free[free["model"] == model].set_index("id")
        ids = a.index.intersection(b.index)
        if not len(ids):
            continue
        a, b = a.loc[ids], b.loc[ids]
        r = stats.mcnemar_paired(b["correct"].astype(bool), a["correct"].astype(bool))
        rows.append(dict(model=model, n=len(ids), same_answer=int((a["pred"] == b["pred"]).sum()),
                         acc_forced=r["acc_b"], acc_free=r["acc_a"], diff=r["diff"], diff_low=r["diff_low"],
                         diff_high=r["diff_high"], p_value=r["p_value"],
                         free_scored=int(b["scored"].astype(bool).sum()) if "scored" in b else len(ids)))
    out = pd.DataFrame(rows)
    if len(out):
        out["p_holm"], _ = stats.holm(out["p_value"])
    return out


def objects_effect(records: pd.DataFrame, n_objects: pd.Series) -> pd.DataFrame:
    """Does accuracy fall as scenes hold more objects? Per model, a logistic regression
    correct ~ objects + family (statsmodels GLM, binomial): the change in log-odds per extra
    object with its 95% interval and p-value, and the accuracy in the scenes with the fewest
    and the most objects (lower and upper third)."""
    import statsmodels.formula.api as smf
    from statsmodels.genmod.families import Binomial

    df = records.assign(objects=records["id"].map(n_objects), y=records["correct"].astype(float))
    lo_cut, hi_cut = np.quantile(df["objects"].drop_duplicates(), [1 / 3, 2 / 3]) if len(df) else (0, 0)
    rows = []
    for model, g in df.groupby("model", sort=False):
        row = dict(model=model, n=len(g))
        formula = "y ~ objects + C(family)" if g["family"].nunique() > 1 else "y ~ objects"
        try:
            fit = smf.glm(formula, data=g, family=Binomial()).fit()
            ci = fit.conf_int().loc["objects"]
            row.update(slope=float(fit.params["objects"]), slope_low=float(ci[0]), slope_high=float(ci[1]),
                       p_value=float(fit.pvalues["objects"]))
        except Exception:  # perfect separation or a constant outcome: no estimate
            row.update(slope=np.nan, slope_low=np.nan, slope_high=np.nan, p_value=np.nan)
        few, many = g[g["objects"] <= lo_cut], g[g["objects"] >= hi_cut]
        row.update(acc_few=float(few["y"].mean()) if len(few) else np.nan, n_few=len(few),
                   acc_many=float(many["y"].mean()) if len(many) else np.nan, n_many=len(many))
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out["p_holm"], _ = stats.holm(out["p_value"].fillna(1.0))
    out.attrs["few_max"], out.attrs["many_min"] = float(lo_cut), float(hi_cut)
    return out


__all__ = ["ROLE_ORDER", "accuracy_with_chance", "comparison_pairs", "comparisons", "constant_settings", "differing", "readable", "training_table",
           "model_roles", "objects_effect", "protocol_agreement", "segment_behaviour", "training_differences"]
