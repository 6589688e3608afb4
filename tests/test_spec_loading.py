"""LatentSpec presets and id resolution; LatentReasoner loading and its clear errors."""

import json

import pytest
import torch
from conftest import OPTIONS
from latentmed.engine.reasoner import LatentReasoner
from latentmed.engine.spec import METHODS, PRESETS, LatentSpec, preset
from safetensors.torch import load_file, save_file


def edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_presets_encode_each_methods_layout():
    assert set(METHODS) == {"monet", "monet-sft", "lvr", "mirage", "capimagine", "direct"}
    m, s, lvr, mir, cap = (PRESETS[k] for k in ("monet", "monet-sft", "lvr", "mirage", "capimagine"))
    assert (m.placement, m.n_latents, m.end_rule) == ("overwrite_start", 10, "force_after_k")
    assert (s.placement, s.pad_token) == ("after_start", "<abs_vis_token_pad>")
    assert (lvr.placement, lvr.end_rule, lvr.head_on_first) == ("after_start", "after_k_sample", False)
    assert (mir.end_rule, mir.max_latents, mir.k_target) == ("model_or_cap", 8, 8)
    assert cap.placement == "text" and cap.has_segments and not cap.has_latents
    assert not PRESETS["direct"].has_segments
    with pytest.raises(ValueError, match="unknown method 'coconut'"):
        preset("coconut")


def test_ids_come_from_the_tokenizer(tok):
    spec, ids = preset("mirage").resolve(tok, {})
    vocab = tok.get_vocab()
    assert (ids.start, ids.end, ids.pad) == (vocab["<|latent_start|>"], vocab["<|latent_end|>"], vocab["<|latent_pad|>"])
    assert ids.fill == ids.pad and ids.image == vocab["<|image_pad|>"] and tok.eos_token_id in ids.eos
    _, monet = preset("monet").resolve(tok, {})
    assert monet.pad is None and monet.fill == monet.start


def test_config_ids_and_lvr_head_are_read_and_cross_checked(tok):
    vocab = tok.get_vocab()
    spec, _ = preset("lvr").resolve(tok, {"lvr_head": True, "lvr_start_id": vocab["<|lvr_start|>"]})
    assert spec.head == "lvr_head"
    assert preset("lvr").resolve(tok, {"lvr_head": False})[0].head is None
    with pytest.raises(ValueError, match="tokenizer/config mismatch: config.json lvr_start_id=5"):
        preset("lvr").resolve(tok, {"lvr_start_id": 5})


def test_prompt_template_and_spec_file_round_trip(tmp_path):
    spec = preset("lvr")
    text = spec.format_question("What colour?", OPTIONS)
    assert text.startswith("What colour?\nA. red\nB. green") and text.endswith("directly.")
    spec.with_overrides(n_latents=4).save(tmp_path)
    assert LatentSpec.load(tmp_path).n_latents == 4
    with pytest.raises(ValueError, match="unknown fields"):
        LatentSpec.from_dict({"method": "x", "colour": 1})


def test_loads_in_float32_on_cpu_with_a_clean_report(load):
    r = load("monet")
    assert r.dtype == torch.float32 and r.head is None
    assert r.load_report == {"missing": [], "unexpected": []}
    assert r.processor.size.longest_edge == 224 * 224  # max pixels, read from preprocessor_config.json


def test_method_from_latent_spec_json(ckpt_copy):
    with pytest.raises(ValueError, match=f"{ckpt_copy}: no latent_spec.json.*monet, monet-sft, lvr"):
        LatentReasoner.from_pretrained(ckpt_copy)
    preset("mirage", n_latents=2).save(ckpt_copy)
    r = LatentReasoner.from_pretrained(ckpt_copy)
    assert r.spec.method == "mirage" and r.spec.n_latents == 2


def test_build_inputs_uses_the_spec_template(load, images):
    r = load("monet")
    p = r.build_inputs(images[0], "What colour is the square?", OPTIONS)
    assert "Put your final answer in \\boxed{}" in p.text and "A. red" in p.text
    assert int((p.input_ids == r.ids.image).sum()) == 16  # 112 px -> 16 merged tokens
    assert p.option_ids == r.tokenizer.convert_tokens_to_ids(list("ABCD"))
    words = load("mirage", option_tokens="word").build_inputs(images[0], "q", OPTIONS)
    assert words.option_ids == [r.tokenizer.encode(w)[0] for w in OPTIONS]


def test_missing_folder_and_config(tmp_path, ckpt_copy):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: checkpoint folder not found"):
        LatentReasoner.from_pretrained(tmp_path / "nope", method="monet")
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{ckpt_copy / 'config.json'}: missing"):
        LatentReasoner.from_pretrained(ckpt_copy, method="monet")


def test_invalid_config_and_wrong_architecture(ckpt_copy):
    cfg = ckpt_copy / "config.json"
    good = cfg.read_text()
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match=f"{cfg}: invalid JSON"):
        LatentReasoner.from_pretrained(ckpt_copy, method="monet")
    cfg.write_text(good)
    edit_json(cfg, model_type="llava", architectures=["LlavaForConditionalGeneration"])
    with pytest.raises(ValueError, match=f"{cfg}: model_type 'llava'.*LlavaForConditionalGeneration.*not Qwen2.5-VL"):
        LatentReasoner.from_pretrained(ckpt_copy, method="monet")


def test_no_weights_and_pickle_weights_are_refused(ckpt_copy):
    weights = ckpt_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=f"{ckpt_copy}: no model weights"):
        LatentReasoner.from_pretrained(ckpt_copy, method="monet")
    (ckpt_copy / "pytorch_model.bin").write_bytes(data)
    with pytest.raises(ValueError, match=f"{ckpt_copy}: only pickle weights \\(pytorch_model.bin\\); refusing"):
        LatentReasoner.from_pretrained(ckpt_copy, method="monet")


def test_partial_shards_name_the_index_and_the_missing_shard(ckpt_copy):
    state = load_file(ckpt_copy / "model.safetensors")
    keys = sorted(state)
    half = len(keys) // 2
    save_file({k: state[k] for k in keys[:half]}, ckpt_copy / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
                  for i, k in enumerate(keys)}
    index = ckpt_copy / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{index}: lists shard\\(s\\) model-00002-of-00002.safetensors"):
        LatentReasoner.from_pretrained(ckpt_copy, method="monet")


def test_missing_parameters_are_an_error_unless_not_strict(ckpt_copy):
    state = load_file(ckpt_copy / "model.safetensors")
    dropped = sorted(k for k in state if "lm_head" in k)
    save_file({k: v for k, v in state.items() if k not in dropped}, ckpt_copy / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{ckpt_copy}: weights miss 1 parameters"):
        LatentReasoner.from_pretrained(ckpt_copy, method="monet")
    with pytest.warns(UserWarning, match="missing keys"):
        r = LatentReasoner.from_pretrained(ckpt_copy, method="monet", strict=False)
    assert r.load_report["missing"] == ["lm_head.weight"]


def test_tokenizer_without_the_methods_tokens(ckpt_copy):
    tj = ckpt_copy / "tokenizer.json"
    d = json.loads(tj.read_text())
    d["added_tokens"] = [t for t in d["added_tokens"] if t["content"] != "<abs_vis_token>"]
    tj.write_text(json.dumps(d))
    tc = ckpt_copy / "tokenizer_config.json"
    c = json.loads(tc.read_text())
    c["added_tokens_decoder"] = {k: v for k, v in c.get("added_tokens_decoder", {}).items()
                                 if v["content"] != "<abs_vis_token>"}
    c.pop("extra_special_tokens", None)
    tc.write_text(json.dumps(c))
    with pytest.raises(ValueError, match=f"{ckpt_copy}: tokenizer has no start token '<abs_vis_token>'"):
        LatentReasoner.from_pretrained(ckpt_copy, method="monet")
    LatentReasoner.from_pretrained(ckpt_copy, method="mirage")  # other methods still load


def test_tokenizer_config_mismatch(ckpt_copy):
    edit_json(ckpt_copy / "config.json", image_token_id=7)
    with pytest.raises(ValueError, match=f"{ckpt_copy}: tokenizer/config mismatch: config.json image_token_id=7"):
        LatentReasoner.from_pretrained(ckpt_copy, method="monet")


def test_missing_preprocessor_config(ckpt_copy):
    (ckpt_copy / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{ckpt_copy / 'preprocessor_config.json'}: missing"):
        LatentReasoner.from_pretrained(ckpt_copy, method="monet")


def test_lvr_head_without_weights_is_an_error(ckpt_copy):
    edit_json(ckpt_copy / "config.json", lvr_head=True)
    with pytest.raises(ValueError, match=f"{ckpt_copy}: config.json asks for lvr_head but no lvr_head"):
        LatentReasoner.from_pretrained(ckpt_copy, method="lvr")


# Every field of every preset, against the released code as the survey reads it
# (shared/reference/latent-reasoners-code-survey.md): a plausible slip in any of them fails here.
PRESET_FIELDS = {
    "monet": dict(start_token="<abs_vis_token>", end_token="</abs_vis_token>", pad_token=None,
                  placement="overwrite_start", n_latents=10, max_latents=0, end_rule="force_after_k", head=None,
                  answer_format="boxed", max_segments=None, option_tokens="letter", template="chat",
                  latent_source="hidden", after_segment="all"),
    "monet-sft": dict(start_token="<abs_vis_token>", end_token="</abs_vis_token>", pad_token="<abs_vis_token_pad>",
                      placement="after_start", n_latents=10, end_rule="force_after_k", answer_format="boxed"),
    "lvr": dict(start_token="<|lvr_start|>", end_token="<|lvr_end|>", pad_token=None, placement="after_start",
                n_latents=8, end_rule="after_k_sample", head=None, head_on_first=False, answer_format="answer_tag",
                max_segments=None),
    "mirage": dict(start_token="<|latent_start|>", end_token="<|latent_end|>", pad_token="<|latent_pad|>",
                   placement="after_start", n_latents=4, max_latents=8, end_rule="model_or_cap", answer_format="boxed",
                   max_segments=1),
    "capimagine": dict(start_token="<imagine>", end_token="</imagine>", placement="text", end_rule="model_or_cap",
                       answer_format="boxed", max_segments=1),
    "direct": dict(placement="none", answer_format="letter", start_token=None, end_token=None),
}


@pytest.mark.parametrize("method", sorted(PRESET_FIELDS))
def test_every_preset_field(method):
    p = PRESETS[method]
    for field, want in PRESET_FIELDS[method].items():
        assert getattr(p, field) == want, (method, field)
    assert p.k_target == (p.max_latents if p.end_rule == "model_or_cap" else p.n_latents)
    assert ("MONET" not in (p.system_prompt or "")) and (p.system_prompt is not None) == (method in ("monet", "monet-sft", "capimagine"))
