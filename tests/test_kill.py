"""Kill anywhere: every long run that writes results is killed at each of its write points (the
writer is patched to raise, before or after it writes), then run again; it must end with the same
weights, rows and files as an uninterrupted run, and a reader must never see a half state.

`Kill` derives from BaseException, as a real kill cannot be caught by `except Exception`.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
from latentmed import book, files
from latentmed.engine.tiny import tiny_config, tiny_model
from latentmed.engine.tokenizer import build_tokenizer
from latentmed.store import ResultsStore
from latentmed.testbed import VOCABULARY, TestbedConfig
from latentmed.testbed import dataset as D
from latentmed.testbed import exports as E
from latentmed.zoo import bank as B
from latentmed.zoo import build as Z
from latentmed.zoo import loop as L
from latentmed.zoo import method_stages, stages

TB = TestbedConfig(n_objects=(3, 8), n_train=8, n_val=8, n_test=4)


class Kill(BaseException):
    """A simulated kill at a write point."""


def patch_writers(mp: pytest.MonkeyPatch, targets, kill_at: int | None = None, after: bool = False,
                  when=lambda name, args: True) -> list[str]:
    """Wrap each (owner, name) writer so that every call is logged; the call numbered `kill_at`
    raises Kill before it writes (or right after, with `after`). Returns the log."""
    log: list[str] = []
    for owner, name in targets:
        orig = getattr(owner, name)

        def wrapper(*args, _orig=orig, _name=name, **kw):
            if not when(_name, args):
                return _orig(*args, **kw)
            n = len(log)
            log.append(f"{_name}({', '.join(Path(str(a)).name for a in args if isinstance(a, (str, Path)))})")
            if n == kill_at and not after:
                raise Kill(log[-1])
            out = _orig(*args, **kw)
            if n == kill_at and after:
                raise Kill(log[-1])
            return out

        mp.setattr(owner, name, wrapper)
    return log


def every_kill(targets, run, check, when=lambda name, args: True) -> int:
    """Count the write points of `run(tag)` uninterrupted, then for each point (before and after
    its write) kill a fresh run there, run it again, and `check(tag, where)`; returns the count."""
    with pytest.MonkeyPatch.context() as mp:
        points = patch_writers(mp, targets, when=when)
        run("count")
    assert points, "no write points were hit"
    for i, point in enumerate(points):
        for after in (False, True):
            tag = f"k{i}{'a' if after else 'b'}"
            with pytest.MonkeyPatch.context() as mp:
                patch_writers(mp, targets, kill_at=i, after=after, when=when)
                with pytest.raises(Kill):
                    run(tag)
            run(tag)
            check(tag, f"killed {'after' if after else 'before'} write {i} {point}")
    return len(points)


@contextmanager
def trusted_checkpoints():
    """Fail when a resumed run distrusts its checkpoint and starts over: that fallback would hide
    a commit order that leaves files and state.json disagreeing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    distrust = [str(w.message) for w in caught if "starting this stage again" in str(w.message)]
    assert not distrust, distrust


def digest(folder: Path, skip=(files.MARKER,)) -> dict[str, str]:
    """sha256 of every file under `folder` (relative names)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


# ---------------------------------------------------------------- the training loop

LOOP_WRITERS = [(L, "_append_curve"), (L, "_save_tensors"), (L, "_write_state"), (L, "_move"), (L, "_write_curves"),
                (L, "mark_owned"), (L, "remove_owned")]


def toy_run(run_dir: Path) -> tuple[dict, dict, pd.DataFrame]:
    """A small regression trained by `run_loop` with evaluation and keep-best, resumable."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    lin = torch.nn.Linear(4, 2)

    def step(s, gen):
        idx = torch.randint(32, (4,), generator=gen)
        loss = ((lin(x[idx]) - y[idx]) ** 2).mean()
        return loss, {"ce": float(loss.detach())}

    def evaluate():
        with torch.no_grad():
            score = -float(((lin(x) - y) ** 2).mean())
        return score, {"all": score}

    cfg = L.StageConfig("toy", steps=7, batch_size=4, lr=0.05, warmup=1, eval_every=2, save_every=3, keep_best=True)
    with trusted_checkpoints():
        summary = L.run_loop({"lin": lin}, list(lin.parameters()), step, cfg, run_dir, evaluate, progress=False)
    curves = pd.read_csv(run_dir / "curves.csv")[["step", "loss", "val_all"]]
    return {k: v.clone() for k, v in lin.state_dict().items()}, summary, curves


def test_run_loop_killed_at_every_write_point_ends_as_an_uninterrupted_run(tmp_path):
    ref_state, ref_summary, ref_curves = toy_run(tmp_path / "ref")
    ref_files = {n: files.load_tensors(tmp_path / "ref" / f"{n}.safetensors") for n in ("weights", "optimizer", "best")}

    def check(tag, where):
        state, summary, curves = toy_run(tmp_path / tag)
        for k in ref_state:
            assert torch.equal(state[k], ref_state[k]), f"{where}: final weights differ ({k})"
        assert {k: summary[k] for k in ("best_val", "best_step")} == \
               {k: ref_summary[k] for k in ("best_val", "best_step")}, where
        pd.testing.assert_frame_equal(curves, ref_curves, obj=where)
        for n, ref in ref_files.items():
            got = files.load_tensors(tmp_path / tag / f"{n}.safetensors")
            assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), f"{where}: {n} differs"
        assert not (tmp_path / tag / L.NEXT).exists(), f"{where}: a half checkpoint was left behind"

    n = every_kill(LOOP_WRITERS, lambda tag: toy_run(tmp_path / tag), check)
    assert n >= 20  # 7 curve rows, 3 checkpoints of several files each


def test_a_kill_between_weights_and_state_resumes_consistently(tmp_path):
    """The measured bug: weights written, the kill before state.json; the resumed run must not mix
    the newer weights with the older step."""
    ref, _, _ = toy_run(tmp_path / "ref")
    with pytest.MonkeyPatch.context() as mp:
        patch_writers(mp, [(L, "_write_state")], kill_at=1)  # the second checkpoint, tensors already written
        with pytest.raises(Kill):
            toy_run(tmp_path / "run")
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == 3 and set(state["files"]) == {"weights", "optimizer", "best"}
    got, _, _ = toy_run(tmp_path / "run")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# ---------------------------------------------------------------- one real stage and the zoo

@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(VOCABULARY)


@pytest.fixture(scope="module")
def bank(tok):
    model = tiny_model(tiny_config(tok, "test"), seed=0)
    return B.build_bank(model, TB, "train", 2, kinds=("main", "crop", "degraded"), progress=False)


def stage_run(tok, bank, run_dir: Path) -> dict:
    model = tiny_model(tiny_config(tok, "test"), seed=0)
    stages.reinit_language_model(model, seed=0)
    plan = method_stages("lvr-style", "ci")[0].plan
    cfg = L.StageConfig("kill", 4, batch_size=4, lr=3e-3, warmup=1, eval_every=2, save_every=2, keep_best=True)
    with trusted_checkpoints():
        stages.train_stage(model, tok, plan, bank, bank, cfg, run_dir, progress=False)
    return model.state_dict()


# write points of the first checkpoint of `stage_run` (curve rows not counted): 0 the fresh curve
# file, 1 clear next/, 2 mark it, 3 weights, 4 optimizer, 5 best, 6 state, 7-9 moves, 10 state move
@pytest.mark.parametrize("point, after, name", [(3, True, "_save_tensors(weights"), (4, True, "_save_tensors(optimizer"),
                                                (6, False, "_write_state"), (6, True, "_write_state"),
                                                (7, False, "_move"), (10, False, "_move(state")],
                         ids=["after-weights", "after-optimizer", "before-state", "after-state", "before-first-move",
                              "before-state-move"])
def test_train_stage_killed_inside_a_checkpoint_resumes_to_the_same_model(tok, bank, tmp_path, point, after, name):
    ref = stage_run(tok, bank, tmp_path / "ref")
    when = lambda n, args: n != "_append_curve"  # noqa: E731  (count checkpoint writes only)
    with pytest.MonkeyPatch.context() as mp:
        log = patch_writers(mp, LOOP_WRITERS, kill_at=point, after=after, when=when)
        with pytest.raises(Kill):
            stage_run(tok, bank, tmp_path / "run")
    assert log[point].startswith(name), log
    got = stage_run(tok, bank, tmp_path / "run")
    for k in ref:
        assert torch.equal(got[k], ref[k]), f"killed at {log[point]}: {k} differs"


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory):
    """A zoo folder with a trained base (ci budget, test size)."""
    root = tmp_path_factory.mktemp("killzoo")
    Z.Zoo(root, "ci", config=TB, progress=False, model_size="test").train_base()
    return root


def test_zoo_model_killed_while_its_checkpoint_is_written_ends_identical(zoo_root, tmp_path):
    def run(tag):
        root = tmp_path / tag
        if not root.exists():
            for sub in ("base", "_features"):  # the trained base and its cached image tokens
                shutil.copytree(zoo_root / sub, root / sub)
        return Z.Zoo(root, "ci", config=TB, progress=False, model_size="test").train_method("direct")

    run("ref")
    ref = digest(tmp_path / "ref" / "direct", skip=(files.MARKER, "zoo.json", "curves.csv"))

    def check(tag, where):
        folder = tmp_path / tag / "direct"
        info = Z.read_info(folder)
        assert Z.is_trained(folder, info["hash"]), where
        assert digest(folder, skip=(files.MARKER, "zoo.json", "curves.csv")) == ref, where
        assert not (tmp_path / tag / "direct.partial").exists(), where
        assert run(tag).get("skipped"), f"{where}: a finished model is trained again"

    # the checkpoint folder's files, its record, the swap into place, the training state's removal
    writers = [(Z, "save_checkpoint"), (Z, "atomic_write_json"), (Z, "replace_folder"), (Z, "remove_owned")]
    assert every_kill(writers, run, check) >= 4


def test_zoo_base_killed_mid_training_ends_with_the_same_weights(zoo_root, tmp_path):
    """The issue's measurement: a kill between the weights and the state of the base's QA stage
    changed the base's hash. Now the base is identical to the uninterrupted one."""
    root = tmp_path / "zoo"
    in_qa = lambda name, args: "vision" not in str(args[-1])  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        patch_writers(mp, [(L, "_save_tensors")], kill_at=0, after=True, when=in_qa)
        with pytest.raises(Kill):
            Z.Zoo(root, "ci", config=TB, progress=False, model_size="test").train_base()
    Z.Zoo(root, "ci", config=TB, progress=False, model_size="test").train_base()
    assert files.file_hash(root / "base" / "model.safetensors") == files.file_hash(zoo_root / "base" / "model.safetensors")


def test_a_checkpoint_with_complete_metadata_but_truncated_weights_is_not_skipped(zoo_root, tmp_path):
    root = tmp_path / "zoo"
    shutil.copytree(zoo_root / "base", root / "base")
    info = Z.read_info(root / "base")
    weights = root / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    assert not Z.is_trained(root / "base", info["hash"])
    tok_json = root / "base" / "tokenizer.json"
    shutil.copyfile(zoo_root / "base" / "model.safetensors", weights)
    tok_json.write_text(tok_json.read_text()[:-5])  # any recorded file, not only the weights
    assert not Z.is_trained(root / "base", info["hash"])


# ---------------------------------------------------------------- the testbed and its exports

TB_WRITERS = [(D, "_save_png"), (D, "_write_text"), (D, "replace_folder"), (D, "mark_owned"), (D, "remove_owned")]


def test_testbed_generation_killed_anywhere_regenerates_identically(tmp_path):
    D.ensure(TB, tmp_path / "ref", progress=False)
    ref = digest(tmp_path / "ref")
    old = D.generate(TestbedConfig(**{**TB.to_dict(), "seed": 9}), tmp_path / "old", progress=False).root

    def run(tag):
        out = tmp_path / tag / "tb"
        if not (tmp_path / tag).exists():
            shutil.copytree(old, out)  # an older testbed that the new one replaces
        return D.ensure(TB, out, progress=False)

    def check(tag, where):
        assert digest(tmp_path / tag / "tb") == ref, where
        assert sorted(p.name for p in (tmp_path / tag).iterdir()) == ["tb"], f"{where}: leftovers"

    def sparse(name, args):  # every write but most PNGs: the first, one in the middle, the last
        first_mid_last = ("train-attr-00000", "val-relpos-00001", "test-glyph-00000")
        return name != "_save_png" or Path(str(args[1])).stem in first_mid_last

    assert every_kill(TB_WRITERS, run, check, when=sparse) >= 8


def test_a_kill_between_the_two_renames_of_the_swap_loses_nothing(tmp_path):
    out = tmp_path / "tb"
    D.generate(TestbedConfig(**{**TB.to_dict(), "seed": 9}), out, progress=False)

    def half_swap(new, folder, kind):
        folder.rename(folder.with_name(folder.name + ".old"))
        raise Kill("between the renames")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(D, "replace_folder", half_swap)
        with pytest.raises(Kill):
            D.ensure(TB, out, progress=False)
    assert not out.exists() and out.with_name("tb.old").exists() and out.with_name("tb.partial").exists()
    assert D.ensure(TB, out, progress=False).config == TB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb"]


def test_export_killed_mid_copy_never_leaves_a_json_pointing_at_half_copied_images(tmp_path):
    tb = D.ensure(TB, tmp_path / "tb", progress=False)
    target = tmp_path / "out" / "train.json"
    E.to_monet_sft(tb, "train", target)
    with pytest.MonkeyPatch.context() as mp:
        patch_writers(mp, [(E, "_copy_file")], kill_at=3)
        with pytest.raises(Kill):
            E.to_monet_sft(tb, "train", target)
    assert not target.exists(), "the old JSON must go before its images are replaced"
    assert not list(target.parent.rglob("*.tmp"))
    E.to_monet_sft(tb, "train", target)
    assert len(E.read_monet_sft(target)) == 8


# ---------------------------------------------------------------- results, caches, chapters

def _write_many(path: Path, value: float) -> None:
    for _ in range(200):
        files.atomic_save_tensors({"x": torch.full((10_000,), value)}, path)


def test_processes_writing_one_file_at_once_never_share_a_temporary(tmp_path):
    """Two processes saving one path at once (parallel chapters writing one tower output to the
    disk memo): each write is whole, the file is one of them, no temporary is left behind."""
    target = tmp_path / "t.safetensors"
    procs = [multiprocessing.get_context("fork").Process(target=_write_many, args=(target, v)) for v in (1.0, 2.0)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    x = files.load_tensors(target)["x"]
    assert torch.equal(x, torch.ones(10_000)) or torch.equal(x, torch.full((10_000,), 2.0))
    assert not list(tmp_path.glob(".*.tmp"))


def test_results_store_killed_at_every_write_keeps_each_row_once(tmp_path):
    import latentmed.store as st

    rows = [{"item": i, "condition": "clean", "correct": i % 2} for i in range(6)]

    def run(tag):
        run_ = ResultsStore(tmp_path / tag).run("m", "h", {"n": 6})
        for batch in (rows[:3], rows[3:]):
            todo = {k for k in run_.missing([(r["item"], r["condition"]) for r in batch])}
            new = [r for r in batch if (r["item"], r["condition"]) in todo]
            run_.add(new, tensors={i: {"z": torch.full((2,), float(r["item"]))} for i, r in enumerate(new)})
        return run_

    run("ref")
    ref = ResultsStore(tmp_path / "ref").frame()

    def check(tag, where):
        got = ResultsStore(tmp_path / tag).frame()
        assert got.drop(columns="tensors").equals(ref.drop(columns="tensors")), where
        run_ = ResultsStore(tmp_path / tag).run("m", "h", {"n": 6})
        assert [float(run_.tensors(r)["z"][0]) for r in run_.rows()] == [float(i) for i in range(6)], where

    assert every_kill([(st, "atomic_save_tensors"), (st, "atomic_write_json")], run, check) >= 3


def test_results_store_drops_a_row_cut_by_a_kill(tmp_path):
    run = ResultsStore(tmp_path).run("m", "h", {})
    run.add([{"item": 1, "condition": "a"}])
    with open(run.path, "a") as f:
        f.write('{"item": 2, "cond')  # the kill cut this line
    again = ResultsStore(tmp_path).run("m", "h", {})
    assert again.missing([(1, "a"), (2, "a")]) == [(2, "a")]
    again.add([{"item": 2, "condition": "a"}])
    assert [r["item"] for r in again.rows()] == [1, 2]


def test_feature_bank_cache_killed_while_written_is_rebuilt_identically(tok, tmp_path):
    model = tiny_model(tiny_config(tok, "test"), seed=0)
    ref = B.build_bank(model, TB, "val", 1, cache_dir=tmp_path / "ref", progress=False).main
    with pytest.MonkeyPatch.context() as mp:
        patch_writers(mp, [(files, "save_file")], kill_at=0, after=True)  # inside the atomic write
        with pytest.raises(Kill):
            B.build_bank(model, TB, "val", 1, cache_dir=tmp_path / "run", progress=False)
    assert not list((tmp_path / "run").glob("bank-*.safetensors")), "a half-written cache must not be in place"
    got = B.build_bank(model, TB, "val", 1, cache_dir=tmp_path / "run", progress=False).main
    again = B.build_bank(model, TB, "val", 1, cache_dir=tmp_path / "run", progress=False).main  # from the cache
    assert torch.equal(got, ref) and torch.equal(again, ref)


def test_a_chapter_killed_while_running_is_run_again_not_reused(tiny_chapter, tmp_path, monkeypatch):
    import papermill as pm

    chapter, out_dir = tiny_chapter, tmp_path / "out"
    out = book.execute(chapter, out_dir, {"n": 21})
    good = out.read_bytes()
    real = pm.execute_notebook

    def killed(src, dst, **kw):
        Path(dst).write_text("half a notebook")
        raise Kill("kernel killed")

    monkeypatch.setattr(pm, "execute_notebook", killed)
    with pytest.raises(Kill):
        book.execute(chapter, out_dir, {"n": 21}, force=True)
    assert out.read_bytes() == good, "the last good copy stays"
    assert not (out_dir / ".tiny.stamp").exists(), "no stamp may claim the killed run finished"
    calls = []
    monkeypatch.setattr(pm, "execute_notebook", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    book.execute(chapter, out_dir, {"n": 21})
    assert calls, "after a killed run the chapter is executed again"


def test_captioner_output_killed_while_written_is_absent_not_half(tmp_path):
    from latentmed.testbed import make_item
    from latentmed.zoo import captioner as C

    items = [make_item(TB, "train", f, 0) for f in TB.families]
    src, gt = C.testbed_interleaved(items, tmp_path / "d")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(files.os, "replace", lambda a, b: (_ for _ in ()).throw(Kill("before the rename")))
        with pytest.raises(Kill):
            C.convert_file(src, tmp_path / "d" / "cap.json", gt)
    assert not (tmp_path / "d" / "cap.json").exists()
    assert C.convert_file(src, tmp_path / "d" / "cap.json", gt) == 4


def test_zoo_evaluation_killed_before_its_key_is_written_is_recomputed(zoo_root, tmp_path):
    from latentmed.zoo import evaluate as V

    root = tmp_path / "zoo"
    shutil.copytree(zoo_root / "base", root / "base")
    ref = V.summarize(V.evaluate_zoo(root, per_family=1))
    (root / "eval-test-forced.json").unlink()
    (root / "eval-test-forced.jsonl").write_text('{"stale": 1}\n')  # an older table without its key
    with pytest.MonkeyPatch.context() as mp:
        patch_writers(mp, [(V, "atomic_write_json")], kill_at=0)  # the new table is in place, its key is not
        with pytest.raises(Kill):
            V.evaluate_zoo(root, per_family=1)
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        real = V.evaluate_model
        mp.setattr(V, "evaluate_model", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
        again = V.summarize(V.evaluate_zoo(root, per_family=1))
    assert calls, "a table without its key must be recomputed, not reused"
    pd.testing.assert_frame_equal(again, ref, check_dtype=False)


def test_training_steps_run_with_subnormals_flushed_and_the_setting_is_put_back(tmp_path):
    seen = []
    lin = torch.nn.Linear(2, 1)

    def step(s, gen):
        seen.append(L.flushing_subnormals())
        if s == 2:
            raise L.SimulatedKill("stop")  # an error inside the loop restores the setting too
        return lin(torch.ones(1, 2)).sum(), {}

    cfg = L.StageConfig("toy", steps=4, batch_size=1, warmup=0, eval_every=10, save_every=10)
    assert not L.flushing_subnormals()
    with pytest.raises(L.SimulatedKill):
        L.run_loop({"lin": lin}, list(lin.parameters()), step, cfg, tmp_path / "run", progress=False)
    assert seen == [True, True, True] and not L.flushing_subnormals()
    assert float(torch.tensor([L.SUBNORMAL]) * 1.0) > 0  # arithmetic on subnormals is back
    torch.set_flush_denormal(True)  # set before: kept after
    try:
        L.run_loop({"lin": lin}, list(lin.parameters()), lambda s, g: (lin(torch.ones(1, 2)).sum(), {}), cfg,
                   tmp_path / "run2", progress=False)
        assert L.flushing_subnormals()
    finally:
        torch.set_flush_denormal(False)
