#!/usr/bin/env python3
"""Build the PDF of the whole book, offline: ``_build/pdf/moe-book.pdf`` (``make pdf``).

1. Jupyter Book builds the book from the outputs stored in the notebooks as ONE HTML page (Sphinx's
   ``singlehtml`` builder, warnings as errors) into ``_build/pdf/_build/singlehtml``.
2. That page is served on localhost and opened in the headless Chromium the browser test drives (Debian's
   ``/usr/bin/chromium`` through playwright; never ``playwright install``). Every request to another host is
   blocked and fails the build, MathJax (served locally) must finish typesetting, and every image must load.
3. Each chapter (each document of ``_toc.yml`` after the introduction) starts on a new page, the theme's
   navigation is hidden, and Chromium prints the page to A4 with a bookmark outline from the headings.
4. A copy goes to ``_build/html/moe-book.pdf`` when the HTML book is built, so the site serves it beside
   the introduction, which links to it.

``tests/test_pdf.py`` checks the result: one page range per chapter in order, no missing image, math
typeset.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_browser import CHROMIUM_ARGS, block_outside_requests, find_chromium, serve  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "_build" / "pdf"
SINGLE = OUT / "_build" / "singlehtml"
PDF = OUT / "moe-book.pdf"
SITE_COPY = ROOT / "_build" / "html" / "moe-book.pdf"
REPORT = OUT / "report.json"
PAGE_NAME = "moe-book.html"

# Print layout: each document after the first starts on a new page; the web page's chrome is hidden.
PRINT_CSS = """
@page { size: A4; margin: 16mm 14mm 18mm 14mm; }
span[id^="document-"] + section { break-before: page; }
.bd-header, .bd-sidebar-primary, .bd-sidebar-secondary, .bd-header-article, .bd-footer,
.bd-footer-article, .bd-footer-content, .prev-next-area, .header-article, #pst-back-to-top,
.skip-link, .headerlink { display: none !important; }
.bd-main, .bd-content, .bd-article-container, .bd-page-width, .bd-container, .bd-container__inner,
.bd-article { max-width: 100% !important; width: 100% !important; min-width: 0 !important;
  flex: 1 1 100% !important; padding: 0 !important; margin: 0 !important; }
pre { white-space: pre-wrap !important; overflow-wrap: anywhere; }
table { font-size: 75%; max-width: 100%; }
pre, .cell_output, figure, img, table, mjx-container[display="true"] { break-inside: avoid; }
h1, h2, h3 { break-after: avoid; }
img { max-width: 100% !important; }
"""

WAIT_IMAGES_JS = """
async () => {
  const imgs = Array.from(document.images);
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => i.complete ? null :
      new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); })));
  return {total: imgs.length,
          broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.currentSrc || i.src),
          figures: new Set(imgs.filter(i => /_images\\//.test(i.src)).map(i => i.src)).size};
}
"""
STRUCTURE_JS = """
() => ({
  documents: Array.from(document.querySelectorAll('span[id^="document-"]')).map(s => {
      const sec = s.nextElementSibling;
      const h = sec && sec.querySelector('h1, h2');
      return {doc: s.id.slice('document-'.length), title: h ? h.textContent.replace(/[#¶]/g, '').trim() : null};
  }),
  math: document.querySelectorAll('.math').length,
  unrendered: Array.from(document.querySelectorAll('.math')).filter(e => !e.querySelector('mjx-container')).length,
})
"""


def build_single_html() -> None:
    jb = shutil.which("jupyter-book", path=str(Path(sys.executable).parent)) or shutil.which("jupyter-book")
    if jb is None:
        sys.exit("build_pdf: error: jupyter-book is not installed (run `make` first)")
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    cmd = [jb, "build", ".", "--all", "-W", "--keep-going", "--builder", "custom", "--custom-builder",
           "singlehtml", "--path-output", str(OUT)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"), JUPYTER_PREFER_ENV_PATH="1",
               PYDEVD_DISABLE_FILE_VALIDATION="1")
    with open(OUT / "singlehtml-build.log", "w") as log:
        status = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if status != 0:
        sys.exit(f"build_pdf: error: the single-page build failed (exit {status}); log: "
                 f"{(OUT / 'singlehtml-build.log').relative_to(ROOT)}")


def chromium() -> str:
    found = find_chromium()
    if found is None:
        sys.exit("build_pdf: error: chromium is not installed (apt-get install chromium)")
    return found


def print_pdf() -> dict:
    from playwright.sync_api import sync_playwright

    # The single page is written as book/intro.html (the root document's name) but its links to _static/ and
    # _images/ are relative to the build's root: open a copy that sits there.
    shutil.copy2(SINGLE / "book" / "intro.html", SINGLE / PAGE_NAME)

    outside: list[str] = []
    failed: list[str] = []
    with serve(SINGLE) as base_url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(service_workers="block")
        block_outside_requests(context, outside)
        page = context.new_page()
        # (the single page has no search index; the search box it would feed is not printed)
        page.on("requestfailed", lambda r: r.url not in outside and not r.url.endswith("/searchindex.js")
                and failed.append(f"{r.url}: {r.failure}"))
        page.goto(f"{base_url}/{PAGE_NAME}", wait_until="load")
        page.wait_for_load_state("networkidle")
        if page.evaluate("() => !!(window.MathJax && MathJax.startup && MathJax.startup.promise)"):
            page.evaluate("() => MathJax.startup.promise")
        images = page.evaluate(WAIT_IMAGES_JS)
        structure = page.evaluate(STRUCTURE_JS)
        page.add_style_tag(content=PRINT_CSS)
        page.emulate_media(media="print")
        page.wait_for_load_state("networkidle")
        page.pdf(path=str(PDF), format="A4", print_background=True, outline=True, tagged=True,
                 display_header_footer=True, header_template="<span></span>",
                 footer_template='<div style="font-size:8px;width:100%;text-align:center;">'
                                 '<span class="pageNumber"></span></div>',
                 margin={"top": "16mm", "bottom": "18mm", "left": "14mm", "right": "14mm"})
        browser.close()
    return {"outside_requests": outside, "failed_requests": failed, "images": images, **structure}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    start = time.monotonic()
    build_single_html()
    built = time.monotonic()
    report = print_pdf()
    report.update(pdf=str(PDF.relative_to(ROOT)), bytes=PDF.stat().st_size,
                  seconds={"singlehtml": round(built - start, 1), "print": round(time.monotonic() - built, 1)})
    REPORT.write_text(json.dumps(report, indent=1))
    problems = []
    if report["outside_requests"]:
        problems.append(f"requests to other hosts (blocked): {report['outside_requests'][:5]}")
    if report["failed_requests"]:
        problems.append(f"failed requests: {report['failed_requests'][:5]}")
    if report["images"]["broken"]:
        problems.append(f"images that did not load: {report['images']['broken'][:5]}")
    if report["unrendered"]:
        problems.append(f"{report['unrendered']} math elements not typeset by MathJax")
    if problems:
        print("build_pdf: error:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if SITE_COPY.parent.is_dir():
        shutil.copy2(PDF, SITE_COPY)
    print(f"build_pdf: {PDF.relative_to(ROOT)}: {report['bytes'] / 1e6:.1f} MB, {len(report['documents'])} "
          f"documents, {report['images']['total']} images ({report['seconds']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
