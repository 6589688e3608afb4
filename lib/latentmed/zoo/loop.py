"""The resumable training loop shared by every stage: lr schedule, checkpoints, curves.

Every `save_every` steps the modules (safetensors), the optimizer's tensors (safetensors) and
the scalars and generator state (json, never pickle) are written as one checkpoint: state.json
names the hash of every tensor file it belongs to and is put in place last, and a resumed run
verifies the hashes before trusting them. A run killed at any point restarts from the last
checkpoint and ends with the same weights and curves as an uninterrupted one. Learning curves
go to CSV.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..files import (
    DamagedFileError,
    atomic_save_tensors,
    atomic_write_json,
    atomic_write_text,
    file_hash,
    load_tensors,
    mark_owned,
    read_json,
    remove_owned,
)

STATE = "state.json"
NEXT, NEXT_KIND = "next", "checkpoint-next"  # a checkpoint being written (see `_save_checkpoint`)


@dataclass(frozen=True)
class StageConfig:
    """Optimisation settings of one stage (all recorded in the checkpoint's zoo.json)."""

    name: str
    steps: int
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 30
    decay_start: float = 0.6  # fraction of the steps after which the lr decays (cosine) ...
    min_lr_frac: float = 0.05  # ... down to this fraction of lr
    eval_every: int = 100
    save_every: int = 100
    keep_best: bool = True  # end with the weights that scored best on validation
    seed: int = 0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _validate(self)


def _validate(c: StageConfig) -> None:
    """Every setting in the range the loop relies on (a zero `save_every` would divide by zero)."""
    def bad(name: str, msg: str):
        raise ValueError(f"StageConfig({c.name!r}).{name}: {msg}, got {getattr(c, name)!r}")

    if not isinstance(c.name, str) or not c.name:
        bad("name", "must be a non-empty string")
    for name, lo in (("steps", 1), ("batch_size", 1), ("eval_every", 1), ("save_every", 1), ("warmup", 0),
                     ("seed", 0)):
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            bad(name, f"must be an integer >= {lo}")
    for name, lo, hi in (("lr", 0, math.inf), ("decay_start", 0, 1), ("min_lr_frac", 0, 1), ("grad_clip", 0, math.inf)):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not lo <= v <= hi:
            bad(name, f"must be a finite number in [{lo}, {hi}]")
    if c.lr == 0:
        bad("lr", "must be > 0")
    if not isinstance(c.keep_best, bool):
        bad("keep_best", "must be True or False")


@functools.lru_cache(maxsize=64)
def _schedule(cfg: StageConfig):
    """transformers' warmup-stable-decay schedule (cosine decay to `min_lr_frac`) as a function
    of the step; built once per stage on a throwaway optimizer."""
    from transformers import get_wsd_schedule

    warmup = min(cfg.warmup, cfg.steps)
    start = max(warmup, int(cfg.decay_start * cfg.steps))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_wsd_schedule(opt, num_warmup_steps=warmup, num_stable_steps=start - warmup,
                             num_decay_steps=max(1, cfg.steps - start), min_lr_ratio=cfg.min_lr_frac)
    return sched.lr_lambdas[0]


def lr_at(cfg: StageConfig, step: int) -> float:
    """The learning rate of step `step` (0-based): linear warmup over `warmup` steps, constant until
    `decay_start` of the steps, then cosine decay to `min_lr_frac` of `lr`."""
    return cfg.lr * _schedule(cfg)(step + 1)


class SimulatedKill(RuntimeError):
    """Raised by `run_loop(stop_after=...)` to test resuming."""


CURVE_FIELDS = ["stage", "step", "loss", "ce", "attn", "hop", "align", "lr", "seconds",
                "val_attr", "val_relpos", "val_count", "val_glyph", "val_all"]


def _module_state(modules: dict) -> dict:
    return {f"{name}::{k}": v.detach().clone().contiguous() for name, m in modules.items()
            for k, v in m.state_dict().items()}


def _load_module_state(modules: dict, state: dict) -> None:
    for name, m in modules.items():
        prefix = f"{name}::"
        m.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def _optimizer_tensors(opt) -> dict:
    """AdamW state as plain tensors (safetensors, no pickle)."""
    tensors = {}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        st = opt.state.get(p)
        if not st:
            continue
        for k, v in st.items():
            tensors[f"{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().clone().contiguous()
    return tensors


def _load_optimizer(opt, tensors: dict) -> None:
    params = opt.param_groups[0]["params"]
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        opt.state[params[int(i)]][k] = v


# ---------------------------------------------------------------- checkpoints as one unit
#
# A checkpoint is state.json plus the tensor files it names with their hashes (weights,
# optimizer, best). A new one is written whole into `next/` (state.json last), then moved into
# place, state.json last; a kill leaves either a complete `next/` (rolled forward on resume) or
# an incomplete one (dropped), and the files in place always match the state.json in place.

def _save_tensors(tensors: dict, path: Path) -> None:
    """One tensor file of a checkpoint (a write point)."""
    atomic_save_tensors(tensors, path)


def _write_state(path: Path, state: dict) -> None:
    """A checkpoint's state.json (a write point)."""
    atomic_write_json(path, state)


def _move(src: Path, dst: Path) -> None:
    """One rename of a checkpoint's commit (a write point)."""
    os.replace(src, dst)


def _save_checkpoint(run_dir: Path, tensors: dict[str, dict], state: dict) -> dict:
    """Write `tensors` (name -> tensors) and `state` as one checkpoint, then commit it; returns
    the file hashes it recorded (files not rewritten keep theirs)."""
    nxt = run_dir / NEXT
    remove_owned(nxt, NEXT_KIND)
    mark_owned(nxt, NEXT_KIND)
    files = dict(state.get("files", {}))
    for name, t in tensors.items():
        _save_tensors(t, nxt / f"{name}.safetensors")
        files[name] = file_hash(nxt / f"{name}.safetensors")
    _write_state(nxt / STATE, dict(state, files=files))
    _commit(run_dir)
    return files


def _commit(run_dir: Path) -> None:
    """Move a complete `next/` into place (tensor files first, state.json last); drop an incomplete one."""
    nxt = run_dir / NEXT
    if not nxt.is_dir():
        return
    if (nxt / STATE).is_file():
        for f in sorted(nxt.glob("*.safetensors")):
            _move(f, run_dir / f.name)
        _move(nxt / STATE, run_dir / STATE)
    remove_owned(nxt, NEXT_KIND)


def _read_checkpoint(run_dir: Path, cfg: StageConfig) -> tuple[dict, dict] | None:
    """The committed checkpoint (state, name -> tensors), verified against the hashes its state.json
    records; None when there is none, or (with a warning) when it cannot be trusted."""
    _commit(run_dir)  # finish a commit a kill interrupted
    path = run_dir / STATE
    if not path.exists():
        return None
    st = read_json(path, "training state")
    if not isinstance(st, dict) or "files" not in st:
        warnings.warn(f"{path}: a training state without file hashes (an earlier version, or damaged); "
                      "starting this stage again from step 0")
        return None
    if st.get("config") != asdict(cfg):
        raise ValueError(f"{path}: written by a run with other settings ({_diff(st.get('config'), asdict(cfg))}); "
                         "use another run folder or delete this one")
    for name, h in st["files"].items():
        f = run_dir / f"{name}.safetensors"
        if not f.is_file() or file_hash(f) != h:
            warnings.warn(f"{f}: {'missing' if not f.is_file() else 'does not match'} the hash {path.name} "
                          "records (damaged); starting this stage again from step 0")
            return None
    return st, {name: load_tensors(run_dir / f"{name}.safetensors", "training checkpoint") for name in st["files"]}


def _diff(a, b) -> str:
    """The settings that differ between two config dicts, for an error message."""
    if not isinstance(a, dict):
        return f"recorded {a!r}"
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in keys)


def _read_curves(path: Path, upto: int) -> list[dict]:
    """Curve rows of steps 1..`upto` (the committed ones); a line cut by a kill is dropped."""
    if not path.exists():
        return []
    text = path.read_text()
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        try:
            step = int(r["step"])
        except (TypeError, ValueError):
            continue
        if 1 <= step <= upto and step == len(rows) + 1:
            rows.append(r)
    if len(rows) != upto:
        raise DamagedFileError(f"{path}: holds {len(rows)} complete rows for the {upto} committed steps; "
                               "delete the run folder to retrain this stage")
    return rows


SUBNORMAL = 1e-39  # below float32's smallest normal number (1.18e-38)


def flushing_subnormals() -> bool:
    """Whether this thread's CPU arithmetic treats subnormal floats as zero."""
    return float(torch.tensor([SUBNORMAL]).mul(1.0)) == 0.0


@contextmanager
def subnormals_flushed():
    """Subnormal floats read and written as zero inside (this thread; the setting before is put back).

    AdamW's moments of parameters that get no gradient (word embeddings of tokens a stage never
    shows) shrink by beta each step into the subnormal range, where Intel CPUs compute slowly:
    measured on a 2-core Xeon, grounded-closed's 1200 steps took 221 s with them and 158 s
    flushed, its final weights bit-identical (a subnormal update is far below a weight's last bit).
    """
    was = flushing_subnormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


def run_loop(modules: dict, params: list, step_fn, cfg: StageConfig, run_dir: Path, eval_fn=None,
             progress: bool = True, stop_after: int | None = None) -> dict:
    """Optimise `params` with AdamW for `cfg.steps` steps, resumable from `run_dir`, with
    subnormal floats flushed to zero (`subnormals_flushed`).

    `step_fn(step, generator) -> (loss, scalars)`; `eval_fn() -> (score, per_family)` is run
    every `eval_every` steps and at the end (keep-best uses its score). A non-finite loss stops
    the run with an error naming the stage and step (the last checkpoint stays as it was).
    """
    with subnormals_flushed():
        return _run_loop(modules, params, step_fn, cfg, run_dir, eval_fn, progress, stop_after)


def _run_loop(modules: dict, params: list, step_fn, cfg: StageConfig, run_dir: Path, eval_fn, progress: bool,
              stop_after: int | None) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    curve_file = run_dir / "curves.csv"
    step0, best, best_step, elapsed0, files = 0, -1.0, -1, 0.0, {}
    best_state = None
    found = _read_checkpoint(run_dir, cfg)
    if found is not None:  # resume
        st, tensors = found
        _load_module_state(modules, tensors["weights"])
        _load_optimizer(opt, tensors["optimizer"])
        best_state = tensors.get("best")
        gen.set_state(torch.tensor(st["generator"], dtype=torch.uint8))
        step0, best, best_step, elapsed0, files = st["step"], st["best"], st["best_step"], st["seconds"], st["files"]
    _write_curves(curve_file, _read_curves(curve_file, step0) if step0 else [])
    t0 = time.perf_counter() - elapsed0
    bar = tqdm(range(step0, cfg.steps), desc=cfg.name, disable=not progress, leave=False, mininterval=2)
    last_eval, best_dirty = None, False
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        loss, scalars = step_fn(step, gen)
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"stage {cfg.name!r}: the loss is {float(loss.detach())} at step {step + 1}; "
                                     f"training stopped, the last checkpoint in {run_dir} is kept")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        row = dict(stage=cfg.name, step=step + 1, loss=round(float(loss.detach()), 5), lr=round(lr_at(cfg, step), 7),
                   seconds=round(time.perf_counter() - t0, 2), **{k: round(float(v), 5) for k, v in scalars.items()})
        last = step + 1 == cfg.steps
        if eval_fn is not None and ((step + 1) % cfg.eval_every == 0 or last):
            score, per_family = eval_fn()
            last_eval = per_family
            row.update({f"val_{k}": round(v, 4) for k, v in per_family.items()})
            if score > best:
                best, best_step, best_dirty = score, step + 1, True
                best_state = _module_state(modules)
            bar.set_postfix(val=round(score, 3))
        _append_curve(curve_file, row)
        if (step + 1) % cfg.save_every == 0 or last:
            tensors = {"weights": _module_state(modules), "optimizer": _optimizer_tensors(opt)}
            if best_dirty:
                tensors["best"] = best_state
            st = dict(step=step + 1, best=best, best_step=best_step, seed=cfg.seed,
                      seconds=round(time.perf_counter() - t0, 3), generator=gen.get_state().tolist(),
                      config=asdict(cfg), files=files)
            files, best_dirty = _save_checkpoint(run_dir, tensors, st), False
        if stop_after is not None and step + 1 >= stop_after and not last:
            raise SimulatedKill(f"stopped after step {step + 1}")
    bar.close()
    if cfg.keep_best and best_state is not None:
        _load_module_state(modules, best_state)
    seconds = time.perf_counter() - t0
    return dict(stage=cfg.name, steps=cfg.steps, seconds=round(seconds, 1), best_val=round(best, 4),
                best_step=best_step, last_val=last_eval)


def _write_curves(path: Path, rows: list) -> None:
    """The curve file with `rows`, replaced whole (a kill leaves the old one or the new one)."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _append_curve(path: Path, row: dict) -> None:
    with path.open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=CURVE_FIELDS, extrasaction="ignore").writerow(row)
