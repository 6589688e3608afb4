"""The book: which notebooks are chapters, how they run (papermill) and how the HTML is built.

Every chapter is a parameterized notebook in notebooks/. The main build executes it with its
default parameters into book/chapters/ (skipped when notebook, parameters, library code and
inputs are unchanged); the CI copy in tests/notebooks/ is executed with small parameters and
checked by nbval. Jupyter Book 1.x renders the stored outputs (it never re-executes).
"""

from __future__ import annotations

import ast
import builtins
import difflib
import hashlib
import inspect
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .files import MARKER, atomic_write_text, mark_owned, remove_owned
from .paths import ROOT, data_dir, models_dir

NOTEBOOKS = ROOT / "notebooks"
CHAPTERS_OUT = ROOT / "book" / "chapters"
NBVAL_OUT = ROOT / "tests" / "notebooks"
STAGED = "staged-book"  # marker kind of the folders `stage_book` writes (and may replace)


@dataclass(frozen=True)
class Chapter:
    name: str  # notebooks/<name>.ipynb
    ci_params: dict = field(default_factory=dict)  # small run checked by nbval in CI
    inputs: tuple[str, ...] = ()  # files (relative to data/ or models/) whose change re-runs it
    needs: str = "zoo"  # what the build trains first: "none", "data" (the testbed), "zoo", "dose" (the zoo and chapter 10's series)
    after: tuple[str, ...] = ()  # chapters whose stored runs it reads (they run first in the build, so
    # that two chapters never compute the same run at once)
    cost: float = 60.0  # expected seconds at default settings on one thread (orders the build's jobs;
    # from benchmarks/results/main-cpu.json)

    @property
    def source(self) -> Path:
        return NOTEBOOKS / f"{self.name}.ipynb"


# Testbed sizes of the small "ci" profile (nbval copies and `latentmed build --profile ci`).
CI_TESTBED = dict(n_train=40, n_val=8, n_test=40)
_ZOO_INPUTS = ("data:testbed/manifest.json", "models:zoo/base/zoo.json")

CHAPTERS = [
    Chapter("01_testbed", ci_params=dict(CI_TESTBED, n_examples=2, n_readability=20),
            inputs=("data:testbed/manifest.json",), needs="data", cost=50),
    Chapter("02_zoo", ci_params=dict(small_run=True), inputs=_ZOO_INPUTS, cost=380),
    Chapter("03_input_to_latent", ci_params=dict(small_run=True, n_permutations=50), inputs=_ZOO_INPUTS, cost=750),
    Chapter("04_latent_to_answer", ci_params=dict(small_run=True), inputs=_ZOO_INPUTS, cost=380),
    Chapter("05_probing", ci_params=dict(small_run=True), inputs=_ZOO_INPUTS, cost=100),
    Chapter("07_capimagine", ci_params=dict(small_run=True), inputs=_ZOO_INPUTS, after=("04_latent_to_answer",),
            cost=300),
    Chapter("06_mediation", ci_params=dict(small_run=True, statsmodels_reps=20), inputs=_ZOO_INPUTS,
            after=("04_latent_to_answer",), cost=1000),
    Chapter("08_real", ci_params=dict(demo=True), needs="none", cost=10),
    Chapter("09_performance", needs="none", cost=10),  # renders the committed benchmark results; runs nothing heavy
    Chapter("10_dose", ci_params=dict(small_run=True), inputs=_ZOO_INPUTS, needs="dose",
            after=("06_mediation",), cost=525),  # copies chapter 6's mediation runs of its controls
    # the opening page reads what the chapters stored: it runs last and is shown first
    Chapter("00_scorecard", ci_params=dict(small_run=True), inputs=_ZOO_INPUTS,
            after=("02_zoo", "03_input_to_latent", "04_latent_to_answer", "05_probing", "07_capimagine"), cost=40),
]


def chapter(name: str) -> Chapter:
    """The chapter called `name` (e.g. "03_input_to_latent")."""
    for c in CHAPTERS:
        if c.name == name:
            return c
    raise ValueError(f"unknown chapter {name!r}; chapters: {', '.join(c.name for c in CHAPTERS)}")


# Names IPython puts into a kernel's globals that are never parameters.
_IPYTHON_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "display"})
_NO_DEFAULT = object()  # a default that is not a literal (an expression): any value is accepted


def _notebook_path(notebook: str | Path) -> Path:
    """notebooks/<notebook>.ipynb for a chapter name; a path to an .ipynb file is used as is."""
    path = Path(notebook)
    if path.suffix != ".ipynb":
        path = NOTEBOOKS / f"{notebook}.ipynb"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such notebook (parameters of {notebook!r})")
    return path


def declared_parameters(notebook: str | Path) -> dict[str, object]:
    """Names and default values assigned in the cell tagged `parameters` of a notebook (what
    papermill's `inspect_notebook` finds), read with `ast`: every chapter calls this first thing,
    and importing papermill in the kernel cost it about 2 s."""
    path = _notebook_path(notebook)
    try:
        cells = json.loads(path.read_text())["cells"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable notebook ({exc})") from exc
    cell = next((c for c in cells if c.get("cell_type") == "code"
                 and "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        return {}
    source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    try:
        body = ast.parse(source).body
    except SyntaxError as exc:
        raise ValueError(f"{path}: the parameters cell is not valid Python ({exc})") from exc
    declared = {}
    for node in body:
        target, value = ((node.targets[0], node.value) if isinstance(node, ast.Assign) and len(node.targets) == 1
                         else (node.target, node.value) if isinstance(node, ast.AnnAssign) else (None, None))
        if not isinstance(target, ast.Name) or value is None:
            continue
        try:
            declared[target.id] = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            declared[target.id] = _NO_DEFAULT
    return declared


def _type_ok(value, default) -> bool:
    """Whether `value` may replace `default`: None defaults take anything, numbers widen to float."""
    if default is None or default is _NO_DEFAULT:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _is_parameter_like(name: str, value) -> bool:
    """Whether a global could be a papermill parameter (not IPython's, a module, a function or class)."""
    if name.startswith("_") or name in _IPYTHON_NAMES or hasattr(builtins, name):
        return False
    return not (inspect.ismodule(value) or inspect.isclass(value) or callable(value))


def _check(params: dict, declared: dict, where: Path) -> None:
    """Raise a ValueError naming every unknown parameter and every value of the wrong type."""
    problems = []
    for name, value in params.items():
        if name not in declared:
            close = difflib.get_close_matches(name, list(declared), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown parameter {name!r}{hint}")
        elif not _type_ok(value, declared[name]):
            default = declared[name]
            problems.append(f"parameter {name!r} = {value!r} is a {type(value).__name__}, "
                            f"but its default {default!r} is a {type(default).__name__}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems) +
                         f" (declared parameters: {', '.join(declared) or 'none'})")


def check_parameters(namespace: dict, notebook: str) -> None:
    """Refuse a chapter run whose parameters are misspelt or of the wrong type (call it first thing
    in a chapter with `globals()`): papermill itself only warns and runs with the defaults."""
    path = _notebook_path(notebook)
    declared = declared_parameters(path)
    params = {k: v for k, v in namespace.items() if k in declared or _is_parameter_like(k, v)}
    _check(params, declared, path)


def available() -> list[Chapter]:
    """Chapters whose notebook exists (later issues add more)."""
    return [c for c in CHAPTERS if c.source.exists()]


def _lib_hash() -> str:
    h = hashlib.sha256()
    for path in sorted((ROOT / "lib" / "latentmed").rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    return h.hexdigest()


def _input_hash(chapter: Chapter) -> str:
    h = hashlib.sha256()
    for spec in chapter.inputs:
        kind, rel = spec.split(":", 1)
        path = (data_dir() if kind == "data" else models_dir()) / rel
        h.update(rel.encode() + (path.read_bytes() if path.exists() else b"missing"))
    return h.hexdigest()


def stamp(chapter: Chapter, params: dict) -> str:
    """What the executed notebook depends on: notebook, parameters, library, inputs."""
    h = hashlib.sha256(chapter.source.read_bytes())
    h.update(json.dumps(params, sort_keys=True).encode())
    h.update(_lib_hash().encode() + _input_hash(chapter).encode())
    return h.hexdigest()


def is_current(chapter: Chapter, out_dir: Path, params: dict | None = None) -> bool:
    """Whether `out_dir` holds an executed copy of `chapter` stamped with what it depends on now."""
    out, stamp_file = out_dir / chapter.source.name, out_dir / f".{chapter.name}.stamp"
    return out.exists() and stamp_file.exists() and stamp_file.read_text() == stamp(chapter, dict(params or {}))


def execute(chapter: Chapter, out_dir: Path, params: dict | None = None, force: bool = False) -> Path:
    """Run one chapter with papermill into `out_dir`, unless an up-to-date copy is there.

    The notebook runs into a temporary file that replaces the executed copy only when it
    finished, and the stamp is removed before and written after: a failed or killed run never
    leaves a copy that looks up to date."""
    import papermill as pm

    params = dict(params or {})
    _check(params, declared_parameters(chapter.source), chapter.source)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / chapter.source.name
    stamp_file = out_dir / f".{chapter.name}.stamp"
    if not force and is_current(chapter, out_dir, params):
        print(f"[book] {chapter.name}: up to date")
        return out
    print(f"[book] executing {chapter.name} {params or ''}")
    stamp_file.unlink(missing_ok=True)
    tmp = out_dir / ".running" / chapter.source.name  # a hidden folder: nbval and the book skip it
    tmp.parent.mkdir(exist_ok=True)
    try:
        pm.execute_notebook(str(chapter.source), str(tmp), parameters=params, cwd=str(NOTEBOOKS),
                            kernel_name="python3", progress_bar=False, log_output=False)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the error is in papermill's exception; the last good copy stays
        raise
    _relative_paths(tmp, out)
    os.replace(tmp, out)
    atomic_write_text(stamp_file, stamp(chapter, params))
    return out


def _relative_paths(path: Path, final: Path) -> None:
    """Papermill records the input and output paths in the notebook's metadata: keep them relative
    to the project, so that executed copies (the committed CI copies too) name no machine's folders."""
    nb = json.loads(path.read_text())
    meta = nb.get("metadata", {}).get("papermill", {})
    meta["output_path"] = str(final)
    for key in ("input_path", "output_path"):
        if meta.get(key):
            p = Path(meta[key])
            meta[key] = str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name
    atomic_write_text(path, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def execute_all(force: bool = False, profile: str = "default") -> list[Path]:
    """Run every available chapter with the profile's parameters ("default" or "ci")."""
    if profile not in ("default", "ci"):
        raise ValueError(f"profile {profile!r}: not one of default, ci")
    params = (lambda c: c.ci_params) if profile == "ci" else (lambda c: {})
    return [execute(c, CHAPTERS_OUT, params(c), force) for c in available()]


def refresh_nbval() -> list[Path]:
    """Re-execute the CI copies that nbval checks (commit the result), in the order pytest runs
    them (by file name), so each copy sees the files the ones before it left, as in the test run."""
    return [execute(c, NBVAL_OUT, c.ci_params, force=True) for c in sorted(available(), key=lambda c: c.name)]


def build_html(force: bool = False) -> Path:
    """Build the Jupyter Book (1.x, offline) from the executed chapters into _build/html."""
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(ROOT), "-W", "-n", "--keep-going"]
    if force:
        cmd.append("--all")
    print("[book] building HTML")
    subprocess.run(cmd, check=True, cwd=ROOT)
    return redirect_icon(ROOT / "_build" / "html")


def redirect_icon(html: Path) -> Path:
    """jupyter-book's root index.html, a redirect to the first page, has no icon link: a browser
    asks for /favicon.ico there, racing the redirect (a 404 in its console under load; a link to
    the book's icon was then aborted by the redirect instead). An empty inline icon asks for
    nothing; returns the page."""
    index = Path(html) / "index.html"
    if index.exists():
        text = index.read_text()
        if 'rel="icon"' not in text:
            atomic_write_text(index, f'{REDIRECT_ICON}\n{text}')
    return index


REDIRECT_ICON = '<link rel="icon" href="data:," />'  # an icon without a request


# ---------------------------------------------------------------- cross-references and contents

# The study's chapters as DESIGN.md plans them; `available()` says which exist in this checkout.
PLANNED = {0: "Scorecard", 1: "The testbed", 2: "The model zoo", 3: "Input -> latent", 4: "Latent -> answer",
           5: "Probing", 6: "Mediation", 7: "CapImagine", 8: "Real checkpoints", 9: "Performance",
           10: "When do latents become mediators"}
REAL_TRACK_CHAPTER = 8  # the real-checkpoint track is in a build when this chapter is


def chapter_number(name: str) -> int | None:
    """2 for "02_zoo"; None when the name has no number prefix."""
    head = name.split("_", 1)[0]
    return int(head) if head.isdigit() else None


def _in_toc() -> set[str]:
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return {Path(c["file"]).name for c in toc.get("chapters", [])}


def present(number: int) -> Chapter | None:
    """The chapter with this number when its notebook exists and the table of contents lists it."""
    toc = _in_toc()
    return next((c for c in available() if chapter_number(c.name) == number and c.name in toc), None)


def chapter_ref(number: int, text: str | None = None) -> str:
    """MyST for a reference to chapter `number` from another chapter (both in book/chapters/).

    A chapter in this build becomes a {doc} cross-reference, which the build resolves and checks
    (-n -W); a planned chapter that is not in this build is named as such, never linked.
    Chapters render text/markdown outputs as MyST (`nb_render_markdown_format` in _config.yml).
    """
    title = PLANNED.get(number, f"chapter {number}")
    c = present(number)
    if c is not None:
        return f"{{doc}}`{text or f'chapter {number}'} <{c.name}>`"
    return f"{text or f'chapter {number}'} (*{title}*, not in this build)"


def contents_markdown(docnames) -> str:
    """The introduction's account of this build: which chapters and tracks it holds (MyST)."""
    built = {}
    for doc in docnames:
        name = Path(doc).name
        n = chapter_number(name)
        if doc.startswith("book/chapters/") and n is not None:
            built[n] = doc
    lines = ["**Chapters in this build:**", ""]
    lines += [f"{n}. {{doc}}`{PLANNED.get(n, Path(doc).name)} </{doc}>`" for n, doc in sorted(built.items())] or ["(none)"]
    missing = [n for n in PLANNED if n not in built]
    if missing:
        lines += ["", "**Planned chapters not in this build:** " +
                  "; ".join(f"{n}. {PLANNED[n]}" for n in missing) + "."]
    real = built.get(REAL_TRACK_CHAPTER)
    lines += ["", "**Tracks in this build:** the synthetic testbed (every chapter above). " +
              (f"Real checkpoints: chapter {REAL_TRACK_CHAPTER} ({{doc}}`{PLANNED[REAL_TRACK_CHAPTER]} </{real}>`) "
               "is the only place for them; it says at its top whether this build holds results of real "
               "checkpoints or only how to produce them. Every other chapter is testbed only."
               if real else
               f"Real checkpoints: not in this build (no chapter {REAL_TRACK_CHAPTER}); no number in this book "
               "comes from a real checkpoint.")]
    return "\n".join(lines)


def _page_fixes(app, pagename, templatename, context, doctree) -> None:
    """Two fixes for console errors on every page of the stock theme stack.

    pydata-sphinx-theme reads the colour mode from `default_mode`, which sphinx-book-theme
    leaves empty ("Got invalid theme mode"): set it to "auto". sphinx-thebe 0.3.1 registers its
    inline config script twice (`const THEBE_JS_URL` declared twice: an uncaught SyntaxError):
    keep the first copy of each script.
    """
    if not context.get("default_mode"):
        context["default_mode"] = "auto"
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for js in scripts:
        key = (str(getattr(js, "filename", js) or ""), getattr(js, "priority", None),
               tuple(sorted(getattr(js, "attributes", {}).items())))  # the copies differ: filename None vs ""
        if key not in seen:
            seen.add(key)
            kept.append(js)
    context["script_files"] = kept


def setup(app):
    """Sphinx extension (`_config.yml`: `sphinx: extra_extensions: [latentmed.book]`): the
    `{latentmed-contents}` directive writes `contents_markdown` for the documents of this build;
    `_page_fixes` keeps the pages free of console errors."""
    from docutils import nodes
    from docutils.statemachine import StringList
    from sphinx.util.docutils import SphinxDirective

    class Contents(SphinxDirective):
        def run(self):
            node = nodes.container(classes=["latentmed-contents"])
            text = contents_markdown(sorted(self.env.found_docs))
            self.state.nested_parse(StringList(text.splitlines(), source="latentmed-contents"),
                                    self.content_offset, node)
            return [node]

    app.add_directive("latentmed-contents", Contents)
    app.connect("html-page-context", _page_fixes, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def _looks_staged(dest: Path) -> bool:
    """A folder holding nothing but what `stage_book` writes (and the book build's output)."""
    if not dest.is_dir() or dest.is_symlink():
        return False
    names = {p.name for p in dest.iterdir()}
    return {"_config.yml", "_toc.yml", "book"} <= names <= {"_config.yml", "_toc.yml", "book", "_build", MARKER}


def stage_book(chapters: Path, dest: Path) -> Path:
    """A buildable copy of the book in `dest` whose chapters are the executed notebooks in
    `chapters` (e.g. the CI copies in tests/notebooks/): config, toc, the book's own pages."""
    import shutil

    dest = Path(dest)
    if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
        dest.rmdir()
    elif _looks_staged(dest):
        mark_owned(dest, STAGED)  # staged by an earlier version of this code (no marker yet)
    remove_owned(dest, STAGED)  # an earlier staged copy; a folder the project did not stage is refused
    mark_owned(dest, STAGED)
    (dest / "book" / "chapters").mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, dest / name)
    for page in (ROOT / "book").iterdir():  # the book's own pages and files (not the chapters)
        if page.is_file():
            shutil.copy2(page, dest / "book" / page.name)
    for name in sorted(_in_toc()):
        src = Path(chapters) / f"{name}.ipynb"
        if not src.exists():
            raise FileNotFoundError(f"{src}: the table of contents lists {name}, but it is not executed there")
        shutil.copy2(src, dest / "book" / "chapters" / src.name)
    return dest


def build_html_at(src: Path, out: Path) -> Path:
    """Build the book in `src` into `out`/_build/html (warnings and unresolved references fail)."""
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(src), "--path-output", str(out),
           "-W", "-n", "--keep-going", "--all"]
    res = subprocess.run(cmd, cwd=src, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"jupyter-book build of {src} failed ({res.returncode}):\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}")
    return redirect_icon(Path(out) / "_build" / "html")
