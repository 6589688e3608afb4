"""Every intervention does what it says, at its point, and serialises to a dict and back."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import OPTIONS
from latentmed.engine import interventions as I
from latentmed.engine.query import Query


@pytest.fixture(scope="module")
def setup(load, images):
    r = load("monet-sft", n_latents=4)
    p = r.build_inputs(images[0], "What colour is the square?", OPTIONS)
    return r, p, r.generate(p, max_new_tokens=12, force_latent=True)


def run(setup, *ivs, **kw):
    r, p, _ = setup
    return r.generate(p, list(ivs), max_new_tokens=12, force_latent=True, **kw)


def test_zero_latent_feeds_zero_vectors(setup):
    seg = run(setup, I.ZeroLatent()).segments[0]
    assert len(seg.slots) == 4 and torch.count_nonzero(seg.z_in) == 0


def test_noise_has_the_asked_norm_relative_to_the_latent(setup):
    seg = run(setup, I.NoiseLatent(scale=0.5, mode="replace", seed=3)).segments[0]
    clean = setup[2].segments[0]
    # latent k is fed the noise only: its norm is 0.5 x the hidden it replaced
    assert seg.z_in[0].norm() / clean.z_in[0].norm() == pytest.approx(0.5, rel=1e-5)
    ratio = seg.z_in[1:].norm(dim=-1) / seg.z_out[:-1].norm(dim=-1)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.5), atol=0, rtol=1e-5)
    added = run(setup, I.NoiseLatent(scale=0.5, mode="add", seed=3)).segments[0]
    assert ((added.z_in[0] - clean.z_in[0]).norm() / clean.z_in[0].norm()).item() == pytest.approx(0.5, rel=1e-5)


def test_feed_rows_equals_each_rows_edits_in_order():
    """The decode loop feeds a step's latents as one block: the same vectors as each row's edits
    applied one by one (noise in both modes, step limits, two edits on one row, no edit)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 16, generator=g) * torch.arange(1, 8)[:, None]
    first = torch.randn(16, generator=g)
    row_ivs = [[I.NoiseLatent(scale=0.3, mode="add", seed=1)], [I.NoiseLatent(scale=3.0, mode="replace", seed=2)],
               [I.NoiseLatent(scale=1.0, seed=1, steps=[0])], [],
               [I.NoiseLatent(scale=0.5, mode="replace", seed=4), I.ExtremeLatent(value=2.0, mode="scale")],
               [I.ZeroLatent(), I.NoiseLatent(scale=1.0, seed=5)], [I.RepeatFirstLatent()]]
    ctxs = [I.FeedContext(k=k, segment=s, row=i, first=first) for i, (k, s) in
            enumerate([(0, 0), (3, 0), (2, 0), (1, 0), (1, 1), (0, 0), (2, 0)])]
    want = []
    for v, c, x in zip(row_ivs, ctxs, z):
        for iv in v:
            x = iv.feed(x, c)
        want.append(x)
    got = I.feed_rows(row_ivs, z.clone(), ctxs)
    assert torch.equal(got, torch.stack(want))
    assert torch.equal(got[2], z[2]) and torch.equal(got[3], z[3]) and torch.equal(got[6], first)  # steps, none, first
    assert not torch.equal(got[0], z[0]) and torch.count_nonzero(got[5]) == 0  # each edit acts


def test_swap_fixed_mean_extreme_and_steps(setup):
    r, _, clean = setup
    other = torch.randn(4, r.hidden_size)
    assert torch.equal(run(setup, I.SwapLatent(source=other.tolist())).segments[0].z_in, other)
    v = torch.randn(r.hidden_size)
    assert torch.equal(run(setup, I.FixedLatent(vector=v.tolist())).segments[0].z_in, v.expand(4, -1))
    assert torch.equal(run(setup, I.MeanLatent(vector=v.tolist())).segments[0].z_in, v.expand(4, -1))
    assert torch.equal(run(setup, I.ExtremeLatent(value=1e3)).segments[0].z_in, torch.full((4, r.hidden_size), 1e3))
    z = run(setup, I.ZeroLatent(steps=[2])).segments[0].z_in
    assert torch.count_nonzero(z[2]) == 0 and torch.equal(z[:2], clean.segments[0].z_in[:2])
    with pytest.raises(ValueError, match="expected"):
        run(setup, I.FixedLatent(vector=[1.0, 2.0]))


def test_shuffle_uses_a_seeded_derangement_of_the_source(setup):
    z = setup[2].segments[0].z_in
    iv = I.ShuffleLatents(seed=5, source=z.tolist())
    assert all(o != i for i, o in enumerate(iv.order(4)))
    assert torch.equal(run(setup, iv).segments[0].z_in, z[iv.order(4)])
    with pytest.raises(ValueError, match="needs `source`"):
        run(setup, I.ShuffleLatents(seed=5))


def test_mean_latent_helper(setup):
    r, p, clean = setup
    other = r.generate(r.build_inputs(None, "q", OPTIONS), max_new_tokens=8, force_latent=True)
    mean = torch.tensor(I.mean_latent([clean, other]))
    torch.testing.assert_close(mean, torch.cat([clean.segments[0].z_in, other.segments[0].z_in]).mean(0))


def test_segment_control_changes_k_drops_or_keeps_markers(setup):
    r, _, clean = setup
    P = len(clean.prompt_ids)
    assert len(run(setup, I.ChangeK(k=2)).segments[0].slots) == 2
    assert len(run(setup, I.ChangeK(k=6)).segments[0].slots) == 6
    markers = run(setup, I.MarkersOnly())
    seg = markers.segments[0]
    assert seg.slots == [] and seg.end == P + 1 and markers.generated_ids[:2] == [r.ids.start, r.ids.end]
    assert run(setup, I.DropSegment()).segments == []
    K = len(clean.segments[0].slots)
    assert len(run(setup, I.ChangeK(k=2, segment=0)).segments[0].slots) == 2  # the first segment only
    assert len(run(setup, I.ChangeK(k=2, segment=1)).segments[0].slots) == K  # a later one: the first keeps K


def test_input_edits_act_on_the_query(load, images, tmp_path):
    r = load("monet-sft", n_latents=4)
    q = Query(images=[images[0]], question="What colour?", options=OPTIONS, answer=1,
              evidence_boxes=[[20, 20, 40, 40]])
    blank = I.BlankImage().edit_query(q).images[0]
    assert blank.size == images[0].size and blank.getcolors() == [(112 * 112, (128, 128, 128))]
    masked = I.MaskPatches(boxes=[[0, 0, 0.5, 0.5]], colour=(0, 0, 0)).edit_query(q).images[0]
    assert masked.getpixel((10, 10)) == (0, 0, 0) and masked.getpixel((100, 100)) == images[0].getpixel((100, 100))
    ev = I.MaskEvidence(pad=0, colour=(0, 0, 0)).edit_query(q).images[0]
    assert ev.getpixel((30, 30)) == (0, 0, 0) and ev.getpixel((60, 60)) == images[0].getpixel((60, 60))
    n1, n2 = (I.NoiseImage(seed=1).edit_query(q).images[0] for _ in range(2))
    assert np.array_equal(np.asarray(n1), np.asarray(n2)) and not np.array_equal(np.asarray(n1), np.asarray(images[0]))
    assert I.OtherImage(image=images[1]).edit_query(q).images == [images[1]]
    images[2].save(tmp_path / "other.png")
    assert I.OtherImage(path=str(tmp_path / "other.png")).edit_query(q).images[0].size == (112, 112)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"{tmp_path / 'bad.png'}: cannot read image"):
        I.OtherImage(path=str(tmp_path / "bad.png")).edit_query(q)
    shuffled = I.ShuffleOptions(seed=1)
    order = shuffled.order(4)
    assert sorted(order) == [0, 1, 2, 3] and all(o != i for i, o in enumerate(order))  # a derangement
    e = shuffled.edit_query(q)
    assert e.options == [OPTIONS[i] for i in order] and e.options[e.answer] == OPTIONS[1]
    p = r.build_inputs(images[0], "What colour?", OPTIONS, edits=[shuffled, I.SwapQuestion("Which digit?")])
    assert p.options == [OPTIONS[i] for i in order] and p.question == "Which digit?"
    assert "Which digit?" in p.text


def test_swap_question_keeps_restated_key_words_consistent(tmp_path):
    from latentmed import zoo
    from latentmed.engine.reasoner import LatentReasoner
    from latentmed.engine.tiny import make_tiny_checkpoint
    from latentmed.testbed import VOCABULARY, TestbedConfig, make_item

    folder = make_tiny_checkpoint(tmp_path / "ck", words=VOCABULARY)
    zoo.SPECS["mirage-style"].save(folder)
    r = LatentReasoner.from_pretrained(folder)
    cfg = TestbedConfig()
    a, b = make_item(cfg, "test", "attr", 0), make_item(cfg, "test", "count", 0)
    p = r.item_inputs(a, [I.SwapQuestion(question=b.question, keywords=b.keywords)])
    words = r.tokenizer.decode(p.after_segment_ids).split()
    assert words == b.keywords and p.text.rstrip().endswith(b.question + "".join(f" {k}" for k in b.keywords))
    assert p.options == a.options


def test_feature_edits_act_on_the_visual_encoder_output(setup):
    r, p, clean = setup
    with torch.inference_mode():
        f, _ = r.image_features([p], [[I.MaskImageTokens(indices=[0, 3])]])
        base, _ = r.image_features([p], [[]])
    assert torch.count_nonzero(f[[0, 3]]) == 0 and torch.equal(f[1:3], base[1:3])
    noisy = run(setup, I.NoiseImageFeatures(scale=0.5))
    assert not torch.equal(noisy.segments[0].z_in[0], clean.segments[0].z_in[0])
    with pytest.raises(ValueError, match="beyond the"):
        run(setup, I.MaskImageTokens(indices=[10_000]))


def test_hook_edits_are_temporary_and_act_at_their_positions(setup):
    r, _, clean = setup
    seg = clean.segments[0]
    layer = r.layers[1]
    hooks_before = dict(layer._forward_hooks)  # transformers may keep its own recording hooks
    base = r.replay(clean)
    edited = r.replay(clean, [I.HookEdit(hook="blocks.1.hook_resid_post", positions=[seg.slots[1]], op="zero")])
    assert layer._forward_hooks == hooks_before
    diff = (edited.hidden - base.hidden).abs().amax(-1)
    assert diff[:seg.slots[1]].max() == 0 and diff[seg.slots[1]] > 0
    decoded = run(setup, I.HookEdit(hook="blocks.1.hook_resid_post", positions="latents", op="scale", factor=0.0))
    assert layer._forward_hooks == hooks_before
    assert torch.equal(decoded.segments[0].z_in[0], seg.z_in[0])
    assert not torch.allclose(decoded.segments[0].z_out[0], seg.z_out[0])


def test_hook_edit_ops_against_values_computed_by_hand(setup):
    """add and set differ, scale multiplies: each op checked against the recorded state."""
    r, _, clean = setup
    seg, H = clean.segments[0], r.hidden_size
    where = [seg.slots[2]]
    rec = I.Record(hooks=["blocks.0.hook_resid_post"], positions=where)
    v = torch.linspace(-1, 1, H)
    base = r.replay(clean, [rec]).records["blocks.0.hook_resid_post"][0]
    for op, kw, want in [("add", dict(value=v.tolist()), base + v), ("set", dict(value=v.tolist()), v),
                         ("scale", dict(factor=3.0), base * 3), ("zero", {}, torch.zeros(H))]:
        edit = I.HookEdit(hook="blocks.0.hook_resid_post", positions=where, op=op, **kw)
        got = r.replay(clean, [edit, I.Record(hooks=["blocks.1.hook_resid_pre"], positions=where)])
        torch.testing.assert_close(got.records["blocks.1.hook_resid_pre"][0], want, atol=1e-5, rtol=1e-5)


def test_knockout_cuts_the_latent_to_answer_path(setup):
    r, _, clean = setup
    ko = I.Knockout(query="after_segment", key="latents")
    a = r.replay(clean, [ko])
    b = r.replay(clean, [ko, I.ZeroLatent()])
    after = clean.segments[0].slots[-1] + 2 - len(clean.prompt_ids)  # steps predicted after the slots
    torch.testing.assert_close(a.step_option_logprobs[after:], b.step_option_logprobs[after:], atol=1e-6, rtol=0)
    free = r.replay(clean, [I.ZeroLatent()])
    assert not torch.allclose(free.step_option_logprobs[after:], a.step_option_logprobs[after:], atol=1e-6)
    img = r.replay(clean, [I.Knockout(query="latents", key="image")])
    assert not torch.allclose(img.hidden[clean.segments[0].slots], r.replay(clean).hidden[clean.segments[0].slots])


def test_replay_segment_edits(setup):
    r, _, clean = setup
    short = r.replay(clean, [I.ChangeK(k=2)])
    assert len(short.ids) == len(clean.ids) - 2
    markers = r.replay(clean, [I.MarkersOnly()])
    assert len(markers.ids) == len(clean.ids) - 4 and markers.answer_logprobs is not None
    with pytest.raises(ValueError, match="replay cannot add latents .*use regenerate"):
        r.replay(clean, [I.ChangeK(k=9)])
    assert len(r.replay(clean, [I.ChangeK(k=2, segment=0)]).ids) == len(clean.ids) - 2
    later = r.replay(clean, [I.ChangeK(k=9, segment=1)])  # acts on a segment the run does not have
    assert later.ids == r.replay(clean).ids


def test_recorders_return_tensors_keyed_by_hook_name(setup):
    r, _, _ = setup
    L = r.model.config.text_config.num_hidden_layers
    t = run(setup, I.Record(hooks=["blocks.*.hook_resid_post", "latent.hook_in", "latent.hook_out",
                                   "unembed.hook_logits", "ln_final.hook_normalized"], positions="latents"))
    seg = t.segments[0]
    assert sorted(t.records) == sorted([f"blocks.{i}.hook_resid_post" for i in range(L)] + [
        "latent.hook_in", "latent.hook_out", "unembed.hook_logits", "ln_final.hook_normalized"])
    assert t.records["blocks.0.hook_resid_post"].shape == (4, r.hidden_size)
    assert t.record_positions["blocks.0.hook_resid_post"] == seg.slots
    torch.testing.assert_close(t.records["latent.hook_in"], seg.z_in)
    torch.testing.assert_close(t.records["ln_final.hook_normalized"], seg.z_out)
    logits = t.records["unembed.hook_logits"]
    assert logits.shape[0] == len(t.generated_ids)
    torch.testing.assert_close(torch.log_softmax(logits, -1)[:, t.option_ids], t.step_option_logprobs)
    pat = run(setup, I.Record(hooks=["blocks.1.attn.hook_pattern"], positions="latents"))
    rows = pat.records["blocks.1.attn.hook_pattern"]  # [K, heads, keys]
    assert rows.shape[:2] == (4, r.model.config.text_config.num_attention_heads)
    torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:2]), atol=1e-4, rtol=0)
    assert r.model.config._attn_implementation != "eager"  # switched back after recording
    with pytest.raises(ValueError, match="unknown hook 'blocks.0.hook_resid'"):
        I.Record(hooks=["blocks.0.hook_resid"])
    with pytest.raises(ValueError, match="decoder layers"):
        run(setup, I.Record(hooks=["blocks.7.hook_resid_post"]))
    with pytest.raises(ValueError, match="can be recorded but not edited"):
        I.HookEdit(hook="latent.hook_in")


def test_noop_hooks_equal_no_hooks(setup):
    r, _, clean = setup
    L = r.model.config.text_config.num_hidden_layers
    noop = [I.HookEdit(hook=f"blocks.{i}.{h}", positions="latents", op="scale", factor=1.0)
            for i in range(L) for h in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")]
    noop.append(I.Record(hooks=["blocks.*.hook_resid_post", "blocks.*.hook_attn_out"], positions="all"))
    t = run(setup, *noop)
    assert t.generated_ids == clean.generated_ids
    torch.testing.assert_close(t.step_option_logprobs, clean.step_option_logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(t.segments[0].z_in, clean.segments[0].z_in, atol=1e-6, rtol=0)
    a, b = r.replay(clean, noop), r.replay(clean)
    torch.testing.assert_close(a.hidden, b.hidden, atol=1e-6, rtol=0)


def test_capimagine_span_edits_in_continuation(load, images):
    r = load("capimagine", max_latents=4)
    t = r.generate(r.build_inputs(images[0], "What colour?", OPTIONS), max_new_tokens=12, force_latent=True)
    span = [t.ids[p] for p in t.segments[0].slots]
    caption = r.tokenizer.encode(" the star is red", add_special_tokens=False)
    for edit, want in [(I.DeleteSpan(), []), (I.ReplaceSpan(ids=caption), caption),
                       (I.ShuffleSpan(seed=2), I.ShuffleSpan(seed=2).edit_span(span, r.tokenizer))]:
        c = r.continue_from(t, edits=[edit])
        seg = c.segments[0]
        assert [c.ids[p] for p in seg.slots] == want and c.ids[seg.end] == r.ids.end
    red = r.tokenizer.encode(" red", add_special_tokens=False)
    t2 = dataclasses.replace(t)
    t2.generated_ids = t.generated_ids[:1] + caption + [r.ids.end]
    t2.segments = [dataclasses.replace(t.segments[0], slots=list(range(t.segments[0].start + 1,
                                                                       t.segments[0].start + 1 + len(caption))))]
    c = r.continue_from(t2, edits=[I.CorruptWord(old="red", new="blue")])
    text = r.tokenizer.decode([c.ids[p] for p in c.segments[0].slots])
    assert text == " the star is blue" and red[0] not in c.ids[c.segments[0].start:c.segments[0].end]
    with pytest.raises(ValueError, match="'green' does not occur"):
        r.continue_from(t2, edits=[I.CorruptWord(old="green", new="blue")])


EXAMPLES = {  # one valid instance of every class whose defaults are not valid on their own
    "FixedLatent": dict(vector=[1.0, 2.0]), "MeanLatent": dict(vector=[0.5]), "SwapLatent": dict(source=[[1.0]]),
    "OtherImage": dict(path="x.png"), "MaskPatches": dict(boxes=[[0, 0, 0.5, 0.5]]),
    "SwapQuestion": dict(question="How many?"), "ReplaceSpan": dict(text="the star is red"),
    "CorruptWord": dict(old="red", new="blue"),
}


def test_every_intervention_round_trips_through_a_dict():
    objs = [cls(**EXAMPLES.get(name, {})) for name, cls in I.REGISTRY.items()]
    assert len(objs) >= 27
    for iv in objs:
        back = I.from_dict(iv.to_dict())
        assert type(back) is type(iv) and back.to_dict() == iv.to_dict()
    assert "image" not in I.OtherImage(path="x.png").to_dict()
    with pytest.raises(ValueError, match="unknown intervention kind 'Blur'"):
        I.from_dict({"kind": "Blur"})
    with pytest.raises(ValueError, match="ZeroLatent: unknown field.*'step'"):
        I.from_dict({"kind": "ZeroLatent", "step": [1]})
    assert I.as_interventions([{"kind": "ZeroLatent", "steps": [1]}]) == [I.ZeroLatent(steps=[1])]


@pytest.mark.parametrize("make, field", [
    (lambda: I.NoiseLatent(mode="replcae"), "mode"), (lambda: I.ChangeK(k=-3), "k"),
    (lambda: I.NoiseLatent(scale=-1), "scale"), (lambda: I.ZeroLatent(steps=[-1]), "steps"),
    (lambda: I.ExtremeLatent(mode="huge"), "mode"), (lambda: I.NoiseImage(std=0), "std"),
    (lambda: I.MaskPatches(boxes=[[0.5, 0, 0.2, 1]]), "boxes"), (lambda: I.MaskPatches(boxes=[]), "boxes"),
    (lambda: I.BlankImage(colour=(300, 0, 0)), "colour"), (lambda: I.Knockout(query="answer"), "query"),
    (lambda: I.Knockout(key="everything"), "key"), (lambda: I.HookEdit(op="mul"), "op"),
    (lambda: I.HookEdit(op="add"), "value"), (lambda: I.MaskImageTokens(mode="one"), "mode"),
    (lambda: I.ReplaceSpan(), "ids"), (lambda: I.CorruptWord(), "old"), (lambda: I.SwapQuestion(), "question"),
    (lambda: I.OtherImage(), "path"), (lambda: I.Record(hooks="blocks.0.hook_resid_post"), "hooks"),
    (lambda: I.FixedLatent(vector="abc"), "vector"), (lambda: I.ShuffleLatents(seed=1.5), "seed"),
])
def test_nonsense_fields_are_refused_when_made(make, field):
    with pytest.raises(ValueError, match=rf"\.{field}: "):
        make()


def _noisy_as_before(edit, q):
    """NoiseImage as it was written first: one generator drawn image after image."""
    g = torch.Generator().manual_seed(edit.seed)
    out = []
    for im in q.images:
        x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32))
        n = torch.randn(x.shape, generator=g) * edit.std
        out.append((x + n if edit.mode == "add" else 128 + n).clamp(0, 255).round().to(torch.uint8).numpy())
    return out


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_noise_images_are_the_seeded_draws_with_or_without_the_memo(images, mode, monkeypatch):
    from latentmed.engine import memo
    from latentmed.engine.interventions import inputs as II

    q = Query(images=[images[0], images[1].resize((56, 84))], question="What colour?", options=OPTIONS)
    for bound in (0, 64 * 2**20):
        monkeypatch.setattr(II, "_NORMAL", memo.FeatureMemo(bound))
        for std, seed in ((16.0, 3), (96.0, 3), (16.0, 4)):  # the second reuses the first's draws
            e = I.NoiseImage(std=std, mode=mode, seed=seed)
            got = [np.asarray(im) for im in e.edit_query(q).images]
            ref = _noisy_as_before(e, q)
            assert all(np.array_equal(a, b) for a, b in zip(got, ref)), (bound, std, seed)
        assert II._NORMAL.hits == (1 if bound else 0) and II._NORMAL.misses == (2 if bound else 0)
    assert not np.array_equal(np.asarray(I.NoiseImage(seed=3).edit_query(q).images[1]), _noisy_as_before(
        I.NoiseImage(seed=3), Query(images=[q.images[1]], question="x", options=OPTIONS))[0])  # draws run on
