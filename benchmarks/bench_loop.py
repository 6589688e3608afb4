"""(c) Our decode loop against Hugging Face `generate` on the same tokens, on a trained zoo model.

The zoo's no-segment model ("direct", else "base") on a held-out item's prompt (image + question,
about 100 tokens of which 64 are image tokens), greedy, batch 1, `--gen-tokens` new tokens: the
end-of-sequence token is banned in both by one forward hook on the LM head (a trained testbed
model answers in two tokens and stops; the hook makes both decode the same fixed length, and it
costs both the same). Ours: `LatentReasoner.generate` (our prefill, explicit M-RoPE positions,
one `inputs_embeds` step per token, option log-probs recorded every step); HF: `model.generate`
with the prompt's pixels, grid and `mm_token_type_ids`. The ratio is ours / HF (below 1: ours is
faster); the tokens must be equal. The random-model version of this comparison (text only) is
`benchmarks/bench_engine.py`.
"""

from __future__ import annotations

import contextlib

import torch

from . import common, workload
from .common import log


@contextlib.contextmanager
def banned(model, token_ids):
    """Push the LM head's logits of `token_ids` to -1e9 while inside (both loops read them)."""
    ids = list(token_ids)

    def hook(module, args, out):
        out = out.clone()
        out[..., ids] = -1e9  # finite: our loop treats a non-finite logit row as NaN and stops
        return out

    h = model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def loop_vs_generate(r, prompt, n: int, repeats: int = 5, device: str = "cpu") -> dict:
    """Interleaved timings of our loop and HF generate on one prompt; ratio ours / HF."""
    dev = r.device
    ids = prompt.input_ids.to(dev)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if prompt.pixel_values is not None:
        kw.update(pixel_values=prompt.pixel_values.to(dev, r.dtype), image_grid_thw=prompt.image_grid_thw.to(dev),
                  mm_token_type_ids=prompt.mm_token_type_ids(r.ids.image).to(dev))

    def ours():
        return r.generate(prompt, max_new_tokens=n).generated_ids

    def hf():
        with torch.inference_mode():
            out = r.model.generate(**kw, max_new_tokens=n, do_sample=False, pad_token_id=r.ids.eos[0])
        return out[0, ids.shape[1]:].tolist()

    with banned(r.model, r.ids.eos):
        res = common.interleaved({"ours": ours, "hf": hf}, repeats, device=device)
    a, b = res["outputs"]["ours"], res["outputs"]["hf"]
    return dict(new_tokens=n, prompt_tokens=int(ids.shape[1]), ours=res["ours"], hf_generate=res["hf"],
                ratio=res["ours"]["best_s"] / res["hf"]["best_s"],
                ratio_range=[1 / x for x in res["ratios"]["hf/ours"]][::-1],
                ratio_cpu=res["ours"]["cpu_best_s"] / res["hf"]["cpu_best_s"],
                ours_tokens_per_s=n / res["ours"]["best_s"], hf_tokens_per_s=n / res["hf"]["best_s"],
                tokens_equal=a == b and len(a) == n, outputs_equal=a == b and len(a) == n)


def main(args) -> dict:
    from latentmed.engine import LatentReasoner

    root = workload.find_zoo(args.zoo)
    have = workload.zoo_info(root)["models"]
    model = next(m for m in ("direct", "base") if m in have)
    log(f"loop: ours vs HF generate on {model} of {common.rel(root)}, {args.gen_tokens} tokens")
    result = dict(benchmark="loop", **common.provenance(args.device))
    r = LatentReasoner.from_pretrained(root / model, device=args.device)
    q = workload.queries(root, 1)[0]
    row = loop_vs_generate(r, r.prompt(q), args.gen_tokens, args.repeats + 2, args.device)
    log(f"loop: ours / HF generate = {row['ratio']:.3f} (CPU time {row['ratio_cpu']:.3f}; tokens equal: "
        f"{row['tokens_equal']})")
    result.update(zoo=workload.zoo_info(root), model=model, item=q.id, **row,
                  setting=dict(batch=1, greedy=True, eos="banned in both (LM-head hook)", image=True))
    return common.finish(result)
