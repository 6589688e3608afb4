"""Shared-work sweeps give exactly what running every variant alone gives."""

import pytest
import torch
from conftest import OPTIONS
from latentmed.engine import interventions as I
from latentmed.engine.sweep import naive_sweep, shared_sweep


def variants(z: torch.Tensor) -> list:
    return [[], I.ZeroLatent(), I.NoiseLatent(scale=2.0, mode="replace"), I.SwapLatent(source=(z.flip(0)).tolist()),
            I.ShuffleLatents(seed=3, source=z.tolist()), I.ChangeK(k=2), I.MarkersOnly(), I.DropSegment(),
            [I.ZeroLatent(steps=[0]), I.Record(hooks=["blocks.*.hook_resid_post"])],
            I.BlankImage()]  # the last one edits the input: it gets its own prefill


def assert_same(shared, naive):
    assert len(shared) == len(naive)
    for a, b in zip(shared, naive):
        assert a.generated_ids == b.generated_ids
        assert a.interventions == b.interventions
        torch.testing.assert_close(a.step_option_logprobs, b.step_option_logprobs, atol=1e-4, rtol=0)
        assert [s.slots for s in a.segments] == [s.slots for s in b.segments]
        for sa, sb in zip(a.segments, b.segments):
            if sa.z_in is not None:
                torch.testing.assert_close(sa.z_in, sb.z_in, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["monet", "mirage"])
def test_shared_sweep_equals_naive_sweep(load, images, method):
    r = load(method)
    p = r.build_inputs(images[0], "What colour is the square?", OPTIONS)
    z = r.generate(p, max_new_tokens=4, force_latent=True).segments[0].z_in
    kw = dict(max_new_tokens=12, force_latent=True)
    shared, naive = shared_sweep(r, p, variants(z), **kw), naive_sweep(r, p, variants(z), **kw)
    assert_same(shared, naive)
    assert len({tuple(t.generated_ids) for t in shared}) > 1  # the variants really differ
    assert shared[-2].records["blocks.0.hook_resid_post"].shape[0] == len(shared[-2].segments[0].slots)
    torch.testing.assert_close(shared[-2].records["blocks.1.hook_resid_post"], naive[-2].records["blocks.1.hook_resid_post"],
                               atol=1e-4, rtol=1e-4)


def test_shared_sweep_branches_after_a_natural_trigger_and_when_sampling(fresh, images):
    r = fresh("monet-sft", n_latents=3)
    p = r.build_inputs(images[1], "What colour?", OPTIONS)
    n = {"calls": 0}

    def hook(module, args, out):  # the model opens the segment by itself at its 3rd token
        n["calls"] += 1
        out = out.clone()
        if n["calls"] == 3:
            out[..., r.ids.start] += 1e4
        return out

    vs = [[], I.ZeroLatent(), I.NoiseLatent(scale=1.0), I.ChangeK(k=1)]
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.95, seed=7)
    handle = r.model.lm_head.register_forward_hook(hook)
    try:
        shared = shared_sweep(r, p, vs, **kw)
        naive = []
        for v in vs:
            n["calls"] = 0
            naive += naive_sweep(r, p, [v], **kw)
    finally:
        handle.remove()
    assert all(t.segments and t.segments[0].start == len(t.prompt_ids) + 2 for t in shared[:3])
    assert_same(shared, naive)


def test_sweep_without_any_segment_returns_the_clean_run(load, images):
    r = load("mirage")
    p = r.build_inputs(images[2], "What colour?", OPTIONS)
    vs = [[], I.ZeroLatent(), I.ChangeK(k=2)]
    shared, naive = shared_sweep(r, p, vs, max_new_tokens=8), naive_sweep(r, p, vs, max_new_tokens=8)
    assert all(t.segments == [] for t in shared)
    assert_same(shared, naive)


def test_sweep_many_equals_running_every_variant_alone(load, images):
    """Shared work across instances (one batched prefill, every instance x variant row decoded
    together) gives what naive decoding gives, per instance and variant."""
    from latentmed.engine.sweep import sweep_many

    r = load("mirage")
    prompts = [r.build_inputs(im, q, OPTIONS) for im, q in zip(images, ["What colour?", "Which one is it?", "Colour?"])]
    kw = dict(max_new_tokens=10, force_latent=True)
    clean = [r.generate(p, **kw) for p in prompts]
    per = [[[], I.ZeroLatent(), I.SwapLatent(source=clean[(i + 1) % 3].segments[0].z_in.tolist()), I.ChangeK(k=1),
            I.BlankImage()][: 5 - i] for i in range(3)]  # different variants and counts per prompt
    many = sweep_many(r, prompts, per, batch_size=2, **kw)
    for p, vs, got in zip(prompts, per, many):
        assert len(got) == len(vs)
        assert_same(got, naive_sweep(r, p, vs, **kw))
    with pytest.raises(ValueError, match="2 variant lists for 3 prompts"):
        sweep_many(r, prompts, per[:2], **kw)
