"""The benchmarks' workload: a trained zoo in the testbed layout, its test items, and the study's
latent interventions (chapter 4's conditions, then seeded noise variants to reach any M).

The zoo is `--zoo` when given, else the project's models/zoo when its base and at least one
latent model are trained (the default budget, as the book uses), else a CI-budget zoo trained
once into build/bench/zoo-ci (about a minute).
"""

from __future__ import annotations

from pathlib import Path

from .common import ROOT, log, rel

CI_ZOO = ROOT / "build" / "bench" / "zoo-ci"
PREFERRED = ("monet-style", "lvr-style", "mirage-style", "grounded-closed", "lvr-closed")


def latent_models(root: Path) -> list[str]:
    from latentmed.analysis import study
    from latentmed.zoo import METHODS

    return study.latent_models(root, METHODS)


def find_zoo(zoo: str | Path | None = None) -> Path:
    """The zoo folder the benchmarks run on (see the module docstring)."""
    from latentmed.paths import models_dir

    if zoo is not None:
        root = Path(zoo)
        if not (root / "base" / "zoo.json").exists():
            raise FileNotFoundError(f"{root}: no trained zoo here (no base/zoo.json)")
        return root
    default = models_dir() / "zoo"
    if (default / "base" / "zoo.json").exists() and latent_models(default):
        return default
    if not ((CI_ZOO / "base" / "zoo.json").exists() and latent_models(CI_ZOO)):
        from latentmed import zoo as Z

        log(f"no trained zoo in {rel(default)}: training the CI-budget zoo into {rel(CI_ZOO)}")
        Z.train_zoo(CI_ZOO, budget="ci", progress=False, verbose=False)
    return CI_ZOO


def zoo_info(root: Path) -> dict:
    """What the results record about the zoo: folder, budget, trained models and their hashes."""
    from latentmed import zoo as Z

    models = {}
    for m in Z.METHODS:
        f = root / m / "zoo.json"
        if f.exists():
            info = Z.read_info(root / m)
            models[m] = dict(hash=info.get("weights_hash", "")[:16], seconds=info.get("seconds"))
    base = Z.read_info(root / "base")
    return dict(folder=rel(root), budget=base["settings"]["budget"], models=models)


def pick_model(root: Path, want: str | None = None) -> str:
    """The latent model a benchmark runs on: `want`, else the first trained of PREFERRED."""
    have = latent_models(root)
    if want is not None:
        if want not in have:
            raise ValueError(f"model {want!r} is not a trained latent model in {rel(root)} (have: {', '.join(have)})")
        return want
    return next((m for m in PREFERRED if m in have), have[0])


def queries(root: Path, per_family: int):
    """`per_family` held-out items of each family, as engine queries (in family order)."""
    from latentmed import zoo as Z
    from latentmed.analysis import study
    from latentmed.testbed import TestbedConfig

    config = TestbedConfig.from_dict(Z.read_info(root / "base")["settings"]["testbed"])
    return study.queries(config, "test", per_family)


def interleave_families(qs: list) -> list:
    """Items in round-robin family order (the first n cover every family)."""
    fams = {}
    for q in qs:
        fams.setdefault(q.family, []).append(q)
    out, lists = [], list(fams.values())
    for i in range(max(len(v) for v in lists)):
        out += [v[i] for v in lists if i < len(v)]
    return out


def load(root: Path, model: str, device: str = "cpu"):
    from latentmed.engine import LatentReasoner
    from latentmed.zoo.evaluate import decode_config

    r = LatentReasoner.from_pretrained(root / model, device=device)
    return r, decode_config(r)


def variant_pool(clean: list, families: list[str], n: int, seed: int = 0) -> list[list]:
    """Per item, `n` latent interventions (each a list): chapter 4's generate-form conditions in
    the study's order, then seeded noise variants (replace / add at five scales) up to `n`."""
    from latentmed.analysis import conditions as C
    from latentmed.engine import interventions as I

    conds = C.latent_conditions(clean, families, ("generate",), seed)
    scales = (0.1, 0.3, 1.0, 3.0, 10.0)
    out = []
    for i in range(len(clean)):
        vs = [c.make(i) for c in conds]
        j = 0
        while len(vs) < n:
            mode, s = ("replace", "add")[j % 2], scales[(j // 2) % len(scales)]
            vs.append([I.NoiseLatent(scale=s, mode=mode, seed=1000 + j)])
            j += 1
        out.append(vs[:n])
    return out
