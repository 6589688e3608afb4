"""Altair figures for the book, all in one style.

Call `setup()` once per notebook: it registers the style and renders charts as SVG (static,
offline and byte-for-byte deterministic, which is what nbval compares). Every helper takes a
tidy pandas DataFrame and returns a chart, so notebooks stay one line per figure.
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


def setup(renderer: str = "svg") -> None:
    """Enable the shared style and a static renderer (SVG by default)."""
    alt.theme.enable(THEME)
    alt.renderers.enable(renderer)
    alt.data_transformers.disable_max_rows()


def _chance_rule(chance, colour: str | None = None) -> alt.Chart | None:
    """Dashed horizontal line(s) at chance: a number, or a DataFrame with 'chance' (+ colour)."""
    if chance is None:
        return None
    data = chance if isinstance(chance, pd.DataFrame) else pd.DataFrame({"chance": [chance]})
    enc = {"y": alt.Y("chance:Q")}
    if colour and colour in data.columns:
        enc["color"] = alt.Color(f"{colour}:N", sort=None)
    mark = {"strokeDash": [4, 3], "opacity": 0.7}
    if "color" not in enc:
        mark["color"] = "grey"
    return alt.Chart(data).mark_rule(**mark).encode(**enc)


def accuracy_bars(df: pd.DataFrame, x: str = "model", y: str = "accuracy",
                  lo: str | None = "ci_low", hi: str | None = "ci_high",
                  colour: str | None = None, column: str | None = None,
                  chance: float | str | None = None, title: str = "") -> alt.Chart:
    """Bars of accuracy (0-1) with interval whiskers from `lo`/`hi` and a dashed chance line.

    `chance` is a number or the name of a column of `df` (e.g. per task family); `column`
    facets the chart into one panel per value.
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
    chart = alt.layer(*layers, data=df).properties(width=160 if column else WIDTH, height=HEIGHT)
    if column:
        chart = chart.facet(column=alt.Column(f"{column}:N", sort=None))
    return chart.properties(title=title) if title else chart


def line_chart(df: pd.DataFrame, x: str, y: str, colour: str | None = None,
               chance: float | pd.DataFrame | None = None, title: str = "",
               x_title: str | None = None, y_title: str | None = None,
               log_x: bool = False, y_domain=(0, 1)) -> alt.Chart:
    """Lines with points, one per `colour` group, with optional chance line(s)."""
    xscale = alt.Scale(type="log", base=2) if log_x else alt.Scale(zero=False)
    yscale = alt.Scale(domain=list(y_domain)) if y_domain else alt.Scale()
    xaxis = alt.Axis(values=sorted(df[x].unique().tolist())) if log_x else alt.Axis()
    enc = {"x": alt.X(f"{x}:Q", scale=xscale, axis=xaxis, title=x_title or x),
           "y": alt.Y(f"{y}:Q", scale=yscale, title=y_title or y)}
    if colour:
        enc["color"] = alt.Color(f"{colour}:N", sort=None)
    layers = [alt.Chart(df).mark_line(point=True).encode(**enc)]
    rule = _chance_rule(chance, colour)
    if rule is not None:
        layers.append(rule)
    chart = alt.layer(*layers).properties(width=WIDTH, height=HEIGHT)
    return chart.properties(title=title) if title else chart


def readability_chart(df: pd.DataFrame, title: str = "") -> alt.Chart:
    """Readability of the target vs the side of the low-resolution image, chance dashed."""
    chance = df.drop_duplicates("family")[["family", "chance"]]
    return line_chart(df, x="side_px", y="accuracy", colour="family", chance=chance,
                      title=title, x_title="image side seen (px, log scale)",
                      y_title="target read correctly", log_x=True)


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


def resolution_strip(image: Image.Image, factors=(1, 2, 4, 8), box=None) -> Image.Image:
    """The scene as a model sees it after each downscale factor, side by side (or a zoom on `box`)."""
    tiles = []
    for f in factors:
        seen = scenes.degrade(image, f)
        if box is not None:
            seen = seen.crop(tuple(box)).resize((image.width // 2, image.width // 2), Image.NEAREST)
        tiles.append(seen)
    w, h = tiles[0].size
    strip = Image.new("RGB", (len(tiles) * (w + 8) - 8, h), (255, 255, 255))
    for i, t in enumerate(tiles):
        strip.paste(t, (i * (w + 8), 0))
    return strip
