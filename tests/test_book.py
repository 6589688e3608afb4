"""The build: chapters are registered, well-formed, executed once and re-used when unchanged."""

import json

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


def test_execute_runs_once_and_reuses_until_something_changes(tmp_path, monkeypatch):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("n = 1")
    params.metadata["tags"] = ["parameters"]
    nb.metadata.update(kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
                       language_info={"name": "python"})
    nb.cells = [nbformat.v4.new_markdown_cell("# Tiny"), params, nbformat.v4.new_code_cell("print(n * 2)")]
    (tmp_path / "tiny.ipynb").write_text(nbformat.writes(nb))
    monkeypatch.setattr(book, "NOTEBOOKS", tmp_path)
    chapter = book.Chapter("tiny")
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
