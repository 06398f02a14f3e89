#!/usr/bin/env python3
"""Print the notebooks the book's table of contents lists, one path a line.

Reads ``_toc.yml`` (jb-book format) at the repository root and prints, in table-of-contents order, the
path of every listed entry that is a Jupyter notebook (``.ipynb``), relative to the repository root.
Used by the Makefile (nbval, ``make notebooks``) and by the tests, so that "every notebook of the book"
means one thing everywhere.

Fails loudly (exit status 1, message on stderr) when an entry of the table of contents has no file
behind it: neither ``.ipynb`` nor ``.md`` nor ``.rst``.

Usage::

    python scripts/toc_notebooks.py [--toc _toc.yml]
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SOURCE_SUFFIXES = (".ipynb", ".md", ".rst")


class TocError(RuntimeError):
    """An entry of the table of contents has no file behind it."""


def _entries(node):
    """Yield ("file" | "glob", value) for every document entry under ``node``, in order."""
    if isinstance(node, dict):
        for key in ("root", "file", "glob"):
            if key in node:
                yield ("glob" if key == "glob" else "file"), str(node[key])
        for key in ("parts", "chapters", "sections", "subtrees", "entries"):
            for child in node.get(key) or []:
                yield from _entries(child)
    elif isinstance(node, list):
        for child in node:
            yield from _entries(child)


def _resolve(entry: str, base: Path) -> Path:
    """The source file of a `file:` entry, written with or without its extension."""
    path = base / entry
    if path.suffix in SOURCE_SUFFIXES and path.is_file():
        return path
    for suffix in SOURCE_SUFFIXES:
        candidate = base / (entry + suffix)
        if candidate.is_file():
            return candidate
    tried = ", ".join(entry + s for s in SOURCE_SUFFIXES)
    raise TocError(f"_toc.yml lists '{entry}', but no such file exists (looked for {tried})")


def toc_sources(toc: Path | str = ROOT / "_toc.yml") -> list[Path]:
    """Every source file (notebook or page) listed in ``toc``, in order, as absolute paths."""
    toc = Path(toc).resolve()
    base = toc.parent
    with open(toc, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    sources: list[Path] = []
    for kind, value in _entries(data):
        if kind == "glob":
            matches = sorted(
                Path(p) for s in SOURCE_SUFFIXES for p in glob.glob(str(base / (value + s)), recursive=True)
            )
            if not matches:
                raise TocError(f"_toc.yml glob '{value}' matches no file")
            sources.extend(m.resolve() for m in matches)
        else:
            sources.append(_resolve(value, base).resolve())
    return list(dict.fromkeys(sources))  # keep the order, drop duplicates


def toc_notebooks(toc: Path | str = ROOT / "_toc.yml") -> list[Path]:
    """The ``.ipynb`` files listed in ``toc``, in order, as absolute paths."""
    return [p for p in toc_sources(toc) if p.suffix == ".ipynb"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toc", default=str(ROOT / "_toc.yml"), help="table of contents (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        notebooks = toc_notebooks(args.toc)
    except (TocError, OSError, yaml.YAMLError) as e:
        print(f"toc_notebooks: error: {e}", file=sys.stderr)
        return 1
    if not notebooks:
        print("toc_notebooks: error: _toc.yml lists no notebook", file=sys.stderr)
        return 1
    base = Path(args.toc).resolve().parent
    for nb in notebooks:
        print(nb.relative_to(base).as_posix())
    return 0


if __name__ == "__main__":
    sys.exit(main())
