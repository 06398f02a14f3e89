"""The built book as a reader sees it (``make test-browser``, step (e) of ``make test``).

Serves ``_build/html`` on a free localhost port and opens pages in headless Chromium (Debian's
``/usr/bin/chromium``, driven through playwright; never ``playwright install``). A page fails on any
console error, page error, failed request, HTTP status >= 400, broken image, request to a host other
than localhost (such requests are blocked and recorded: the book must work offline), or math that
MathJax did not render. Screenshots go to ``_build/screenshots/`` for humans to look at.

Without Chromium or a built book the tests skip, except under CI (``CI`` set to a true value: ``1``,
``true``, ``yes``; see ``tests/conftest.py``), where the skip is a failure.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# (path under _build/html, where the browser lands, screenshot name, whether the page must contain
# rendered math). index.html is Jupyter Book's redirect to the root page, book/intro.html. Every chapter
# in _toc.yml is opened too: math, where a page has any, must be rendered.
sys.path.insert(0, str(ROOT / "scripts"))
from toc_notebooks import toc_notebooks  # noqa: E402

PAGES = [
    ("index.html", "book/intro.html", "index", True),
    ("book/library.html", "book/library.html", "library", True),
    ("book/bibliography.html", "book/bibliography.html", "bibliography", False),
] + [
    (f"notebooks/{nb.stem}.html", f"notebooks/{nb.stem}.html", nb.stem, nb.stem.startswith("01_"))
    for nb in toc_notebooks()
]

# Raw TeX left in the visible text (code blocks removed) means MathJax did not typeset it.
_RAW_TEX_JS = r"""
() => {
  const clone = document.body.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, mjx-container, .highlight, textarea')
       .forEach(e => e.remove());
  const text = clone.textContent;
  return ['\\[', '\\]', '\\(', '\\)', '$$', '\\begin{'].filter(d => text.includes(d));
}
"""
_MATH_JS = """
() => ({
  math: document.querySelectorAll('.math').length,
  unrendered: Array.from(document.querySelectorAll('.math'))
      .filter(e => !e.querySelector('mjx-container'))
      .map(e => e.textContent.trim().slice(0, 80)),
  containers: document.querySelectorAll('mjx-container').length,
})
"""
_WAIT_IMAGES_JS = """
async () => {
  const imgs = Array.from(document.images);
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => i.complete ? null :
      new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); })));
  return imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.currentSrc || i.src);
}
"""


def _skip_or_fail(reason: str):
    """Skip; under CI (``CI`` true by the rule of ``tests/conftest.py``) its hook makes the skip a failure."""
    pytest.skip(f"{reason} (the browser test may not be skipped under CI)")


def _chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002  (keep pytest's output readable)
        pass


@pytest.fixture(scope="module")
def base_url():
    if not (HTML / "index.html").is_file():
        _skip_or_fail(f"no built book at {HTML.relative_to(ROOT)} (run `make test-build` or `make book`)")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    if executable is None:
        _skip_or_fail("chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip_or_fail("the playwright python package is not installed")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.mark.parametrize("path, lands_on, name, expects_math", PAGES, ids=[p[2] for p in PAGES])
def test_page_renders_offline(base_url, browser, path, lands_on, name, expects_math):
    if not (HTML / path).is_file():
        _skip_or_fail(f"{path} is not in the built book")
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    page = context.new_page()
    problems: dict[str, list[str]] = {
        "console errors": [],
        "page errors": [],
        "failed requests": [],
        "HTTP errors": [],
        "non-localhost requests (blocked)": [],
        "broken images": [],
        "math": [],
    }

    def route(route):
        url = route.request.url
        if url.startswith(("data:", "blob:", "about:")) or urlparse(url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            problems["non-localhost requests (blocked)"].append(url)
            route.abort()

    context.route("**/*", route)
    page.on("console", lambda m: m.type == "error" and problems["console errors"].append(
        f"{m.text} @ {m.location.get('url', '')}"))
    page.on("pageerror", lambda e: problems["page errors"].append(str(e)))
    page.on("requestfailed", lambda r: problems["failed requests"].append(f"{r.url}: {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and problems["HTTP errors"].append(f"{r.status} {r.url}"))

    try:
        response = page.goto(f"{base_url}/{path}", wait_until="load")
        assert response is not None and response.ok, f"{path}: {response and response.status}"
        page.wait_for_url(f"{base_url}/{lands_on}")
        page.wait_for_load_state("networkidle")

        # MathJax 3: wait until typesetting is done, then check that every math element was rendered.
        has_mathjax = page.evaluate("() => !!(window.MathJax && MathJax.startup && MathJax.startup.promise)")
        if has_mathjax:
            page.evaluate("() => MathJax.startup.promise")
        math = page.evaluate(_MATH_JS)
        if expects_math and math["math"] == 0:
            problems["math"].append("page should contain math but has no .math element")
        if math["math"] and not has_mathjax:
            problems["math"].append(f"{math['math']} math elements but MathJax is not loaded")
        if math["unrendered"]:
            problems["math"].append(f"math not rendered by MathJax: {math['unrendered']}")
        if math["math"] and math["containers"] == 0:
            problems["math"].append("no mjx-container on a page with math")
        raw = page.evaluate(_RAW_TEX_JS)
        if raw:
            problems["math"].append(f"raw TeX delimiters left in the page text: {raw}")

        problems["broken images"] += page.evaluate(_WAIT_IMAGES_JS)
        page.wait_for_load_state("networkidle")

        assert page.title(), f"{path}: page has no title"
        assert page.locator("h1").count() >= 1, f"{path}: page has no heading"

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
    finally:
        context.close()

    found = {k: v for k, v in problems.items() if v}
    assert not found, f"{path}:\n" + "\n".join(f"  {k}:\n    " + "\n    ".join(v) for k, v in found.items())
