"""Chapter 7's instrument (analysis/text_mediator): the exact rewrite changes the answer word and
nothing else; items whose span lacks the word are reported; a killed run resumes exactly; a
planted text mediator is found and a reasoner that cannot read its span is not; the pluggable
language-model rewriter runs on a tiny random model."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from latentmed.analysis import text_mediator as tm
from latentmed.engine import interventions as I
from latentmed.engine.query import Query
from latentmed.store import ResultsStore
from latentmed.testbed.items import FAMILIES, TestbedConfig, make_item
from latentmed.zoo.evaluate import decode_config

CONFIG = TestbedConfig(image_size=112, n_objects=(3, 6), n_train=8, n_val=4, n_test=16)


def items(per_family: int = 3):
    return [make_item(CONFIG, "test", f, i) for f in FAMILIES for i in range(per_family)]


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def with_span(r, its, spans):
    """Clean traces of `its` whose imagination span is `spans[n]` (ids, text, or None to keep the
    model's own), continued under the forced protocol as the runner continues them."""
    cfg = decode_config(r, "forced")
    out = []
    for it, sp in zip(its, spans):
        t = r.generate(r.prompt(Query.of(it)), config=cfg)
        if sp is not None:
            edit = I.ReplaceSpan(ids=sp) if isinstance(sp, list) else I.ReplaceSpan(text=sp)
            t = r.continue_from(t, edits=[edit], config=cfg)
        out.append(t)
    return out


def captions(r, its):
    return with_span(r, its, [" " + it.caption for it in its])


def request(tok, span, answer="red", target="green"):
    return tm.RewriteRequest(span, tok.decode(span), "What colour is the star?", ["red", "green", "blue", "yellow"],
                             answer, target)


# ---- the exact rewrite ---------------------------------------------------------------------------------

def test_the_exact_rewrite_changes_the_answer_word_and_nothing_else(fresh, tok):
    r = fresh("capimagine", max_latents=4)
    it = items(1)[0]
    junk = [ids(tok, " the")[0], *ids(tok, "<imagine>"), *ids(tok, " st"), *ids(tok, "ar")]  # non-canonical pieces
    span = junk + ids(tok, " red") + ids(tok, " is") + ids(tok, " red")
    trace = with_span(r, [it], [span])[0]
    assert tm.span_ids(trace) == span
    rw = tm.ExactWordRewriter().rewrite(request(tok, span), tok)
    assert rw.applied and rw.how == "ReplaceSpan (token surgery)"  # CorruptWord would re-encode " st" "ar"
    out = r.continue_from(trace, edits=rw.edits, config=decode_config(r, "forced"))
    new = tm.span_ids(out)
    g = ids(tok, " green")
    assert new == junk + g + ids(tok, " is") + g  # every other token as it was, in place
    assert tok.decode(new) == tok.decode(span).replace(" red", " green")

    canonical = ids(tok, " the star is red")
    rw = tm.ExactWordRewriter().rewrite(request(tok, canonical), tok)
    assert rw.how == "CorruptWord" and rw.edits == [I.CorruptWord(old="red", new="green")]
    assert rw.edits[0].edit_span(canonical, tok) == ids(tok, " the star is") + g

    # "red" inside "reddish" is not the answer word: CorruptWord alone would have written "greendish"
    inside = ids(tok, " the reddish star")
    rw = tm.ExactWordRewriter().rewrite(request(tok, inside), tok)
    assert not rw.applied and not rw.edits and "does not hold the answer word" in rw.status
    assert I.CorruptWord(old="red", new="green").edit_span(inside, tok) != inside  # the hazard is real
    assert tm.replace_word(tok, ids(tok, " the red star"), "red", "blue")[0] == ids(tok, " the blue star")


def test_planted_word_is_seeded_and_never_the_answer():
    opts = ["red", "green", "blue", "yellow"]
    words = [tm.planted_word(opts, "blue", 0, i) for i in range(40)]
    assert "blue" not in words and set(words) == {"red", "green", "yellow"}
    assert words == [tm.planted_word(opts, "blue", 0, i) for i in range(40)]
    assert words != [tm.planted_word(opts, "blue", 1, i) for i in range(40)]


# ---- the runner ---------------------------------------------------------------------------------------

def test_items_whose_span_lacks_the_answer_word_are_reported_not_dropped(fresh, tmp_path):
    r = fresh("capimagine", max_latents=4)
    its = items(2)
    own = [None if n % 2 else " " + it.caption for n, it in enumerate(its)]  # half: the model's own random span
    clean = with_span(r, its, own)
    run = ResultsStore(tmp_path).run("capimagine", "h", {"chapter": 7})
    rows = tm.run_text_study(r, its, run, clean=clean)
    assert len(rows) == len(its) * (1 + len(tm.CONDITIONS))  # a row for every item and condition
    rw = rows[rows["condition"] == tm.key("rewrite")]
    lacking = {it.id for it, t in zip(its, clean) if not tm.word_spans(r.tokenizer.decode(tm.span_ids(t)),
                                                                         it.caption_answer_word)}
    assert lacking and set(rw.loc[~rw["applied"], "item"]) == lacking
    assert rw.loc[~rw["applied"], "status"].str.startswith(tm.NOT_APPLIED).all()
    assert rw.loc[~rw["applied"], "chosen"].isna().all()  # no outcome is made up for them
    spans = tm.span_table(rows).set_index("family").loc["all"]
    assert spans["rewrite not applied"] == len(lacking) and spans["rewrite applied"] == len(its) - len(lacking)
    assert spans["span holds the answer word"] == len(its) - len(lacking)
    assert spans["caption_rewrite applied"] == len(its)  # the caption's rewrite covers every item
    assert tm.not_applied(rows).query("condition == 'rewrite/continue'")["items"].sum() == len(lacking)
    eff = tm.text_effects(rows).set_index("condition")
    assert eff.loc["rewrite/continue", "n"] == len(its) - len(lacking)
    assert eff.loc["caption_rewrite/continue", "n"] == len(its)
    check = tm.instrument_check(rows).set_index("items")
    closed = check.iloc[0]
    assert closed["same answer"] == closed["clean answered"] == closed["n"]  # refill == clean, item for item
    assert closed["log-probs agree to 1e-4"]


def test_a_killed_run_resumes_without_loss_or_duplicates(fresh, tmp_path, monkeypatch):
    r = fresh("capimagine", max_latents=4)
    its = items(2)
    clean = captions(r, its)
    whole = tm.run_text_study(r, its, ResultsStore(tmp_path / "a").run("m", "h", {}), clean=clean, chunk=3)
    run = ResultsStore(tmp_path / "b").run("m", "h", {})
    real, calls = tm.continue_many, {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(tm, "continue_many", dying)
    with pytest.raises(KeyboardInterrupt):
        tm.run_text_study(r, its, run, clean=clean, chunk=3)
    monkeypatch.setattr(tm, "continue_many", real)
    partial = len(run.rows())
    assert 0 < partial < len(whole)
    with open(run.path, "a") as f:  # and a line cut by the kill
        f.write(json.dumps(run.rows()[-1])[:40])
    again = tm.run_text_study(r, its, ResultsStore(tmp_path / "b").run("m", "h", {}), clean=clean, chunk=3)
    cols = ["item", "condition", "chosen", "margin", "applied", "status", "span", "planted", "followed"]
    a = whole[cols].sort_values(["item", "condition"]).reset_index(drop=True)
    b = again[cols].sort_values(["item", "condition"]).reset_index(drop=True)
    assert not again.duplicated(["item", "condition"]).any() and len(again) == len(whole)
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-5)
    done = tm.run_text_study(r, its, ResultsStore(tmp_path / "b").run("m", "h", {}))  # nothing left: no model call
    assert len(done) == len(whole)


def test_batched_continuations_are_continue_from(fresh):
    r = fresh("capimagine", max_latents=4)
    its = items(2)
    clean = with_span(r, its, [" " + it.caption if n % 3 else None for n, it in enumerate(its)])  # 4: a caption
    tok = r.tokenizer
    edits = [[], [I.DeleteSpan()], [I.ShuffleSpan(seed=3)], [I.ReplaceSpan(text=" the star is red")],
             [I.CorruptWord(old="the", new="a")], [], [I.ReplaceSpan(ids=ids(tok, " the"))], [I.DeleteSpan()]]
    cfg = decode_config(r, "forced")
    many = tm.continue_many(r, clean, edits, cfg, batch_size=5)
    for t, e, m in zip(clean, edits, many):
        one = r.continue_from(t, edits=e, config=cfg)
        assert m.ids == one.ids and m.answer_index == one.answer_index and m.answer_step == one.answer_step
        assert m.answer_logprobs == pytest.approx(one.answer_logprobs, abs=1e-4)
        assert tm.span_ids(m) == tm.span_ids(one) and m.segments[0].end == one.segments[0].end
    with pytest.raises(ValueError, match="span edits only"):
        tm.continue_many(r, clean[:1], [[I.ZeroLatent()]], cfg)


def test_a_resumed_run_refuses_other_clean_traces(fresh, tmp_path):
    r = fresh("capimagine", max_latents=4)
    its = items(1)
    run = ResultsStore(tmp_path).run("m", "h", {})
    tm.run_text_study(r, its, run, clean=captions(r, its), conditions=("refill",))
    with pytest.raises(ValueError, match="stored clean spans"):
        tm.run_text_study(r, its, run, clean=with_span(r, its, [" the star is red"] * len(its)))


# ---- planted mediators ---------------------------------------------------------------------------------

def follow(r, t):
    """A planted text mediator's answer: the option whose word the span states (else the first)."""
    opts = t.inputs.query.options
    text = r.tokenizer.decode(tm.span_ids(t))
    said = [i for i, o in enumerate(opts) if tm.word_spans(text, o)]
    logits = torch.zeros(len(opts))
    if said:
        logits[said[0]] = 8.0
    t.answer_logprobs = torch.log_softmax(logits, 0).tolist()
    t.answer_index = int(logits.argmax())
    return t


def study(r, its, clean, tmp_path, name):
    rows = tm.run_text_study(r, its, ResultsStore(tmp_path / name).run(name, "h", {}), clean=clean)
    return tm.comparison(tm.text_effects(rows), pd.DataFrame(columns=["model", "condition", "p_mcnemar",
                                                                      "p_wilcoxon"])).set_index("condition")


def test_a_planted_text_mediator_is_found_and_a_span_blind_reasoner_is_not(fresh, tmp_path):
    its = items(3)
    real = fresh("capimagine", max_latents=4)
    cont = tm.continue_many
    with pytest.MonkeyPatch.context() as mp:  # every continuation answers what its span states
        mp.setattr(tm, "continue_many", lambda r, *a, **kw: [follow(r, t) for t in cont(r, *a, **kw)])
        found = study(real, its, [follow(real, t) for t in captions(real, its)], tmp_path, "follow")
    for cond in ("rewrite/continue", "caption_rewrite/continue"):
        f = found.loc[cond]
        assert f["n"] == len(its) and f["acc_clean"] == 1 and f["acc"] == 0
        assert f["follow"] == 1 and f["follow_ref"] == 0 and f["p_follow_holm"] < 0.05 and f["p_mcnemar_holm"] < 0.05

    blind = fresh("capimagine", max_latents=4, after_segment="no_slots")  # positions after the span cannot read it
    none = study(blind, its, captions(blind, its), tmp_path, "blind")
    for cond in ("rewrite/continue", "caption_rewrite/continue", "shuffle/continue"):  # same length: exactly nothing
        b = none.loc[cond]
        assert b["flip_rate"] == 0 and b["diff"] == 0 and b["p_mcnemar"] == 1
        assert b["margin_change"] == pytest.approx(0, abs=1e-4)
    assert none.loc["rewrite/continue", "follow"] == none.loc["rewrite/continue", "follow_ref"]


# ---- the language-model rewriter -----------------------------------------------------------------------

def test_the_language_model_rewriter_runs_on_a_tiny_random_model(load, tok, tmp_path):
    lm = tm.LMRewriter(load("direct").model, load("direct").tokenizer, max_new_tokens=12, name="lm:tiny")
    assert isinstance(lm, tm.Rewriter) and isinstance(tm.ExactWordRewriter(), tm.Rewriter)
    req = request(tok, ids(tok, " the star is red"))
    first = lm.rewrite(req, tok)
    assert lm.rewrite(req, tok).text == first.text  # greedy: deterministic
    if not first.applied:  # a random model rarely writes the target word: reported, not applied
        assert not first.edits and "does not state" in first.status or "still states" in first.status

    class Scripted(tm.LMRewriter):
        def reply(self, request):
            return f"the star is {request.target_word}"

    ok = Scripted(None, tok, name="lm:scripted").rewrite(req, tok)
    assert ok.applied and ok.edits == [I.ReplaceSpan(text=" the star is green")]
    stays = type("Stays", (tm.LMRewriter,), {"reply": lambda self, q: "the star is red or green"})(None, tok, name="x")
    assert not stays.rewrite(req, tok).applied

    from transformers import Qwen2Config, Qwen2ForCausalLM
    folder = tmp_path / "lm"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(folder)
    tok.save_pretrained(folder)
    loaded = tm.LMRewriter.from_pretrained(folder, max_new_tokens=6)
    assert loaded.name == "lm:lm" and isinstance(loaded.reply(req), str)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors"):
        tm.LMRewriter.from_pretrained(folder)
