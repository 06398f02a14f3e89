"""The PDF of the whole book (``make pdf``, step (d2) of ``make test``: ``scripts/build_pdf.py``).

Checks ``_build/pdf/moe-book.pdf`` with pypdf: one page range per chapter of ``_toc.yml`` (its bookmark
opens a page of its own, in the table of contents' order, each range non-empty), every figure of the book
embedded as an image, no image that failed to load, math typeset, no request left the page while it was
printed (``_build/pdf/report.json``, written by the build), and the copy beside the HTML book that the
introduction links to.

Run with the browser tests (``make test-browser``), after ``make pdf``; without a built PDF they skip,
except under CI, where the skip is a failure (``tests/conftest.py``).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
PDF = ROOT / "_build" / "pdf" / "moe-book.pdf"
REPORT = ROOT / "_build" / "pdf" / "report.json"
SITE_COPY = ROOT / "_build" / "html" / "moe-book.pdf"
sys.path.insert(0, str(ROOT / "scripts"))
from toc_notebooks import toc_notebooks  # noqa: E402

#: the documents of _toc.yml after the introduction, in order
DOCUMENTS = [f"notebooks/{nb.stem}" for nb in toc_notebooks()] + ["book/library", "book/notation",
                                                                   "book/bibliography"]


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.fixture(scope="module")
def built():
    if not (PDF.is_file() and REPORT.is_file()):
        pytest.skip(f"no PDF at {PDF.relative_to(ROOT)} (run `make pdf`; the PDF test may not be skipped under CI)")
    import pypdf

    return pypdf.PdfReader(str(PDF)), json.loads(REPORT.read_text())


def _bookmarks(reader) -> list[tuple[int, str, int]]:
    """``(depth, title, first page index)`` of every bookmark, in order."""
    found = []

    def walk(items, depth):
        for item in items:
            if isinstance(item, list):
                walk(item, depth + 1)
            else:
                found.append((depth, item.title, reader.get_destination_page_number(item)))

    walk(reader.outline, 0)
    return found


def test_one_page_range_per_chapter(built):
    reader, report = built
    titles = {d["doc"]: d["title"] for d in report["documents"]}
    assert list(titles) == DOCUMENTS, "the printed page does not hold the documents of _toc.yml in order"
    marks = _bookmarks(reader)
    starts = []
    for doc in DOCUMENTS:
        hits = [page for depth, title, page in marks if depth == 1 and _squash(title) == _squash(titles[doc])]
        assert len(hits) == 1, f"{doc} ({titles[doc]!r}): {len(hits)} bookmarks at the chapter level"
        starts.append(hits[0])
    assert starts == sorted(set(starts)), f"chapters out of order or sharing a first page: {starts}"
    ends = starts[1:] + [len(reader.pages)]
    ranges = {doc: (s + 1, e) for doc, s, e in zip(DOCUMENTS, starts, ends)}  # 1-based, inclusive
    assert all(first <= last for first, last in ranges.values()), ranges
    assert starts[0] > 0, "the introduction has no page before chapter 1"
    # each chapter starts a page: its title is among the first text on it (the bibliography's citation
    # labels come first in the extracted text)
    for doc, start in zip(DOCUMENTS, starts):
        text = _squash(reader.pages[start].extract_text() or "")
        assert _squash(titles[doc])[:20] in text[:300], f"{doc}: page {start + 1} begins {text[:80]!r}"
        previous = _squash(reader.pages[start - 1].extract_text() or "")
        assert _squash(titles[doc])[:20] not in previous, f"{doc} begins on page {start}, before its bookmark"


def test_no_missing_image_and_math_typeset(built):
    reader, report = built
    assert report["images"]["broken"] == [] and report["images"]["figures"] >= len(toc_notebooks())
    assert report["math"] > 0 and report["unrendered"] == 0
    assert report["outside_requests"] == [] and report["failed_requests"] == []
    embedded = set()

    def images(resources):
        xobjects = resources.get("/XObject") if resources else None
        for ref in (xobjects.get_object().values() if xobjects else []):
            obj = ref.get_object()
            if obj.get("/Subtype") == "/Image":
                embedded.add(ref.idnum)
            elif obj.get("/Subtype") == "/Form":
                images(obj.get("/Resources"))

    for page in reader.pages:
        images(page.get("/Resources"))
    assert len(embedded) >= report["images"]["figures"], (
        f"{report['images']['figures']} figures in the book, {len(embedded)} images in the PDF")


def test_the_site_serves_the_pdf_and_the_introduction_links_to_it():
    if not (ROOT / "_build" / "html" / "index.html").is_file():
        pytest.skip("no built book (run `make test-build`)")
    if not PDF.is_file():
        pytest.skip("no PDF (run `make pdf`)")
    assert SITE_COPY.is_file() and SITE_COPY.read_bytes() == PDF.read_bytes()
    intro = (ROOT / "_build" / "html" / "book" / "intro.html").read_text()
    assert 'href="../moe-book.pdf"' in intro
