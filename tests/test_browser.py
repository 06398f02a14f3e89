"""The built book as a reader sees it (``make test-browser``, step (e) of ``make test``).

Serves ``_build/html`` on a free localhost port and opens pages in headless Chromium (Debian's
``/usr/bin/chromium``, driven through playwright; never ``playwright install``). A page fails on any
console error, page error, failed request, HTTP status >= 400, broken image, request to a host other
than localhost (such requests are blocked and recorded: the book must work offline), or math that
MathJax did not render. On every chapter page it also checks how the chapter reads (issue 19): no code
block scrolls sideways (``scrollWidth > clientWidth``, measured with every collapsed cell opened), every
figure of a cell output is a numbered, captioned figure ("Figure N.M"), plotting cells are collapsed behind a
toggle, and the exercises render with their solution dropdowns, which open on a click. Screenshots go to
``_build/screenshots/`` for humans to look at (a chapter's page, and ``NN_..._solution.png``: its first
solution opened).

Without Chromium or a built book the tests skip, except under CI (``CI`` set to a true value: ``1``,
``true``, ``yes``; see ``tests/conftest.py``), where the skip is a failure.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
# (path under _build/html, where the browser lands, screenshot name, whether the page must contain
# rendered math). index.html is Jupyter Book's redirect to the root page, book/intro.html. Every chapter
# in _toc.yml is opened too: math, where a page has any, must be rendered.
sys.path.insert(0, str(ROOT / "scripts"))
from offline_browser import CHROMIUM_ARGS, block_outside_requests, find_chromium, serve  # noqa: E402
from toc_notebooks import toc_notebooks  # noqa: E402

PAGES = [
    ("index.html", "book/intro.html", "index", True),
    ("book/library.html", "book/library.html", "library", True),
    ("book/notation.html", "book/notation.html", "notation", True),
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
# How a chapter reads: measured with every collapsed cell and dropdown opened (a closed one has no width).
_READING_JS = r"""
() => {
  document.querySelectorAll('details').forEach(d => { d.open = true; });
  const inOutput = e => !!e.closest('div.cell_output');
  const overflowing = Array.from(document.querySelectorAll('div.highlight pre'))
      .filter(e => !inOutput(e) && e.scrollWidth > e.clientWidth + 1)
      .map(e => `${e.scrollWidth - e.clientWidth}px too wide: ` +
                e.textContent.split('\n').reduce((a, b) => (b.length > a.length ? b : a), '').slice(0, 70));
  const images = Array.from(document.querySelectorAll('div.cell_output img'));
  const unnumbered = images.filter(img => {
      const fig = img.closest('figure');
      const number = fig && fig.querySelector('.caption-number');
      const text = fig && fig.querySelector('.caption-text');
      return !(number && /^Figure \d+\.\d+/.test(number.textContent.trim()) &&
               text && text.textContent.trim().length > 0);
  }).map(img => img.getAttribute('src'));
  const exercises = document.querySelector('section#exercises');
  const result = {
    overflowing, unnumbered, figures: images.length,
    collapsed: document.querySelectorAll('div.cell.tag_hide-input').length,
    toggles: document.querySelectorAll('div.cell.tag_hide-input details.hide').length,
    exercises: exercises ? Array.from(exercises.querySelectorAll('strong'))
        .filter(e => /^Exercise \d+\.\d+/.test(e.textContent)).length : 0,
    dropdowns: exercises ? exercises.querySelectorAll('details.sd-dropdown').length : 0,
    numrefs: document.querySelectorAll('a.reference.internal span.std-numref').length,
  };
  document.querySelectorAll('details').forEach(d => { d.open = false; });
  return result;
}
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


@pytest.fixture(scope="module")
def base_url():
    if not (HTML / "index.html").is_file():
        _skip_or_fail(f"no built book at {HTML.relative_to(ROOT)} (run `make test-build` or `make book`)")
    with serve(HTML) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
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
        "reading": [],
    }

    block_outside_requests(context, problems["non-localhost requests (blocked)"])
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
        if path.startswith("notebooks/"):
            problems["reading"] += _reading_problems(page, name)
    finally:
        context.close()

    found = {k: v for k, v in problems.items() if v}
    assert not found, f"{path}:\n" + "\n".join(f"  {k}:\n    " + "\n    ".join(v) for k, v in found.items())


def _reading_problems(page, name: str) -> list[str]:
    """Issue 19's checks on one chapter page (see the module docstring); screenshots a solution opened."""
    found = page.evaluate(_READING_JS)
    problems = [f"code block scrolls sideways: {o}" for o in found["overflowing"]]
    problems += [f"figure without a number and caption: {src}" for src in found["unnumbered"]]
    if found["figures"] and found["collapsed"] == 0:
        problems.append("no collapsed (hide-input) cell on a page with figures")
    if found["toggles"] != found["collapsed"]:
        problems.append(f"{found['collapsed']} hide-input cells but {found['toggles']} toggles rendered")
    if not 3 <= found["exercises"] <= 6:
        problems.append(f"{found['exercises']} exercises rendered (3-6 expected)")
    if found["dropdowns"] < 1:
        problems.append("no solution dropdown rendered in the exercises")
    else:
        dropdown = page.locator("section#exercises details.sd-dropdown").first
        dropdown.locator("summary").click()
        if not dropdown.evaluate("d => d.open"):
            problems.append("a solution dropdown does not open on a click")
        else:
            dropdown.scroll_into_view_if_needed()
            dropdown.screenshot(path=str(SCREENSHOTS / f"{name}_solution.png"))
    return problems


# ------------------------------------------------------------------------------------- launch buttons
# One setting, `repository.url` in _config.yml, turns on Binder and Colab buttons on every chapter
# (scripts/book_launch_buttons.py). Unset (as committed), the book above has none. Set, checked on a second
# build with a dummy URL, made once into its own folder: the buttons are plain links to the providers for
# that repository, and opening the menu sends no request outside.
DUMMY_REPOSITORY = "https://github.com/example-owner/example-book"
LAUNCH_BUILD = ROOT / "_build" / "launch-check"
LAUNCH_HOSTS = ("mybinder.org", "colab.research.google.com")


@pytest.fixture(scope="module")
def launch_book():
    """``_build/launch-check/_build/html``: the book built from the stored outputs with ``repository.url`` set."""
    import subprocess

    import yaml

    jb = shutil.which("jupyter-book", path=str(Path(sys.executable).parent))
    if jb is None:
        _skip_or_fail("jupyter-book is not installed (run `make install`)")
    shutil.rmtree(LAUNCH_BUILD, ignore_errors=True)
    LAUNCH_BUILD.mkdir(parents=True)
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["repository"]["url"] == "", "the committed _config.yml must leave repository.url unset"
    config["repository"]["url"] = DUMMY_REPOSITORY
    (LAUNCH_BUILD / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    # local_extensions' path is relative to the config's folder; scripts/ goes on PYTHONPATH instead
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"), PYDEVD_DISABLE_FILE_VALIDATION="1")
    proc = subprocess.run([jb, "build", ".", "--all", "-W", "--keep-going", "--config",
                           str(LAUNCH_BUILD / "_config.yml"), "--path-output", str(LAUNCH_BUILD)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return LAUNCH_BUILD / "_build" / "html"


def _launch_links(html: str) -> list[str]:
    import re

    return [h for h in re.findall(r'href="([^"]+)"', html) if any(host in h for host in LAUNCH_HOSTS)]


def test_no_launch_button_without_repository_url():
    if not (HTML / "index.html").is_file():
        _skip_or_fail(f"no built book at {HTML.relative_to(ROOT)} (run `make test-build` or `make book`)")
    pages = sorted(HTML.rglob("*.html"))
    with_links = {p.relative_to(HTML).as_posix(): _launch_links(p.read_text()) for p in pages}
    assert not {k: v for k, v in with_links.items() if v}
    assert not [p for p in pages if "dropdown-launch-buttons" in p.read_text()]


def test_repository_url_turns_on_binder_and_colab_on_every_chapter(launch_book):
    for nb in toc_notebooks():
        page = launch_book / "notebooks" / f"{nb.stem}.html"
        assert sorted(_launch_links(page.read_text())) == sorted([
            f"https://colab.research.google.com/github/example-owner/example-book/blob/main/notebooks/{nb.name}",
            f"https://mybinder.org/v2/gh/example-owner/example-book/main?urlpath=lab/tree/notebooks/{nb.name}",
        ]), page
    # pages that are not notebooks get none
    assert not _launch_links((launch_book / "book" / "library.html").read_text())


def test_launch_buttons_are_links_and_send_no_request(launch_book, browser):
    outside: list[str] = []
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    try:
        with serve(launch_book) as base:
            block_outside_requests(context, outside)
            page = context.new_page()
            page.goto(f"{base}/notebooks/01_what_is_moe.html", wait_until="load")
            page.wait_for_load_state("networkidle")
            menu = page.locator(".dropdown-launch-buttons")
            assert menu.count() == 1, "no launch menu on the chapter"
            menu.locator("button").first.click()
            links = menu.locator("a.dropdown-item")
            texts = sorted(links.nth(i).inner_text().strip() for i in range(links.count()))
            assert texts == ["Binder", "Colab"], texts
            for i in range(links.count()):
                assert links.nth(i).evaluate("a => a.tagName") == "A" and links.nth(i).is_visible()
            # the logos are local files
            assert all(links.nth(i).locator("img").evaluate("i => i.complete && i.naturalWidth > 0")
                       for i in range(links.count()))
            page.wait_for_load_state("networkidle")
    finally:
        context.close()
    assert not outside, f"requests left the page: {outside}"
