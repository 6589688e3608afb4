"""The synthetic testbed: determinism, item invariants, config validation, on-disk safety,
and the resolution argument (targets unreadable at 56 px)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from latentmed.files import mark_owned
from latentmed.testbed import (
    FAMILIES,
    NUMBER_WORDS,
    TestbedConfig,
    cell_labels,
    evidence_fraction,
    items_frame,
    make_item,
    make_scene,
    scenes,
)
from latentmed.testbed.dataset import (
    Testbed,
    TestbedFormatError,
    ensure,
    generate,
    load,
)
from latentmed.testbed.resolution import readability

TINY = dict(n_train=8, n_val=4, n_test=8)


def items_of(cfg, n=30, split="test"):
    """n items per family."""
    return [make_item(cfg, split, f, i) for f in cfg.families for i in range(n)]


@pytest.fixture(scope="module")
def cfg():
    return TestbedConfig(**TINY)


@pytest.fixture(scope="module")
def many(cfg):
    return items_of(cfg, 30)


@pytest.fixture()
def built(tmp_path, cfg):
    return generate(cfg, tmp_path / "tb", progress=False)


# ---------------------------------------------------------------- determinism

def test_same_seed_same_items_and_pixels(cfg):
    for f in FAMILIES:
        a, b = make_item(cfg, "train", f, 3), make_item(cfg, "train", f, 3)
        assert a.to_dict() == b.to_dict()
        assert a.image.tobytes() == b.image.tobytes() and a.crop.tobytes() == b.crop.tobytes()


def test_an_item_without_pixels_is_the_same_item(cfg):
    """Feature banks whose tower tokens are cached skip the drawing: every field but the pixels
    must be what the drawn item has (drawing consumes no randomness)."""
    for f in FAMILIES:
        for i in range(4):
            drawn, bare = make_item(cfg, "train", f, i), make_item(cfg, "train", f, i, images=False)
            assert bare.image is None and bare.crop is None and drawn.image is not None
            assert json.dumps(bare.to_dict()) == json.dumps(drawn.to_dict())  # key order too
            assert bare.objects and all(isinstance(o["cell"], list) and isinstance(o["bbox"], list)
                                        for o in bare.objects)


def test_item_depends_only_on_seed_split_family_index(cfg):
    other = TestbedConfig(n_train=100, n_val=0, n_test=1)
    assert make_item(cfg, "val", "glyph", 2).to_dict() == make_item(other, "val", "glyph", 2).to_dict()
    assert make_item(cfg, "val", "glyph", 2).to_dict() != make_item(cfg, "test", "glyph", 2).to_dict()


def test_different_seed_differs(cfg):
    a = make_item(cfg, "train", "attr", 0)
    b = make_item(TestbedConfig(seed=1, **TINY), "train", "attr", 0)
    assert a.image.tobytes() != b.image.tobytes()


def test_generated_files_are_byte_identical(tmp_path, cfg):
    generate(cfg, tmp_path / "a", progress=False)
    generate(cfg, tmp_path / "b", progress=False)
    for rel in ["items.jsonl", "manifest.json", "images/test-glyph-00001.png", "crops/val-count-00000.png"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


# ---------------------------------------------------------------- item invariants

def solve(item) -> tuple[str, list[dict]]:
    """Recompute the answer word and the evidence objects from the objects and the question."""
    objs, q = item.objects, item.question
    if item.family == "attr":
        shape = re.fullmatch(r"What colour is the (\w+)\?", q)[1]
        hits = [o for o in objs if o["shape"] == shape]
        assert len(hits) == 1, "the shape must be unique"
        return hits[0]["colour"], hits
    if item.family == "relpos":
        c1, s1, c2, s2 = re.fullmatch(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", q).groups()
        a = [o for o in objs if o["colour"] == c1]
        b = [o for o in objs if o["colour"] == c2]
        assert len(a) == 1 and len(b) == 1 and a[0]["shape"] == s1 and b[0]["shape"] == s2
        dr = a[0]["cell"][0] - b[0]["cell"][0]
        dc = a[0]["cell"][1] - b[0]["cell"][1]
        if abs(dc) > abs(dr):
            assert abs(dc) >= 2 and abs(dr) <= abs(dc) / 2, "relation must be clear-cut"
            return ("left" if dc < 0 else "right"), a + b
        assert abs(dr) >= 2 and abs(dc) <= abs(dr) / 2, "relation must be clear-cut"
        return ("above" if dr < 0 else "below"), a + b
    if item.family == "count":
        colour = re.fullmatch(r"How many (\w+) objects are there\?", q)[1]
        hits = [o for o in objs if o["colour"] == colour]
        return NUMBER_WORDS[len(hits)], hits
    colour = re.fullmatch(r"Which digit is inside the (\w+) square\?", q)[1]
    hits = [o for o in objs if o["colour"] == colour and o["shape"] == "square"]
    assert len(hits) == 1 and hits[0]["kind"] == "digit"
    return NUMBER_WORDS[hits[0]["digit"]], hits


def test_answers_are_correct_given_the_objects(many):
    for it in many:
        word, evidence = solve(it)
        assert it.answer_word == word, it.id
        assert it.options[it.answer_index] == word
        assert sorted(map(tuple, it.evidence_cells)) == sorted(tuple(o["cell"]) for o in evidence)
        assert sorted(map(tuple, it.evidence_bboxes)) == sorted(tuple(o["bbox"]) for o in evidence)


def test_one_object_per_cell_inside_its_cell(many, cfg):
    for it in many:
        cells = [tuple(o["cell"]) for o in it.objects]
        assert len(cells) == len(set(cells)), it.id
        for o in it.objects:
            x0, y0, x1, y1 = o["bbox"]
            cx0, cy0, cx1, cy1 = scenes.cell_box(tuple(o["cell"]))
            assert cx0 < x0 and cy0 < y0 and x1 < cx1 and y1 < cy1, (it.id, o)
            assert x1 - x0 == y1 - y0 and scenes.MIN_SIZE <= x1 - x0 <= scenes.MAX_SIZE
            assert 0 <= o["cell"][0] < cfg.grid and 0 <= o["cell"][1] < cfg.grid


def test_item_schema(many, cfg):
    for it in many:
        assert re.fullmatch(rf"test-{it.family}-\d{{5}}", it.id)
        assert len(it.options) == 4 and len(set(it.options)) == 4
        assert all(re.fullmatch(r"[a-z]+", w) for w in it.options), it.options
        assert it.answer in "ABCD" and it.options["ABCD".index(it.answer)] == it.answer_word
        assert it.keywords and all(k in it.question.split(" ") or k + "?" in it.question for k in it.keywords)
        assert it.caption_answer_word in it.caption.split() and it.caption_answer_word == it.answer_word
        x0, y0, x1, y1 = it.crop_box
        assert x1 - x0 == y1 - y0 and 0 <= x0 and 0 <= y0 and x1 <= cfg.image_size and y1 <= cfg.image_size
        for b in it.evidence_bboxes:
            assert x0 <= b[0] and y0 <= b[1] and b[2] <= x1 and b[3] <= y1
        assert it.crop.size == (cfg.crop_size, cfg.crop_size) and it.image.size == (224, 224)
        assert set(it.facts) >= {"colour", "shape", "row", "col", "count", "glyph"}
        assert json.loads(json.dumps(it.to_dict())) == it.to_dict()


def test_facts_match_the_answer(many):
    for it in many:
        f = it.facts
        if it.family == "attr":
            assert f["colour"] == it.answer_word and [f["row"], f["col"]] == it.evidence_cells[0]
        elif it.family == "count":
            assert NUMBER_WORDS[f["count"]] == it.answer_word and f["row"] is None
        elif it.family == "glyph":
            assert NUMBER_WORDS[f["glyph"]] == it.answer_word and f["shape"] == "square"
        else:
            assert f["relation"] == it.answer_word and f["colour"] == it.keywords[0]


def test_answer_letters_and_counts_are_spread(cfg):
    items = items_of(cfg, 60)
    letters = {L: sum(it.answer == L for it in items) for L in "ABCD"}
    assert min(letters.values()) > len(items) / 4 * 0.6, letters
    counts = {it.facts["count"] for it in items if it.family == "count"}
    assert counts == set(range(8))


def test_cell_labels(many, cfg):
    it = many[0]
    lab = cell_labels(it, cfg.grid)
    assert set(lab) == {"colour", "shape", "digit", "row", "col"}
    assert all(v.shape == (cfg.grid ** 2,) for v in lab.values())
    assert (lab["colour"] >= 0).sum() == len(it.objects)
    o = it.objects[0]
    i = o["cell"][0] * cfg.grid + o["cell"][1]
    assert scenes.COLOUR_NAMES[lab["colour"][i]] == o["colour"]
    assert lab["row"][i] == o["cell"][0] and lab["col"][i] == o["cell"][1]
    glyph = [x for x in many if x.family == "glyph"][0]
    assert (cell_labels(glyph, cfg.grid)["digit"] >= 0).sum() >= 2


def test_digit_rich_scenes_are_half_digits():
    rich = TestbedConfig(digit_rich=True, **TINY)
    objs = [o for i in range(30) for o in make_scene(rich, i)[0]]
    share = np.mean([o.kind == "digit" for o in objs])
    assert 0.4 < share < 0.6
    plain = [o for i in range(10) for o in make_scene(TestbedConfig(**TINY), i)[0]]
    assert not any(o.kind == "digit" for o in plain)


# ---------------------------------------------------------------- config validation

@pytest.mark.parametrize("kwargs, name", [
    (dict(image_size=100), "image_size"),
    (dict(image_size=28), "image_size"),
    (dict(image_size=0), "image_size"),
    (dict(image_size=56, n_objects=(1, 4)), "image_size"),  # relpos needs a 3x3 grid
    (dict(n_objects=(6, 65)), "n_objects"),
    (dict(n_objects=(0, 5)), "n_objects"),
    (dict(n_objects=(8, 5)), "n_objects"),
    (dict(n_objects=(5,)), "n_objects"),
    (dict(families=("attr", "foo")), "families"),
    (dict(families=()), "families"),
    (dict(families=("attr", "attr")), "families"),
    (dict(n_train=0, n_val=0, n_test=0), "n_train"),
    (dict(n_val=-1), "n_val"),
    (dict(n_test=2.5), "n_test"),
    (dict(crop_size=27), "crop_size"),
    (dict(seed=-1), "seed"),
    (dict(digit_rich="yes"), "digit_rich"),
])
def test_bad_parameters_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"TestbedConfig\.{name}"):
        TestbedConfig(**kwargs)


def test_unknown_family_message():
    with pytest.raises(ValueError, match="unknown task family 'foo'; known: attr, relpos, count, glyph"):
        TestbedConfig(families=("foo",))


def test_small_valid_configs():
    c = TestbedConfig(image_size=56, families=("attr", "count", "glyph"), n_objects=(1, 4), **TINY)
    assert all(len(make_item(c, "test", f, 0).objects) <= 4 for f in c.families)
    assert TestbedConfig(families=["glyph"], **TINY).families == ("glyph",)


# ---------------------------------------------------------------- datasets on disk

def test_generate_and_load(built, cfg):
    assert isinstance(built, Testbed) and len(built) == 20 and built.config == cfg
    assert [len(built.items(s)) for s in ("train", "val", "test")] == [8, 4, 8]
    assert len(built.items("test", "glyph")) == 2
    it = built.items("test", "glyph")[0]
    assert built.image(it).tobytes() == make_item(cfg, "test", "glyph", 0).image.tobytes()
    assert built.crop(it).size == (56, 56)
    assert built.manifest["counts"]["val"] == {f: 1 for f in FAMILIES}
    assert not (built.root.parent / "tb.partial").exists()
    load(built.root, verify=True)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load(tmp_path / "nope")


def test_missing_manifest_is_half_written(built, cfg):
    (built.root / "manifest.json").unlink()
    with pytest.raises(TestbedFormatError, match=r"half-written \(no manifest.json\); regenerate"):
        load(built.root)
    assert len(ensure(cfg, built.root, progress=False)) == 20
    assert (built.root / "manifest.json").is_file()


def test_invalid_manifest(built):
    (built.root / "manifest.json").write_text("{not json")
    with pytest.raises(TestbedFormatError, match="manifest.json"):
        load(built.root)


def test_truncated_items(built, cfg):
    path = built.root / "items.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))
    with pytest.raises(TestbedFormatError, match=r"items.jsonl has 19 items but manifest.json says 20"):
        load(built.root)
    path.write_text("".join(lines[:-1]) + lines[-1][:40])
    with pytest.raises(TestbedFormatError, match=r"items.jsonl line 20: malformed"):
        load(built.root)
    assert len(ensure(cfg, built.root, progress=False)) == 20


def test_corrupt_png(built, cfg):
    png = built.root / "images" / "test-attr-00001.png"
    png.write_bytes(png.read_bytes()[:100])
    with pytest.raises(TestbedFormatError, match=r"test-attr-00001.png"):
        load(built.root)
    tb = ensure(cfg, built.root, progress=False)
    assert tb.image(tb.items("test", "attr")[1]).size == (224, 224)
    # same-size damage is caught when the image is decoded
    raw = bytearray(png.read_bytes())
    raw[60:80] = bytes(20)
    png.write_bytes(bytes(raw))
    tb = load(built.root)
    with pytest.raises(TestbedFormatError, match=r"test-attr-00001.png: unreadable or corrupt PNG"):
        tb.image(tb.items("test", "attr")[1])
    with pytest.raises(TestbedFormatError, match=r"test-attr-00001.png"):
        load(built.root, verify=True)


def test_ensure_reuses_only_a_complete_matching_dataset(built, cfg):
    stamp = (built.root / "manifest.json").stat().st_mtime_ns
    assert ensure(cfg, built.root, progress=False).config == cfg
    assert (built.root / "manifest.json").stat().st_mtime_ns == stamp
    other = TestbedConfig(seed=3, **TINY)
    assert ensure(other, built.root, progress=False).config == other
    partial = built.root.with_name(built.root.name + ".partial")
    mark_owned(partial, "testbed")  # what a killed generator leaves
    (partial / "items.jsonl").write_text("x")
    assert ensure(other, built.root, progress=False).config == other
    assert not partial.exists()


def test_ensure_refuses_a_file_in_the_way_and_keeps_it(tmp_path, cfg):
    (tmp_path / "tb").write_text("not a dataset")
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path / 'tb'}: exists and is not a testbed folder")):
        ensure(cfg, tmp_path / "tb", progress=False)
    assert (tmp_path / "tb").read_text() == "not a dataset"


def test_unwritable_output_folder(tmp_path, cfg):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=re.escape(str(blocker))):
        generate(cfg, blocker / "tb", progress=False)


# ---------------------------------------------------------------- the resolution argument

def test_targets_are_small(many):
    for it in many:
        if it.family in ("attr", "glyph"):
            assert evidence_fraction(it) < 0.02, it.id


def test_the_clean_template_reader_understates_what_a_quarter_resolution_view_carries(cfg):
    """`factors=` runs the mismatched clean-template reader: it fails on quarter-resolution glyphs
    although the matched reader reads them (tests/test_chapter_tables.py), so it bounds nothing."""
    items = [make_item(cfg, "test", "glyph", i) for i in range(60)]
    df = readability(items, factors=(1, 4)).set_index(["family", "factor"])
    assert df.loc[("glyph", 1), "accuracy"] >= 0.95
    assert df.loc[("glyph", 4), "accuracy"] <= 0.4
    assert df.loc[("glyph", 4), "side_px"] == 56 and df.loc[("glyph", 4), "chance"] == 0.1


def test_readability_table_columns(many):
    df = readability(many, factors=(1, 2))
    assert list(df.columns) == ["family", "factor", "side_px", "accuracy", "n", "chance"]
    assert set(df.family) == {"attr", "glyph"}
    assert (df[df.factor == 1].accuracy == 1.0).all()


def test_make_item_rejects_bad_coordinates(cfg):
    for args, msg in [(("dev", "attr", 0), "unknown split 'dev'"), (("test", "foo", 0), "unknown task family"),
                      (("test", "attr", -1), "index")]:
        with pytest.raises(ValueError, match=msg):
            make_item(cfg, *args)


def test_items_frame_has_one_row_per_item_with_small_evidence():
    cfg = TestbedConfig(**TINY)
    items = items_of(cfg, n=8)
    frame = items_frame(items, cfg.image_size)
    assert len(frame) == len(items) and set(frame["family"]) <= set(FAMILIES)
    located = frame[frame["family"] != "count"]  # a count of zero has no evidence box
    assert (located["evidence_fraction"] > 0).all() and (frame["evidence_fraction"] < 0.5).all()
