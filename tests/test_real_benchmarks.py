"""Real benchmark loaders: the published layouts read into one schema, and every way a file can
be wrong is an error that names the file and the row."""

from __future__ import annotations

import base64
import json
import shutil

import pandas as pd
import pytest
from latentmed.engine.query import Query
from latentmed.real import fixtures
from latentmed.real.benchmarks import (
    BenchmarkFormatError,
    check_images,
    load_benchmark,
    parse_vstar_text,
)
from latentmed.real.cli import main as cli


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-data")
    return dict(vstar=fixtures.write_vstar(root / "vstar", n=4), hr=fixtures.write_hrbench(root / "hr", n_questions=2,
                cycles=3).parent, hr8=fixtures.write_hrbench(root / "hr", "hrbench8k").parent,
                mme=fixtures.write_mme_lite(root / "mme", n=3))


def copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / src.name)


# ---------------------------------------------------------------- the published layouts

def test_vstar_reads_question_file_and_image_folders(fx):
    ex = load_benchmark("vstar", fx["vstar"])
    assert [e.category for e in ex] == ["direct_attributes", "relative_position"] * 2
    assert [len(e.options) for e in ex] == [4, 2, 4, 2]
    assert ex[0].question == "What is the color of the square?" and ex[0].answer_letter == "B"
    assert ex[1].options == ("left", "right") and ex[1].answer == 0
    assert ex[0].id == "0" and ex[3].position == 3
    assert "test_questions.jsonl line 1" in ex[0].source
    assert ex[0].evidence_boxes == ((4.0, 4.0, 15.0, 15.0),)  # from sa_1000.json: [x, y, w, h] = [4, 4, 11, 11]
    q = ex[0].query()
    assert q.evidence_boxes == [[4.0, 4.0, 15.0, 15.0]]
    assert isinstance(q, Query) and q.options == list(ex[0].options) and q.answer == 1 and q.images[0].size == (64, 48)
    # the question file itself may be given, and --limit keeps the first questions
    assert [e.id for e in load_benchmark("vstar", fx["vstar"] / "test_questions.jsonl", limit=2)] == ["0", "1"]


def test_vstar_text_with_options_on_one_line_and_the_instruction_dropped():
    q, opts = parse_vstar_text("What is it? (A) a red (dark) cup (B) a mug\nAnswer with the letter.", "f line 1")
    assert q == "What is it?" and opts == ["a red (dark) cup", "a mug"]
    q, opts = parse_vstar_text("Where is the dog?\n(A) left\n(B) right\nAnswer directly.", "f line 1")
    assert opts == ["left", "right"]


def test_hrbench_keeps_category_and_cycle_and_resolves_image_references(fx):
    ex = load_benchmark("hrbench4k", fx["hr"])
    assert len(ex) == 6 and [e.cycle for e in ex] == ["cycle_0"] * 2 + ["cycle_1"] * 2 + ["cycle_2"] * 2
    assert {e.category for e in ex} == {"single", "cross"}
    raw = pd.read_csv(fx["hr"] / "hr_bench_4k.tsv", sep="\t", dtype=str)
    assert raw["image"].iloc[2] == "0", "later cycles name the first row's image by index (VLMEvalKit)"
    assert ex[2].load_image().tobytes() == ex[0].load_image().tobytes()
    # the rotated options keep the right answer's text
    assert ex[0].options[ex[0].answer] == ex[2].options[ex[2].answer] == ex[4].options[ex[4].answer]
    assert load_benchmark("hrbench8k", fx["hr8"])[0].benchmark == "hrbench8k"


def test_mme_lite_reads_annotation_and_images_with_five_options(fx):
    ex = load_benchmark("mme-realworld-lite", fx["mme"].parent)  # the release folder or its data/ folder
    assert len(ex) == 3 and all(len(e.options) == 5 for e in ex)
    e = ex[1]
    assert (e.task, e.category, e.subcategory) == ("Reasoning", "Autonomous_Driving", "Intention")
    assert e.options[e.answer] == "green" and not e.options[0].startswith("(A)")
    assert load_benchmark("mme-realworld-lite", fx["mme"])[0].id == ex[0].id
    assert check_images(ex) == 3


def test_unknown_benchmark_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'pope'"):
        load_benchmark("pope", tmp_path)
    with pytest.raises(FileNotFoundError, match="no test_questions.jsonl"):
        load_benchmark("vstar", tmp_path)
    with pytest.raises(FileNotFoundError, match="benchmark folder not found"):
        load_benchmark("vstar", tmp_path / "nowhere")


# ---------------------------------------------------------------- V* errors

def _vstar_lines(folder):
    return [json.loads(x) for x in (folder / "test_questions.jsonl").read_text().splitlines()]


def _write_lines(folder, lines):
    (folder / "test_questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.mark.parametrize("break_it, match", [
    (lambda ls: ls[1].pop("label"), r"line 2: missing key\(s\) label"),
    (lambda ls: ls[2].update(question_id=0), r"duplicated question_id '0' \(line 1 and line 3\)"),
    (lambda ls: ls[1].update(label="C"), r"line 2: answer 'C' is not one of the options A, B"),
    (lambda ls: ls[0].update(image="direct_attributes/gone.jpg"), r"line 1: image file .*gone.jpg is missing"),
    (lambda ls: ls[0].update(text="What is it? no options here"), r"line 1: 'text' has no lettered options"),
    (lambda ls: ls[0].update(text="Q?\n(A) x\n(C) y"), r"line 1: options are lettered A, C"),
    (lambda ls: ls[0].update(text="Q?\n(A) x\n(B) x"), r"line 1: duplicate options"),
])
def test_vstar_bad_rows_name_file_and_line(fx, tmp_path, break_it, match):
    folder = copy(fx["vstar"], tmp_path)
    lines = _vstar_lines(folder)
    break_it(lines)
    _write_lines(folder, lines)
    with pytest.raises(BenchmarkFormatError, match=match) as err:
        load_benchmark("vstar", folder)
    assert str(folder / "test_questions.jsonl") in str(err.value)


def test_vstar_unreadable_and_truncated_images(fx, tmp_path):
    folder = copy(fx["vstar"], tmp_path)
    (folder / "direct_attributes" / "sa_1002.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(BenchmarkFormatError, match=r"line 3: cannot read image file .*sa_1002.jpg"):
        load_benchmark("vstar", folder)
    folder = copy(fx["vstar"], tmp_path / "b")
    path = folder / "direct_attributes" / "sa_1000.jpg"
    fixtures.scene("red", (640, 480)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 3 // 4])  # the header parses; the pixels are cut
    ex = load_benchmark("vstar", folder)
    with pytest.raises(BenchmarkFormatError, match=r"line 1 \(question_id=0\): cannot read image file .*sa_1000.jpg"):
        check_images(ex)
    with pytest.raises(BenchmarkFormatError, match="line 1"):
        ex[0].query()


def test_vstar_annotation_is_optional_and_checked(fx, tmp_path):
    folder = copy(fx["vstar"], tmp_path)
    (folder / "direct_attributes" / "sa_1000.json").unlink()
    assert load_benchmark("vstar", folder)[0].evidence_boxes is None
    (folder / "relative_position" / "sa_1001.json").write_text('{"bbox": [[3, 3, 0, 5]]}')
    with pytest.raises(BenchmarkFormatError, match=r"sa_1001.json: a box has no area"):
        load_benchmark("vstar", folder)
    (folder / "relative_position" / "sa_1001.json").write_text('{"target_object": ["dog"]}')
    with pytest.raises(BenchmarkFormatError, match=r"sa_1001.json: not a V\* annotation with 'bbox'"):
        load_benchmark("vstar", folder)


def test_vstar_not_json(fx, tmp_path):
    folder = copy(fx["vstar"], tmp_path)
    with open(folder / "test_questions.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(BenchmarkFormatError, match="line 5: not a JSON object"):
        load_benchmark("vstar", folder)


# ---------------------------------------------------------------- HR-Bench errors

def _tsv(folder):
    return pd.read_csv(folder / "hr_bench_4k.tsv", sep="\t", dtype=str, keep_default_na=False)


def _save(df, folder):
    df.to_csv(folder / "hr_bench_4k.tsv", sep="\t", index=False)


def _corrupt_middle(df):
    s = df.loc[0, "image"]
    df.loc[0, "image"] = s[:40] + "!!" + s[42:]


def _truncated_png(df):
    raw = base64.b64decode(df.loc[1, "image"])
    df.loc[1, "image"] = base64.b64encode(raw[:60]).decode()


@pytest.mark.parametrize("break_it, match", [
    (lambda df: df.drop(columns=["cycle_category"]), r"missing column\(s\) cycle_category"),
    (lambda df: df.rename(columns={"answer": "label"}), r"missing column\(s\) answer"),
    (lambda df: df.assign(index=["0", "1", "2", "0", "4", "5"]), r"duplicated index '0' \(row 1 and row 4\)"),
    (lambda df: df.assign(answer=["A", "E", "A", "A", "A", "A"]), r"row 2 \(index=1\): answer 'E' is not one of"),
    (_corrupt_middle, r"row 1 \(index=0\): the image is not valid base64"),
    (lambda df: df.assign(image=[base64.b64encode(b"plain text, no image").decode()] * 6),
     r"row 1 \(index=0\): cannot read the base64 image: not an image"),
    (lambda df: df.assign(C=["", "", "x", "x", "x", "x"]), r"row 1 \(index=0\): options A, B, D are not A, B, \.\.\."),
    (lambda df: df.assign(image=[""] * 6), r"row 1 \(index=0\): the image cell is empty"),
    (lambda df: df.assign(image=[df["image"][0], "7", "0", "1", "0", "1"]),
     r"row 2 \(index=1\): the image cell '7' is neither base64 nor the index of another row"),
])
def test_hrbench_bad_rows_name_file_and_row(fx, tmp_path, break_it, match):
    folder = copy(fx["hr"], tmp_path)
    df = _tsv(folder)
    out = break_it(df)
    _save(out if out is not None else df, folder)
    with pytest.raises(BenchmarkFormatError, match=match) as err:
        load_benchmark("hrbench4k", folder)
    assert str(folder / "hr_bench_4k.tsv") in str(err.value)


def test_hrbench_truncated_image_fails_when_decoded_naming_the_row(fx, tmp_path):
    folder = copy(fx["hr"], tmp_path)
    df = _tsv(folder)
    _truncated_png(df)
    _save(df, folder)
    ex = load_benchmark("hrbench4k", folder)  # the header still parses
    with pytest.raises(BenchmarkFormatError, match=r"hr_bench_4k.tsv row 2 \(index=1\): cannot read the base64 image"):
        check_images(ex)


def test_hrbench_not_a_tsv(tmp_path):
    (tmp_path / "hr_bench_4k.tsv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BenchmarkFormatError, match="hr_bench_4k.tsv"):
        load_benchmark("hrbench4k", tmp_path)


# ---------------------------------------------------------------- MME-RealWorld-Lite errors

def _mme(folder):
    return json.loads((folder / "data" / "MME-RealWorld-Lite.json").read_text())


def _mme_save(folder, entries):
    (folder / "data" / "MME-RealWorld-Lite.json").write_text(json.dumps(entries))


@pytest.mark.parametrize("break_it, match", [
    (lambda es: es[1].pop("Ground truth"), r"entry 2: missing key\(s\) Ground truth"),
    (lambda es: es[2].update(Question_id=es[0]["Question_id"]), r"duplicated Question_id .* \(entry 1 and entry 3\)"),
    (lambda es: es[0].update({"Ground truth": "F"}),
     r"entry 1 \(Question_id=.*\): answer 'F' is not one of the options A, B, C, D, E"),
    (lambda es: es[0].update({"Answer choices": ["A) x", "(B) y"]}),
     r"entry 1 .*'Answer choices' must look like '\(A\) text'"),
    (lambda es: es[1].update(Image="nowhere/none.jpg"), r"entry 2 .*image file .*none.jpg is missing"),
])
def test_mme_bad_entries_name_file_and_entry(fx, tmp_path, break_it, match):
    folder = copy(fx["mme"].parent, tmp_path)
    entries = _mme(folder)
    break_it(entries)
    _mme_save(folder, entries)
    with pytest.raises(BenchmarkFormatError, match=match) as err:
        load_benchmark("mme-realworld-lite", folder)
    assert "MME-RealWorld-Lite.json" in str(err.value)


def test_mme_missing_image_folder_and_unreadable_image(fx, tmp_path):
    folder = copy(fx["mme"].parent, tmp_path)
    first = folder / "data" / "imgs" / _mme(folder)[0]["Image"]
    first.write_bytes(b"GIF89a-broken")
    with pytest.raises(BenchmarkFormatError, match=r"entry 1 .*cannot read image file"):
        load_benchmark("mme-realworld-lite", folder)
    shutil.rmtree(folder / "data" / "imgs")
    with pytest.raises(FileNotFoundError, match="imgs: image folder missing"):
        load_benchmark("mme-realworld-lite", folder)


# ---------------------------------------------------------------- the check command

def test_check_command_reports_counts_and_errors(fx, tmp_path, capsys):
    assert cli(["check", "--benchmark", "hrbench4k", "--data", str(fx["hr"]), "--images"]) == 0
    assert "hrbench4k: 6 questions (single: 3, cross: 3); 6 images decoded" in capsys.readouterr().out
    folder = copy(fx["hr"], tmp_path)
    df = _tsv(folder)
    _truncated_png(df)
    _save(df, folder)
    assert cli(["check", "--benchmark", "hrbench4k", "--data", str(folder), "--images"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "row 2 (index=1)" in err and "Traceback" not in err
