"""The results store: one tidy row per (model, item, condition), written as it is computed.

Every chapter of the study (and the real track) writes its measurements here. A store is a
folder; each *run* of it is identified by a key that holds the model's checkpoint hash and the
code's parameters, so a changed model or a changed setting is recomputed and an unchanged one is
reused. Rows are appended to `<run>/rows.jsonl` one whole line at a time (flushed and synced), a
line cut by a kill is dropped when the run is reopened, and a row whose (item, condition) is
already there is never written twice: a killed notebook resumes where it stopped and neither
loses nor duplicates a row. Tensors (latents, hidden states) go to a safetensors sidecar per
batch, written before the rows that point to it, and are read back by row. Long lists of floats
in a row (an intervention's vectors) are written as packed arrays and read back as the same lists.

    store = ResultsStore(results_dir() / "study")
    run = store.run("monet-style", model_hash, params={"chapter": 4, "n": 200})
    todo = run.missing([(item_id, condition) for ...])
    run.add(rows, tensors={row_index: {"z_in": z}})
    df = store.frame()                       # every current row, as a pandas frame
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .files import DamagedFileError, atomic_save_tensors, atomic_write_json, load_tensors, settings_hash

ROWS = "rows.jsonl"
# A list of at least this many floats (an intervention's vectors: another item's K latents, the
# mean latent) is written as one packed array: JSON's decimals cost 0.6 ms to write and 0.3 ms to
# read for a row of 1280 floats (a chapter writes ~30 000 such rows and reads them back).
PACK_MIN = 64
RUN = "run.json"
KEY_FIELDS = ("item", "condition")


class Run:
    """The rows of one (model, model hash, parameters) run in a store."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = Path(folder), meta
        self.path = self.folder / ROWS
        self._keys: set[tuple] | None = None
        self._whole = False  # the file is known to end with a complete line (repaired or written here)

    @property
    def key(self) -> str:
        return self.meta["key"]

    def _repair(self) -> None:
        """Drop a last line cut by a kill (one without its newline); complete lines are kept and
        checked when read (`rows`). Done once per opened run: later appends of this object write
        whole lines (re-reading the file before every append made a chapter's writes quadratic)."""
        if self._whole:
            return
        if self.path.exists():
            data = self.path.read_bytes()
            keep = data if not data or data.endswith(b"\n") else data[:data.rfind(b"\n") + 1]
            if keep != data:
                with open(self.path, "r+b") as f:
                    f.truncate(len(keep))
        self._whole = True

    def rows(self) -> list[dict]:
        """Every complete row of this run (a malformed line inside the file is an error naming it)."""
        self._repair()
        if not self.path.exists():
            return []
        out = []
        with open(self.path) as f:
            for n, line in enumerate(f, 1):
                try:
                    out.append(parse_row(line))
                except ValueError as exc:  # json's decode errors and a bad packed array
                    raise DamagedFileError(f"{self.path} line {n}: not a JSON row ({exc})") from exc
        return out

    def keys(self) -> set[tuple]:
        if self._keys is None:
            self._keys = {tuple(r[k] for k in KEY_FIELDS) for r in self.rows()}
        return self._keys

    def missing(self, keys) -> list[tuple]:
        """The (item, condition) keys not yet stored, in the order given."""
        have = self.keys()
        return [k for k in keys if tuple(k) not in have]

    def add(self, rows: list[dict], tensors: dict[int, dict[str, torch.Tensor]] | None = None) -> int:
        """Append rows (each with "item" and "condition"); rows already stored are skipped.
        `tensors` maps a row's index in `rows` to named tensors for the sidecar. Returns the
        number of rows written."""
        have = self.keys()
        new, seen = [], set()
        for i, r in enumerate(rows):
            missing = [k for k in KEY_FIELDS if k not in r]
            if missing:
                raise ValueError(f"{self.path}: a row needs {', '.join(missing)}; got {sorted(r)}")
            k = tuple(r[f] for f in KEY_FIELDS)
            if k in have or k in seen:
                continue
            seen.add(k)
            new.append((i, dict(r)))
        if not new:
            return 0
        if tensors:
            flat = {f"{j}/{name}": t for j, (i, _) in enumerate(new) for name, t in (tensors.get(i) or {}).items()}
            if flat:
                side = f"t-{settings_hash(sorted((r['item'], r['condition']) for _, r in new))}.safetensors"
                atomic_save_tensors(flat, self.folder / side)
                for j, (i, r) in enumerate(new):
                    if tensors.get(i):
                        r["tensors"] = f"{side}#{j}"
        self._repair()
        self._whole = False  # until the append below has completed
        with open(self.path, "a") as f:
            for _, r in new:
                f.write(json.dumps(_pack(r), separators=(",", ":"), default=_plain) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._whole = True
        have.update(tuple(r[f] for f in KEY_FIELDS) for _, r in new)
        return len(new)

    def copy_from(self, other: "Run", keys) -> int:
        """Append `other`'s rows of the (item, condition) `keys` with their tensors (rows this run
        has are skipped); for a run whose rows another run computed the same way. Returns the
        number written."""
        want = {tuple(k) for k in keys}
        rows = [r for r in other.rows() if tuple(r[f] for f in KEY_FIELDS) in want]
        tensors = other.tensors_many(rows)
        return self.add([{k: v for k, v in r.items() if k != "tensors"} for r in rows],
                        {i: t for i, t in enumerate(tensors) if t})

    def tensors(self, row: dict) -> dict[str, torch.Tensor]:
        """The named tensors stored with `row` (empty when it has none)."""
        ref = row.get("tensors")
        if not isinstance(ref, str):
            return {}
        file, j = ref.split("#")
        flat = load_tensors(self.folder / file, "results tensors")
        prefix = f"{j}/"
        return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}

    def tensors_many(self, rows) -> list[dict[str, torch.Tensor]]:
        """`tensors` of many rows, each sidecar file read once."""
        files: dict[str, dict] = {}
        out = []
        for row in rows:
            ref = row.get("tensors") if isinstance(row, dict) else None
            if not isinstance(ref, str):
                out.append({})
                continue
            file, j = ref.split("#")
            if file not in files:
                files[file] = load_tensors(self.folder / file, "results tensors")
            prefix = f"{j}/"
            out.append({k[len(prefix):]: v for k, v in files[file].items() if k.startswith(prefix)})
        return out

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows())
        for k in ("model", "model_hash", "key"):
            df[k] = self.meta[k] if len(df) else pd.Series(dtype=object)
        return df


def _floats(v: list) -> np.ndarray | None:
    """`v` as a float64 array when it is a (nested, rectangular) list of Python floats only, else None."""
    stack = [v]
    while stack:
        x = stack.pop()
        if not x or type(x[0]) is list:
            if not all(type(e) is list for e in x):
                return None
            stack.extend(x)
        elif not all(type(e) is float for e in x):
            return None
    try:
        a = np.asarray(v, dtype=np.float64)
    except ValueError:  # ragged
        return None
    return a if a.size else None


def _pack(x):
    """A row as it is written: every list of at least PACK_MIN floats packed as {"array": dtype,
    "shape", "b64"}, float32 when that holds every value exactly (the vectors come from float32
    tensors), else float64; `_unpack` gives back the same lists."""
    if isinstance(x, dict):
        return {k: _pack(v) for k, v in x.items()}
    if isinstance(x, list):
        a = _floats(x) if len(x) >= PACK_MIN or (x and type(x[0]) is list) else None
        if a is not None and a.size >= PACK_MIN:
            a32 = a.astype(np.float32)
            exact = bool(np.array_equal(a32.astype(np.float64), a, equal_nan=True))
            b = a32 if exact else a
            return {"array": "f4" if exact else "f8", "shape": list(a.shape),
                    "b64": base64.b64encode(b.tobytes()).decode("ascii")}
        return [_pack(v) for v in x]
    return x


def parse_row(line: str | bytes) -> dict:
    """One line of a rows file as the row that was added (packed arrays back to lists)."""
    return json.loads(line, object_hook=_unpack)


def _unpack(d: dict):
    """json.loads' object hook: a packed array back to its nested list of floats."""
    if len(d) == 3 and "b64" in d and "array" in d and "shape" in d:
        if d["array"] not in ("f4", "f8"):
            raise ValueError(f"unknown packed array type {d['array']!r}")
        a = np.frombuffer(base64.b64decode(d["b64"]), dtype=np.float32 if d["array"] == "f4" else np.float64)
        return a.astype(np.float64).reshape(d["shape"]).tolist()
    return d


def _plain(x):
    """JSON for numpy scalars and tensors in rows."""
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


class ResultsStore:
    """A folder of runs; `frame()` reads every current run as one pandas frame."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def run(self, model: str, model_hash: str, params: dict) -> Run:
        """The run of `model` (checkpoint hash `model_hash`) with `params`; created if new."""
        meta = dict(model=model, model_hash=model_hash, params=params)
        key = settings_hash(meta)
        folder = self.folder / f"{_safe(model)}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        meta["key"] = key
        if not (folder / RUN).exists():
            atomic_write_json(folder / RUN, meta)
        return Run(folder, meta)

    def runs(self) -> list[Run]:
        out = []
        for f in sorted(self.folder.glob(f"*/{RUN}")):
            try:
                meta = json.loads(f.read_text())
            except json.JSONDecodeError as exc:
                raise DamagedFileError(f"{f}: invalid run description ({exc})") from exc
            out.append(Run(f.parent, meta))
        return out

    def frame(self, **where) -> pd.DataFrame:
        """Rows of every run whose meta (model, or a parameter) matches `where`."""
        frames = []
        for run in self.runs():
            m = {**run.meta["params"], "model": run.meta["model"]}
            if all(m.get(k) == v for k, v in where.items()):
                frames.append(run.frame())
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
