"""The book: which notebooks are chapters, how they run (papermill) and how the HTML is built.

Every chapter is a parameterized notebook in notebooks/. The main build executes it with its
default parameters into book/chapters/ (skipped when notebook, parameters, library code and
inputs are unchanged); the CI copy in tests/notebooks/ is executed with small parameters and
checked by nbval. Jupyter Book 1.x renders the stored outputs (it never re-executes).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .paths import ROOT, data_dir, models_dir

NOTEBOOKS = ROOT / "notebooks"
CHAPTERS_OUT = ROOT / "book" / "chapters"
NBVAL_OUT = ROOT / "tests" / "notebooks"


@dataclass(frozen=True)
class Chapter:
    name: str  # notebooks/<name>.ipynb
    ci_params: dict = field(default_factory=dict)  # small run checked by nbval in CI
    inputs: tuple[str, ...] = ()  # files (relative to data/ or models/) whose change re-runs it

    @property
    def source(self) -> Path:
        return NOTEBOOKS / f"{self.name}.ipynb"


# Testbed sizes of the small "ci" profile (nbval copies and `latentmed build --profile ci`).
CI_TESTBED = dict(n_train=40, n_val=8, n_test=40)

CHAPTERS = [
    Chapter("01_testbed", ci_params=dict(CI_TESTBED, n_examples=2),
            inputs=("data:testbed/manifest.json",)),
    Chapter("02_zoo", ci_params=dict(small_run=True),
            inputs=("data:testbed/manifest.json", "models:zoo/base/zoo.json")),
]


def available() -> list[Chapter]:
    """Chapters whose notebook exists (later issues add more)."""
    return [c for c in CHAPTERS if c.source.exists()]


def _lib_hash() -> str:
    h = hashlib.sha256()
    for path in sorted((ROOT / "lib" / "latentmed").rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    return h.hexdigest()


def _input_hash(chapter: Chapter) -> str:
    h = hashlib.sha256()
    for spec in chapter.inputs:
        kind, rel = spec.split(":", 1)
        path = (data_dir() if kind == "data" else models_dir()) / rel
        h.update(rel.encode() + (path.read_bytes() if path.exists() else b"missing"))
    return h.hexdigest()


def stamp(chapter: Chapter, params: dict) -> str:
    """What the executed notebook depends on: notebook, parameters, library, inputs."""
    h = hashlib.sha256(chapter.source.read_bytes())
    h.update(json.dumps(params, sort_keys=True).encode())
    h.update(_lib_hash().encode() + _input_hash(chapter).encode())
    return h.hexdigest()


def execute(chapter: Chapter, out_dir: Path, params: dict | None = None, force: bool = False) -> Path:
    """Run one chapter with papermill into `out_dir`, unless an up-to-date copy is there."""
    import papermill as pm

    params = dict(params or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / chapter.source.name
    stamp_file = out_dir / f".{chapter.name}.stamp"
    want = stamp(chapter, params)
    if not force and out.exists() and stamp_file.exists() and stamp_file.read_text() == want:
        print(f"[book] {chapter.name}: up to date")
        return out
    print(f"[book] executing {chapter.name} {params or ''}")
    pm.execute_notebook(str(chapter.source), str(out), parameters=params, cwd=str(NOTEBOOKS),
                        kernel_name="python3", progress_bar=False, log_output=False)
    stamp_file.write_text(stamp(chapter, params))
    return out


def execute_all(force: bool = False, profile: str = "default") -> list[Path]:
    params = (lambda c: c.ci_params) if profile == "ci" else (lambda c: {})
    return [execute(c, CHAPTERS_OUT, params(c), force) for c in available()]


def refresh_nbval() -> list[Path]:
    """Re-execute the CI copies that nbval checks (commit the result)."""
    return [execute(c, NBVAL_OUT, c.ci_params, force=True) for c in available()]


def build_html(force: bool = False) -> Path:
    """Build the Jupyter Book (1.x, offline) from the executed chapters into _build/html."""
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(ROOT), "-W", "-n", "--keep-going"]
    if force:
        cmd.append("--all")
    print("[book] building HTML")
    subprocess.run(cmd, check=True, cwd=ROOT)
    return ROOT / "_build" / "html" / "index.html"
