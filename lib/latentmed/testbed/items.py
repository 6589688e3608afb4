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
index), so training can also draw items on the fly. Datasets on disk live in `dataset`
(`generate`, `load`, `ensure`); the resolution argument in `resolution`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image

from .scenes import (
    CELL,
    COLOUR_NAMES,
    SHAPES,
    SceneObject,
    grid_size,
    place,
    random_cells,
    random_spec,
    render,
)

FAMILIES: tuple[str, ...] = ("attr", "relpos", "count", "glyph")
SPLITS: tuple[str, ...] = ("train", "val", "test")
LETTERS = "ABCD"
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven",
                                 "eight", "nine")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
# Every word an option, key word or answer can be: the testbed's tokenizer makes each one token.
VOCABULARY: tuple[str, ...] = (*COLOUR_NAMES, *SHAPES, *NUMBER_WORDS, *RELATIONS)
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
        for name in ("n_objects", "families"):
            v = getattr(self, name)
            if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
                _fail(name, f"must be a list or tuple, got {type(v).__name__} {v!r}")
            object.__setattr__(self, name, tuple(v))
        _validate(self)

    @property
    def grid(self) -> int:
        """Cells per side (one per merged image token)."""
        return grid_size(self.image_size)

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
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        if not isinstance(d, dict):
            raise TypeError(f"TestbedConfig: expected a dict of settings, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"TestbedConfig: unknown field(s) {', '.join(unknown)}")
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
        if not isinstance(d, dict):
            raise TypeError(f"an item must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"image", "crop"}
        missing = names - set(d)
        if missing:
            raise KeyError(f"item is missing fields: {', '.join(sorted(missing))}")
        item = cls(**{k: d[k] for k in names})
        _check_item(item)
        return item

    def scene_objects(self) -> list[SceneObject]:
        """The objects as `SceneObject`s."""
        return [SceneObject.from_dict(o) for o in self.objects]

    @property
    def answer_index(self) -> int:
        """0-3 index of the right option."""
        return LETTERS.index(self.answer)


def _check_item(it: Item) -> None:
    """The fields every reader relies on: split, family, four distinct options, the answer's letter
    and word agreeing (a ValueError naming the item and the field)."""
    def bad(name: str, msg: str):
        raise ValueError(f"item {it.id!r}: {name} {msg}")

    if not isinstance(it.id, str) or not it.id:
        bad("id", f"must be a non-empty string, got {it.id!r}")
    if it.split not in SPLITS:
        bad("split", f"{it.split!r} is not one of {', '.join(SPLITS)}")
    if it.family not in FAMILIES:
        bad("family", f"{it.family!r} is not one of {', '.join(FAMILIES)}")
    if not isinstance(it.question, str) or not it.question.strip():
        bad("question", "is empty")
    opts = it.options
    if not isinstance(opts, list) or len(opts) != len(LETTERS) or len(set(map(str, opts))) != len(opts) \
            or not all(isinstance(o, str) and o for o in opts):
        bad("options", f"must be {len(LETTERS)} distinct non-empty strings, got {opts!r}")
    if not isinstance(it.answer, str) or len(it.answer) != 1 or it.answer not in LETTERS:
        bad("answer", f"{it.answer!r} is not one of the letters {', '.join(LETTERS)}")
    if opts[LETTERS.index(it.answer)] != it.answer_word:
        bad("answer_word", f"{it.answer_word!r} is not option {it.answer} ({opts[LETTERS.index(it.answer)]!r})")


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
        s = random_spec(rng, _digit_prob(cfg), colours, shapes)
        if ok(s):
            specs.append(s)
    return specs


def _place_all(cfg, rng, specs, cells=None) -> list[SceneObject]:
    """Put specs into cells (random distinct ones unless given)."""
    cells = list(cells or [])
    cells += random_cells(rng, cfg.grid, len(specs) - len(cells), set(cells))
    return [place(rng, s, c) for s, c in zip(specs, cells)]


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
    specs = [random_spec(rng, _digit_prob(cfg), (colour,)) for _ in range(k)]
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


def make_item(config: TestbedConfig, split: str, family: str, index: int, images: bool = True) -> Item:
    """Draw one item (with image and crop unless `images` is False: the same item without its
    pixels, for callers that have its tower tokens); a pure function of (seed, split, family, index)."""
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
    image = crop = None
    if images:  # drawing uses no randomness: the item is the same either way
        image = render(objs, config.image_size)
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
    return objs, render(objs, config.image_size)


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


def items_frame(items: list[Item], image_size: int | None = None) -> pd.DataFrame:
    """One row per item: split, family, answer, scene size and how small the evidence is."""
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
