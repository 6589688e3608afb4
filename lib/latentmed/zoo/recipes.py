"""The zoo's recipes: every model's spec, its training stages and budgets, as data.

`SPECS` holds each model's `LatentSpec` (a testbed variant of a method preset); `method_stages`
says, per method and budget, which `Plan`s are trained for how many steps; `settings` is
everything that defines a trained model (its hash decides whether to retrain).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..engine import layouts
from ..engine.spec import LatentSpec, preset
from ..testbed.items import TestbedConfig
from .batching import Plan
from .loop import StageConfig

BASE = "base"
# Bumped whenever the training code changes what a given recipe produces (2: transformers' WSD
# schedule; an EOS in CapImagine's span ends the span): a model trained before is retrained.
TRAINING_VERSION = 2


def _spec(name: str, template: str, **kw) -> LatentSpec:
    """A preset turned into its testbed variant: word answers, no chat system prompt."""
    return layouts.testbed_spec(preset(template), method=name, answer_format="word", system_prompt=None,
                                user_suffix="", assistant_prefix="", **kw)


SPECS: dict[str, LatentSpec] = {
    "base": _spec("base", "direct"),
    "direct": _spec("direct", "direct"),
    "capimagine": _spec("capimagine", "capimagine", max_latents=16),  # caption cap, as evaluated
    "monet-style": _spec("monet-style", "monet-sft", n_latents=10),
    "lvr-style": _spec("lvr-style", "lvr", pad_token="<|lvr|>", n_latents=8),
    "mirage-style": _spec("mirage-style", "mirage", n_latents=4, max_latents=8),
    "positive-control": _spec("positive-control", "mirage", n_latents=4, max_latents=0,
                              end_rule="force_after_k", latent_source="evidence_tokens", prompt_image="degraded"),
    "negative-control": _spec("negative-control", "mirage", n_latents=4, max_latents=0,
                              end_rule="force_after_k", latent_source="constant"),
    # the mediating zoo: positions after the segment see only the segment (no route around it)
    "grounded-closed": _spec("grounded-closed", "mirage", n_latents=4, max_latents=0, end_rule="force_after_k",
                             after_segment="segment"),
    "lvr-closed": _spec("lvr-closed", "lvr", pad_token="<|lvr|>", n_latents=4, after_segment="segment"),
}
# What each model is, for the study's tables: its answer has a route around the latents ("open"),
# has none ("closed"), is a control, imagines in text, or has no segment.
KINDS = {"base": "no segment", "direct": "no segment", "capimagine": "text imagination",
         "monet-style": "latent, bypass open", "lvr-style": "latent, bypass open",
         "mirage-style": "latent, bypass open", "positive-control": "control", "negative-control": "control",
         "grounded-closed": "latent, bypass closed", "lvr-closed": "latent, bypass closed"}
METHODS = tuple(SPECS)  # base first: every other model starts from it (the main build trains these)
FINE_TUNES = METHODS[1:]
# Chapter 10's dose series (trained by its chapter): the grounded-closed recipe with the bottleneck
# on a share of the training batches; 1.0 is grounded-closed itself. At inference the spec keeps
# the bottleneck; the chapter also runs each model with it open.
DOSES = (0.0, 0.25, 0.5, 0.75)
DOSE_METHODS = tuple(f"dose-{d:.2f}" for d in DOSES)
for _d, _name in zip(DOSES, DOSE_METHODS):
    SPECS[_name] = SPECS["grounded-closed"].with_overrides(method=_name)
    KINDS[_name] = "latent, dose series"

# Budgets: steps per stage (batch 16). "default" is the main build, "ci" a quick check.
BUDGETS = {
    "default": dict(vision=250, base=1500, direct=400, capimagine=1000, monet=(150, 150, 300), lvr=500,
                    mirage=(200, 300), positive=400, negative=400, closed=1200, pool=1000, pool_pc=400, val=100,
                    eval_every=200, ft_lr=3e-3, direct_lr=1e-3, seg_w=0.1),
    "ci": dict(vision=12, base=30, direct=10, capimagine=12, monet=(6, 6, 8), lvr=10, mirage=(6, 8),
               positive=10, negative=10, closed=10, pool=24, pool_pc=24, val=4, eval_every=10, ft_lr=3e-3,
               direct_lr=1e-3, seg_w=0.1),
}


@dataclass(frozen=True)
class Stage:
    """One stage of a method: its plan and optimisation; `teacher` names an earlier stage."""

    plan: Plan
    cfg: StageConfig
    teacher: str | None = None


def method_stages(name: str, budget: str = "default", seed: int = 0) -> list[Stage]:
    """The stages of `name` under `budget` (the base's vision stage is separate)."""
    if name not in SPECS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; known: {', '.join(BUDGETS)}")
    b = BUDGETS[budget]
    spec = SPECS[name]
    ev = b["eval_every"]

    def cfg(stage, steps, lr=b["ft_lr"], warmup=20, keep_best=True, **kw):
        return StageConfig(stage, steps, lr=lr, warmup=min(warmup, max(1, steps // 4)), eval_every=ev,
                           save_every=ev, keep_best=keep_best, seed=seed, **kw)

    grounded = dict(attn_weight=1.0, hop_weight=1.0)
    # latent methods: the start/end markers are supervised lightly (the loop forces them anyway);
    # a full-weight CE on the start token at the key word wrecked the base's answer there
    seg = dict(segment_weight=b["seg_w"])
    if name == "base":
        return [Stage(Plan(spec, **grounded), cfg("qa", b["base"], lr=3e-3, warmup=30, decay_start=0.6))]
    if name == "direct":
        return [Stage(Plan(spec, **grounded), cfg("direct", b["direct"], lr=b["direct_lr"]))]
    if name == "capimagine":
        return [Stage(Plan(spec, **grounded), cfg("capimagine", b["capimagine"]))]
    if name == "monet-style":
        s1, s2, s3 = b["monet"]
        p1 = Plan(spec, n_latents=0, with_crop=True, **seg, **grounded)
        p2 = Plan(spec, n_latents=spec.n_latents, with_crop=True, align="monet_crop_cos", align_weight=1.0,
                  **seg, **grounded)
        p3 = Plan(spec, n_latents=spec.n_latents, align="monet_latent_cos", align_weight=1.0, **seg, **grounded)
        return [Stage(p1, cfg("sft-crop", s1)), Stage(p2, cfg("latent-with-crop", s2), teacher="sft-crop"),
                Stage(p3, cfg("latent", s3), teacher="latent-with-crop")]
    if name == "lvr-style":
        return [Stage(Plan(spec, n_latents=spec.n_latents, align="lvr_mse", align_weight=1.0, **seg, **grounded),
                      cfg("latent", b["lvr"]))]
    if name == "mirage-style":
        s1, s2 = b["mirage"]
        p1 = Plan(spec, n_latents=spec.n_latents, latent_fill="crop", align="mirage_cos", align_weight=1.0,
                  answer_weight=0.1, segment_weight=0.1, **grounded)
        p2 = Plan(spec, n_latents=spec.n_latents, **seg, **grounded)
        return [Stage(p1, cfg("helper-align", s1, keep_best=False)), Stage(p2, cfg("latent", s2))]
    if name == "positive-control":
        return [Stage(Plan(spec, n_latents=spec.n_latents, latent_fill="evidence", image="degraded", attn_weight=1.0,
                           evidence_in="slots", hop_weight=1.0, **seg), cfg("positive", b["positive"]))]
    if name == "negative-control":
        return [Stage(Plan(spec, n_latents=spec.n_latents, latent_fill="constant", **seg, **grounded),
                      cfg("negative", b["negative"]))]
    # the slots' attention is supervised onto the evidence cells and the restated key words' onto
    # the slots; every training batch runs with the bottleneck, as the spec runs at inference
    closed = dict(ground_slots=True, evidence_in="both", **seg, **grounded)
    if name == "grounded-closed":
        return [Stage(Plan(spec, n_latents=spec.n_latents, **closed), cfg("closed", b["closed"]))]
    if name in DOSE_METHODS:
        frac = DOSES[DOSE_METHODS.index(name)]
        return [Stage(Plan(spec, n_latents=spec.n_latents, bottleneck_frac=frac, **closed), cfg("closed", b["closed"]))]
    if name == "lvr-closed":
        return [Stage(Plan(spec, n_latents=spec.n_latents, align="lvr_mse", align_weight=1.0, **closed),
                      cfg("closed", b["closed"]))]
    raise AssertionError(name)


def bank_kinds(name: str, budget: str = "default") -> tuple[str, ...]:
    """The tower-token kinds (main, crop, degraded) the stages of `name` train on."""
    return tuple(sorted({k for st in method_stages(name, budget) for k in st.plan.bank_kinds()}))


def pool_of(name: str) -> str:
    """The budget entry that sizes `name`'s training pool."""
    return "pool_pc" if name == "positive-control" else "pool"


def needs_more_banks(name: str, budget: str = "default") -> bool:
    """Whether `name` trains on feature banks the base does not build itself (the base's: the
    scene's tokens of the standard pool and of the validation items)."""
    return bank_kinds(name, budget) != ("main",) or pool_of(name) != "pool"


def settings(name: str, budget: str, seed: int, config: TestbedConfig, base_hash: str | None = None) -> dict:
    """Everything that defines a trained model (its hash decides whether to retrain)."""
    b = BUDGETS[budget]
    s = dict(method=name, budget=budget, seed=seed, training_version=TRAINING_VERSION,
             testbed=config.to_dict(), val=b["val"],
             pool=b[pool_of(name)],
             spec=SPECS[name].to_dict(),
             stages=[dict(plan={k: v for k, v in asdict(st.plan).items() if k != "spec"}, cfg=asdict(st.cfg),
                          teacher=st.teacher) for st in method_stages(name, budget, seed)])
    if name == BASE:
        s["vision_steps"] = b["vision"]
        if b.get("llm_layers"):  # default: the testbed config's 2 layers
            s["llm_layers"] = b["llm_layers"]
    else:
        s["base"] = base_hash
    return s
