"""CapImagine data: interleaved reasoning data with intermediate images -> text imagination.

CapImagine (arXiv 2602.22766) replaces each intermediate image of interleaved reasoning data by
a caption of what it shows, so the model imagines in text. No official code exists (survey
§4.1, §7.5); this module is the pipeline in its plainest form:

* read interleaved samples in the Monet-SFT-125K chat format (`sample["data"]`: turns with
  `{"type": "text" | "image"}` items; every auxiliary image in an assistant turn is announced by
  `<abs_vis_token></abs_vis_token>` in the text before it, and the text after it may be wrapped
  in `<observation>...</observation>`),
* ask a `Captioner` for a caption of each auxiliary image (with the text before it as context),
* write the sample back with the marker + image replaced by ``<imagine> caption </imagine>``
  (text-only assistant turns; the question's images stay).

Captioners: `GroundTruthCaptioner` (the testbed's exact caption of the evidence crop) and
`ModelCaptioner` (any local Qwen2.5-VL-architecture checkpoint, greedy decoding; tested with a
tiny random model). `testbed_interleaved` writes testbed items in the same interleaved format
(the crop as the auxiliary image), so both tracks go through one converter.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from ..files import atomic_write_json
from ..testbed.exports import IMAGE_KEYS, image_ref

ABS_VIS = "<abs_vis_token></abs_vis_token>"
IMAGINE_START, IMAGINE_END = "<imagine>", "</imagine>"
OBS_START, OBS_END = "<observation>", "</observation>"


class Captioner(Protocol):
    def caption(self, image: Image.Image, context: str, key: str | None = None) -> str:
        """A caption of `image` (an intermediate image) given the reasoning text before it."""


@dataclass
class GroundTruthCaptioner:
    """Captions looked up by image key (the testbed knows the exact caption of every crop)."""

    captions: dict

    def caption(self, image, context: str, key: str | None = None) -> str:
        if key not in self.captions:
            raise ValueError(f"no ground-truth caption for image {key!r}")
        return self.captions[key]

    @classmethod
    def from_samples(cls, samples: list[dict]) -> "GroundTruthCaptioner":
        """Captions of the auxiliary images of samples that carry theirs in `metadata["caption"]`
        (the testbed's Monet-SFT export, `latentmed.testbed.exports.to_monet_sft`)."""
        captions = {}
        for s in samples:
            cap = s.get("metadata", {}).get("caption")
            for turn in s["data"]:
                refs = [image_ref(c) for c in turn["content"] if c.get("type") == "image"]
                if turn["role"] == "assistant" and cap:
                    captions.update({r: cap for r in refs if r})
        return cls(captions)


class ModelCaptioner:
    """Greedy captions from a local Qwen2.5-VL-architecture checkpoint (tiny or 7B)."""

    def __init__(self, folder: str | Path, prompt: str = "Describe what this image region shows.",
                 max_new_tokens: int = 32):
        from ..engine import checkpoint

        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"ModelCaptioner.max_new_tokens: must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"ModelCaptioner.prompt: must be a non-empty string, got {prompt!r}")
        # the engine's loader checks every file of the folder and names the one that is wrong
        x = checkpoint.load(folder, method="direct")
        self.tok, self.model, self.processor = x.tokenizer, x.model, x.processor
        self.prompt, self.max_new_tokens = prompt, max_new_tokens

    def caption(self, image, context: str, key: str | None = None) -> str:
        import torch

        from ..engine.inputs import chat_prompt, encode

        text = chat_prompt(self.tok, self.prompt)
        enc = encode(self.tok, self.processor, text, [image])
        self.model.model.rope_deltas = None
        with torch.no_grad():
            out = self.model.generate(input_ids=enc.input_ids, pixel_values=enc.pixel_values,
                                      image_grid_thw=enc.image_grid_thw,
                                      mm_token_type_ids=enc.mm_token_type_ids(self.model.config.image_token_id),
                                      attention_mask=torch.ones_like(enc.input_ids),
                                      max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        new = out[0, enc.input_ids.shape[1]:]
        return self.tok.decode(new, skip_special_tokens=True).strip()


# ---------------------------------------------------------------- the Monet-SFT-125K format

def _turns(sample: dict, where: str) -> list:
    if not isinstance(sample, dict) or not isinstance(sample.get("data"), list):
        raise ValueError(f"{where}: a Monet-SFT sample needs a 'data' list of turns")
    for t in sample["data"]:
        if not isinstance(t, dict) or "role" not in t or not isinstance(t.get("content"), list):
            raise ValueError(f"{where}: every turn needs 'role' and a 'content' list, got {str(t)[:80]!r}")
    return sample["data"]


def _image_ref(item: dict, where: str = "sample") -> str:
    """The file an image item names (every key the formats use, `exports.image_ref`)."""
    ref = image_ref(item)
    if ref is None:
        raise ValueError(f"{where}: image item without a path ({', '.join(IMAGE_KEYS)}): {item!r}")
    return ref


def open_image(path: Path, where: str) -> Image.Image:
    """An image file decoded and checked (size, aspect) by the engine's rule, or an error naming it."""
    from ..engine.query import as_image

    try:
        return as_image(path, where)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: cannot use image {path} ({exc})") from exc


def load_interleaved(path: str | Path) -> list[dict]:
    """A Monet-SFT-format JSON file (a list of samples, or JSON lines)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file ({exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: neither JSON nor JSON lines ({exc})") from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of samples, got {str(data)[:80]!r}")
    for i, s in enumerate(data):
        _turns(s, f"{path} sample {i}")
    return data


def to_capimagine(sample: dict, captioner: Captioner, image_root: str | Path = ".",
                  where: str = "sample") -> dict:
    """One interleaved sample with its auxiliary images replaced by imagination text."""
    image_root = Path(image_root)
    out_turns, n_aux = [], 0
    for turn in _turns(sample, where):
        if turn["role"] != "assistant":
            out_turns.append(turn)
            continue
        pieces, context = [], ""
        for item in turn["content"]:
            if not isinstance(item, dict):
                raise ValueError(f"{where}: a content item must be an object, got {item!r}")
            if item.get("type") == "text":
                if not isinstance(item.get("text"), str):
                    raise ValueError(f"{where}: text item without a 'text' string: {item!r}")
                pieces.append(item["text"])
                context += item["text"]
            elif item.get("type") == "image":
                ref = _image_ref(item, where)
                if not pieces or ABS_VIS not in pieces[-1]:
                    raise ValueError(f"{where}: auxiliary image {ref!r} is not announced by {ABS_VIS}")
                image = open_image(image_root / ref, f"{where} auxiliary image")
                cap = captioner.caption(image, context, key=ref)
                if not isinstance(cap, str) or not cap.strip():
                    raise ValueError(f"{where}: the captioner gave no caption for {ref!r} ({cap!r})")
                cap = cap.strip()
                last = pieces[-1]
                i = last.rindex(ABS_VIS)
                pieces[-1] = last[:i] + f"{IMAGINE_START} {cap} {IMAGINE_END}" + last[i + len(ABS_VIS):]
                n_aux += 1
            else:
                raise ValueError(f"{where}: unknown content type {item.get('type')!r}")
        text = "".join(pieces).replace(OBS_START, "").replace(OBS_END, "")
        out_turns.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    out = {"data": out_turns, "metadata": dict(sample.get("metadata", {}), n_imagined=n_aux)}
    return out


def convert_file(src: str | Path, dst: str | Path, captioner: Captioner, image_root: str | Path | None = None) -> int:
    """Convert a whole Monet-SFT-format file; returns the number of samples written."""
    src, dst = Path(src), Path(dst)
    samples = load_interleaved(src)
    root = Path(image_root) if image_root else src.parent
    out = [to_capimagine(s, captioner, root, f"{src} sample {i}") for i, s in enumerate(samples)]
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(dst, out)
    return len(out)


# ---------------------------------------------------------------- the testbed in that format

def testbed_interleaved(items, out_dir: str | Path) -> tuple[Path, GroundTruthCaptioner]:
    """Write testbed items as Monet-format interleaved samples (the crop as auxiliary image).

    Returns the JSON file and the ground-truth captioner for its auxiliary images.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    samples, captions = [], {}
    for it in items:
        if it.image is None or it.crop is None:
            raise ValueError(f"item {it.id}: no image or crop attached (use Testbed.with_images or make_item)")
        img, crop = f"images/{it.id}.png", f"images/{it.id}-crop.png"
        _save_png(it.image, out_dir / img)
        _save_png(it.crop, out_dir / crop)
        captions[crop] = it.caption
        options = " ".join(f"{letter}. {o}" for letter, o in zip("ABCD", it.options))
        samples.append({"data": [
            {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
            {"role": "user", "content": [{"type": "image", "image": img},
                                         {"type": "text", "text": f"{it.question} {options}"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": f"Let me look closer. {ABS_VIS}"},
                {"type": "image", "image": crop},
                {"type": "text", "text": f"{OBS_START}{it.caption}{OBS_END} The answer is \\boxed{{{it.answer}}}."}]},
        ], "metadata": {"id": it.id, "family": it.family}})
    path = atomic_write_json(out_dir / "interleaved.json", samples)
    return path, GroundTruthCaptioner(captions)


def _save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG through a temporary name and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def imagination(sample: dict, where: str = "sample") -> list[str]:
    """The imagination spans of a converted sample (what CapImagine is trained to write)."""
    spans = []
    for turn in _turns(sample, where):
        if turn["role"] == "assistant":
            text = "".join(i.get("text", "") for i in turn["content"])
            while IMAGINE_START in text:
                a = text.index(IMAGINE_START) + len(IMAGINE_START)
                b = text.find(IMAGINE_END, a)
                if b < 0:
                    raise ValueError(f"{where}: {IMAGINE_START} at character {a - len(IMAGINE_START)} is never "
                                     f"closed by {IMAGINE_END}")
                spans.append(text[a:b].strip())
                text = text[b + len(IMAGINE_END):]
    return spans
