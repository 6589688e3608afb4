"""`python -m latentmed.real`: the real track's command line, one subcommand per step.

    python -m latentmed.real eval --model DIR --method monet --benchmark vstar --data DIR --out RESULTS
    accelerate launch --num_processes 8 -m latentmed.real eval ...      # sharded; merges at the end
    python -m latentmed.real merge --out RESULTS                        # merge shards by hand
    python -m latentmed.real check --benchmark hrbench8k --data DIR --images
    python -m latentmed.real report --out RESULTS
    python -m latentmed.real presets

Subcommands are registered in `COMMANDS` with `command(name, help)`: a function that adds its
arguments to a parser and returns the function that runs it. The study's analyses
(interventions, perturbations, probing, mediation) are added the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from ..engine.spec import METHODS
from .benchmarks import BENCHMARKS
from .harness import HARNESSES

COMMANDS: dict[str, tuple[str, Callable]] = {}


def command(name: str, help: str):
    """Register a subcommand: the decorated function takes an argparse parser, adds its
    arguments and returns the handler `run(args) -> int | None`."""
    def wrap(fn):
        COMMANDS[name] = (help, fn)
        return fn
    return wrap


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


@command("eval", "evaluate a checkpoint folder on a benchmark (rows in the results store; resumable; "
                 "shards under accelerate launch)")
def _eval(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors, tokenizer, "
                   "preprocessor_config.json)")
    p.add_argument("--method", required=True, choices=METHODS, help="how the checkpoint decodes "
                   "(see `presets`): direct = Qwen2.5-VL-7B-Instruct, monet, monet-sft, lvr, mirage, capimagine")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--data", required=True, help="the benchmark's folder (or its question file) in the published "
                   "layout; see README 'Run on real checkpoints'")
    p.add_argument("--out", required=True, help="results folder (a results store; one run per model and settings)")
    p.add_argument("--limit", type=_positive, help="only the first N questions of the benchmark")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available; under accelerate launch each "
                   "process takes its own GPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--force-latent", action="store_true", help="open the latent segment right after the prompt "
                   "(Monet may never open it on its own; the natural trigger is recorded either way)")
    p.add_argument("--harness", default="vlmevalkit", choices=HARNESSES,
                   help="whose prompts and answer rules to use (default: vlmevalkit, as the paper's numbers)")
    p.add_argument("--max-new-tokens", type=_positive, help="default: the method's preset")
    p.add_argument("--min-pixels", type=_positive, help="default: the method's released evaluation setting")
    p.add_argument("--max-pixels", type=_positive, help="default: the method's released evaluation setting")
    p.add_argument("--batch-size", type=_positive, default=1, help="prompts decoded together (default 1, as the "
                   "official loops)")
    p.add_argument("--save-latents", action="store_true", help="store each instance's latents (Z in and out) "
                   "with its row")
    p.add_argument("--name", help="model name in the results (default: the folder's name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a) -> int:
        from .evaluate import Settings, evaluate
        from .report import format_summary, summary

        s = Settings(model=a.model, method=a.method, benchmark=a.benchmark, data=a.data, out=a.out,
                     harness=a.harness, force_latent=a.force_latent, max_new_tokens=a.max_new_tokens,
                     min_pixels=a.min_pixels, max_pixels=a.max_pixels, limit=a.limit, device=a.device,
                     dtype=a.dtype, batch_size=a.batch_size, save_latents=a.save_latents, name=a.name,
                     progress=not a.no_progress)
        done = evaluate(s)
        tag = f"[eval {done['rank'] + 1}/{done['world']}]" if done["world"] > 1 else "[eval]"
        print(f"{tag} {done['written']} rows written ({done['todo']} to do of {done['examples']}) "
              f"on {done['device']}; run: {done['run']}", file=sys.stderr)
        if done["rank"] == 0:
            table = summary(a.out, model=s.model_name)
            if len(table):
                print(format_summary(table))
        return 0
    return run


@command("merge", "merge the shard runs of sharded evaluations into one-process runs")
def _merge(p: argparse.ArgumentParser):
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--name", help="only this model (default: every model in the folder)")

    def run(a) -> int:
        from .evaluate import merge

        rows = merge(a.out, a.name)
        if not rows:
            print(f"[merge] no shard runs in {a.out}")
        for r in rows:
            print(f"[merge] {r['model']} {r['benchmark']} ({r['method']}): {r['added']} rows added, "
                  f"{r['rows']} in {r['run']}")
        return 0
    return run


@command("check", "check a benchmark folder against its published format (every row; --images decodes "
                  "every image)")
def _check(p: argparse.ArgumentParser):
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--data", required=True)
    p.add_argument("--images", action="store_true", help="decode every image in full")

    def run(a) -> int:
        from collections import Counter

        from .benchmarks import check_images, load_benchmark

        ex = load_benchmark(a.benchmark, a.data)
        n = check_images(ex) if a.images else 0
        cats = Counter(e.category for e in ex)
        print(f"[check] {a.benchmark}: {len(ex)} questions ({', '.join(f'{k}: {v}' for k, v in cats.items())})"
              + (f"; {n} images decoded" if a.images else ""))
        return 0
    return run


@command("report", "accuracy tables of the evaluations in a results folder, beside the paper's")
def _report(p: argparse.ArgumentParser):
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--json", action="store_true", help="print the table as JSON lines")

    def run(a) -> int:
        from .report import format_summary, summary

        table = summary(a.out)
        if not len(table):
            print(f"[report] no finished real-track runs in {a.out}")
            return 0
        if a.json:
            for row in table.to_dict("records"):
                print(json.dumps(row, default=str))
        else:
            print(format_summary(table))
        return 0
    return run


@command("presets", "list the model presets (method, checkpoint, pixel bounds, token budget)")
def _presets(p: argparse.ArgumentParser):
    def run(a) -> int:
        from .presets import presets_table

        for row in presets_table():
            print("  ".join(f"{k}={v}" for k, v in row.items()))
        return 0
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m latentmed.real",
        description="The real track: released 7B checkpoints (Qwen2.5-VL-7B-Instruct, Monet-7B, Monet-SFT-7B, LVR-7B, "
                    "Mirage, CapImagine-7B) on V* Bench, HR-Bench 4K/8K and MME-RealWorld-Lite from local files.",
        epilog="Sharded: accelerate launch --num_processes N -m latentmed.real eval ... (one process per GPU); "
               "the shards are merged at the end (or with `merge`).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_run=add(sp))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args) or 0
    except (FileNotFoundError, ValueError) as exc:  # bad input: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
