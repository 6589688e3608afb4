"""Altair figures for the book, all in one style.

Call `setup()` once per notebook: it registers the style and renders charts as static SVG
through vl-convert (offline, small and sharp). A chart's SVG holds its data's coordinates, and
the last digits of a float can differ between machines (a loss curve did), so chapters show
each chart in a cell of its own tagged `nbval-ignore-output` (the regression test does not
compare it; `tests/test_book.py` checks the tag) and every number a chart shows in a table,
which is compared. Every helper takes a tidy pandas DataFrame and returns a chart, so notebooks
stay one line per figure. Chance lines are dashed and labelled "chance".
"""

from __future__ import annotations

import altair as alt
import pandas as pd
from PIL import Image, ImageDraw

from ..testbed import scenes

THEME = "latentmed"
WIDTH, HEIGHT = 320, 200
FAMILY_ORDER = ["attr", "relpos", "count", "glyph"]
# Okabe-Ito: distinguishable with the common colour-vision deficiencies
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]


@alt.theme.register(THEME, enable=False)
def _theme() -> alt.theme.ThemeConfig:
    """Small fonts, no chart border, the shared palette."""
    return {"config": {
        "view": {"continuousWidth": WIDTH, "continuousHeight": HEIGHT, "stroke": None},
        "font": "DejaVu Sans",
        "axis": {"labelFontSize": 11, "titleFontSize": 12, "grid": True, "gridOpacity": 0.4},
        "legend": {"labelFontSize": 11, "titleFontSize": 12},
        "title": {"fontSize": 13, "anchor": "start"},
        "range": {"category": PALETTE},
    }}


def setup(renderer: str = "svg", scale_factor: float = 2.0) -> None:
    """Enable the shared style and a static renderer: SVG, or "png" (at `scale_factor`)."""
    alt.theme.enable(THEME)
    if renderer == "png":
        alt.renderers.enable("png", scale_factor=scale_factor)
    else:
        alt.renderers.enable(renderer)
    alt.data_transformers.disable_max_rows()


def _chance_rule(chance, colour: str | None = None) -> alt.Chart | None:
    """Dashed, labelled horizontal line at chance: a number, or a DataFrame with 'chance'
    (one line per row, e.g. per family; `colour` names a column to colour them by)."""
    if chance is None:
        return None
    data = chance if isinstance(chance, pd.DataFrame) else pd.DataFrame({"chance": [chance]})
    data = data.assign(chance_label=[f"chance {c:.2g}" for c in data["chance"]])
    enc = {"y": alt.Y("chance:Q")}
    if colour and colour in data.columns:
        enc["color"] = alt.Color(f"{colour}:N", sort=None)
    mark = {"strokeDash": [4, 3], "opacity": 0.7}
    if "color" not in enc:
        mark["color"] = "grey"
    rule = alt.Chart(data).mark_rule(**mark).encode(**enc)
    label = alt.Chart(data).mark_text(align="left", baseline="bottom", dx=2, dy=-1, fontSize=10, color="grey").encode(
        y="chance:Q", x=alt.value(2), text="chance_label:N")
    return rule + label


def accuracy_bars(df: pd.DataFrame, x: str = "model", y: str = "accuracy",
                  lo: str | None = "ci_low", hi: str | None = "ci_high",
                  colour: str | None = None, column: str | None = None,
                  chance: float | str | None = None, title: str = "", column_order=None) -> alt.Chart:
    """Bars of accuracy (0-1) with interval whiskers from `lo`/`hi` and a labelled chance line.

    `chance` is a number or the name of a column of `df` (e.g. per task family); `column`
    facets the chart into one panel per value, in `column_order` (default: the task families'
    order when the column is "family", else the data's).
    """
    yscale = alt.Scale(domain=[0, 1])
    xenc = alt.X(f"{x}:N", sort=None, title=x)
    enc = {"x": xenc, "y": alt.Y(f"{y}:Q", scale=yscale, title=y)}
    if colour:
        enc["color"] = alt.Color(f"{colour}:N", sort=None)
    layers = [alt.Chart().mark_bar().encode(**enc)]
    if lo and hi and lo in df.columns and hi in df.columns:
        layers.append(alt.Chart().mark_rule(color="black").encode(
            x=xenc, y=alt.Y(f"{lo}:Q", scale=yscale), y2=f"{hi}:Q"))
    if chance is not None:
        ychance = alt.Y(f"mean({chance}):Q") if isinstance(chance, str) else alt.datum(chance)
        layers.append(alt.Chart().mark_rule(color="grey", strokeDash=[4, 3]).encode(y=ychance))
        label = (alt.Text(f"mean({chance}):Q", format=".2g") if isinstance(chance, str)
                 else alt.value(f"chance {chance:.2g}"))
        layers.append(alt.Chart().mark_text(align="left", baseline="bottom", dx=2, dy=-1, fontSize=10,
                                            color="grey").encode(y=ychance, x=alt.value(2), text=label))
    chart = alt.layer(*layers, data=df).properties(width=160 if column else WIDTH, height=HEIGHT)
    if column:
        if column_order is None and column == "family":
            column_order = [f for f in FAMILY_ORDER if f in set(df[column])]
        chart = chart.facet(column=alt.Column(f"{column}:N", sort=list(column_order) if column_order else None))
    return chart.properties(title=title) if title else chart


def line_chart(df: pd.DataFrame, x: str, y: str, colour: str | None = None,
               chance: float | pd.DataFrame | None = None, title: str = "",
               x_title: str | None = None, y_title: str | None = None,
               log_x: bool = False, y_domain=(0, 1), log_y: bool = False, colour_order=None,
               points: bool = True) -> alt.Chart:
    """Lines (with points), one per `colour` group, with optional labelled chance line(s).

    `log_y` puts the y axis on a log scale (for losses whose first values dwarf the rest)."""
    xscale = alt.Scale(type="log", base=2) if log_x else alt.Scale(zero=False)
    if log_y:
        yscale = alt.Scale(type="log")
    else:
        yscale = alt.Scale(domain=list(y_domain)) if y_domain else alt.Scale()
    xaxis = alt.Axis(values=sorted(df[x].unique().tolist())) if log_x else alt.Axis()
    enc = {"x": alt.X(f"{x}:Q", scale=xscale, axis=xaxis, title=x_title or x),
           "y": alt.Y(f"{y}:Q", scale=yscale, title=y_title or y)}
    if colour:
        enc["color"] = alt.Color(f"{colour}:N", sort=list(colour_order) if colour_order is not None else None)
    layers = [alt.Chart(df).mark_line(point=points).encode(**enc)]
    rule = _chance_rule(chance, colour)
    if rule is not None:
        layers.append(rule)
    chart = alt.layer(*layers).properties(width=WIDTH, height=HEIGHT)
    return chart.properties(title=title) if title else chart


def readability_chart(df: pd.DataFrame, title: str = "", families=FAMILY_ORDER) -> alt.Chart:
    """Accuracy of each reader on each view (x, in the table's order), one panel per family,
    with the family's chance level as a labelled dashed line."""
    views = list(pd.unique(df["view"]))
    data = df.assign(chance_label=[f"chance {c:.2g}" for c in df["chance"]])
    x = alt.X("view:N", sort=views, title="view of the scene")
    base = alt.Chart()
    line = base.mark_line(point=True).encode(
        x=x, y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="answered correctly"),
        color=alt.Color("reader:N", sort=["matched", "clean", "cells"], title="reader"))
    rule = base.mark_rule(color="grey", strokeDash=[4, 3]).encode(y="mean(chance):Q")
    label = base.mark_text(align="left", baseline="bottom", dx=2, dy=-1, fontSize=10, color="grey").encode(
        y="mean(chance):Q", x=alt.value(2), text="min(chance_label):N")
    chart = alt.layer(line, rule, label, data=data).properties(width=150, height=HEIGHT).facet(
        column=alt.Column("family:N", sort=[f for f in families if f in set(df["family"])], title=None))
    return chart.properties(title=title) if title else chart


def interval_chart(df: pd.DataFrame, y: str, x: str = "diff", lo: str = "diff_low", hi: str = "diff_high",
                   colour: str | None = None, title: str = "", x_title: str = "difference") -> alt.Chart:
    """Effects with their 95% intervals, one row per `y` value, and a line at zero."""
    order = list(pd.unique(df[y]))
    yenc = alt.Y(f"{y}:N", sort=order, title=None)
    enc = {"x": alt.X(f"{x}:Q", title=x_title), "y": yenc}
    if colour:
        enc["color"] = alt.Color(f"{colour}:N", sort=None)
    points = alt.Chart().mark_point(filled=True, size=50).encode(**enc)
    bars = alt.Chart().mark_rule().encode(x=f"{lo}:Q", x2=f"{hi}:Q", y=yenc,
                                          **({"color": enc["color"]} if colour else {}))
    zero = alt.Chart().mark_rule(color="grey", strokeDash=[4, 3]).encode(x=alt.datum(0))
    chart = alt.layer(bars, points, zero, data=df).properties(width=WIDTH, height=max(60, 18 * len(df)))
    return chart.properties(title=title) if title else chart


def count_bars(df: pd.DataFrame, x: str, y: str = "n", colour: str | None = None,
               title: str = "") -> alt.Chart:
    """Grouped counts (e.g. items per answer letter), stacked by `colour`."""
    enc = {"x": alt.X(f"{x}:N", sort=None), "y": alt.Y(f"{y}:Q")}
    if colour:
        enc["color"] = alt.Color(f"{colour}:N", sort=None)
    chart = alt.Chart(df).mark_bar().encode(**enc).properties(width=WIDTH, height=HEIGHT)
    return chart.properties(title=title) if title else chart


# ---------------------------------------------------------------- example images (PIL)

def example_panel(item, image: Image.Image, crop: Image.Image, scale: int = 2) -> Image.Image:
    """The scene (evidence boxes black, crop box dashed grey) next to its zoomed crop."""
    big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    x0, y0, x1, y1 = (v * scale for v in item.crop_box)
    for x in range(x0, x1, 8):  # dashed crop box
        draw.line([(x, y0), (min(x + 4, x1 - 1), y0)], fill=(90, 90, 90), width=2)
        draw.line([(x, y1 - 1), (min(x + 4, x1 - 1), y1 - 1)], fill=(90, 90, 90), width=2)
    for y in range(y0, y1, 8):
        draw.line([(x0, y), (x0, min(y + 4, y1 - 1))], fill=(90, 90, 90), width=2)
        draw.line([(x1 - 1, y), (x1 - 1, min(y + 4, y1 - 1))], fill=(90, 90, 90), width=2)
    for b in item.evidence_bboxes:
        draw.rectangle([b[0] * scale - 3, b[1] * scale - 3, b[2] * scale + 2, b[3] * scale + 2],
                       outline=(0, 0, 0), width=2)
    zoom = crop.resize((big.height // 2, big.height // 2), Image.NEAREST)
    panel = Image.new("RGB", (big.width + 12 + zoom.width, big.height), (255, 255, 255))
    panel.paste(big, (0, 0))
    panel.paste(zoom, (big.width + 12, 0))
    return panel


def resolution_strip(image: Image.Image, factors=(1, 2, 4, 8), box=None, views=None) -> Image.Image:
    """The scene after each downscale factor (or each view of `views`, a dict of functions),
    side by side (or a zoom on `box`)."""
    tiles = []
    fns = list(views.values()) if views else [lambda im, f=f: scenes.degrade(im, f) for f in factors]
    for fn in fns:
        seen = fn(image)
        if box is not None:
            seen = seen.crop(tuple(box)).resize((image.width // 2, image.width // 2), Image.NEAREST)
        tiles.append(seen)
    w, h = tiles[0].size
    strip = Image.new("RGB", (len(tiles) * (w + 8) - 8, h), (255, 255, 255))
    for i, t in enumerate(tiles):
        strip.paste(t, (i * (w + 8), 0))
    return strip
