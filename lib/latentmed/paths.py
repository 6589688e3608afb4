"""One place for paths and seeds: everything is relative to the repository root.

Each folder can be moved with an environment variable (LATENTMED_DATA, LATENTMED_RESULTS,
LATENTMED_MODELS), which is how tests and CI keep their files apart from the main build.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SEED = 0  # the project's default seed; every function that draws takes a `seed` argument
# The notebooks' CI copies (tests/notebooks) hold numbers to the third decimal, and the CPU's vector
# width changes the last bits of a sum: the tests and `latentmed nbval-refresh` pin MKL (its
# conditional numerical reproducibility), ATen's and oneDNN's kernels to their AVX2 code paths
# (checked equal to the default on an AVX2 AMD EPYC). An AVX-512 Intel Xeon still trains the tiny
# CI models to slightly different weights, so nbval compares numbers to one unit of their last
# printed digit (tests/nbval_tolerance.py). The main build keeps the fastest path.
REPRODUCIBLE_CPU = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_cpu_kernels() -> None:
    """Set `REPRODUCIBLE_CPU` in this process's environment (kept where already set); call it
    before torch runs anything: the processes it starts (notebook kernels) inherit it."""
    for k, v in REPRODUCIBLE_CPU.items():
        os.environ.setdefault(k, v)


def _dir(env: str, default: Path) -> Path:
    """`default`, or the folder the environment variable `env` names (an empty value is an error,
    not the current directory)."""
    value = os.environ.get(env)
    if value is None:
        return Path(default).resolve()
    if not value.strip():
        raise ValueError(f"environment variable {env} is set but empty; unset it or give a folder")
    return Path(value).expanduser().resolve()


def data_dir() -> Path:
    """Generated data (testbed, tokenizer); git-ignored, rebuilt by the main command."""
    return _dir("LATENTMED_DATA", ROOT / "data")


def results_dir() -> Path:
    """Tables and per-instance results written by notebooks and sweeps."""
    return _dir("LATENTMED_RESULTS", ROOT / "results")


def models_dir() -> Path:
    """Trained testbed checkpoints (safetensors + tokenizer + LatentSpec)."""
    return _dir("LATENTMED_MODELS", ROOT / "models")


def use(data=None, models=None, results=None) -> None:
    """Point the project's folders somewhere else for this process (a chapter's `data_dir`,
    `models_dir`, `results_dir` parameters: each the folder that holds testbed/, zoo/, study/)."""
    for env, value in (("LATENTMED_DATA", data), ("LATENTMED_MODELS", models), ("LATENTMED_RESULTS", results)):
        if value is not None:
            os.environ[env] = str(Path(value).resolve())


def ensure_writable(path: Path) -> Path:
    """Create `path` (a folder) or fail with a message that names it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"output folder {path} is not writable: {exc.strerror or exc}") from exc
    return path
