"""Drawing the testbed's scenes: small objects on a grid of 28-px cells over a tinted background.

One merged Qwen2.5-VL image token covers 28 x 28 px, so a scene of `image_size` px is a grid of
`image_size // 28` cells a side, and at most one object sits in a cell, jittered inside it so it
never crosses the cell border (objects straddling cells were measured to be unlearnable at this
model size, see `reference/training-feasibility.md`). A faint left-right (red) and top-bottom
(blue) tint lets a vision tower with only relative positions tell where a cell is.
Everything here is numpy + PIL and deterministic given the random generator passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

CELL = 28  # px covered by one merged image token of Qwen2.5-VL (14-px patches, 2 x 2 merge)
MIN_SIZE, MAX_SIZE = 14, 24  # object side in px
MIN_DIGIT_SIZE = 18  # a digit box must hold the 10 x 14 px glyph with a margin
BASE_GREY = 200  # background grey level
TINT = 48  # background tint range in levels (R grows with x, B grows with y)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (150, 50, 200),
    "orange": (245, 135, 0),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
KINDS: tuple[str, ...] = ("shape", "digit")
DARK_COLOURS = frozenset({"red", "blue", "purple"})  # digit glyphs drawn white on these

# 5 x 7 bitmap digits, one string per row, '#' = ink. Drawn scaled x2 (10 x 14 px).
DIGIT_FONT: dict[int, tuple[str, ...]] = {
    0: (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    1: ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    2: (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    3: ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    4: ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    5: ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    6: ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    7: ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    8: (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    9: (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
GLYPH_SCALE = 2


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: what it is, where it is (grid cell and px box, x1/y1 exclusive)."""

    kind: str  # "shape" or "digit"
    shape: str  # circle / square / triangle / star; digit boxes are "square"
    colour: str
    digit: int | None
    cell: tuple[int, int]  # (row, col)
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) px

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        # by hand: dataclasses.asdict deep-copies every field and was half of `make_item`'s time
        return dict(kind=self.kind, shape=self.shape, colour=self.colour, digit=self.digit, cell=list(self.cell),
                    bbox=list(self.bbox))

    @classmethod
    def from_dict(cls, d: dict) -> "SceneObject":
        """Inverse of `to_dict`."""
        return cls(d["kind"], d["shape"], d["colour"], d["digit"], tuple(d["cell"]), tuple(d["bbox"]))

    @property
    def label(self) -> str:
        """Short English name, e.g. 'red star' or 'red square' (digit boxes are squares)."""
        return f"{self.colour} {self.shape}"


def grid_size(image_size: int) -> int:
    """Cells per side: one per merged image token."""
    return image_size // CELL


def cell_box(cell: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of a grid cell."""
    r, c = cell
    return (c * CELL, r * CELL, (c + 1) * CELL, (r + 1) * CELL)


def place(rng: np.random.Generator, spec: tuple, cell: tuple[int, int]) -> SceneObject:
    """Give an object spec (kind, shape, colour, digit) a random size and position inside `cell`."""
    kind, shape, colour, digit = spec
    low = MIN_DIGIT_SIZE if kind == "digit" else MIN_SIZE
    size = int(rng.integers(low, MAX_SIZE + 1))
    # one px margin on each side so no pixel ever touches the neighbouring cell
    dx, dy = (int(v) for v in rng.integers(1, CELL - size, size=2))
    x0, y0, _, _ = cell_box(cell)
    bbox = (x0 + dx, y0 + dy, x0 + dx + size, y0 + dy + size)
    return SceneObject(kind, shape, colour, digit, (int(cell[0]), int(cell[1])), bbox)


@lru_cache(maxsize=8)
def background(image_size: int) -> np.ndarray:
    """Light grey base with a faint tint: red grows left->right, blue grows top->bottom.

    Cached and read-only: copy before drawing into it.
    """
    ramp = np.round(np.linspace(0, TINT, image_size)).astype(np.uint8)
    img = np.full((image_size, image_size, 3), BASE_GREY, dtype=np.uint8)
    img[:, :, 0] += ramp[None, :]
    img[:, :, 2] += ramp[:, None]
    img.flags.writeable = False
    return img


def _star(bbox: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    """Polygon of a five-pointed star filling `bbox`."""
    x0, y0, x1, y1 = bbox
    cx, cy, r = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, (x1 - x0 - 1) / 2
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = -np.pi / 2 + i * np.pi / 5
        pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
    return pts


def _draw_glyph(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    """Draw the 5x7 bitmap digit scaled x2, centred in its box."""
    x0, y0, x1, y1 = obj.bbox
    gw, gh = 5 * GLYPH_SCALE, 7 * GLYPH_SCALE
    ox, oy = x0 + (x1 - x0 - gw) // 2, y0 + (y1 - y0 - gh) // 2
    ink = (255, 255, 255) if obj.colour in DARK_COLOURS else (0, 0, 0)
    for r, row in enumerate(DIGIT_FONT[obj.digit]):
        for c, ch in enumerate(row):
            if ch == "#":
                px, py = ox + c * GLYPH_SCALE, oy + r * GLYPH_SCALE
                draw.rectangle((px, py, px + GLYPH_SCALE - 1, py + GLYPH_SCALE - 1), fill=ink)


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    """Draw one object inside its bbox (PIL boxes are inclusive, hence the -1)."""
    x0, y0, x1, y1 = obj.bbox
    box = (x0, y0, x1 - 1, y1 - 1)
    fill = COLOURS[obj.colour]
    if obj.kind == "digit" or obj.shape == "square":
        draw.rectangle(box, fill=fill)
    elif obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star(obj.bbox), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known: {', '.join(SHAPES)}")
    if obj.kind == "digit":
        _draw_glyph(draw, obj)


def render(objects: list[SceneObject], image_size: int) -> Image.Image:
    """The scene as an RGB PIL image."""
    img = Image.fromarray(background(image_size).copy())
    draw = ImageDraw.Draw(img)
    for obj in objects:
        draw_object(draw, obj)
    return img


def random_spec(rng: np.random.Generator, digit_prob: float = 0.0,
                colours: tuple[str, ...] = COLOUR_NAMES,
                shapes: tuple[str, ...] = SHAPES) -> tuple:
    """A random object spec (kind, shape, colour, digit) drawn from the allowed colours/shapes."""
    colour = colours[int(rng.integers(len(colours)))]
    if digit_prob > 0 and rng.random() < digit_prob:
        return ("digit", "square", colour, int(rng.integers(10)))
    return ("shape", shapes[int(rng.integers(len(shapes)))], colour, None)


def random_cells(rng: np.random.Generator, grid: int, n: int,
                 taken: set[tuple[int, int]] = frozenset()) -> list[tuple[int, int]]:
    """`n` distinct free cells in random order."""
    free = [(r, c) for r in range(grid) for c in range(grid) if (r, c) not in taken]
    if n > len(free):
        raise ValueError(f"cannot place {n} objects in {len(free)} free cells")
    idx = rng.permutation(len(free))[:n]
    return [free[i] for i in idx]


def degrade(image: Image.Image, factor: int) -> Image.Image:
    """What a low-resolution viewer sees: box-filter down by `factor`, bilinear back up."""
    if factor == 1:
        return image
    w, h = image.size
    small = image.resize((max(1, w // factor), max(1, h // factor)), Image.BOX)
    return small.resize((w, h), Image.BILINEAR)


def region(image: Image.Image, bbox) -> np.ndarray:
    """Pixels of `bbox` (x1/y1 exclusive) as a float array."""
    x0, y0, x1, y1 = (int(v) for v in bbox)
    return np.asarray(image, dtype=np.float32)[y0:y1, x0:x1]


def render_region(objects: list[SceneObject], image_size: int, box) -> np.ndarray:
    """Pixels of `box` of the scene holding `objects` (faster than rendering the whole scene)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    img = Image.fromarray(background(image_size)[y0:y1, x0:x1].copy())
    draw = ImageDraw.Draw(img)
    for o in objects:
        b = o.bbox
        draw_object(draw, replace(o, bbox=(b[0] - x0, b[1] - y0, b[2] - x0, b[3] - y0)))
    return np.asarray(img, dtype=np.float32)
