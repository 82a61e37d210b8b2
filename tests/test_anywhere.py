"""mnist-cloud installed from a wheel (not editable, no checkout anywhere), driven from a project that
is just the user's own: `train --on` syncs the project, and the installed trainer goes with it; `setup`
works there too. Against the moto server and the real sshd, as test_remote.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.aws import launch_fresh
from fixtures.cli import assert_user_error
from fixtures.project import MYNET, NET_PARAMS

TINY = ["--epochs", "1", "--train-limit", "1024", "--eval-limit", "500", "--no-report"]


@pytest.fixture(scope="module")
def user_project(tmp_path_factory) -> Path:
    """A user's project: one model file and its own requirements.txt, no mnist-cloud checkout."""
    root = tmp_path_factory.mktemp("user") / "mynet"
    root.mkdir()
    (root / "mynet.py").write_text(MYNET)
    (root / "requirements.txt").write_text("# the project's own, not the tool's\n")
    return root


@pytest.fixture(scope="module")
def wheel_cli(installed_wheel, laptop_env, user_project):
    def run(*args, cwd=None):
        return subprocess.run([sys.executable, "-m", "infra.commands", *args], capture_output=True, text=True,
                              cwd=cwd or user_project, timeout=600,
                              env={**os.environ, **laptop_env, "PYTHONPATH": str(installed_wheel)})

    return run


@pytest.fixture(scope="module")
def machine(wheel_cli, ssh_host_moto):
    launch_fresh(wheel_cli, ssh_host_moto, "anywhere")
    return "anywhere"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_train_on_from_a_project_that_is_not_a_checkout(wheel_cli, machine, installed_wheel, user_project, ssh_host,
                                                        mnist_dir):
    where = subprocess.run(
        [sys.executable, "-c", "import infra, trainer; print(infra.__file__, trainer.__file__)"], capture_output=True,
        text=True, cwd=user_project, env={**os.environ, "PYTHONPATH": str(installed_wheel)})
    assert all(p.startswith(str(installed_wheel)) for p in where.stdout.split()), where.stdout  # the wheel's code
    out = wheel_cli("train", "--on", machine, "--model", "mynet.py:Net", *TINY, "--data-dir", str(mnist_dir),
                    "--run-id", "any1")
    assert out.returncode == 0, out.stdout + out.stderr
    work = ssh_host.home / "mnist-cloud" / machine
    # the project, and beside it the installed trainer and the tool's own bootstrap and requirements
    assert (work / "mynet.py").read_text() == MYNET
    assert digest(work / "trainer" / "train.py") == digest(installed_wheel / "trainer" / "train.py")
    assert digest(work / "runspec" / "__init__.py") == digest(installed_wheel / "runspec" / "__init__.py")
    assert (work / "requirements.txt").read_text() == (user_project / "requirements.txt").read_text()
    assert (digest(work / ".mnist-cloud-requirements.txt")
            == digest(installed_wheel / "infra" / "agent" / "requirements.txt"))
    assert (work / ".mnist-cloud-python").is_file()  # setup ran, with the bundled bootstrap
    run = user_project / "runs" / "any1"
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["name"] == "mynet.py:Net" and config["model"]["params"] == NET_PARAMS
    # the bundled trainer ran (no .git beside it); the checkout's would have recorded its commit
    assert config["git"]["sha"] is None and (run / "model.pt").exists()
    again = wheel_cli("setup", machine)
    assert again.returncode == 0 and "all requirements already installed" in again.stdout, again.stdout + again.stderr
    # a second sync keeps the bundled files (the project's mirror does not delete them) and sends nothing new
    synced = wheel_cli("sync", machine)  # a deleting first pass would make the second send the trainer again
    assert synced.returncode == 0 and "synced 0 file(s)" in synced.stdout, synced.stdout + synced.stderr
    assert (work / "trainer" / "train.py").exists()


def test_a_project_in_the_way_or_the_home_directory_is_one_line(wheel_cli, machine, tmp_path):
    clash = tmp_path / "clash"
    (clash / "trainer").mkdir(parents=True)  # the project's own trainer/ would shadow the tool's
    assert_user_error(wheel_cli("sync", machine, "--code", str(clash)), "trainer is in the way")
    home = wheel_cli("train", "--on", machine, "--epochs", "1", cwd=Path.home())
    assert_user_error(home, "is your home directory or above it")
