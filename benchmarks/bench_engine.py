"""Engine benchmark: shared-work sweep vs naive sweep, and our decode loop vs HF generate.

(a) Sweep: per instance, a prompt with one image (224 px = 64 merged image tokens), a forced
    latent segment of K latents, then a few answer tokens; M latent-feed interventions run as
    `shared_sweep` (one prefill, one batch from the branch point) and as `naive_sweep` (every
    variant from scratch). Reports the time ratio and checks the outputs are equal.
(b) Loop overhead: the same plain-text greedy generation with our loop and with HF `generate`.

Writes JSON to benchmarks/results/engine-<device>.json (kept in the repo) (device, versions, date, numbers).
Run: .venv/bin/python benchmarks/bench_engine.py --help (or as part of `.venv/bin/python -m benchmarks`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from latentmed.engine import interventions as I  # noqa: E402
from latentmed.engine.reasoner import LatentReasoner  # noqa: E402
from latentmed.engine.sweep import naive_sweep, shared_sweep  # noqa: E402
from latentmed.engine.tiny import make_tiny_checkpoint  # noqa: E402

OPTIONS = ["red", "green", "blue", "yellow"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--size", default="test", help="tiny model size from tiny.SIZES (default: test)")
    ap.add_argument("--model", default=None, help="checkpoint folder to use instead of a random tiny model")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    ap.add_argument("--instances", type=int, default=3, help="instances in the sweep (default: 3)")
    ap.add_argument("--interventions", type=int, default=16, help="latent-feed variants per instance")
    ap.add_argument("--k", type=int, default=8, help="latents per segment (default: 8)")
    ap.add_argument("--answer-tokens", type=int, default=8, help="tokens after the segment (default: 8)")
    ap.add_argument("--image-size", type=int, default=224, help="image side in px (default: 224)")
    ap.add_argument("--gen-tokens", type=int, default=64, help="tokens in the overhead test (default: 64)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats, median reported (default: 5)")
    ap.add_argument("--out", default=None, help="output JSON (default: benchmarks/results/engine-<device>.json)")
    ap.add_argument("--no-write", action="store_true", help="return the result without writing it")
    return ap.parse_args(argv)


def scene(seed: int, size: int) -> Image.Image:
    """A grey image with a few coloured squares placed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    im = Image.new("RGB", (size, size), (200, 200, 200))
    d = ImageDraw.Draw(im)
    for _ in range(5):
        x, y = (torch.randint(0, size - 24, (2,), generator=g)).tolist()
        d.rectangle([x, y, x + 20, y + 20], fill=tuple(torch.randint(0, 256, (3,), generator=g).tolist()))
    return im


def latent_variants(z: torch.Tensor, n: int) -> list:
    """n latent-feed interventions built from one clean run's latents z [K, H]."""
    base = [I.ZeroLatent(), I.FixedLatent(vector=z[0].tolist()), I.MeanLatent(vector=z.mean(0).tolist()),
            I.ExtremeLatent(value=100.0), I.SwapLatent(source=z.flip(0).tolist()),
            I.ShuffleLatents(seed=1, source=z.tolist())]
    noise = [I.NoiseLatent(scale=s, mode=m, seed=i) for i, (s, m) in
             enumerate([(s, m) for m in ("add", "replace") for s in (0.1, 0.3, 1.0, 3.0, 10.0)] * 4)]
    return (base + noise)[:n]


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of `repeats` calls (after one warm-up call), and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def same(a, b) -> tuple[bool, float]:
    """Equal tokens, and the largest log-prob difference, over two lists of traces."""
    tokens = all(x.generated_ids == y.generated_ids for x, y in zip(a, b))
    diff = max(float((x.step_option_logprobs - y.step_option_logprobs).abs().max()) for x, y in zip(a, b))
    return tokens, diff


def bench_sweep(path: Path, args) -> dict:
    r = LatentReasoner.from_pretrained(path, method="monet-sft", device=args.device, n_latents=args.k)
    kw = dict(max_new_tokens=1 + args.k + 1 + args.answer_tokens, force_latent=True)
    rows = []
    for i in range(args.instances):
        p = r.build_inputs(scene(i, args.image_size), "What colour is the square?", OPTIONS)
        z = r.generate(p, **kw).segments[0].z_in
        vs = latent_variants(z, args.interventions)
        t_shared, a = timed(lambda: shared_sweep(r, p, vs, **kw), args.repeats)
        t_naive, b = timed(lambda: naive_sweep(r, p, vs, **kw), args.repeats)
        tokens, diff = same(a, b)
        rows.append(dict(instance=i, prompt_tokens=p.input_ids.shape[1],
                         image_tokens=int((p.input_ids == r.ids.image).sum()), shared_s=t_shared,
                         naive_s=t_naive, ratio=t_naive / t_shared, tokens_equal=tokens, max_logprob_diff=diff))
    return dict(setting=dict(method="monet-sft", k=args.k, interventions=args.interventions,
                             answer_tokens=args.answer_tokens, image_size=args.image_size, **kw),
                per_instance=rows, ratio=statistics.median(r_["ratio"] for r_ in rows),
                outputs_equal=all(r_["tokens_equal"] and r_["max_logprob_diff"] < 1e-4 for r_ in rows))


def bench_overhead(path: Path, args) -> dict:
    r = LatentReasoner.from_pretrained(path, method="direct", device=args.device)
    p = r.build_inputs(None, "What colour is the star? Where is the red circle relative to the blue square?")
    ids = p.input_ids.to(r.device)
    n = args.gen_tokens

    def ours():
        return r.generate(p, max_new_tokens=n).generated_ids

    def hf():
        with torch.inference_mode():
            out = r.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False)
        return out[0, ids.shape[1]:].tolist()

    ours(), hf()
    t_ours, t_hf = [], []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        t_ours.append(timed(ours, 1)[0])
        t_hf.append(timed(hf, 1)[0])
    a, b = ours(), hf()
    return dict(setting=dict(method="direct", new_tokens=n, prompt_tokens=ids.shape[1]),
                ours_s=statistics.median(t_ours), hf_generate_s=statistics.median(t_hf),
                ratio=statistics.median(t_ours) / statistics.median(t_hf),
                tokens_equal=a == b[:len(a)] and len(a) == n)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else make_tiny_checkpoint(Path(tmp) / "ckpt", size=args.size)
        result = dict(benchmark="engine", **common.provenance(args.device),
                      model=args.model or f"tiny random ({args.size})",
                      sweep=bench_sweep(path, args), loop_overhead=bench_overhead(path, args))
    s, o = result["sweep"], result["loop_overhead"]
    result["outputs_equal"] = bool(s["outputs_equal"] and o["tokens_equal"])
    common.finish(result)
    print(f"sweep: shared-work {s['ratio']:.1f}x faster than naive (outputs equal: {s['outputs_equal']})")
    print(f"loop: ours / HF generate = {o['ratio']:.3f} (tokens equal: {o['tokens_equal']})")
    if not args.no_write:
        out = common.write_result(result, "engine", args.device, path=args.out)
        print(f"wrote {common.rel(out)}")
    return result


if __name__ == "__main__":
    main()
