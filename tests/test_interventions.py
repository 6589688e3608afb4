"""Every intervention does what it says, at its point, and serialises to a dict and back."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import OPTIONS

from latentmed import interventions as I


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


def test_shuffle_uses_a_seeded_permutation_of_the_source(setup):
    z = setup[2].segments[0].z_in
    iv = I.ShuffleLatents(seed=5, source=z.tolist())
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


def test_input_edits_act_on_the_item(load, images, tmp_path):
    r = load("monet-sft", n_latents=4)
    item = I.Item([images[0]], "What colour?", OPTIONS)
    blank = I.BlankImage().edit_item(item).images[0]
    assert blank.size == images[0].size and blank.getcolors() == [(112 * 112, (128, 128, 128))]
    masked = I.MaskPatches(boxes=[[0, 0, 0.5, 0.5]], colour=(0, 0, 0)).edit_item(item).images[0]
    assert masked.getpixel((10, 10)) == (0, 0, 0) and masked.getpixel((100, 100)) == images[0].getpixel((100, 100))
    n1, n2 = (I.NoiseImage(seed=1).edit_item(item).images[0] for _ in range(2))
    assert np.array_equal(np.asarray(n1), np.asarray(n2)) and not np.array_equal(np.asarray(n1), np.asarray(images[0]))
    assert I.OtherImage(image=images[1]).edit_item(item).images == [images[1]]
    images[2].save(tmp_path / "other.png")
    assert I.OtherImage(path=str(tmp_path / "other.png")).edit_item(item).images[0].size == (112, 112)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"{tmp_path / 'bad.png'}: cannot read image"):
        I.OtherImage(path=str(tmp_path / "bad.png")).edit_item(item)
    shuffled = I.ShuffleOptions(seed=1)
    p = r.build_inputs(images[0], "What colour?", OPTIONS, edits=[shuffled, I.SwapQuestion("Which digit?")])
    assert p.options == [OPTIONS[i] for i in shuffled.order(4)] != OPTIONS and p.question == "Which digit?"
    assert "Which digit?" in p.text


def test_feature_edits_act_on_the_visual_encoder_output(setup):
    r, p, clean = setup
    with torch.inference_mode():
        f = r.image_features([p], [[I.MaskImageTokens(indices=[0, 3])]])
        base = r.image_features([p], [[]])
    assert torch.count_nonzero(f[[0, 3]]) == 0 and torch.equal(f[1:3], base[1:3])
    noisy = run(setup, I.NoiseImageFeatures(scale=0.5))
    assert not torch.equal(noisy.segments[0].z_in[0], clean.segments[0].z_in[0])


def test_residual_edits_are_temporary_and_act_at_their_positions(setup):
    r, _, clean = setup
    seg = clean.segments[0]
    layer = r.layers[1]
    hooks_before = dict(layer._forward_hooks)  # transformers may keep its own recording hooks
    base = r.replay(clean)
    edited = r.replay(clean, [I.ResidualEdit(layer=1, positions=[seg.slots[1]], op="zero")])
    assert layer._forward_hooks == hooks_before
    diff = (edited.hidden - base.hidden).abs().amax(-1)
    assert diff[:seg.slots[1]].max() == 0 and diff[seg.slots[1]] > 0
    decoded = run(setup, I.ResidualEdit(layer=1, positions="latents", op="scale", factor=0.0))
    assert layer._forward_hooks == hooks_before
    assert torch.equal(decoded.segments[0].z_in[0], seg.z_in[0])
    assert not torch.allclose(decoded.segments[0].z_out[0], seg.z_out[0])


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
    with pytest.raises(ValueError, match="use continue_from"):
        r.replay(clean, [I.ChangeK(k=9)])


def test_recorders(setup):
    r, _, _ = setup
    t = run(setup, I.RecordLayers(), I.RecordLogits())
    seg = t.segments[0]
    L = r.model.config.text_config.num_hidden_layers
    assert seg.layers.shape == (4, L + 1, r.hidden_size)
    torch.testing.assert_close(seg.layers[:, -1], seg.z_out)
    assert t.logits.shape[0] == len(t.generated_ids)
    torch.testing.assert_close(torch.log_softmax(t.logits, -1)[:, t.option_ids], t.step_option_logprobs)


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


def test_every_intervention_round_trips_through_a_dict():
    objs = [cls() for cls in I.REGISTRY.values()]
    assert len(objs) >= 25
    for iv in objs:
        back = I.from_dict(iv.to_dict())
        assert type(back) is type(iv) and back.to_dict() == iv.to_dict()
    assert "image" not in I.OtherImage(path="x.png").to_dict()
    with pytest.raises(ValueError, match="unknown intervention kind 'Blur'"):
        I.from_dict({"kind": "Blur"})
    assert I.as_interventions([{"kind": "ZeroLatent", "steps": [1]}]) == [I.ZeroLatent(steps=[1])]
