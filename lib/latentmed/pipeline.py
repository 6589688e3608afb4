"""The main build as a graph of jobs, several at a time (`latentmed build`).

The jobs are the testbed, the shared base model, the feature banks some fine-tunes read beyond the
base's own (evidence crops, degraded scenes), every model of the zoo and of chapter 10's dose
series, every chapter and the HTML book. A job starts
once the jobs it needs are done; among the ready ones, the one with the longest chain of work
behind it goes first. Each runs in its own process (`latentmed job NAME`) with its own thread
count: these tiny models train and run fastest on one thread, so on two cores two jobs at a time
do about twice the work of one job on both. A job whose result is already there (a model trained
with the same settings, a chapter whose stamp matches) is not started. Every job writes its
output to its own log file; the console gets a line when a job starts or ends and a status line
every minute. A killed build loses nothing that a job finished (each step resumes on its own).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import book
from .paths import ROOT

STATUS_EVERY = 60.0  # seconds between the console's status lines


class BuildFailed(RuntimeError):
    """One or more jobs of the build failed (their logs are named)."""


@dataclass
class Job:
    """One step of the build: what it runs, what it needs, what it is expected to cost."""

    name: str  # "testbed", "model base", "chapter 03_input_to_latent", ...
    needs: tuple[str, ...] = ()
    cost: float = 1.0  # expected seconds (orders the ready jobs; not a limit)
    threads: int = 1
    current: Callable[[], bool] | None = None  # True when its result is already there (asked once ready)
    command: list[str] | None = None  # what runs it (None: `latentmed job NAME`)
    priority: float = field(default=0.0, init=False)

    def argv(self, profile: str, force: bool) -> list[str]:
        """The command that runs this job on its own."""
        if self.command is not None:
            return list(self.command)
        force_arg = ["--force"] if force else []
        return [sys.executable, "-m", "latentmed", "job", self.name, "--profile", profile, *force_arg]


# ---------------------------------------------------------------- the build's jobs

def _model_cost(name: str, budget: str) -> float:
    """Seconds a model is expected to train (about 0.25 s a step on one thread; the base's vision stage is slower)."""
    from .zoo.recipes import BUDGETS, method_stages

    steps = sum(st.cfg.steps for st in method_stages(name, budget))
    return 0.25 * steps + (0.5 * BUDGETS[budget]["vision"] if name == "base" else 0.0)


def build_jobs(profile: str = "default", force: bool = False, lanes: int = 2) -> list[Job]:
    """Every job of the main build with the profile's settings ("default" or "ci")."""
    from .zoo.build import Zoo
    from .zoo.recipes import BASE, DOSE_METHODS, FINE_TUNES, METHODS, needs_more_banks

    budget = "ci" if profile == "ci" else "default"
    chapters = book.available()
    dose = any(c.name == "10_dose" for c in chapters)
    models = [BASE, *FINE_TUNES] + (list(DOSE_METHODS) if dose else [])

    def zoo():
        return Zoo(budget=budget, progress=False)

    def model_current(name):
        return lambda: not force and zoo().is_current(name)

    jobs = [Job("testbed", cost=20.0),
            Job(f"model {BASE}", ("testbed",), _model_cost(BASE, budget), threads=min(2, lanes),
                current=model_current(BASE)),
            Job("banks", (f"model {BASE}",), 60.0,
                current=lambda: not force and all(zoo().is_current(m) for m in models[1:] if needs_more_banks(m, budget)))]
    # a model that trains on the base's own banks starts as soon as the base is done
    jobs += [Job(f"model {m}", ("banks",) if needs_more_banks(m, budget) else (f"model {BASE}",),
                 _model_cost(m, budget), current=model_current(m)) for m in models[1:]]
    zoo_models = tuple(f"model {m}" for m in METHODS)
    dose_models = tuple(f"model {m}" for m in DOSE_METHODS) if dose else ()
    for c in chapters:
        params = c.ci_params if profile == "ci" else {}
        needs = {"data": ("testbed",), "zoo": ("testbed",) + zoo_models,
                 "dose": ("testbed",) + zoo_models + dose_models, "none": ()}[c.needs]
        needs += tuple(f"chapter {a}" for a in c.after if any(x.name == a for x in chapters))
        def current(c=c, params=params):
            return not force and book.is_current(c, book.CHAPTERS_OUT, params)

        jobs.append(Job(f"chapter {c.name}", needs, c.cost, current=current))
    jobs.append(Job("html", tuple(f"chapter {c.name}" for c in chapters), 10.0))
    return jobs


def make_testbed(profile: str = "default") -> None:
    """The testbed of the profile's sizes into data/testbed (kept when its settings match)."""
    from .paths import data_dir
    from .testbed.dataset import ensure
    from .testbed.items import TestbedConfig

    ensure(TestbedConfig(**(book.CI_TESTBED if profile == "ci" else {})), data_dir() / "testbed")


def run_job(name: str, profile: str = "default", force: bool = False) -> None:
    """Run one job in this process (what `latentmed job NAME` does)."""
    from .files import set_threads

    set_threads()
    budget = "ci" if profile == "ci" else "default"
    if name == "testbed":
        make_testbed(profile)
    elif name == "banks":
        from .zoo.build import Zoo
        from .zoo.recipes import DOSE_METHODS, FINE_TUNES, needs_more_banks

        Zoo(budget=budget).prepare_banks([m for m in (*FINE_TUNES, *DOSE_METHODS) if needs_more_banks(m, budget)])
    elif name.startswith("model "):
        from .zoo.build import Zoo

        model = name.split(" ", 1)[1]
        t0 = time.perf_counter()
        info = Zoo(budget=budget, progress=False).train_method(model, force=force)
        what = "reused" if info.get("skipped") else f"trained in {time.perf_counter() - t0:.0f} s"
        print(f"[zoo] {model}: {what}, validation accuracy {info['stages'][-1].get('best_val')}")
    elif name.startswith("chapter "):
        chapter = book.chapter(name.split(" ", 1)[1])
        book.execute(chapter, book.CHAPTERS_OUT, chapter.ci_params if profile == "ci" else {}, force)
    elif name == "html":
        print(f"[html] open {book.build_html(force=force)}")
    else:
        raise ValueError(f"unknown job {name!r} (testbed, banks, model NAME, chapter NAME, html)")


# ---------------------------------------------------------------- the scheduler

def prioritise(jobs: list[Job]) -> None:
    """Each job's priority: its cost plus the longest chain of costs of the jobs that need it."""
    by_name = {j.name: j for j in jobs}
    unknown = sorted({n for j in jobs for n in j.needs} - set(by_name))
    if unknown:
        raise ValueError(f"jobs need unknown jobs: {', '.join(unknown)}")
    needed_by: dict[str, list[Job]] = {j.name: [] for j in jobs}
    for j in jobs:
        for n in j.needs:
            needed_by[n].append(j)
    done: dict[str, float] = {}

    def chain(j: Job, stack=()) -> float:
        if j.name in stack:
            raise ValueError(f"jobs need each other in a cycle: {' -> '.join(stack + (j.name,))}")
        if j.name not in done:
            done[j.name] = j.cost + max((chain(k, stack + (j.name,)) for k in needed_by[j.name]), default=0.0)
        return done[j.name]

    for j in jobs:
        j.priority = chain(j)


@dataclass
class Result:
    name: str
    status: str  # done | current | failed | blocked
    seconds: float = 0.0
    start: float = 0.0
    log: Path | None = None


def run(jobs: list[Job], lanes: int, log_dir: Path, profile: str = "default", force: bool = False,
        echo=print) -> dict[str, Result]:
    """Run `jobs` at most `lanes` threads' worth at a time, each in its own process; returns every
    job's result. A failed job blocks the jobs that need it; the others go on."""
    prioritise(jobs)
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Result] = {}
    pending = sorted(jobs, key=lambda j: -j.priority)
    running: dict[str, tuple[subprocess.Popen, float, Job, object]] = {}
    t0 = last_status = time.perf_counter()
    while pending or running:
        for j in list(pending):  # blocked by a failure
            bad = [n for n in j.needs if n in results and results[n].status in ("failed", "blocked")]
            if bad:
                pending.remove(j)
                results[j.name] = Result(j.name, "blocked")
                echo(f"[job] {j.name}: not run ({bad[0]} failed)")
        used = sum(job.threads for _, _, job, _ in running.values())
        for j in list(pending):
            if not all(n in results and results[n].status in ("done", "current") for n in j.needs):
                continue
            threads = min(j.threads, lanes)
            if used + threads > lanes:
                break  # the most urgent ready job waits for room: lesser jobs must not take it first
            pending.remove(j)
            if j.current is not None and j.current():
                results[j.name] = Result(j.name, "current", start=time.perf_counter() - t0)
                echo(f"[job] {j.name}: up to date")
                continue
            log = log_dir / (j.name.replace(" ", "-") + ".log")
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                       LATENTMED_THREADS=str(threads), PYTHONUNBUFFERED="1")
            f = open(log, "w")
            proc = subprocess.Popen(j.argv(profile, force), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
            running[j.name] = (proc, time.perf_counter(), j, f)
            used += threads
            echo(f"[job] {j.name}: started ({threads} thread{'s' if threads > 1 else ''}, log {_rel(log)})")
        finished = [n for n, (p, *_) in running.items() if p.poll() is not None]
        for n in finished:
            proc, start, j, f = running.pop(n)
            f.close()
            secs = time.perf_counter() - start
            log = log_dir / (j.name.replace(" ", "-") + ".log")
            ok = proc.returncode == 0
            results[n] = Result(n, "done" if ok else "failed", secs, start - t0, log)
            echo(f"[job] {n}: {'done' if ok else f'FAILED (exit {proc.returncode})'} in {secs:.1f} s")
            if not ok:
                tail = log.read_text(errors="replace").splitlines()[-25:]
                echo("\n".join(f"    | {line}" for line in tail))
        if not finished:
            if running and time.perf_counter() - last_status >= STATUS_EVERY:
                last_status = time.perf_counter()
                echo(f"[build] +{last_status - t0:.0f} s: running {', '.join(running)}; "
                     f"{len(results)} of {len(jobs)} jobs finished")
            time.sleep(0.2)
    return results


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def lanes_default() -> int:
    """How many threads' worth of jobs run at once: LATENTMED_WORKERS, else the number of cores."""
    n = int(os.environ.get("LATENTMED_WORKERS", os.cpu_count() or 1))
    if n < 1:
        raise ValueError(f"LATENTMED_WORKERS must be an integer >= 1, got {n}")
    return n


def build(profile: str = "default", force: bool = False, skip_train: bool = False, lanes: int | None = None,
          log_dir: Path | None = None, echo=print) -> dict[str, Result]:
    """The main build: every job, `lanes` at a time (default: `lanes_default`). Raises when a job failed."""
    lanes = lanes or lanes_default()
    jobs = build_jobs(profile, force, lanes)
    if skip_train:  # the models are taken as they are: their jobs count as done
        jobs = [j for j in jobs if not (j.name.startswith("model ") or j.name == "banks")]
        for j in jobs:
            j.needs = tuple(n for n in j.needs if not (n.startswith("model ") or n == "banks"))
    log_dir = log_dir or (ROOT / "build" / ("ci" if profile == "ci" else "main") / "logs")
    echo(f"[build] {len(jobs)} jobs, up to {lanes} at a time; each job's output in {_rel(log_dir)}/")
    t0 = time.perf_counter()
    results = run(jobs, lanes, log_dir, profile, force, echo)
    bad = [r for r in results.values() if r.status == "failed"]
    echo(f"[build] done in {time.perf_counter() - t0:.1f} s: "
         f"{sum(r.status == 'done' for r in results.values())} run, "
         f"{sum(r.status == 'current' for r in results.values())} up to date, {len(bad)} failed")
    if bad:
        raise BuildFailed("jobs failed: " + "; ".join(f"{r.name} (log {_rel(r.log)})" for r in bad))
    return results
