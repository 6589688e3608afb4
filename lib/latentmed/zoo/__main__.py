"""Command line of the zoo: `python -m latentmed.zoo --help`."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import __doc__ as ZOO_DOC
from .build import train_zoo
from .evaluate import evaluate_zoo, summarize
from .recipes import BUDGETS, METHODS


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentmed.zoo", description=ZOO_DOC.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="methods: " + ", ".join(METHODS))
    p.add_argument("--budget", choices=list(BUDGETS), default="default",
                   help="default: the main build (about 15 min of training on 2 shared cores); ci: a few steps per model")
    p.add_argument("--methods", nargs="*", default=None, metavar="METHOD",
                   help="models to train (the base is always trained first); default: all")
    p.add_argument("--models-dir", type=Path, default=None, help="zoo folder (default: models/zoo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain even if trained with the same settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--evaluate", action="store_true", help="then evaluate every model on the test split")
    a = p.parse_args(argv)
    try:
        run(a)
    except (ValueError, OSError) as exc:  # bad input: the message names the file or argument
        p.exit(1, f"{p.prog}: error: {exc}\n")


def run(a) -> None:
    df = train_zoo(a.models_dir, a.budget, a.methods, a.seed, a.force, progress=not a.no_progress)
    print(df.to_string(index=False))
    if a.evaluate:
        summary = summarize(evaluate_zoo(a.models_dir))
        cols = ["model", "family", "n", "accuracy", "ci_low", "ci_high", "trigger_rate", "k_mean", "nonfinite"]
        print(summary[cols].round(3).to_string(index=False))


if __name__ == "__main__":
    main()
