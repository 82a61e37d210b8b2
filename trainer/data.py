"""MNIST as uint8 tensors: our own IDX reader, the train/val/test split, and the on-device dataset.

The whole of MNIST is 47 MB as uint8, so it lives on the training device as one tensor and batches
are `images[perm[i:i + B]]`. No torchvision Dataset, no PIL, no DataLoader workers.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from runspec import atomic_write
from trainer.errors import DataError

# The four standard files, by role. The sha256 values are of the *decompressed* IDX bytes.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# IDX magic: two zero bytes, the type code (0x08 = unsigned byte), then the number of dimensions.
IDX_UBYTE = 0x08
MEAN, STD = 0.1307, 0.3081  # the usual MNIST statistics, on pixels scaled to [0, 1]

FIX_HINT = "delete it and run again to fetch a fresh copy, or pass --data-dir DIR with the four MNIST IDX files"


def find_file(directory: Path, name: str) -> Path | None:
    """The raw IDX file if present, else its .gz, else None."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise DataError(f"{path}: cannot read ({e.__class__.__name__}: {e}); {FIX_HINT}") from None


def parse_idx(raw: bytes, path: Path, ndim: int) -> torch.Tensor:
    """Parse IDX bytes into a uint8 tensor, refusing anything that is not exactly `ndim`-D unsigned bytes."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number); {FIX_HINT}")
    if raw[2] != IDX_UBYTE or raw[3] != ndim:
        magic = int.from_bytes(raw[:4], "big")
        expected = (IDX_UBYTE << 8) | ndim
        raise DataError(f"{path}: wrong magic number 0x{magic:08x}, expected 0x{expected:08x}; {FIX_HINT}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header; {FIX_HINT}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    size = 1
    for d in dims:
        size *= d
    if len(raw) != header + size:
        what = "truncated" if len(raw) < header + size else "has trailing bytes"
        raise DataError(f"{path}: {what} ({len(raw) - header} data bytes, header says {size}); {FIX_HINT}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).view(*dims)


def read_idx(path: Path, ndim: int, sha256: str | None = None) -> torch.Tensor:
    """Read one IDX file (raw or .gz). With `sha256`, the decompressed bytes must match it."""
    raw = read_bytes(path)
    tensor = parse_idx(raw, path, ndim)
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise DataError(f"{path}: sha256 mismatch, the file is not the standard MNIST; {FIX_HINT}")
    return tensor


def idx_bytes(tensor: torch.Tensor) -> bytes:
    """A uint8 tensor as the bytes of an IDX file."""
    t = tensor.to(torch.uint8).contiguous()
    header = bytes([0, 0, IDX_UBYTE, t.dim()]) + struct.pack(f">{t.dim()}I", *t.shape)
    return header + t.numpy().tobytes()


def write_idx(path: Path, tensor: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file, atomically (temp file, fsync, rename)."""
    atomic_write(path, idx_bytes(tensor))


@dataclass
class Mnist:
    """The standard 60k training and 10k test sets, as uint8 tensors on the CPU."""

    train_images: torch.Tensor  # [60000, 28, 28] uint8
    train_labels: torch.Tensor  # [60000] uint8
    test_images: torch.Tensor  # [10000, 28, 28] uint8
    test_labels: torch.Tensor  # [10000] uint8


def missing_files(directory: Path) -> list[str]:
    return [name for name in FILES.values() if find_file(directory, name) is None]


def load_mnist(directory: Path, verify: bool = True) -> Mnist:
    """Load the four files from `directory`, checking magic numbers, sizes, label ranges and sha256."""
    missing = missing_files(directory)
    if missing:
        raise DataError(
            f"{directory}: missing {', '.join(missing)} (raw or .gz); "
            "pass --data-dir DIR with the four MNIST IDX files, or unset MNIST_DATA_DIR to fetch them"
        )
    tensors = {}
    for role, name in FILES.items():
        path = find_file(directory, name)
        ndim = 3 if role.endswith("images") else 1
        tensors[role] = read_idx(path, ndim, SHA256[name] if verify else None)
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{directory}: {split} has {images.shape[0]} images but {labels.shape[0]} labels; {FIX_HINT}"
            )
        if labels.numel() and int(labels.max()) > 9:
            raise DataError(f"{directory}: {split} labels outside 0..9; {FIX_HINT}")
    return Mnist(**tensors)


@dataclass
class Split:
    """One split on the training device: uint8 images [N, 1, 28, 28] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class DeviceData:
    train: Split
    val: Split | None
    test: Split


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices into the n training images: a permutation fixed by `seed`."""
    if not 0 <= val_size < n:
        raise DataError(f"--val-size must be between 0 and {n - 1}, got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:], perm[:val_size]


def make_splits(
    mnist: Mnist,
    val_size: int,
    seed: int,
    device: torch.device,
    train_limit: int | None = None,
    eval_limit: int | None = None,
) -> DeviceData:
    """Split the 60k training images into train/val by a permutation fixed by `seed`; move all to `device`.

    Validation always comes from the training set, so the test set is never looked at while training.
    """
    train_idx, val_idx = split_indices(mnist.train_images.shape[0], val_size, seed)
    if train_limit:
        train_idx = train_idx[:train_limit]

    def put(images: torch.Tensor, labels: torch.Tensor, limit: int | None = None) -> Split:
        if limit:
            images, labels = images[:limit], labels[:limit]
        return Split(images.unsqueeze(1).to(device), labels.long().to(device))

    return DeviceData(
        train=put(mnist.train_images[train_idx], mnist.train_labels[train_idx]),
        val=put(mnist.train_images[val_idx], mnist.train_labels[val_idx], eval_limit) if val_size else None,
        test=put(mnist.test_images, mnist.test_labels, eval_limit),
    )


def centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The centre size x size pixels of [..., h, w] images (a view); MNIST digits sit in the centre 20x20."""
    h, w = images.shape[-2:]
    if size >= w and size >= h:
        return images
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float images -> normalized float32."""
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    return (x - MEAN) / STD
