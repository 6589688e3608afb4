"""The resumable training loop shared by every stage: lr schedule, checkpoints, curves.

Every `save_every` steps the modules (safetensors), the optimizer's tensors (safetensors) and
the scalars and generator state (json, never pickle) are written; a killed run restarts from
there and ends with the same weights as an uninterrupted one. Learning curves go to CSV.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm


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


def lr_at(cfg: StageConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    start = int(cfg.decay_start * cfg.steps)
    if step < start or cfg.steps <= start:
        return cfg.lr
    frac = (step - start) / max(1, cfg.steps - start)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


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


def _save_optimizer(opt, path: Path) -> None:
    """AdamW state as plain tensors (safetensors, no pickle)."""
    tensors = {}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        st = opt.state.get(p)
        if not st:
            continue
        for k, v in st.items():
            tensors[f"{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().clone().contiguous()
    save_file(tensors, str(path))


def _load_optimizer(opt, path: Path) -> None:
    tensors = load_file(str(path))
    params = opt.param_groups[0]["params"]
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        opt.state[params[int(i)]][k] = v


def _atomic_save(tensors: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def run_loop(modules: dict, params: list, step_fn, cfg: StageConfig, run_dir: Path, eval_fn=None,
             progress: bool = True, stop_after: int | None = None) -> dict:
    """Optimise `params` with AdamW for `cfg.steps` steps, resumable from `run_dir`.

    `step_fn(step, generator) -> (loss, scalars)`; `eval_fn() -> (score, per_family)` is run
    every `eval_every` steps and at the end (keep-best uses its score).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    state_file, curve_file = run_dir / "state.json", run_dir / "curves.csv"
    step0, best, best_step, elapsed0 = 0, -1.0, -1, 0.0
    if state_file.exists():  # resume
        st = json.loads(state_file.read_text())
        _load_module_state(modules, load_file(str(run_dir / "weights.safetensors")))
        _load_optimizer(opt, run_dir / "optimizer.safetensors")
        gen.set_state(torch.tensor(st["generator"], dtype=torch.uint8))
        step0, best, best_step, elapsed0 = st["step"], st["best"], st["best_step"], st["seconds"]
        rows = list(csv.DictReader(curve_file.open())) if curve_file.exists() else []
        rows = [r for r in rows if int(r["step"]) <= step0]
        _write_curves(curve_file, rows)
    else:
        _write_curves(curve_file, [])
    best_state = load_file(str(run_dir / "best.safetensors")) if (run_dir / "best.safetensors").exists() else None
    t0 = time.perf_counter() - elapsed0
    bar = tqdm(range(step0, cfg.steps), desc=cfg.name, disable=not progress, leave=False, mininterval=2)
    last_eval = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        loss, scalars = step_fn(step, gen)
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
                best, best_step = score, step + 1
                best_state = _module_state(modules)
                _atomic_save(best_state, run_dir / "best.safetensors")
            bar.set_postfix(val=round(score, 3))
        _append_curve(curve_file, row)
        if (step + 1) % cfg.save_every == 0 or last:
            _atomic_save(_module_state(modules), run_dir / "weights.safetensors")
            _save_optimizer(opt, run_dir / "optimizer.safetensors.tmp")
            os.replace(run_dir / "optimizer.safetensors.tmp", run_dir / "optimizer.safetensors")
            st = dict(step=step + 1, best=best, best_step=best_step, seed=cfg.seed,
                      seconds=round(time.perf_counter() - t0, 3), generator=gen.get_state().tolist(),
                      config=asdict(cfg))
            tmp = state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(st))
            os.replace(tmp, state_file)
        if stop_after is not None and step + 1 >= stop_after and not last:
            raise SimulatedKill(f"stopped after step {step + 1}")
    bar.close()
    if cfg.keep_best and best_state is not None:
        _load_module_state(modules, best_state)
    seconds = time.perf_counter() - t0
    return dict(stage=cfg.name, steps=cfg.steps, seconds=round(seconds, 1), best_val=round(best, 4),
                best_step=best_step, last_val=last_eval)


def _write_curves(path: Path, rows: list) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CURVE_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _append_curve(path: Path, row: dict) -> None:
    with path.open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=CURVE_FIELDS, extrasaction="ignore").writerow(row)
