"""Shared fixtures: one tiny random checkpoint per session, its tokenizer, a few images.

The checkpoint is the real architecture at toy size (tiny.py, size "test"), saved in the real
folder layout, so every engine test goes through `LatentReasoner.from_pretrained`.
"""

from __future__ import annotations

import os
import shutil

# the tower's disk memo (engine.memo.DiskMemo) would write under the repository's results/ and
# carry outputs from one test into another: off, except in the tests that set it up
os.environ.setdefault("LATENTMED_TOWER_CACHE_MB", "0")

from latentmed.paths import pin_cpu_kernels

pin_cpu_kernels()  # before torch computes: the nbval kernels inherit it (paths.REPRODUCIBLE_CPU)

import nbval_tolerance  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from latentmed.engine.reasoner import LatentReasoner
from latentmed.engine.tiny import make_tiny_checkpoint
from latentmed.engine.tokenizer import load_tokenizer
from latentmed.testbed import VOCABULARY
from PIL import Image, ImageDraw

nbval_tolerance.install()  # notebook numbers compared to one unit of their last printed digit

OPTIONS = ["red", "green", "blue", "yellow"]

# Tiny models run fastest on one thread, and a shared 2-core machine makes more threads spin
# against other jobs (measured: 40x slower under load). LATENTMED_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("LATENTMED_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """Folder of a random tiny Qwen2.5-VL checkpoint (safetensors + tokenizer + processor)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", size="test", seed=0, words=VOCABULARY)


@pytest.fixture
def ckpt_copy(ckpt, tmp_path):
    """A private copy of the checkpoint folder that a test may damage."""
    return shutil.copytree(ckpt, tmp_path / "ckpt")


@pytest.fixture(scope="session")
def tok(ckpt):
    return load_tokenizer(ckpt)


@pytest.fixture(scope="session")
def load(ckpt):
    """load(method, **spec_overrides) -> LatentReasoner, cached per (method, overrides)."""
    cache: dict = {}

    def _load(method: str, **overrides) -> LatentReasoner:
        key = (method, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = LatentReasoner.from_pretrained(ckpt, method=method, **overrides)
        return cache[key]

    return _load


@pytest.fixture
def fresh(ckpt):
    """A reasoner loaded for this test only (safe to edit its weights)."""
    return lambda method, **kw: LatentReasoner.from_pretrained(ckpt, method=method, **kw)


def scene(colour=(220, 30, 30), size: int = 112, seed: int = 0) -> Image.Image:
    """A grey image with one coloured square; `seed` moves the square."""
    im = Image.new("RGB", (size, size), (200, 200, 200))
    x = 10 + (seed * 37) % (size - 40)
    ImageDraw.Draw(im).rectangle([x, x, x + 24, x + 24], fill=colour)
    return im


@pytest.fixture(scope="session")
def images():
    return [scene((220, 30, 30), seed=0), scene((30, 70, 220), seed=1), scene((30, 160, 50), seed=2)]


@pytest.fixture
def tiny_chapter(tmp_path, monkeypatch):
    """A one-parameter chapter `tiny` (prints n * 2) in a temporary notebooks folder."""
    import nbformat
    from latentmed import book

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("n = 1")
    params.metadata["tags"] = ["parameters"]
    nb.metadata.update(kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
                       language_info={"name": "python"})
    nb.cells = [nbformat.v4.new_markdown_cell("# Tiny"), params, nbformat.v4.new_code_cell("print(n * 2)")]
    (tmp_path / "tiny.ipynb").write_text(nbformat.writes(nb))
    monkeypatch.setattr(book, "NOTEBOOKS", tmp_path)
    return book.Chapter("tiny")
