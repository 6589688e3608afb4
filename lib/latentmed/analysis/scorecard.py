"""The scorecard: every claim of the paper, what this build measured, the test, the effect with its
interval and n, and the verdict, generated from the results store and the zoo's evaluation.

Verdict rules are fixed here, before any result, one per claim (`RULES`); each claim is judged
per kind of model (bypass open, bypass closed, controls, text imagination). A verdict reads:
"reproduced" (the measurement agrees with the paper's claim on the testbed), "not reproduced"
(it contradicts it), "inconclusive" (the interval straddles the rule's threshold) or "not testable
here" (this build has no measurement for it). Nothing on the page is typed: every number comes
from a row of the table `card()` returns.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..zoo.recipes import KINDS
from . import similarity as S
from .stats import bootstrap_interval, paired_difference

INPUT_RATIO = 0.25  # latents move less than this share of the evidence tokens' movement: "hardly depend"
COLLAPSE = 0.9  # inter-instance cosine of the latents at the last step at or above this: "highly similar"
MARGIN = 0.05  # an accuracy change inside +-MARGIN: "hardly changes the answer"
SELECTIVITY = 0.1  # probe selectivity below this: "little probe-able information"
N_BOOT = 2000

CLAIMS = {
    "input": "Latents hardly depend on the input",
    "collapse": "Latents of different instances are highly similar (they collapse over the steps)",
    "intervene": "Interventions on the latents hardly change the answer",
    "probe": "Latents carry little probe-able visual information",
    "text": "Text imagination mediates the answer",
    "capimagine": "CapImagine beats the latent methods",
}
RULES = {
    "input": (f"ratio of the latents' movement to the evidence image tokens' movement (1 - cosine) when "
              f"the whole instance is replaced; reproduced when its 95% interval lies below {INPUT_RATIO}, "
              f"not reproduced when it lies above"),
    "collapse": (f"inter-instance cosine of the latents at their last step; reproduced when its 95% interval "
                 f"lies at or above {COLLAPSE}, not reproduced when below"),
    "intervene": (f"accuracy change when another item's latents are fed (generate form); reproduced when its "
                  f"95% interval lies inside +-{MARGIN}, not reproduced when it lies below -{MARGIN}"),
    "probe": (f"selectivity (accuracy minus control-task accuracy) of linear probes on the latents' mean over "
              f"steps, averaged over the facts only the image holds (chapter 5); reproduced when its 95% "
              f"interval lies below {SELECTIVITY}, not reproduced when above"),
    "text": (f"accuracy change when the imagined caption is rewritten to a wrong option; reproduced when its "
             f"95% interval lies below -{MARGIN}, not reproduced when inside +-{MARGIN}"),
    "capimagine": ("CapImagine's accuracy minus each latent model's on the same test items (Newcombe); "
                   "reproduced when every interval lies above 0, not reproduced when one lies below 0"),
}
GROUPS = ("latent, bypass open", "latent, bypass closed", "control", "text imagination")


def _verdict(lo: float, hi: float, below: float | None = None, above: float | None = None,
             inside: tuple[float, float] | None = None, outside_low: float | None = None,
             flip: bool = False) -> str:
    """Reproduced / not reproduced / inconclusive from an interval and the claim's rule; `flip` for a
    claim that an effect exists (its interval inside the margin contradicts it)."""
    if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in (lo, hi)):
        return "not testable here"
    if inside is not None:
        v = ("reproduced" if inside[0] <= lo and hi <= inside[1]
             else "not reproduced" if outside_low is not None and hi < outside_low else "inconclusive")
    elif below is not None:
        v = "reproduced" if hi < below else "not reproduced" if lo > below else "inconclusive"
    else:
        v = "reproduced" if lo >= above else "not reproduced" if hi < above else "inconclusive"
    if flip and v != "inconclusive":
        v = "not reproduced" if v == "reproduced" else "reproduced"
    return v


def _row(claim: str, model: str, measured: str, test: str, x: float, lo: float, hi: float, n: int, verdict: str) -> dict:
    return dict(claim=claim, kind=KINDS.get(model, "other"), model=model, measured=measured, test=test,
                effect=x, low=lo, high=hi, n=n, verdict=verdict)


def input_rows(rows3: pd.DataFrame, vec: dict, z: dict, items: list[str], seed: int = 0) -> list[dict]:
    """Chapter 3: per model, the latents' over the image tokens' movement under another instance."""
    out = []
    for m in pd.unique(rows3["model"]):
        dz, di = [], []
        for i in items:
            a, b = z.get((m, i, "clean")), z.get((m, i, "other_item/generate"))
            ia, ib = vec["image"].get((m, i, "clean")), vec["image"].get((m, i, "other_item/generate"))
            if a is None or b is None or ia is None or ib is None:
                continue
            k = min(len(a), len(b))
            dz.append(float(np.mean([S.distance(a[j:j + 1].double().numpy(), b[j:j + 1].double().numpy())
                                     for j in range(k)])))
            di.append(S.distance(ia[None].double().numpy(), ib[None].double().numpy()))
        if len(dz) < 2:
            continue
        x, lo, hi = bootstrap_interval((np.array(dz), np.array(di)), lambda a, b: a.mean() / max(b.mean(), 1e-12),
                                       n_boot=N_BOOT, seed=seed)
        out.append(_row("input", m, "latent movement / image-token movement, another instance",
                        "percentile bootstrap over items", x, lo, hi, len(dz), _verdict(lo, hi, below=INPUT_RATIO)))
    return out


def collapse_rows(z: dict, models: list[str], items: list[str], seed: int = 0) -> list[dict]:
    """Chapter 3: per model, inter-instance cosine of the latents at their last common step."""
    out = []
    rng = np.random.default_rng(seed)
    for m in models:
        Z, M = S.stack([z.get((m, i, "clean")) for i in items])
        if not M.any():
            continue
        k = int(np.flatnonzero(M.sum(0) >= 2).max()) if (M.sum(0) >= 2).any() else None
        if k is None:
            continue
        keep = np.flatnonzero(M[:, k])
        x = float(S.inter(Z[keep][:, k:k + 1], M[keep][:, k:k + 1])[0])
        boots = [S.inter(Z[b][:, k:k + 1], M[b][:, k:k + 1])[0]
                 for b in (rng.choice(keep, len(keep)) for _ in range(500))]
        lo, hi = np.nanquantile(boots, [0.025, 0.975])
        out.append(_row("collapse", m, f"inter-instance cosine at latent step {k + 1}",
                        "percentile bootstrap over instances", x, float(lo), float(hi), len(keep),
                        _verdict(float(lo), float(hi), above=COLLAPSE)))
    return out


def intervene_rows(effects4: pd.DataFrame) -> list[dict]:
    """Chapter 4: per model, the accuracy change when another item's latents are fed."""
    out = []
    for r in effects4[effects4["condition"] == "swap/generate"].itertuples(index=False):
        out.append(_row("intervene", r.model, "accuracy change, another item's latents", "Newcombe interval; McNemar",
                        r.diff, r.diff_low, r.diff_high, int(r.n),
                        _verdict(r.diff_low, r.diff_high, inside=(-MARGIN, MARGIN), outside_low=-MARGIN)))
    return out


def capimagine_rows(records: pd.DataFrame, latent_models: list[str], reference: str = "capimagine") -> list[dict]:
    """Chapter 2: CapImagine's accuracy minus each latent model's, paired on the test items."""
    w = records.pivot_table(index="id", columns="model", values="correct", aggfunc="first")
    out = []
    if reference not in w.columns:
        return out
    for m in latent_models:
        if m not in w.columns:
            continue
        both = w[[reference, m]].dropna().astype(bool)
        d, lo, hi = paired_difference(both[reference].to_numpy(), both[m].to_numpy())
        v = "reproduced" if lo > 0 else "not reproduced" if hi < 0 else "inconclusive"
        out.append(_row("capimagine", m, f"capimagine minus {m}, accuracy", "Newcombe paired interval",
                        d, lo, hi, len(both), v))
    return out


def from_table(claim: str, table: pd.DataFrame, effect: str, low: str, high: str, n: str, measured: str,
               test: str, **rule) -> list[dict]:
    """Rows of a claim from another chapter's per-model table (columns: model and the given ones)."""
    return [_row(claim, r["model"], measured, test, r[effect], r[low], r[high], int(r[n]),
                 _verdict(r[low], r[high], **rule)) for _, r in table.iterrows()]


def card(rows: list[dict]) -> pd.DataFrame:
    """The per-model rows of every claim as one table."""
    return pd.DataFrame(rows, columns=["claim", "kind", "model", "measured", "test", "effect", "low", "high", "n",
                                       "verdict"])


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One line per claim and kind: how many of its models reproduce the claim."""
    out = []
    for claim, text in CLAIMS.items():
        sub = df[df["claim"] == claim]
        for kind in GROUPS:
            g = sub[sub["kind"] == kind]
            if g.empty:
                continue
            counts = g["verdict"].value_counts()
            if counts.get("reproduced", 0) == len(g):
                v = "reproduced"
            elif counts.get("not reproduced", 0) == len(g):
                v = "not reproduced"
            elif (g["verdict"] == "not testable here").all():
                v = "not testable here"
            elif counts.get("inconclusive", 0) == len(g):
                v = "inconclusive"
            else:
                v = "mixed"
            out.append(dict(claim=text, kind=kind, models=len(g), reproduced=int(counts.get("reproduced", 0)),
                            not_reproduced=int(counts.get("not reproduced", 0)),
                            inconclusive=int(counts.get("inconclusive", 0)), verdict=v))
        if sub.empty:
            out.append(dict(claim=text, kind="-", models=0, reproduced=0, not_reproduced=0, inconclusive=0,
                            verdict="not testable here"))
    return pd.DataFrame(out)


def render(df: pd.DataFrame) -> pd.DataFrame:
    """The per-model table as the page shows it (every number formatted from `df`)."""
    from .report import ci

    out = df[["claim", "kind", "model", "measured", "test", "n", "verdict"]].copy()
    out.insert(5, "effect [95% CI]", [ci(x, lo, hi, signed=c in ("intervene", "text", "capimagine"))
                                      for c, x, lo, hi in zip(df["claim"], df["effect"], df["low"], df["high"])])
    out["claim"] = out["claim"].map(CLAIMS)
    return out


THRESHOLDS = {"input": (INPUT_RATIO,), "collapse": (COLLAPSE,), "intervene": (-MARGIN, MARGIN),
              "probe": (SELECTIVITY,), "text": (-MARGIN, MARGIN), "capimagine": ()}


def chart(df: pd.DataFrame):
    """One panel per claim: each model's effect with its 95% interval, coloured by verdict, with the
    rule's thresholds as dashed lines (the grey line is zero)."""
    import altair as alt

    from .plots import interval_chart

    panels = []
    for claim in CLAIMS:
        sub = df[df["claim"] == claim].assign(row=lambda d: d["model"] + " (" + d["kind"] + ")")
        if sub.empty:
            continue
        c = interval_chart(sub, y="row", x="effect", lo="low", hi="high", colour="verdict", title=CLAIMS[claim],
                           x_title=sub["measured"].iloc[0].split(",")[0])
        lines = [alt.Chart(pd.DataFrame({"t": [t]})).mark_rule(color="black", strokeDash=[2, 2]).encode(x="t:Q")
                 for t in THRESHOLDS[claim]]
        panels.append(alt.layer(c, *lines) if lines else c)
    return alt.vconcat(*panels).resolve_scale(color="shared")


def rules_table() -> pd.DataFrame:
    return pd.DataFrame([dict(claim=CLAIMS[k], rule=RULES[k]) for k in CLAIMS])


def gather(root, store_dir, small_run: bool = False, seed: int = 0, device: str = "cpu") -> list[dict]:
    """Every claim's rows, read from what chapters 2-7 stored (running what is missing)."""
    from ..testbed.items import TestbedConfig
    from ..zoo.build import read_info
    from ..zoo.evaluate import evaluate_zoo
    from ..zoo.recipes import METHODS
    from . import input_latent as IL
    from . import study
    from .effects import effects

    config = TestbedConfig.from_dict(read_info(root / "base")["settings"]["testbed"])
    latent = study.latent_models(root, METHODS)
    out = []
    qs3 = study.queries(config, "test", study.items_per_family(3, small_run))
    segmented = [m for m in study.trained(root, METHODS) if KINDS.get(m) not in ("no segment",)]
    rows3 = IL.run_input_study(root, store_dir, qs3, segmented, seed=seed, device=device)
    vec = IL.tensors_of(store_dir, rows3)
    z = vec.pop("z")
    items3 = [q.id for q in qs3]
    out += input_rows(rows3, vec, z, items3, seed) + collapse_rows(z, segmented, items3, seed)
    qs4 = study.queries(config, "test", study.items_per_family(4, small_run))
    rows4 = study.run_latent_study(root, store_dir, qs4, latent, seed=seed, device=device)
    out += intervene_rows(effects(rows4, by=("model",), seed=seed))
    out += probe_rows(root, store_dir, config, small_run, seed, device)
    out += text_rows(root, store_dir, config, small_run, seed, device)
    records = evaluate_zoo(root, per_family=5 if small_run else None)
    out += capimagine_rows(records, [m for m in latent if KINDS.get(m, "").startswith("latent")])
    return out


def probe_rows(root, store_dir, config, small_run: bool, seed: int, device: str) -> list[dict]:
    """Chapter 5: per model, the latents' (mean over steps) selectivity for the facts only the image
    holds, averaged over those facts, from chapter 5's stored probe runs (its settings)."""
    from . import probe_study, probes

    runs = probe_study.chapter_runs(root, store_dir, config, small_run=small_run, seed=seed, device=device)
    if runs["probes"].empty:
        return []
    head = probes.headline(probes.summary(runs["probes"], seed=seed), rows=runs["probes"], seed=seed)
    return [_row("probe", r["model"], f"selectivity of linear probes, {r['representation']}, mean over image facts",
                 "percentile bootstrap over items", r["mean"], r["mean_low"], r["mean_high"], int(r["mean_n"]),
                 _verdict(r["mean_low"], r["mean_high"], below=SELECTIVITY))
            for _, r in head.iterrows() if not np.isnan(r.get("mean", np.nan))]


def text_rows(root, store_dir, config, small_run: bool, seed: int, device: str) -> list[dict]:
    """Chapter 7: CapImagine's accuracy change when its imagined text is rewritten to a wrong option's
    word (against the refilled reference), from chapter 7's stored run on the same items."""
    from ..zoo.evaluate import test_items
    from . import text_mediator as tm
    from .study import trained

    if not trained(root, ["capimagine"]):
        return []
    items = test_items(config, "test", 5 if small_run else None)
    table = tm.text_effects(tm.run_capimagine(root, store_dir, items, seed=seed, device=device), seed=seed)
    out = []
    for r in table[table["condition"] == tm.key("rewrite")].itertuples(index=False):
        out.append(_row("text", r.model, "accuracy change, imagined text rewritten to a wrong option",
                        "Newcombe interval; McNemar", r.diff, r.diff_low, r.diff_high, int(r.n),
                        _verdict(r.diff_low, r.diff_high, inside=(-MARGIN, MARGIN), outside_low=-MARGIN,
                                 flip=True)))
    return out
