"""Shared fixtures. Tests never touch the network: MNIST comes from a local copy of the IDX files
($MNIST_DATA_DIR, else ../shared/data/mnist beside the checkout, else the user cache that
`mnist-cloud data` fills), and every download path is exercised against servers on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.data import missing_files
from trainer.fetch import cache_dir

REPO = Path(__file__).resolve().parent.parent
_MNIST_ENV = os.environ.get("MNIST_DATA_DIR")  # read before the autouse fixture clears it
# where `mnist-cloud data` / the first `mnist-cloud train` put MNIST on this machine
_USER_CACHE = cache_dir()


def _find_mnist() -> Path | None:
    candidates = [_MNIST_ENV, REPO.parent / "shared" / "data" / "mnist", _USER_CACHE]
    for c in candidates:
        if c and Path(c).is_dir() and not missing_files(Path(c)):
            return Path(c)
    return None


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    path = _find_mnist()
    if path is None:
        pytest.fail("no local MNIST: run `mnist-cloud data` once, or set MNIST_DATA_DIR to a directory "
                    "with the four IDX files; tests never download")
    return path


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No test reads or writes the developer's cache, and none can reach a real mirror."""
    monkeypatch.setenv("MNIST_CLOUD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MNIST_MIRRORS", "http://127.0.0.1:9/")  # discard port: refused at once
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)


@pytest.fixture(scope="session")
def mnist_cloud() -> list[str]:
    """The installed `mnist-cloud` console script, as a user would run it."""
    exe = Path(sys.executable).parent / "mnist-cloud"
    if not exe.exists():
        pytest.fail(f"{exe} not found: install the project first (pip install -e '.[test]')")
    return [str(exe)]


def run_cli(args: list[str], env_extra: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Bad input: exit code 2, exactly one line on stderr, no traceback, and it says what is wrong."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
