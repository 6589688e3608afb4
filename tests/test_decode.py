"""The decode loop: equal to HF generate, to a hand-written latent loop, to a full forward;
placement, end rules, LVR head, batching, sampling, stopping, NaN flags, replay, continuation."""

import pytest
import torch
from conftest import OPTIONS
from latentmed.engine.checkpoint import LVRHead
from latentmed.engine.interventions import ChangeK, FixedLatent
from latentmed.engine.trace import Trace, trigger_rate
from transformers import DynamicCache


def bias_hook(reasoner, token_id: int, calls: set[int] | None = None, value: float = 1e4):
    """Add `value` to one token's logit on the given lm_head call numbers (all when None)."""
    n = {"calls": 0}

    def hook(module, args, out):
        n["calls"] += 1
        if calls is None or n["calls"] in calls:
            out = out.clone()
            out[..., token_id] += value
        return out

    return reasoner.model.lm_head.register_forward_hook(hook)


def hf_generate(r, p, n):
    ids = p.input_ids
    pix = {} if p.pixel_values is None else dict(pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw)
    with torch.inference_mode():
        out = r.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **pix,
                               mm_token_type_ids=(ids == r.ids.image).int(), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("with_image", [True, False])
def test_no_latent_run_equals_hf_generate(load, images, with_image):
    r = load("direct")
    p = r.build_inputs(images[0] if with_image else None, "What colour is the star?", OPTIONS)
    tr = r.generate(p, max_new_tokens=24)
    assert tr.segments == [] and len(tr.generated_ids) == 24
    assert tr.generated_ids == hf_generate(r, p, 24)


def manual_latent_run(r, p, K: int, n_after: int):
    """Independent loop: HF's own forward (pixel path, rope_deltas), after-start layout."""
    m, ids = r.model, p.input_ids
    m.model.rope_deltas = None
    cache = DynamicCache(config=m.config)
    emb = m.get_input_embeddings()

    def fwd(**kw):
        out = m(cache=cache, use_cache=True, output_hidden_states=True, **kw)
        return out.hidden_states[-1][:, -1], out.logits[:, -1]

    fwd(input_ids=ids, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw,
        mm_token_type_ids=(ids == r.ids.image).int())
    gen, z_in = [r.ids.start], []
    h, _ = fwd(inputs_embeds=emb(torch.tensor([[r.ids.start]])))
    for _ in range(K):
        z_in.append(h[0])
        gen.append(r.ids.pad)
        h, _ = fwd(inputs_embeds=h[:, None])
    tok = r.ids.end
    for _ in range(n_after):
        gen.append(tok)
        h, logits = fwd(inputs_embeds=emb(torch.tensor([[tok]])))
        tok = int(logits.argmax())
    return gen, torch.stack(z_in)


def test_latent_run_equals_a_hand_written_loop(load, images):
    r = load("monet-sft", n_latents=4)
    p = r.build_inputs(images[0], "What colour is the square?", OPTIONS)
    tr = r.generate(p, max_new_tokens=12, force_latent=True)
    with torch.inference_mode():
        gen, z_in = manual_latent_run(r, p, 4, 12 - 5)
    assert tr.generated_ids == gen
    torch.testing.assert_close(tr.segments[0].z_in, z_in, atol=1e-5, rtol=1e-5)


def test_mrope_positions_after_latents_match_a_full_forward(load, images):
    r = load("mirage")
    p = r.build_inputs(images[1], "Where is the square?", OPTIONS)
    tr = r.generate(p, max_new_tokens=16, force_latent=True)
    seg = tr.segments[0]
    ids = torch.tensor([tr.ids])
    ids[0, seg.slots] = r.ids.pad
    emb = r.model.get_input_embeddings()(ids)
    emb[0, seg.slots] = seg.z_in
    r.model.model.rope_deltas = None
    with torch.inference_mode():  # HF does the image scatter and the 3-D positions itself
        out = r.model.model(input_ids=ids, inputs_embeds=emb, pixel_values=p.pixel_values,
                            image_grid_thw=p.image_grid_thw, mm_token_type_ids=(ids == r.ids.image).int())
        hidden = out.last_hidden_state[0]
        P = len(tr.prompt_ids)
        lp = torch.log_softmax(r.model.lm_head(hidden[P - 1:-1]), -1)[:, tr.option_ids]
    torch.testing.assert_close(hidden[seg.slots], seg.z_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp, tr.step_option_logprobs, atol=1e-4, rtol=0)


def test_monet_overwrites_the_start_slot_and_sft_layout_does_not(load, images):
    p_args = (images[0], "What colour is the square?", OPTIONS)
    monet, sft = load("monet"), load("monet-sft")
    a = monet.generate(monet.build_inputs(*p_args), max_new_tokens=14, force_latent=True)
    b = sft.generate(sft.build_inputs(*p_args), max_new_tokens=14, force_latent=True)
    P = len(a.prompt_ids)
    sa, sb = a.segments[0], b.segments[0]
    assert sa.start == sb.start == P
    assert sa.slots == list(range(P, P + 10)) and sa.end == P + 10
    assert sb.slots == list(range(P + 1, P + 11)) and sb.end == P + 11
    assert a.generated_ids[0] == b.generated_ids[0] == monet.ids.start
    assert b.generated_ids[1:11] == [sft.ids.pad] * 10
    with torch.inference_mode():
        ids = torch.tensor([a.prompt_ids + [monet.ids.start]])
        out = monet.model.model(input_ids=ids, pixel_values=a.inputs.pixel_values,
                                image_grid_thw=a.inputs.image_grid_thw, mm_token_type_ids=(ids == monet.ids.image).int())
    h = out.last_hidden_state[0]
    torch.testing.assert_close(sa.z_in[0], h[P - 1], atol=1e-5, rtol=1e-5)  # hidden that chose start
    torch.testing.assert_close(sb.z_in[0], h[P], atol=1e-5, rtol=1e-5)  # hidden at the start slot


def add_lvr_head(folder, seed=0):
    """Turn a checkpoint copy into an LVR one with a head (weights in model.safetensors)."""
    import json

    from safetensors.torch import load_file, save_file
    cfg = json.loads((folder / "config.json").read_text())
    torch.manual_seed(seed)
    head = LVRHead(cfg["text_config"]["hidden_size"])
    state = load_file(folder / "model.safetensors")
    state.update({f"lvr_head.{k}": v.contiguous() for k, v in head.state_dict().items()})
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    cfg.update(lvr_head=True, lvr_head_type="simple")
    (folder / "config.json").write_text(json.dumps(cfg))
    return head


@pytest.mark.parametrize("on_first", [False, True])
def test_lvr_head_is_applied_where_the_spec_says(ckpt_copy, images, on_first):
    from latentmed.engine.reasoner import LatentReasoner
    head = add_lvr_head(ckpt_copy)
    r = LatentReasoner.from_pretrained(ckpt_copy, method="lvr", n_latents=4, head_on_first=on_first)
    assert r.spec.head == "lvr_head" and r.load_report["unexpected"] == []
    torch.testing.assert_close(r.head.mlp[0].weight, head.mlp[0].weight)
    tr = r.generate(r.build_inputs(images[0], "What colour?", OPTIONS), max_new_tokens=8, force_latent=True)
    seg = tr.segments[0]
    with torch.inference_mode():
        raw_first = r.replay(tr).hidden[seg.start]  # hidden at the start slot
        torch.testing.assert_close(seg.z_in[1:], r.head(seg.z_out[:-1]), atol=1e-5, rtol=1e-5)
        want = r.head(raw_first) if on_first else raw_first
    torch.testing.assert_close(seg.z_in[0], want, atol=1e-5, rtol=1e-5)
    assert seg.ended == "quota" and seg.end is None


def test_batch_with_different_prompt_lengths_equals_single_runs(load, images):
    r = load("mirage")
    ps = [r.build_inputs(images[0], "What colour is the square?", OPTIONS),
          r.build_inputs(images[1], "Which digit is inside the red square in this picture here?", OPTIONS)]
    assert ps[0].input_ids.shape[1] != ps[1].input_ids.shape[1]
    batch = r.generate(ps, max_new_tokens=14, force_latent=True)
    for p, t in zip(ps, batch):
        one = r.generate(p, max_new_tokens=14, force_latent=True)
        assert t.generated_ids == one.generated_ids
        torch.testing.assert_close(t.segments[0].z_in, one.segments[0].z_in, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(t.step_option_logprobs, one.step_option_logprobs, atol=1e-4, rtol=0)


def test_model_decided_end_and_cap(fresh, images):
    r = fresh("mirage")
    p = r.build_inputs(images[0], "What colour?", OPTIONS)
    capped = r.generate(p, max_new_tokens=14, force_latent=True).segments[0]
    assert capped.ended == "cap" and len(capped.slots) == 8 and not capped.triggered or capped.forced
    handle = bias_hook(r, r.ids.end, calls={2 + 3})  # call 1 prefill, 2 start slot, 3.. latents
    try:
        seg = r.generate(p, max_new_tokens=14, force_latent=True).segments[0]
    finally:
        handle.remove()
    assert seg.ended == "model" and len(seg.slots) == 3 and seg.end == seg.slots[-1] + 1


def test_forced_end_ignores_early_end_only_under_change_k(fresh, images):
    r = fresh("monet-sft", n_latents=6)
    p = r.build_inputs(images[0], "What colour?", OPTIONS)
    segs = []
    for ivs in ([], [ChangeK(5)]):
        handle = bias_hook(r, r.ids.end, calls={2 + 3})  # the end token wins after 3 latents
        try:
            segs.append(r.generate(p, ivs, max_new_tokens=14, force_latent=True).segments[0])
        finally:
            handle.remove()
    early, exact = segs
    assert early.ended == "model" and len(early.slots) == 3
    assert exact.ended == "forced" and len(exact.slots) == 5


def test_natural_trigger_is_recorded(fresh, images):
    r = fresh("mirage")
    p = r.build_inputs(images[0], "What colour?", OPTIONS)
    assert r.generate(p, max_new_tokens=6).segments == []  # a random model does not trigger
    handle = bias_hook(r, r.ids.start, calls={1})
    try:
        t = r.generate(p, max_new_tokens=6)
    finally:
        handle.remove()
    assert t.triggered and not t.segments[0].forced and t.segments[0].p_start > 0.99
    forced = r.generate(p, max_new_tokens=6, force_latent=True)
    assert forced.segments[0].forced and not forced.segments[0].triggered and not forced.triggered
    assert trigger_rate([t, forced]) == 0.5


def test_stopping_on_eos_and_max_new_tokens(fresh, images):
    r = fresh("direct")
    p = r.build_inputs(images[0], "What colour?", OPTIONS)
    assert r.generate(p, max_new_tokens=5).stop == "max_new_tokens"
    handle = bias_hook(r, r.ids.eos[0], calls={3})
    try:
        t = r.generate(p, max_new_tokens=10)
    finally:
        handle.remove()
    assert t.stop == "eos" and len(t.generated_ids) == 3 and t.generated_ids[-1] == r.ids.eos[0]


def test_seeded_sampling_is_reproducible_per_row(load, images):
    r = load("monet-sft", n_latents=3)
    p = r.build_inputs(images[0], "What colour?", OPTIONS)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.9, force_latent=True)
    a, b = r.generate(p, seed=1, **kw), r.generate(p, seed=1, **kw)
    c = r.generate(p, seed=2, **kw)
    assert a.generated_ids == b.generated_ids != c.generated_ids
    batch = r.generate([p, p], seed=1, **kw)
    assert batch[0].generated_ids == batch[1].generated_ids == a.generated_ids


def test_nan_in_one_row_is_flagged_without_crashing_the_batch(load, images):
    r = load("monet-sft", n_latents=3)
    p = r.build_inputs(images[0], "What colour?", OPTIONS)
    nan = [FixedLatent(vector=[float("nan")] * r.hidden_size)]
    bad, good = r.generate([p, p], [nan, []], max_new_tokens=10, force_latent=True)
    clean = r.generate(p, max_new_tokens=10, force_latent=True)
    assert bad.nan and bad.stop == "nan" and bad.segments[0].ended == "nan"
    assert not good.nan and good.generated_ids == clean.generated_ids


def test_capimagine_text_span_is_traced_like_a_segment(load, images):
    r = load("capimagine", max_latents=3)
    tr = r.generate(r.build_inputs(images[0], "What colour?", OPTIONS), max_new_tokens=10, force_latent=True)
    seg, P = tr.segments[0], len(tr.prompt_ids)
    assert seg.kind == "text" and seg.ended == "cap" and seg.slots == [P + 1, P + 2, P + 3] and seg.end == P + 4
    assert seg.z_out.shape == seg.z_in.shape == (3, r.hidden_size)
    torch.testing.assert_close(seg.z_in, r.embed(torch.tensor(tr.ids)[seg.slots]))
    assert tr.generated_ids[4] == r.ids.end


@pytest.mark.parametrize("method", ["direct", "monet", "lvr", "mirage", "capimagine"])
def test_replay_reproduces_the_recorded_logprobs(load, images, method):
    r = load(method)
    tr = r.generate(r.build_inputs(images[2], "What colour?", OPTIONS), max_new_tokens=16, force_latent=True)
    rp = r.replay(tr)
    torch.testing.assert_close(rp.step_option_logprobs, tr.step_option_logprobs, atol=1e-4, rtol=0)
    assert rp.answer_logprobs == pytest.approx(tr.answer_logprobs, abs=1e-4)


def test_continue_with_the_same_latents_reproduces_the_run(load, images):
    r = load("monet")
    tr = r.generate(r.build_inputs(images[0], "What colour?", OPTIONS), max_new_tokens=18, force_latent=True)
    again = r.continue_from(tr, tr.segments[0].z_in)
    P, seg = len(tr.prompt_ids), tr.segments[0]
    after = seg.end - P
    assert again.generated_ids[after:] == tr.generated_ids[after:]  # slots hold the plain fill id
    assert again.generated_ids[:after] == [r.ids.start] + [r.ids.fill] * 9
    torch.testing.assert_close(again.segments[0].z_out, tr.segments[0].z_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again.step_option_logprobs, tr.step_option_logprobs, atol=1e-4, rtol=0)


def test_trace_round_trips_through_json_and_sidecar(load, images, tmp_path):
    r = load("mirage")
    tr = r.generate(r.build_inputs(images[0], "What colour?", OPTIONS), max_new_tokens=12, force_latent=True)
    back = Trace.load(tr.save(tmp_path / "t.json"))
    assert back.generated_ids == tr.generated_ids and back.segments[0].slots == tr.segments[0].slots
    torch.testing.assert_close(back.segments[0].z_in, tr.segments[0].z_in)
    again = Trace.from_dict(tr.to_dict())
    torch.testing.assert_close(again.step_option_logprobs, tr.step_option_logprobs)
    assert again.clean_text == tr.clean_text and "<latent>" in tr.clean_text
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=f"{tmp_path / 'bad.json'}: not a saved trace"):
        Trace.load(tmp_path / "bad.json")


def test_replay_sanitizes_junk_vision_ids_at_latent_slots(load, images):
    r = load("monet")  # Monet keeps the sampled junk ids at latent slots
    tr = r.generate(r.build_inputs(images[0], "What colour?", OPTIONS), max_new_tokens=14, force_latent=True)
    junk = Trace.from_dict(tr.to_dict())
    slot = tr.segments[0].slots[3] - len(tr.prompt_ids)
    junk.generated_ids[slot] = r.ids.image  # a junk id that happens to be the image pad
    junk.segments[0].z_in, junk.option_ids, junk.answer_step = tr.segments[0].z_in, tr.option_ids, tr.answer_step
    a, b = r.replay(tr), r.replay(junk, inputs=tr.inputs)
    torch.testing.assert_close(a.step_option_logprobs, b.step_option_logprobs, atol=1e-6, rtol=0)
