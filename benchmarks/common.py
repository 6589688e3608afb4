"""What every benchmark shares: provenance, timing with spread, equality checks, result files.

A timing alone is noise on a shared machine; every headline here is a ratio of two timings
taken in the same run, interleaved (A, B, A, B, ...) so that a change of load hits both, and
every timing is repeated: the best, the median and the spread ((max - min) / best) are kept.
A comparison whose two sides do not give the same outputs is not a measurement: the equality
checks below say so, and `python -m benchmarks` exits non-zero when one fails.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TOL = 1e-4  # log-prob tolerance of every equality check
REQUIRED = ("benchmark", "device", "device_name", "cpu_model", "threads", "torch", "transformers", "python",
            "date", "git_commit", "load_before", "load_after", "outputs_equal")


class OutputsDiffer(AssertionError):
    """Two runs that must give the same outputs did not."""


def log(msg: str) -> None:
    """Progress line (stdout, flushed, with the wall clock)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- provenance

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: Path = ROOT) -> tuple[str, bool]:
    """HEAD's commit and whether the working tree differs from it (tracked files)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip() != ""
        return head, dirty
    except OSError:
        return "", False


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def provenance(device: str = "cpu") -> dict:
    """Where and with what a result was taken (every result file starts with these fields)."""
    import transformers

    commit, dirty = git_commit()
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return dict(device=device.split(":")[0], device_name=torch.cuda.get_device_name(0) if cuda else cpu_model(),
                cpu_model=cpu_model(), cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                platform=platform.platform(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"), git_commit=commit, git_dirty=dirty,
                load_before=load_average())


def finish(result: dict) -> dict:
    """Stamp the load at the end and the peak memory of this process."""
    result["load_after"] = load_average()
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def current_rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover - psutil is pinned
        return float("nan")


# ---------------------------------------------------------------- timing

def sync(device: str = "cpu") -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def stats(times: list[float], cpu: list[float] | None = None) -> dict:
    """Best, median, max and spread ((max - min) / best) of repeated wall-clock timings, and the
    same of the process's CPU time when given (with one thread, CPU time is the work done: other
    jobs on a shared machine inflate wall time far more than CPU time)."""
    best = min(times)
    out = dict(best_s=best, median_s=statistics.median(times), max_s=max(times),
               spread=(max(times) - best) / best if best > 0 else 0.0, n=len(times), all_s=list(times))
    if cpu:
        cb = min(cpu)
        out.update(cpu_best_s=cb, cpu_median_s=statistics.median(cpu), cpu_spread=(max(cpu) - cb) / cb if cb > 0 else 0.0,
                   cpu_all_s=list(cpu))
    return out


class Clock:
    """Wall and process CPU time of one block (`with Clock() as c: ...; c.wall, c.cpu`)."""

    def __init__(self, device: str = "cpu"):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        return False


def timed(fn, repeats: int = 3, warmup: int = 1, device: str = "cpu") -> tuple[dict, object]:
    """`repeats` timed calls after `warmup` untimed ones: (stats, the last output)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times, cpu = [], []
    for _ in range(repeats):
        with Clock(device) as c:
            out = fn()
        times.append(c.wall)
        cpu.append(c.cpu)
    return stats(times, cpu), out


def interleaved(ways: dict, repeats: int = 3, warmup: int = 1, device: str = "cpu") -> dict:
    """Every way once per repeat, in turn (so drifting load hits all alike): stats per way, the
    range of the per-repeat ratios of the last way (the baseline) to each other (wall and CPU
    time), and the last outputs of each way."""
    for _ in range(warmup):
        for fn in ways.values():
            fn()
    times = {k: [] for k in ways}
    cpu = {k: [] for k in ways}
    outs = {}
    for _ in range(repeats):
        for k, fn in ways.items():
            with Clock(device) as c:
                outs[k] = fn()
            times[k].append(c.wall)
            cpu[k].append(c.cpu)
    base = list(ways)[-1]

    def rng(t, k):
        pair = [b / a for a, b in zip(t[k], t[base])]
        return [min(pair), max(pair)]

    return {**{k: stats(times[k], cpu[k]) for k in ways}, "ratios": {f"{base}/{k}": rng(times, k) for k in ways if k != base},
            "cpu_ratios": {f"{base}/{k}": rng(cpu, k) for k in ways if k != base}, "outputs": outs}


# ---------------------------------------------------------------- equality checks

def _lp_diff(a, b) -> float:
    """Largest absolute difference of two log-prob tensors (inf when shapes differ or one is missing)."""
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return float("inf")
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    d = (a - b).abs()
    d = torch.where(torch.isnan(a) & torch.isnan(b), torch.zeros_like(d), d)
    return float(d.nan_to_num(float("inf")).max())


def compare_traces(a: list, b: list, tol: float = TOL) -> dict:
    """Two lists of traces: same generated tokens, same segments, step log-probs within `tol`."""
    if len(a) != len(b):
        return dict(equal=False, tokens_equal=False, max_logprob_diff=float("inf"), n=len(a), mismatches=[-1])
    bad, diff, tokens = [], 0.0, True
    for i, (x, y) in enumerate(zip(a, b)):
        same_tok = list(x.generated_ids) == list(y.generated_ids)
        same_seg = [list(s.slots) for s in x.segments] == [list(s.slots) for s in y.segments]
        d = _lp_diff(x.step_option_logprobs, y.step_option_logprobs)
        diff = max(diff, d)
        tokens = tokens and same_tok
        if not (same_tok and same_seg and d <= tol):
            bad.append(i)
    return dict(equal=not bad, tokens_equal=tokens, max_logprob_diff=diff, n=len(a), mismatches=bad[:20])


def compare_rows(a: list[dict], b: list[dict], tol: float = TOL) -> dict:
    """Two sets of measurement rows, matched on (model, item, condition): the same chosen option,
    K, trigger and non-finite flag; log-probs and margin within `tol`."""
    key = lambda r: (r.get("model"), r["item"], r["condition"])  # noqa: E731
    ia, ib = {key(r): _clean(r) for r in a}, {key(r): _clean(r) for r in b}
    missing = sorted(set(ia) ^ set(ib), key=str)
    bad, diff = [], 0.0
    for k in sorted(set(ia) & set(ib), key=str):
        x, y = ia[k], ib[k]
        d = max(_lp_diff(x.get("logprobs"), y.get("logprobs")),
                0.0 if x.get("margin") is None and y.get("margin") is None else
                float("inf") if x.get("margin") is None or y.get("margin") is None else abs(x["margin"] - y["margin"]))
        diff = max(diff, d)
        same = all(x.get(f) == y.get(f) for f in ("chosen", "k", "triggered", "nonfinite"))
        if not same or d > tol:
            bad.append(k)
    return dict(equal=not bad and not missing, max_logprob_diff=diff, n=len(set(ia) & set(ib)),
                mismatches=[list(map(str, k)) for k in bad[:20]], n_mismatches=len(bad),
                unmatched=[list(map(str, k)) for k in missing[:20]], n_unmatched=len(missing))


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def _clean(row: dict) -> dict:
    """A row with pandas' NaN for a missing value read as None (a frame turns None into NaN)."""
    return {k: None if not isinstance(v, (list, tuple, dict)) and _missing(v) else v for k, v in row.items()}


def compare_replays(a: list, b: list, tol: float = TOL) -> dict:
    """Two lists of replay results: same answer, answer and step log-probs within `tol`."""
    if len(a) != len(b):
        return dict(equal=False, max_logprob_diff=float("inf"), n=len(a), mismatches=[-1])
    bad, diff = [], 0.0
    for i, (x, y) in enumerate(zip(a, b)):
        d = max(_lp_diff(x.answer_logprobs, y.answer_logprobs), _lp_diff(x.step_option_logprobs, y.step_option_logprobs))
        diff = max(diff, d)
        if x.answer_index != y.answer_index or list(x.ids) != list(y.ids) or d > tol:
            bad.append(i)
    return dict(equal=not bad, max_logprob_diff=diff, n=len(a), mismatches=bad[:20])


# ---------------------------------------------------------------- result files

def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return str(x)  # JSON has no NaN or infinity
    if isinstance(x, Path):
        return rel(x)
    if hasattr(x, "item") and callable(x.item):
        return x.item()
    return x


def rel(path) -> str:
    """A path as the results show it: relative to the repository when inside it (no machine paths)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return p.name if p.is_absolute() else str(p)


def result_path(name: str, device: str, out_dir: Path | None = None) -> Path:
    return Path(out_dir or RESULTS) / f"{name}-{device.split(':')[0]}.json"


def write_result(result: dict, name: str, device: str = "cpu", out_dir: Path | None = None,
                 path: Path | None = None) -> Path:
    """Write a result to `path` (default: <out_dir>/<name>-<device>.json; JSON written whole, then
    renamed into place) and return its path; a result without the required fields is refused."""
    missing = [f for f in REQUIRED if f not in result]
    if missing:
        raise ValueError(f"result {name!r} lacks the required fields {missing}")
    path = Path(path) if path else result_path(name, device, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_plain(result), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_results(folder: Path | None = None) -> dict[str, dict]:
    """Every result file of a folder, by file stem (e.g. "sweep-cpu")."""
    folder = Path(folder or RESULTS)
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def check_result(result: dict) -> list[str]:
    """The required fields a result lacks (an empty list when it is complete)."""
    return [f for f in REQUIRED if f not in result]
