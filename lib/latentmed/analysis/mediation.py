"""Mediation (chapter 6): how much of the input's effect on the answer flows through the latents.

Estimands, fixed before any result (for one model, a counterfactual input X' of item X, and the
outcome Y: whether the answer is X's right option, or the log-prob margin of X's right option):

    total effect      TE  = Y(X', Z(X'))  - Y(X, Z(X))
    natural direct    NDE = Y(X', Z(X))   - Y(X, Z(X))     the input changes, the latents do not
    natural indirect  NIE = Y(X,  Z(X'))  - Y(X, Z(X))     the latents change, the input does not
    proportion mediated   PM = NIE / TE   (of the means; undefined when TE's interval holds 0)

Z(X) are the latents of the clean run; Z(X') those of the run on the perturbed input. The mixed
runs feed one run's latents into the other's prompt (`SwapLatent` at every slot, decoded: the
answer is generated after them). Intervals are percentile bootstraps over items, resampling the
four runs of an item together. A second estimate comes from statsmodels' `Mediation`
(Imai-Keele-Tingley) on a scalar summary of Z: its projection on the direction from the mean
clean latent to the mean perturbed latent, with a logit outcome model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..engine import interventions as I
from ..store import ResultsStore
from . import conditions as C
from .measure import Condition, latents, measure
from .stats import ALPHA, holm
from .study import load_for_study, model_hash

PERTURBATIONS = ("mask_evidence", "other_image", "noise_96")
RUNS = ("x_zx", "xp_zxp", "x_zxp", "xp_zx")  # Y(X, Z(X)), Y(X', Z(X')), Y(X, Z(X')), Y(X', Z(X))


def _z(trace):
    seg = trace.segments[0] if trace.segments else None
    return None if seg is None or seg.z_in is None or not len(seg.z_in) else seg.z_in


def stored_latents(run, items: list[str], condition: str) -> list:
    """Z of `condition`'s stored rows (the fed latents kept with them), in the order of `items`
    (None where a run has no latents): the mixed runs read Z(X') from the X' run's own rows."""
    rows = [r for r in run.rows() if r["condition"] == condition]
    by_item = {r["item"]: ts.get("z_in") for r, ts in zip(rows, run.tensors_many(rows))}
    return [None if by_item.get(i) is None or not len(by_item[i]) else by_item[i] for i in items]


def perturbed_condition(perturb: Condition) -> Condition:
    """The run on X' itself, Y(X', Z(X')): its latents are kept for the mixed runs."""
    return Condition(f"{perturb.name}:xp_zxp", perturb.make)


def mixed_conditions(perturb: Condition, z_clean: list, z_pert: list) -> list[Condition]:
    """The two mixed runs of one perturbation, as conditions of `measure`: X with Z(X') and X'
    with Z(X) (`z_clean`, `z_pert`: each item's latents, None where it has none)."""
    def swap(z):
        return [I.SwapLatent(source=z.tolist())] if z is not None else []

    name = perturb.name
    return [Condition(f"{name}:x_zxp", lambda n: swap(z_pert[n])),
            Condition(f"{name}:xp_zx", lambda n: perturb.make(n) + swap(z_clean[n]))]


def run_mediation(root: str | Path, store_dir: str | Path, qs: list, models: list[str],
                  perturbations=PERTURBATIONS, seed: int = 0, device: str = "cpu", progress: bool = False,
                  chapter: int = 6, overrides: dict | None = None, suffix: str = "",
                  shared: dict | None = None) -> pd.DataFrame:
    """The four runs of every (model, item, perturbation), stored; returns their rows (`overrides`,
    `suffix` and `shared` as in `study.run_latent_study`). A model whose rows are all stored is not
    loaded."""
    store = ResultsStore(store_dir)
    base = {c.name: c for c in C.input_conditions(qs, seed)}
    frames = []
    for m in tqdm(models, desc="models", disable=not progress):
        folder = Path(root) / m
        run = store.run(m + suffix, model_hash(folder), dict(chapter=chapter, items=[q.id for q in qs], seed=seed,
                                                             perturbations=list(perturbations),
                                                             overrides=overrides or {}))
        keys = [(q.id, "clean") for q in qs] + [(q.id, f"{p}:{k}/generate") for p in perturbations for q in qs
                                                for k in ("xp_zxp", "x_zxp", "xp_zx")]
        borrow(store, run, [[(q.id, "clean") for q in qs] + [k for k in keys if k[1].startswith(f"{p}:")]
                            for p in perturbations])
        if run.missing(keys):
            x = load_for_study(folder, qs, device, overrides, shared)  # prompts built once for seven passes
            r, cfg, prompts = x.reasoner, x.config, x.prompts
            clean = measure(r, qs, [], run, cfg, prompts=prompts, clean=x.clean)
            z_clean = [_z(t) for t in clean]
            for p in perturbations:
                if run.missing([k for k in keys if k[1].startswith(f"{p}:")]):
                    measure(r, qs, [perturbed_condition(base[p])], run, cfg, clean=clean, keep=latents,
                            prompts=prompts)
                    z_pert = stored_latents(run, [q.id for q in qs], f"{p}:xp_zxp/generate")
                    measure(r, qs, mixed_conditions(base[p], z_clean, z_pert), run, cfg, clean=clean, keep=latents,
                            prompts=prompts)
        frames.append(run.frame())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def borrow(store: ResultsStore, run, groups: list[list[tuple]]) -> int:
    """Copy each group of keys (an item set's clean rows and one perturbation's three runs) that
    `run` lacks from another mediation run of the same model, checkpoint, items, seed and overrides
    that holds the whole group (chapter 10 measures the indirect effect of masking the evidence that
    chapter 6 measured on grounded-closed and the controls). Each perturbation is measured alone,
    in the same batches, so the rows are the ones `run` would compute. Returns the groups copied."""
    todo = [g for g in groups if run.missing(g)]
    if not todo:
        return 0
    same = ("items", "seed", "overrides")
    others = [o for o in store.runs() if o.key != run.key and o.meta["model"] == run.meta["model"]
              and o.meta["model_hash"] == run.meta["model_hash"] and "perturbations" in o.meta["params"]
              and all(o.meta["params"].get(f) == run.meta["params"].get(f) for f in same)]
    copied = 0
    for keys in todo:
        other = next((o for o in others if not o.missing(keys)), None)
        if other is not None:
            run.copy_from(other, keys)
            copied += 1
    return copied


def wide(rows: pd.DataFrame, perturbation: str, outcome: str = "correct") -> pd.DataFrame:
    """One row per (model, item) with the outcome of the four runs of `perturbation`."""
    keys = {"clean": "x_zx", f"{perturbation}:xp_zxp/generate": "xp_zxp", f"{perturbation}:x_zxp/generate": "x_zxp",
            f"{perturbation}:xp_zx/generate": "xp_zx"}
    sub = rows[rows["condition"].isin(keys)].assign(run=lambda d: d["condition"].map(keys))
    w = sub.pivot_table(index=["model", "item"], columns="run", values=outcome, aggfunc="first")
    return w.dropna().astype(float)


def _effects(means: np.ndarray) -> np.ndarray:
    """[..., 4] means of the four runs (RUNS order) -> [..., 4] TE, NDE, NIE, PM."""
    te, nde, nie = means[..., 1] - means[..., 0], means[..., 3] - means[..., 0], means[..., 2] - means[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        pm = np.where(np.abs(te) > 1e-12, nie / te, np.nan)
    return np.stack([te, nde, nie, pm], -1)


def estimates(rows: pd.DataFrame, perturbation: str, outcome: str = "correct", seed: int = 0,
              n_boot: int = 2000, alpha: float = ALPHA) -> pd.DataFrame:
    """TE, NDE, NIE and PM per model with 95% percentile bootstrap intervals over items (the four
    runs of an item resampled together; one set of resamples for all four estimates)."""
    out = []
    w = wide(rows, perturbation, outcome)
    rng = np.random.default_rng(seed)
    for m, g in w.groupby(level="model", sort=False):
        y = g[list(RUNS)].to_numpy()
        est = _effects(y.mean(0))
        boots = _effects(y[rng.integers(0, len(y), size=(n_boot, len(y)))].mean(1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # PM is undefined (nan) in resamples without TE
            lo, hi = np.nanquantile(boots, [alpha / 2, 1 - alpha / 2], axis=0)
        row = dict(model=m, perturbation=perturbation, outcome=outcome, n=len(y))
        for j, name in enumerate(("te", "nde", "nie", "pm")):
            row.update({name: float(est[j]), f"{name}_low": float(lo[j]), f"{name}_high": float(hi[j])})
        if not (row["te_low"] > 0 or row["te_high"] < 0):
            row.update(pm=np.nan, pm_low=np.nan, pm_high=np.nan)  # no total effect to apportion
        row["p_nie"] = _sign_test(y[:, 2] - y[:, 0])
        out.append(row)
    return pd.DataFrame(out)


def _sign_test(d: np.ndarray) -> float:
    """Two-sided test that the per-item indirect differences are centred on zero: an exact
    binomial (sign) test on the items where they are not zero (McNemar's test for a 0/1 outcome)."""
    from scipy.stats import binomtest

    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    return 1.0 if pos + neg == 0 else float(binomtest(pos, pos + neg, 0.5).pvalue)


def correct_family(table: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """Holm over every row of the table (the chapter's family) for the indirect effect's test."""
    table = table.copy()
    if len(table):
        table["p_nie_holm"], table["nie_reject"] = holm(table["p_nie"].to_numpy(), alpha)
    return table


def statsmodels_estimate(rows: pd.DataFrame, tensors: dict, perturbation: str, model: str, seed: int = 0,
                         sims: int = 200) -> dict:
    """ACME and ADE from statsmodels' Mediation on a scalar summary of Z (its projection on the
    direction from the mean clean latent to the mean perturbed latent), logit outcome model."""
    import statsmodels.api as sm
    from statsmodels.stats.mediation import Mediation

    data = []
    for cond, treat in (("clean", 0), (f"{perturbation}:xp_zxp/generate", 1)):
        g = rows[(rows["model"] == model) & (rows["condition"] == cond)]
        for item, correct in zip(g["item"], g["correct"]):
            z = tensors.get((model, item, cond))
            if z is not None:
                data.append(dict(item=item, treat=treat, correct=int(bool(correct)), z=z.float().mean(0).numpy()))
    if len(data) < 10:
        return dict(model=model, perturbation=perturbation, acme=np.nan, acme_low=np.nan, acme_high=np.nan,
                    ade=np.nan, ade_low=np.nan, ade_high=np.nan, note="too few runs with latents")
    df = pd.DataFrame(data)
    d = np.stack(df[df.treat == 1]["z"]).mean(0) - np.stack(df[df.treat == 0]["z"]).mean(0)
    norm = np.linalg.norm(d)
    df["m"] = np.stack(df["z"]) @ (d / norm) if norm > 0 else 0.0
    df["m"] = (df["m"] - df["m"].mean()) / (df["m"].std() or 1.0)
    if df["correct"].nunique() < 2 or df["m"].std() == 0:
        return dict(model=model, perturbation=perturbation, acme=np.nan, acme_low=np.nan, acme_high=np.nan,
                    ade=np.nan, ade_low=np.nan, ade_high=np.nan, note="no variation to model")
    # the design matrices of "correct ~ treat + m" and "m ~ treat" given as arrays: with formula
    # models statsmodels rebuilds them with patsy in every simulation (16x slower, same fit to 1e-12)
    X = np.asfortranarray(np.column_stack([np.ones(len(df)), df["treat"].to_numpy(float), df["m"].to_numpy(float)]))
    outcome = sm.GLM(df["correct"].to_numpy(float), X, family=sm.families.Binomial())
    mediator = sm.OLS(df["m"].to_numpy(float), np.asfortranarray(X[:, :2]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = Mediation(outcome, mediator, (1, 1), 2).fit(method="parametric", n_rep=sims, rng=seed).summary()
    acme, ade = res.loc["ACME (average)"], res.loc["ADE (average)"]
    return dict(model=model, perturbation=perturbation, acme=acme["Estimate"], acme_low=acme["Lower CI bound"],
                acme_high=acme["Upper CI bound"], ade=ade["Estimate"], ade_low=ade["Lower CI bound"],
                ade_high=ade["Upper CI bound"], note="")


def decomposition(effects_table: pd.DataFrame, model: str) -> dict:
    """Which part of the segment carries an effect (from chapter 4's rows): slot contents (swap,
    markers kept, K kept), the boundary markers (markers only vs the segment dropped) and the
    segment's length (K halved or doubled)."""
    t = effects_table[effects_table["model"] == model].set_index("condition")

    def get(c):
        return t.loc[c, "diff"] if c in t.index else np.nan

    return dict(model=model, contents=get("swap/generate"), markers_only=get("markers/generate"),
                drop=get("drop/generate"), markers=get("drop/generate") - get("markers/generate"),
                length_half=get("k_half/generate"), length_double=get("k_double/generate"))




def agree(sm: dict, patch) -> bool | None:
    """Do the two estimates agree: both intervals exclude zero with the same sign, or both hold it?"""
    if sm.get("acme") is None or np.isnan(sm.get("acme", np.nan)):
        return None
    a = 0 if sm["acme_low"] <= 0 <= sm["acme_high"] else np.sign(sm["acme"])
    b = 0 if patch["nie_low"] <= 0 <= patch["nie_high"] else np.sign(patch["nie"])
    return bool(a == b)


def summary_text(table: pd.DataFrame, perturbation: str = "mask_evidence") -> str:
    """One line per model: the indirect and direct effects of masking the evidence on accuracy."""
    from ..zoo.recipes import KINDS
    from .report import ci, p

    lines = []
    t = table[(table["perturbation"] == perturbation) & (table["outcome"] == "correct")]
    for r in t.itertuples(index=False):
        pm = "" if np.isnan(r.pm) else f", proportion mediated {ci(r.pm, r.pm_low, r.pm_high)}"
        lines.append(f"* **{r.model}** ({KINDS.get(r.model, 'other')}): masking the evidence changes accuracy by "
                     f"{ci(r.te, r.te_low, r.te_high, signed=True)} in total; through the latents "
                     f"{ci(r.nie, r.nie_low, r.nie_high, signed=True)} (sign test p_holm {p(r.p_nie_holm)}), around "
                     f"them {ci(r.nde, r.nde_low, r.nde_high, signed=True)}{pm} (n = {r.n}).")
    return "\n".join(lines)
