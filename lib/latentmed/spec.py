"""`LatentSpec`: how one method's latent segment looks, as data rather than code forks.

All latent reasoners share one mechanism (survey §0, §7): after a start token, for K steps the
next input embedding is the final-layer post-norm hidden state of the previous position; then an
end token and ordinary text. Everything that differs between Monet, LVR, Mirage and CapImagine
is a field here. Token *names* live in the spec; ids are read from the checkpoint's tokenizer.
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
# chat: the checkpoint's chat template (real models). testbed: the zoo's raw layout, built by
# `latentmed.layouts` (image, options, question with its key word last, then the segment, then
# the answer as the option's content word), see training-feasibility.md.
Template = Literal["chat", "testbed"]

SPEC_FILE = "latent_spec.json"


@dataclass(frozen=True)
class LatentSpec:
    method: str
    start_token: str | None = None  # opens the segment (latent or text imagination)
    end_token: str | None = None  # closes it
    pad_token: str | None = None  # id recorded at latent slots (Mirage/Monet-SFT pads)
    placement: Placement = "after_start"
    n_latents: int = 0  # K for fixed-length rules
    max_latents: int = 0  # cap for model_or_cap
    end_rule: EndRule = "force_after_k"
    head: str | None = None  # e.g. "lvr_head": module applied to hidden states before feeding
    head_on_first: bool = False  # LVR's released loop skips the head on the first latent
    answer_format: AnswerFormat = "letter"
    system_prompt: str | None = None
    user_suffix: str = ""
    assistant_prefix: str = ""
    template: Template = "chat"

    @property
    def has_latents(self) -> bool:
        return self.placement in ("overwrite_start", "after_start")

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


MONET_SYSTEM = ("You are a helpful multimodal assistant. You are required to answer the question "
                "based on the image provided. Put your final answer in \\boxed{}.")

PRESETS: dict[str, LatentSpec] = {
    "monet": LatentSpec("monet", "<abs_vis_token>", "</abs_vis_token>", None, "overwrite_start",
                        n_latents=10, end_rule="force_after_k", answer_format="boxed",
                        system_prompt=MONET_SYSTEM),
    "monet-sft": LatentSpec("monet-sft", "<abs_vis_token>", "</abs_vis_token>", "<abs_vis_token_pad>",
                            "after_start", n_latents=10, end_rule="force_after_k",
                            answer_format="boxed", system_prompt=MONET_SYSTEM),
    "lvr": LatentSpec("lvr", "<|lvr_start|>", "<|lvr_end|>", None, "after_start", n_latents=8,
                      end_rule="after_k_sample", answer_format="answer_tag",
                      user_suffix="\nAnswer with the option's letter from the given choices directly."),
    "mirage": LatentSpec("mirage", "<|latent_start|>", "<|latent_end|>", "<|latent_pad|>",
                         "after_start", n_latents=4, max_latents=8, end_rule="model_or_cap",
                         answer_format="boxed"),
    "capimagine": LatentSpec("capimagine", "<imagine>", "</imagine>", None, "text",
                             answer_format="boxed", system_prompt=MONET_SYSTEM),
    "direct": LatentSpec("direct", placement="none", answer_format="letter",
                         user_suffix="\nAnswer with the option's letter from the given choices directly."),
}


def preset(method: str, **overrides) -> LatentSpec:
    """The preset for `method`, with field overrides; unknown methods are a clear error."""
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(PRESETS)}")
    return PRESETS[method].with_overrides(**overrides) if overrides else PRESETS[method]
