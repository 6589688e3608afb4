"""The build: chapters are registered, well-formed, executed once and re-used when unchanged."""

import json
import os
from pathlib import Path

import nbformat
import pytest
import yaml
from latentmed import book
from latentmed.cli import main as cli_main
from latentmed.paths import ROOT


def _cells(path):
    return json.loads(path.read_text())["cells"]


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_every_notebook_is_a_registered_chapter_with_title_and_parameters(path):
    cells = _cells(path)
    first = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown" and first.startswith("# "), "first cell must be a # Title"
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0]["cell_type"] == "code"
    assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code"), "store notebooks without outputs"
    assert path.stem in [c.name for c in book.CHAPTERS]
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    assert f"book/chapters/{path.stem}" in [c["file"] for c in toc["chapters"]]
    assert (book.NBVAL_OUT / path.name).exists(), "run `latentmed nbval-refresh` and commit the CI copy"


def test_execute_runs_once_and_reuses_until_something_changes(tiny_chapter, tmp_path, monkeypatch):
    chapter = tiny_chapter
    out = book.execute(chapter, tmp_path / "out", {"n": 21})
    outputs = [o for c in nbformat.read(out, 4).cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("42" in o.get("text", "") for o in outputs)
    mtime = out.stat().st_mtime_ns
    book.execute(chapter, tmp_path / "out", {"n": 21})
    assert out.stat().st_mtime_ns == mtime, "unchanged notebook and parameters must be reused"
    assert book.stamp(chapter, {"n": 22}) != book.stamp(chapter, {"n": 21})


def test_cli_help_lists_the_steps(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for step in ("build", "testbed", "train", "notebooks", "html", "nbval-refresh"):
        assert step in out


# ---------------------------------------------------------------- how chapters are written

CHART_CALL = ("plots.line_chart", "plots.accuracy_bars", "plots.readability_chart", "plots.interval_chart",
              "plots.count_bars")


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_chapters_check_their_parameters_first_in_a_hidden_cell(path):
    cells = _cells(path)
    codes = [c for c in cells if c["cell_type"] == "code"]
    params = next(i for i, c in enumerate(codes) if "parameters" in c["metadata"].get("tags", []))
    first = codes[params + 1]
    lines = [ln for ln in "".join(first["source"]).splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[:2] == ["from latentmed import book", f'book.check_parameters(globals(), "{path.stem}")'], lines[:2]
    assert {"remove-input", "remove-cell"} & set(first["metadata"].get("tags", [])), "plumbing is hidden in the book"


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_every_cell_has_its_own_id(path):
    """A cell without an id makes nbformat print a warning into the executed chapter (the book's
    browser test refuses a page with stderr in it)."""
    ids = [c.get("id") for c in _cells(path)]
    assert None not in ids, f"{path.name}: cell {ids.index(None)} has no id"
    assert len(set(ids)) == len(ids), f"{path.name}: repeated cell ids"


# Chapters 1 and 2 (issue 19) show no code to the reader and keep charts out of the nbval comparison.
EDITED = ["01_testbed", "02_zoo"]


@pytest.mark.parametrize("name", EDITED)
def test_chapters_1_2_hide_code_and_keep_charts_out_of_the_comparison(name):
    codes = [c for c in _cells(ROOT / "notebooks" / f"{name}.ipynb") if c["cell_type"] == "code"]
    params = next(i for i, c in enumerate(codes) if "parameters" in c["metadata"].get("tags", []))
    for c in codes[params + 1:]:
        src = "".join(c["source"])
        tags = c["metadata"].get("tags", [])
        assert {"remove-input", "hide-input", "remove-cell"} & set(tags), f"code shown to every reader:\n{src[:200]}"
        if any(call in src for call in CHART_CALL):
            # a chart's SVG carries float coordinates that differ between machines: nbval skips
            # the cell, and the numbers it shows are in a table of another cell
            assert "nbval-ignore-output" in tags, f"chart cell without nbval-ignore-output:\n{src[:200]}"
            assert "display(pd" not in src and ".round(" not in src, f"a table in a chart cell:\n{src[:200]}"


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_data_and_models_parameters_name_the_folders_that_hold_testbed_and_zoo(path):
    """`data_dir` is the folder that holds testbed/, `models_dir` the one that holds zoo/, in every
    chapter; the parameter cell says so."""
    cell = next(c for c in _cells(path) if "parameters" in c["metadata"].get("tags", []))
    lines = "".join(cell["source"]).splitlines()
    for name, sub in (("data_dir", "testbed/"), ("models_dir", "zoo/")):
        line = next((ln for ln in lines if ln.startswith(f"{name} =")), None)
        if line is not None:
            assert sub in line.split("#", 1)[-1], f"{path.name}: {line!r} does not say it holds {sub}"


def test_chapter_refs_link_present_chapters_and_name_absent_ones(monkeypatch):
    present = book.available()[0]
    n = book.chapter_number(present.name)
    assert book.chapter_ref(n) == f"{{doc}}`chapter {n} <{present.name}>`"
    assert book.chapter_ref(n, "Chapter X") == f"{{doc}}`Chapter X <{present.name}>`"
    absent = max(book.PLANNED)  # a build whose table of contents leaves the last chapter out
    monkeypatch.setattr(book, "_in_toc", lambda: {c.name for c in book.available()
                                                  if book.chapter_number(c.name) != absent})
    assert book.present(absent) is None and book.present(n) is not None
    ref = book.chapter_ref(absent)
    assert "{doc}" not in ref and "not in this build" in ref and book.PLANNED[absent] in ref


def test_contents_markdown_lists_built_and_planned_chapters_and_the_tracks():
    text = book.contents_markdown(["book/intro", "book/chapters/01_testbed", "book/chapters/02_zoo"])
    assert "{doc}`The testbed </book/chapters/01_testbed>`" in text
    assert "3. Input -> latent" in text and "Real checkpoints: not in this build" in text
    with_real = book.contents_markdown(["book/chapters/08_real"])
    assert "Real checkpoints: chapter 8 ({doc}`Real checkpoints </book/chapters/08_real>`)" in with_real


def test_stage_book_refuses_a_chapter_that_is_not_executed(tmp_path):
    with pytest.raises(FileNotFoundError, match="not executed there"):
        book.stage_book(tmp_path / "empty", tmp_path / "stage")


def test_intro_writes_what_this_build_holds_and_config_loads_the_extension():
    assert "```{latentmed-contents}" in (ROOT / "book" / "intro.md").read_text()
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert "latentmed.book" in cfg["sphinx"]["extra_extensions"]
    assert cfg["sphinx"]["config"]["nb_render_markdown_format"] == "myst"


def test_executed_copies_name_no_machine_folders():
    """Papermill's metadata paths are kept relative to the project (committed CI copies)."""
    for path in sorted(book.NBVAL_OUT.glob("*.ipynb")):
        meta = json.loads(path.read_text())["metadata"].get("papermill", {})
        for key in ("input_path", "output_path"):
            assert not Path(meta.get(key, "")).is_absolute(), f"{path.name}: {key} {meta[key]!r}"


def test_cpu_kernels_are_pinned_for_the_ci_copies_and_a_set_value_is_kept(monkeypatch):
    from latentmed import paths

    assert os.environ.get("MKL_CBWR")  # conftest pinned them before torch ran: the nbval kernels inherit it
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    paths.pin_cpu_kernels()
    assert os.environ["MKL_CBWR"] == "COMPATIBLE" and os.environ["ATEN_CPU_CAPABILITY"] == "avx2"


def test_the_root_redirect_page_gets_an_icon_that_asks_for_nothing(tmp_path):
    """jupyter-book's index.html redirect has no icon link (a browser then asks for /favicon.ico,
    racing the redirect): the build adds an inline empty icon, once."""
    (tmp_path / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=book/intro.html" />\n')
    assert book.redirect_icon(tmp_path) == tmp_path / "index.html"
    book.redirect_icon(tmp_path)
    text = (tmp_path / "index.html").read_text()
    assert text.count('rel="icon"') == 1 and book.REDIRECT_ICON in text and 'url=book/intro.html' in text
    assert book.redirect_icon(tmp_path / "absent") == tmp_path / "absent" / "index.html"  # no page: nothing written
