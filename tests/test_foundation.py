"""Tokenizer, tiny model factory, input builder and paths: the pieces every other part uses."""

import json
import subprocess
import sys

import pytest
import torch
from latentmed import paths
from latentmed.engine.inputs import chat_prompt, encode, n_image_tokens
from latentmed.engine.tiny import (
    image_processor,
    make_tiny_checkpoint,
    tiny_config,
    tiny_model,
)
from latentmed.engine.tokenizer import (
    METHOD_TOKENS,
    QWEN_SPECIAL,
    build_tokenizer,
    load_tokenizer,
)
from latentmed.testbed import NUMBER_WORDS, RELATIONS, VOCABULARY
from latentmed.testbed.scenes import COLOUR_NAMES, SHAPES
from PIL import Image


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(VOCABULARY)


def test_special_tokens_follow_the_bpe_vocabulary_in_qwen_order(tok):
    ids = tok.convert_tokens_to_ids(QWEN_SPECIAL)
    assert ids == list(range(ids[0], ids[0] + len(QWEN_SPECIAL)))
    method_ids = tok.convert_tokens_to_ids([t for g in METHOD_TOKENS.values() for t in g])
    assert method_ids == list(range(ids[-1] + 1, ids[-1] + 1 + len(method_ids)))
    assert max(method_ids) == len(tok) - 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_every_answer_word_is_one_token_with_and_without_a_space(tok):
    for word in [*COLOUR_NAMES, *SHAPES, *NUMBER_WORDS, *RELATIONS, *"ABCD"]:
        assert len(tok.encode(" " + word)) == 1, word
        assert len(tok.encode(word)) == 1, word


def test_special_tokens_are_atomic_and_text_round_trips(tok):
    text = "<|vision_start|><|image_pad|><|vision_end|>How many red objects?<abs_vis_token></abs_vis_token> \\boxed{B}"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<|image_pad|>") in ids


def test_tokenizer_save_and_reload_is_identical(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    prompt = chat_prompt(tok, "What colour is the star?")
    assert again.encode(prompt) == tok.encode(prompt)
    assert again.get_vocab() == tok.get_vocab()


def test_load_tokenizer_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_tiny_config_takes_its_ids_from_the_tokenizer(tok):
    cfg = tiny_config(tok, "test")
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.text_config.vocab_size >= len(tok) and cfg.text_config.vocab_size % 64 == 0
    assert cfg.vision_config.out_hidden_size == cfg.text_config.hidden_size
    with pytest.raises(ValueError, match="unknown tiny model size"):
        tiny_config(tok, "huge")


def test_encode_expands_image_pads_to_the_merged_token_count(tok):
    proc = image_processor()
    img = Image.new("RGB", (224, 224), (120, 30, 200))
    enc = encode(tok, proc, chat_prompt(tok, "What colour is the star?"), [img])
    assert enc.image_grid_thw.tolist() == [[1, 16, 16]]
    assert n_image_tokens(enc.image_grid_thw) == [64]
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc.input_ids == pad).sum()) == 64
    assert int(enc.mm_token_type_ids(pad).sum()) == 64
    with pytest.raises(ValueError, match="markers but 2 images"):
        encode(tok, proc, chat_prompt(tok, "q"), [img, img])


def test_positions_need_token_types(tok):
    """Without mm_token_type_ids transformers 5 silently uses 1-D positions; we always pass them."""
    model = tiny_model(tiny_config(tok, "test"), seed=0)
    proc = image_processor()
    img = Image.effect_noise((224, 224), 60).convert("RGB")
    enc = encode(tok, proc, chat_prompt(tok, "What colour is the star?"), [img])
    kw = dict(input_ids=enc.input_ids, pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw)
    with torch.no_grad():
        with_types = model(**kw, mm_token_type_ids=enc.mm_token_type_ids(model.config.image_token_id)).logits
        model.model.rope_deltas = None
        without = model(**kw).logits
    assert not torch.allclose(with_types, without, atol=1e-5)


def test_tiny_checkpoint_is_safetensors_and_reloads_equal(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = make_tiny_checkpoint(tmp_path / "ck", size="test", seed=3)
    names = {p.name for p in path.iterdir()}
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    again = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    ref = tiny_model(tiny_config(build_tokenizer(), "test"), seed=3)
    for (n1, p1), (n2, p2) in zip(sorted(ref.state_dict().items()), sorted(again.state_dict().items())):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_paths_follow_environment_and_unwritable_folders_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTMED_DATA", str(tmp_path / "d"))
    assert paths.data_dir() == (tmp_path / "d").resolve()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=str(blocker)):
        paths.ensure_writable(blocker / "sub")


def test_importing_latentmed_keeps_jsonschema_from_building_the_iri_grammar():
    """latentmed marks rfc3987_syntax absent (its import builds a Lark grammar: 3 s in every
    chapter process); nbformat still validates a notebook and altair still validates a chart."""
    code = ("import sys, latentmed, nbformat, altair as alt, pandas as pd\n"
            "assert sys.modules['rfc3987_syntax'] is None\n"
            "nb = nbformat.read('notebooks/01_testbed.ipynb', as_version=4)\n"
            "nbformat.validate(nb)\n"
            "alt.Chart(pd.DataFrame({'x': [1, 2]})).mark_point().encode(x='x:Q').to_dict(validate=True)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=paths.ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
