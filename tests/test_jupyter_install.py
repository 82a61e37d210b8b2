"""`mnist-cloud jupyter` installs JupyterLab the way setup_ec2.sh installs the tool's requirements.

The machine is the real SSH test host (tests/fixtures/sshhost.py). In its own mount namespace, /opt/pytorch is a
read-only stand-in for a Deep Learning AMI's root-owned PyTorch env: it sees this test's torch, but not
its JupyterLab. There is no passwordless sudo. pip installs offline, from a local one-module jupyterlab
wheel, as tests/test_setup_script.py installs its tinypkg.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fixtures import REPO
from fixtures.install import tiny_wheel
from fixtures.sshhost import USER

NAME = "nbsetup"
DLAMI_ENV = "/opt/pytorch"  # setup_ec2.sh's default: found there without MNIST_CLOUD_PYTHON


def dlami_stand_in(tmp_path: Path) -> Path:
    """A venv that sees this test's packages (torch, pip, the trainer's requirements) except jupyterlab*."""
    env_dir = tmp_path / "opt-pytorch"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    shadow = tmp_path / "without-jupyterlab" / "site-packages"  # "-packages": a venv layered over it sees it
    shadow.mkdir(parents=True)
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if not entry.name.lower().startswith("jupyterlab"):
            (shadow / entry.name).symlink_to(entry)
    site = subprocess.run([str(env_dir / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "packages-of-the-test.pth").write_text(f"{shadow}\n")
    return env_dir


@pytest.fixture
def root_owned_dlami(ssh_host, tmp_path):
    """/opt/pytorch on the machine, read-only (root cannot write to it either), no `sudo -n`, and pip
    pointed at the local wheel (the login's pip.conf on that machine). Undone afterwards."""
    env_dir = dlami_stand_in(tmp_path)
    wheels = tmp_path / "wheels"
    tiny_wheel(wheels, "jupyterlab", "0.0.1")  # jupyterlab as pip sees it, offline
    pip_conf = ssh_host.home / ".config" / "pip" / "pip.conf"
    pip_conf.parent.mkdir(parents=True, exist_ok=True)
    pip_conf.write_text(f"[global]\nno-index = true\nfind-links = {wheels}\ndisable-pip-version-check = true\n")
    refuse = tmp_path / "sudo"
    refuse.write_text("#!/bin/sh\necho 'sudo: a password is required' >&2\nexit 1\n")
    refuse.chmod(0o755)
    sudos = [p for p in ("/usr/bin/sudo", "/usr/local/bin/sudo") if Path(p).exists()]
    mounts = ["mount -t tmpfs mnist-cloud-test /opt", f"mkdir {DLAMI_ENV}",
              f"mount --bind {env_dir} {DLAMI_ENV}", f"mount -o remount,ro,bind {DLAMI_ENV}",
              *(f"mount --bind {refuse} {s}" for s in sudos)]
    done = ssh_host.exec(" && ".join(mounts))
    assert done.returncode == 0, done.stderr
    try:
        yield env_dir
    finally:
        ssh_host.exec("; ".join([*(f"umount {s}" for s in sudos), f"umount {DLAMI_ENV}", "umount /opt"]))
        shutil.rmtree(ssh_host.home / ".config" / "pip", ignore_errors=True)
        shutil.rmtree(ssh_host.home / ".mnist-cloud", ignore_errors=True)


@pytest.fixture
def target(ssh_host, tmp_path):
    """This machine as `mnist-cloud` reaches it (key login over SSH), with setup_ec2.sh and the tool's
    requirements in its work dir, as a sync leaves them."""
    from infra.remote import Endpoint, Remote
    from infra.state import Host
    from infra.targets import SSHTarget

    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    ssh_host.authorize(key.with_suffix(".pub").read_text())
    workdir = ssh_host.home / "mnist-cloud" / NAME
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "infra" / "agent" / "setup_ec2.sh", workdir / "setup_ec2.sh")
    shutil.copy(REPO / "infra" / "agent" / "requirements.txt", workdir / "requirements.txt")
    remote = Remote(Endpoint(name=NAME, host=ssh_host.addr, user=USER, key_path=str(key)))
    try:
        yield SSHTarget(Host(name=NAME, kind="ssh", host=ssh_host.addr, user=USER, key_path=str(key)), remote)
    finally:
        remote.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.slow
def test_jupyterlab_goes_into_a_layered_venv_when_the_dlami_env_is_read_only(ssh_host, root_owned_dlami, target):
    from infra.jupyter import ensure_jupyterlab

    said: list[str] = []
    # setup finds the DLAMI env complete and chooses it, as on a Deep Learning AMI: nothing to install
    python = target.setup(None, log=said.append)
    assert python == f"{DLAMI_ENV}/bin/python", "\n".join(said)
    assert any("all requirements already installed" in line for line in said), "\n".join(said)

    said.clear()
    chosen = ensure_jupyterlab(target, python, said.append)
    venv_python = os.path.join(pwd.getpwnam(USER).pw_dir, ".mnist-cloud", "venv", "bin", "python")
    assert chosen == venv_python, "\n".join(said)  # what JupyterLab is then started with
    assert any("is not writable" in line and "installing into" in line for line in said), "\n".join(said)
    assert (ssh_host.home / "mnist-cloud" / NAME / ".mnist-cloud-python").read_text().strip() == venv_python
    both = target.remote.run(f"{shlex.quote(chosen)} -c 'import jupyterlab, torch; print(jupyterlab.__version__)'")
    assert both.stdout.strip() == "0.0.1"  # the new package, and the env's torch underneath
    assert not list(root_owned_dlami.rglob("jupyterlab*"))  # the DLAMI env itself is untouched

    said.clear()
    assert ensure_jupyterlab(target, chosen, said.append) == chosen and said == []  # once: found the next time
    assert target.setup(None, log=said.append) == venv_python  # and the trainer runs with it too
