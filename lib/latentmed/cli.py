"""Command line: `latentmed build` (the main job) and its steps. `latentmed --help` lists them."""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from . import book, pipeline
from .paths import ROOT

TEST_FOLDERS = ROOT / "build" / "test"  # the test suite's data, models and results (scripts/test.sh)


def _timed(label: str, fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    print(f"[{label}] done in {time.perf_counter() - t0:.1f} s")
    return out


def cmd_train(args) -> None:
    from . import zoo

    _timed("train", zoo.train_zoo, budget="ci" if args.profile == "ci" else "default")


def cmd_notebooks(args) -> None:
    _timed("notebooks", book.execute_all, force=args.force, profile=args.profile)


def cmd_html(args) -> None:
    index = _timed("html", book.build_html, force=args.force)
    print(f"[html] open {index}")


def cmd_build(args) -> None:
    pipeline.build(args.profile, args.force, args.skip_train, lanes=args.workers)


def cmd_job(args) -> None:
    t0 = time.perf_counter()
    pipeline.run_job(" ".join(args.name), args.profile, args.force)
    print(f"[job] {' '.join(args.name)} done in {time.perf_counter() - t0:.1f} s")


def cmd_nbval(args) -> None:
    from .paths import pin_cpu_kernels

    pin_cpu_kernels()  # the kernels compute as the tests' kernels do
    for name in ("DATA", "MODELS", "RESULTS"):  # start from empty folders, as a clean clone's test run does
        folder = Path(os.environ[f"LATENTMED_{name}"])
        if folder == TEST_FOLDERS / name.lower() and folder.exists():
            print(f"[nbval] emptying {folder}")
            shutil.rmtree(folder)
    for path in book.refresh_nbval():
        print(f"[nbval] wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="latentmed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    steps = {
        "build": (cmd_build, "everything: testbed, models, notebooks, HTML book, several jobs at a time "
                             "(reuses what is built)"),
        "testbed": (lambda a: _timed("testbed", pipeline.make_testbed, a.profile),
                    "generate the synthetic testbed into data/testbed"),
        "train": (cmd_train, "train the testbed model zoo into models/"),
        "notebooks": (cmd_notebooks, "execute the chapters with papermill into book/chapters"),
        "html": (cmd_html, "build the Jupyter Book into _build/html"),
        "job": (cmd_job, "one job of the build: testbed, banks, 'model NAME', 'chapter NAME' or html"),
        "nbval-refresh": (cmd_nbval, "re-execute the CI copies in tests/notebooks (then commit them)"),
    }
    for name, (fn, help_) in steps.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        p.add_argument("--profile", choices=["default", "ci"], default="default",
                       help="default: full sizes; ci: small sizes for a quick check")
        p.add_argument("--force", action="store_true", help="redo steps even if up to date")
        if name == "build":
            p.add_argument("--skip-train", action="store_true", help="do not train models (use those there are)")
            p.add_argument("--workers", type=int, default=None, metavar="N",
                           help="threads' worth of jobs at a time (default: LATENTMED_WORKERS, else the number "
                                "of cores; each job but the base model runs on one thread)")
        if name == "job":
            p.add_argument("name", nargs="+", help="the job, e.g. testbed, banks, model base, chapter 02_zoo, html")
    args = parser.parse_args(argv)
    if args.profile == "ci":  # keep the small run's files apart from the full build
        for name in ("DATA", "MODELS", "RESULTS"):
            os.environ.setdefault(f"LATENTMED_{name}", str(ROOT / "build" / "ci" / name.lower()))
    if args.command == "nbval-refresh":  # the CI copies run on the test suite's folders, as test.sh does
        for name in ("DATA", "MODELS", "RESULTS"):
            os.environ.setdefault(f"LATENTMED_{name}", str(TEST_FOLDERS / name.lower()))
    try:
        args.fn(args)
    except (ValueError, OSError, pipeline.BuildFailed) as exc:  # bad input or a failed job: the message names it
        parser.exit(1, f"latentmed: error: {exc}\n")


if __name__ == "__main__":
    main()
