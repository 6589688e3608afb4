"""GPU figures: a random-initialised model with the real Qwen2.5-VL-7B config in bf16.

    .venv/bin/python -m benchmarks --device cuda --only gpu

* Batch-1 decode, tokens/s: our loop (`LatentReasoner.generate`) against HF `generate` (dynamic
  cache; static cache without compile; static cache with its automatic `torch.compile`) and
  our loop with the language model under `torch.compile`, each against the memory-bandwidth
  roofline: every decode step reads the decoder layers, the final norm and the LM head (7.07 B
  parameters, 14.1 GB in bf16; the 545 M-row embedding table is read one row at a time, and the
  vision tower not at all: 15.2 GB with the embedding, 16.6 GB the whole model) plus the KV
  cache so far. The card's bandwidth and bf16 peak come from `CARDS`, keyed by
  `torch.cuda.get_device_name()`.
* Batched sweep throughput: `shared_sweep` of M = 16, 64, 256 latent interventions on one prompt
  with a 448 px image (Monet layout, forced segment of 10 latents), as FLOP/s against the card's
  dense bf16 peak (MFU); FLOPs per token = 2 x matmul parameters + 4 x layers x context x width
  (attention scores and values).

No weights are downloaded: the model is built from the config alone (random weights, a random
model decodes garbage, which costs the same). Without CUDA, `--device cuda` is refused; every
piece of arithmetic here runs on CPU and is tested (tests/test_benchmarks.py). `--gpu-config
test` runs the whole code path on a tiny config on any device (a dry run, no roofline).
"""

from __future__ import annotations

import time

import torch

from . import common
from .common import log

# Qwen/Qwen2.5-VL-7B-Instruct config.json (the numbers that size the model)
QWEN25_VL_7B = dict(
    text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
              tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                          "mrope_section": [16, 24, 24]}),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                hidden_act="silu", tokens_per_second=2),
)

# (substrings all present in the lower-cased device name, card, memory bandwidth GB/s, dense bf16
# tensor TFLOP/s); vendor datasheets, without sparsity. The first match wins (specific first).
CARDS = [
    (("h200",), "H200", 4800, 989),
    (("h100", "pcie"), "H100 PCIe", 2000, 756),
    (("h100", "nvl"), "H100 NVL", 3900, 835),
    (("h100",), "H100 SXM", 3350, 989),
    (("a100", "80gb", "pcie"), "A100 80GB PCIe", 1935, 312),
    (("a100", "80gb"), "A100 80GB SXM", 2039, 312),
    (("a100",), "A100 40GB", 1555, 312),
    (("l40s",), "L40S", 864, 362),
    (("l40",), "L40", 864, 181),
    (("l4",), "L4", 300, 121),
    (("a10",), "A10", 600, 125),
]


class NoCuda(RuntimeError):
    """`--device cuda` on a machine without a CUDA device."""


def card(name: str) -> dict | None:
    """Bandwidth and peak of the card called `name` (torch.cuda.get_device_name), or None."""
    low = name.lower()
    for keys, label, gbps, tflops in CARDS:
        if all(k in low for k in keys):
            return dict(card=label, bandwidth_gb_s=gbps, bf16_tflops=tflops)
    return None


# ---------------------------------------------------------------- arithmetic (runs anywhere)

def layer_params(hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int | None = None) -> int:
    """Parameters of one Qwen2 decoder layer: q/k/v with biases, o without, gated MLP, 2 norms."""
    hd = head_dim or hidden // heads
    q, kv = heads * hd, kv_heads * hd
    return (hidden * q + q) + 2 * (hidden * kv + kv) + q * hidden + 3 * hidden * inter + 2 * hidden


def text_params(c: dict) -> dict:
    """Parameter counts of the language model of config `c` (the `text` part of QWEN25_VL_7B)."""
    per = layer_params(c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"],
                       c.get("head_dim"))
    layers = per * c["num_hidden_layers"]
    emb = c["vocab_size"] * c["hidden_size"]
    head = 0 if c.get("tie_word_embeddings") else emb
    read = layers + c["hidden_size"] + head  # what one decode step reads (norm: final RMSNorm)
    return dict(per_layer=per, layers=layers, embedding=emb, lm_head=head, read_per_token=read,
                total=layers + c["hidden_size"] + emb + head)


def kv_bytes_per_token(c: dict, bytes_per: int = 2) -> int:
    """KV cache bytes one context token holds (keys and values of every layer)."""
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * hd * bytes_per


def bytes_per_token(c: dict, context: int = 0, bytes_per: int = 2) -> int:
    """Bytes one batch-1 decode step reads: weights (`text_params.read_per_token`) + KV cache."""
    return text_params(c)["read_per_token"] * bytes_per + context * kv_bytes_per_token(c, bytes_per)


def roofline_tokens_per_s(bandwidth_gb_s: float, bytes_per_tok: float) -> float:
    """Batch-1 decode ceiling: every step must read `bytes_per_tok` at the card's bandwidth."""
    return bandwidth_gb_s * 1e9 / bytes_per_tok


def flops_per_token(c: dict, context: int) -> float:
    """Forward FLOPs of one token at `context` tokens before it: 2 x matmul weights (layers and LM
    head; norms and biases left out) + attention (QK^T and AV: 2 x 2 x layers x context x q width)."""
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    matmul = L * (h * q + 2 * h * kv + q * h + 3 * h * i) + c["vocab_size"] * h
    return 2.0 * matmul + 4.0 * L * context * q


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    """Model FLOP utilisation: achieved FLOP/s over the card's peak."""
    return flops / seconds / (peak_tflops * 1e12)


def sweep_flops(c: dict, prompt: int, steps: int, rows: int) -> float:
    """FLOPs of a shared sweep: one prefill of `prompt` tokens (batch 1), then `rows` rows decoding
    `steps` tokens each (the vision tower is left out)."""
    pre = sum(flops_per_token(c, t) for t in range(prompt))
    dec = rows * sum(flops_per_token(c, prompt + s) for s in range(steps))
    return pre + dec


# ---------------------------------------------------------------- the model

def build_reasoner(method: str, size: str, device: str, max_pixels: int = 448 * 448):
    """A `LatentReasoner` around a random model (7B config, or a tiny.SIZES size), bf16 on CUDA."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from latentmed.engine.reasoner import LatentReasoner
    from latentmed.engine.spec import preset
    from latentmed.engine.tiny import image_processor, tiny_config
    from latentmed.engine.tokenizer import build_tokenizer

    tok = build_tokenizer()
    ids = tok.convert_tokens_to_ids
    if size == "7b":
        t = dict(QWEN25_VL_7B["text"], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
        cfg = Qwen2_5_VLConfig(text_config=t, vision_config=QWEN25_VL_7B["vision"], image_token_id=ids("<|image_pad|>"),
                               video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                               vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)
    else:
        cfg = tiny_config(tok, size)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype).eval()
    spec, sids = preset(method).resolve(tok, {})
    return LatentReasoner(model, tok, image_processor(max_pixels=max_pixels), spec, sids)


def text_config_dict(r) -> dict:
    c = r.model.config.text_config
    return dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                vocab_size=c.vocab_size, head_dim=getattr(c, "head_dim", None),
                tie_word_embeddings=bool(getattr(r.model.config, "tie_word_embeddings", False)))


def counted_params(r) -> dict:
    """Parameters of the built model: what a decode step reads, and the whole model."""
    lm = r.model.model.language_model
    read = sum(p.numel() for p in lm.layers.parameters()) + sum(p.numel() for p in lm.norm.parameters()) + \
        sum(p.numel() for p in r.model.lm_head.parameters())
    return dict(read_per_token=read, total=sum(p.numel() for p in r.model.parameters()),
                vision=sum(p.numel() for p in r.model.model.visual.parameters()))


# ---------------------------------------------------------------- measurements

def decode_rows(r, n: int, repeats: int, device: str, hw: dict | None) -> list[dict]:
    """Batch-1 decode of `n` tokens on a text prompt: ours and HF's variants, tokens/s and roofline."""
    from .bench_loop import banned

    p = r.build_inputs(None, "Describe the picture in detail, then say which object is largest.")
    ids = p.input_ids.to(r.device)
    c = text_config_dict(r)
    ctx = ids.shape[1] + n // 2
    ceiling = roofline_tokens_per_s(hw["bandwidth_gb_s"], bytes_per_token(c, ctx)) if hw else None

    def hf(**extra):
        def fn():
            with torch.inference_mode():
                out = r.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                       do_sample=False, pad_token_id=r.ids.eos[0], **extra)
            return out[0, ids.shape[1]:].tolist()
        return fn

    def ours():
        return r.generate(p, max_new_tokens=n).generated_ids

    ways = [("ours (dynamic cache)", ours), ("HF generate (dynamic cache)", hf()),
            ("HF generate (static cache, no compile)", hf(cache_implementation="static", disable_compile=True)),
            ("HF generate (static cache + torch.compile)", hf(cache_implementation="static"))]
    rows, ref = [], None
    with banned(r.model, r.ids.eos):
        for name, fn in ways + [("ours (language model under torch.compile)", None)]:
            try:
                if fn is None:
                    fn, restore = _compiled_ours(r, ours)
                else:
                    restore = None
                try:
                    st, out = common.timed(fn, repeats, warmup=2, device=device)
                finally:
                    if restore:
                        restore()
            except Exception as exc:  # a variant that does not run here is recorded, not fatal
                rows.append(dict(way=name, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
                log(f"gpu decode {name}: {type(exc).__name__}")
                continue
            ref = out if ref is None else ref
            tps = n / st["best_s"]
            rows.append(dict(way=name, tokens_per_s=tps, time=st, tokens_equal_to_ours=out == ref,
                             roofline_tokens_per_s=ceiling, roofline_fraction=tps / ceiling if ceiling else None))
            log(f"gpu decode {name}: {tps:.1f} tokens/s" + (f" ({tps / ceiling:.0%} of the roofline)" if ceiling else ""))
    return rows


def _compiled_ours(r, ours):
    lm = r.model.model.language_model
    orig = lm.forward
    lm.forward = torch.compile(orig, dynamic=True)

    def restore():
        lm.forward = orig
    return ours, restore


def sweep_rows(r, ms, repeats: int, device: str, hw: dict | None, image_px: int = 448) -> list[dict]:
    """Shared sweeps of M latent interventions: decode tokens/s and MFU."""
    from PIL import Image

    from latentmed.engine import interventions as I
    from latentmed.engine.sweep import shared_sweep

    im = Image.new("RGB", (image_px, image_px), (120, 140, 160))
    p = r.build_inputs(im, "What colour is the square?", ["red", "green", "blue", "yellow"])
    K = r.spec.k_target
    steps = 1 + K + 1 + 8
    c = text_config_dict(r)
    rows = []
    for m in ms:
        vs = [[I.NoiseLatent(scale=1.0, mode="add", seed=j)] for j in range(m)]
        st, out = common.timed(lambda: shared_sweep(r, p, vs, max_new_tokens=steps, force_latent=True), repeats,
                               warmup=1, device=device)
        tokens = sum(len(t.generated_ids) for t in out)
        flops = sweep_flops(c, int(p.input_ids.shape[1]), steps, m)
        rows.append(dict(m=m, prompt_tokens=int(p.input_ids.shape[1]), steps=steps, time=st,
                         decode_tokens_per_s=tokens / st["best_s"], tflops_per_s=flops / st["best_s"] / 1e12,
                         mfu=mfu(flops, st["best_s"], hw["bf16_tflops"]) if hw else None))
        log(f"gpu sweep M={m}: {tokens / st['best_s']:.0f} decode tokens/s" +
            (f", MFU {rows[-1]['mfu']:.1%}" if hw else ""))
    return rows


def main(args) -> dict:
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NoCuda(f"--device {device}: no CUDA device on this machine (torch {torch.__version__}, "
                     f"torch.cuda.is_available() is False); the GPU figures need one")
    size = args.gpu_config
    result = dict(benchmark="gpu", status="run", **common.provenance(device))
    hw = card(result["device_name"]) if device.startswith("cuda") and size == "7b" else None
    t0 = time.perf_counter()
    r = build_reasoner("monet", size, device)
    log(f"gpu: {size} model built in {time.perf_counter() - t0:.0f} s on {result['device_name']}"
        + (f" ({hw['card']}: {hw['bandwidth_gb_s']} GB/s, {hw['bf16_tflops']} TFLOP/s bf16)" if hw else
           " (no roofline: not a known card, or a dry run)"))
    c = text_config_dict(r)
    counted = counted_params(r)
    n = args.gpu_tokens
    decode = decode_rows(r, n, args.repeats, device, hw)
    ms = (16, 64, 256) if size == "7b" else (2, 4)
    sweep = sweep_rows(r, ms, args.repeats, device, hw)
    result.update(config=size, dtype=str(r.dtype).replace("torch.", ""), card=hw, text_config=c,
                  params=dict(counted=counted, computed=text_params(c)),
                  bytes_per_token_weights=text_params(c)["read_per_token"] * (2 if r.dtype == torch.bfloat16 else 4),
                  kv_bytes_per_token=kv_bytes_per_token(c, 2 if r.dtype == torch.bfloat16 else 4),
                  decode=decode, sweep=sweep, new_tokens=n,
                  outputs_equal=all(d.get("tokens_equal_to_ours", True) for d in decode if "error" not in d))
    return common.finish(result)


def not_run(reason: str, device: str = "cuda") -> dict:
    """The record written when the GPU figures could not be taken on this machine."""
    return common.finish(dict(benchmark="gpu", status="not run", reason=reason, **common.provenance("cpu"),
                              requested_device=device, outputs_equal=None))


def report(result: dict) -> list[str]:
    """Lines saying what a GPU result holds (or why there is none), for chapter 9."""
    if result.get("status") != "run":
        return [f"Not run: {result.get('reason', 'no reason recorded')} (recorded {result['date'][:10]} at commit "
                f"{result['git_commit'][:10]})."]
    hw = result.get("card")
    lines = [f"{result['config']} config in {result['dtype']} on {result['device_name']}"
             + (f" ({hw['bandwidth_gb_s']} GB/s, {hw['bf16_tflops']} TFLOP/s bf16 peak)" if hw else " (no roofline)")
             + f", commit {result['git_commit'][:10]}, {result['date'][:10]}."]
    for d in result["decode"]:
        if "error" in d:
            lines.append(f"{d['way']}: did not run ({d['error'][:120]}).")
        else:
            frac = f", {d['roofline_fraction']:.0%} of the bandwidth roofline" if d.get("roofline_fraction") else ""
            lines.append(f"{d['way']}: {d['tokens_per_s']:.1f} tokens/s{frac}.")
    for s in result["sweep"]:
        m = f", MFU {s['mfu']:.1%}" if s.get("mfu") is not None else ""
        lines.append(f"sweep M={s['m']}: {s['decode_tokens_per_s']:.0f} decode tokens/s{m}.")
    return lines
