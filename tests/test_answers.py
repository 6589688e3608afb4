"""Answer extraction per format, the letter cascade, content words, unparsed, option scoring."""

import pytest
import torch
from latentmed.engine.answers import (
    Parsed,
    extract_answer_tag,
    extract_boxed,
    extract_letter,
    margins,
    match_option,
    option_logprobs,
    option_token_ids,
    parse_answer,
    score_options,
)

OPTIONS = ["red", "green", "blue", "yellow"]


def test_boxed_takes_the_last_box_with_nested_braces():
    assert extract_boxed("first \\boxed{A} then \\boxed{\\text{B}}") == "\\text{B}"
    assert extract_boxed("no box here") is None
    assert extract_boxed("\\boxed{unclosed") is None


def test_answer_tag_is_cut_at_the_closing_tag():
    assert extract_answer_tag("<answer> B </answer> because") == "B"
    assert extract_answer_tag("<answer>A</answer><answer> C </answer>") == "C"
    assert extract_answer_tag("<answer> D") == "D"
    assert extract_answer_tag("C") is None


@pytest.mark.parametrize("text,letter", [
    ("B", "B"), ("B.", "B"), ("(C) blue", "C"), ("D) yellow", "D"),
    ("The answer is C.", "C"), ("I think the correct option: B", "B"), ("Answer: D", "D"),
    ("It must be (A) here", "A"), ("so, A. red", "A"), ("well C I guess", "C"),
    ("none of them", None), ("A or B", None), ("B or C", None), ("(A) or (D)", None),
    ("between the two, maybe B or D", None),
])
def test_letter_cascade(text, letter):
    assert extract_letter(text) == letter


def test_letters_beyond_the_options_are_ignored():
    assert extract_letter("E", n_options=4) is None
    assert extract_letter("E", n_options=5) == "E"


def test_content_word_matching():
    assert match_option("blue", OPTIONS) == 2
    assert match_option("  Yellow. ", OPTIONS) == 3
    assert match_option("the star is green", OPTIONS) == 1
    assert match_option("red or blue", OPTIONS) is None
    assert match_option("reddish", OPTIONS) is None


@pytest.mark.parametrize("text,fmt,index", [
    ("<latent> so \\boxed{blue}", "boxed", 2), ("\\boxed{C}", "boxed", 2), ("<answer> A </answer>", "answer_tag", 0),
    ("green", "word", 1), ("B", "letter", 1), ("the answer is D", "boxed", 3), ("I cannot tell", "boxed", None),
    ("", "letter", None), ("\\boxed{A. blue}", "boxed", None), ("\\boxed{C. blue}", "boxed", 2),
    ("\\boxed{blue}", "boxed", 2),
])
def test_parse_answer_per_format(text, fmt, index):
    p = parse_answer(text, fmt, OPTIONS)
    assert p.index == index and p.unparsed == (index is None)
    assert p.letter == (None if index is None else "ABCD"[index])


def test_parsed_unparsed_flag():
    assert Parsed(None, "x").unparsed and not Parsed(0, "A").unparsed


def test_option_tokens_and_scores(tok):
    ids = option_token_ids(tok, OPTIONS)
    assert [tok.decode([i]) for i in ids] == OPTIONS
    spaced = option_token_ids(tok, list("ABCD"), leading_space=True)
    assert [tok.decode([i]) for i in spaced] == [" A", " B", " C", " D"]
    with pytest.raises(ValueError, match="share a first token"):
        option_token_ids(tok, ["red", "red"])
    logits = torch.zeros(len(tok))
    logits[ids[2]] = 5.0
    lp = option_logprobs(logits, ids)
    assert score_options(lp) == 2 and lp[2] > lp[0]
    m = margins(lp)
    assert m[2] == pytest.approx(5.0) and m[0] == pytest.approx(-5.0)


def test_parse_answer_memo_gives_what_a_fresh_parse_gives():
    from latentmed.engine import answers as A

    replies = ["<answer> B </answer>", "blue", "A. blue", "maybe B or D", "The answer is (C)."]
    opts = ["red", "green", "blue", "white"]
    fresh = [A._parse.__wrapped__(t, "answer_tag", tuple(opts)) for t in replies]
    assert [A.parse_answer(t, "answer_tag", opts) for t in replies] == fresh
    assert [A.parse_answer(t, "answer_tag", opts) for t in replies] == fresh  # again, from the memo
    assert A.parse_answer("blue", "plain", None) == A._parse.__wrapped__("blue", "plain", None)
    assert A.parse_answer("A. blue", "plain", ["blue", "red"]).index != A.parse_answer("A. blue", "plain", opts).index
