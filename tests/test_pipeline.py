"""The build's job graph and scheduler (`latentmed.pipeline`): order, lanes, failures, reuse."""

import sys

import pytest

from latentmed import book, pipeline
from latentmed.pipeline import Job


def stamp_job(name, tmp_path, needs=(), sleep=0.0, code=0, threads=1, cost=1.0, current=None):
    """A job that records when it started and ended (and checks its needs' files exist)."""
    script = (f"import time, pathlib, sys; d = pathlib.Path({str(tmp_path)!r}); "
              f"missing = [n for n in {list(needs)!r} if not (d / (n + '.end')).exists()]; "
              f"sys.exit(3) if missing else None; "
              f"(d / {name + '.start'!r}).write_text(repr(time.time())); time.sleep({sleep}); "
              f"(d / {name + '.end'!r}).write_text(repr(time.time())); sys.exit({code})")
    return Job(name, tuple(needs), cost=cost, threads=threads, current=current, command=[sys.executable, "-c", script])


def span(tmp_path, name):
    return float((tmp_path / f"{name}.start").read_text()), float((tmp_path / f"{name}.end").read_text())


def run(jobs, lanes, tmp_path):
    lines = []
    res = pipeline.run(jobs, lanes, tmp_path / "logs", echo=lines.append)
    return res, lines


def test_a_job_starts_only_after_what_it_needs(tmp_path):
    jobs = [stamp_job("b", tmp_path, needs=("a",)), stamp_job("a", tmp_path, sleep=0.3),
            stamp_job("c", tmp_path, needs=("b",))]
    res, _ = run(jobs, 2, tmp_path)
    assert {n: r.status for n, r in res.items()} == dict(a="done", b="done", c="done")
    assert span(tmp_path, "a")[1] <= span(tmp_path, "b")[0] and span(tmp_path, "b")[1] <= span(tmp_path, "c")[0]
    assert (tmp_path / "logs" / "a.log").exists()


def test_lanes_bound_how_many_jobs_run_at_once(tmp_path):
    def overlap(x, y):
        return span(tmp_path, x)[0] < span(tmp_path, y)[1] and span(tmp_path, y)[0] < span(tmp_path, x)[1]

    run([stamp_job("x", tmp_path, sleep=0.6), stamp_job("y", tmp_path, sleep=0.6)], 2, tmp_path)
    assert overlap("x", "y")  # two lanes: side by side
    run([stamp_job("x", tmp_path, sleep=0.3), stamp_job("y", tmp_path, sleep=0.3)], 1, tmp_path)
    assert not overlap("x", "y")  # one lane: one after the other
    run([stamp_job("x", tmp_path, sleep=0.3, threads=2), stamp_job("y", tmp_path, sleep=0.3)], 2, tmp_path)
    assert not overlap("x", "y")  # a two-thread job fills both lanes


def test_the_longest_chain_goes_first(tmp_path):
    jobs = [stamp_job("short", tmp_path, cost=5), stamp_job("head", tmp_path, cost=1),
            stamp_job("tail", tmp_path, needs=("head",), cost=10)]
    pipeline.prioritise(jobs)
    assert [j.priority for j in jobs] == [5, 11, 10]
    run(jobs, 1, tmp_path)
    assert span(tmp_path, "head")[1] <= span(tmp_path, "short")[0]


def test_the_most_urgent_job_is_not_overtaken_while_it_waits_for_room(tmp_path):
    # lanes 2: "first" runs; "wide" (2 threads, longest chain) is ready but must wait for room;
    # "filler" (ready, lower priority) must not take the free lane and delay "wide" further
    jobs = [stamp_job("first", tmp_path, sleep=0.3, cost=100), stamp_job("wide", tmp_path, threads=2, cost=50),
            stamp_job("filler", tmp_path, sleep=0.3, cost=1)]
    run(jobs, 2, tmp_path)
    assert span(tmp_path, "wide")[1] <= span(tmp_path, "filler")[0]


def test_a_failed_job_blocks_what_needs_it_and_the_rest_goes_on(tmp_path):
    jobs = [stamp_job("bad", tmp_path, code=1), stamp_job("after", tmp_path, needs=("bad",)),
            stamp_job("later", tmp_path, needs=("after",)), stamp_job("other", tmp_path)]
    res, lines = run(jobs, 2, tmp_path)
    assert {n: r.status for n, r in res.items()} == dict(bad="failed", after="blocked", later="blocked", other="done")
    assert any("bad: FAILED (exit 1)" in ln for ln in lines) and not (tmp_path / "after.start").exists()


def test_a_current_job_is_not_run(tmp_path):
    (tmp_path / "done-already.end").write_text("0")  # its result is there
    res, lines = run([stamp_job("done-already", tmp_path, current=lambda: True),
                      stamp_job("next", tmp_path, needs=("done-already",))], 2, tmp_path)
    assert res["done-already"].status == "current" and not (tmp_path / "done-already.start").exists()
    assert res["next"].status == "done" and "[job] done-already: up to date" in lines


def test_bad_graphs_are_named():
    with pytest.raises(ValueError, match="unknown jobs: nowhere"):
        pipeline.prioritise([Job("a", ("nowhere",))])
    with pytest.raises(ValueError, match="cycle"):
        pipeline.prioritise([Job("a", ("b",)), Job("b", ("a",))])


@pytest.mark.parametrize("profile", ["ci", "default"])
def test_the_build_graph_holds_every_model_and_chapter(profile):
    from latentmed.zoo.recipes import DOSE_METHODS, METHODS

    jobs = {j.name: j for j in pipeline.build_jobs(profile)}
    pipeline.prioritise(list(jobs.values()))  # no unknown job, no cycle
    chapters = [c.name for c in book.available()]
    assert {f"chapter {c}" for c in chapters} | {f"model {m}" for m in METHODS} <= set(jobs)
    assert set(jobs["html"].needs) == {f"chapter {c}" for c in chapters}
    assert "chapter 04_latent_to_answer" in jobs["chapter 06_mediation"].needs
    assert all(f"model {m}" in jobs["chapter 02_zoo"].needs for m in METHODS)
    if "10_dose" in chapters:
        assert all(f"model {m}" in jobs["chapter 10_dose"].needs for m in DOSE_METHODS)
        assert not any(f"model {m}" in jobs["chapter 02_zoo"].needs for m in DOSE_METHODS)
    assert jobs["model base"].priority == max(j.priority for j in jobs.values() if j.name != "testbed")
    # models reading crops or degraded scenes wait for the banks job; the rest start after the base
    assert jobs["model monet-style"].needs == ("banks",) and jobs["model positive-control"].needs == ("banks",)
    assert jobs["model grounded-closed"].needs == ("model base",) and jobs["model direct"].needs == ("model base",)


def test_models_that_skip_the_banks_job_find_their_banks_built_by_the_base(tmp_path):
    """A model that does not wait for the banks job trains on the base's own banks: same kinds, same
    pool, so in a CI zoo its banks are cache hits (no new feature file is written for it)."""
    from latentmed import zoo as Z
    from latentmed.zoo.recipes import FINE_TUNES, bank_kinds, needs_more_banks

    assert [m for m in FINE_TUNES if needs_more_banks(m)] == ["monet-style", "mirage-style", "positive-control"]
    zoo = Z.Zoo(tmp_path / "zoo", budget="ci", progress=False)
    zoo.train_base()
    before = sorted(p.name for p in (tmp_path / "zoo" / "_features").iterdir())
    assert bank_kinds("grounded-closed", "ci") == ("main",)
    zoo.banks.clear()  # as in a new job process
    zoo.train_method("grounded-closed")
    assert sorted(p.name for p in (tmp_path / "zoo" / "_features").iterdir()) == before
