"""Chapter parameters: a misspelt name or a value of the wrong type is refused, never run with defaults."""

import nbformat
import pytest
from latentmed import book

BASE = {"In": [], "Out": {}, "get_ipython": print, "_i1": "", "_": None, "pytest": pytest, "Path": object}


def _tiny_notebook(folder, source: str = "n = 1\nrate = 0.5\nflag = False\nname = 'a'\nopt = None") -> book.Chapter:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(source)
    params.metadata["tags"] = ["parameters"]
    nb.metadata.update(kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
                       language_info={"name": "python"})
    nb.cells = [nbformat.v4.new_markdown_cell("# Tiny"), params, nbformat.v4.new_code_cell("print(n * 2)")]
    (folder / "tiny.ipynb").write_text(nbformat.writes(nb))
    return book.Chapter("tiny")


GOOD = [
    ("defaults", {}),
    ("int for int", {"n": 3}),
    ("int for float", {"rate": 2}),
    ("float for float", {"rate": 0.1}),
    ("bool for bool", {"flag": True}),
    ("str for str", {"name": "b"}),
    ("anything for None", {"opt": [1, 2]}),
    ("str for None", {"opt": "x"}),
]

BAD = [
    ("misspelt name", {"nn": 3}, "unknown parameter 'nn'"),
    ("str for int", {"n": "3"}, "parameter 'n' = '3' is a str"),
    ("float for int", {"n": 3.0}, "parameter 'n' = 3.0 is a float"),
    ("bool for int", {"n": True}, "parameter 'n' = True is a bool"),
    ("bool for float", {"rate": False}, "parameter 'rate' = False is a bool"),
    ("str for float", {"rate": "0.1"}, "parameter 'rate' = '0.1' is a str"),
    ("int for bool", {"flag": 1}, "parameter 'flag' = 1 is a int"),
    ("str for bool", {"flag": "True"}, "parameter 'flag' = 'True' is a str"),
    ("int for str", {"name": 5}, "parameter 'name' = 5 is a int"),
    ("None for str", {"name": None}, "parameter 'name' = None is a NoneType"),
]


@pytest.mark.parametrize("params", [p for _, p in GOOD], ids=[i for i, _ in GOOD])
def test_check_parameters_accepts_declared_names_of_compatible_types(tmp_path, monkeypatch, params):
    monkeypatch.setattr(book, "NOTEBOOKS", tmp_path)
    _tiny_notebook(tmp_path)
    book.check_parameters({**BASE, **params}, "tiny")


@pytest.mark.parametrize("params,message", [(p, m) for _, p, m in BAD], ids=[i for i, _, _ in BAD])
def test_check_parameters_refuses_unknown_names_and_wrong_types(tmp_path, monkeypatch, params, message):
    monkeypatch.setattr(book, "NOTEBOOKS", tmp_path)
    _tiny_notebook(tmp_path)
    with pytest.raises(ValueError, match="tiny.ipynb") as exc:
        book.check_parameters({**BASE, **params}, "tiny")
    assert message in str(exc.value)


def test_check_parameters_suggests_the_declared_name_on_a_real_chapter():
    with pytest.raises(ValueError, match=r"unknown parameter 'n_exampels' \(did you mean 'n_examples'\?\)"):
        book.check_parameters({**BASE, "n_exampels": 5}, "01_testbed")


def test_check_parameters_names_a_missing_notebook():
    with pytest.raises(FileNotFoundError, match="no_such_chapter.ipynb"):
        book.check_parameters({}, "no_such_chapter")


def test_execute_refuses_unknown_parameters_before_running(tmp_path, monkeypatch):
    monkeypatch.setattr(book, "NOTEBOOKS", tmp_path)
    chapter = _tiny_notebook(tmp_path)
    with pytest.raises(ValueError, match="unknown parameter 'nn'"):
        book.execute(chapter, tmp_path / "out", {"nn": 21})
    assert not (tmp_path / "out" / "tiny.ipynb").exists(), "nothing may run with a misspelt parameter"
    with pytest.raises(ValueError, match="parameter 'n' = '21' is a str"):
        book.execute(chapter, tmp_path / "out", {"n": "21"})


def _papermill_defaults(path) -> dict:
    """What papermill's own reader finds in a parameters cell (non-literal defaults as "<expr>")."""
    import ast

    import papermill as pm

    out = {}
    for name, info in pm.inspect_notebook(str(path)).items():
        try:
            out[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            out[name] = "<expr>"
    return out


def _ours(path) -> dict:
    return {k: "<expr>" if v is book._NO_DEFAULT else v for k, v in book.declared_parameters(path).items()}


@pytest.mark.parametrize("chapter", [c.name for c in book.CHAPTERS])
def test_declared_parameters_match_papermills_reading_of_every_chapter(chapter):
    path = book.chapter(chapter).source
    ours, theirs = _ours(path), _papermill_defaults(path)
    assert ours and list(ours) == list(theirs) and ours == theirs


def test_declared_parameters_read_annotations_expressions_and_comments(tmp_path, monkeypatch):
    monkeypatch.setattr(book, "NOTEBOOKS", tmp_path)
    src = "n: int = 3  # items\nrate = 2 * 0.5\nnames = ['a', 'b']\n# a comment\nopt = None\nx = y = 1"
    _tiny_notebook(tmp_path, src)
    ours = _ours(tmp_path / "tiny.ipynb")
    assert ours == {"n": 3, "rate": "<expr>", "names": ["a", "b"], "opt": None}
    assert {k: v for k, v in _papermill_defaults(tmp_path / "tiny.ipynb").items() if k in ours} == ours


def test_reading_a_chapters_parameters_does_not_import_papermill():
    import subprocess
    import sys

    code = ("import sys; from latentmed import book; book.declared_parameters('01_testbed'); "
            "print('papermill' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
