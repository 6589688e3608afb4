"""Harness prompts and answer rules (VLMEvalKit, lmms-eval), the harness spec inside the engine,
and the benchmarks' scoring (per category, HR-Bench's cycles, MME-RealWorld's tasks)."""

from __future__ import annotations

import pandas as pd
import pytest
from latentmed.engine.query import Query
from latentmed.engine.spec import preset
from latentmed.real import harness as H
from latentmed.real.harness import HarnessSpec, extract, user_text
from latentmed.real.report import PAPER, paper_accuracy, paper_table, score

OPTS = ["rubber", "cotton", "kevlar", "leather"]
MME_OPTS = ["left", "right", "front", "back", "none of the above"]


# ---------------------------------------------------------------- prompts

def test_vlmevalkit_mcq_prompt_for_vstar_and_hrbench():
    want = ("Question: What is the material of the glove?\nOptions:\nA. rubber\nB. cotton\nC. kevlar\nD. leather\n"
            "Please select the correct answer from the options above. \n")
    assert user_text("vlmevalkit", "vstar", "What is the material of the glove?", OPTS) == want
    assert user_text("vlmevalkit", "hrbench8k", "What is the material of the glove?", OPTS) == want


def test_lmms_eval_prompts():
    assert user_text("lmms-eval", "vstar", "Q?", ["a", "b"]) == (
        "Q?\nA. a\nB. b\nAnswer with the option's letter from the given choices directly.")
    want = "Q?\nA. a\nB. b\nAnswer the option letter directly."
    assert user_text("lmms-eval", "hrbench4k", " Q? ", ["a", "b"]) == want


def test_mme_prompts_list_lettered_choices():
    v = user_text("vlmevalkit", "mme-realworld-lite", "Where is the car?", MME_OPTS)
    assert v == ("Where is the car? The choices are listed below:\n(A) left\n(B) right\n(C) front\n(D) back\n"
                 "(E) none of the above\nSelect the best answer to the above multiple-choice question based on the "
                 "image. Respond with only the letter (A, B, C, D, or E) of the correct option. \nThe best answer is:")
    lm = user_text("lmms-eval", "mme-realworld-lite", "Where is the car?", MME_OPTS)
    assert lm.endswith("of the correct option.\nThe best answer is: ")


def test_unknown_harness_and_benchmark():
    with pytest.raises(ValueError, match="unknown harness 'opencompass'"):
        user_text("opencompass", "vstar", "Q", OPTS)
    with pytest.raises(ValueError, match="unknown benchmark 'pope'"):
        HarnessSpec.of(preset("direct"), "vlmevalkit", "pope")


def test_harness_spec_keeps_the_methods_template_and_asks_the_harness_question(load, images):
    r = load("monet")
    monet = r.spec
    r.spec = HarnessSpec.of(monet, "vlmevalkit", "vstar")
    try:
        q = Query(images=[images[0]], question="What colour is the square?", options=["red", "blue"])
        text = r.prompt(q).text
        assert monet.system_prompt in text, "the method's system prompt stays"
        assert "Question: What colour is the square?\nOptions:\nA. red\nB. blue\nPlease select" in text
        assert r.spec.base() == monet and r.spec.with_overrides(n_latents=4).harness == "vlmevalkit"
        # the method's own suffix is replaced, not appended
        lvr = HarnessSpec.of(preset("lvr"), "vlmevalkit", "vstar")
        assert preset("lvr").user_suffix not in lvr.format_question("Q", ["a", "b"])
    finally:
        r.spec = monet


# ---------------------------------------------------------------- answer rules

@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("(C) kevlar", "C"), ("The answer is D.", "D"), ("\\boxed{A}", "A"),
    ("It is made of cotton.", "B"),  # no letter: the one option text in the reply
    ("A or B", None),  # two letters: undecided
    ("Sorry, I can't help with images of people yet.", None),  # VLMEvalKit's 'Z'
    ("leather and rubber", None),  # two option texts
])
def test_vlmevalkit_can_infer(reply, letter):
    assert extract("vlmevalkit", "vstar", reply, OPTS) == letter


def test_vlmevalkit_text_rule_skips_long_replies_and_lmms_eval_hrbench_does_not():
    long = "I think it is cotton. " + "It is hard to tell from this picture. " * 5
    assert extract("vlmevalkit", "hrbench4k", long, OPTS) is None
    assert extract("lmms-eval", "hrbench4k", long, OPTS) == "B"


@pytest.mark.parametrize("reply, letter", [
    ("C", "C"), ("The answer is d", "D"), ("(B)", "B"),
    ("Based on the image", "B"),  # lmms-eval's leading-letter pattern on the upper-cased reply (quirk)
    ("answer: d", "A"),  # the same quirk: 'ANSWER' starts with A
    ("none", None),
])
def test_lmms_eval_vstar_cascade(reply, letter):
    assert extract("lmms-eval", "vstar", reply, OPTS) == letter


@pytest.mark.parametrize("reply, letter", [
    ("The best answer is: C", "C"), ("(E)", "E"), ("Front", "C"),
    ("", "A"),  # quirk of extract_characters_regex: '' is in every choice, the first wins
    ("this is a rather long reply that names no option at all in any way", None),
])
def test_mme_extract_characters_regex(reply, letter):
    assert extract("vlmevalkit", "mme-realworld-lite", reply, MME_OPTS) == letter
    assert extract("lmms-eval", "mme-realworld-lite", reply, MME_OPTS) == letter


def test_method_answer_fields_and_latents_come_first():
    # Monet: the boxed answer wins over a letter in the reasoning before it
    assert extract("vlmevalkit", "vstar", "<latent> Looking at A and C ... \\boxed{D}", OPTS, "boxed") == "D"
    assert extract("vlmevalkit", "vstar", "<latent> Looking at A and C", OPTS, "boxed") is None
    # LVR: the <answer> tag
    assert extract("vlmevalkit", "vstar", "<latent>\n<answer> B </answer>", OPTS, "answer_tag") == "B"
    # VLMEvalKit strips an <answer> wrapper for MME-RealWorld
    assert extract("vlmevalkit", "mme-realworld-lite", "Because ... <answer>D</answer>", MME_OPTS) == "D"


# ---------------------------------------------------------------- scoring

def test_hrbench_score_averages_over_cycles():
    rows = pd.DataFrame(dict(
        cycle=["c0"] * 4 + ["c1"] * 2,
        category=["single", "single", "cross", "cross", "single", "cross"],
        correct=[1, 1, 1, 0, 0, 0]))
    s = score(rows, "hrbench4k")
    # c0: all 3/4, single 1, cross 1/2; c1: all 0, single 0, cross 0 -> averaged over cycles
    assert s == {"overall": pytest.approx((0.75 + 0) / 2), "single": pytest.approx(0.5), "cross": pytest.approx(0.25)}
    assert rows["correct"].mean() == pytest.approx(0.5), "not the micro average"


def test_vstar_and_mme_scores():
    v = pd.DataFrame(dict(category=["direct_attributes"] * 3 + ["relative_position"], correct=[1, 1, 0, 0]))
    assert score(v, "vstar") == {"overall": 0.5, "direct_attributes": pytest.approx(2 / 3), "relative_position": 0.0}
    m = pd.DataFrame(dict(task=["Perception", "Perception", "Reasoning"], category=["OCR", "OCR", "Monitoring"],
                          correct=[1, 0, 1]))
    assert score(m, "mme-realworld-lite") == {"overall": pytest.approx(2 / 3), "Perception": 0.5, "Reasoning": 1.0,
                                              "OCR": 0.5, "Monitoring": 1.0}


def test_paper_reference_table_is_designs():
    assert PAPER["vstar"] == {"CapImagine": 85.9, "Monet": 83.3, "LVR": 81.7, "Qwen2.5-VL-7B": 76.4}
    assert PAPER["hrbench8k"]["LVR"] == 63.0 and PAPER["mme-realworld-lite"]["Monet"] == 46.9
    assert paper_accuracy("direct", "hrbench4k") == 68.0 and paper_accuracy("mirage", "vstar") is None
    assert paper_table().shape == (4, 4)


def test_harness_constants_are_the_harnesses_words():
    assert H.MME_INSTRUCTION.endswith("Respond with only the letter (A, B, C, D, or E) of the correct option.")
    assert H.VLMEVALKIT_MCQ_TAIL == "Please select the correct answer from the options above. \n"
