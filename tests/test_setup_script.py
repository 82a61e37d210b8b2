"""setup_ec2.sh on a machine whose DLAMI env (/opt/pytorch) the login user cannot write to."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fixtures.install import tiny_wheel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def read_only_dlami(tmp_path):
    """A stand-in for /opt/pytorch: a venv that sees this test's torch, mounted read-only (root can't write
    to a read-only mount either), and a `sudo` that refuses, as with no passwordless sudo."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("needs unshare -m (root) for a read-only bind mount")
    env_dir = tmp_path / "opt-pytorch"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = subprocess.run([str(env_dir / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "torch-from-the-test.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sudo").write_text("#!/bin/sh\necho 'sudo: a password is required' >&2\nexit 1\n")
    (bin_dir / "sudo").chmod(0o755)
    return env_dir, bin_dir


def run_setup(work: Path, env_dir: Path, bin_dir: Path, venv: Path) -> subprocess.CompletedProcess:
    mount = f"mount --bind {env_dir} {env_dir} && mount -o remount,ro,bind {env_dir} {env_dir}"
    env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(work),
           "MNIST_CLOUD_DLAMI_ENV": str(env_dir), "MNIST_CLOUD_VENV": str(venv), "PIP_NO_INDEX": "1"}
    return subprocess.run(["unshare", "-m", "sh", "-c", f"{mount} && exec bash {work}/setup_ec2.sh"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)


@pytest.mark.slow
def test_a_read_only_dlami_env_gets_a_layered_venv(tmp_path, read_only_dlami):
    env_dir, bin_dir = read_only_dlami
    work, venv = tmp_path / "work", tmp_path / "venv"
    work.mkdir()
    shutil.copy(ROOT / "setup_ec2.sh", work)
    (work / "requirements.txt").write_text(f"torch\ntinypkg @ {tiny_wheel(tmp_path).as_uri()}\n")

    first = run_setup(work, env_dir, bin_dir, venv)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "is not writable" in first.stdout and "installing into" in first.stdout
    python = (work / ".mnist-cloud-python").read_text().strip()
    assert python == str(venv / "bin" / "python")
    check = subprocess.run([python, "-c", "import tinypkg, torch; print(tinypkg.VERSION)"],
                           capture_output=True, text=True, check=False)
    assert check.stdout.strip() == "0.1", check.stderr  # the new package, and the env's torch underneath
    assert not list(env_dir.rglob("tinypkg*"))  # the DLAMI env itself is untouched

    again = run_setup(work, env_dir, bin_dir, venv)  # idempotent: the layered venv is found and complete
    assert again.returncode == 0 and "all requirements already installed" in again.stdout, again.stderr
