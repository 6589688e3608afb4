"""Interventions as small serialisable objects, one class per edit, grouped by where they act.

Each class names its intervention point (`point`) and overrides the one method called there;
every other method is a no-op. Fields are checked when an intervention is made, and
`to_dict`/`from_dict` turn them into plain dicts (papermill parameters, results rows). Points
(DESIGN §3):

    latent    feed(z, ctx)             right before a latent is written as the next input
    segment   segment_k(K), acts_on(i) loop control: new K, 0 = markers only, None = drop (segment i)
    input     edit_query(q)            when the prompt is built (image, question, options)
    features  edit_features(f)         on the visual encoder's merged image tokens [N, H]
    hook      edit(x, i)               a named hook inside the model (`latentmed.engine.hooks`)
    knockout  (attention rule)         who may not attend to whom
    record    (read-only)              tensors at named hooks, returned in `trace.records`
    span      edit_span(ids, tok)      CapImagine's text imagination, token level

Every entry point (generate, sweeps, replay, continue_from, regenerate) either applies each
intervention it is given or refuses it with an error naming the intervention and the entry
point (`check_supported`); nothing is recorded as applied that was not.
"""

from .base import (
                   ENTRY_POINTS,
                   REGISTRY,
                   FeedContext,
                   Intervention,
                   as_interventions,
                   by_point,
                   check_supported,
                   derangement,
                   from_dict,
)
from .inputs import (
                   BlankImage,
                   InputEdit,
                   MaskEvidence,
                   MaskPatches,
                   NoiseImage,
                   OtherImage,
                   ShuffleOptions,
                   SwapQuestion,
                   apply_query_edits,
)
from .inside import (
                   KNOCKOUT_KEYS,
                   KNOCKOUT_QUERIES,
                   HookEdit,
                   Knockout,
                   MaskImageTokens,
                   NoiseImageFeatures,
                   Record,
)
from .latent import (
                   ChangeK,
                   DropSegment,
                   ExtremeLatent,
                   FixedLatent,
                   LatentFeed,
                   MarkersOnly,
                   MeanLatent,
                   NoiseLatent,
                   RepeatFirstLatent,
                   ShuffleLatents,
                   SwapLatent,
                   ZeroLatent,
                   feed_rows,
                   mean_latent,
)
from .span import CorruptWord, DeleteSpan, ReplaceSpan, ShuffleSpan, SpanEdit

__all__ = ["ENTRY_POINTS", "KNOCKOUT_KEYS", "KNOCKOUT_QUERIES", "REGISTRY", "BlankImage", "ChangeK", "CorruptWord",
           "DeleteSpan", "DropSegment", "ExtremeLatent", "FeedContext", "FixedLatent", "HookEdit", "InputEdit",
           "Intervention", "Knockout", "LatentFeed", "MarkersOnly", "MaskEvidence", "MaskImageTokens", "MaskPatches",
           "MeanLatent", "NoiseImage", "NoiseImageFeatures", "NoiseLatent", "OtherImage", "Record",
           "RepeatFirstLatent", "ReplaceSpan", "ShuffleLatents", "ShuffleOptions", "ShuffleSpan", "SpanEdit",
           "SwapLatent", "SwapQuestion", "ZeroLatent", "apply_query_edits", "as_interventions", "by_point",
           "check_supported", "derangement", "feed_rows", "from_dict", "mean_latent"]
