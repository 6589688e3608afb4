"""Files the project writes and reads: atomic writes, hashes, and safetensors with clear errors.

Every file is written to a temporary name and renamed into place, so a kill leaves either the
old file or the new one, never half of one. Reading a damaged file raises an error that names
it. Folders the project creates carry a marker file; the project deletes a folder only when the
marker proves it wrote it (`remove_owned`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MARKER = ".latentmed"  # written into every folder the project creates and may later replace


class DamagedFileError(ValueError):
    """A file the project cannot read: truncated, corrupt or of the wrong kind (names the file)."""


def _tmp_for(path: Path) -> Path:
    """The temporary file an atomic write renames onto `path`: named per process, so processes
    writing one path at once (the tower's disk memo in parallel chapters) never share one."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    tmp = _tmp_for(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False))


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """Save tensors as safetensors through a temporary file and a rename."""
    path = Path(path)
    tmp = _tmp_for(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_tensors(path: str | Path, what: str = "tensors") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or foreign file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing ({what})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DamagedFileError(f"{path}: unreadable safetensors file, truncated or corrupt ({exc}); "
                               f"delete it and rebuild the {what}") from exc


def read_json(path: str | Path, what: str = "JSON file") -> dict | list:
    """Parse a JSON file; a missing or malformed one is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedFileError(f"{path}: invalid {what} ({exc})") from exc


def file_hash(path: str | Path, n: int = 16) -> str:
    """sha256 of a file's bytes (first `n` hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


def settings_hash(settings) -> str:
    """Stable hash of a JSON-able settings object (what decides whether to redo a step)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def state_hash(module: torch.nn.Module) -> str:
    """Hash of a module's weights (names and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of named tensors (names, shapes and bytes), e.g. to bind a sidecar to its record."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode() + str(tuple(t.shape)).encode() + t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def mark_owned(folder: str | Path, kind: str) -> Path:
    """Create `folder` and mark it as written by the project (`kind` says what it holds)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(kind)
    return folder


def is_owned(folder: str | Path, kind: str | None = None) -> bool:
    m = Path(folder) / MARKER
    return m.is_file() and (kind is None or m.read_text().strip() == kind)


def remove_owned(folder: str | Path, kind: str | None = None) -> None:
    """Delete `folder` only if the project's marker proves it wrote it; otherwise refuse."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir() or not is_owned(folder, kind):
        what = f"a {kind} folder" if kind else "a folder"
        raise FileExistsError(f"{folder}: exists but is not {what} written by latentmed (no {MARKER} marker); "
                              "refusing to delete it: move it away or choose another folder")
    shutil.rmtree(folder)


def replace_folder(new: str | Path, folder: str | Path, kind: str) -> Path:
    """Put the finished folder `new` at `folder` with renames only; an existing `folder` must be
    the project's own (`remove_owned`). A kill leaves the old folder, the new one, or both."""
    new, folder = Path(new), Path(folder)
    old = folder.with_name(folder.name + ".old")
    if old.exists():
        remove_owned(old, kind)
    if folder.exists() or folder.is_symlink():
        if not is_owned(folder, kind):
            remove_owned(folder, kind)  # raises: not ours
        folder.rename(old)
    new.rename(folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def set_threads() -> None:
    """LATENTMED_THREADS, when set, fixes torch's thread count (else torch's default)."""
    if os.environ.get("LATENTMED_THREADS"):
        torch.set_num_threads(int(os.environ["LATENTMED_THREADS"]))
