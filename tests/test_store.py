"""The results store: rows appended as computed, a kill loses and duplicates nothing, runs keyed by
the model's hash and the parameters, tensors read back by row."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from latentmed.files import DamagedFileError
from latentmed.store import ResultsStore


def rows(items, cond="clean"):
    return [dict(item=i, condition=cond, correct=bool(n % 2), margin=0.1 * n) for n, i in enumerate(items)]


def test_rows_are_appended_once_and_read_as_a_frame(tmp_path):
    run = ResultsStore(tmp_path).run("m", "h1", {"chapter": 4})
    assert run.add(rows(["a", "b"])) == 2
    assert run.add(rows(["a", "b", "c"])) == 1  # a and b are there already
    assert run.missing([("a", "clean"), ("d", "clean")]) == [("d", "clean")]
    df = ResultsStore(tmp_path).frame()
    assert sorted(df["item"]) == ["a", "b", "c"] and set(df["model"]) == {"m"} and set(df["model_hash"]) == {"h1"}


def test_a_changed_model_or_parameter_is_another_run(tmp_path):
    s = ResultsStore(tmp_path)
    a, b, c = s.run("m", "h1", {"n": 1}), s.run("m", "h2", {"n": 1}), s.run("m", "h1", {"n": 2})
    assert len({a.key, b.key, c.key}) == 3
    a.add(rows(["x"]))
    assert s.run("m", "h1", {"n": 1}).missing([("x", "clean")]) == []  # reused
    assert b.missing([("x", "clean")]) == [("x", "clean")]  # recomputed
    assert len(s.frame(n=1)) == 1 and len(s.frame(n=2)) == 0


def test_a_line_cut_by_a_kill_is_dropped_and_recomputed(tmp_path):
    run = ResultsStore(tmp_path).run("m", "h", {})
    run.add(rows(["a", "b"]))
    with open(run.path, "a") as f:  # a kill in the middle of writing row c
        f.write('{"item": "c", "condition": "clean", "corr')
    again = ResultsStore(tmp_path).run("m", "h", {})
    assert again.missing([("a", "clean"), ("c", "clean")]) == [("c", "clean")]
    again.add(rows(["c"]))
    lines = run.path.read_text().splitlines()
    assert [json.loads(x)["item"] for x in lines] == ["a", "b", "c"]


def test_a_killed_process_resumes_without_losing_or_duplicating(tmp_path):
    """A child process writes rows one at a time and is killed after the third; the rerun
    completes the set."""
    code = f"""
import os, sys
from latentmed.store import ResultsStore
run = ResultsStore({str(tmp_path)!r}).run("m", "h", {{}})
for n, item in enumerate("abcdef"):
    if run.missing([(item, "clean")]):
        run.add([dict(item=item, condition="clean", n=n)])
    if item == "c" and len(sys.argv) > 1:
        os._exit(9)
"""
    assert subprocess.run([sys.executable, "-c", code, "kill"]).returncode == 9
    assert len(ResultsStore(tmp_path).frame()) == 3
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    df = ResultsStore(tmp_path).frame()
    assert sorted(df["item"]) == list("abcdef") and df["n"].tolist() == list(range(6))


def test_tensors_round_trip_by_row(tmp_path):
    run = ResultsStore(tmp_path).run("m", "h", {})
    z = torch.randn(4, 8)
    run.add(rows(["a", "b"]), tensors={1: {"z_in": z}})
    got = {r["item"]: run.tensors(r) for r in run.rows()}
    assert got["a"] == {} and torch.equal(got["b"]["z_in"], z)


def test_damaged_files_are_named(tmp_path):
    run = ResultsStore(tmp_path).run("m", "h", {})
    run.add(rows(["a", "b"]), tensors={0: {"z": torch.ones(2)}})
    side = next(run.folder.glob("t-*.safetensors"))
    side.write_bytes(side.read_bytes()[:20])
    with pytest.raises(DamagedFileError, match=side.name):
        run.tensors(run.rows()[0])
    run.path.write_text('{"item": "a"}\nnot json\n{"item": "b", "condition": "c"}\n')
    with pytest.raises(DamagedFileError, match="rows.jsonl line 2"):
        run.rows()
    with pytest.raises(ValueError, match="a row needs condition"):
        ResultsStore(tmp_path).run("m2", "h", {}).add([{"item": "x"}])


def test_tensors_many_reads_each_sidecar_once(tmp_path, monkeypatch):
    import latentmed.store as st

    run = ResultsStore(tmp_path).run("m", "h", {})
    run.add(rows(["a", "b", "c"]), tensors={0: {"z": torch.zeros(2)}, 2: {"z": torch.ones(2)}})
    calls = []
    real = st.load_tensors
    monkeypatch.setattr(st, "load_tensors", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    got = run.tensors_many(run.rows())
    assert len(calls) == 1 and got[1] == {} and torch.equal(got[2]["z"], torch.ones(2))


def test_appends_read_the_rows_file_once_per_opened_run(tmp_path, monkeypatch):
    from pathlib import Path

    run = ResultsStore(tmp_path).run("m", "h", {})
    run.add(rows(["a"]))
    with open(run.path, "a") as f:
        f.write('{"item": "b", "cond')  # a kill cut this line
    again = ResultsStore(tmp_path).run("m", "h", {})
    reads = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or real(self))
    for i in range(30):  # one chapter writes thousands of chunks: each must not re-read the file
        again.add(rows([f"x{i}"], cond="c"))
    assert reads.count("rows.jsonl") <= 1
    assert [r["item"] for r in ResultsStore(tmp_path).run("m", "h", {}).rows()] == ["a"] + [f"x{i}" for i in range(30)]


def test_long_float_lists_are_packed_and_read_back_as_written(tmp_path):
    """An intervention's vectors (lists of floats) are written as packed arrays, exactly: float32
    when every value is one, float64 otherwise; NaN kept; short lists, ints and mixed lists stay
    JSON. The rows read back equal the rows added, and the file is smaller than plain JSON."""
    import math

    z = torch.randn(10, 128)
    odd = [0.1 * i for i in range(100)]  # not float32 values: kept as float64
    big = [dict(item="a", condition="swap", interventions=[dict(kind="SwapLatent", source=z.tolist())],
                logprobs=[-0.1, -2.5]),
           dict(item="b", condition="mean", interventions=[dict(kind="MeanLatent", vector=odd + [math.nan])]),
           dict(item="c", condition="ids", ids=list(range(200)), mixed=[1.0] * 99 + [1], ragged=[[1.0] * 70, [2.0]])]
    run = ResultsStore(tmp_path).run("m", "h", {})
    run.add(big)
    back = ResultsStore(tmp_path).run("m", "h", {}).rows()
    assert back[0] == big[0] and back[2] == big[2]
    assert back[1]["interventions"][0]["vector"][:100] == odd and math.isnan(back[1]["interventions"][0]["vector"][100])
    assert type(back[2]["ids"][0]) is int and type(back[2]["mixed"][-1]) is int
    lines = run.path.read_text().splitlines()
    assert '"array":"f4","shape":[10,128]' in lines[0] and '"array":"f8"' in lines[1]
    raw = json.loads(lines[2])
    assert '"logprobs":[-0.1,-2.5]' in lines[0] and raw["ids"] == big[2]["ids"] and raw["mixed"] == big[2]["mixed"]
    assert raw["ragged"][1] == [2.0] and "b64" in raw["ragged"][0]  # a ragged list: its long rows packed
    assert len(lines[0]) < len(json.dumps(big[0])) / 2
    from latentmed.real.evaluate import read_rows
    assert read_rows(run)[0] == big[0]  # the real track's reader unpacks too


def test_old_rows_files_with_plain_lists_still_read(tmp_path):
    run = ResultsStore(tmp_path).run("m", "h", {})
    row = dict(item="a", condition="swap", interventions=[dict(kind="SwapLatent", source=[[0.5] * 128])])
    run.path.write_text(json.dumps(row) + "\n")
    assert run.rows() == [row]
    run.path.write_text(json.dumps(dict(row, interventions=[{"array": "f2", "shape": [1], "b64": "AAA="}])) + "\n")
    with pytest.raises(DamagedFileError, match="rows.jsonl line 1.*packed array type"):
        run.rows()
