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
from typing import Literal

Placement = Literal["overwrite_start", "after_start", "text", "none"]
# force_after_k: K latents, then the end token is forced (Monet vLLM, our testbed latents).
# after_k_sample: K latents, then the next token is sampled as usual (LVR `steps`).
# model_or_cap:  latents until the model samples the end token, forced at max_latents (Mirage).
EndRule = Literal["force_after_k", "after_k_sample", "model_or_cap"]
AnswerFormat = Literal["boxed", "answer_tag", "letter", "word"]
# chat: the checkpoint's chat template (real models); testbed: the zoo's layout from
# `latentmed.layouts` (options, question with its key words last, segment, key words, answer).
Template = Literal["chat", "testbed"]

SPEC_FILE = "latent_spec.json"
LETTERS = "ABCDEFGH"

# Ids some methods store in config.json (LVR: src/train/train_lvr.py; Monet: src/main.py).
CONFIG_ID_KEYS: dict[str, dict[str, str]] = {
    "lvr": {"start_token": "lvr_start_id", "end_token": "lvr_end_id"},
    "monet": {"start_token": "latent_start_id", "end_token": "latent_end_id"},
    "monet-sft": {"start_token": "latent_start_id", "end_token": "latent_end_id",
                  "pad_token": "latent_token_id"},
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
        path = Path(folder) / SPEC_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "LatentSpec":
        path = Path(folder) / SPEC_FILE
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no latent spec in this checkpoint folder") from None
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: invalid latent spec ({exc})") from exc


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
