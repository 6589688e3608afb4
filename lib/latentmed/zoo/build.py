"""Training the zoo: the shared base once, then each method from it; skip what is trained.

`train_zoo` trains the base, then the methods, and skips any model whose folder already holds a
finished checkpoint with the same settings (a hash of `recipes.settings` in its zoo.json) and
the weights that checkpoint recorded. Every checkpoint folder is in the real layout
(safetensors, tokenizer, preprocessor, latent_spec.json) that `LatentReasoner` loads.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pandas as pd
import torch

from ..engine import checkpoint
from ..engine.spec import LatentSpec
from ..engine.tiny import save_checkpoint, tiny_config, tiny_model
from ..engine.tokenizer import build_tokenizer
from ..files import (
    MARKER,
    DamagedFileError,
    atomic_save_tensors,
    atomic_write_json,
    file_hash,
    read_json,
    is_owned,
    mark_owned,
    remove_owned,
    replace_folder,
    set_threads,
    settings_hash,
)
from ..paths import data_dir, models_dir
from ..testbed.items import VOCABULARY, TestbedConfig
from .bank import FeatureBank, build_bank
from .loop import StageConfig
from .recipes import BASE, BUDGETS, METHODS, SPECS, bank_kinds, method_stages, pool_of, settings
from .stages import (
    freeze_and_rescale_tower,
    reinit_language_model,
    train_stage,
    vision_stage,
)

ZOO_FILE = "zoo.json"
CHECKPOINT = "checkpoint"  # marker kind of the folders this module writes
RUNS = "runs"  # marker kind of the resumable training state under <zoo>/_runs


def is_trained(folder: Path, want_hash: str) -> bool:
    """A finished checkpoint with the wanted settings whose files are all the ones it recorded
    (a truncated or replaced file, e.g. weights cut by a kill or a copy, is retrained)."""
    folder = Path(folder)
    f = folder / ZOO_FILE
    if not f.exists():
        return False
    try:
        info = read_info(folder)
        checkpoint.weight_files(folder)
    except (ValueError, OSError):
        return False
    if info.get("hash") != want_hash or not info.get("complete", False):
        return False
    hashes = info.get("file_hashes") or {"model.safetensors": info.get("weights_hash")}
    return all((folder / name).is_file() and file_hash(folder / name) == h for name, h in hashes.items())


def read_info(folder: str | Path) -> dict:
    """A zoo checkpoint's zoo.json (an error naming it when it is missing or damaged)."""
    path = Path(folder) / ZOO_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a zoo checkpoint (no {ZOO_FILE})")
    info = read_json(path, "zoo checkpoint record")
    if not isinstance(info, dict):
        raise DamagedFileError(f"{path}: expected a JSON object")
    return info


def testbed_config(path: Path | None = None) -> TestbedConfig:
    """The testbed config of the on-disk dataset (manifest.json), else the default config."""
    path = Path(path) if path else data_dir() / "testbed"
    manifest = path / "manifest.json"
    if manifest.exists():
        d = read_json(manifest, "testbed manifest")
        d = d.get("config", d) if isinstance(d, dict) else d
        try:
            return TestbedConfig.from_dict(d)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{manifest}: not a testbed manifest ({exc})") from exc
    return TestbedConfig()


def check_replaceable(folder: Path) -> None:
    """Before training: the model's folder is new, empty or a zoo checkpoint (which a retrain
    replaces); a folder of someone else's files is refused now, not after minutes of training."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise FileExistsError(f"{folder}: exists and is not a folder; refusing to replace it")
    if folder.is_dir() and any(folder.iterdir()) and not is_owned(folder, CHECKPOINT) \
            and not (folder / ZOO_FILE).exists():
        raise FileExistsError(f"{folder}: holds files but is not a zoo checkpoint (no {MARKER} marker, no "
                              f"{ZOO_FILE}); refusing to replace it: choose another zoo folder")


def _concat_curves(folder: Path, stage_dirs: list[Path]) -> None:
    frames = [pd.read_csv(d / "curves.csv") for d in stage_dirs if (d / "curves.csv").exists()]
    if frames:
        pd.concat(frames, ignore_index=True).to_csv(folder / "curves.csv", index=False)


def _finish(folder: Path, model, tok, spec: LatentSpec, info: dict, constant=None, curves=()) -> None:
    """Write the checkpoint into `<folder>.partial`, then swap it in: a kill never leaves a
    folder that looks finished but is not (zoo.json, written last, names the weights' hash)."""
    from transformers.utils import logging as hf_logging

    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        remove_owned(tmp, CHECKPOINT)
    mark_owned(tmp, CHECKPOINT)
    model.config._attn_implementation = "sdpa"
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    save_checkpoint(tmp, model, tok)
    if bars:
        hf_logging.enable_progress_bar()
    spec.save(tmp)
    _concat_curves(tmp, list(curves))
    if constant is not None:
        atomic_save_tensors({"latent": constant}, tmp / checkpoint.CONSTANT_FILE)
    info["weights_hash"] = file_hash(tmp / "model.safetensors")
    info["file_hashes"] = {p.name: file_hash(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MARKER}
    info["complete"] = True
    atomic_write_json(tmp / ZOO_FILE, info)
    check_replaceable(folder)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    elif folder.exists() and not is_owned(folder) and (folder / ZOO_FILE).exists():
        mark_owned(folder, CHECKPOINT)  # a checkpoint of an earlier version of this code
    replace_folder(tmp, folder, CHECKPOINT)


def val_per_family(val: int, config: TestbedConfig) -> int:
    """Validation items per family a zoo model is scored on: the budget's `val`, fewer when the
    testbed's validation split is smaller."""
    return min(val, max(1, config.n_val // len(config.families))) if config.n_val else val


class Zoo:
    """Trains and loads the models of one zoo folder; shares the feature banks between them."""

    def __init__(self, root: Path | None = None, budget: str = "default", seed: int = 0,
                 config: TestbedConfig | None = None, progress: bool = True, model_size: str = "testbed"):
        if budget not in BUDGETS:
            raise ValueError(f"unknown budget {budget!r}; known: {', '.join(BUDGETS)}")
        self.root = Path(root) if root else models_dir() / "zoo"
        self.budget, self.seed, self.progress = budget, seed, progress
        self.config = config or testbed_config()
        self.banks: dict[str, FeatureBank] = {}
        self.model_size = model_size

    def folder(self, name: str) -> Path:
        return self.root / name

    def bank(self, model, split: str, kinds=("main", "crop"), pool: str = "pool") -> FeatureBank:
        """Train pool or validation items with tower tokens of `kinds` (computed once, cached)."""
        b = BUDGETS[self.budget]
        n = b[pool] if split == "train" else val_per_family(b["val"], self.config)
        key = (split, tuple(sorted(kinds)), n)
        if key not in self.banks:
            self.banks[key] = build_bank(model, self.config, split, n, kinds=tuple(sorted(kinds)),
                                         cache_dir=self.root / "_features", progress=self.progress)
        return self.banks[key]

    def is_current(self, name: str) -> bool:
        """Whether `name` is trained with the settings it would be trained with now."""
        return is_trained(self.folder(name), self.hash(name))

    def hash(self, name: str) -> str:
        """The settings hash `name` would be trained with (a fine-tune's includes its base's)."""
        return self.settings(name)[1]

    def settings(self, name: str, base_folder: Path | None = None) -> tuple[dict, str]:
        """Everything that defines model `name` here, and its hash."""
        if name == BASE:
            s = settings(BASE, self.budget, self.seed, self.config)
            s["model_size"] = self.model_size
        else:
            base = Path(base_folder) if base_folder else self.folder(BASE)
            base_hash = read_info(base).get("hash") if (base / ZOO_FILE).exists() else "external"
            s = settings(name, self.budget, self.seed, self.config, base_hash)
        return s, settings_hash(s)

    def prepare_banks(self, names: list[str]) -> None:
        """Compute (or load) every feature bank `names` will train on, so workers only read them."""
        x = checkpoint.load(self.folder(BASE))
        for name in names:
            kinds = bank_kinds(name, self.budget)
            self.bank(x.model, "train", kinds, pool_of(name))
            self.bank(x.model, "val", kinds)

    def runs(self, name: str, h: str, force: bool) -> Path:
        """The resumable training state of model `name` with settings hash `h` (cleared by force)."""
        path = self.root / "_runs" / f"{name}-{h}"
        if force and path.exists():
            remove_owned(path, RUNS)
        if path.is_dir() and any(path.iterdir()) and not is_owned(path, RUNS):
            raise FileExistsError(f"{path}: holds files but is not a training state latentmed wrote (no {MARKER} "
                                  "marker); refusing to resume from it or delete it")
        return mark_owned(path, RUNS)

    # ------------------------------------------------------------ base
    def train_base(self, force: bool = False) -> dict:
        folder = self.folder(BASE)
        s, h = self.settings(BASE)
        if not force and is_trained(folder, h):
            return dict(read_info(folder), skipped=True)
        check_replaceable(folder)
        t0 = _start()
        runs = self.runs(BASE, h, force)
        tok = build_tokenizer(VOCABULARY)
        layers = BUDGETS[self.budget].get("llm_layers")
        model = tiny_model(tiny_config(tok, self.model_size, **({"num_hidden_layers": layers} if layers else {})),
                           seed=self.seed)
        b = BUDGETS[self.budget]
        vcfg = StageConfig("vision", b["vision"], batch_size=16, lr=3e-3, warmup=30, decay_start=0.7,
                           eval_every=10**9, save_every=max(10, b["vision"] // 4), keep_best=False, seed=self.seed)
        _, vsum = vision_stage(model, self.config, vcfg, runs / "vision", progress=self.progress)
        scale = freeze_and_rescale_tower(model, self.config)
        reinit_language_model(model, seed=self.seed)
        summaries = [vsum]
        [stage] = method_stages(BASE, self.budget, self.seed)
        summaries.append(train_stage(model, tok, stage.plan, self.bank(model, "train", ("main",)), self.bank(model, "val", ("main",)),
                                     stage.cfg, runs / stage.cfg.name, progress=self.progress))
        info = dict(name=BASE, hash=h, settings=s, stages=summaries, token_scale=scale, layout="testbed",
                    latent_source="none", seconds=round(time.perf_counter() - t0, 1))
        _finish(folder, model, tok, SPECS[BASE], info, curves=[runs / stage.cfg.name])
        remove_owned(runs, RUNS)
        return info

    def load_base(self):
        folder = self.folder(BASE)
        x = checkpoint.load(folder)
        return x.model, x.tokenizer

    # ------------------------------------------------------------ fine-tunes
    def train_method(self, name: str, force: bool = False, base_folder: Path | None = None) -> dict:
        if name not in SPECS:
            raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
        if name == BASE:
            return self.train_base(force)
        base_folder = Path(base_folder) if base_folder else self.folder(BASE)
        folder = self.folder(name)
        s, h = self.settings(name, base_folder)
        if not force and is_trained(folder, h):
            return dict(read_info(folder), skipped=True)
        check_replaceable(folder)
        t0 = _start()
        runs = self.runs(name, h, force)
        x = checkpoint.load(base_folder)
        model, tok = x.model, x.tokenizer
        spec = SPECS[name]
        spec.token_ids(tok)  # a base whose tokenizer lacks the method's tokens fails here, naming it
        kinds = bank_kinds(name, self.budget)
        train_bank, val_bank = self.bank(model, "train", kinds, pool_of(name)), self.bank(model, "val", kinds)
        constant = None
        if spec.latent_source == "constant":
            g = torch.Generator().manual_seed(self.seed + 7)
            constant = torch.randn(spec.n_latents, model.config.text_config.hidden_size, generator=g)
            constant = constant / constant.norm(dim=-1, keepdim=True)  # word-embedding scale
        done: dict[str, torch.nn.Module] = {}
        summaries, dirs = [], []
        for stage in method_stages(name, self.budget, self.seed):
            teacher = done.get(stage.teacher) if stage.teacher else None
            teacher_plan = None
            if stage.teacher:
                teacher_plan = next(st.plan for st in method_stages(name, self.budget, self.seed)
                                    if st.cfg.name == stage.teacher)
            summaries.append(train_stage(model, tok, stage.plan, train_bank, val_bank, stage.cfg,
                                         runs / stage.cfg.name, teacher=teacher, teacher_plan=teacher_plan,
                                         constant=constant, progress=self.progress))
            dirs.append(runs / stage.cfg.name)
            if any(st.teacher == stage.cfg.name for st in method_stages(name, self.budget, self.seed)):
                frozen = copy.deepcopy(model).eval()
                for p in frozen.parameters():
                    p.requires_grad_(False)
                done[stage.cfg.name] = frozen
        info = dict(name=name, hash=h, settings=s, stages=summaries, layout="testbed",
                    latent_source=spec.latent_source, base=str(base_folder.name),
                    seconds=round(time.perf_counter() - t0, 1))
        _finish(folder, model, tok, spec, info, constant, curves=dirs)
        remove_owned(runs, RUNS)
        return info


def _start() -> float:
    """Pin the thread count, start the clock."""
    set_threads()
    return time.perf_counter()


def train_zoo(root: str | Path | None = None, budget: str = "default", methods=None, seed: int = 0,
              force: bool = False, config: TestbedConfig | None = None, progress: bool = True,
              model_size: str = "testbed", verbose: bool = True, workers: int | None = None):
    """Train the base and the methods (skipping what is trained with the same settings).

    The fine-tunes are independent once the base exists: with `workers` > 1 (default: the
    LATENTMED_WORKERS variable, else 2 for the default budget on a machine with 2 or more cores
    and 1 otherwise) they are trained that many at a time in separate processes, each with an
    equal share of the CPU threads, longest first. (On 2 cores one thread per model trains this
    tiny model faster than two: 97 against 73 samples/s for grounded-closed, benchmarks/bench_train.)
    Returns a DataFrame: model, seconds (of this run; 0 when skipped), trained_seconds (as recorded
    when it was trained), skipped, best validation accuracy.
    """
    if isinstance(methods, str):
        raise TypeError(f"methods must be a list of method names, got the string {methods!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if workers is None:
        auto = 2 if budget == "default" and (os.cpu_count() or 1) >= 2 else 1
        workers = int(os.environ.get("LATENTMED_WORKERS", auto))
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    zoo = Zoo(Path(root) if root else None, budget, seed, config, progress, model_size)
    names = list(methods) if methods else list(METHODS)
    for n in names:
        if n not in SPECS:
            raise ValueError(f"unknown method {n!r}; known: {', '.join(SPECS)}")
    rest = [m for m in names if m != BASE]
    forced = set(methods or METHODS) if force else set()
    infos = {BASE: _timed(zoo.train_method, BASE, force=BASE in forced)}
    todo = [m for m in rest if force and m in forced or not zoo.is_current(m)]
    if workers > 1 and len(todo) > 1:
        todo.sort(key=lambda m: -sum(st.cfg.steps for st in method_stages(m, budget, seed)))  # longest first
        infos.update(_train_parallel(zoo, todo, forced, workers))
    for n in rest:
        if n not in infos:
            infos[n] = _timed(zoo.train_method, n, force=n in forced)
    rows = []
    for n in [BASE] + rest:
        info, secs = infos[n]
        last = info["stages"][-1]
        rows.append(dict(model=n, seconds=secs, trained_seconds=info["seconds"],
                         skipped=info.get("skipped", False), best_val=last.get("best_val")))
        if verbose:
            done = (f"reused (trained earlier in {info['seconds']:.0f} s with the same settings)" if info.get("skipped")
                    else f"trained in {info['seconds']:.0f} s")
            print(f"[zoo] {n}: {done}, validation accuracy {rows[-1]['best_val']:.3f}")
    return pd.DataFrame(rows)


def _timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, round(time.perf_counter() - t0, 1)


def _train_parallel(zoo: "Zoo", names: list[str], forced: set, workers: int) -> dict:
    """Train `names` (fine-tunes of the existing base) `workers` at a time in spawned processes."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    zoo.prepare_banks(names)  # computed once here, read from the cache by every worker
    threads = max(1, torch.get_num_threads() // workers)
    args = dict(root=str(zoo.root), budget=zoo.budget, seed=zoo.seed, config=zoo.config.to_dict(),
                model_size=zoo.model_size, threads=threads)
    out = {}
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
        futures = {n: ex.submit(_train_in_worker, n, n in forced, **args) for n in names}
        for n, f in futures.items():
            out[n] = f.result()
    return out


def _train_in_worker(name: str, force: bool, root: str, budget: str, seed: int, config: dict, model_size: str,
                     threads: int):
    """One fine-tune in a worker process (its own thread count, no progress bars)."""
    torch.set_num_threads(threads)
    zoo = Zoo(Path(root), budget, seed, TestbedConfig.from_dict(config), progress=False, model_size=model_size)
    return _timed(zoo.train_method, name, force=force)


def training_times(root: str | Path | None = None) -> "pd.DataFrame":
    """Per trained model: training seconds (as recorded), stages, steps, best validation accuracy."""
    root = Path(root) if root else models_dir() / "zoo"
    rows = []
    for m in SPECS:
        if (root / m / ZOO_FILE).exists():
            info = read_info(root / m)
            stages = info["stages"]
            rows.append(dict(model=m, seconds=info["seconds"], stages=" + ".join(st["stage"] for st in stages),
                             steps=sum(st["steps"] for st in stages), best_val=stages[-1].get("best_val")))
    return pd.DataFrame(rows)


def learning_curves(root: str | Path | None = None) -> "pd.DataFrame":
    """All models' learning curves (curves.csv) with `model` and a running `step_total`."""
    root = Path(root) if root else models_dir() / "zoo"
    frames = []
    for m in METHODS:
        path = root / m / "curves.csv"
        if path.exists():
            df = pd.read_csv(path)
            offsets, total = {}, 0
            for st in pd.unique(df["stage"]):
                offsets[st] = total
                total += int(df.loc[df["stage"] == st, "step"].max())
            df["step_total"] = df["step"] + df["stage"].map(offsets)
            frames.append(df.assign(model=m))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
