"""The engine as one trustworthy instrument: every entry point applies what it records or refuses it.

The matrix runs every registered intervention class through every entry point (generate, the
shared sweep, replay, continue_from, regenerate) on a tiny random model: either the run differs
from the clean run of the same entry point where the edit must change it, or the call raises a
clear error. A class added to the registry without a row here fails `test_matrix_covers_every_class`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import OPTIONS
from latentmed.engine import interventions as I
from latentmed.engine.decode import DecodeConfig, pick
from latentmed.engine.query import Query
from latentmed.engine.sweep import naive_sweep, shared_sweep

K = 4
GEN = dict(max_new_tokens=10, force_latent=True)


def examples(r, images) -> dict[str, I.Intervention]:
    """One instance per registered class that must change a run of the tiny model."""
    H = r.hidden_size
    g = torch.Generator().manual_seed(0)
    return {
        "ZeroLatent": I.ZeroLatent(), "FixedLatent": I.FixedLatent(vector=torch.randn(H, generator=g).tolist()),
        "MeanLatent": I.MeanLatent(vector=torch.randn(H, generator=g).tolist()),
        "NoiseLatent": I.NoiseLatent(scale=1.0, mode="replace"), "ExtremeLatent": I.ExtremeLatent(value=30.0),
        "SwapLatent": I.SwapLatent(source=torch.randn(K, H, generator=g).tolist()),
        "RepeatFirstLatent": I.RepeatFirstLatent(), "ShuffleLatents": I.ShuffleLatents(seed=1),
        "ChangeK": I.ChangeK(k=2), "DropSegment": I.DropSegment(), "MarkersOnly": I.MarkersOnly(),
        "BlankImage": I.BlankImage(), "NoiseImage": I.NoiseImage(std=80.0), "OtherImage": I.OtherImage(image=images[1]),
        "MaskPatches": I.MaskPatches(boxes=[[0, 0, 0.6, 0.6]]), "MaskEvidence": I.MaskEvidence(),
        "SwapQuestion": I.SwapQuestion(question="How many squares are there in the picture?"),
        "ShuffleOptions": I.ShuffleOptions(seed=0),
        "MaskImageTokens": I.MaskImageTokens(), "NoiseImageFeatures": I.NoiseImageFeatures(scale=2.0),
        "HookEdit": I.HookEdit(hook="blocks.0.hook_resid_post", positions="latents", op="zero"),
        "Record": I.Record(hooks=["blocks.1.hook_resid_post", "latent.hook_in"]),
        "Knockout": I.Knockout(query="after_segment", key="latents"),
        "DeleteSpan": I.DeleteSpan(), "ShuffleSpan": I.ShuffleSpan(seed=0),
        "ReplaceSpan": I.ReplaceSpan(text=" the star is red"), "CorruptWord": I.CorruptWord(old="a", new="x"),
    }


SPAN = ("DeleteSpan", "ShuffleSpan", "ReplaceSpan", "CorruptWord")
READ_ONLY = ("Record",)


@pytest.fixture(scope="module")
def latent_setup(load, images):
    r = load("monet-sft", n_latents=K)
    q = Query(images=[images[0]], question="What colour is the square?", options=OPTIONS,
              evidence_boxes=[[10, 10, 34, 34]])
    p = r.prompt(q)
    return r, p, r.generate(p, **GEN)


@pytest.fixture(scope="module")
def span_setup(load, images):
    r = load("capimagine", max_latents=4)
    p = r.build_inputs(images[0], "What colour?", OPTIONS)
    return r, p, r.generate(p, **GEN)


def run_entry(entry: str, r, p, clean, ivs):
    """(option log-probs of the answer-bearing steps, the run) at one entry point."""
    if entry == "generate":
        t = r.generate(p, ivs, **GEN)
        return t.step_option_logprobs, t
    if entry == "sweep":
        t = shared_sweep(r, p, [[], ivs], **GEN)[1]
        return t.step_option_logprobs, t
    if entry == "replay":
        res = r.replay(clean, ivs)
        return res.step_option_logprobs, res
    if entry == "continue_from":
        t = r.continue_from(clean, edits=ivs)
        return t.step_option_logprobs, t
    t = r.regenerate(clean, ivs)
    return t.step_option_logprobs, t


def differs(a, b) -> bool:
    if a is None or b is None:
        return (a is None) != (b is None)
    if a.shape != b.shape:
        return True
    return not torch.allclose(a, b, atol=1e-6, rtol=0, equal_nan=True)


def test_matrix_covers_every_class(latent_setup, images):
    r = latent_setup[0]
    assert set(examples(r, images)) == set(I.REGISTRY), set(I.REGISTRY) ^ set(examples(r, images))


@pytest.mark.parametrize("entry", I.ENTRY_POINTS)
@pytest.mark.parametrize("name", sorted(I.REGISTRY))
def test_every_intervention_at_every_entry_point_acts_or_is_refused(name, entry, latent_setup, span_setup, images):
    r, p, clean = span_setup if name in SPAN else latent_setup
    iv = examples(r, images)[name]
    if name == "CorruptWord":  # a word the generated span really holds
        span = r.tokenizer.decode([clean.ids[q] for q in clean.segments[0].slots]).split()
        if not span:
            pytest.skip("the random model wrote an empty span")
        iv = I.CorruptWord(old=span[0], new="zzz")
    base, _ = run_entry(entry, r, p, clean, [])
    try:
        lp, out = run_entry(entry, r, p, clean, [iv])
    except ValueError as exc:  # refused: the message names the intervention or what it needs
        msg = str(exc)
        assert name in msg or "needs" in msg or "has none" in msg, msg
        return
    if name in READ_ONLY:
        assert not differs(lp, base) and out.records, (name, entry)
        return
    assert differs(lp, base), f"{name} at {entry} was accepted but changed nothing"
    if hasattr(out, "interventions"):
        assert [d["kind"] for d in out.interventions] == [name]


def test_nothing_is_recorded_as_applied_that_was_not(load, images):
    r = load("mirage")  # model-decided trigger: the random model never opens the segment on its own
    p = r.build_inputs(images[0], "What colour?", OPTIONS)
    t = r.generate(p, [I.ZeroLatent(), I.BlankImage()], max_new_tokens=6)
    assert not t.segments
    assert [d["kind"] for d in t.interventions] == ["BlankImage"]
    assert t.skipped == [{"kind": "ZeroLatent", "steps": None, "why": "no latent segment was opened"}]
    with pytest.raises(ValueError, match="ZeroLatent .*replay.* has none"):
        r.replay(t, [I.ZeroLatent()])


def test_input_edits_rebuild_the_prompt_in_every_entry_point(latent_setup, images):
    r, p, clean = latent_setup
    blank = I.BlankImage()
    manual = r.prompt(p.query, [blank])
    direct = r.generate(manual, **GEN)
    via = r.generate(p, [blank], **GEN)
    assert via.generated_ids == direct.generated_ids
    torch.testing.assert_close(via.step_option_logprobs, direct.step_option_logprobs, atol=1e-6, rtol=0)
    # replay on the edited input equals replaying the same generated ids with the prompt built by hand
    a = r.replay(clean, [blank])
    b = r.replay(dataclasses.replace(clean, inputs=manual))
    torch.testing.assert_close(a.step_option_logprobs, b.step_option_logprobs, atol=1e-6, rtol=0)
    # a prompt without a query cannot be rebuilt: a clear error instead of a silent no-op
    bare = dataclasses.replace(p, query=None)
    with pytest.raises(ValueError, match="BlankImage is an input edit"):
        r.generate(bare, [blank], **GEN)


def test_question_swap_shifts_generated_positions_in_replay(latent_setup):
    r, p, clean = latent_setup
    long_q = I.SwapQuestion(question="What colour is the square in the middle of the grey picture, please?")
    res = r.replay(clean, [long_q])
    shift = len(res.ids) - len(clean.ids)
    assert shift > 0
    seg = clean.segments[0]
    assert res.segments[0].slots == [s + shift for s in seg.slots]
    # the recorded latents sit at the shifted slots: the states there are the model's response to them
    assert res.answer_logprobs is not None


def test_teacher_forced_replay_and_regeneration_differ_where_they_must(latent_setup):
    """Zeroing latent 0: replay keeps latents 1.. as recorded, regeneration recomputes them."""
    r, p, clean = latent_setup
    edit = [I.ZeroLatent(steps=[0])]
    again = r.regenerate(clean, edit)
    z = clean.segments[0].z_in
    assert torch.count_nonzero(again.segments[0].z_in[0]) == 0
    assert not torch.allclose(again.segments[0].z_in[1:], z[1:])  # the change propagated
    forced = r.replay(clean, edit)  # teacher-forced: later latents stay as recorded
    rec = r.replay(clean, [I.ZeroLatent(steps=[0]), I.Record(hooks=["latent.hook_in"])])
    assert rec.segments[0].slots == clean.segments[0].slots
    # the replayed hidden states at slots 2.. are computed from the recorded latents 1..
    h_re = forced.hidden[clean.segments[0].slots[1:]]
    assert h_re.shape[0] == K - 1
    cont = r.continue_from(clean, new_latents=again.segments[0].z_in)
    torch.testing.assert_close(cont.segments[0].z_in, again.segments[0].z_in)
    assert cont.generated_ids[len(clean.segments[0].slots) + 2:] == again.generated_ids[len(clean.segments[0].slots) + 2:]


def test_knockout_in_decoding_equals_knockout_in_replay(latent_setup):
    r, p, clean = latent_setup
    for ko in (I.Knockout(query="after_segment", key="latents"), I.Knockout(query="latents", key="image"),
               I.Knockout(query="after_segment", key="before_segment")):
        t = r.generate(p, [ko], **GEN)
        res = r.replay(t, [ko])
        torch.testing.assert_close(res.step_option_logprobs, t.step_option_logprobs, atol=1e-5, rtol=0)
        plain = r.replay(t)
        assert differs(plain.step_option_logprobs, t.step_option_logprobs), ko


def test_bottleneck_spec_closes_the_route_around_the_latents(fresh, images):
    """With `after_segment="segment"`, every position from the end marker on attends only to the
    segment and later positions (checked on the attention patterns, in decoding and in replay);
    the slots themselves still read the image."""
    L = 2
    rec = I.Record(hooks=[f"blocks.{i}.attn.hook_pattern" for i in range(L)], positions="all")
    for spec_kw, closed in ((dict(after_segment="segment"), True), ({}, False)):
        r = fresh("monet-sft", n_latents=K, **spec_kw)
        p = r.build_inputs(images[0], "What colour?", OPTIONS)
        t = r.generate(p, [rec], **GEN)
        seg = t.segments[0]
        for res in (t, r.replay(t, [rec])):
            for i in range(L):
                pat, where = res.records[f"blocks.{i}.attn.hook_pattern"], res.record_positions[f"blocks.{i}.attn.hook_pattern"]
                after = [j for j, q in enumerate(where) if q >= seg.end]
                before_mass = pat[after][..., :seg.start].sum(-1)
                assert (before_mass.max() < 1e-6) == closed, (spec_kw, i, before_mass.max())
                slot_rows = [j for j, q in enumerate(where) if q in seg.slots]
                assert pat[slot_rows][..., :seg.start].sum(-1).min() > 1e-3  # the slots see the prompt
        if closed:  # the bottleneck leaves the route through the slots open:
            moved = r.regenerate(t, [I.OtherImage(image=images[2])])
            assert not torch.allclose(moved.segments[0].z_in, seg.z_in)  # the latents read the image


def test_repeat_first_latent(latent_setup):
    r, p, clean = latent_setup
    t = r.generate(p, [I.RepeatFirstLatent()], **GEN)
    z = t.segments[0].z_in
    assert torch.equal(z, z[:1].expand(K, -1)) and torch.equal(z[0], clean.segments[0].z_in[0])


def test_shared_sweep_with_input_edits_equals_naive(latent_setup, images):
    r, p, clean = latent_setup
    vs = [[], I.ZeroLatent(), I.BlankImage(), I.OtherImage(image=images[2]), [I.NoiseImage(std=50.0), I.ZeroLatent()],
          I.MaskImageTokens(indices=[0, 1]), I.Knockout(), I.SwapQuestion(question="Which digit is it?")]
    shared, naive = shared_sweep(r, p, vs, **GEN), naive_sweep(r, p, vs, **GEN)
    for a, b in zip(shared, naive):
        assert a.generated_ids == b.generated_ids and a.interventions == b.interventions
        torch.testing.assert_close(a.step_option_logprobs, b.step_option_logprobs, atol=1e-4, rtol=0)
    assert len({tuple(x.step_option_logprobs[0].tolist()) for x in shared}) > 3


def test_sampling_matches_an_independent_reference():
    """Temperature and top-p against probabilities computed by hand."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    cfg = DecodeConfig(do_sample=True, temperature=0.5, top_p=0.8)
    p = torch.softmax(logits / 0.5, -1)
    keep = torch.zeros(5, dtype=torch.bool)
    order = p.argsort(descending=True)
    mass = 0.0
    for i in order.tolist():  # the smallest set whose mass reaches top_p
        keep[i] = True
        mass += float(p[i])
        if mass >= 0.8:
            break
    want = torch.where(keep, p, torch.zeros(5))
    want = want / want.sum()
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.tensor([pick(logits, cfg, g) for _ in range(n)]), minlength=5).float() / n
    torch.testing.assert_close(counts, want, atol=0.015, rtol=0)
    hot = DecodeConfig(do_sample=True, temperature=2.0)
    g = torch.Generator().manual_seed(1)
    counts = torch.bincount(torch.tensor([pick(logits, hot, g) for _ in range(n)]), minlength=5).float() / n
    torch.testing.assert_close(counts, torch.softmax(logits / 2.0, -1), atol=0.015, rtol=0)


@pytest.mark.parametrize("kw, field", [(dict(max_new_tokens=-5), "max_new_tokens"), (dict(temperature=-1), "temperature"),
                                       (dict(top_p=1.5), "top_p"), (dict(top_p=0), "top_p"),
                                       (dict(max_new_tokens=2.5), "max_new_tokens"), (dict(seed="a"), "seed")])
def test_decode_settings_are_checked(kw, field, latent_setup):
    with pytest.raises(ValueError, match=f"DecodeConfig.{field}"):
        DecodeConfig(**kw)
    r, p, _ = latent_setup
    with pytest.raises(ValueError, match="unknown decode setting"):
        r.generate(p, max_new_token=4)


def test_replay_flags_non_finite_latents(latent_setup):
    r, p, clean = latent_setup
    res = r.replay(clean, [I.FixedLatent(vector=[float("nan")] * r.hidden_size)])
    assert res.nan and res.answer_index is None


def test_trace_files_are_bound_to_their_sidecar(latent_setup, tmp_path):
    from latentmed.engine.trace import Trace
    from latentmed.files import DamagedFileError

    r, p, clean = latent_setup
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    clean.save(a)
    other = r.generate(p, [I.ZeroLatent()], **GEN)
    other.save(b)
    back = Trace.load(a)
    assert torch.equal(back.segments[0].z_in, clean.segments[0].z_in.float())
    (tmp_path / "a.json.safetensors").write_bytes((tmp_path / "b.json.safetensors").read_bytes())
    with pytest.raises(DamagedFileError, match="do not belong to"):
        Trace.load(a)
    (tmp_path / "b.json.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="b.json.safetensors: missing"):
        Trace.load(b)


@pytest.mark.parametrize("kw, msg", [
    (dict(options="red"), "options must be a list of strings"), (dict(options=["red", "red"]), "duplicate options"),
    (dict(question=""), "the question is empty"), (dict(options=[f"o{i}" for i in range(9)]), "9 options"),
    (dict(images=[42]), "expected a PIL image"), (dict(answer=7), "answer index 7"),
])
def test_queries_are_checked(kw, msg, images):
    base = dict(images=[images[0]], question="What colour?", options=OPTIONS)
    with pytest.raises((ValueError, TypeError), match=msg):
        Query(**{**base, **kw})


def test_query_accepts_paths_and_arrays(images, tmp_path):
    import numpy as np
    from PIL import Image

    images[0].save(tmp_path / "s.png")
    q = Query(images=[str(tmp_path / "s.png"), np.asarray(images[1])], question="What colour?")
    assert all(isinstance(im, Image.Image) for im in q.images)
    with pytest.raises(ValueError, match="empty image|aspect ratio"):
        Query(images=[Image.new("RGB", (1000, 2))], question="q")


@pytest.mark.parametrize("source", ["constant", "evidence_crop", "evidence_tokens"])
def test_outside_latent_sources_always_feed_their_k_vectors(ckpt_copy, images, source):
    """The controls' latents come from outside the model: it cannot end the segment early, and
    the vectors fed are the source's (the constant stored with the checkpoint, or the crop's
    merged tokens)."""
    from safetensors.torch import save_file

    from latentmed.engine.checkpoint import CONSTANT_FILE
    from latentmed.engine.inputs import pixels
    from latentmed.engine.reasoner import LatentReasoner

    const = torch.randn(K, 64)
    save_file({"latent": const}, str(ckpt_copy / CONSTANT_FILE))
    r = LatentReasoner.from_pretrained(ckpt_copy, method="mirage", n_latents=K, max_latents=0,
                                       end_rule="force_after_k", latent_source=source,
                                       **({"prompt_image": "degraded"} if source != "constant" else {}))
    q = Query(images=[images[0]], question="What colour?", options=OPTIONS, crop=images[1].resize((56, 56)),
              evidence_boxes=[[30, 2, 50, 20], [2, 60, 20, 80]])
    p = r.prompt(q)
    boost = r.model.lm_head.register_forward_hook(lambda m, a, out: out.index_add(
        -1, torch.tensor([r.ids.end]), torch.full(out.shape[:-1] + (1,), 1e4)))
    try:
        t = r.generate(p, max_new_tokens=8, force_latent=True)
    finally:
        boost.remove()
    z = t.segments[0].z_in
    assert len(t.segments[0].slots) == K
    want = r.constant if source == "constant" else r.source_features(p)[torch.arange(K) % len(r.source_features(p))]
    torch.testing.assert_close(z, want.float())
    if source == "constant":
        torch.testing.assert_close(r.constant, const)
    else:  # the prompt shows the degraded image
        if source == "evidence_tokens":  # the scene's tokens under the two boxes' centres (112 px: 4 x 4 tokens)
            assert p.source_index == [1, 8]
            full = r._tower(*pixels(r.processor, [images[0]]))
            torch.testing.assert_close(r.source_features(p), full[[1, 8]])
        assert not torch.equal(p.pixel_values, pixels(r.processor, [images[0]])[0])


def test_replay_many_equals_one_replay_at_a_time(latent_setup, images):
    """Batched replays (left-padded, each with its own edits, rules and rebuilt prompts) equal
    single ones."""
    from latentmed.engine.replay import replay_many

    r, p, clean = latent_setup
    other = r.generate(r.build_inputs(images[1], "Which colour is the small square?", OPTIONS), **GEN)
    jobs = [(clean, []), (clean, [I.ZeroLatent(steps=[1])]), (other, [I.Knockout()]), (other, [I.ChangeK(k=2)]),
            (clean, [I.SwapQuestion(question="What is it?")]), (clean, [I.MaskImageTokens(indices=[3])])]
    many = replay_many(r, [t for t, _ in jobs], [e for _, e in jobs], batch_size=4)
    for (t, e), got in zip(jobs, many):
        one = r.replay(t, e)
        assert got.ids == one.ids and got.answer_index == one.answer_index
        torch.testing.assert_close(got.step_option_logprobs, one.step_option_logprobs, atol=1e-5, rtol=0)


def test_a_segment_without_an_end_marker_ends_after_its_last_slot(load, images):
    """LVR's quota ends a segment with no end marker: the positions after its last slot are
    "after the segment" for the attention rules, in decoding and in replay."""
    r = load("lvr", n_latents=3)
    p = r.build_inputs(images[0], "What colour?", OPTIONS)
    rec = I.Record(hooks=["blocks.1.attn.hook_pattern"], positions="all")
    ko = I.Knockout(query="after_segment", key="latents")
    t = r.generate(p, [ko, rec], max_new_tokens=8, force_latent=True)
    seg = t.segments[0]
    assert seg.end is None and seg.ended == "quota" and len(seg.slots) == 3
    for res in (t, r.replay(t, [ko, rec])):
        pat, where = res.records["blocks.1.attn.hook_pattern"], res.record_positions["blocks.1.attn.hook_pattern"]
        after = [j for j, q in enumerate(where) if q > max(seg.slots)]
        assert after and float(pat[after][..., seg.slots].sum()) < 1e-6
        slot_rows = [j for j, q in enumerate(where) if q in seg.slots[1:]]
        assert float(pat[slot_rows][..., seg.slots[0]].sum()) > 0  # the slots themselves still see each other


def test_recording_a_run_of_positions_as_one_block_equals_recording_each(fresh, images, monkeypatch):
    from latentmed.engine import hooks

    rec = I.Record(hooks=["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern", "ln_final.hook_normalized",
                          "vision.hook_out"], positions="all")
    r = fresh("monet-sft", n_latents=K)
    p = r.build_inputs(images[0], "What colour?", OPTIONS)
    blocks = []
    real = hooks.Recorder.add_rows
    monkeypatch.setattr(hooks.Recorder, "add_rows", lambda self, *a: blocks.append(a[0]) or real(self, *a))
    got = r.generate(p, [rec], **GEN)
    replayed = r.replay(got, [rec])
    assert {"blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"} <= set(blocks)  # the prefill took the block path

    def one_by_one(name, items, x, recorders, cursor, pattern=False):  # the hook as it was: each column alone
        T = x.shape[2] if pattern else x.shape[1]
        for kind, r_, iv in items:
            assert kind == "record"
            for c, q in hooks._columns(iv.positions, cursor, r_, T):
                recorders[r_].add(name, q, x[r_, :, c] if pattern else x[r_, c])

    monkeypatch.setattr(hooks, "_apply", one_by_one)
    ref = r.generate(p, [rec], **GEN)
    ref_replayed = r.replay(ref, [rec])
    for a, b in ((got, ref), (replayed, ref_replayed)):
        assert a.records.keys() == b.records.keys() and a.record_positions == b.record_positions
        for k in a.records:
            assert torch.equal(a.records[k], b.records[k]), k
    assert got.records["blocks.0.attn.hook_pattern"].shape[0] == len(got.record_positions["blocks.0.attn.hook_pattern"])
