"""The book in a real browser: build it at the CI setting and open every page in headless Chromium.

The book is built (Jupyter Book 1.x, warnings and unresolved references fail the build) from
the executed CI copies of the chapters in tests/notebooks/ (CI parameters; nbval checks in the
same run that they still reproduce), served on 127.0.0.1 and opened page by page in Debian's
Chromium (/usr/bin/chromium, installed by scripts/browser.sh, which scripts/test.sh runs),
driven by Playwright. A page fails on: a console error or uncaught exception; a request that
fails, answers >= 400 or leaves this machine; an image that does not load; a link to a missing
page or anchor; a cross-reference left unresolved (a role printed as text, an xref without a
link); a warning, traceback or stderr stream in a cell's output; a machine path anywhere in the
page. A screenshot of each page is kept in build/browser/screenshots/ (not committed).

Where Chromium is missing the test is skipped, except under CI=true, where it fails.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import pytest
from latentmed import book
from latentmed.paths import ROOT

CHROMIUM = os.environ.get("LATENTMED_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
OUT = ROOT / "build" / "browser"
# text that must never appear in a rendered output
LEAKS = re.compile(r"Traceback \(most recent call last\)|\b\w*Warning\b:|warnings\.warn|"
                   r"\b(?:Deprecation|Future|User|Runtime|Tqdm|Pandas\d?)Warning\b")
MACHINE_PATHS = re.compile(r"(?:/work/|/home/|/root/|/tmp/|/usr/lib/|/opt/|site-packages|/\.venv/|"
                           + re.escape(str(ROOT)) + r")")
RAW_ROLES = re.compile(r"\{(?:doc|ref|numref|eq|term)\}`")


def _chromium_or_skip():
    if Path(CHROMIUM).exists():
        return CHROMIUM
    msg = f"{CHROMIUM} not found: run `bash scripts/browser.sh` (Debian's chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no access log on stderr
        pass


class Site:
    """A folder served on 127.0.0.1 on a free port, for the duration of a `with` block."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        handler = functools.partial(_Quiet, directory=str(self.folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _ids(path: Path) -> set[str]:
    html = path.read_text(errors="replace")
    return set(re.findall(r'\bid="([^"]+)"', html)) | set(re.findall(r'\bname="([^"]+)"', html))


def check_page(page, site: Site, rel: str, screenshot: Path | None = None) -> list[str]:
    """Open one page of `site` and return every problem found on it (empty: the page is fine)."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"uncaught exception: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))

    def on_response(r):
        if r.status >= 400:
            problems.append(f"HTTP {r.status}: {r.url}")

    def on_request(r):
        if urlparse(r.url).scheme in ("http", "https") and not r.url.startswith(site.origin):
            problems.append(f"request leaves this machine: {r.url}")

    page.on("response", on_response)
    page.on("request", on_request)
    page.goto(f"{site.origin}/{rel}", wait_until="load")
    page.wait_for_load_state("networkidle")

    broken = page.evaluate("""() => Array.from(document.images)
        .filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src'))""")
    problems += [f"image does not load: {src}" for src in broken]

    unresolved = page.evaluate("""() => Array.from(document.querySelectorAll('.xref, .pending_xref'))
        .filter(e => !e.closest('a')).map(e => e.textContent.trim())""")
    problems += [f"unresolved cross-reference: {t}" for t in unresolved]
    body = page.evaluate("() => document.body.innerText")
    problems += [f"role printed as text: {m.group(0)}..." for m in RAW_ROLES.finditer(body)]

    stderr = page.evaluate("""() => Array.from(document.querySelectorAll('.cell_output .stderr, .output.stderr'))
        .map(e => e.textContent.trim().slice(0, 200))""")
    problems += [f"stderr in an output: {t}" for t in stderr]
    outputs = page.evaluate("""() => Array.from(document.querySelectorAll('.cell_output'))
        .map(e => e.innerText)""")
    for text in outputs:
        for m in LEAKS.finditer(text):
            problems.append(f"warning or traceback in an output: ...{text[max(0, m.start() - 60):m.end() + 60]}...")
    for m in MACHINE_PATHS.finditer(page.content()):
        problems.append(f"machine path in the page: {m.group(0)}")

    for href in page.evaluate("() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"):
        url, frag = urldefrag(href)
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not url.startswith(site.origin):
            continue  # mailto:, external sites: none should be requested, links alone are fine
        target = site.folder / unquote(parsed.path.lstrip("/"))
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            problems.append(f"broken link: {href}")
        elif frag and target.suffix == ".html" and unquote(frag) not in _ids(target):
            problems.append(f"broken anchor: {href}")
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    return problems


@pytest.fixture(scope="module")
def browser():
    exe = _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def ci_book() -> Path:
    """The book built from the CI copies of the chapters, in build/browser/html."""
    src = book.stage_book(book.NBVAL_OUT, OUT / "src")
    out = OUT / "out"
    if out.exists():
        shutil.rmtree(out)
    index = book.build_html_at(src, out)
    assert index.exists()
    return index.parent


def test_every_page_of_the_ci_book_renders_cleanly(browser, ci_book):
    pages = sorted(p.relative_to(ci_book).as_posix() for p in ci_book.rglob("*.html")
                   if not p.relative_to(ci_book).as_posix().startswith("_static/"))
    chapters = [f"book/chapters/{c.name}.html" for c in book.available()]
    assert set(chapters) <= set(pages) and "book/intro.html" in pages, pages
    assert book.REDIRECT_ICON in (ci_book / "index.html").read_text()  # the redirect asks for no icon
    found = {}
    with Site(ci_book) as site:
        for rel in pages:
            page = browser.new_page()
            shot = OUT / "screenshots" / (rel.replace("/", "__").removesuffix(".html") + ".png")
            problems = check_page(page, site, rel, screenshot=shot)
            if rel in chapters:  # a chapter shows its figures
                assert page.evaluate("() => document.querySelectorAll('.cell_output img').length") > 0, rel
            page.close()
            if problems:
                found[rel] = problems
    assert not found, "\n".join(f"{rel}:\n  " + "\n  ".join(p) for rel, p in found.items())


def test_the_intro_says_which_chapters_and_tracks_are_in_this_build(browser, ci_book):
    with Site(ci_book) as site:
        page = browser.new_page()
        page.goto(f"{site.origin}/book/intro.html")
        text = page.evaluate("() => document.querySelector('.latentmed-contents').innerText")
        links = page.evaluate("""() => Array.from(document.querySelectorAll('.latentmed-contents a'))
            .map(a => a.getAttribute('href'))""")
        page.close()
    for c in book.available():
        assert book.PLANNED[book.chapter_number(c.name)] in text
        assert any(h.endswith(f"chapters/{c.name}.html") for h in links), links
    assert "Real checkpoints" in text
    missing = [k for k in book.PLANNED if book.present(k) is None]
    assert ("Planned chapters not in this build" in text) == bool(missing)


def test_the_page_checks_catch_what_they_claim_to(browser, tmp_path):
    """A deliberately broken site: every kind of problem must be reported."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "ok.html").write_text('<html><body><p id="here">fine</p></body></html>')
    (tmp_path / "sub" / "bad.html").write_text(f"""<html><body>
      <img src="missing.png">
      <a href="../ok.html#here">good</a> <a href="../ok.html#nowhere">bad anchor</a> <a href="gone.html">gone</a>
      <span class="xref std std-ref">unresolved-label</span>
      <div class="cell_output"><div class="output stderr"><pre>oops</pre></div>
        <pre>{ROOT}/lib/x.py:3: UserWarning: careful</pre></div>
      <p>see {{doc}}`02_zoo`</p>
      <script>console.error("boom"); throw new Error("uncaught");</script>
    </body></html>""")
    with Site(tmp_path) as site:
        page = browser.new_page()
        problems = "\n".join(check_page(page, site, "sub/bad.html"))
        page.close()
        page = browser.new_page()
        assert check_page(page, site, "ok.html") == []
        page.close()
    for expected in ("image does not load: missing.png", "broken anchor", "broken link", "gone.html",
                     "unresolved cross-reference: unresolved-label", "stderr in an output",
                     "warning or traceback in an output", "machine path in the page", "role printed as text",
                     "console error: boom", "uncaught exception", "HTTP 404"):
        assert expected in problems, f"{expected!r} not reported in:\n{problems}"
    assert "#here" not in problems
