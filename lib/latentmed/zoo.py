"""The testbed model zoo: one shared base model and the methods fine-tuned from it.

These are *testbed* models (1.4 M parameters, trained from scratch on the synthetic testbed in
minutes on CPU), stand-ins for the paper's Qwen2.5-VL-7B checkpoints, never the paper's models.

    base              vision stage (dense per-cell labels) + grounded QA (attention supervision)
    direct            question -> answer
    capimagine        question -> imagination text (the crop's caption between markers) -> answer
    monet-style       SFT with the crop interleaved; latents (K=10) aligned to the teacher's crop
                      states with the crop still there; then the crop removed, latents aligned to
                      the previous stage's latents
    lvr-style         K=8 latents regressed (MSE, standardised targets) onto the tower's tokens
                      of the evidence cells
    mirage-style      K=4 latents: first the helper (crop) tokens fill the slots and the states
                      before them are aligned to them (cosine + 0.1 CE); then the real latent loop
                      with CE only; the model decides when to end (cap 8)
    positive-control  the main image degraded (56 px), the slots hold the tower's tokens of the
                      evidence crop: the evidence reaches the answer only through Z
    negative-control  the slots hold one constant tensor in training and at inference

Every method keeps the base's layout (`latentmed.layouts`): its segment sits after the
question's key words; then the key words are written again and the answer follows, so the
answer is read at a key word as in the base (docs/zoo-notes.md, layouts A and B). `train_zoo` trains the base once, then each
method, and skips any model whose folder already holds a finished checkpoint with the same
settings (hash in zoo.json). CLI: ``python -m latentmed.zoo --help``.
"""

from __future__ import annotations

import os

# Busy-waiting OpenMP threads make a shared 2-core machine crawl (measured: a tower forward of
# 32 images took 4.3 s with the default policy next to another job, 0.86 s with PASSIVE).
# Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import argparse
import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import layouts
from .paths import data_dir, models_dir
from .spec import LatentSpec, preset
from .testbed import TestbedConfig
from .loop import StageConfig
from .train import (FeatureBank, Plan, build_bank, check_checkpoint, freeze_and_rescale_tower,
                    load_model, reinit_language_model, settings_hash, set_threads, train_stage, vision_stage)

BASE = "base"
ZOO_FILE = "zoo.json"


def _spec(name: str, template: str, **kw) -> LatentSpec:
    """A preset turned into its testbed variant: word answers, no chat system prompt."""
    return layouts.testbed_spec(preset(template), method=name, answer_format="word", system_prompt=None,
                                user_suffix="", assistant_prefix="", **kw)


LATENT_TOKENS = dict(start_token="<|latent_start|>", end_token="<|latent_end|>", pad_token="<|latent_pad|>",
                     placement="after_start")

SPECS: dict[str, LatentSpec] = {
    "base": _spec("base", "direct"),
    "direct": _spec("direct", "direct"),
    "capimagine": _spec("capimagine", "capimagine"),
    "monet-style": _spec("monet-style", "monet-sft", n_latents=10),
    "lvr-style": _spec("lvr-style", "lvr", pad_token="<|lvr|>", n_latents=8),
    "mirage-style": _spec("mirage-style", "mirage", n_latents=4, max_latents=8),
    "positive-control": _spec("positive-control", "mirage", n_latents=4, max_latents=0,
                              end_rule="force_after_k"),
    "negative-control": _spec("negative-control", "mirage", n_latents=4, max_latents=0,
                              end_rule="force_after_k"),
}
METHODS = tuple(SPECS)  # base first: every other model starts from it
FINE_TUNES = METHODS[1:]

# Budgets: steps per stage (batch 16). "default" is the main build, "ci" a quick check.
BUDGETS = {
    "default": dict(vision=250, base=1500, direct=400, capimagine=1000, monet=(150, 150, 300), lvr=500,
                    mirage=(200, 300), positive=400, negative=400, pool=1000, pool_pc=400, val=100,
                    eval_every=200, ft_lr=3e-3, direct_lr=1e-3, seg_w=0.1),
    "ci": dict(vision=12, base=30, direct=10, capimagine=12, monet=(6, 6, 8), lvr=10, mirage=(6, 8),
               positive=10, negative=10, pool=24, pool_pc=24, val=4, eval_every=10, ft_lr=3e-3, direct_lr=1e-3,
               seg_w=0.1),
}


@dataclass(frozen=True)
class Stage:
    """One stage of a method: its plan and optimisation; `teacher` names an earlier stage."""

    plan: Plan
    cfg: StageConfig
    teacher: str | None = None


def method_stages(name: str, budget: str = "default", seed: int = 0) -> list[Stage]:
    """The stages of `name` under `budget` (the base's vision stage is separate)."""
    if name not in SPECS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; known: {', '.join(BUDGETS)}")
    b = BUDGETS[budget]
    spec = SPECS[name]
    ev = b["eval_every"]

    def cfg(stage, steps, lr=b["ft_lr"], warmup=20, keep_best=True, **kw):
        return StageConfig(stage, steps, lr=lr, warmup=min(warmup, max(1, steps // 4)), eval_every=ev,
                           save_every=ev, keep_best=keep_best, seed=seed, **kw)

    grounded = dict(attn_weight=1.0, hop_weight=1.0)
    # latent methods: the start/end markers are supervised lightly (the loop forces them anyway);
    # a full-weight CE on the start token at the key word wrecked the base's answer there
    seg = dict(segment_weight=b["seg_w"])
    if name == "base":
        return [Stage(Plan(spec, **grounded), cfg("qa", b["base"], lr=3e-3, warmup=30, decay_start=0.6))]
    if name == "direct":
        return [Stage(Plan(spec, **grounded), cfg("direct", b["direct"], lr=b["direct_lr"]))]
    if name == "capimagine":
        return [Stage(Plan(spec, **grounded), cfg("capimagine", b["capimagine"]))]
    if name == "monet-style":
        s1, s2, s3 = b["monet"]
        p1 = Plan(spec, n_latents=0, with_crop=True, **seg, **grounded)
        p2 = Plan(spec, n_latents=spec.n_latents, with_crop=True, align="monet_crop_cos", align_weight=1.0,
                  **seg, **grounded)
        p3 = Plan(spec, n_latents=spec.n_latents, align="monet_latent_cos", align_weight=1.0, **seg, **grounded)
        return [Stage(p1, cfg("sft-crop", s1)), Stage(p2, cfg("latent-with-crop", s2), teacher="sft-crop"),
                Stage(p3, cfg("latent", s3), teacher="latent-with-crop")]
    if name == "lvr-style":
        return [Stage(Plan(spec, n_latents=spec.n_latents, align="lvr_mse", align_weight=1.0, **seg, **grounded),
                      cfg("latent", b["lvr"]))]
    if name == "mirage-style":
        s1, s2 = b["mirage"]
        p1 = Plan(spec, n_latents=spec.n_latents, latent_fill="crop", align="mirage_cos", align_weight=1.0,
                  answer_weight=0.1, segment_weight=0.1, **grounded)
        p2 = Plan(spec, n_latents=spec.n_latents, **seg, **grounded)
        return [Stage(p1, cfg("helper-align", s1, keep_best=False)), Stage(p2, cfg("latent", s2))]
    if name == "positive-control":
        return [Stage(Plan(spec, n_latents=spec.n_latents, latent_fill="crop", image="degraded", attn_weight=1.0,
                           evidence_in="slots", hop_weight=1.0, **seg), cfg("positive", b["positive"]))]
    if name == "negative-control":
        return [Stage(Plan(spec, n_latents=spec.n_latents, latent_fill="constant", **seg, **grounded),
                      cfg("negative", b["negative"]))]
    raise AssertionError(name)


def settings(name: str, budget: str, seed: int, config: TestbedConfig, base_hash: str | None = None) -> dict:
    """Everything that defines a trained model (its hash decides whether to retrain)."""
    b = BUDGETS[budget]
    s = dict(method=name, budget=budget, seed=seed, testbed=config.to_dict(), val=b["val"],
             pool=b["pool_pc"] if name == "positive-control" else b["pool"],
             spec=SPECS[name].to_dict(),
             stages=[dict(plan={k: v for k, v in asdict(st.plan).items() if k != "spec"}, cfg=asdict(st.cfg),
                          teacher=st.teacher) for st in method_stages(name, budget, seed)])
    if name == BASE:
        s["vision_steps"] = b["vision"]
        if b.get("llm_layers"):  # default: the testbed config's 2 layers
            s["llm_layers"] = b["llm_layers"]
    else:
        s["base"] = base_hash
    return s


def is_trained(folder: Path, want_hash: str) -> bool:
    f = Path(folder) / ZOO_FILE
    if not f.exists():
        return False
    try:
        info = json.loads(f.read_text())
        check_checkpoint(folder)
    except (json.JSONDecodeError, FileNotFoundError):
        return False
    return info.get("hash") == want_hash and info.get("complete", False)


def read_info(folder: str | Path) -> dict:
    path = Path(folder) / ZOO_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a zoo checkpoint (no {ZOO_FILE})")
    return json.loads(path.read_text())


def testbed_config(path: Path | None = None) -> TestbedConfig:
    """The testbed config of the on-disk dataset (manifest.json), else the default config."""
    path = Path(path) if path else data_dir() / "testbed"
    manifest = path / "manifest.json"
    if manifest.exists():
        d = json.loads(manifest.read_text())
        d = d.get("config", d)
        try:
            return TestbedConfig.from_dict(d)
        except TypeError as exc:
            raise ValueError(f"{manifest}: not a testbed manifest ({exc})") from exc
    return TestbedConfig()


def _concat_curves(folder: Path, stage_dirs: list[Path], offset_stage: str | None = None) -> None:
    import pandas as pd

    frames = [pd.read_csv(d / "curves.csv") for d in stage_dirs if (d / "curves.csv").exists()]
    if frames:
        pd.concat(frames, ignore_index=True).to_csv(folder / "curves.csv", index=False)


def _finish(folder: Path, model, tok, spec: LatentSpec, info: dict, constant=None) -> None:
    from .tiny import save_checkpoint

    from transformers.utils import logging as hf_logging

    model.config._attn_implementation = "sdpa"
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    save_checkpoint(folder, model, tok)
    if bars:
        hf_logging.enable_progress_bar()
    spec.save(folder)
    if constant is not None:
        from safetensors.torch import save_file

        save_file({"latent": constant.contiguous()}, str(folder / layouts.CONSTANT_FILE))
    info["complete"] = True
    (folder / ZOO_FILE).write_text(json.dumps(info, indent=2))


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
        n = b[pool] if split == "train" else b["val"]
        if split == "val" and self.config.n_val:
            n = min(n, max(1, self.config.n_val // len(self.config.families)))
        key = (split, tuple(sorted(kinds)), n)
        if key not in self.banks:
            self.banks[key] = build_bank(model, self.config, split, n, kinds=tuple(sorted(kinds)),
                                         cache_dir=self.root / "_features", progress=self.progress)
        return self.banks[key]

    # ------------------------------------------------------------ base
    def train_base(self, force: bool = False) -> dict:
        from .tiny import tiny_config, tiny_model
        from .tokenizer import build_tokenizer

        folder = self.folder(BASE)
        s = settings(BASE, self.budget, self.seed, self.config)
        s["model_size"] = self.model_size
        h = settings_hash(s)
        if not force and is_trained(folder, h):
            return dict(read_info(folder), skipped=True)
        t0 = _start(folder, force)
        tok = build_tokenizer()
        layers = BUDGETS[self.budget].get("llm_layers")
        model = tiny_model(tiny_config(tok, self.model_size, **({"num_hidden_layers": layers} if layers else {})),
                           seed=self.seed)
        runs = folder / "runs"
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
        _concat_curves(folder, [runs / stage.cfg.name])
        info = dict(name=BASE, hash=h, settings=s, stages=summaries, token_scale=scale, layout="testbed",
                    latent_source="none", seconds=round(time.perf_counter() - t0, 1))
        _finish(folder, model, tok, SPECS[BASE], info)
        shutil.rmtree(runs, ignore_errors=True)
        return info

    def load_base(self):
        folder = self.folder(BASE)
        check_checkpoint(folder)
        model, tok, spec = load_model(folder)
        return model, tok

    # ------------------------------------------------------------ fine-tunes
    def train_method(self, name: str, force: bool = False, base_folder: Path | None = None) -> dict:
        if name not in SPECS:
            raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
        if name == BASE:
            return self.train_base(force)
        base_folder = Path(base_folder) if base_folder else self.folder(BASE)
        base_info = read_info(base_folder) if (base_folder / ZOO_FILE).exists() else {"hash": "external"}
        folder = self.folder(name)
        s = settings(name, self.budget, self.seed, self.config, base_info.get("hash"))
        h = settings_hash(s)
        if not force and is_trained(folder, h):
            return dict(read_info(folder), skipped=True)
        t0 = _start(folder, force)
        model, tok, _ = load_model(base_folder)
        spec = SPECS[name]
        spec.token_ids(tok)  # a base whose tokenizer lacks the method's tokens fails here, naming it
        stages = method_stages(name, self.budget, self.seed)
        kinds = sorted({k for st in stages for k in st.plan.bank_kinds()})
        pool = "pool_pc" if name == "positive-control" else "pool"
        train_bank, val_bank = self.bank(model, "train", kinds, pool), self.bank(model, "val", kinds)
        constant = None
        if layouts.latent_source(spec) == "constant":
            g = torch.Generator().manual_seed(self.seed + 7)
            constant = torch.randn(spec.n_latents, model.config.text_config.hidden_size, generator=g)
            constant = constant / constant.norm(dim=-1, keepdim=True)  # word-embedding scale
        runs = folder / "runs"
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
        _concat_curves(folder, dirs)
        info = dict(name=name, hash=h, settings=s, stages=summaries, layout="testbed",
                    latent_source=layouts.latent_source(spec), base=str(base_folder.name),
                    seconds=round(time.perf_counter() - t0, 1))
        _finish(folder, model, tok, spec, info, constant)
        shutil.rmtree(runs, ignore_errors=True)
        return info


def _start(folder: Path, force: bool) -> float:
    """Clear a folder that is retrained by force, pin the thread count, start the clock."""
    if force and folder.exists():
        shutil.rmtree(folder)
    set_threads()
    return time.perf_counter()


def train_zoo(root: str | Path | None = None, budget: str = "default", methods=None, seed: int = 0,
              force: bool = False, config: TestbedConfig | None = None, progress: bool = True,
              model_size: str = "testbed"):
    """Train the base and the methods (skipping what is trained with the same settings).

    Returns a DataFrame: model, seconds (of this run; 0 when skipped), trained_seconds (as
    recorded when it was trained), skipped, best validation accuracy.
    """
    import pandas as pd

    zoo = Zoo(Path(root) if root else None, budget, seed, config, progress, model_size)
    names = list(methods) if methods else list(METHODS)
    for n in names:
        if n not in SPECS:
            raise ValueError(f"unknown method {n!r}; known: {', '.join(METHODS)}")
    if BASE not in names:
        names = [BASE] + names
    rows = []
    for n in [BASE] + [m for m in names if m != BASE]:
        t0 = time.perf_counter()
        info = zoo.train_method(n, force=force and n in (methods or METHODS))
        last = info["stages"][-1]
        rows.append(dict(model=n, seconds=round(time.perf_counter() - t0, 1), trained_seconds=info["seconds"],
                         skipped=info.get("skipped", False), best_val=last.get("best_val")))
        print(f"[zoo] {n}: {'skipped (same settings)' if info.get('skipped') else 'trained'} "
              f"in {rows[-1]['trained_seconds']:.0f} s, validation accuracy {rows[-1]['best_val']:.3f}")
    return pd.DataFrame(rows)


def training_times(root: str | Path | None = None) -> "pd.DataFrame":
    """Per trained model: training seconds (as recorded), stages, steps, best validation accuracy."""
    import pandas as pd

    root = Path(root) if root else models_dir() / "zoo"
    rows = []
    for m in METHODS:
        if (root / m / ZOO_FILE).exists():
            info = read_info(root / m)
            stages = info["stages"]
            rows.append(dict(model=m, seconds=info["seconds"], stages=" + ".join(st["stage"] for st in stages),
                             steps=sum(st["steps"] for st in stages), best_val=stages[-1].get("best_val")))
    return pd.DataFrame(rows)


def learning_curves(root: str | Path | None = None) -> "pd.DataFrame":
    """All models' learning curves (curves.csv) with `model` and a running `step_total`."""
    import pandas as pd

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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentmed.zoo", description=__doc__.split("\n\n")[0],
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
    df = train_zoo(a.models_dir, a.budget, a.methods, a.seed, a.force, progress=not a.no_progress)
    print(df.to_string(index=False))
    if a.evaluate:
        from .evaluate import evaluate_zoo, summarize

        summary = summarize(evaluate_zoo(a.models_dir, budget=a.budget))
        cols = ["model", "family", "n", "accuracy", "ci_low", "ci_high", "trigger_rate", "k_mean", "nonfinite"]
        print(summary[cols].round(3).to_string(index=False))


if __name__ == "__main__":
    main()
