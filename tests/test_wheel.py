"""``moe_lib`` as a package of its own: built, installed into a fresh virtual environment with only its
core dependencies (no book extras), and used there the way the README shows.

1. The working tree (tracked and untracked-but-not-ignored files, as a clone has them) is copied to a
   temporary folder and built with ``python -m build --no-isolation``: an sdist, then a wheel built from
   that sdist (so a file the sdist forgets fails here). ``--no-isolation`` uses the setuptools of the
   environment ``make install`` made instead of downloading one into a throw-away environment: the build
   reaches no network (every proxy points at a closed port while it runs).
2. The wheel holds the library, every file of ``moe_lib/`` and nothing of the book (no notebook, no book
   page, no benchmark file, no test), and declares ``torch``, ``numpy`` and ``tqdm`` as its only core
   dependencies.
3. A fresh virtual environment (``python -m venv --without-pip``: no pip, no setuptools of its own) gets
   the core dependencies **offline**: the closure of the wheel's core requirements (torch 2.13.0 and what
   it requires, numpy, tqdm), resolved from the distributions ``make install`` put in ``.venv`` and made
   visible through a ``.pth`` file that points at a folder of links to exactly those distributions — no
   book extra, no pandas, matplotlib, transformers, triton or parselmouth. (Installing torch again from an
   index would need the network, or a machine-specific wheel folder, and a minute of unpacking.) The wheel
   itself is installed by pip, ``--no-index --no-deps``, and ``pip check`` then proves that its declared
   requirements are all met by that closure.
4. In that environment, from a folder outside any checkout: the README's library example (read from
   README.md, so it cannot rot), ``python -m moe_lib.bench --smoke --list``, and each optional extra's
   failure, which must name the extra to install.
"""
from __future__ import annotations

import email
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import moe_lib

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
OFFLINE_ENV = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "",
               "no_proxy": "", "PIP_NO_INDEX": "1"}
#: packages of the book's extras that must NOT be importable in the fresh environment
BOOK_ONLY = ("pandas", "matplotlib", "transformers", "triton", "parselmouth", "sklearn", "jupyter_book",
             "papermill", "pytest")
CORE_REQUIREMENTS = {"torch", "numpy", "tqdm"}


def readme_library_example() -> str:
    """The first ``python`` block of the README's section "Use the library"."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Use the library\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no section '## Use the library'"
    block = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert block, "the README's section 'Use the library' has no python example"
    return block.group(1)


def _run(cmd, cwd, timeout=300, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
    return proc


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "MOE_BOOK_ROOT", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OFFLINE_ENV, **extra)
    return env


def _core_closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """The installed distributions that ``requirements`` (core: no extra) pull in, recursively."""
    found: dict[str, md.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in found:
            continue
        dist = md.distribution(req.name)
        assert req.specifier.contains(dist.version, prereleases=True), f"{req} but {dist.version} is installed"
        found[name] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return found


def _link_distributions(dists, folder: Path) -> None:
    """A folder of symbolic links to the top-level files and folders of ``dists`` (and their metadata)."""
    folder.mkdir()
    for dist in dists:
        base = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or []} - {"..", "__pycache__"}
        for top in sorted(tops):
            source, target = base / top, folder / top
            if source.exists() and not target.exists() and not top.endswith(".pth"):
                target.symlink_to(source)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(sdist, wheel)`` built from a copy of the working tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist = tmp / "src", tmp / "dist"
    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT)
    assert files.returncode == 0, files.stderr
    for name in filter(None, files.stdout.split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    proc = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, src], cwd=tmp,
                env=_clean_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(dist.iterdir())
    return sdists[0], wheels[0]


@pytest.fixture(scope="module")
def fresh_venv(built, tmp_path_factory):
    """The python of a fresh virtual environment with only the wheel and its core dependencies."""
    _, wheel = built
    tmp = tmp_path_factory.mktemp("venv")
    venv = tmp / "venv"
    proc = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    python = venv / "bin" / "python"
    with zipfile.ZipFile(wheel) as zf:
        meta = email.message_from_bytes(zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))))
    core = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    closure = _core_closure(core)
    _link_distributions(closure.values(), tmp / "core-deps")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp)
    Path(purelib.stdout.strip(), "moe_lib_core_deps.pth").write_text(f"{tmp / 'core-deps'}\n")
    pip = [sys.executable, "-m", "pip", "--python", python]
    proc = _run([*pip, "install", "--no-index", "--no-deps", wheel], cwd=tmp, env=_clean_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = _run([*pip, "check"], cwd=tmp, env=_clean_env())
    assert check.returncode == 0, f"the wheel's requirements are not met by its core closure:\n{check.stdout}"
    listed = _run([*pip, "list", "--format=freeze"], cwd=tmp, env=_clean_env())
    installed = {canonicalize_name(line.split("==")[0]) for line in listed.stdout.split()}
    assert installed == set(closure) | {"moe-lib"}, installed
    run_dir = tmp / "elsewhere"  # no checkout of the book here or above
    run_dir.mkdir()
    return python, run_dir


def test_sdist_and_wheel_hold_the_library_and_not_the_book(built):
    sdist, wheel = built
    version = moe_lib.__version__
    assert wheel.name == f"moe_lib-{version}-py3-none-any.whl" and sdist.name == f"moe_lib-{version}.tar.gz"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = email.message_from_bytes(zf.read(f"moe_lib-{version}.dist-info/METADATA"))
    tops = {n.split("/")[0] for n in names}
    assert tops == {"moe_lib", f"moe_lib-{version}.dist-info"}, tops
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "moe_lib").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    tracked = set(_run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "moe_lib"],
                       cwd=ROOT).stdout.split())
    missing = sorted((package & tracked) - set(names))
    assert not missing, f"files of moe_lib/ the wheel lacks (package data must be declared): {missing}"
    assert not [n for n in names if n.endswith((".ipynb", ".bib")) or n.startswith(("notebooks/", "book/"))]
    core = {canonicalize_name(Requirement(r).name) for r in meta.get_all("Requires-Dist") if "extra ==" not in r}
    assert core == CORE_REQUIREMENTS, core
    assert {"kernels", "interop", "vowels", "book", "test"} <= set(meta.get_all("Provides-Extra"))
    assert meta["Version"] == version
    with tarfile.open(sdist) as tf:
        inside = {Path(m.name).relative_to(sdist.name.removesuffix(".tar.gz")).parts[0] for m in tf.getmembers()
                  if "/" in m.name}
    # the sdist: the library, its metadata and setuptools' default test files; no notebook, page or benchmark
    assert inside <= {"moe_lib", "moe_lib.egg-info", "tests", "PKG-INFO", "README.md", "LICENSE", "pyproject.toml",
                      "setup.cfg"}, inside


def test_readme_library_example_runs_with_core_dependencies_only(fresh_venv, tmp_path):
    python, run_dir = fresh_venv
    probe = textwrap.dedent(f"""
        import importlib.util, sys, torch, moe_lib
        assert moe_lib.__file__.startswith(sys.prefix), moe_lib.__file__
        assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
        present = [m for m in {BOOK_ONLY!r} if importlib.util.find_spec(m) is not None]
        assert not present, f"book-only packages importable: {{present}}"
        print("moe_lib", moe_lib.__version__, "torch", torch.__version__)
    """)
    proc = _run([python, "-c", probe], cwd=run_dir, env=_clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"moe_lib {moe_lib.__version__}" in proc.stdout
    example = readme_library_example()
    proc = _run([python, "-c", example], cwd=run_dir, env=_clean_env())
    assert proc.returncode == 0, f"the README's example failed in the fresh environment:\n{proc.stderr[-3000:]}"
    assert "load" in proc.stdout, proc.stdout  # it prints the routing statistics


def test_bench_lists_its_cases_with_core_dependencies_only(fresh_venv):
    python, run_dir = fresh_venv
    proc = _run([python, "-m", "moe_lib.bench", "--smoke", "--list"], cwd=run_dir, env=_clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "moe_lib_triton" in proc.stdout and "naive_loop" in proc.stdout, proc.stdout


#: (extra, code that needs it, text the error must contain)
EXTRAS = [
    pytest.param("kernels", "from moe_lib import MoELayer; import torch\n"
                "MoELayer(d_model=8, d_ff=16, num_experts=4, top_k=2, expert='swiglu', backend='triton')"
                "(torch.randn(3, 8))", "moe-lib[kernels]", id="kernels"),
    pytest.param("vowels", "import moe_lib.book.data; moe_lib.book.data.peterson_barney_vowels()", "moe-lib[vowels]",
                 id="vowels"),
    pytest.param("interop", "import moe_lib, torch; moe_lib.patch_transformers(torch.nn.Linear(2, 2))",
                 "moe-lib[interop]", id="interop-patch"),
    pytest.param("interop", "import moe_lib.interop; moe_lib.interop.random_model('mixtral')", "moe-lib[interop]",
                 id="interop-random-model"),
    pytest.param("interop", "import moe_lib.interop; moe_lib.interop.random_block('mixtral')", "moe-lib[interop]",
                 id="interop-random-block"),
]


@pytest.mark.parametrize("extra, code, expected", EXTRAS)
def test_a_missing_extra_fails_naming_it(fresh_venv, extra, code, expected):
    python, run_dir = fresh_venv
    proc = _run([python, "-c", code], cwd=run_dir, env=_clean_env())
    assert proc.returncode != 0, f"{extra}: ran without the extra installed"
    last = proc.stderr.strip().splitlines()[-1]
    assert expected in last, f"{extra}: the error does not name the extra:\n{last}"


def test_book_files_fail_clearly_outside_a_checkout(fresh_venv):
    """The committed H200 measurements belong to the book, not to the wheel: outside a checkout the error
    says how to point moe_lib at one."""
    python, run_dir = fresh_venv
    proc = _run([python, "-c", "import moe_lib.book.serving; moe_lib.book.serving.load_anchor()"], cwd=run_dir,
                env=_clean_env())
    assert proc.returncode != 0 and "MOE_BOOK_ROOT" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


def test_one_version_everywhere():
    """pyproject.toml, ``moe_lib.__version__``, the book's library page and the changelog agree."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert moe_lib.__version__ == version
    page = (ROOT / "book" / "library.md").read_text()
    shown = re.findall(r'moe_lib (\d+\.\d+\.\d+\S*)\*\* \(`moe_lib.__version__ == "([^"]+)"`\)', page)
    assert shown == [(version, version)], f"the library page states {shown}, the package is {version}"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M), \
        f"CHANGELOG.md has no section for {version}"
