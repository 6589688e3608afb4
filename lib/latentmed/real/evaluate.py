"""Evaluate a released checkpoint on a real benchmark: one row per instance in the results store.

`evaluate(Settings(...))` loads the benchmark (`benchmarks`) and the model (`presets`), asks
every question as the chosen harness does, decodes greedily through the engine's loop (with the
latent segment forced open or left to the model) and appends one row per instance to the
study's results store (`latentmed.store`) as it goes: the harness's answer and whether it is
right, the engine's strict parse and the option-log-prob answer beside it, the reply, whether
the model opened its segment on its own (the natural trigger), K, NaN flags, the image grid,
the time it took.

Resume and sharding. The store's run of a model (by checkpoint fingerprint) and its settings
skips what it already holds, so a killed evaluation restarted with the same command continues
where it stopped and neither loses nor duplicates a row. Under `accelerate launch` every
process takes every n-th instance and writes its own run (the settings plus its shard); an
instance already stored in any run of the same model and settings (a shard of an earlier
launch, or the merged run) is skipped. When every process is done, process 0 merges the
shards into the run a one-process evaluation writes (`merge`: same run key, same rows in the
benchmark's order); `python -m latentmed.real merge` does it by hand. A one-process run that
finds shard rows merges them at its end too.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..engine.decode import DecodeConfig
from ..files import atomic_write_json, set_threads, settings_hash
from ..store import ROWS, ResultsStore, Run, parse_row
from .benchmarks import LETTERS, Example, data_file, load_benchmark
from .harness import HARNESSES, extract
from .preprocess import check_grid
from .presets import (
    checkpoint_fingerprint,
    describe,
    file_fingerprint,
    load_model,
    preset,
)

CONDITION = "eval"
VOLATILE = ("seconds", "tensors", "device")  # row fields that may differ between equal runs
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Settings:
    """One evaluation (the CLI's `eval` arguments)."""

    model: Path
    method: str
    benchmark: str
    data: Path
    out: Path
    harness: str = "vlmevalkit"
    force_latent: bool = False
    max_new_tokens: int | None = None  # None: the method's preset
    min_pixels: int | None = None  # None: the method's evaluation bounds
    max_pixels: int | None = None
    limit: int | None = None
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str = "auto"
    batch_size: int = 1
    save_latents: bool = False
    name: str | None = None  # model name in the store (default: the folder's name)
    progress: bool = True

    def __post_init__(self) -> None:
        self.model, self.data, self.out = Path(self.model), Path(self.data), Path(self.out)
        preset(self.method)
        if self.harness not in HARNESSES:
            raise ValueError(f"unknown harness {self.harness!r}; known: {', '.join(HARNESSES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        for k in ("limit", "max_new_tokens", "batch_size"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{k} must be a positive integer, got {v!r}")

    @property
    def model_name(self) -> str:
        return self.name or self.model.name


# ---------------------------------------------------------------- runs of a store

def read_rows(run: Run) -> list[dict]:
    """A run's complete rows without touching the file (another process may be appending)."""
    path = run.folder / ROWS
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n")[:-1]:  # the part after the last newline is unfinished
        try:
            out.append(parse_row(line))
        except ValueError:  # a line being written (json's decode errors are ValueErrors)
            continue
    return out


def base_params(run: Run) -> dict:
    return {k: v for k, v in run.meta["params"].items() if k != "shard"}


def sibling_runs(store: ResultsStore, model: str, model_hash: str, params: dict) -> list[Run]:
    """Every run of `model` with `params` (the merged one and its shards)."""
    want = settings_hash(params)
    return [r for r in store.runs() if r.meta["model"] == model and r.meta["model_hash"] == model_hash
            and settings_hash(base_params(r)) == want]


def _same(a: dict, b: dict) -> bool:
    strip = lambda r: {k: v for k, v in r.items() if k not in VOLATILE}
    return strip(a) == strip(b)


def merge_runs(store: ResultsStore, model: str, model_hash: str, params: dict) -> tuple[Run, int]:
    """Copy the rows of every shard run of (`model`, `params`) into the run a one-process
    evaluation writes, in the benchmark's order; returns that run and the rows added. A row
    stored twice with different contents is an error naming both runs."""
    runs = sibling_runs(store, model, model_hash, params)
    final = store.run(model, model_hash, params)
    have = {(r["item"], r["condition"]): (r, final) for r in read_rows(final)}
    new: dict[tuple, tuple[dict, Run]] = {}
    for run in runs:
        if "shard" not in run.meta["params"]:
            continue
        for r in read_rows(run):
            key = (r["item"], r["condition"])
            seen = have.get(key) or new.get(key)
            if seen is None:
                new[key] = (r, run)
            elif not _same(seen[0], r):
                raise ValueError(f"item {key[0]!r} ({key[1]}) is stored with different results in {seen[1].folder} "
                                 f"and {run.folder}; delete the run that is wrong and merge again")
    info = next((run.folder / MODEL_INFO for run in runs if (run.folder / MODEL_INFO).exists()), None)
    if info is not None and not (final.folder / MODEL_INFO).exists():
        atomic_write_json(final.folder / MODEL_INFO, json.loads(info.read_text()))
    added = 0
    for r, run in sorted(new.values(), key=lambda x: x[0].get("position", 0)):
        tensors = run.tensors(r) if r.get("tensors") else None
        row = {k: v for k, v in r.items() if k != "tensors"}
        added += final.add([row], {0: tensors} if tensors else None)
    return final, added


def merge(out: str | Path, model: str | None = None) -> list[dict]:
    """Merge every sharded evaluation in the store at `out` (or only `model`'s)."""
    store = ResultsStore(out)
    groups = {}
    for run in store.runs():
        if "shard" in run.meta["params"] and (model is None or run.meta["model"] == model):
            p = base_params(run)
            groups[(run.meta["model"], run.meta["model_hash"], settings_hash(p))] = (run.meta["model"],
                                                                                     run.meta["model_hash"], p)
    report = []
    for m, h, p in groups.values():
        final, added = merge_runs(store, m, h, p)
        report.append(dict(model=m, benchmark=p.get("benchmark"), method=p.get("method"), run=str(final.folder),
                           added=added, rows=len(read_rows(final))))
    return report


# ---------------------------------------------------------------- one instance

def row_of(ex: Example, trace, prompt, spec, harness: str, seconds: float, device: str) -> dict:
    """One results row from an example and its trace."""
    seg = trace.segments[0] if trace.segments else None
    letter = extract(harness, ex.benchmark, trace.clean_text, list(ex.options), spec.answer_format)
    strict = None if trace.parsed_index is None else LETTERS[trace.parsed_index]
    grid = [int(v) for v in prompt.image_grid_thw[0].tolist()]
    return dict(
        **ex.fields(), condition=CONDITION, method=spec.method, harness=harness,
        pred=letter, correct=letter == ex.answer_letter, unparsed=letter is None,
        pred_strict=strict, correct_strict=strict == ex.answer_letter, unparsed_strict=bool(trace.unparsed),
        pred_logprob=trace.answer, correct_logprob=trace.answer == ex.answer_letter,
        logprobs=None if trace.answer_logprobs is None else [round(v, 6) for v in trace.answer_logprobs],
        text=trace.text, clean_text=trace.clean_text, n_generated=len(trace.generated_ids), stop=trace.stop,
        segments=spec.has_segments, opened=seg is not None,
        triggered=bool(trace.triggered) if spec.has_segments else None,
        forced=None if seg is None else bool(seg.forced), k=trace.k, ended=None if seg is None else seg.ended,
        p_start=None if seg is None or seg.p_start is None else round(float(seg.p_start), 6),
        nan=bool(trace.nan), grid=grid, image_tokens=grid[0] * grid[1] * grid[2] // 4,
        prompt_tokens=len(trace.prompt_ids), seconds=round(seconds, 3), device=device)


# ---------------------------------------------------------------- the evaluation

MODEL_INFO = "model.json"  # beside a run's rows: what was loaded, how, where


def model_info(s: Settings, info: dict, device: str) -> dict:
    """The loaded model as a run records it: checkpoint folder, token ids, head, pixel bounds,
    the loader's report of missing and unexpected weights, device and library versions."""
    import transformers

    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return dict(checkpoint=str(s.model.resolve()), method=s.method, **info, device=device, gpu=gpu,
                torch=torch.__version__, transformers=transformers.__version__)


def _process_state(device: str | None):
    """(rank, world, device, state) under `accelerate launch`, or (0, 1, device, None)."""
    import os

    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or (device or "").startswith("cpu")
    state = PartialState(cpu=cpu)  # on CPUs, accelerate needs cpu=True to see the launcher's processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise RuntimeError(f"launched as {launched} processes but accelerate sees {state.num_processes}; every "
                           "process would write the same rows")
    if cpu:
        device = "cpu"
    elif device is None or device == "cuda":
        device = str(state.device) if state.num_processes > 1 else "cuda"
    return state.process_index, state.num_processes, device, state


def evaluate(s: Settings) -> dict:
    """Run (or resume) one evaluation; returns what was done (rows written, the run folder)."""
    set_threads()
    torch.manual_seed(0)
    rank, world, device, state = _process_state(s.device)
    examples = load_benchmark(s.benchmark, s.data, s.limit)
    r = load_model(s.model, s.method, s.benchmark, s.harness, device, DTYPES[s.dtype], s.min_pixels, s.max_pixels)
    info = describe(r)
    if s.force_latent and not r.spec.has_segments:
        raise ValueError(f"method {s.method!r} ({s.model}) has no latent segment; --force-latent does not apply")
    max_new = s.max_new_tokens or preset(s.method).max_new_tokens
    params = dict(track="real", benchmark=s.benchmark, method=s.method, harness=s.harness,
                  force_latent=s.force_latent, max_new_tokens=max_new, decoding="greedy",
                  min_pixels=info["min_pixels"], max_pixels=info["max_pixels"], spec=info["spec"],
                  data=file_fingerprint(data_file(s.benchmark, s.data)))
    store = ResultsStore(s.out)
    model_hash = checkpoint_fingerprint(s.model)
    own = store.run(s.model_name, model_hash, params if world == 1 else {**params, "shard": [rank, world]})
    atomic_write_json(own.folder / MODEL_INFO, model_info(s, info, device))
    done = {row["item"] for run in sibling_runs(store, s.model_name, model_hash, params) for row in read_rows(run)
            if row.get("condition") == CONDITION}
    mine = [ex for i, ex in enumerate(examples) if i % world == rank and ex.id not in done]
    cfg = DecodeConfig(max_new_tokens=max_new, force_latent=s.force_latent)
    label = f"{s.model_name} {s.benchmark}" + (f" [{rank + 1}/{world}]" if world > 1 else "")
    bar = tqdm(total=len(mine), desc=label, disable=not s.progress, dynamic_ncols=True, mininterval=1.0)
    written = 0
    for at in range(0, len(mine), s.batch_size):
        batch = mine[at:at + s.batch_size]
        t0 = time.perf_counter()
        images = [ex.load_image() for ex in batch]
        prompts = [r.prompt(ex.query(im)) for ex, im in zip(batch, images)]
        for ex, im, p in zip(batch, images, prompts):
            try:
                check_grid(r.processor, [im.size], p.image_grid_thw)
            except ValueError as exc:
                raise ValueError(f"{ex.source}: {exc}") from exc
        traces = r.generate(prompts, config=cfg)
        seconds = (time.perf_counter() - t0) / len(batch)
        rows = [row_of(ex, t, p, r.spec, s.harness, seconds, device) for ex, t, p in zip(batch, traces, prompts)]
        tensors = None
        if s.save_latents:
            tensors = {i: {"z_in": t.segments[0].z_in, "z_out": t.segments[0].z_out} for i, t in enumerate(traces)
                       if t.segments and t.segments[0].z_in is not None and t.segments[0].z_out is not None}
        written += own.add(rows, tensors)
        bar.update(len(batch))
    bar.close()
    merged = 0
    if world > 1:
        state.wait_for_everyone()
    if rank == 0 and (world > 1 or any("shard" in x.meta["params"]
                                       for x in sibling_runs(store, s.model_name, model_hash, params))):
        _, merged = merge_runs(store, s.model_name, model_hash, params)
    final = store.run(s.model_name, model_hash, params) if rank == 0 else own
    if final is not own and not (final.folder / MODEL_INFO).exists():
        atomic_write_json(final.folder / MODEL_INFO, model_info(s, info, device))
    return dict(rank=rank, world=world, device=device, examples=len(examples), todo=len(mine), written=written,
                merged=merged, run=str(final.folder), params=params, model_hash=model_hash)


def settings_dict(s: Settings) -> dict:
    d = asdict(s)
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}
