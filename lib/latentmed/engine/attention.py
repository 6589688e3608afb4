"""Attention rules: who may not attend to whom, as one function shared by decoding, replay and training.

A rule is a (query, key) pair of position groups (see `interventions.Knockout`):

* query "after_segment": every position from a segment's end marker on (or, for a segment that
  ends without a marker, after its last slot), judged against the latest such segment;
* query "latents": the segment's slots;
* key "latents" (every slot), "image" (image tokens) or "before_segment" (everything before the
  start marker of the segment the query belongs to: image, options, question).

`LatentSpec.after_segment == "segment"` is the rule ("after_segment", "before_segment"): a
bottleneck that leaves the answer no route to the image around the segment; "no_slots" is
("after_segment", "latents"): the answer cannot read the slots. The training
forward (`latentmed.zoo.forward`) and the engine build their masks with `allowed`, so a model
runs at inference exactly as it was trained.
"""

from __future__ import annotations

from typing import Sequence

import torch

Rule = tuple[str, str]
# `LatentSpec.after_segment` as rules
SPEC_RULES: dict[str, list[Rule]] = {"all": [], "segment": [("after_segment", "before_segment")],
                                     "no_slots": [("after_segment", "latents")]}


def rules_for(spec, ivs) -> list[Rule]:
    """The rules of a run: the spec's bottleneck plus the run's `Knockout` interventions."""
    rules = [(iv.query, iv.key) for iv in ivs if iv.point == "knockout"]
    rules += SPEC_RULES[spec.after_segment]
    return sorted(set(rules))


def _closed(seg) -> bool:
    return seg.end is not None or bool(getattr(seg, "ended", ""))


def _after_from(seg) -> int:
    """First position that counts as after `seg` (its end marker, or the slot after its last)."""
    if seg.end is not None:
        return seg.end
    return (max(seg.slots) if seg.slots else seg.start) + 1


def allowed(queries: Sequence[int], T: int, image: torch.Tensor, segments, rules: Sequence[Rule]) -> torch.Tensor:
    """Bool [len(queries), T]: causal attention with the rules applied, for queries at the given
    sequence positions; `image` [T] marks image tokens; `segments` have start, end, slots."""
    q = torch.as_tensor(list(queries), dtype=torch.long)
    keys = torch.arange(T)
    out = keys[None, :] <= q[:, None]
    if not rules or not segments:
        return out
    slot = torch.zeros(T, dtype=torch.bool)
    for s in segments:
        slot[[p for p in s.slots if p < T]] = True
    for i, pos in enumerate(q.tolist()):
        after = [s for s in segments if _closed(s) and pos >= _after_from(s)]
        inside = [s for s in segments if pos in s.slots]
        for qk, kk in rules:
            seg = after[-1] if qk == "after_segment" and after else inside[-1] if qk == "latents" and inside else None
            if seg is None:
                continue
            if kk == "latents":
                out[i] &= ~slot
            elif kk == "image":
                out[i] &= ~image[:T]
            else:  # before_segment
                out[i, :seg.start] = False
    return out


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool allowed-mask -> additive float mask (0 where allowed, the dtype's minimum elsewhere)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
