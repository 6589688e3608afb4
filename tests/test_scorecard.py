"""The scorecard: verdict rules, and no number on the page without a row behind it."""

from __future__ import annotations

import json
import re

import pandas as pd

from latentmed.analysis import scorecard as sc
from latentmed.paths import ROOT

NUMBER = re.compile(r"[-+]?\d+\.\d+|\b\d+\b")


def rows():
    return [sc._row("intervene", "monet-style", "accuracy change", "Newcombe", -0.01, -0.03, 0.02, 400,
                    sc._verdict(-0.03, 0.02, inside=(-0.05, 0.05), outside_low=-0.05)),
            sc._row("intervene", "grounded-closed", "accuracy change", "Newcombe", -0.71, -0.75, -0.66, 400,
                    sc._verdict(-0.75, -0.66, inside=(-0.05, 0.05), outside_low=-0.05)),
            sc._row("collapse", "lvr-style", "inter cosine", "bootstrap", 0.97, 0.95, 0.98, 400,
                    sc._verdict(0.95, 0.98, above=0.9)),
            sc._row("input", "mirage-style", "ratio", "bootstrap", 0.3, 0.2, 0.4, 400, sc._verdict(0.2, 0.4, below=0.25))]


def test_verdict_rules():
    r = {x["model"]: x["verdict"] for x in rows()}
    assert r == {"monet-style": "reproduced", "grounded-closed": "not reproduced", "lvr-style": "reproduced",
                 "mirage-style": "inconclusive"}
    assert sc._verdict(float("nan"), 1.0, below=0.5) == "not testable here"
    # a claim that an effect exists (text mediates): a change inside the margin contradicts it
    text = dict(inside=(-0.05, 0.05), outside_low=-0.05, flip=True)
    assert sc._verdict(-0.02, 0.03, **text) == "not reproduced"
    assert sc._verdict(-0.4, -0.2, **text) == "reproduced"
    assert sc._verdict(-0.1, 0.0, **text) == "inconclusive"
    s = sc.summary(sc.card(rows())).set_index(["claim", "kind"])
    assert s.loc[(sc.CLAIMS["intervene"], "latent, bypass open"), "verdict"] == "reproduced"
    assert s.loc[(sc.CLAIMS["intervene"], "latent, bypass closed"), "verdict"] == "not reproduced"
    assert s.loc[(sc.CLAIMS["probe"], "-"), "verdict"] == "not testable here"
    assert s.loc[(sc.CLAIMS["input"], "latent, bypass open"), "verdict"] == "inconclusive"


def test_every_number_on_the_page_comes_from_a_row():
    card = sc.card(rows())
    shown = (sc.render(card).to_string(index=False) + sc.summary(card).to_string(index=False)).replace("95% CI", "")
    allowed = {f"{v:.3f}" for c in ("effect", "low", "high") for v in card[c]}
    allowed |= {f"{v:+.3f}" for c in ("effect", "low", "high") for v in card[c]}
    allowed |= {str(int(v)) for v in card["n"]} | {str(i) for i in range(len(card) + 1)}  # counts and row numbers
    for number in NUMBER.findall(shown):
        assert number in allowed, f"{number} is on the page but in no row"
    planted = card.copy()
    planted.loc[0, "measured"] = "accuracy change of 0.123"  # a typed number slipped into the text
    assert "0.123" not in allowed and "0.123" in sc.render(planted).to_string()


def test_the_scorecard_page_types_no_numbers():
    nb = json.loads((ROOT / "notebooks" / "00_scorecard.ipynb").read_text())
    text = " ".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    text = text.replace("2602.22766", "").replace("95%", "")  # the paper's arXiv id; the intervals' level
    text = re.sub(r"chapters? \d+(?: and \d+)?", "", text)  # references to chapters
    assert not re.findall(r"\d", text), "the scorecard's text must take every number from the results"
    assert set(sc.RULES) == set(sc.CLAIMS) and all(isinstance(v, str) for v in sc.RULES.values())
    assert isinstance(sc.rules_table(), pd.DataFrame)
