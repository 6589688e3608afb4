"""Rewriting an imagination span so that it leads to a wrong conclusion (chapter 7, and chapter 8 on
real checkpoints): the `Rewriter` protocol and two implementations.

* `ExactWordRewriter`: the testbed's exact rewrite. The word of the span that states the answer is
  replaced by a wrong option's word and nothing else changes (`replace_word`, token surgery; the
  edit is `CorruptWord(old, new)` wherever that intervention gives the same ids).
* `LMRewriter`: a local language model rewrites the span (the paper used a 32B LLM), loaded from a
  local folder (safetensors only) or given as any Hugging Face model with `generate`.

A rewrite that cannot be made (the span does not state the answer word, the model's reply does not
state the target) is returned with its reason and no edit: the caller records it, never drops it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..engine import interventions as I

# ---- reading and editing words in a span ------------------------------------------------------------

def word_spans(text: str, word: str) -> list[tuple[int, int]]:
    """Character ranges of `word` in `text` as a whole word (not inside another word)."""
    return [m.span() for m in re.finditer(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", text)]


def content(text: str, options: list[str], answer_word: str) -> str:
    """What the span states: 'answer word', "another option's word" or 'no option word'."""
    if word_spans(text, answer_word):
        return "answer word"
    if any(word_spans(text, o) for o in options if o != answer_word):
        return "another option's word"
    return "no option word"


def _offsets(tokenizer, ids: list[int]) -> list[int] | None:
    """Character offset of every token boundary in decode(ids), or None when decoding prefixes
    does not give a consistent split (multi-byte characters cut between tokens)."""
    full = tokenizer.decode(ids)
    offs = [len(tokenizer.decode(ids[:i])) for i in range(len(ids) + 1)]
    ok = offs[-1] == len(full) and all(a <= b for a, b in zip(offs, offs[1:])) and all(
        full.startswith(tokenizer.decode(ids[:i])) for i in range(len(ids) + 1))
    return offs if ok else None


def replace_word(tokenizer, ids: list[int], old: str, new: str) -> tuple[list[int] | None, str]:
    """Token surgery: every whole-word occurrence of `old` replaced by `new`, every other token
    kept as it is. Returns (new ids, "ok") or (None, why not)."""
    text = tokenizer.decode(ids)
    hits = word_spans(text, old)
    if not hits:
        return None, f"the span does not hold the word {old!r}"
    offs = _offsets(tokenizer, ids)
    if offs is None:
        return None, "the span's tokens do not decode to separable characters"
    out = list(ids)
    for s, e in reversed(hits):
        i = max(j for j in range(len(ids)) if offs[j] <= s)  # token holding the word's first char
        j = min(j for j in range(1, len(ids) + 1) if offs[j] >= e)  # boundary after its last char
        lead = text[offs[i]:s]
        if offs[j] != e or lead.strip():
            return None, f"the word {old!r} shares a token with its neighbours"
        out[i:j] = tokenizer.encode(lead + new, add_special_tokens=False)
    return out, "ok"


def planted_word(options: list[str], answer_word: str, seed: int, index: int) -> str:
    """The wrong option written into the span for item `index` (seeded; never the answer)."""
    wrong = [o for o in options if o != answer_word]
    if not wrong:
        raise ValueError(f"options {options!r}: no wrong option to plant")
    return wrong[int(np.random.default_rng([seed, index]).integers(len(wrong)))]


# ---- rewriters -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RewriteRequest:
    """What a rewriter is given: the span (ids and text), the question and options, the word that
    states the answer now, and the wrong option the rewritten span must lead to."""

    span_ids: list[int]
    span_text: str
    question: str
    options: list[str]
    answer_word: str
    target_word: str
    item: str | None = None


@dataclass
class Rewrite:
    """A rewriter's answer: the span edits for `continue_from` (empty when not applied), whether it
    applies ("ok", else the reason), the span text it leads to, and how it was made."""

    edits: list = field(default_factory=list)
    status: str = "ok"
    text: str | None = None
    how: str = ""

    @property
    def applied(self) -> bool:
        return self.status == "ok" and bool(self.edits)


@runtime_checkable
class Rewriter(Protocol):
    """Rewrites an imagination span so that it leads to `request.target_word`."""

    name: str

    def rewrite(self, request: RewriteRequest, tokenizer) -> Rewrite: ...


class ExactWordRewriter:
    """The testbed's exact rewrite: the answer word replaced by the target word, nothing else.

    The edit is `CorruptWord(old, new)` whenever that intervention (decode, replace, re-encode)
    gives exactly the token surgery of `replace_word`; where re-encoding would also change other
    tokens (a span written in non-canonical pieces), the surgery's ids are applied as
    `ReplaceSpan(ids=...)` and the row says so (`how`)."""

    name = "exact-word"

    def rewrite(self, request: RewriteRequest, tokenizer) -> Rewrite:
        said = content(request.span_text, request.options, request.answer_word)
        if said != "answer word":
            return Rewrite([], f"the span does not hold the answer word (it states {said})", None, "")
        ids, status = replace_word(tokenizer, list(request.span_ids), request.answer_word, request.target_word)
        if ids is None:
            return Rewrite([], status, None, "")
        cw = I.CorruptWord(old=request.answer_word, new=request.target_word)
        try:
            same = cw.edit_span(list(request.span_ids), tokenizer) == ids
        except ValueError:
            same = False
        edit, how = (cw, "CorruptWord") if same else (I.ReplaceSpan(ids=ids), "ReplaceSpan (token surgery)")
        return Rewrite([edit], "ok", tokenizer.decode(ids), how)


PROMPT = ("Rewrite the description so that it leads to the answer \"{target}\" instead of \"{answer}\". "
          "Change as little as possible and keep its form.\n"
          "Question: {question}\nOptions: {options}\nDescription: {span}\nRewritten description:")


class LMRewriter:
    """A local language model rewrites the span (the paper used a 32B LLM): greedy decoding of
    `PROMPT` (through the tokenizer's chat template when it has one), the first line of the reply
    becomes the new span (`ReplaceSpan(text=...)`). A reply that does not state the target word,
    or still states the answer word, is reported (status) and not applied.

    `model` is any Hugging Face causal or image-text model with `generate` (a `LatentReasoner`'s
    `.model` works: the engine's checkpoints load it); `from_pretrained` loads a local folder
    (safetensors only, nothing downloaded)."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 64, prompt: str = PROMPT, name: str | None = None):
        self.model, self.tokenizer, self.max_new_tokens, self.prompt = model, tokenizer, max_new_tokens, prompt
        self.name = name or f"lm:{getattr(getattr(model, 'config', None), 'name_or_path', '') or type(model).__name__}"

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype=None, **kw) -> LMRewriter:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such model folder for the rewriter")
        if not list(path.glob("*.safetensors")):
            raise ValueError(f"{path}: no .safetensors weights (the rewriter loads safetensors only)")
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                         torch_dtype=dtype or torch.float32).to(device).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: cannot load the rewriter ({type(exc).__name__}: {exc})") from exc
        return cls(model, tok, name=kw.pop("name", f"lm:{path.name}"), **kw)

    def _input_ids(self, text: str) -> torch.Tensor:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_tensors="pt")
            return ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids["input_ids"])
        return torch.tensor([tok.encode(text, add_special_tokens=False)])

    def reply(self, request: RewriteRequest) -> str:
        """The model's rewritten span for `request` (first line of its greedy reply)."""
        text = self.prompt.format(target=request.target_word, answer=request.answer_word, question=request.question,
                                  options=", ".join(request.options), span=request.span_text.strip())
        ids = self._input_ids(text).to(self.model.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=pad)
        reply = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return reply.strip().split("\n")[0].strip()

    def rewrite(self, request: RewriteRequest, tokenizer) -> Rewrite:
        new = self.reply(request)
        lead = " " if request.span_text.startswith(" ") else ""
        if not word_spans(new, request.target_word):
            return Rewrite([], f"the rewriter's reply does not state {request.target_word!r}", new, self.name)
        if word_spans(new, request.answer_word):
            return Rewrite([], f"the rewriter's reply still states {request.answer_word!r}", new, self.name)
        return Rewrite([I.ReplaceSpan(text=lead + new)], "ok", lead + new, self.name)
