# The MoE Book: build, test and maintain the book and moe_lib.
#
#   make book        install, execute every notebook, build the HTML book (_build/html/index.html)
#   make test        install, then unit tests, nbval, portability, papermill, strict book build, PDF, browser check
#   make pdf         the whole book as one PDF, _build/pdf/moe-book.pdf (printed offline by headless Chromium)
#   make notebooks   (authors) re-execute the notebooks in place so their stored outputs are fresh;
#                    NB="notebooks/01_what_is_moe.ipynb ..." limits it to some notebooks
#   make dist        moe_lib's sdist and wheel in _build/dist (offline: the build uses .venv's setuptools)
#   make clean       remove _build        make distclean   also remove .venv
#
# Every notebook runs in the `moe-book` Jupyter kernel that `make install` writes into .venv: the
# reproducible CPU profile of moe_lib/book/reproducibility.py (pinned instruction sets, MKL code path, one
# thread), so the stored outputs are reproduced bit for bit on any Linux x86-64 machine with AVX2.
#
# Only python3 and make are needed: everything else goes into .venv, pinned by
# requirements/constraints.txt.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.installed
# torch goes in first, on its own: the CPU wheel lies on local disk, and an unpinned torch would
# pull a multi-GB CUDA build. Keep in step with requirements/constraints.txt.
TORCH_VERSION := 2.13.0
NB ?=
# The Jupyter kernel every notebook runs in (moe_lib/book/reproducibility.py writes it).
KERNEL := $(VENV)/share/jupyter/kernels/moe-book/kernel.json

# The test steps must run in order (the browser test needs the built book).
.NOTPARALLEL:
.DEFAULT_GOAL := install
.PHONY: install book notebooks dist pdf test test-unit test-nbval test-portability test-papermill test-build test-pdf test-browser \
        mutation constraints clean distclean

install: $(KERNEL)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[book,test]"
	touch $@

$(KERNEL): $(STAMP) moe_lib/book/reproducibility.py
	$(PY) -m moe_lib.book.reproducibility install-kernel

# ---------------------------------------------------------------------------------------- book
# (PYTHONPATH: the book's Sphinx extension in scripts/, which _build/_config_execute.yml's
#  local_extensions path, relative to _build/, does not reach)
book: install
	$(PY) scripts/build_book.py --execute

notebooks: install
	$(PY) scripts/execute_notebooks.py $(NB)

# moe_lib as a package of its own (CHANGELOG.md; tests/test_wheel.py installs the wheel into a fresh venv
# with its core dependencies only). --no-isolation: no download of build requirements.
dist: install
	rm -rf _build/dist
	$(PY) -m build --no-isolation --outdir _build/dist .
	rm -rf build

# ---------------------------------------------------------------------------------------- test
test: test-unit test-nbval test-portability test-papermill test-build test-pdf test-browser

# (a) moe_lib's own tests: everything in tests/ but the notebook and browser tests; among them the
#     workflow lint (tests/test_workflows.py) and the wheel test (tests/test_wheel.py: build, install into a
#     fresh venv with the core dependencies only, run the README's example there).
# Two pytest workers (pytest-xdist): the CI machine has 2 cores and the notebooks run on one thread each.
JOBS ?= 2

test-unit: install
	$(PY) -m pytest tests -m "not notebooks and not browser and not portability" -n $(JOBS)

# (b) strict nbval: a fresh run of every notebook in _toc.yml, in the moe-book kernel, must print what
#     the notebook stores. Outside the reproducibility contract (not Linux x86-64 with AVX2: ARM, macOS;
#     or a CPU of another vendor than the one that computed the stored outputs) the outputs are not
#     comparable: every notebook still runs and must not fail (--nbval-lax).
NBVAL = $(PY) -m pytest -p no:cacheprovider --nbval-kernel-name moe-book --nbval-cell-timeout=300 \
        --nbval-sanitize-with tests/nbval_sanitize.cfg

test-nbval: install
	nbs="$$($(PY) scripts/toc_notebooks.py)" && \
	if $(PY) -m moe_lib.book.reproducibility contract $$nbs; then mode=--nbval; \
	else mode=--nbval-lax; echo "test-nbval: outputs NOT compared on this machine; notebooks executed only"; fi && \
	$(NBVAL) $$mode -n $(JOBS) --dist loadfile --durations=15 $$nbs

# (b2) portability: the most sensitive chapters again, under other instruction-set levels, MKL code
#      paths and thread counts, as another machine or shell would set them; stored outputs required.
test-portability: install
	$(PY) -m pytest tests -m portability -n $(JOBS) --durations=10

# (c) papermill: parameters cells, parameter injection, one notebook end to end with other values.
test-papermill: install
	$(PY) -m pytest tests -m notebooks -n $(JOBS) --durations=10

# (d) the book builds from the stored outputs with no warning (-W --keep-going).
test-build: install
	$(PY) scripts/build_book.py

# (d2) the PDF of the whole book: a single-page build printed by headless Chromium (scripts/build_pdf.py;
#      copied beside the HTML book, which links to it). tests/test_pdf.py checks it in step (e).
test-pdf: pdf

pdf: install
	$(PY) scripts/build_pdf.py

# (e) the built pages in headless Chromium: no console error, no failed or outside request,
#     every image loads, MathJax rendered. Screenshots in _build/screenshots/.
test-browser: install
	$(PY) -m pytest tests -m browser

# ------------------------------------------------------------------------------- maintenance
# Mutation testing of the core data path (routers, dispatch, experts, backends, losses, layer, metrics,
# the expert-parallel wrapper; [tool.mutmut] in pyproject.toml): mutmut injects one plausible bug at a
# time into a copy of moe_lib (mutants/) and runs the core tests against it. Slow (about an hour on 2
# cores), so not part of `make test`. Writes _build/mutation/report.md (score per module, survivors).
mutation: install
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[mutation]"
	rm -rf mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(JOBS) > /dev/null
	$(PY) scripts/mutation_report.py

# Re-resolve requirements/constraints.txt in a fresh venv after changing dependencies.
constraints:
	rm -rf _build/constraints-venv
	$(PYTHON) -m venv _build/constraints-venv
	_build/constraints-venv/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	_build/constraints-venv/bin/python -m pip install --quiet ".[book,test]"
	{ sed -n '/^#/p' requirements/constraints.txt; \
	  _build/constraints-venv/bin/python -m pip freeze --exclude moe-lib \
	    | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > _build/constraints.txt
	mv _build/constraints.txt requirements/constraints.txt
	rm -rf _build/constraints-venv build

clean:
	rm -rf _build

distclean: clean
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
