"""Round trips: every file the project writes is read back by the project's own consumer of that
format, and what comes back is what went in.

    testbed folder          dataset.generate        -> dataset.load(verify=True)
    Monet-SFT export        exports.to_monet_sft    -> exports.read_monet_sft, captioner (both captioners)
    CapImagine export       exports.to_capimagine_sft -> exports.read_capimagine_sft, `python -m latentmed.zoo.sft`
    captioner output        captioner.convert_file  -> exports.read_capimagine_sft, sft
    interleaved testbed     captioner.testbed_interleaved -> captioner.load_interleaved -> sft
    HR-Bench TSV            exports.to_hrbench_tsv  -> exports.read_hrbench_tsv, decode_image
    sft checkpoint          sft.sft                 -> engine checkpoint.load
    zoo checkpoint          zoo.build._finish       -> LatentReasoner, zoo.is_trained, item_inputs
    training checkpoint     loop._save_checkpoint   -> loop._read_checkpoint
    tiny checkpoint         tiny.save_checkpoint    -> checkpoint.load
    latent spec             LatentSpec.save         -> LatentSpec.load
    tokenizer               save_tokenizer          -> load_tokenizer
    trace + sidecar         Trace.save              -> Trace.load
    results store           Run.add                 -> ResultsStore.frame, Run.tensors
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from latentmed import files
from latentmed.engine import checkpoint
from latentmed.engine.reasoner import LatentReasoner
from latentmed.engine.spec import PRESETS, LatentSpec
from latentmed.engine.tiny import image_processor, save_checkpoint, tiny_config, tiny_model
from latentmed.engine.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer
from latentmed.engine.trace import Trace
from latentmed.store import ResultsStore
from latentmed.testbed import VOCABULARY, TestbedConfig, make_item
from latentmed.testbed import dataset as D
from latentmed.testbed import exports as E
from latentmed.zoo import SPECS
from latentmed.zoo import build as Z
from latentmed.zoo import captioner as C
from latentmed.zoo import loop as L
from latentmed.zoo import sft as S

from conftest import OPTIONS

TB = TestbedConfig(n_objects=(3, 8), n_train=8, n_val=4, n_test=4)


@pytest.fixture(scope="module")
def tb(tmp_path_factory):
    return D.generate(TB, tmp_path_factory.mktemp("rt") / "tb", progress=False)


def pixels_of(im) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def test_testbed_folder_reads_back_as_the_items_it_was_made_from(tb):
    back = D.load(tb.root, verify=True)
    assert back.config == TB and len(back) == 16
    for it in back.items():
        made = make_item(TB, it.split, it.family, int(it.id.rsplit("-", 1)[1]))
        assert it.to_dict() == made.to_dict()
        assert (pixels_of(back.image(it)) == pixels_of(made.image)).all()
        assert (pixels_of(back.crop(it)) == pixels_of(made.crop)).all()


def test_monet_export_is_read_by_the_reader_and_converted_by_the_ground_truth_captioner(tb, tmp_path):
    path = E.to_monet_sft(tb, "train", tmp_path / "monet" / "train.json")
    samples = E.read_monet_sft(path)
    out = tmp_path / "monet" / "capimagine.json"
    assert C.convert_file(path, out, C.GroundTruthCaptioner.from_samples(samples)) == len(tb.items("train"))
    converted = E.read_capimagine_sft(out)
    assert [C.imagination(s) for s in converted] == [[it.caption] for it in tb.items("train")]
    assert all("<abs_vis_token>" not in json.dumps(s["data"][2]) for s in converted)
    tok = build_tokenizer(VOCABULARY)
    examples = S.sft_examples(converted, tok, image_processor(), out.parent)
    assert len(examples) == len(converted) and all((e["labels"] != -100).any() for e in examples)


def test_monet_export_is_accepted_by_the_model_captioner(tb, ckpt, tmp_path):
    path = E.to_monet_sft(tb, "val", tmp_path / "monet" / "val.json")
    n = C.convert_file(path, tmp_path / "monet" / "cap.json", C.ModelCaptioner(ckpt, max_new_tokens=3))
    converted = C.load_interleaved(tmp_path / "monet" / "cap.json")
    assert n == len(converted) == 4 and all(len(C.imagination(s)) == 1 for s in converted)


def test_capimagine_export_trains_with_the_sft_command_and_the_result_loads(tb, ckpt, tmp_path):
    data = E.to_capimagine_sft(tb, "train", tmp_path / "cap" / "train.json")
    assert len(E.read_capimagine_sft(data)) == 8
    S.main(["--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "out"), "--max-steps", "2",
            "--lr", "1e-3"])  # `python -m latentmed.zoo.sft` runs exactly this
    metrics = files.read_json(tmp_path / "out" / "sft_metrics.json")
    assert len(metrics["losses"]) == 2 and all(np.isfinite(metrics["losses"]))
    loaded = checkpoint.load(tmp_path / "out", method="capimagine")
    assert loaded.model.config.text_config.hidden_size == 64
    again = S.sft(ckpt, data, tmp_path / "out", max_steps=1, report=False)  # its own output is replaced
    assert len(again["losses"]) == 1 and not (tmp_path / "out.partial").exists()


def test_testbed_interleaved_data_goes_through_the_converter_into_sft(tmp_path):
    items = [make_item(TB, "train", f, 0) for f in TB.families]
    src, gt = C.testbed_interleaved(items, tmp_path)
    samples = C.load_interleaved(src)
    assert [s["metadata"]["id"] for s in samples] == [it.id for it in items]
    C.convert_file(src, tmp_path / "cap.json", gt)
    converted = E.read_capimagine_sft(tmp_path / "cap.json")
    examples = S.sft_examples(converted, build_tokenizer(VOCABULARY), image_processor(), tmp_path)
    assert len(examples) == 4


def test_hrbench_tsv_reads_back_with_its_images_answers_and_options(tb, tmp_path):
    path = E.to_hrbench_tsv(tb, "test", tmp_path / "hr.tsv")
    df = E.read_hrbench_tsv(path)
    items = tb.items("test")
    assert list(df["index"]) == list(range(len(items)))
    for row, it in zip(df.itertuples(), items):
        assert row.answer == it.answer and [row.A, row.B, row.C, row.D] == it.options
        assert row.question == it.question and row.category == it.family
        img = E.decode_image(row.image, f"row {row.index}")
        assert (pixels_of(img) == pixels_of(tb.image(it))).all()


def test_tiny_checkpoint_and_spec_and_tokenizer_read_back_equal(tmp_path):
    tok = build_tokenizer(VOCABULARY)
    model = tiny_model(tiny_config(tok, "test"), seed=3)
    save_checkpoint(tmp_path / "ck", model, tok)
    PRESETS["monet-sft"].save(tmp_path / "ck")
    loaded = checkpoint.load(tmp_path / "ck")
    assert loaded.spec == PRESETS["monet-sft"]
    for (k, a), b in zip(model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), k
    back = load_tokenizer(save_tokenizer(tok, tmp_path / "tok"))
    text = "What colour is the star? <|image_pad|><abs_vis_token> red"
    assert back.encode(text) == tok.encode(text) and back.get_vocab() == tok.get_vocab()


@pytest.mark.parametrize("name", sorted({**PRESETS, **SPECS}))
def test_every_spec_reads_back_equal(name, tmp_path):
    spec = {**PRESETS, **SPECS}[name]
    spec.save(tmp_path)
    assert LatentSpec.load(tmp_path) == spec and asdict(LatentSpec.load(tmp_path)) == asdict(spec)


def test_trace_reads_back_with_every_field_and_tensor(load, images, tmp_path):
    r = load("monet-sft", n_latents=3)
    t = r.generate(r.build_inputs(images[0], "What colour?", OPTIONS), max_new_tokens=8, force_latent=True)
    back = Trace.load(t.save(tmp_path / "t.json"))
    plain = lambda d: {k: v for k, v in d.items() if k not in ("segments", "records", "step_option_logprobs")}  # noqa: E731
    assert plain(back.to_dict()) == plain(t.to_dict())
    assert torch.equal(back.step_option_logprobs, t.step_option_logprobs.float())
    for a, b in zip(back.segments, t.segments):
        assert (a.start, a.end, a.slots, a.ended) == (b.start, b.end, b.slots, b.ended)
        assert torch.equal(a.z_in, b.z_in.float()) and torch.equal(a.z_out, b.z_out.float())


def test_results_store_rows_and_tensors_read_back(tmp_path):
    run = ResultsStore(tmp_path).run("m", "abc", {"n": 2})
    rows = [{"item": "a", "condition": "clean", "p": 0.25}, {"item": "b", "condition": "zero", "p": np.float32(0.5)}]
    run.add(rows, tensors={1: {"z": torch.arange(6.0).view(2, 3)}})
    df = ResultsStore(tmp_path).frame(model="m")
    assert list(df["item"]) == ["a", "b"] and list(df["p"]) == [0.25, 0.5] and set(df["model_hash"]) == {"abc"}
    back = ResultsStore(tmp_path).run("m", "abc", {"n": 2}).rows()
    assert ResultsStore(tmp_path).run("m", "abc", {"n": 2}).tensors(back[0]) == {}
    assert torch.equal(run.tensors(back[1])["z"], torch.arange(6.0).view(2, 3))


def test_zoo_checkpoint_loads_through_the_engine_and_reads_back_as_trained(tb, tmp_path):
    tok = build_tokenizer(VOCABULARY)
    model = tiny_model(tiny_config(tok, "test"), seed=1)
    info = {"name": "direct", "hash": "h1", "stages": [{"stage": "s", "steps": 1}], "seconds": 0.0}
    Z._finish(tmp_path / "direct", model, tok, SPECS["direct"], dict(info))
    assert Z.is_trained(tmp_path / "direct", "h1") and not Z.is_trained(tmp_path / "direct", "h2")
    assert Z.read_info(tmp_path / "direct")["file_hashes"]["model.safetensors"] == \
        files.file_hash(tmp_path / "direct" / "model.safetensors")
    r = LatentReasoner.from_pretrained(tmp_path / "direct")
    assert r.spec == SPECS["direct"]
    for (k, a), b in zip(model.state_dict().items(), r.model.state_dict().values()):
        assert torch.equal(a, b), k
    item = tb.with_images(tb.items("test")[0])
    prompt = r.item_inputs(item)
    assert prompt.options == item.options and prompt.query.answer == item.answer_index


def test_training_checkpoint_reads_back_exactly(tmp_path):
    cfg = L.StageConfig("s", 4)
    tensors = {"weights": {"a::w": torch.randn(3, 2)}, "optimizer": {"0.exp_avg": torch.randn(3)},
               "best": {"a::w": torch.randn(3, 2)}}
    state = dict(step=2, best=0.5, best_step=2, seed=0, seconds=1.0, generator=[0], config=asdict(cfg), files={})
    (tmp_path / "run").mkdir()
    L._save_checkpoint(tmp_path / "run", tensors, state)
    st, back = L._read_checkpoint(tmp_path / "run", cfg)
    assert {k: v for k, v in st.items() if k != "files"} == {k: v for k, v in state.items() if k != "files"}
    for name, group in tensors.items():
        assert all(torch.equal(back[name][k], v) for k, v in group.items()), name
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == \
        ["best.safetensors", "optimizer.safetensors", "state.json", "weights.safetensors"]


def test_every_file_in_a_zoo_checkpoint_is_recorded_and_verified(tmp_path):
    tok = build_tokenizer(VOCABULARY)
    Z._finish(tmp_path / "m", tiny_model(tiny_config(tok, "test")), tok, SPECS["direct"], {"hash": "h"})
    recorded = set(Z.read_info(tmp_path / "m")["file_hashes"])
    on_disk = {p.name for p in (tmp_path / "m").iterdir() if p.is_file()} - {files.MARKER, Z.ZOO_FILE}
    assert recorded == on_disk and {"model.safetensors", "latent_spec.json", "tokenizer.json"} <= recorded
    Path(tmp_path / "m" / "latent_spec.json").write_text(json.dumps(asdict(SPECS["base"])))
    assert not Z.is_trained(tmp_path / "m", "h"), "a replaced latent_spec.json must not pass as trained"
