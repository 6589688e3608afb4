"""Exports of the testbed in Monet-SFT, CapImagine and HR-Bench formats, and their readers."""

from __future__ import annotations

import base64
import json
import re

import pytest
from latentmed.testbed import TestbedConfig
from latentmed.testbed import exports as E
from latentmed.testbed.dataset import generate


@pytest.fixture(scope="module")
def tb(tmp_path_factory):
    cfg = TestbedConfig(n_train=8, n_val=4, n_test=8)
    return generate(cfg, tmp_path_factory.mktemp("data") / "tb", progress=False)


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_monet_round_trip(tb, tmp_path):
    path = E.to_monet_sft(tb, "train", tmp_path / "monet" / "train.json")
    samples = E.read_monet_sft(path)
    items = tb.items("train")
    assert len(samples) == len(items) == 8
    for s, it in zip(samples, items):
        system, user, assistant = s["data"]
        assert [t["role"] for t in s["data"]] == ["system", "user", "assistant"]
        assert user["content"][0]["image_file_name"] == f"images/{it.id}.png"
        assert user["content"][1]["text"].endswith("Put your final answer within \\boxed{}.")
        assert it.question in user["content"][1]["text"]
        first, image, last = assistant["content"]
        assert first["text"].endswith("<abs_vis_token></abs_vis_token>")
        assert image == {"type": "image", "image_file_name": f"crops/{it.id}.png"}
        assert f"<observation>{it.caption}</observation>" in last["text"]
        assert last["text"].endswith(f"\\boxed{{{it.answer}}}")
        assert s["metadata"]["answer"] == it.answer and s["metadata"]["id"] == it.id
        assert (path.parent / image["image_file_name"]).read_bytes() == tb.crop_path(it).read_bytes()


def test_monet_export_inside_the_testbed_folder(tb):
    path = E.to_monet_sft(tb, "val", tb.root / "monet_val.json")
    assert len(E.read_monet_sft(path)) == 4
    path.unlink()


def test_capimagine_round_trip(tb, tmp_path):
    path = E.to_capimagine_sft(tb, "test", tmp_path / "cap" / "train.json")
    samples = E.read_capimagine_sft(path)
    for s, it in zip(samples, tb.items("test")):
        (text_item,) = s["data"][2]["content"]
        assert f"{E.IMAGINE_START}{it.caption}{E.IMAGINE_END}" in text_item["text"]
        assert "<abs_vis_token>" not in text_item["text"]
        assert s["metadata"]["caption_answer_word"] == it.caption_answer_word


def test_hrbench_round_trip(tb, tmp_path):
    path = E.to_hrbench_tsv(tb, "test", tmp_path / "hr" / "test.tsv")
    df = E.read_hrbench_tsv(path)
    assert list(df.columns) == E.HRBENCH_COLUMNS
    items = tb.items("test")
    assert list(df["index"]) == list(range(len(items)))
    for row, it in zip(df.itertuples(index=False), items):
        assert row.answer == it.answer and [row.A, row.B, row.C, row.D] == it.options
        assert row.category == it.family and row.question == it.question
    img = E.decode_image(df["image"][0])
    assert img.tobytes() == tb.image(items[0]).tobytes()


# ---------------------------------------------------------------- readers reject broken files

@pytest.fixture()
def monet(tb, tmp_path):
    path = E.to_monet_sft(tb, "train", tmp_path / "m" / "train.json")
    return path, json.loads(path.read_text())


def test_monet_reader_rejects_image_without_marker(monet):
    path, samples = monet
    samples[2]["data"][2]["content"][0]["text"] = "I will zoom in."
    expected = re.escape(f"{path}: sample 2: auxiliary image") + ".* <abs_vis_token></abs_vis_token>"
    with pytest.raises(E.ExportFormatError, match=expected):
        E.read_monet_sft(write_json(path, samples))


def test_monet_reader_can_skip_like_monet(monet):
    path, samples = monet
    samples[2]["data"][2]["content"][0]["text"] = "I will zoom in."
    kept = E.read_monet_sft(write_json(path, samples), skip_invalid=True)
    ids = [s["metadata"]["id"] for i, s in enumerate(samples) if i != 2]
    assert [s["metadata"]["id"] for s in kept] == ids


def test_monet_reader_rejects_missing_image(monet):
    path, samples = monet
    (path.parent / samples[0]["data"][1]["content"][0]["image_file_name"]).unlink()
    with pytest.raises(E.ExportFormatError, match=r"sample 0: image file .*train-attr-00000.png does not"):
        E.read_monet_sft(path)
    assert len(E.read_monet_sft(path, check_images=False)) == 8


@pytest.mark.parametrize("content, message", [
    ("{broken", "invalid JSON"),
    ('{"data": []}', "expected a JSON list"),
    ('[{"nodata": 1}]', "sample 0: expected an object with a 'data' list"),
    ('[{"data": [{"role": "robot", "content": []}]}]', "sample 0 turn 0: needs a role"),
    ('[{"data": [{"role": "user", "content": [{"type": "video"}]}]}]', "sample 0 turn 0 item 0"),
])
def test_monet_reader_rejects_malformed(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(E.ExportFormatError, match=rf"bad.json: .*{message}"):
        E.read_monet_sft(path)


def test_readers_name_missing_files(tmp_path):
    for reader in (E.read_monet_sft, E.read_capimagine_sft, E.read_hrbench_tsv):
        with pytest.raises(FileNotFoundError, match="missing.file"):
            reader(tmp_path / "missing.file")


def test_capimagine_reader_rejects_missing_imagination(tb, tmp_path):
    path = E.to_capimagine_sft(tb, "val", tmp_path / "c" / "train.json")
    samples = json.loads(path.read_text())
    samples[1]["data"][2]["content"][0]["text"] = "The answer is \\boxed{A}"
    with pytest.raises(E.ExportFormatError, match=r"train.json: sample 1: no <imagine>"):
        E.read_capimagine_sft(write_json(path, samples))


@pytest.fixture()
def hr(tb, tmp_path):
    path = E.to_hrbench_tsv(tb, "test", tmp_path / "h" / "test.tsv")
    return path, path.read_text().splitlines()


def test_hrbench_reader_rejects_missing_column(hr):
    path, lines = hr
    cols = lines[0].split("\t")
    keep = [i for i, c in enumerate(cols) if c != "answer"]
    path.write_text("\n".join("\t".join(line.split("\t")[i] for i in keep) for line in lines))
    with pytest.raises(E.ExportFormatError, match=re.escape(f"{path}: ") + r"missing column\(s\) answer"):
        E.read_hrbench_tsv(path)


def test_hrbench_image_references_are_resolved(hr):
    path, lines = hr
    cells = lines[2].split("\t")
    cells[-1] = "0"  # VLMEvalKit: a short image cell names the row whose image it reuses
    path.write_text("\n".join(lines[:2] + ["\t".join(cells)] + lines[3:]))
    df = E.read_hrbench_tsv(path)
    assert df["image"][1] == df["image"][0]


def test_hrbench_reader_rejects_bad_base64(hr):
    path, lines = hr
    cells = lines[3].split("\t")
    cells[-1] = "not*base64!"
    path.write_text("\n".join(lines[:3] + ["\t".join(cells)] + lines[4:]))
    with pytest.raises(E.ExportFormatError, match=re.escape(f"{path}: row index=2: 'image' is not valid base64")):
        E.read_hrbench_tsv(path)


def test_hrbench_reader_rejects_non_image_and_bad_answer(hr):
    path, lines = hr
    cells = lines[1].split("\t")
    cells[-1] = base64.b64encode(b"hello, not an image").decode()
    path.write_text("\n".join([lines[0], "\t".join(cells)]))
    with pytest.raises(E.ExportFormatError, match=r"row index=0: 'image' does not decode"):
        E.read_hrbench_tsv(path)
    cells = lines[1].split("\t")
    cells[lines[0].split("\t").index("answer")] = "E"
    path.write_text("\n".join([lines[0], "\t".join(cells)]))
    with pytest.raises(E.ExportFormatError, match=r"row index=0: answer 'E'"):
        E.read_hrbench_tsv(path)


def test_decode_image_names_the_cell():
    with pytest.raises(E.ExportFormatError, match="file.tsv row 3: cannot decode"):
        E.decode_image(base64.b64encode(b"\x89PNG garbage").decode(), where="file.tsv row 3")
