"""Tables and altair charts of the benchmark results (saved as PNG beside the JSON by the
benchmark command, drawn again from the JSON by chapter 9). Every chart has a table with the
same numbers (`*_frame`)."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import pandas as pd

WAYS = {"fast": "shared work", "naive": "naive (each run alone)"}
KV = "KV cache (computed)"
COLOURS = alt.Scale(domain=[WAYS["fast"], WAYS["naive"], KV], range=["#E69F00", "#0072B2", "#009E73"])
AXIS_TITLE = {"instances": "instances (16 interventions each)", "interventions": "interventions per instance (M)",
              "k": "latent steps K (16 interventions)"}


def _style() -> None:
    from latentmed.analysis import plots

    plots.setup()


# ---------------------------------------------------------------- (a) sweep

def sweep_frame(result: dict) -> pd.DataFrame:
    rows = []
    for r in result["rows"]:
        for way, key in (("shared_sweep per instance", "shared"), ("sweep_many over the instances", "many")):
            rows.append(dict(M=r["m"], way=way, ratio=r[f"ratio_{key}"], low=r[f"ratio_{key}_range"][0],
                             high=r[f"ratio_{key}_range"][1], fast_ms_per_run=1000 * r[f"{key}_s"] / r["runs"],
                             naive_ms_per_run=1000 * r["naive_s"] / r["runs"], outputs_equal=r["outputs_equal"]))
    return pd.DataFrame(rows)


def sweep_chart(result: dict) -> alt.Chart:
    df = sweep_frame(result)
    x = alt.X("M:Q", scale=alt.Scale(type="log", base=2), title="interventions per instance (M)",
              axis=alt.Axis(values=sorted(set(df["M"].tolist())), format="d"))
    line = alt.Chart(df).mark_line(point=True).encode(x=x, y=alt.Y("ratio:Q", title="naive time / shared time"),
                                                      color=alt.Color("way:N", title=None))
    band = alt.Chart(df).mark_errorbar().encode(x=x, y="low:Q", y2="high:Q", color="way:N")
    return (band + line).properties(title=f"Shared-work sweep vs naive ({result['model']}, {result['device_name']})")


# ---------------------------------------------------------------- scaling

def scaling_frame(result: dict) -> pd.DataFrame:
    rows = []
    for ax in result["axes"]:
        for p in ax["points"]:
            for way in ("fast", "naive"):
                if f"{way}_s" in p:
                    rows.append(dict(axis=ax["axis"], x=p["x"], way=WAYS[way], runs=p["runs"],
                                     cpu_seconds=p[f"{way}_cpu_s"], wall_seconds=p[f"{way}_s"],
                                     ms_per_run=p[f"{way}_ms_per_run"], peak_mb=p[f"{way}_peak_mb"],
                                     kv_cache_mb=p["kv_cache_mb"] if way == "fast" else None))
    return pd.DataFrame(rows)


def fit_frame(result: dict) -> pd.DataFrame:
    rows = []
    for ax in result["axes"]:
        for way in ("fast", "naive"):
            f = ax[f"{way}_fit"]
            if f["slope_s"] is None:
                continue
            rows.append(dict(axis=ax["axis"], way=WAYS[way], slope_ms=1000 * f["slope_s"],
                             intercept_ms=1000 * f["intercept_s"], r2=f["r2"], knee=f["knee"],
                             last_marginal_ms=1000 * f["marginal_s"][-1] if f["marginal_s"] else None))
    return pd.DataFrame(rows)


def _per_axis(df: pd.DataFrame, y: str, title: str, log_y: bool = True) -> alt.HConcatChart:
    charts = []
    for axis in [a for a in AXIS_TITLE if a in set(df["axis"])]:
        sub = df[df["axis"] == axis]
        charts.append(alt.Chart(sub).mark_line(point=True).encode(
            x=alt.X("x:Q", scale=alt.Scale(type="log", base=2), title=AXIS_TITLE[axis],
                    axis=alt.Axis(values=sorted(set(sub["x"].tolist())), format="d")),
            y=alt.Y(f"{y}:Q", scale=alt.Scale(type="log") if log_y else alt.Scale(), title=title),
            color=alt.Color("way:N", title=None, scale=COLOURS)).properties(width=220, height=180))
    return alt.hconcat(*charts)


def scaling_time_chart(result: dict) -> alt.HConcatChart:
    return _per_axis(scaling_frame(result), "cpu_seconds", "CPU seconds (best)").properties(
        title=f"Cost as the work grows ({result['model']}, {result['device_name']})")


def scaling_unit_chart(result: dict) -> alt.HConcatChart:
    return _per_axis(scaling_frame(result), "ms_per_run", "CPU ms per measurement").properties(
        title="Cost per measurement (CPU time)")


def memory_frame(result: dict) -> pd.DataFrame:
    df = scaling_frame(result)
    kv = df[df["way"] == WAYS["fast"]].assign(way=KV, peak_mb=lambda d: d["kv_cache_mb"])
    return pd.concat([df, kv], ignore_index=True)[["axis", "x", "way", "peak_mb"]]


def memory_chart(result: dict) -> alt.HConcatChart:
    df = memory_frame(result)
    df = df.assign(peak_mb=df["peak_mb"].clip(lower=0.01))
    return _per_axis(df, "peak_mb", "MB added at peak").properties(title="Memory as the work grows")


# ---------------------------------------------------------------- (d) training, (e) main command

def train_frame(result: dict) -> pd.DataFrame:
    return pd.DataFrame([dict(method=m["method"], stage=s["stage"], samples_per_s=s["samples_per_s"],
                              budget_steps=s["budget_steps"], est_budget_s=s["est_budget_s"])
                         for m in result["rows"] for s in m["stages"]])


def train_chart(result: dict) -> alt.Chart:
    df = train_frame(result).assign(label=lambda d: d["method"] + " | " + d["stage"])
    return alt.Chart(df).mark_bar().encode(
        y=alt.Y("label:N", sort=None, title=None), x=alt.X("samples_per_s:Q", title="samples / s"),
        color=alt.Color("method:N", legend=None)).properties(
        title=f"Training throughput per stage ({result['device_name']}, {result['threads']} thread(s))", height=300)


def main_frame(result: dict) -> pd.DataFrame:
    return pd.DataFrame(result.get("stages", []))


def main_chart(result: dict) -> alt.Chart:
    """The build's jobs on a time line (each bar from its start to its end; side by side where
    they ran at once), or one bar per stage for a result without start times."""
    df = main_frame(result)
    if "start" not in df:
        return alt.Chart(df).mark_bar().encode(
            y=alt.Y("stage:N", sort=None, title=None), x=alt.X("seconds:Q", title="seconds"),
            color=alt.Color("kind:N", title=None)).properties(title="The main command, stage by stage", height=300)
    df = df.assign(end=df["start"] + df["seconds"])
    return alt.Chart(df).mark_bar().encode(
        y=alt.Y("stage:N", sort=None, title=None), x=alt.X("start:Q", title="seconds since the start"), x2="end:Q",
        color=alt.Color("kind:N", title=None), tooltip=["stage", "seconds", "start"]).properties(
        title=f"The main command's jobs over time ({result.get('total_s', 0) / 60:.1f} min in all)", height=360)


# ---------------------------------------------------------------- PNG files

def charts_of(name: str, result: dict) -> dict[str, alt.TopLevelMixin]:
    if name == "sweep":
        return {"sweep": sweep_chart(result)}
    if name == "scaling":
        return {"scaling-time": scaling_time_chart(result), "scaling-per-run": scaling_unit_chart(result),
                "scaling-memory": memory_chart(result)}
    if name == "train":
        return {"train": train_chart(result)}
    if name == "main" and result.get("stages"):
        return {"main": main_chart(result)}
    return {}


def save_pngs(name: str, result: dict, folder: Path) -> list[Path]:
    """PNG files of a result's charts beside its JSON: <chart>-<device>.png."""
    _style()
    out = []
    for stem, chart in charts_of(name, result).items():
        path = Path(folder) / f"{stem}-{result['device']}.png"
        chart.save(str(path), format="png", scale_factor=2)
        out.append(path)
    return out
