"""The real benchmarks from local files in their published formats, as one `Example` schema.

Three formats, read as the published files lay them out (nothing is downloaded):

* **V* Bench** (`craigwu/vstar_bench`): a folder with the question file `test_questions.jsonl`
  and the image folders `direct_attributes/` and `relative_position/`. Each line is
  `{"image": "direct_attributes/sa_4690.jpg", "text": "<question>\\n(A) ...\\n(B) ...\\n<instruction>",
  "category": "direct_attributes", "question_id": 0, "label": "A"}`; the options are lettered
  inside `text` (four for direct attributes, two for relative position) and the instruction
  line after them is dropped (each harness writes its own). The per-image annotation
  `<image>.json` beside an image, when present, gives the target objects' boxes
  (`"bbox": [[x, y, w, h], ...]`), kept as the example's evidence boxes.
* **HR-Bench 4K / 8K** (`DreamMr/HR-Bench`, `hr_bench_{4k,8k}.tsv`, VLMEvalKit's
  `HRBenchDataset`): a TSV with columns index, question, A-D, answer, category (`single` for
  FSP, `cross` for FCP), cycle_category (each question appears once per cycle with its options
  rotated) and image (base64). As in VLMEvalKit, an image cell of at most 64 characters that
  names another row's index stands for that row's image.
* **MME-RealWorld-Lite** (`yifanzhang114/MME-RealWorld-Lite`, its `data.zip`): the annotation
  `MME-RealWorld-Lite.json` (a list of `{"Question_id", "Image", "Text", "Answer choices":
  ["(A) ...", ... "(E) ..."], "Ground truth": "B", "Task", "Subtask", "Category", ...}`) next
  to the image folder `imgs/` that `Image` paths are relative to.

Every problem in a file is a `BenchmarkFormatError` naming the file and the row: wrong columns or
keys, a duplicated index, an answer that is not one of the options, a missing image, base64 that
does not decode, an image that cannot be read. Images are checked when the file is loaded (a
missing file, bad base64, bytes that are not an image) and decoded in full only when an example
is run (`Example.load_image`, whose errors name the row as well); `check_images` decodes them all.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pandas as pd
from PIL import Image

from ..engine.query import Query

LETTERS = "ABCDEFGH"
BENCHMARKS = ("vstar", "hrbench4k", "hrbench8k", "mme-realworld-lite")
VSTAR_FILE = "test_questions.jsonl"
VSTAR_KEYS = ("image", "text", "category", "question_id", "label")
HRBENCH_FILES = {"hrbench4k": "hr_bench_4k.tsv", "hrbench8k": "hr_bench_8k.tsv"}
HRBENCH_COLUMNS = ("index", "question", "A", "B", "C", "D", "answer", "category", "cycle_category", "image")
MME_FILE = "MME-RealWorld-Lite.json"
MME_IMAGES = "imgs"
MME_KEYS = ("Question_id", "Image", "Text", "Answer choices", "Ground truth", "Task", "Subtask", "Category")
REF_MAX = 64  # VLMEvalKit: an image cell this short may name another row's index


class BenchmarkFormatError(ValueError):
    """A benchmark file (or one of its images) that does not have the published format."""


def _bad(where: str, problem: str) -> BenchmarkFormatError:
    return BenchmarkFormatError(f"{where}: {problem}")


# ---------------------------------------------------------------- the example schema

@dataclass(frozen=True)
class ImageRef:
    """Where an example's image is: a file, or base64 text (a TSV cell)."""

    path: Path | None = None
    b64: str | None = field(default=None, repr=False)

    def load(self, where: str) -> Image.Image:
        """The image as RGB; a missing, undecodable or unreadable image names `where`."""
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # benchmark images are local and may be huge (remote sensing)
        try:
            if self.path is not None:
                if not self.path.is_file():
                    raise _bad(where, f"image file {self.path} is missing")
                with Image.open(self.path) as im:
                    im.load()
                    return im.convert("RGB")
            with Image.open(BytesIO(_b64decode(self.b64, where))) as im:
                im.load()
                return im.convert("RGB")
        except BenchmarkFormatError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            what = f"image file {self.path}" if self.path is not None else "the base64 image"
            raise _bad(where, f"cannot read {what} ({type(exc).__name__}: {exc})") from exc
        finally:
            Image.MAX_IMAGE_PIXELS = limit


@dataclass(frozen=True)
class Example:
    """One benchmark question, the same fields for every benchmark.

    `id` is unique within the benchmark; `position` is the example's place in the file (results
    are written and merged in this order); `category` is the benchmark's main grouping (V*:
    direct_attributes / relative_position; HR-Bench: single / cross; MME-RealWorld: the
    subtask), `task` MME-RealWorld's Perception / Reasoning, `subcategory` its finer category,
    `cycle` HR-Bench's cycle_category. `source` names the file and row in errors.
    """

    benchmark: str
    id: str
    position: int
    question: str
    options: tuple[str, ...]
    answer: int
    category: str
    image: ImageRef = field(repr=False)
    source: str
    task: str | None = None
    subcategory: str | None = None
    cycle: str | None = None
    evidence_boxes: tuple[tuple[float, ...], ...] | None = None  # V*: the target objects, pixels (x0, y0, x1, y1)

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]

    def load_image(self) -> Image.Image:
        return self.image.load(self.source)

    def query(self, image: Image.Image | None = None) -> Query:
        """The engine `Query` of this example (its image loaded unless given)."""
        image = self.load_image() if image is None else image
        try:
            boxes = [list(b) for b in self.evidence_boxes] if self.evidence_boxes else None
            return Query(images=[image], question=self.question, options=list(self.options), answer=self.answer,
                         id=self.id, family=self.category, evidence_boxes=boxes)
        except (TypeError, ValueError) as exc:
            raise _bad(self.source, str(exc)) from exc

    def fields(self) -> dict:
        """The example's plain fields (for results rows)."""
        return dict(item=self.id, position=self.position, benchmark=self.benchmark, category=self.category,
                    task=self.task, subcategory=self.subcategory, cycle=self.cycle, answer=self.answer_letter,
                    n_options=len(self.options))


# ---------------------------------------------------------------- shared checks

def _b64decode(text: str | None, where: str) -> bytes:
    try:
        return binascii.a2b_base64(str(text).encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise _bad(where, f"the image is not valid base64 ({exc})") from exc


def _check_image_bytes(data: bytes | Path, where: str) -> None:
    """The bytes (or file) start like an image PIL can read (header only: cheap)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(data if isinstance(data, Path) else BytesIO(data)) as im:
            w, h = im.size
    except (OSError, ValueError, SyntaxError) as exc:
        what = f"image file {data}" if isinstance(data, Path) else "the base64 image"
        raise _bad(where, f"cannot read {what}: not an image PIL can open ({type(exc).__name__})") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if w < 1 or h < 1:
        raise _bad(where, f"empty image ({w}x{h})")


def _check_file_image(path: Path, where: str) -> None:
    if not path.is_file():
        raise _bad(where, f"image file {path} is missing")
    _check_image_bytes(path, where)


def _check_options(options: list[str], where: str) -> None:
    if len(options) < 2:
        raise _bad(where, f"{len(options)} option(s); a multiple-choice question needs at least 2")
    empty = [LETTERS[i] for i, o in enumerate(options) if not o.strip()]
    if empty:
        raise _bad(where, f"option(s) {', '.join(empty)} are empty")
    if len(set(options)) != len(options):
        raise _bad(where, f"duplicate options {options!r}")


def _letter_answer(value, letters: str, where: str) -> int:
    answer = str(value).strip().upper()
    if len(answer) != 1 or answer not in letters:
        raise _bad(where, f"answer {value!r} is not one of the options {', '.join(letters)}")
    return letters.index(answer)


def _unique(ids: Iterable[tuple[str, str]], path: Path, what: str) -> None:
    """(id, where) pairs: a repeated id names both rows."""
    seen: dict[str, str] = {}
    for i, where in ids:
        if i in seen:
            raise _bad(f"{path}", f"duplicated {what} {i!r} ({seen[i]} and {where})")
        seen[i] = where


def _find(data: str | Path, name: str, *subfolders: str) -> Path:
    """`data` itself if it is the file, else `data/<sub>/name` for the first sub that has it."""
    data = Path(data)
    if data.is_file():
        return data
    if not data.exists():
        raise FileNotFoundError(f"{data}: benchmark folder not found")
    for sub in ("", *subfolders):
        p = data / sub / name
        if p.is_file():
            return p
    looked = ", ".join(str(data / s / name) for s in ("", *subfolders))
    raise FileNotFoundError(f"{data}: no {name} (looked for {looked})")


# ---------------------------------------------------------------- V* Bench

_VSTAR_OPTION = re.compile(r"\(([A-H])\)")


def parse_vstar_text(text: str, where: str) -> tuple[str, list[str]]:
    """Question and options from V*'s `text`: '<question>\\n(A) x\\n(B) y\\n<instruction>'.

    Options may also sit on one line ('... (A) x (B) y'); whatever follows the last option on
    its line break (the instruction) is not part of it.
    """
    first = _VSTAR_OPTION.search(text)
    if first is None or first.group(1) != "A":
        raise _bad(where, f"'text' has no lettered options '(A) ...': {text[:80]!r}")
    question = text[:first.start()].strip()
    parts = _VSTAR_OPTION.split(text[first.start():])  # ['', 'A', ' x\n', 'B', ' y\n...']
    letters, bodies = parts[1::2], parts[2::2]
    if "".join(letters) != LETTERS[:len(letters)]:
        raise _bad(where, f"options are lettered {', '.join(letters)}, expected A, B, ... in order")
    options = [b.strip().split("\n")[0].strip() for b in bodies]
    if not question:
        raise _bad(where, "the question before the options is empty")
    return question, options


def vstar_boxes(path: Path) -> tuple[tuple[float, ...], ...] | None:
    """The target objects' boxes from V*'s per-image annotation (`sa_XXXX.json` beside the image,
    `"bbox": [[x, y, w, h], ...]` in pixels) as (x0, y0, x1, y1); None when there is no annotation."""
    if not path.is_file():
        return None
    try:
        boxes = json.loads(path.read_text(encoding="utf-8"))["bbox"]
        if boxes and not isinstance(boxes[0], (list, tuple)):
            boxes = [boxes]
        out = tuple((float(x), float(y), float(x) + float(w), float(y) + float(h)) for x, y, w, h in boxes)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise _bad(str(path), f"not a V* annotation with 'bbox': [[x, y, w, h], ...] ({type(exc).__name__}: {exc})"
                   ) from exc
    if any(b[2] <= b[0] or b[3] <= b[1] for b in out):
        raise _bad(str(path), f"a box has no area: {boxes!r}")
    return out or None


def load_vstar(data: str | Path) -> list[Example]:
    """V* Bench from its folder (or its `test_questions.jsonl`)."""
    path = _find(data, VSTAR_FILE, "vstar_bench")
    root = path.parent
    out, ids = [], []
    with open(path, encoding="utf-8") as f:
        lines = list(enumerate(f, 1))
    for n, line in lines:
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad(where, f"not a JSON object ({exc})") from exc
        if not isinstance(rec, dict):
            raise _bad(where, f"expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in VSTAR_KEYS if k not in rec]
        if missing:
            raise _bad(where, f"missing key(s) {', '.join(missing)}; has {', '.join(rec) or 'none'}")
        question, options = parse_vstar_text(str(rec["text"]), where)
        _check_options(options, where)
        answer = _letter_answer(rec["label"], LETTERS[:len(options)], where)
        qid = str(rec["question_id"])
        image = root / str(rec["image"])
        _check_file_image(image, where)
        ids.append((qid, f"line {n}"))
        out.append(Example("vstar", qid, len(out), question, tuple(options), answer, str(rec["category"]),
                           ImageRef(path=image), f"{where} (question_id={qid})",
                           evidence_boxes=vstar_boxes(image.with_suffix(".json"))))
    _unique(ids, path, "question_id")
    if not out:
        raise _bad(str(path), "no questions in the file")
    return out


# ---------------------------------------------------------------- HR-Bench (VLMEvalKit TSV)

def read_tsv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise _bad(str(path), f"not a readable TSV ({exc})") from exc


def load_hrbench(data: str | Path, benchmark: str = "hrbench4k") -> list[Example]:
    """HR-Bench 4K or 8K from its VLMEvalKit TSV (or a folder holding it)."""
    if benchmark not in HRBENCH_FILES:
        raise ValueError(f"unknown HR-Bench version {benchmark!r}; known: {', '.join(HRBENCH_FILES)}")
    path = _find(data, HRBENCH_FILES[benchmark], "HR-Bench")
    df = read_tsv(path)
    missing = [c for c in HRBENCH_COLUMNS if c not in df.columns]
    if missing:
        raise _bad(str(path), f"missing column(s) {', '.join(missing)}; has {', '.join(df.columns)}")
    rows = df.to_dict("records")
    wheres = [f"{path} row {n} (index={r['index']})" for n, r in enumerate(rows, 1)]
    _unique(((r["index"], f"row {n}") for n, r in enumerate(rows, 1)), path, "index")
    by_index = {r["index"]: r["image"] for r in rows}
    checked: set[int] = set()
    out = []
    for r, where in zip(rows, wheres):
        letters = "".join(c for c in LETTERS if c in r and str(r[c]).strip())
        if letters != LETTERS[:len(letters)]:
            raise _bad(where, f"options {', '.join(letters)} are not A, B, ... without gaps")
        options = [str(r[c]).strip() for c in letters]
        _check_options(options, where)
        answer = _letter_answer(r["answer"], letters, where)
        cell = str(r["image"])
        if len(cell) <= REF_MAX and cell in by_index and cell != r["index"]:
            cell = by_index[cell]
        if not cell.strip():
            raise _bad(where, "the image cell is empty")
        if id(cell) not in checked:  # each distinct image once
            try:
                raw = _b64decode(cell, where)
            except BenchmarkFormatError:
                if len(cell) <= REF_MAX:
                    raise _bad(where, f"the image cell {cell!r} is neither base64 nor the index of another "
                               "row") from None
                raise
            _check_image_bytes(raw, where)
            checked.add(id(cell))
        out.append(Example(benchmark, str(r["index"]), len(out), str(r["question"]).strip(), tuple(options), answer,
                           str(r["category"]), ImageRef(b64=cell), where, cycle=str(r["cycle_category"])))
    if not out:
        raise _bad(str(path), "no rows in the file")
    return out


# ---------------------------------------------------------------- MME-RealWorld-Lite

_MME_CHOICE = re.compile(r"^\(([A-H])\)\s?(.*)$", re.DOTALL)


def load_mme_lite(data: str | Path) -> list[Example]:
    """MME-RealWorld-Lite from its released annotation and image folder."""
    path = _find(data, MME_FILE, "data", "MME-RealWorld-Lite/data")
    images = path.parent / MME_IMAGES
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(str(path), f"not a JSON file ({exc})") from exc
    if not isinstance(entries, list):
        raise _bad(str(path), f"expected a JSON list of questions, got {type(entries).__name__}")
    if entries and not images.is_dir():
        raise FileNotFoundError(f"{images}: image folder missing (unzip the release so that {path.name} and "
                                f"{MME_IMAGES}/ sit side by side)")
    out, ids = [], []
    for n, e in enumerate(entries, 1):
        where = f"{path} entry {n}"
        if not isinstance(e, dict):
            raise _bad(where, f"expected a JSON object, got {type(e).__name__}")
        missing = [k for k in MME_KEYS if k not in e]
        if missing:
            raise _bad(where, f"missing key(s) {', '.join(missing)}; has {', '.join(e) or 'none'}")
        qid = str(e["Question_id"])
        where = f"{where} (Question_id={qid})"
        choices = e["Answer choices"]
        if not isinstance(choices, list):
            raise _bad(where, f"'Answer choices' must be a list, got {type(choices).__name__}")
        parsed = [_MME_CHOICE.match(str(c).strip()) for c in choices]
        if not all(parsed):
            raise _bad(where, f"'Answer choices' must look like '(A) text', got {choices!r}")
        letters = "".join(m.group(1) for m in parsed)
        if letters != LETTERS[:len(letters)]:
            raise _bad(where, f"choices are lettered {', '.join(letters)}, expected A, B, ... in order")
        options = [m.group(2).strip() for m in parsed]
        _check_options(options, where)
        answer = _letter_answer(e["Ground truth"], letters, where)
        image = images / str(e["Image"])
        _check_file_image(image, where)
        ids.append((qid, f"entry {n}"))
        out.append(Example("mme-realworld-lite", qid, len(out), str(e["Text"]).strip(), tuple(options), answer,
                           str(e["Subtask"]), ImageRef(path=image), where, task=str(e["Task"]),
                           subcategory=str(e["Category"])))
    _unique(ids, path, "Question_id")
    if not out:
        raise _bad(str(path), "no questions in the file")
    return out


# ---------------------------------------------------------------- one entry point

def load_benchmark(name: str, data: str | Path, limit: int | None = None) -> list[Example]:
    """The examples of benchmark `name` from `data` (its folder or file), the first `limit`."""
    if name == "vstar":
        out = load_vstar(data)
    elif name in HRBENCH_FILES:
        out = load_hrbench(data, name)
    elif name == "mme-realworld-lite":
        out = load_mme_lite(data)
    else:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return out if limit is None else out[:limit]


def data_file(name: str, data: str | Path) -> Path:
    """The benchmark's question file under `data` (what identifies the data in a results run)."""
    if name == "vstar":
        return _find(data, VSTAR_FILE, "vstar_bench")
    if name in HRBENCH_FILES:
        return _find(data, HRBENCH_FILES[name], "HR-Bench")
    if name == "mme-realworld-lite":
        return _find(data, MME_FILE, "data", "MME-RealWorld-Lite/data")
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")


def check_images(examples: Iterable[Example]) -> int:
    """Decode every example's image in full (the first bad one raises, naming its row)."""
    n = 0
    for ex in examples:
        ex.load_image().close()
        n += 1
    return n
