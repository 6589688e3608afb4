"""`LatentSpec`: how one method's latent segment looks, as data rather than code forks.

All latent reasoners share one mechanism (survey §0, §7): after a start token, for K steps the
next input embedding is the final-layer post-norm hidden state of the previous position; then an
end token and ordinary text. Everything that differs between Monet, LVR, Mirage and CapImagine
is a field here. Token *names* live in the spec; ids are read from the checkpoint's tokenizer,
cross-checked against the ids some methods also write into config.json (`resolve`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal, get_args

from ..files import atomic_write_text

Placement = Literal["overwrite_start", "after_start", "text", "none"]
# force_after_k: K latents, then the end token is forced (Monet vLLM, our testbed latents).
# after_k_sample: K latents, then the next token is sampled as usual (LVR `steps`).
# model_or_cap:  latents until the model samples the end token, forced at max_latents (Mirage).
EndRule = Literal["force_after_k", "after_k_sample", "model_or_cap"]
AnswerFormat = Literal["boxed", "answer_tag", "letter", "word"]
# chat: the checkpoint's chat template (real models); testbed: the zoo's layout from
# `latentmed.engine.layouts` (options, question with its key words last, segment, key words, answer).
Template = Literal["chat", "testbed"]
# Where the vector fed at a latent slot comes from: the model's own final hidden state of the
# previous position (every real method); the vision tower's merged tokens of the evidence cells
# of the full-resolution scene (the testbed's positive control, whose prompt shows a degraded
# scene); the tokens of the evidence crop; or a constant stored with the checkpoint (negative control).
LatentSource = Literal["hidden", "evidence_tokens", "evidence_crop", "constant"]
# What the prompt shows: the scene, or the scene box-averaged to 56 px and back (positive control).
PromptImage = Literal["scene", "degraded"]
# What positions after a segment may attend to: everything (the usual causal mask); only the
# segment (start marker, slots, end marker) and later positions: a bottleneck that closes every
# route from the image to the answer around the latents; or everything but the latent slots:
# the answer cannot read the latents at all (a model whose latents cannot matter by construction).
AfterSegment = Literal["all", "segment", "no_slots"]

SPEC_FILE = "latent_spec.json"
LETTERS = "ABCDEFGH"
HEADS = (None, "lvr_head")  # projection heads the loader knows (a misspelt one would be ignored)

# Ids some methods store in config.json (LVR: src/train/train_lvr.py; Monet: src/main.py).
CONFIG_ID_KEYS: dict[str, dict[str, str]] = {
    "lvr": {"start_token": "lvr_start_id", "end_token": "lvr_end_id"},
    "monet": {"start_token": "latent_start_id", "end_token": "latent_end_id"},
    "monet-sft": {"start_token": "latent_start_id", "end_token": "latent_end_id",
                  "pad_token": "latent_token_id"},
    "mirage": {"start_token": "latent_start_id", "end_token": "latent_end_id", "pad_token": "latent_token_id"},
}


@dataclass(frozen=True)
class SpecIds:
    """Token ids a decode loop needs, resolved from one tokenizer (+ config)."""

    start: int | None
    end: int | None
    pad: int | None
    eos: tuple[int, ...]
    image: int

    @property
    def fill(self) -> int | None:
        """Plain id written at latent slots before a replay (never a vision id)."""
        return self.pad if self.pad is not None else self.start


@dataclass(frozen=True)
class LatentSpec:
    method: str
    start_token: str | None = None  # opens the segment (latent or text imagination)
    end_token: str | None = None  # closes it
    pad_token: str | None = None  # id recorded at latent slots (Mirage/Monet-SFT pads)
    placement: Placement = "after_start"
    n_latents: int = 0  # K for fixed-length rules
    max_latents: int = 0  # cap for model_or_cap (0 = no cap for text spans)
    end_rule: EndRule = "force_after_k"
    head: str | None = None  # e.g. "lvr_head": module applied to hidden states before feeding
    head_on_first: bool = False  # LVR's released loop skips the head on the first latent
    answer_format: AnswerFormat = "letter"
    system_prompt: str | None = None
    user_suffix: str = ""
    assistant_prefix: str = ""
    max_segments: int | None = None  # segments a run may open (None: any number, as Monet/LVR)
    option_tokens: Literal["letter", "word"] = "letter"  # what scores an option: its letter or word
    template: Template = "chat"
    latent_source: LatentSource = "hidden"
    prompt_image: PromptImage = "scene"
    after_segment: AfterSegment = "all"

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def has_latents(self) -> bool:
        return self.placement in ("overwrite_start", "after_start")

    @property
    def has_segments(self) -> bool:
        """Latent or text-imagination segments (CapImagine) are traced the same way."""
        return self.placement != "none"

    @property
    def k_target(self) -> int:
        """Latents before the loop ends a segment: K, or the cap for model-decided ends."""
        return self.max_latents if self.end_rule == "model_or_cap" else self.n_latents

    def token_ids(self, tokenizer) -> dict[str, int | None]:
        """Resolve start/end/pad ids in `tokenizer`; a missing token is a clear error."""
        out: dict[str, int | None] = {}
        vocab = tokenizer.get_vocab()
        for role in ("start_token", "end_token", "pad_token"):
            name = getattr(self, role)
            if name is None:
                out[role] = None
            elif name in vocab:
                out[role] = vocab[name]
            else:
                where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
                raise ValueError(f"{where}: tokenizer has no {role.replace('_', ' ')} {name!r} "
                                 f"needed by method {self.method!r}")
        return out

    def resolve(self, tokenizer, config: dict | None = None) -> tuple["LatentSpec", SpecIds]:
        """Ids from `tokenizer`, checked against config.json ids; head settings from config."""
        where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        ids = self.token_ids(tokenizer)
        config = config or {}
        for role, key in CONFIG_ID_KEYS.get(self.method, {}).items():
            if key in config and ids[role] is not None and int(config[key]) != ids[role]:
                raise ValueError(f"{where}: tokenizer/config mismatch: config.json {key}={config[key]} "
                                 f"but the tokenizer maps {getattr(self, role)!r} to {ids[role]}")
        spec = self
        if "lvr_head" in config and self.method == "lvr":
            spec = replace(spec, head="lvr_head" if config["lvr_head"] else None)
        eos = {tokenizer.eos_token_id, *_as_list(config.get("eos_token_id")),
               *_as_list(config.get("text_config", {}).get("eos_token_id"))}
        image = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        return spec, SpecIds(ids["start_token"], ids["end_token"], ids["pad_token"],
                             tuple(sorted(i for i in eos if i is not None)), image)

    def format_question(self, question: str, options: list[str] | None = None) -> str:
        """User text: question, lettered options one per line, then the method's suffix."""
        lines = [question]
        lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options or [])]
        return "\n".join(lines) + self.user_suffix

    def with_overrides(self, **kw) -> "LatentSpec":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatentSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"LatentSpec: unknown fields {sorted(unknown)}")
        return cls(**d)

    def save(self, folder: str | Path) -> Path:
        return atomic_write_text(Path(folder) / SPEC_FILE, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "LatentSpec":
        path = Path(folder) / SPEC_FILE
        try:
            d = json.loads(path.read_text())
            if not isinstance(d, dict):
                raise ValueError("expected a JSON object")
            return cls.from_dict(d)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no latent spec in this checkpoint folder") from None
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: invalid latent spec ({exc})") from exc


_CHOICES = {"placement": Placement, "end_rule": EndRule, "answer_format": AnswerFormat, "template": Template,
            "latent_source": LatentSource, "prompt_image": PromptImage, "after_segment": AfterSegment,
            "option_tokens": Literal["letter", "word"]}


def _validate(s: LatentSpec) -> None:
    """Every field has the type and range the decode loop relies on; the message names it."""
    def bad(name: str, msg: str):
        raise ValueError(f"LatentSpec({s.method!r}).{name}: {msg}")

    if not isinstance(s.method, str) or not s.method:
        bad("method", f"must be a non-empty string, got {s.method!r}")
    for name, lit in _CHOICES.items():
        allowed = get_args(lit)
        if getattr(s, name) not in allowed:
            bad(name, f"must be one of {', '.join(map(repr, allowed))}, got {getattr(s, name)!r}")
    for name in ("n_latents", "max_latents"):
        v = getattr(s, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            bad(name, f"must be an integer >= 0, got {v!r}")
    if s.max_segments is not None and (not isinstance(s.max_segments, int) or isinstance(s.max_segments, bool)
                                       or s.max_segments < 0):
        bad("max_segments", f"must be None or an integer >= 0, got {s.max_segments!r}")
    if s.head not in HEADS:
        bad("head", f"must be one of {', '.join(map(repr, HEADS))}, got {s.head!r}")
    if not isinstance(s.head_on_first, bool):
        bad("head_on_first", f"must be True or False, got {s.head_on_first!r}")
    for name in ("start_token", "end_token", "pad_token", "head", "system_prompt"):
        v = getattr(s, name)
        if v is not None and not isinstance(v, str):
            bad(name, f"must be a string or None, got {v!r}")
    for name in ("user_suffix", "assistant_prefix"):
        if not isinstance(getattr(s, name), str):
            bad(name, f"must be a string, got {getattr(s, name)!r}")
    if s.placement != "none" and (s.start_token is None or s.end_token is None):
        bad("placement", f"{s.placement!r} needs a start_token and an end_token")
    if s.latent_source != "hidden" and s.placement not in ("overwrite_start", "after_start"):
        bad("latent_source", f"{s.latent_source!r} needs a latent placement, not {s.placement!r}")
    if s.after_segment != "all" and s.placement == "none":
        bad("after_segment", "a bottleneck after the segment needs a segment (placement is 'none')")


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


MONET_SYSTEM = ("You are a helpful multimodal assistant. You are required to answer the question "
                "based on the image provided. Put your final answer in \\boxed{}.")
LETTER_SUFFIX = "\nAnswer with the option's letter from the given choices directly."

PRESETS: dict[str, LatentSpec] = {
    # Monet-7B as its vLLM runner decodes: the first latent overwrites the start-token slot.
    "monet": LatentSpec("monet", "<abs_vis_token>", "</abs_vis_token>", None, "overwrite_start",
                        n_latents=10, end_rule="force_after_k", answer_format="boxed",
                        system_prompt=MONET_SYSTEM),
    # Monet's SFT layout: start token, then K pad slots carrying the latents.
    "monet-sft": LatentSpec("monet-sft", "<abs_vis_token>", "</abs_vis_token>", "<abs_vis_token_pad>",
                            "after_start", n_latents=10, end_rule="force_after_k",
                            answer_format="boxed", system_prompt=MONET_SYSTEM),
    # LVR `steps`: fixed quota after the start token, next token sampled; head from config.
    "lvr": LatentSpec("lvr", "<|lvr_start|>", "<|lvr_end|>", None, "after_start", n_latents=8,
                      end_rule="after_k_sample", answer_format="answer_tag",
                      user_suffix=LETTER_SUFFIX),
    # Mirage: pads after the start token until the model samples the end token, cap 8.
    "mirage": LatentSpec("mirage", "<|latent_start|>", "<|latent_end|>", "<|latent_pad|>",
                         "after_start", n_latents=4, max_latents=8, end_rule="model_or_cap",
                         answer_format="boxed", max_segments=1),
    # CapImagine: the imagination is ordinary text between two markers.
    "capimagine": LatentSpec("capimagine", "<imagine>", "</imagine>", None, "text",
                             end_rule="model_or_cap", answer_format="boxed",
                             system_prompt=MONET_SYSTEM, max_segments=1),
    "direct": LatentSpec("direct", placement="none", answer_format="letter",
                         user_suffix=LETTER_SUFFIX),
}
METHODS = tuple(PRESETS)


def preset(method: str, **overrides) -> LatentSpec:
    """The preset for `method`, with field overrides; unknown methods are a clear error."""
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(PRESETS)}")
    return PRESETS[method].with_overrides(**overrides) if overrides else PRESETS[method]
