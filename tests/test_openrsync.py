"""macOS 15.4+ installs openrsync as /usr/bin/rsync: it has no --itemize-changes, which sync reads to list
what it moved. Sync and pull then go over SFTP, or through a real rsync found beside it (Homebrew's), and
the sync line says which and why. A stand-in `rsync` first on PATH behaves like openrsync; the machine is
the real SSH test host (tests/fixtures/sshhost.py)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from fixtures.cli import run_cli
from infra import transfer as remote_module
from infra.remote import Endpoint, Remote
from infra.transfer import RsyncChoice, is_openrsync, local_rsync

REAL_RSYNC = "/usr/bin/rsync"

# what `openrsync --version` prints (on stderr), and its usage error for an option it lacks: exit 1
OPENRSYNC = """#!/bin/sh
printf '%s\\n' "$*" >> {calls}
for arg in "$@"; do
    case "$arg" in
        --version|-V)
            echo "openrsync: protocol version 29" >&2
            echo "rsync version 2.6.9 compatible" >&2
            exit 0;;
        -i|--itemize-changes|--info=*|--checksum-choice=*|-s|--protect-args)
            echo "rsync: unrecognized option '$arg'" >&2
            echo "usage: rsync [-0468BCDEFHILOPRSTWVabcdefghiklmnopqrtuvxyz] [-e program] ..." >&2
            exit 1;;
    esac
done
echo "openrsync stand-in: asked to transfer with options openrsync has" >&2
exit 99
"""

# an rsync whose banner looks right but which cannot do the call: exit 1 (an option it lacks) or 2 (the
# other side speaks another protocol); either way the first call's exit means "use SFTP"
REFUSING = """#!/bin/sh
printf '%s\\n' "$*" >> {calls}
if [ "$1" = --version ]; then echo "rsync  version 3.2.7  protocol version 31"; exit 0; fi
echo "rsync: {message}" >&2
echo "rsync error: {meaning} (code {code}) at main.c(1795) [client=3.2.7]" >&2
exit {code}
"""


def fake_rsync(directory: Path, script: str, **fields) -> tuple[Path, Path]:
    """An executable `rsync` in `directory`; returns it and the file its calls are written to."""
    directory.mkdir(parents=True, exist_ok=True)
    calls = directory / "calls"
    path = directory / "rsync"
    path.write_text(script.format(calls=calls, **fields))
    path.chmod(0o755)
    return path, calls


# ---------------------------------------------------------------------------------- telling them apart
@pytest.mark.parametrize("banner, openrsync", [
    ("rsync  version 3.2.7  protocol version 32\nCopyright (C) 1996-2022 by Andrew Tridgell, Wayne Davison, "
     "and others.\nWeb site: https://rsync.samba.org/\n", False),  # Debian/Ubuntu
    ("rsync  version 3.4.1  protocol version 32\n", False),  # Homebrew
    ("rsync  version 2.6.9  protocol version 29\nCopyright (C) 1996-2006 by Andrew Tridgell, Wayne Davison, "
     "and others.\n", False),  # Apple's own rsync before macOS 15.4: has every option sync passes
    ("openrsync: protocol version 29\nrsync version 2.6.9 compatible\n", True),  # macOS 15.4+
    ("openrsync: protocol version 29\n", True),  # openrsync built from source
    ("rsync version 2.6.9 compatible\n", True),
    ("", False),  # no banner: tried, and the first call's exit decides
])
def test_openrsync_banner_is_told_from_rsync(banner, openrsync):
    assert is_openrsync(banner) is openrsync


def test_openrsync_alone_means_sftp(tmp_path, monkeypatch):
    fake, _ = fake_rsync(tmp_path / "bin", OPENRSYNC)
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.setattr(remote_module, "HOMEBREW_RSYNC", (str(tmp_path / "no-homebrew" / "rsync"),))
    choice = local_rsync()
    assert choice == RsyncChoice(None, f"openrsync at {fake} lacks --itemize-changes")
    assert choice.method == f"sftp: openrsync at {fake} lacks --itemize-changes"


def test_a_real_rsync_later_on_path_or_from_homebrew_is_used(tmp_path, monkeypatch):
    fake, _ = fake_rsync(tmp_path / "bin", OPENRSYNC)
    monkeypatch.setattr(remote_module, "HOMEBREW_RSYNC", (str(tmp_path / "no-homebrew" / "rsync"),))
    monkeypatch.setenv("PATH", os.pathsep.join([str(fake.parent), str(Path(REAL_RSYNC).parent)]))
    assert local_rsync() == RsyncChoice(REAL_RSYNC, f"{REAL_RSYNC}, as openrsync at {fake} lacks --itemize-changes")
    # not on PATH, where Homebrew puts it (/opt/homebrew/bin/rsync here stands for /usr/bin/rsync)
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.setattr(remote_module, "HOMEBREW_RSYNC", (str(tmp_path / "no-homebrew" / "rsync"), REAL_RSYNC))
    assert local_rsync().path == REAL_RSYNC
    # plain rsync first on PATH: nothing to say
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(REAL_RSYNC).parent), str(fake.parent)]))
    assert local_rsync() == RsyncChoice(REAL_RSYNC, "") and local_rsync().method == "rsync"


# ---------------------------------------------------------------------------------- over SSH
@pytest.fixture(scope="module")
def key(ssh_host, tmp_path_factory) -> Path:
    key = tmp_path_factory.mktemp("key") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    ssh_host.authorize(key.with_suffix(".pub").read_text())
    return key


@pytest.fixture
def small_project(tmp_path) -> Path:
    """A small project (not a checkout: the installed trainer travels with it), with a secret lying in it."""
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "mine"\n')
    (root / "src" / "net.py").write_text("import torch\n")
    (root / ".env").write_text("AWS_SECRET_ACCESS_KEY=do-not-sync\n")
    return root


def test_sync_with_openrsync_goes_over_sftp_and_the_sync_line_says_so(ssh_host, key, small_project, tmp_path,
                                                                      mnist_cloud):
    fake, calls = fake_rsync(tmp_path / "bin", OPENRSYNC)
    # nothing but the stand-in on PATH: no real rsync beside it (the console script's python is absolute)
    env = {"PATH": str(fake.parent)}
    attached = run_cli([*mnist_cloud, "attach", "--host", f"ubuntu@{ssh_host.addr}", "--key", str(key),
                        "--name", "mac"], env_extra=env)
    assert attached.returncode == 0, attached.stdout + attached.stderr
    out = run_cli([*mnist_cloud, "sync", "mac", "--code", str(small_project)], env_extra=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("synced "))
    assert re.fullmatch(rf"synced \d+ file\(s\), [\d,]+ bytes \(sftp: openrsync at {re.escape(str(fake))} lacks "
                        r"--itemize-changes\) to mac:~/mnist-cloud/mac", line), line
    workdir = ssh_host.home / "mnist-cloud" / "mac"
    assert (workdir / "src" / "net.py").read_text() == "import torch\n"
    assert (workdir / "trainer" / "__main__.py").is_file()  # the installed trainer went with it
    assert not (workdir / ".env").exists()
    assert calls.read_text().splitlines() == ["--version"]  # asked who it is, and never to transfer

    again = run_cli([*mnist_cloud, "sync", "mac", "--code", str(small_project)], env_extra=env, timeout=120)
    assert again.returncode == 0 and "synced 0 file(s)" in again.stdout, again.stdout + again.stderr


def remote_for(host, key: Path, name: str) -> Remote:
    return Remote(Endpoint(name=name, host=host.addr, user="ubuntu", key_path=str(key),
                           workdir=f"mnist-cloud/{name}"))


@pytest.mark.parametrize("code, meaning, message", [
    (1, "syntax or usage error", "--itemize-changes: unknown option"),
    (2, "protocol incompatibility", "protocol version mismatch -- is your shell clean?"),
])
def test_an_rsync_that_cannot_do_the_first_call_means_sftp(ssh_host, key, small_project, tmp_path, monkeypatch,
                                                           code, meaning, message):
    fake, calls = fake_rsync(tmp_path / "bin", REFUSING, code=code, meaning=meaning, message=message)
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.setattr(remote_module, "HOMEBREW_RSYNC", ())
    said = []
    with remote_for(ssh_host, key, f"refused{code}") as remote:
        synced = remote.sync(small_project, log=said.append)
        why = f"{fake} failed with exit {code} ({meaning})"
        assert synced.method == f"sftp: {why}" and synced.files == 2  # pyproject.toml, src/net.py
        assert said == [f"{why}; using SFTP"]
        workdir = ssh_host.home / "mnist-cloud" / f"refused{code}"
        assert (workdir / "src" / "net.py").is_file() and not (workdir / ".env").exists()
        (workdir / "runs" / "r1").mkdir(parents=True)
        (workdir / "runs" / "r1" / "metrics.jsonl").write_text('{"epoch": 1}\n')
        pulled = remote.pull(f"mnist-cloud/refused{code}/runs/r1", tmp_path / "local" / "r1", log=said.append)
        assert pulled.method == f"sftp: {why}" and pulled.files == 1  # SFTP from then on, not asked again
        pushed = remote.push(tmp_path / "local" / "r1", f"mnist-cloud/refused{code}/runs/r2", log=said.append)
        assert pushed.method == f"sftp: {why}" and pushed.changed == ["metrics.jsonl"]
        assert (workdir / "runs" / "r2" / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    assert (tmp_path / "local" / "r1" / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    assert len(calls.read_text().splitlines()) == 2  # --version, and the one call it could not do


def test_homebrew_rsync_beside_openrsync_syncs_over_rsync(ssh_host, key, small_project, tmp_path, monkeypatch):
    fake, calls = fake_rsync(tmp_path / "bin", OPENRSYNC)
    monkeypatch.setenv("PATH", os.pathsep.join([str(fake.parent), str(Path(REAL_RSYNC).parent)]))
    monkeypatch.setattr(remote_module, "HOMEBREW_RSYNC", ())
    with remote_for(ssh_host, key, "brew") as remote:
        synced = remote.sync(small_project, log=lambda m: None)
    assert synced.method == f"rsync: {REAL_RSYNC}, as openrsync at {fake} lacks --itemize-changes"
    assert sorted(synced.changed) == ["pyproject.toml", "src/net.py"]
    assert (ssh_host.home / "mnist-cloud" / "brew" / "src" / "net.py").is_file()
    assert calls.read_text().splitlines() == ["--version"]
