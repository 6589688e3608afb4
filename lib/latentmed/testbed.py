"""The synthetic testbed: vision-centric multiple-choice items about small objects in large scenes.

This is *not* one of the paper's benchmarks (V*, HR-Bench, MME-RealWorld-Lite): it is a
procedurally generated stand-in whose ground truth is known down to the evidence cells, so the
mediation study can run end to end on CPU and score probes against truth. Four task families:

* attr   "What colour is the star?"              (exactly one star)
* relpos "Where is the red circle relative to the blue square?"  left/right/above/below
* count  "How many red objects are there?"       zero..seven
* glyph  "Which digit is inside the red square?" (2-4 digit boxes, 5x7 bitmap digits)

Every item carries its "imagination": evidence boxes and cells, the zoomed crop, and a caption
of the crop that states the answer. `make_item` is a pure function of (seed, split, family,
index), so training can also draw items on the fly. On-disk datasets: `generate`, `load`,
`ensure`. The resolution argument: `evidence_fraction`, `readability`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from . import scenes
from .paths import ensure_writable
from .scenes import CELL, COLOUR_NAMES, SHAPES, SceneObject

FAMILIES: tuple[str, ...] = ("attr", "relpos", "count", "glyph")
SPLITS: tuple[str, ...] = ("train", "val", "test")
LETTERS = "ABCD"
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven",
                                 "eight", "nine")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
MAX_COUNT = 7
CROP_PAD = 4  # px of context around the evidence in the crop
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2, "vision": 3}


@dataclass(frozen=True)
class TestbedConfig:
    """Everything that defines a testbed; two datasets with equal configs are identical."""

    image_size: int = 224
    n_objects: tuple[int, int] = (6, 20)
    families: tuple[str, ...] = FAMILIES
    n_train: int = 4000
    n_val: int = 400
    n_test: int = 800
    crop_size: int = 56
    seed: int = 0
    digit_rich: bool = False

    __test__ = False  # not a pytest test class

    def __post_init__(self) -> None:
        """Normalise sequences to tuples and reject parameters the generator cannot honour."""
        object.__setattr__(self, "n_objects", tuple(self.n_objects))
        object.__setattr__(self, "families", tuple(self.families))
        _validate(self)

    @property
    def grid(self) -> int:
        """Cells per side (one per merged image token)."""
        return scenes.grid_size(self.image_size)

    def split_size(self, split: str) -> int:
        """Number of items in a split."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        return getattr(self, f"n_{split}")

    def family_counts(self, split: str) -> dict[str, int]:
        """Items per family in a split: spread evenly, the remainder to the first families."""
        n, k = self.split_size(split), len(self.families)
        return {f: n // k + (1 if i < n % k else 0) for i, f in enumerate(self.families)}

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        d = dataclasses.asdict(self)
        d["n_objects"], d["families"] = list(self.n_objects), list(self.families)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TestbedConfig":
        """Inverse of `to_dict`; unknown keys are an error."""
        return cls(**d)


def _fail(name: str, msg: str) -> None:
    """Raise the ValueError that names the bad parameter."""
    raise ValueError(f"TestbedConfig.{name}: {msg}")


def _is_int(v) -> bool:
    """An integer that is not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _validate(c: TestbedConfig) -> None:
    """Check every field; the message names the parameter and the allowed values."""
    if not _is_int(c.image_size) or c.image_size < 2 * CELL or c.image_size % CELL:
        _fail("image_size", f"must be a multiple of {CELL} and >= {2 * CELL}, got {c.image_size!r}")
    cells = c.grid * c.grid
    lo_hi = c.n_objects
    if len(lo_hi) != 2 or not all(_is_int(v) for v in lo_hi) or not 1 <= lo_hi[0] <= lo_hi[1]:
        _fail("n_objects", f"must be (low, high) with 1 <= low <= high, got {c.n_objects!r}")
    if lo_hi[1] > cells:
        _fail("n_objects", f"at most {cells} objects fit a {c.grid}x{c.grid} grid "
                           f"(one per {CELL}-px cell), got high={lo_hi[1]}")
    if not c.families:
        _fail("families", f"needs at least one task family; known: {', '.join(FAMILIES)}")
    for f in c.families:
        if f not in FAMILIES:
            _fail("families", f"unknown task family {f!r}; known: {', '.join(FAMILIES)}")
    if len(set(c.families)) != len(c.families):
        _fail("families", f"duplicate task family in {c.families!r}")
    if "relpos" in c.families and c.grid < 3:
        _fail("image_size", f"the relpos family needs a grid of >= 3 cells (image_size >= {3 * CELL})")
    for name in ("n_train", "n_val", "n_test"):
        v = getattr(c, name)
        if not _is_int(v) or v < 0:
            _fail(name, f"must be an integer >= 0, got {v!r}")
    if c.n_train + c.n_val + c.n_test == 0:
        _fail("n_train", "all splits are empty (n_train = n_val = n_test = 0)")
    if not _is_int(c.crop_size) or c.crop_size < CELL:
        _fail("crop_size", f"must be an integer >= {CELL} px, got {c.crop_size!r}")
    if not _is_int(c.seed) or c.seed < 0:
        _fail("seed", f"must be an integer >= 0, got {c.seed!r}")
    if not isinstance(c.digit_rich, bool):
        _fail("digit_rich", f"must be True or False, got {c.digit_rich!r}")


@dataclass
class Item:
    """One multiple-choice question with its ground-truth evidence, crop and caption."""

    id: str
    split: str
    family: str
    question: str
    options: list[str]
    answer: str  # letter A-D
    answer_word: str
    keywords: list[str]
    objects: list[dict]
    evidence_bboxes: list[list[int]]
    evidence_cells: list[list[int]]
    crop_box: list[int]
    caption: str
    caption_answer_word: str
    facts: dict
    image: Image.Image | None = field(default=None, repr=False, compare=False)
    crop: Image.Image | None = field(default=None, repr=False, compare=False)

    __test__ = False

    def to_dict(self) -> dict:
        """JSON-ready dict without the images."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("image"), d.pop("crop")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Item":
        """Inverse of `to_dict` (images are attached separately)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"image", "crop"}
        missing = names - set(d)
        if missing:
            raise KeyError(f"item is missing fields: {', '.join(sorted(missing))}")
        return cls(**{k: d[k] for k in names})

    def scene_objects(self) -> list[SceneObject]:
        """The objects as `SceneObject`s."""
        return [SceneObject.from_dict(o) for o in self.objects]

    @property
    def answer_index(self) -> int:
        """0-3 index of the right option."""
        return LETTERS.index(self.answer)


# ---------------------------------------------------------------- item generation

def item_rng(seed: int, split: str, family: str, index: int) -> np.random.Generator:
    """The generator an item is drawn from: a pure function of its coordinates."""
    return np.random.default_rng([seed, _SPLIT_CODE[split], FAMILIES.index(family), index])


def relation(a: tuple[int, int], b: tuple[int, int]) -> str | None:
    """Where cell a is relative to cell b, or None when not clear-cut.

    Clear-cut: on the dominant axis at least one empty cell lies between them (|d| >= 2), and
    the offset on the other axis is at most half of it (the direction is within ~27 degrees).
    """
    dr, dc = a[0] - b[0], a[1] - b[1]
    if abs(dc) >= 2 and abs(dr) <= abs(dc) // 2:
        return "left" if dc < 0 else "right"
    if abs(dr) >= 2 and abs(dc) <= abs(dr) // 2:
        return "above" if dr < 0 else "below"
    return None


def _n_objects(cfg: TestbedConfig, rng: np.random.Generator, needed: int) -> int:
    """Scene size drawn from the config range, at least `needed`, at most the grid."""
    n = int(rng.integers(cfg.n_objects[0], cfg.n_objects[1] + 1))
    return min(max(n, needed), cfg.grid * cfg.grid)


def _digit_prob(cfg: TestbedConfig) -> float:
    """Share of distractors that are digit boxes (vision-stage option `digit_rich`)."""
    return 0.5 if cfg.digit_rich else 0.0


def _fill(cfg, rng, specs, n, ok=lambda s: True, colours=COLOUR_NAMES, shapes=SHAPES) -> list:
    """Add random distractor specs (accepted by `ok`) until there are `n`."""
    specs = list(specs)
    while len(specs) < n:
        s = scenes.random_spec(rng, _digit_prob(cfg), colours, shapes)
        if ok(s):
            specs.append(s)
    return specs


def _place_all(cfg, rng, specs, cells=None) -> list[SceneObject]:
    """Put specs into cells (random distinct ones unless given)."""
    cells = list(cells or [])
    cells += scenes.random_cells(rng, cfg.grid, len(specs) - len(cells), set(cells))
    return [scenes.place(rng, s, c) for s, c in zip(specs, cells)]


def _others(rng, pool, exclude, k: int) -> list[str]:
    """k distinct words from `pool` that are not in `exclude`."""
    rest = [w for w in pool if w not in exclude]
    return [rest[i] for i in rng.permutation(len(rest))[:k]]


def _attr(cfg, rng) -> dict:
    """What colour is the <shape>? Exactly one object of that shape (digit boxes are squares)."""
    shape, colour = SHAPES[rng.integers(4)], COLOUR_NAMES[rng.integers(6)]
    target = ("shape", shape, colour, None)
    ok = lambda s: s[1] != shape  # noqa: E731  (digit boxes count as squares)
    objs = _place_all(cfg, rng, _fill(cfg, rng, [target], _n_objects(cfg, rng, 1), ok))
    t = objs[0]
    facts = dict(colour=colour, shape=shape, row=t.cell[0], col=t.cell[1])
    return dict(objects=objs, evidence=[t], question=f"What colour is the {shape}?",
                answer=colour, distractors=_others(rng, COLOUR_NAMES, [colour], 3),
                keywords=[shape], caption=f"the {shape} is {colour}", caption_word=colour,
                facts=facts)


def _relpos_cells(cfg, rng, rel: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two cells whose clear-cut relation is `rel`."""
    g = cfg.grid
    cells = [(r, c) for r in range(g) for c in range(g)]
    while True:
        a = cells[rng.integers(len(cells))]
        bs = [b for b in cells if relation(a, b) == rel]
        if bs:
            return a, bs[rng.integers(len(bs))]


def _relpos(cfg, rng) -> dict:
    """Where is A relative to B? Both colours unique in the scene, relation clear-cut."""
    c1, c2 = _others(rng, COLOUR_NAMES, [], 2)
    s1, s2 = SHAPES[rng.integers(4)], SHAPES[rng.integers(4)]
    rel = RELATIONS[rng.integers(4)]
    rest = tuple(c for c in COLOUR_NAMES if c not in (c1, c2))  # the two colours stay unique
    specs = _fill(cfg, rng, [("shape", s1, c1, None), ("shape", s2, c2, None)],
                  _n_objects(cfg, rng, 2), colours=rest)
    objs = _place_all(cfg, rng, specs, _relpos_cells(cfg, rng, rel))
    a, b = objs[0], objs[1]
    phrase = {"left": "left of", "right": "right of", "above": "above", "below": "below"}[rel]
    facts = dict(colour=c1, shape=s1, row=a.cell[0], col=a.cell[1], relation=rel)
    return dict(objects=objs, evidence=[a, b],
                question=f"Where is the {a.label} relative to the {b.label}?", answer=rel,
                distractors=[r for r in RELATIONS if r != rel], keywords=[c1, c2],
                caption=f"the {a.label} is {phrase} the {b.label}", caption_word=rel, facts=facts)


def _count(cfg, rng) -> dict:
    """How many <colour> objects? The count (0-7) is drawn first, so answers are balanced."""
    colour = COLOUR_NAMES[rng.integers(6)]
    k = int(rng.integers(0, min(MAX_COUNT, cfg.grid * cfg.grid) + 1))
    specs = [scenes.random_spec(rng, _digit_prob(cfg), (colour,)) for _ in range(k)]
    rest = tuple(c for c in COLOUR_NAMES if c != colour)
    objs = _place_all(cfg, rng, _fill(cfg, rng, specs, _n_objects(cfg, rng, k), colours=rest))
    word = NUMBER_WORDS[k]
    noun = "object" if k == 1 else "objects"
    caption = f"there {'is' if k == 1 else 'are'} {word} {colour} {noun}"
    return dict(objects=objs, evidence=objs[:k], question=f"How many {colour} objects are there?",
                answer=word, distractors=_others(rng, NUMBER_WORDS[:MAX_COUNT + 1], [word], 3),
                keywords=[colour], caption=caption, caption_word=word,
                facts=dict(colour=colour, count=k))


def _glyph(cfg, rng) -> dict:
    """Which digit is inside the <colour> square? 2-4 digit boxes with distinct colours."""
    m = min(int(rng.integers(2, 5)), cfg.grid * cfg.grid)
    colours = _others(rng, COLOUR_NAMES, [], m)
    digits = [int(d) for d in rng.permutation(10)[:m]]
    boxes = [("digit", "square", c, d) for c, d in zip(colours, digits)]
    ok = lambda s: not (s[1] == "square" and s[2] == colours[0])  # noqa: E731  the box stays unique
    objs = _place_all(cfg, rng, _fill(cfg, rng, boxes, _n_objects(cfg, rng, m), ok))
    t, word = objs[0], NUMBER_WORDS[digits[0]]
    shown = [NUMBER_WORDS[d] for d in digits[1:]]  # the other boxes' digits are the first decoys
    decoys = (shown + _others(rng, NUMBER_WORDS, [word] + shown, 3))[:3]
    facts = dict(colour=t.colour, shape="square", row=t.cell[0], col=t.cell[1], glyph=digits[0])
    return dict(objects=objs, evidence=[t], question=f"Which digit is inside the {t.colour} square?",
                answer=word, distractors=decoys, keywords=[t.colour],
                caption=f"the {t.colour} square holds the digit {word}", caption_word=word,
                facts=facts)


_FAMILY_FNS = {"attr": _attr, "relpos": _relpos, "count": _count, "glyph": _glyph}
FACT_KEYS = ("colour", "shape", "row", "col", "count", "glyph", "relation")


def crop_box(bboxes: list, image_size: int, pad: int = CROP_PAD) -> list[int]:
    """Square box around the union of `bboxes` plus `pad`, at least one cell, kept inside."""
    if not bboxes:
        return [0, 0, image_size, image_size]
    b = np.asarray(bboxes)
    x0, y0, x1, y1 = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
    side = int(max(x1 - x0, y1 - y0, CELL - 2 * pad) + 2 * pad)
    if side >= image_size:
        return [0, 0, image_size, image_size]
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    left = int(np.clip(cx - side // 2, 0, image_size - side))
    top = int(np.clip(cy - side // 2, 0, image_size - side))
    return [left, top, left + side, top + side]


def make_item(config: TestbedConfig, split: str, family: str, index: int) -> Item:
    """Draw one item (with image and crop); a pure function of (seed, split, family, index)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; known: {', '.join(FAMILIES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if not _is_int(index) or index < 0:
        raise ValueError(f"item index must be an integer >= 0, got {index!r}")
    rng = item_rng(config.seed, split, family, index)
    d = _FAMILY_FNS[family](config, rng)
    words = [d["answer"]] + list(d["distractors"])
    options = [words[i] for i in rng.permutation(4)]
    objs = sorted(d["objects"], key=lambda o: o.cell)
    facts = {k: d["facts"].get(k) for k in FACT_KEYS}
    bboxes = [list(o.bbox) for o in d["evidence"]]
    box = crop_box(bboxes, config.image_size)
    image = scenes.render(objs, config.image_size)
    crop = image.crop(tuple(box)).resize((config.crop_size, config.crop_size), Image.BICUBIC)
    return Item(id=f"{split}-{family}-{index:05d}", split=split, family=family,
                question=d["question"], options=options, answer=LETTERS[options.index(d["answer"])],
                answer_word=d["answer"], keywords=list(d["keywords"]),
                objects=[o.to_dict() for o in objs], evidence_bboxes=bboxes,
                evidence_cells=[list(o.cell) for o in d["evidence"]], crop_box=box,
                caption=d["caption"], caption_answer_word=d["caption_word"], facts=facts,
                image=image, crop=crop)


def item_keys(config: TestbedConfig, split: str) -> list[tuple[str, int]]:
    """(family, index) of every item in a split, in dataset order."""
    return [(f, i) for f, n in config.family_counts(split).items() for i in range(n)]


def make_scene(config: TestbedConfig, index: int) -> tuple[list[SceneObject], Image.Image]:
    """A question-free scene for the dense vision stage (digit-rich if the config says so)."""
    rng = np.random.default_rng([config.seed, _SPLIT_CODE["vision"], index])
    specs = _fill(config, rng, [], _n_objects(config, rng, 1))
    objs = sorted(_place_all(config, rng, specs), key=lambda o: o.cell)
    return objs, scenes.render(objs, config.image_size)


def cell_labels(item_or_objects, grid: int) -> dict[str, np.ndarray]:
    """Per-cell targets (row-major, grid*grid): colour, shape, digit ids (-1 = none), row, col."""
    objs = item_or_objects.scene_objects() if isinstance(item_or_objects, Item) else item_or_objects
    n = grid * grid
    out = {k: np.full(n, -1, dtype=np.int64) for k in ("colour", "shape", "digit")}
    out["row"], out["col"] = np.arange(n) // grid, np.arange(n) % grid
    for o in objs:
        o = SceneObject.from_dict(o) if isinstance(o, dict) else o
        i = o.cell[0] * grid + o.cell[1]
        out["colour"][i] = COLOUR_NAMES.index(o.colour)
        out["shape"][i] = SHAPES.index(o.shape)
        out["digit"][i] = -1 if o.digit is None else o.digit
    return out


def evidence_fraction(item: Item, image_size: int | None = None) -> float:
    """Share of the image covered by the evidence boxes (how small the target is)."""
    size = image_size or _image_size(item)
    area = sum((b[2] - b[0]) * (b[3] - b[1]) for b in item.evidence_bboxes)
    return area / float(size * size)


def items_frame(items, image_size: int | None = None) -> pd.DataFrame:
    """One row per item: split, family, answer, scene size and how small the evidence is."""
    if isinstance(items, Testbed):
        image_size = image_size or items.config.image_size
        items = items.items()
    rows = [dict(id=it.id, split=it.split, family=it.family, answer=it.answer,
                 answer_word=it.answer_word, n_objects=len(it.objects),
                 n_evidence=len(it.evidence_bboxes),
                 evidence_fraction=evidence_fraction(it, image_size),
                 crop_side_px=it.crop_box[2] - it.crop_box[0]) for it in items]
    return pd.DataFrame(rows)


def _image_size(item: Item) -> int:
    """Side of the item's attached image."""
    if item.image is not None:
        return item.image.size[0]
    raise ValueError(f"item {item.id}: no image attached; pass image_size")


# ---------------------------------------------------------------- datasets on disk

FORMAT_VERSION = 1
GENERATOR_VERSION = "1"  # bump whenever drawing or item logic changes what is generated
log = logging.getLogger(__name__)


class TestbedFormatError(ValueError):
    """A dataset folder that is half-written or malformed; the message names the file."""

    __test__ = False


class Testbed:
    """A generated dataset on disk: items in memory, images loaded lazily."""

    __test__ = False

    def __init__(self, root: Path, manifest: dict, items: list[Item]) -> None:
        self.root, self.manifest, self._items = Path(root), manifest, items
        self.config = TestbedConfig.from_dict(manifest["config"])

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Testbed({len(self)} items, {self.config})"

    def items(self, split: str | None = None, family: str | None = None) -> list[Item]:
        """Items of one split and/or family (all when None), in dataset order."""
        return [it for it in self._items
                if (split is None or it.split == split) and (family is None or it.family == family)]

    def image_path(self, item: Item) -> Path:
        """Where the scene PNG of `item` is."""
        return self.root / "images" / f"{item.id}.png"

    def crop_path(self, item: Item) -> Path:
        """Where the crop PNG of `item` is."""
        return self.root / "crops" / f"{item.id}.png"

    def image(self, item: Item) -> Image.Image:
        """The scene of `item` (RGB)."""
        return _open_png(self.image_path(item))

    def crop(self, item: Item) -> Image.Image:
        """The zoomed evidence crop of `item` (RGB)."""
        return _open_png(self.crop_path(item))

    def with_images(self, item: Item) -> Item:
        """A copy of `item` with `image` and `crop` attached."""
        return dataclasses.replace(item, image=self.image(item), crop=self.crop(item))


def _open_png(path: Path) -> Image.Image:
    """Decode a PNG fully, or fail with a message naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise TestbedFormatError(f"{path}: unreadable or corrupt PNG ({exc}); "
                                 "regenerate the testbed (latentmed.testbed.ensure)") from exc


def _remove(path: Path) -> None:
    """Delete a folder or a file if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` by the finished `tmp` folder with renames only."""
    old = out_dir.with_name(out_dir.name + ".old")
    _remove(old)
    if out_dir.exists() or out_dir.is_symlink():
        out_dir.rename(old)
    tmp.rename(out_dir)
    _remove(old)


def generate(config: TestbedConfig, out_dir, progress: bool = True) -> Testbed:
    """Write the dataset into `<out_dir>.partial/`, manifest last, then rename it to `out_dir`."""
    out_dir = Path(out_dir)
    ensure_writable(out_dir.parent)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    _remove(tmp)
    for sub in ("images", "crops"):
        (tmp / sub).mkdir(parents=True)
    keys = [(s, f, i) for s in SPLITS for f, i in item_keys(config, s)]
    sizes, counts = {}, {s: config.family_counts(s) for s in SPLITS}
    with open(tmp / "items.jsonl", "w", encoding="utf-8") as fh:
        for split, family, index in tqdm(keys, desc="testbed", disable=not progress):
            item = make_item(config, split, family, index)
            for sub, img in (("images", item.image), ("crops", item.crop)):
                rel = f"{sub}/{item.id}.png"
                img.save(tmp / rel, format="PNG")
                sizes[rel] = (tmp / rel).stat().st_size
            fh.write(json.dumps(item.to_dict(), separators=(",", ":")) + "\n")
    (tmp / "files.json").write_text(json.dumps(sizes, indent=0, sort_keys=True))
    manifest = dict(format_version=FORMAT_VERSION, generator_version=GENERATOR_VERSION,
                    config=config.to_dict(), counts=counts, n_items=len(keys))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    _swap_in(tmp, out_dir)
    return load(out_dir)


def _read_json(path: Path, what: str):
    """Parse a JSON file or fail naming it."""
    if not path.is_file():
        raise TestbedFormatError(f"{path.parent} looks half-written (no {path.name}); regenerate it")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TestbedFormatError(f"{path}: invalid {what} ({exc}); regenerate the testbed") from exc


def _read_manifest(root: Path) -> dict:
    """The manifest, checked for the fields and version this code reads."""
    path = root / "manifest.json"
    m = _read_json(path, "manifest JSON")
    need = {"format_version", "generator_version", "config", "counts", "n_items"}
    if not isinstance(m, dict) or need - set(m):
        missing = sorted(need - set(m)) if isinstance(m, dict) else sorted(need)
        raise TestbedFormatError(f"{path}: invalid manifest, missing {', '.join(missing)}")
    if m["format_version"] != FORMAT_VERSION:
        raise TestbedFormatError(f"{path}: format version {m['format_version']!r}, this code "
                                 f"reads {FORMAT_VERSION}; regenerate the testbed")
    try:
        TestbedConfig.from_dict(m["config"])
    except (TypeError, ValueError) as exc:
        raise TestbedFormatError(f"{path}: invalid config ({exc})") from exc
    return m


def _read_items(path: Path) -> list[Item]:
    """Items from a JSONL file; a malformed line is reported with its number."""
    if not path.is_file():
        raise TestbedFormatError(f"{path.parent} looks half-written (no {path.name}); regenerate it")
    items = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                items.append(Item.from_dict(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise TestbedFormatError(f"{path} line {lineno}: malformed item ({exc}); "
                                         "the file looks half-written; regenerate it") from exc
    return items


def load(out_dir, verify: bool = False) -> Testbed:
    """Open a generated dataset, checking it is complete; `verify` also decodes every PNG."""
    root = Path(out_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"testbed folder {root} does not exist; "
                                "create it with latentmed.testbed.ensure(config, folder)")
    if not (root / "manifest.json").is_file():
        raise TestbedFormatError(f"{root} looks half-written (no manifest.json); regenerate it")
    manifest = _read_manifest(root)
    items = _read_items(root / "items.jsonl")
    if len(items) != manifest["n_items"]:
        raise TestbedFormatError(f"{root / 'items.jsonl'} has {len(items)} items but manifest.json "
                                 f"says {manifest['n_items']}; it looks half-written; regenerate it")
    sizes = _read_json(root / "files.json", "file list")
    for rel, size in sizes.items():
        path = root / rel
        if not path.is_file() or path.stat().st_size != size:
            state = "missing" if not path.is_file() else f"{path.stat().st_size} bytes, expected {size}"
            raise TestbedFormatError(f"{path}: {state}; the PNG is truncated or corrupt; regenerate it")
    tb = Testbed(root, manifest, items)
    if verify:
        for it in items:
            tb.image(it), tb.crop(it)
    return tb


def ensure(config: TestbedConfig, out_dir, progress: bool = True) -> Testbed:
    """The dataset at `out_dir` if it is complete and matches `config`, else a fresh one."""
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    try:
        tb = load(out_dir)
    except (FileNotFoundError, TestbedFormatError) as exc:
        log.info("generating testbed at %s: %s", out_dir, exc)
    else:
        same = tb.config == config and tb.manifest["generator_version"] == GENERATOR_VERSION
        if same and not partial.exists():
            return tb
        log.info("regenerating testbed at %s (config or generator changed, or leftover %s)",
                 out_dir, partial.name)
    return generate(config, out_dir, progress=progress)


# ---------------------------------------------------------------- the resolution argument

def _target(item: Item) -> SceneObject:
    """The object whose box is the item's (first) evidence box."""
    box = list(item.evidence_bboxes[0])
    return next(o for o in item.scene_objects() if list(o.bbox) == box)


def _candidates(item: Item) -> tuple[list[SceneObject], int]:
    """Every object the target could be, centred where it is: (what, size) pairs, and the truth.

    The reader knows where the target is and its colour (what retrieval would give a model)
    but not its size or identity: candidates are the 10 digit boxes (glyph) or the 4 shapes
    (attr) at every size the generator draws.
    """
    t = _target(item)
    low = scenes.MIN_DIGIT_SIZE if t.kind == "digit" else scenes.MIN_SIZE
    twice_cx, twice_cy = t.bbox[0] + t.bbox[2], t.bbox[1] + t.bbox[3]
    cands, truth = [], []
    for size in range(low, scenes.MAX_SIZE + 1):
        x0, y0 = (twice_cx - size) // 2, (twice_cy - size) // 2
        box = (x0, y0, x0 + size, y0 + size)
        if item.family == "glyph":
            cands += [dataclasses.replace(t, digit=d, bbox=box) for d in range(10)]
            truth += list(range(10))
        else:
            cands += [dataclasses.replace(t, shape=s, bbox=box) for s in SHAPES]
            truth += list(range(len(SHAPES)))
    return cands, truth, (t.digit if item.family == "glyph" else SHAPES.index(t.shape))


def _read_target(item: Item, image: Image.Image, factors) -> dict[int, bool]:
    """Nearest-template reading of the target's cell after each downscale factor: right or wrong."""
    cands, labels, truth = _candidates(item)
    size = image.size[0]
    box = scenes.cell_box(tuple(item.evidence_cells[0]))
    templates = np.stack([scenes.render_region([c], size, box) for c in cands])
    out = {}
    for f in factors:
        seen = scenes.region(scenes.degrade(image, f), box)
        dist = ((templates - seen[None]) ** 2).sum(axis=(1, 2, 3))
        out[f] = labels[int(np.argmin(dist))] == truth
    return out


def readability(items: list[Item], images=None, factors=(1, 2, 4, 8)) -> pd.DataFrame:
    """How well the target can be read after downscaling: glyph digits and attr shapes.

    The whole image is box-filtered down by each factor and bilinearly upscaled back, then the
    evidence box is matched against the clean renderings of every candidate (10 digit boxes of
    the target's colour, or its 4 shapes) at the same place. Returns one row per family and
    factor: accuracy, n, chance. Near 1 at factor 1; near chance at factor 4 (56 px) for glyph.
    """
    images = [it.image for it in items] if images is None else list(images)
    hits: dict[tuple[str, int], list[bool]] = {}
    for item, image in zip(items, images):
        if item.family not in ("glyph", "attr"):
            continue
        if image is None:
            raise ValueError(f"item {item.id}: no image; pass images or attach them")
        for f, ok in _read_target(item, image, factors).items():
            hits.setdefault((item.family, f), []).append(ok)
    rows = [dict(family=fam, factor=f, side_px=(images[0].size[0] // f), accuracy=float(np.mean(v)),
                 n=len(v), chance=1 / (10 if fam == "glyph" else 4))
            for (fam, f), v in sorted(hits.items())]
    return pd.DataFrame(rows, columns=["family", "factor", "side_px", "accuracy", "n", "chance"])
