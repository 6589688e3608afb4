"""The study's conditions, fixed before any result is computed (chapters 3, 4 and 6).

Latent interventions (chapter 4). Vectors are norm-matched to the latent they replace wherever a
norm is free (fed-back hidden states can be far larger than word embeddings):

    shared     every latent of every item set to one shared tensor (a reference item's first latent)
    mean       every latent set to the mean latent over the items (the paper's Z = mean)
    zero       zeros
    noise      a Gaussian direction with the latent's own norm, replacing it (Z = noise)
    noise_add  the latent plus such a noise (Z + noise)
    swap       another item's latents (same family, a seeded derangement: never the item itself)
    shuffle    the item's own latents in a shuffled order (a derangement of the steps)
    first      the first latent repeated at every later slot
    k_half     K / 2 latents          k_double   2 K latents (generate only: replay cannot add);
               K is each item's own count in its clean run (a model may end early)
    markers    the start and end markers only, no slots
    drop       no segment at all

Input perturbations (chapter 3's dose-response, chapter 6's counterfactual X'), from mild to
whole-instance replacement: pixel noise at three levels, the evidence masked, another item's
image with this question, this image with another item's question, another item entirely.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..engine import interventions as I
from .measure import Condition

LATENT = ("shared", "mean", "zero", "noise", "noise_add", "swap", "shuffle", "first", "k_half", "k_double",
          "markers", "drop")
REPLAYABLE = tuple(c for c in LATENT if c != "k_double")
WHAT = {
    "shared": "every latent of every item set to one shared tensor (a reference item's first latent)",
    "mean": "every latent set to the mean latent over the items (Z = mean)",
    "zero": "zeros",
    "noise": "a Gaussian direction with the latent's own norm, replacing it (Z = noise)",
    "noise_add": "the latent plus a Gaussian direction of the latent's norm (Z + noise)",
    "swap": "another item's latents (same family, seeded derangement: never the item itself)",
    "shuffle": "the item's own latents in a shuffled order (a derangement of the steps)",
    "first": "the first latent repeated at every later slot",
    "k_half": "half as many latents as the item's clean run (K / 2, rounded down)",
    "k_double": "twice as many latents as the item's clean run (2 K; decoding only: a replay cannot add latents)",
    "markers": "the start and end markers only, no latent slots",
    "drop": "no segment at all",
    "noise_16": "Gaussian pixel noise, std 16 grey levels",
    "noise_48": "Gaussian pixel noise, std 48",
    "noise_96": "Gaussian pixel noise, std 96",
    "mask_evidence": "the evidence boxes painted grey (the evidence crop goes blank)",
    "other_image": "another item's image (same family) with this question",
    "other_question": "this image with another item's question (its key words restated)",
    "other_item": "another item entirely (image, question and options)",
}
INPUT = ("noise_16", "noise_48", "noise_96", "mask_evidence", "other_image", "other_question", "other_item")


def donors(families: list[str], seed: int = 0) -> np.ndarray:
    """For every item, another item of the same family: a seeded cyclic derangement within each
    family (an item alone in its family is its own donor)."""
    fam = np.asarray(families)
    out = np.arange(len(fam))
    rng = np.random.default_rng(seed)
    for f in sorted(set(fam.tolist())):
        ix = rng.permutation(np.flatnonzero(fam == f))
        out[ix] = np.roll(ix, -1)
    return out


def latent_keys(forms=("generate", "replay"), names=LATENT) -> list[str]:
    """The store's condition names of `latent_conditions` (without running anything)."""
    return [f"{n}/{f}" for n in names for f in forms if not (f == "replay" and n not in REPLAYABLE)]


def latent_conditions(clean: list, families: list[str], forms=("generate", "replay"),
                      seed: int = 0, names=LATENT) -> list[Condition]:
    """Chapter 4's latent interventions for one model, from its clean traces (donors, the mean,
    the shared tensor and each item's K come from them)."""
    z = [t.segments[0].z_in if t.segments and t.segments[0].z_in is not None else None for t in clean]
    have = [x for x in z if x is not None and len(x)]
    if not have:
        return []
    shared = have[0][0].tolist()
    mean = torch.cat([x.float() for x in have]).mean(0).tolist()
    don = donors(families, seed)
    swap = [z[d].tolist() if z[d] is not None and len(z[d]) else None for d in don]
    ks = [0 if x is None else len(x) for x in z]  # each item's own K (a model may end early)
    make = {
        "shared": lambda i: [I.FixedLatent(vector=shared)],
        "mean": lambda i: [I.MeanLatent(vector=mean)],
        "zero": lambda i: [I.ZeroLatent()],
        "noise": lambda i: [I.NoiseLatent(scale=1.0, mode="replace", seed=seed + i)],
        "noise_add": lambda i: [I.NoiseLatent(scale=1.0, mode="add", seed=seed + i)],
        "swap": lambda i: [I.SwapLatent(source=swap[i])] if swap[i] is not None else [I.ZeroLatent()],
        "shuffle": lambda i: [I.ShuffleLatents(seed=seed + i)],
        "first": lambda i: [I.RepeatFirstLatent()],
        "k_half": lambda i: [I.ChangeK(k=ks[i] // 2, segment=0)],  # K is the first segment's
        "k_double": lambda i: [I.ChangeK(k=2 * ks[i], segment=0)],
        "markers": lambda i: [I.MarkersOnly()],
        "drop": lambda i: [I.DropSegment()],
    }
    out = []
    for name in names:
        for form in forms:
            if form == "replay" and name not in REPLAYABLE:
                continue
            if form == "generate" and name == "shuffle":  # decoding has no own latents to shuffle yet
                out.append(Condition(name, lambda i: [I.ShuffleLatents(seed=seed + i, source=z[i].tolist())], form))
                continue
            out.append(Condition(name, make[name], form))
    return out


def _other_image(q) -> I.OtherImage:
    """Another query's image, with its crop and evidence boxes (what the positive control reads)."""
    return I.OtherImage(image=q.images[0], crop=q.crop, evidence_boxes=q.evidence_boxes, source=q.id)


def input_conditions(queries: list, seed: int = 0, names=INPUT) -> list[Condition]:
    """Input perturbations of chapter 3, graded from pixel noise to another item entirely."""
    fam = [q.family for q in queries]
    don = donors(fam, seed)
    make = {
        "noise_16": lambda i: [I.NoiseImage(std=16.0, seed=seed + i)],
        "noise_48": lambda i: [I.NoiseImage(std=48.0, seed=seed + i)],
        "noise_96": lambda i: [I.NoiseImage(std=96.0, seed=seed + i)],
        "mask_evidence": lambda i: [I.MaskEvidence()],
        "other_image": lambda i: [_other_image(queries[don[i]])],
        "other_question": lambda i: [I.SwapQuestion(question=queries[don[i]].question,
                                                    keywords=queries[don[i]].keywords)],
        "other_item": lambda i: [_other_image(queries[don[i]]),
                                 I.SwapQuestion(question=queries[don[i]].question,
                                                keywords=queries[don[i]].keywords,
                                                options=queries[don[i]].options)],
    }
    return [Condition(n, make[n], "generate") for n in names]


def describe(names=LATENT) -> pd.DataFrame:
    """The conditions as a table: name, what it does, the forms it runs in."""
    return pd.DataFrame([dict(condition=n, what=WHAT[n],
                              forms="generate, replay" if n in REPLAYABLE else "generate" if n in LATENT else "input")
                         for n in names])
