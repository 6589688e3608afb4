"""Shared-work intervention sweeps: one prefill per instance, all variants as one batch.

A study is thousands of (instance x intervention) runs. Latent-feed and segment interventions
change nothing before the first latent segment opens, so for one instance the image encoder,
the prefill and every step up to that point are the same for all M variants. `shared_sweep`
runs them once (batch 1), stops where row 0 is about to open a segment (the branch point),
copies the KV cache and the row state M times, and decodes the M variants as one batch from
there. `naive_sweep` regenerates everything per variant; tests check both give the same
tokens (greedy) and log-probs within 1e-4. Variants that act earlier (input, image-feature or
residual edits at prompt positions) cannot share a prefix and fall back to the naive path.
"""

from __future__ import annotations

import torch

from .decode import DecodeConfig, Decoder, generate, with_records
from .interventions import Intervention, as_interventions
from .trace import Trace


def _variants(variants) -> list[list[Intervention]]:
    """Each variant is a list of interventions (a single one, or a dict, is wrapped)."""
    out = []
    for v in variants:
        v = v if isinstance(v, (list, tuple)) else [v]
        out.append(as_interventions(v))
    return out


def naive_sweep(reasoner, inputs, variants, config: DecodeConfig | None = None, **kw) -> list[Trace]:
    """Every variant decoded alone from scratch (the reference for `shared_sweep`)."""
    cfg = config or DecodeConfig(**kw)
    return [generate(reasoner, inputs, v, cfg) for v in _variants(variants)]


def shared_sweep(reasoner, inputs, variants, config: DecodeConfig | None = None, **kw) -> list[Trace]:
    """Variants of one instance: shared prefill and prefix, then one batch from the branch point."""
    cfg = config or DecodeConfig(**kw)
    variants = _variants(variants)
    shared = [i for i, v in enumerate(variants) if all(iv.shares_prefix for iv in v)]
    out: list[Trace | None] = [None] * len(variants)
    if shared:
        flat = [iv for i in shared for iv in variants[i]]
        with torch.inference_mode():
            dec = Decoder(reasoner, with_records(cfg, flat)).prefill([inputs], [[]])
            while not dec.done and not dec.at_branch_point():
                dec.advance()
            for i, t in zip(shared, dec.branch([variants[i] for i in shared]).run()):
                out[i] = t
    for i, v in enumerate(variants):
        if out[i] is None:
            out[i] = generate(reasoner, inputs, v, cfg)
    return out


def sweep_instances(reasoner, prompts, variants, config: DecodeConfig | None = None, **kw):
    """Shared-work sweep over many instances: yields (instance index, traces) as they finish."""
    for i, p in enumerate(prompts):
        yield i, shared_sweep(reasoner, p, variants, config, **kw)
