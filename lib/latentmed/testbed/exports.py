"""The testbed's items in the file formats real training and evaluation code reads, and readers.

* Monet-SFT-125K (NOVAglow646/Monet, `src/task.py`): a JSON list of samples
  `{"data": [system, user, assistant turns], "metadata": {...}}`; turn content items are
  `{"type": "text", "text": ...}` or `{"type": "image", "image_file_name": <path>}` with paths
  relative to a dataset root (here: the JSON file's folder). Every auxiliary (assistant) image
  must be preceded, in the text item right before it, by `<abs_vis_token></abs_vis_token>`;
  text after it may be wrapped in `<observation>...</observation>`.
* CapImagine: the same conversations with the auxiliary image replaced by its caption as text
  imagination between `IMAGINE_START` and `IMAGINE_END`. CapImagine-Data's real schema is not
  documented anywhere public (its repository holds only a README), so this format is ours.
* HR-Bench (VLMEvalKit `HRBenchDataset`): a TSV with columns index, question, A-D, answer,
  category, cycle_category and image (base64). Accuracy there is averaged over
  `cycle_category` groups of per-`category` accuracies.

Readers validate and raise `ExportFormatError` naming the file and the problem; later code
reads real benchmark files with them.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
from io import BytesIO
from pathlib import Path

import pandas as pd
from PIL import Image

from ..paths import ensure_writable
from .dataset import GENERATOR_VERSION, Testbed
from .items import LETTERS, SPLITS, Item

SYSTEM_PROMPT = "You are a helpful assistant."
BOXED_INSTRUCTION = "Put your final answer within \\boxed{}."
LATENT_MARKER = "<abs_vis_token></abs_vis_token>"
OBSERVATION_START, OBSERVATION_END = "<observation>", "</observation>"
IMAGINE_START, IMAGINE_END = "<imagine>", "</imagine>"  # our markers for text imagination
HRBENCH_COLUMNS = ["index", "question", "A", "B", "C", "D", "answer", "category",
                   "cycle_category", "image"]
HRBENCH_REQUIRED = ["index", "question", "A", "B", "C", "D", "answer", "image"]
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM")
IMAGE_KEYS = ("image_file_name", "image", "image_url", "path")  # where an image item names its file


class ExportFormatError(ValueError):
    """A training or benchmark file that does not have the expected format."""


# ---------------------------------------------------------------- prompts shared by the formats

def user_prompt(item: Item) -> str:
    """Question, lettered options and the \\boxed{} instruction."""
    opts = "\n".join(f"{letter}. {word}" for letter, word in zip(LETTERS, item.options))
    return f"{item.question}\n{opts}\n{BOXED_INSTRUCTION}"


def lead_in(item: Item) -> str:
    """The assistant's first sentence: what it must look at, before zooming in."""
    f = item.facts
    if item.family == "attr":
        what = f"find the {f['shape']} and see its colour"
    elif item.family == "relpos":
        what = "find the " + " and the ".join(_labels(item)) + " and compare their positions"
    elif item.family == "count":
        what = f"find every {f['colour']} object"
    else:
        what = f"read the digit inside the {f['colour']} square"
    return f"To answer, I need to {what}. I will zoom in on the region."


def _labels(item: Item) -> list[str]:
    """'colour shape' names of the evidence objects, in evidence order."""
    by_box = {tuple(o["bbox"]): f"{o['colour']} {o['shape']}" for o in item.objects}
    return [by_box[tuple(b)] for b in item.evidence_bboxes]


def conclusion(item: Item) -> str:
    """The final sentence with the boxed letter."""
    return f"So the answer is {item.answer_word}, option {item.answer}. \\boxed{{{item.answer}}}"


def _metadata(item: Item) -> dict:
    """Everything a later analysis needs to score or corrupt the sample."""
    keys = ("id", "split", "family", "question", "options", "answer", "answer_word", "caption",
            "caption_answer_word", "crop_box", "evidence_bboxes", "evidence_cells", "facts")
    return dict(source="latentmed-testbed", generator_version=GENERATOR_VERSION,
                **{k: getattr(item, k) for k in keys})


def _turns(user_content: list, assistant_content: list) -> list[dict]:
    """System, user and assistant turns in the chat format."""
    return [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": user_content},
            {"role": "assistant", "content": assistant_content}]


# ---------------------------------------------------------------- writers

def _copy_file(src: Path, dst: Path) -> None:
    """Copy through a temporary name and a rename: a reader never sees half an image."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _copy_images(testbed: Testbed, items: list[Item], folder: Path) -> None:
    """Copy scenes and crops next to the JSON file (nothing to do when it is the testbed)."""
    if folder.resolve() == testbed.root.resolve():
        return
    for sub in ("images", "crops"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for it in items:
        _copy_file(testbed.image_path(it), folder / "images" / f"{it.id}.png")
        _copy_file(testbed.crop_path(it), folder / "crops" / f"{it.id}.png")


def _write_json(samples: list, path: Path) -> Path:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(samples, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def monet_sample(item: Item) -> dict:
    """One Monet-SFT-125K-style sample; image paths relative to the JSON file's folder."""
    user = [{"type": "image", "image_file_name": f"images/{item.id}.png"},
            {"type": "text", "text": user_prompt(item)}]
    assistant = [{"type": "text", "text": f"{lead_in(item)}\n{LATENT_MARKER}"},
                 {"type": "image", "image_file_name": f"crops/{item.id}.png"},
                 {"type": "text", "text": f"{OBSERVATION_START}{item.caption}{OBSERVATION_END} "
                                          f"{conclusion(item)}"}]
    return {"data": _turns(user, assistant), "metadata": _metadata(item)}


def capimagine_sample(item: Item) -> dict:
    """The Monet sample with the auxiliary image replaced by its caption as text imagination."""
    user = [{"type": "image", "image_file_name": f"images/{item.id}.png"},
            {"type": "text", "text": user_prompt(item)}]
    text = f"{lead_in(item)}\n{IMAGINE_START}{item.caption}{IMAGINE_END} {conclusion(item)}"
    return {"data": _turns(user, [{"type": "text", "text": text}]), "metadata": _metadata(item)}


def _export(testbed: Testbed, split: str, path, make) -> Path:
    """Write the samples `make` builds for a split, images copied next to the file."""
    path = Path(path)
    ensure_writable(path.parent)
    items = _split_items(testbed, split)
    if path.exists():  # an earlier export must not point at images half replaced by this one
        path.unlink()
    _copy_images(testbed, items, path.parent)
    return _write_json([make(it) for it in items], path)


def _split_items(testbed: Testbed, split: str) -> list[Item]:
    """The items of a split; an unknown or empty split is an error naming it."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: not one of {', '.join(SPLITS)}")
    items = testbed.items(split=split)
    if not items:
        raise ValueError(f"split {split!r} of the testbed at {testbed.root} has no items")
    return items


def to_monet_sft(testbed: Testbed, split: str, path) -> Path:
    """Write a Monet-SFT-125K-style train.json (images copied next to it)."""
    return _export(testbed, split, path, monet_sample)


def to_capimagine_sft(testbed: Testbed, split: str, path) -> Path:
    """Write the CapImagine-style (text imagination) version of the same conversations."""
    return _export(testbed, split, path, capimagine_sample)


def _b64_png(path: Path) -> str:
    """A file's bytes as base64 text."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def to_hrbench_tsv(testbed: Testbed, split: str, path) -> Path:
    """Write an HR-Bench-style TSV (images inline as base64 PNG; category = task family)."""
    path = Path(path)
    ensure_writable(path.parent)
    items = _split_items(testbed, split)
    rows = [dict(index=i, question=it.question, **dict(zip(LETTERS, it.options)),
                 answer=it.answer, category=it.family, cycle_category="cycle_0",
                 image=_b64_png(testbed.image_path(it))) for i, it in enumerate(items)]
    tmp = path.with_name(path.name + ".partial")
    pd.DataFrame(rows, columns=HRBENCH_COLUMNS).to_csv(tmp, sep="\t", index=False)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- readers

def _bad(path: Path, msg: str) -> ExportFormatError:
    """The error for a file in the wrong format, naming it."""
    return ExportFormatError(f"{path}: {msg}")


def _load_samples(path: Path) -> list:
    """A JSON list (.json) or one sample per line (.jsonl)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise _bad(path, f"line {n}: invalid JSON ({exc})") from exc
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(path, f"invalid JSON ({exc})") from exc
    if not isinstance(data, list):
        raise _bad(path, f"expected a JSON list of samples, got {type(data).__name__}")
    return data


def _check_turns(path: Path, i: int, sample) -> list:
    """The turns of sample `i`, checked for roles and content items."""
    if not isinstance(sample, dict) or not isinstance(sample.get("data"), list):
        raise _bad(path, f"sample {i}: expected an object with a 'data' list of turns")
    for t, turn in enumerate(sample["data"]):
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant"):
            raise _bad(path, f"sample {i} turn {t}: needs a role system/user/assistant")
        if not isinstance(turn.get("content"), list):
            raise _bad(path, f"sample {i} turn {t}: 'content' must be a list of items")
        for j, c in enumerate(turn["content"]):
            kind = c.get("type") if isinstance(c, dict) else None
            if kind == "text" and isinstance(c.get("text"), str):
                continue
            if kind == "image" and image_ref(c) is not None:
                continue
            raise _bad(path, f"sample {i} turn {t} item {j}: expected a text item with 'text' "
                             "or an image item with 'image_file_name'")
    return sample["data"]


def image_ref(item: dict) -> str | None:
    """The path of an image content item, whichever key the format uses (Monet-SFT-125K's
    `image_file_name`, or `image` / `image_url` / `path` as in Qwen's chat format)."""
    for key in IMAGE_KEYS:
        v = item.get(key)
        if isinstance(v, dict):
            v = v.get("url")
        if isinstance(v, str) and v:
            return v
    return None


def _check_images(path: Path, i: int, turns: list, root: Path) -> None:
    """Every referenced image file exists under `root` and starts like an image file."""
    for turn in turns:
        for c in turn["content"]:
            if c["type"] == "image":
                f = root / image_ref(c)
                if not f.is_file():
                    raise _bad(path, f"sample {i}: image file {f} does not exist")
                with open(f, "rb") as fh:
                    if not fh.read(8).startswith(_IMAGE_MAGIC):
                        raise _bad(path, f"sample {i}: image file {f} is not a PNG/JPEG/GIF/WebP/BMP")


def _assistant(turns: list) -> list:
    """All content items of the assistant turns, in order."""
    return [c for t in turns if t["role"] == "assistant" for c in t["content"]]


def _marker_problem(turns: list) -> str | None:
    """Why the auxiliary images of a sample break Monet's rule, or None."""
    items = _assistant(turns)
    for j, c in enumerate(items):
        if c["type"] == "image" and (j == 0 or items[j - 1]["type"] != "text"
                                     or LATENT_MARKER not in items[j - 1]["text"]):
            return f"auxiliary image at assistant item {j} is not preceded by {LATENT_MARKER}"
    return None


def read_monet_sft(path, image_root=None, check_images: bool = True,
                   skip_invalid: bool = False) -> list[dict]:
    """Read and validate a Monet-SFT-style file; image paths are relative to `image_root`.

    Checks the chat structure, that every auxiliary (assistant) image follows a text item
    containing `<abs_vis_token></abs_vis_token>`, and (optionally) that image files exist.
    `skip_invalid` drops samples that break the marker rule instead of failing, as Monet's
    own loader (`src/task.py`) does; malformed structure always fails.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    kept = []
    for i, sample in enumerate(_load_samples(path)):
        turns = _check_turns(path, i, sample)
        problem = _marker_problem(turns)
        if problem and skip_invalid:
            continue
        if problem:
            raise _bad(path, f"sample {i}: {problem}")
        if check_images:
            _check_images(path, i, turns, root)
        kept.append(sample)
    return kept


def read_capimagine_sft(path, image_root=None, check_images: bool = True) -> list[dict]:
    """Read and validate our CapImagine-style file: text imagination, no auxiliary images."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    samples = _load_samples(path)
    for i, sample in enumerate(samples):
        turns = _check_turns(path, i, sample)
        items = _assistant(turns)
        if any(c["type"] == "image" for c in items):
            raise _bad(path, f"sample {i}: assistant turn holds an image; text imagination expected")
        text = " ".join(c["text"] for c in items)
        start, end = text.find(IMAGINE_START), text.find(IMAGINE_END)
        if start < 0 or end < start:
            raise _bad(path, f"sample {i}: no {IMAGINE_START}...{IMAGINE_END} span in the answer")
        if check_images:
            _check_images(path, i, turns, root)
    return samples


def _check_b64(path: Path, index, value) -> None:
    """A decodable base64 string whose bytes start like an image file."""
    try:
        head = base64.b64decode(str(value)[:64], validate=True)
        base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(path, f"row index={index}: 'image' is not valid base64 ({exc})") from exc
    if not head.startswith(_IMAGE_MAGIC):
        raise _bad(path, f"row index={index}: 'image' does not decode to a PNG/JPEG/GIF/WebP/BMP")


def _resolve_references(path: Path, df: pd.DataFrame) -> list[str]:
    """Each row's base64 image; a cell of at most 64 characters that is another row's index
    refers to that row's image (VLMEvalKit's convention). Indices must be unique."""
    dup = sorted(set(df["index"][df["index"].duplicated()]))
    if dup:
        raise _bad(path, f"index {', '.join(dup[:5])} occurs more than once; image references "
                         "by index would be ambiguous")
    by_index = dict(zip(df["index"], df["image"]))
    images = []
    for index, cell in zip(df["index"], df["image"]):
        if len(cell) <= 64 and cell in by_index:
            target = by_index[cell]
            if len(target) <= 64:
                raise _bad(path, f"row index={index}: 'image' refers to row {cell}, whose image is "
                                 f"not base64 data either ({target!r})")
            cell = target
        elif len(cell) <= 64 and not cell:
            raise _bad(path, f"row index={index}: 'image' is empty")
        images.append(cell)
    return images


def _check_rows(path: Path, df: pd.DataFrame) -> None:
    """Every row has a question, four non-empty options and an answer that is exactly one of A-D."""
    if not len(df):
        raise _bad(path, "no rows (only a header)")
    for row in df.itertuples(index=False):
        r = row._asdict()
        index = r["index"]
        if r["answer"] not in tuple(LETTERS):
            raise _bad(path, f"row index={index}: answer {r['answer']!r} is not exactly one of A, B, C, D")
        if not r["question"].strip():
            raise _bad(path, f"row index={index}: the question is empty")
        empty = [c for c in LETTERS if not r[c].strip()]
        if empty:
            raise _bad(path, f"row index={index}: option(s) {', '.join(empty)} are empty")


def read_hrbench_tsv(path) -> pd.DataFrame:
    """Read and validate an HR-Bench-style TSV (images stay base64; see `decode_image`).

    As in VLMEvalKit, an 'image' cell of at most 64 characters that names another row's
    index refers to that row's image; such references are resolved (indices must be unique).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise _bad(path, f"not a readable TSV ({exc})") from exc
    missing = [c for c in HRBENCH_REQUIRED if c not in df.columns]
    if missing:
        raise _bad(path, f"missing column(s) {', '.join(missing)}; has {', '.join(df.columns)}")
    _check_rows(path, df)
    images = _resolve_references(path, df)
    for index, image in zip(df["index"], images):
        _check_b64(path, index, image)
    df["image"] = images
    try:
        df["index"] = df["index"].astype(int)
    except ValueError as exc:
        raise _bad(path, f"column 'index' is not all integers ({exc})") from exc
    return df


def decode_image(b64: str, where: str = "image") -> Image.Image:
    """A base64 image cell as an RGB PIL image; `where` names it in errors."""
    try:
        with Image.open(BytesIO(base64.b64decode(b64, validate=True))) as im:
            im.load()
            return im.convert("RGB")
    except (binascii.Error, OSError, ValueError) as exc:
        raise ExportFormatError(f"{where}: cannot decode image ({exc})") from exc
