"""Tiny stand-ins for the real files: benchmark folders in the published formats and tiny
random checkpoints of each released model's layout. Tests and chapter 8's CI run use them;
nothing here is a result.

* `write_vstar`, `write_hrbench`, `write_mme_lite` write a few questions in V* Bench's,
  HR-Bench's (VLMEvalKit TSV, later cycles pointing at the first cycle's image by index) and
  MME-RealWorld-Lite's layouts (`benchmarks` describes them), with small images.
* `method_checkpoint` writes a tiny random `Qwen2_5_VLForConditionalGeneration` (engine/tiny.py)
  with what the released checkpoint of a method carries: its special tokens and the config.json
  fields its training code writes (survey sections 1-4): Monet's `latent_token_id`,
  `latent_start_id`, `latent_end_id`, `answer_start_pattern`; LVR's `lvr_start_id`, `lvr_id`,
  `lvr_latent_end_id`, `lvr_end_id`, `lvr_head` (with `lvr_head.*` weights when true);
  Mirage's ids, `latent_size`, `compress_strategy`, `stage` and an embedding resized to the
  tokenizer's length; Qwen2.5-VL and CapImagine tokenizers without any method token. With
  `legacy=True` the folder has the layout older transformers wrote (`to_legacy_layout`).
"""

from __future__ import annotations

import base64
import json
from io import BytesIO
from pathlib import Path

import pandas as pd
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from ..engine.checkpoint import LVRHead
from ..engine.tiny import image_processor, save_checkpoint, tiny_config, tiny_model
from ..engine.tokenizer import METHOD_TOKENS, build_tokenizer, load_tokenizer
from .benchmarks import HRBENCH_FILES, LETTERS, MME_FILE, MME_IMAGES, VSTAR_FILE

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (230, 210, 40),
           "white": (250, 250, 250)}
VSTAR_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


def scene(colour: str, size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    """A grey image with one small square of `colour`; `seed` moves it."""
    w, h = size
    im = Image.new("RGB", size, (128, 128, 128))
    x, y = 4 + (seed * 13) % max(1, w - 16), 4 + (seed * 7) % max(1, h - 16)
    ImageDraw.Draw(im).rectangle([x, y, x + 10, y + 10], fill=COLOURS[colour])
    return im


def _encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def write_vstar(folder: str | Path, n: int = 4, size: tuple[int, int] = (64, 48)) -> Path:
    """A V* Bench folder: test_questions.jsonl, direct_attributes/ and relative_position/ (each image
    with its annotation: the square's box)."""
    folder = Path(folder)
    names = list(COLOURS)[:4]
    lines = []
    for i in range(n):
        cat = "direct_attributes" if i % 2 == 0 else "relative_position"
        (folder / cat).mkdir(parents=True, exist_ok=True)
        colour = names[i % 4]
        image = f"{cat}/sa_{1000 + i}.jpg"
        scene(colour, size, i).save(folder / image, quality=90)
        x, y = 4 + (i * 13) % max(1, size[0] - 16), 4 + (i * 7) % max(1, size[1] - 16)
        (folder / image).with_suffix(".json").write_text(json.dumps(
            {"target_object": [f"{colour} square"], "bbox": [[x, y, 11, 11]], "question": "", "options": []}))
        if cat == "direct_attributes":
            options = names[i % 4:] + names[:i % 4]
            options = options[1:2] + options[:1] + options[2:]  # right answer second
            question, label = "What is the color of the square?", "B"
        else:
            options, question, label = ["left", "right"], f"Is the {colour} square on the left or right side?", "A"
        text = question + "".join(f"\n({LETTERS[j]}) {o}" for j, o in enumerate(options)) + VSTAR_SUFFIX
        lines.append(dict(image=image, text=text, category=cat, question_id=i, label=label))
    (folder / VSTAR_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def write_hrbench(folder: str | Path, version: str = "hrbench4k", n_questions: int = 2, cycles: int = 2,
                  size: tuple[int, int] = (64, 48)) -> Path:
    """An HR-Bench TSV (VLMEvalKit layout): each question once per cycle with its options rotated;
    rows of later cycles name the first cycle's row in their image cell."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)[:4]
    rows = []
    for c in range(cycles):
        for q in range(n_questions):
            index = c * n_questions + q
            colour = names[q % 4]
            options = names[c:] + names[:c]
            image = base64.b64encode(_encode(scene(colour, size, q))).decode() if c == 0 else str(q)
            rows.append(dict(index=index, question=f"What is the colour of the small square (question {q})?",
                             answer=LETTERS[options.index(colour)], **dict(zip("ABCD", options)),
                             category="single" if q % 2 == 0 else "cross", cycle_category=f"cycle_{c}", image=image))
    path = folder / HRBENCH_FILES[version]
    pd.DataFrame(rows, columns=["index", "question", "answer", "A", "B", "C", "D", "category", "cycle_category",
                                "image"]).to_csv(path, sep="\t", index=False)
    return path


def write_mme_lite(folder: str | Path, n: int = 3, size: tuple[int, int] = (64, 48)) -> Path:
    """An MME-RealWorld-Lite release folder: data/MME-RealWorld-Lite.json and data/imgs/."""
    root = Path(folder) / "data"
    names = list(COLOURS)
    tasks = [("Perception", "Remote Sensing", "color"), ("Reasoning", "Autonomous_Driving", "Intention"),
             ("Perception", "OCR with Complex Context", "text")]
    entries = []
    for i in range(n):
        task, subtask, category = tasks[i % len(tasks)]
        colour = names[i % 4]
        image = f"{subtask.replace(' ', '_')}/img_{i}.jpg"
        (root / MME_IMAGES / image).parent.mkdir(parents=True, exist_ok=True)
        scene(colour, size, i).save(root / MME_IMAGES / image, quality=90)
        options = [o for o in names if o != colour][:4]
        options.insert(i % 5, colour)
        entries.append({"Question_id": f"{task.lower()}/{subtask.lower()}/{category}/{i:04d}",
                        "Question Type": "Multiple Choice", "Image": image,
                        "Text": "What is the colour of the small square?",
                        "Answer choices": [f"({LETTERS[j]}) {o}" for j, o in enumerate(options)],
                        "Ground truth": LETTERS[options.index(colour)], "Task": task, "Subtask": subtask,
                        "Category": category})
    (root / MME_FILE).write_text(json.dumps(entries, indent=1))
    return root


# ---------------------------------------------------------------- checkpoints

def _edit_json(path: Path, **fields) -> None:
    d = json.loads(path.read_text())
    d.update(fields)
    path.write_text(json.dumps(d, indent=2))


def _strip_method_tokens(folder: Path) -> None:
    """Remove every method's added tokens (the tail of the vocabulary): a stock Qwen2.5-VL tokenizer."""
    drop = {t for group in METHOD_TOKENS.values() for t in group}
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["added_tokens"] = [a for a in tj["added_tokens"] if a["content"] not in drop]
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    tc_path = folder / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    if "added_tokens_decoder" in tc:
        tc["added_tokens_decoder"] = {k: v for k, v in tc["added_tokens_decoder"].items() if v["content"] not in drop}
        tc_path.write_text(json.dumps(tc, indent=2))


def _add_lvr_head(folder: Path, hidden: int, seed: int) -> None:
    torch.manual_seed(seed + 1)
    head = LVRHead(hidden)
    path = folder / "model.safetensors"
    state = load_file(str(path))
    state.update({f"lvr_head.{k}": v.contiguous() for k, v in head.state_dict().items()})
    save_file(state, str(path), metadata={"format": "pt"})


def to_legacy_layout(folder: str | Path) -> Path:
    """Rewrite a checkpoint folder the way transformers 4.4x-4.51 saved Qwen2.5-VL (as
    Qwen2.5-VL-7B-Instruct is published): the text settings flat in config.json with
    `rope_scaling: {type: mrope}`, and weight names without `language_model` (`model.layers.*`,
    `visual.*`)."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    for k, v in text.items():
        if k != "model_type":
            cfg.setdefault(k, v)
    cfg.update(rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]}, rope_theta=rope["rope_theta"],
               transformers_version="4.49.0")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    path = folder / "model.safetensors"
    renames = (("model.language_model.", "model."), ("model.visual.", "visual."))
    state = {}
    for k, v in load_file(str(path)).items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        state[k] = v
    save_file(state, str(path), metadata={"format": "pt"})
    return folder


def method_checkpoint(folder: str | Path, method: str, seed: int = 0, lvr_head: bool = False,
                      max_pixels: int = 112 * 112, min_pixels: int = 28 * 28, legacy: bool = False) -> Path:
    """A tiny random checkpoint in the layout of `method`'s released model (module doc)."""
    folder = Path(folder)
    tok = build_tokenizer()
    overrides = {"vocab_size": len(tok)} if method == "mirage" else {}
    model = tiny_model(tiny_config(tok, "test", **overrides), seed)
    save_checkpoint(folder, model, tok, image_processor(max_pixels=max_pixels, min_pixels=min_pixels))
    ids = load_tokenizer(folder).convert_tokens_to_ids
    cfg = folder / "config.json"
    if method in ("direct", "capimagine"):
        _strip_method_tokens(folder)
    elif method in ("monet", "monet-sft"):
        _edit_json(cfg, latent_token_id=ids("<abs_vis_token_pad>"), latent_start_id=ids("<abs_vis_token>"),
                   latent_end_id=ids("</abs_vis_token>"),
                   answer_start_pattern=tok("<|im_start|>assistant", add_special_tokens=False)["input_ids"],
                   stage="avt_v5_stage2")
    elif method == "lvr":
        _edit_json(cfg, lvr_start_id=ids("<|lvr_start|>"), lvr_id=ids("<|lvr|>"),
                   lvr_latent_end_id=ids("<|lvr_latent_end|>"), lvr_end_id=ids("<|lvr_end|>"), lvr_head=lvr_head,
                   lvr_head_type="simple", latent_end_token=False)
        if lvr_head:
            _add_lvr_head(folder, model.config.text_config.hidden_size, seed)
    elif method == "mirage":
        _edit_json(cfg, latent_token_id=ids("<|latent_pad|>"), latent_start_id=ids("<|latent_start|>"),
                   latent_end_id=ids("<|latent_end|>"), latent_size=4, compress_strategy="average", stage="stage2")
    else:
        raise ValueError(f"unknown method {method!r}")
    return to_legacy_layout(folder) if legacy else folder


# ---------------------------------------------------------------- a demo results folder

DEMO_RUNS = [("direct", False), ("monet", True), ("monet", False), ("lvr", False), ("capimagine", False)]


def demo_results(folder: str | Path, benchmarks=("vstar", "hrbench4k", "mme-realworld-lite")) -> Path:
    """A results folder made the way a GPU run makes one, from tiny random checkpoints on the
    fixtures above (chapter 8's CI run). Its numbers are those of random models on a handful of
    questions: they mean nothing."""
    from transformers.utils import logging as hf_logging

    from .evaluate import Settings, evaluate

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars in the chapter
    folder = Path(folder)
    data = {"vstar": write_vstar(folder / "data" / "vstar", n=4),
            "hrbench4k": write_hrbench(folder / "data" / "hr", n_questions=2, cycles=2).parent,
            "mme-realworld-lite": write_mme_lite(folder / "data" / "mme", n=3)}
    out = folder / "results"
    for method, forced in DEMO_RUNS:
        ckpt = folder / "models" / method
        if not (ckpt / "config.json").exists():
            method_checkpoint(ckpt, method, seed=1)
        for bench in benchmarks:
            evaluate(Settings(model=ckpt, method=method, benchmark=bench, data=data[bench], out=out,
                              force_latent=forced, max_new_tokens=16, min_pixels=784, max_pixels=12544,
                              name=f"tiny-{method}", progress=False))
    return out
