"""The training loop: losses fall, latent loop = teacher forcing, resume = uninterrupted, bad input."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from latentmed.engine import checkpoint, layouts
from latentmed.engine.tiny import save_checkpoint, tiny_config, tiny_model
from latentmed.engine.tokenizer import build_tokenizer
from latentmed.testbed import VOCABULARY, TestbedConfig, make_item
from latentmed.zoo import SPECS, batching, loop, method_stages, predict, sft, stages
from latentmed.zoo import bank as B
from latentmed.zoo import forward as fwd

CFG = TestbedConfig(n_objects=(3, 8), n_train=8, n_val=8, n_test=8)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(VOCABULARY)


@pytest.fixture(scope="module")
def bank(tok):
    torch.manual_seed(0)
    model = tiny_model(tiny_config(tok, "test"), seed=0)
    return B.build_bank(model, CFG, "train", 2, kinds=("main", "crop", "degraded"), progress=False)


def fresh(tok, seed=0):
    model = tiny_model(tiny_config(tok, "test"), seed=seed)
    stages.reinit_language_model(model, seed=seed)
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    return model


def quick(name, steps, **kw):
    return loop.StageConfig(name, steps, batch_size=8, lr=3e-3, warmup=2, eval_every=10**6, save_every=kw.pop(
        "save_every", 10**6), keep_best=False, **kw)


def test_prompt_layout_ends_with_the_key_words_and_segment_sits_before_the_answer(tok):
    item = make_item(CFG, "val", "relpos", 0)
    prompt = layouts.testbed_prompt(tok, item, SPECS["direct"])
    assert prompt.startswith(layouts.IMAGE_SEGMENT)
    assert prompt.endswith(" " + " ".join(item.keywords))
    seq = layouts.training_text(tok, item, SPECS["lvr-style"])
    kws = "".join(" " + k for k in item.keywords)
    assert seq == prompt + "<|lvr_start|>" + "<|lvr|>" * 8 + "<|lvr_end|>" + kws + " " + item.answer_word
    cap = layouts.training_text(tok, item, SPECS["capimagine"])
    assert cap == prompt + "<imagine> " + item.caption + "</imagine>" + kws + " " + item.answer_word


def test_collate_aligns_segments_and_supervises_the_right_tokens(tok, bank):
    plan = batching.Plan(SPECS["mirage-style"], n_latents=4, attn_weight=1.0)
    model = fresh(tok)
    batching.bind_rope(model)
    b = batching.collate(tok, bank, [0, 3, 5, 7], plan)
    start, end = (tok.convert_tokens_to_ids(t) for t in ("<|latent_start|>", "<|latent_end|>"))
    assert (b.ids[:, b.slot_start - 1] == start).all() and (b.ids[:, b.slot_start + 4] == end).all()
    assert (b.labels[:, b.prompt_end] == start).all()  # trigger supervised at the last key word
    assert (b.labels[:, b.slot_start + 3] == end).all()  # end marker after the K-th latent
    ans = [tok.encode(" " + bank.items[i].answer_word)[0] for i in [0, 3, 5, 7]]
    assert b.labels[torch.arange(4), b.answer_pos].tolist() == ans
    assert (b.labels[torch.arange(4), b.answer_pos + 1] == tok.eos_token_id).all()  # then end of turn
    assert (b.labels[:, b.slot_start:b.slot_start + 3] == -100).all()  # slots are never CE targets
    assert (b.attn_q >= 0).any() and b.attn_target.sum() > 0



def test_cached_item_tokens_give_the_batches_a_cold_bank_gives(tok, bank):
    """collate caches each item's token ids per layout: a warm bank, asked for another layout of
    the same items, builds exactly the batch a bank with an empty cache builds."""
    model = fresh(tok)
    batching.bind_rope(model)
    warm = replace(bank, token_cache={})
    plans = [batching.Plan(SPECS["mirage-style"], n_latents=4, attn_weight=1.0),
             batching.Plan(SPECS["mirage-style"], n_latents=2, attn_weight=1.0),
             batching.Plan(SPECS["monet-style"], n_latents=0, with_crop=True),
             batching.Plan(SPECS["capimagine"], hop_weight=1.0)]
    for plan in plans:
        batching.collate(tok, warm, [0, 3, 5, 7], plan)
    assert len(warm.token_cache) == 2 * 4 * len(plans)  # tokens and positions per item and layout
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    for plan in plans:
        a = batching.collate(tok, warm, [7, 0, 3], plan)
        b = batching.collate(tok, replace(bank, token_cache={}), [7, 0, 3], plan)
        for f in ("ids", "attention_mask", "position_ids", "labels", "weights", "option_ids", "attn_target"):
            assert torch.equal(getattr(a, f), getattr(b, f)), (plan.spec.method, plan.n_latents, f)
        # per-row positions, padded, are what Qwen2.5-VL computes for the whole left-padded batch
        grids = torch.tensor(([list(bank.grid)] + ([list(bank.crop_grid)] if plan.with_crop else [])) * 3)
        ref = model.model.get_rope_index(a.ids, mm_token_type_ids=(a.ids == image_id).int(), image_grid_thw=grids,
                                         attention_mask=a.attention_mask)[0]
        assert torch.equal(a.position_ids, ref), plan.spec.method
        assert (a.attention_mask == 0).any()  # the rows really are padded to different lengths
    # the layouts differ, so a key that ignored them would have served the wrong ids
    assert batching.collate(tok, warm, [0], plans[0]).ids.shape != batching.collate(tok, warm, [0], plans[1]).ids.shape

def test_latent_loop_equals_teacher_forcing_with_its_own_latents(tok, bank):
    model = fresh(tok).eval()
    plan = batching.Plan(SPECS["lvr-style"], n_latents=8)
    batching.bind_rope(model)
    b = batching.collate(tok, bank, [0, 1, 2, 6], plan)
    with torch.no_grad():
        loop = fwd.forward(model, b, plan)
        tf = fwd.forward(model, b, replace(plan, latent_fill="crop"), fill=loop.z_in)
    assert torch.allclose(loop.hidden, tf.hidden, atol=1e-5)
    # each latent is the post-norm hidden state of the position before its slot
    assert torch.allclose(loop.z_in[:, 1:], loop.hidden[:, b.slot_start:b.slot_start + 7], atol=1e-6)


def test_loss_decreases_on_a_tiny_overfit_batch(tok, bank, tmp_path):
    model = fresh(tok)
    plan = batching.Plan(SPECS["base"], attn_weight=1.0)
    small = B.FeatureBank(bank.items[:8], bank.main[:8], bank.crop[:8], bank.degraded[:8], bank.grid,
                              bank.crop_grid)
    stages.train_stage(model, tok, plan, small, None, quick("overfit", 60), tmp_path, progress=False)
    import pandas as pd

    curve = pd.read_csv(tmp_path / "curves.csv")
    assert curve["ce"].iloc[-5:].mean() < 0.5 * curve["ce"].iloc[:3].mean()
    assert curve["attn"].iloc[-5:].mean() < curve["attn"].iloc[:3].mean()


@pytest.mark.parametrize("method", ["lvr-style", "capimagine"])
def test_resume_after_a_kill_gives_the_same_model_as_an_uninterrupted_run(tok, bank, tmp_path, method):
    plan = method_stages(method, "ci")[0].plan
    cfg = quick("resume", 6, save_every=2)
    a = fresh(tok)
    stages.train_stage(a, tok, plan, bank, None, cfg, tmp_path / "a", progress=False)
    b = fresh(tok)
    with pytest.raises(loop.SimulatedKill):
        stages.train_stage(b, tok, plan, bank, None, cfg, tmp_path / "b", progress=False, stop_after=3)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 2
    c = fresh(tok)  # a new process from the same base: its language model is replaced by the saved state
    stages.reinit_language_model(c, seed=5)
    stages.train_stage(c, tok, plan, bank, None, cfg, tmp_path / "b", progress=False)
    for (k, va), vc in zip(a.state_dict().items(), c.state_dict().values()):
        assert torch.equal(va, vc), k
    import pandas as pd

    ca, cb = pd.read_csv(tmp_path / "a" / "curves.csv"), pd.read_csv(tmp_path / "b" / "curves.csv")
    assert list(cb["step"]) == list(range(1, 7))
    assert ca["loss"].tolist() == cb["loss"].tolist()


def test_optimizer_state_is_stored_without_pickle(tok, bank, tmp_path):
    stages.train_stage(fresh(tok), tok, batching.Plan(SPECS["direct"]), bank, None, quick("s", 2, save_every=1),
                      tmp_path, progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "optimizer.safetensors" in files and "weights.safetensors" in files and "state.json" in files
    assert not [f for f in files if f.endswith((".pt", ".bin", ".pkl"))]


def test_predict_runs_every_kind_of_segment_without_nan(tok, bank):
    model = fresh(tok)
    for name in ["direct", "capimagine", "lvr-style", "mirage-style", "positive-control", "negative-control"]:
        spec = SPECS[name]
        fill = B.FILL_OF_SOURCE[spec.latent_source]
        plan = batching.Plan(spec, n_latents=spec.n_latents, latent_fill=fill)
        const = torch.ones(spec.n_latents, model.config.text_config.hidden_size) if fill == "constant" else None
        recs = predict.predict(model, tok, bank, plan, constant=const)
        assert len(recs) == len(bank) and not any(r["nonfinite"] for r in recs), name
        if spec.has_latents and spec.end_rule == "model_or_cap":
            assert all(0 <= r["k"] <= spec.max_latents for r in recs)
        elif spec.has_latents:
            assert {r["k"] for r in recs} == {spec.n_latents}


def test_vision_stage_learns_cell_labels_and_rescale_sets_the_token_norm(tok, tmp_path):
    model = tiny_model(tiny_config(tok, "test"), seed=0)
    cfg = loop.StageConfig("vision", 30, batch_size=4, lr=3e-3, warmup=3, eval_every=10**6, save_every=10**6,
                            keep_best=False)
    _, summary = stages.vision_stage(model, CFG, cfg, tmp_path, progress=False)
    assert set(summary["cell_accuracy"]) == {"colour", "shape", "digit", "row", "col"}
    import pandas as pd

    loss = pd.read_csv(tmp_path / "curves.csv")["loss"]
    assert loss.iloc[-5:].mean() < 0.8 * loss.iloc[:5].mean()
    stages.freeze_and_rescale_tower(model, CFG, target_norm=1.0)
    from latentmed.testbed import make_scene

    toks = B.tower_tokens(model, [make_scene(CFG, 99)[1]])
    assert 0.5 < float(toks.norm(dim=-1).mean()) < 2.0
    assert not any(p.requires_grad for p in model.model.visual.parameters())


# ---------------------------------------------------------------- bad input

def test_missing_fields_name_the_source_the_item_and_the_field(tok, bank):
    item = make_item(CFG, "train", "attr", 0)
    item.crop, item.crop_box = None, None
    for method, field in [("monet-style", "crop"), ("capimagine", "caption"), ("base", "evidence_cells")]:
        bad = replace(item)
        if field != "crop":
            setattr(bad, field, None)
        plan = next(s.plan for s in method_stages(method, "ci") if field in s.plan.needs())
        with pytest.raises(ValueError, match=rf"mydata: item train-attr-00000 has no '{field}'.*{method}"):
            batching.check_items([bad], plan, source="mydata")


def test_incomplete_checkpoint_folder_is_named(tok, tmp_path):
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, tiny_model(tiny_config(tok, "test")), tok)
    with pytest.raises(ValueError, match=rf"{folder}: no latent_spec.json"):
        checkpoint.load(folder)
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        checkpoint.load(tmp_path / "nope")


def test_base_whose_tokenizer_does_not_match_is_refused(tok, tmp_path):
    from latentmed.engine.tokenizer import build_tokenizer as bt

    folder = tmp_path / "ckpt"
    model = tiny_model(tiny_config(tok, "test"))
    other = bt(VOCABULARY, vocab_size=400)  # another BPE: special ids move
    save_checkpoint(folder, model, other)
    SPECS["base"].save(folder)
    with pytest.raises(ValueError, match=rf"{folder}: tokenizer/config mismatch"):
        checkpoint.load(folder)


# ---------------------------------------------------------------- CapImagine data + the SFT path

FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "monet_sft"


@pytest.fixture(scope="module")
def tiny_ckpt(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_checkpoint(folder, tiny_model(tiny_config(tok, "test"), seed=0), tok)
    return folder


def test_monet_format_fixture_becomes_capimagine_data_with_a_local_vlm_captioner(tiny_ckpt, tmp_path):
    from latentmed.zoo import captioner

    cap = captioner.ModelCaptioner(tiny_ckpt, max_new_tokens=4)
    n = captioner.convert_file(FIXTURE / "train.json", tmp_path / "cap.json", cap)
    out = captioner.load_interleaved(tmp_path / "cap.json")
    assert n == 2 and len(out) == 2
    for s in out:
        turn = s["data"][-1]
        text = turn["content"][0]["text"]
        assert [i["type"] for i in turn["content"]] == ["text"]  # no intermediate image left
        assert "<abs_vis_token>" not in text and "<observation>" not in text
        assert text.count("<imagine>") == 1 and s["metadata"]["n_imagined"] == 1
        assert s["data"][1]["content"][0]["type"] == "image"  # the question's image stays


def test_testbed_items_go_through_the_same_converter_with_ground_truth_captions(tmp_path):
    from latentmed.zoo import captioner

    items = [make_item(CFG, "train", f, 0) for f in CFG.families]
    path, gt = captioner.testbed_interleaved(items, tmp_path)
    captioner.convert_file(path, tmp_path / "cap.json", gt)
    out = captioner.load_interleaved(tmp_path / "cap.json")
    assert [captioner.imagination(s) for s in out] == [[it.caption] for it in items]


def test_bad_interleaved_files_are_named(tmp_path):
    from latentmed.zoo import captioner

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversations": []}]))
    with pytest.raises(ValueError, match=rf"{bad} sample 0: a Monet-SFT sample needs a 'data' list"):
        captioner.load_interleaved(bad)
    sample = json.loads((FIXTURE / "train.json").read_text())[0]
    sample["data"][2]["content"][0]["text"] = "no marker here"
    with pytest.raises(ValueError, match="not announced by <abs_vis_token></abs_vis_token>"):
        captioner.to_capimagine(sample, captioner.GroundTruthCaptioner({}), FIXTURE)


def test_hf_trainer_sft_with_lora_runs_on_the_tiny_model(tiny_ckpt, tmp_path):
    from latentmed.zoo import captioner

    items = [make_item(CFG, "train", f, i) for f in CFG.families for i in range(2)]
    path, gt = captioner.testbed_interleaved(items, tmp_path / "data")
    captioner.convert_file(path, tmp_path / "data" / "cap.json", gt)
    m = sft.sft(tiny_ckpt, tmp_path / "data" / "cap.json", tmp_path / "out", lora=True, max_steps=3, lr=1e-3,
                  batch_size=2, report=False)
    assert len(m["losses"]) == 3 and all(np.isfinite(m["losses"]))
    checkpoint.load(tmp_path / "out", method="capimagine")


@pytest.mark.slow
def test_accelerate_launch_with_two_cpu_processes(tiny_ckpt, tmp_path):
    import shutil
    import subprocess
    import sys

    from latentmed.zoo import captioner

    items = [make_item(CFG, "train", f, i) for f in CFG.families for i in range(2)]
    path, gt = captioner.testbed_interleaved(items, tmp_path / "data")
    captioner.convert_file(path, tmp_path / "data" / "cap.json", gt)
    exe = shutil.which("accelerate", path=str(__import__("pathlib").Path(sys.executable).parent))
    # without a GPU, accelerate's multi-process launcher (torchrun) gives each process gloo
    cmd = [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "latentmed.zoo.sft", "--model", str(tiny_ckpt), "--data",
           str(tmp_path / "data" / "cap.json"), "--out", str(tmp_path / "out"), "--max-steps", "2", "--lr", "1e-3"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(__import__("os").environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "sft_metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["losses"]) == 2
    assert metrics["backend"] == "gloo" or torch.cuda.is_available()


def test_the_learning_rate_follows_warmup_stable_cosine_decay():
    import math

    c = loop.StageConfig("x", 100, lr=2.0, warmup=10, decay_start=0.6, min_lr_frac=0.05)
    assert loop.lr_at(c, 9) == pytest.approx(2.0) and loop.lr_at(c, 0) < 0.5  # warmed up by step 10
    assert loop.lr_at(c, 30) == loop.lr_at(c, 59) == pytest.approx(2.0)  # stable until 60 % of the steps
    for step in (60, 75, 90, 99):  # cosine from lr down to 5 % of it over the last 40 steps
        frac = (step + 1 - 60) / 40
        assert loop.lr_at(c, step) == pytest.approx(2.0 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))))


def test_predict_continues_its_own_segment_loop_with_the_numbers_of_a_fresh_forward(tok, bank, monkeypatch):
    """When every row ran the whole segment, the evaluation runs only the positions after it on
    its probe's cache: every logit it reads equals (bit for bit) a fresh teacher-forced forward's."""
    from dataclasses import replace

    from latentmed.zoo.forward import forward

    model = fresh(tok)
    real_logits, real_after = predict.logits_at, predict.after_segment
    for name in ["lvr-style", "lvr-closed", "monet-style"]:
        spec = SPECS[name]
        plan = batching.Plan(spec, n_latents=spec.n_latents, latent_fill="hidden")
        runs = {}
        for mode in ("continued", "fresh"):
            seen, used = [], []
            monkeypatch.setattr(predict, "logits_at", lambda m, h, p, seen=seen: seen.append(real_logits(m, h, p)) or seen[-1])
            if mode == "continued":
                monkeypatch.setattr(predict, "after_segment", lambda *a, used=used: used.append(1) or real_after(*a))
            else:  # the whole forward again on the same batch (what evaluation did before)
                monkeypatch.setattr(predict, "after_segment", lambda model, batch, *a, used=used: used.append(1) or
                                    forward(model, batch, replace(plan, n_latents=batch.n_latents)))
            runs[mode] = (predict.predict(model, tok, bank, plan), seen, len(used))
        (rc, lc, nc), (rf, lf, nf) = runs["continued"], runs["fresh"]
        assert nc > 0 and nc == nf, name  # the shortcut was taken
        assert rc == rf and len(lc) == len(lf) and all(torch.equal(a, b) for a, b in zip(lc, lf)), name
