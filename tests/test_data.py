"""The IDX reader on good and corrupt files, and the train/val/test split."""

import gzip
import shutil
import struct

import pytest
import torch

from trainer.data import FILES, idx_bytes, load_mnist, make_splits, normalize, read_idx, split_indices, write_idx
from trainer.errors import DataError

TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return load_mnist(mnist_dir)


def test_reads_the_standard_files(mnist):
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.train_images.dtype == torch.uint8
    assert mnist.test_images.shape == (10000, 28, 28)
    assert torch.bincount(mnist.test_labels.long()).tolist() == TEST_LABEL_COUNTS
    assert torch.bincount(mnist.train_labels.long()).tolist() == TRAIN_LABEL_COUNTS
    assert int(mnist.train_images.max()) == 255 and int(mnist.train_images.min()) == 0


def test_raw_and_gz_read_the_same(tmp_path, mnist_dir):
    src = mnist_dir / "t10k-labels-idx1-ubyte.gz"
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress(src.read_bytes()))
    assert torch.equal(read_idx(src, 1), read_idx(raw, 1))


def test_write_then_read_roundtrip(tmp_path):
    t = torch.randint(0, 256, (5, 3, 4), dtype=torch.uint8)
    write_idx(tmp_path / "x-idx3-ubyte", t)
    assert torch.equal(read_idx(tmp_path / "x-idx3-ubyte", 3), t)


def _copy_data(src, dst):
    dst.mkdir()
    for name in FILES.values():
        shutil.copy(src / f"{name}.gz", dst / f"{name}.gz")
    return dst


@pytest.mark.parametrize("damage,message", [
    ("magic", "wrong magic number"),
    ("not_idx", "bad magic number"),
    ("truncated", "truncated"),
    ("trailing", "trailing bytes"),
    ("flipped_pixel", "sha256 mismatch"),
])
def test_corrupt_files_are_refused_with_the_file_named(tmp_path, mnist_dir, damage, message):
    data_dir = _copy_data(mnist_dir, tmp_path / "data")
    name = "t10k-images-idx3-ubyte"
    raw = bytearray(gzip.decompress((data_dir / f"{name}.gz").read_bytes()))
    if damage == "magic":
        raw[3] = 1  # says 1-D
    elif damage == "not_idx":
        raw[0] = 0x50
    elif damage == "truncated":
        raw = raw[:-100]
    elif damage == "trailing":
        raw += b"\0"
    elif damage == "flipped_pixel":
        raw[5000] ^= 0xFF
    (data_dir / f"{name}.gz").unlink()
    (data_dir / name).write_bytes(bytes(raw))
    with pytest.raises(DataError, match=message) as err:
        load_mnist(data_dir)
    assert name in str(err.value) and "\n" not in str(err.value)


def test_broken_gzip_is_refused(tmp_path, mnist_dir):
    data_dir = _copy_data(mnist_dir, tmp_path / "data")
    gz = data_dir / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:1000])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: cannot read"):
        load_mnist(data_dir)


def test_missing_file_is_named(tmp_path, mnist_dir):
    data_dir = _copy_data(mnist_dir, tmp_path / "data")
    (data_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        load_mnist(data_dir)


def test_header_size_mismatch_is_caught_before_hashing(tmp_path):
    # a well-formed 2-image file whose header claims 3 images
    bad = bytes([0, 0, 8, 3]) + struct.pack(">3I", 3, 28, 28) + bytes(2 * 28 * 28)
    (tmp_path / "x").write_bytes(bad)
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "x", 3)


def test_default_split_is_50k_10k_10k_and_fixed_by_seed(mnist):
    a = make_splits(mnist, 10000, seed=1, device=torch.device("cpu"))
    b = make_splits(mnist, 10000, seed=1, device=torch.device("cpu"))
    c = make_splits(mnist, 10000, seed=2, device=torch.device("cpu"))
    assert (len(a.train), len(a.val), len(a.test)) == (50000, 10000, 10000)
    assert a.train.images.shape == (50000, 1, 28, 28) and a.train.labels.dtype == torch.int64
    assert torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.val.images, c.val.images)
    # validation comes out of the training set, test is untouched
    assert torch.equal(a.test.images[:, 0], mnist.test_images)
    assert torch.bincount(torch.cat([a.train.labels, a.val.labels])).tolist() == TRAIN_LABEL_COUNTS


def test_val_and_train_are_disjoint_and_cover_the_training_set():
    train, val = split_indices(60000, 10000, seed=3)
    assert len(val) == 10000 and len(train) == 50000
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(60000))
    again_train, again_val = split_indices(60000, 10000, seed=3)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)


def test_val_size_zero_trains_on_all_60k(mnist):
    s = make_splits(mnist, 0, seed=1, device=torch.device("cpu"))
    assert len(s.train) == 60000 and s.val is None


def test_bad_val_size(mnist):
    with pytest.raises(DataError, match="--val-size"):
        make_splits(mnist, 60000, seed=1, device=torch.device("cpu"))


def test_normalize_accepts_uint8_and_unit_floats():
    x = torch.tensor([[0, 255]], dtype=torch.uint8)
    assert torch.allclose(normalize(x), normalize(x.float() / 255))
    y = torch.tensor([0.5])
    normalize(y)
    assert y.item() == 0.5  # the input is not modified in place


def test_idx_bytes_header():
    raw = idx_bytes(torch.zeros(2, 3, dtype=torch.uint8))
    assert raw[:4] == bytes([0, 0, 8, 2]) and struct.unpack(">2I", raw[4:12]) == (2, 3) and len(raw) == 18
