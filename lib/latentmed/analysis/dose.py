"""Chapter 10: when do latents become mediators? A dose series of one training knob.

The knob is the share of training batches run with the bottleneck (positions after the segment
see only the segment), from 0 (the bypass open in every batch, but the slots' attention still
grounded on the evidence) to 1 (grounded-closed: the bypass closed in every batch). Each setting
is a zoo model fine-tuned from the shared base with the same steps and losses. For each: accuracy
with the bottleneck at inference and with it open, chapter 4's latent interventions, and chapter
6's indirect effect of masking the evidence, with 95% intervals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..zoo.recipes import DOSE_METHODS, DOSES
from . import mediation as med
from . import study
from .effects import effects
from .stats import holm, paired_difference

POINTS = dict(zip(DOSE_METHODS, DOSES)) | {"grounded-closed": 1.0}
INTERVENTIONS = ("swap", "zero", "noise")
INFERENCE = {"closed": {}, "open": {"after_segment": "all"}}


def run(root: str | Path, store_dir: str | Path, qs: list, seed: int = 0, device: str = "cpu",
        controls=("positive-control", "negative-control")) -> dict[str, pd.DataFrame]:
    """The series' measurements (each model with the bottleneck closed and open at inference) and
    the controls' indirect effects: rows of the latent interventions and of the mediation runs."""
    names = study.trained(root, list(POINTS))
    lat, medi = [], []
    for mode, over in INFERENCE.items():
        suffix = "" if mode == "closed" else " (open at inference)"
        shared: dict = {}  # each model loaded and decoded clean once for both studies
        lat.append(study.run_latent_study(root, store_dir, qs, names, forms=("generate",), seed=seed, device=device,
                                          overrides=over, suffix=suffix, names=INTERVENTIONS,
                                          shared=shared).assign(inference=mode))
        medi.append(med.run_mediation(root, store_dir, qs, names, ("mask_evidence",), seed, device, chapter=10,
                                      overrides=over, suffix=suffix, shared=shared).assign(inference=mode))
    ctl = med.run_mediation(root, store_dir, qs, study.trained(root, controls), ("mask_evidence",), seed, device,
                            chapter=10).assign(inference="as trained")
    return dict(latent=pd.concat(lat, ignore_index=True), mediation=pd.concat(medi + [ctl], ignore_index=True))


def dose_of(model: str) -> float:
    return POINTS.get(model.split(" (")[0], np.nan)


def curve(res: dict[str, pd.DataFrame], seed: int = 0) -> pd.DataFrame:
    """Per model and inference mode: the dose, clean accuracy, the swap effect, the indirect effect
    of masking the evidence (NIE) with 95% intervals and its sign-test p (Holm over the series)."""
    lat, medi = res["latent"], res["mediation"]
    eff = effects(lat, by=("model",), seed=seed)
    nie = med.estimates(medi, "mask_evidence", "correct", seed=seed)
    rows = []
    for m in pd.unique(medi["model"]):
        n = nie[nie["model"] == m]
        e = eff[eff["model"] == m].set_index("condition") if len(eff) else pd.DataFrame()
        g = medi[(medi["model"] == m) & (medi["condition"] == "clean")]
        row = dict(model=m, dose=dose_of(m), inference=g["inference"].iloc[0] if len(g) else "",
                   accuracy=float(g["correct"].mean()) if len(g) else np.nan, n=len(g))
        for c in INTERVENTIONS:
            key = f"{c}/generate"
            if key in e.index:
                row.update({f"{c}_diff": e.loc[key, "diff"], f"{c}_low": e.loc[key, "diff_low"],
                            f"{c}_high": e.loc[key, "diff_high"]})
        if len(n):
            r = n.iloc[0]
            row.update(nie=r["nie"], nie_low=r["nie_low"], nie_high=r["nie_high"], nde=r["nde"], te=r["te"],
                       p_nie=r["p_nie"])
        rows.append(row)
    out = pd.DataFrame(rows)
    series = out["dose"].notna()
    out.loc[series, "p_nie_holm"] = holm(out.loc[series, "p_nie"].to_numpy())[0]
    return out.sort_values(["inference", "dose"], na_position="last").reset_index(drop=True)


def onset(table: pd.DataFrame, inference: str = "closed") -> dict:
    """The smallest dose whose indirect effect is a drop with a 95% interval below zero and a
    Holm-corrected p below 0.05, and what accuracy it costs against dose 0 (paired difference)."""
    t = table[(table["inference"] == inference) & table["dose"].notna()].sort_values("dose")
    hit = t[(t["nie_high"] < 0) & (t["p_nie_holm"] < 0.05)]
    return dict(inference=inference, dose=None if hit.empty else float(hit["dose"].iloc[0]),
                model=None if hit.empty else hit["model"].iloc[0])


def cost(medi: pd.DataFrame, model: str, reference: str) -> tuple[float, float, float, int]:
    """Accuracy of `model` minus `reference` on the same items (clean runs), Newcombe's interval."""
    a = medi[(medi["model"] == model) & (medi["condition"] == "clean")].set_index("item")["correct"]
    b = medi[(medi["model"] == reference) & (medi["condition"] == "clean")].set_index("item")["correct"]
    both = pd.concat([a, b], axis=1, keys=["a", "b"], join="inner").astype(bool)
    d, lo, hi = paired_difference(both["a"].to_numpy(), both["b"].to_numpy())
    return d, lo, hi, len(both)


def verdict_text(table: pd.DataFrame, medi: pd.DataFrame) -> str:
    """The chapter's answer, generated: the onset dose in each inference mode and its accuracy cost."""
    from .report import ci, p

    lines = []
    for mode in ("closed", "open"):
        o = onset(table, mode)
        t = table[(table["inference"] == mode) & table["dose"].notna()].sort_values("dose")
        if t.empty:
            continue
        if o["dose"] is None:
            lines.append(f"* Bottleneck **{mode}** at inference: no setting's indirect effect is a drop with its "
                         f"interval below zero after Holm (the most negative, at dose {t.loc[t['nie'].idxmin(), 'dose']:.2f}: "
                         f"{ci(t['nie'].min(), t.loc[t['nie'].idxmin(), 'nie_low'], t.loc[t['nie'].idxmin(), 'nie_high'], signed=True)}).")
            continue
        r = t[t["model"] == o["model"]].iloc[0]
        ref = t.iloc[0]
        d, lo, hi, n = cost(medi, o["model"], ref["model"])
        lines.append(f"* Bottleneck **{mode}** at inference: the latents become mediators at a bottleneck share of "
                     f"{o['dose']:.2f} (indirect effect {ci(r['nie'], r['nie_low'], r['nie_high'], signed=True)}, "
                     f"sign test p_holm {p(r['p_nie_holm'])}, n = {int(r['n'])}); its clean accuracy differs from the "
                     f"share-{ref['dose']:.2f} model's by {ci(d, lo, hi, signed=True)} (Newcombe, n = {n}).")
    return "\n".join(lines)


def curve_chart(table: pd.DataFrame, y: str = "nie", lo: str = "nie_low", hi: str = "nie_high",
                title: str = "", y_title: str = "indirect effect on accuracy"):
    """The series' effect against the dose with its 95% interval band, one line per inference mode,
    and the controls as labelled dashed reference lines."""
    import altair as alt

    series = table[table["dose"].notna()].assign(mode=lambda d: d["inference"] + " at inference")
    refs = table[table["dose"].isna() & table[y].notna()]
    x = alt.X("dose:Q", title="share of training batches with the bottleneck", scale=alt.Scale(domain=[0, 1]))
    band = alt.Chart(series).mark_area(opacity=0.2).encode(x=x, y=alt.Y(f"{lo}:Q", title=y_title), y2=f"{hi}:Q",
                                                          color="mode:N")
    line = alt.Chart(series).mark_line(point=True).encode(x=x, y=f"{y}:Q", color=alt.Color("mode:N", title=None))
    rule = alt.Chart(refs).mark_rule(strokeDash=[4, 3], color="grey").encode(y=f"{y}:Q")
    label = alt.Chart(refs).mark_text(align="left", baseline="bottom", dx=2, dy=-1, fontSize=10, color="grey").encode(
        y=f"{y}:Q", x=alt.value(2), text="model:N")
    chart = alt.layer(band, line, rule, label).properties(width=420, height=240)
    return chart.properties(title=title) if title else chart
