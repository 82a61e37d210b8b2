"""Damaged checkpoints never load: random bytes, truncations and bit or byte flips of a real
checkpoint give the intact weights or a UserError, never different weights and never a traceback."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import zipfile

import pytest
import torch
from fixtures.cli import assert_user_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer import checkpoint
from trainer.checkpoint import (
    FORMAT,
    checksum_path,
    load_checkpoint,
    move_checkpoint,
    save_checkpoint,
)
from runspec.config import TrainConfig
from trainer.errors import UserError
from trainer.models import build_model
from trainer.train import fit

# Each example loads a 40 kB checkpoint in a few ms; the whole file stays well under 20 s.
FAST = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def real_state() -> dict:
    """What training saves, for the smallest zoo model: weights, momentum buffers, counters."""
    torch.manual_seed(0)
    model = build_model("net8k")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    return {"model_name": "net8k", "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
            "epoch": 1, "best_val_acc": 12.5, "best_epoch": 1, "partial": None}


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """(bytes, sha256 sidecar bytes, the loaded intact state) of one real checkpoint."""
    path = tmp_path_factory.mktemp("intact") / "best.pt"
    save_checkpoint(path, real_state())
    return path.read_bytes(), checksum_path(path).read_bytes(), load_checkpoint(path)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("damaged")


def same(a, b) -> bool:
    """Bit-identical: every tensor equal in dtype, shape and every value, every other leaf equal."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def intact_or_user_error(data: bytes, scratch, intact, sidecar: bool) -> str:
    """Load `data` as best.pt (with the intact file's sha256 beside it, or none): the property."""
    path = scratch / "best.pt"
    path.write_bytes(data)
    checksum_path(path).unlink(missing_ok=True)
    if sidecar:
        checksum_path(path).write_bytes(intact[1])
    try:
        state = load_checkpoint(path)
    except UserError as e:
        assert "\n" not in str(e) and str(path) in str(e) and "weights_only" not in str(e), str(e)
        return "rejected"
    assert same(state, intact[2]), "a damaged checkpoint loaded with different contents"
    return "intact"


def flip_bit(data: bytes, bit: int) -> bytes:
    raw = bytearray(data)
    raw[bit // 8] ^= 1 << (bit % 8)
    return bytes(raw)


# ---------------------------------------------------------------------------------- properties
@FAST
@given(data=st.binary(max_size=4096) | st.binary(max_size=4096).map(lambda b: b"PK\x03\x04" + b))
def test_random_bytes_are_one_user_error(data, scratch, intact):
    assert intact_or_user_error(data, scratch, intact, sidecar=False) == "rejected"


@FAST
@given(keep=st.floats(0, 1, exclude_max=True), sidecar=st.booleans())
def test_a_truncated_checkpoint_never_loads(keep, sidecar, scratch, intact):
    data = intact[0]
    # a truncated zip loses its central directory, which sits at the end: rejected with or without the sha256
    assert intact_or_user_error(data[:int(len(data) * keep)], scratch, intact, sidecar) == "rejected"


@FAST
@given(bit=st.data())
def test_a_bit_flip_with_the_sha256_beside_it_never_loads(bit, scratch, intact):
    data = intact[0]
    flipped = flip_bit(data, bit.draw(st.integers(0, len(data) * 8 - 1)))
    assert intact_or_user_error(flipped, scratch, intact, sidecar=True) == "rejected"


@FAST
@given(bit=st.data())
def test_a_bit_flip_without_the_sha256_gives_the_intact_weights_or_a_user_error(bit, scratch, intact):
    """A checkpoint copied alone or saved before the sidecar existed: the zip CRCs decide. A flip in
    bytes nothing reads (alignment padding, a file date) may load, and then loads the intact weights."""
    data = intact[0]
    flipped = flip_bit(data, bit.draw(st.integers(0, len(data) * 8 - 1)))
    intact_or_user_error(flipped, scratch, intact, sidecar=False)


@FAST
@given(flips=st.data(), sidecar=st.booleans())
def test_byte_flips_give_the_intact_weights_or_a_user_error(flips, sidecar, scratch, intact):
    raw = bytearray(intact[0])
    for _ in range(flips.draw(st.integers(1, 4))):
        raw[flips.draw(st.integers(0, len(raw) - 1))] ^= flips.draw(st.integers(1, 255))
    intact_or_user_error(bytes(raw), scratch, intact, sidecar)


# ---------------------------------------------------------------------------------- the tensor data
def tensor_data_offsets(path) -> list[int]:
    """Byte offsets of every tensor's storage inside a checkpoint's zip."""
    raw = path.read_bytes()
    offsets = []
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size:
                h = info.header_offset
                start = h + 30 + int.from_bytes(raw[h + 26:h + 28], "little") + int.from_bytes(raw[h + 28:h + 30], "little")
                offsets += range(start, start + info.file_size)
    return offsets


@pytest.mark.parametrize("sidecar", [True, False], ids=["sha256", "zip-crc"])
def test_a_flipped_byte_in_tensor_data_never_loads(scratch, intact, sidecar):
    """What torch.load alone lets through: the zip stays valid, one weight changes."""
    src = scratch / "src.pt"
    src.write_bytes(intact[0])
    offsets = tensor_data_offsets(src)
    for at in offsets[:: max(1, len(offsets) // 40)] + [offsets[-1]]:
        raw = bytearray(intact[0])
        raw[at] ^= 0xFF
        assert intact_or_user_error(bytes(raw), scratch, intact, sidecar) == "rejected", at


# ---------------------------------------------------------------------------------- the sidecar
def test_the_sha256_is_written_as_sha256sum_writes_it_and_travels_with_a_rename(tmp_path):
    last, prev = tmp_path / "last.pt", tmp_path / "prev.pt"
    save_checkpoint(last, real_state())
    digest = hashlib.sha256(last.read_bytes()).hexdigest()
    assert checksum_path(last).read_text() == f"{digest}  last.pt\n"
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "-c", "last.pt.sha256"], cwd=tmp_path, check=False).returncode == 0
    move_checkpoint(last, prev)
    assert not last.exists() and not checksum_path(last).exists()
    assert checksum_path(prev).read_text() == f"{digest}  prev.pt\n"
    assert load_checkpoint(prev)["epoch"] == 1
    # the digest is carried, not recomputed: a file damaged before the rename stays damaged after it
    save_checkpoint(last, real_state())
    last.write_bytes(flip_bit(last.read_bytes(), 8 * 100))
    move_checkpoint(last, prev)
    with pytest.raises(UserError, match="prev.pt is corrupt or truncated"):
        load_checkpoint(prev)


def test_a_crash_before_the_new_sha256_lands_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    """Between the rename of the new file and the write of its sha256, the old sha256 must already be
    gone: otherwise a good checkpoint would look damaged and a resume would lose its newest state."""
    last, prev, best = tmp_path / "last.pt", tmp_path / "prev.pt", tmp_path / "best.pt"
    save_checkpoint(best, {**real_state(), "epoch": 1})
    for epoch in (1, 2):
        save_checkpoint(last, {**real_state(), "epoch": epoch})
        move_checkpoint(last, prev)  # prev.pt and its sha256 are there, from epoch 2
    save_checkpoint(last, {**real_state(), "epoch": 3})

    def killed(*_):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint, "_write_checksum", killed)
    with pytest.raises(KeyboardInterrupt):
        move_checkpoint(last, prev)  # last.pt (epoch 3) over prev.pt (epoch 2)
    assert load_checkpoint(prev)["epoch"] == 3  # no sha256 now: the zip CRCs vouch for it
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(best, {**real_state(), "epoch": 4})  # over best.pt (epoch 1) and its sha256
    assert load_checkpoint(best)["epoch"] == 4


def test_a_sha256_that_is_not_one_is_a_clear_error(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(path, real_state())
    checksum_path(path).write_text("garbage\n")
    with pytest.raises(UserError, match=r"corrupt or truncated \(best.pt.sha256 holds no sha256"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------------- not ours
@pytest.mark.parametrize("content,needle", [
    ({"a": torch.nn.Linear(2, 2)}, "Unsupported global"),  # a pickled module: weights_only refuses it
    ({"weights": torch.zeros(3)}, "no 'mnist-cloud/1' marker"),
    ({"format": FORMAT, "model_state": {}}, "lacks model_name"),
    ({"format": FORMAT, "model_name": "net8k", "model_state": [1]}, "malformed"),
])
def test_a_file_that_is_not_our_checkpoint_is_one_line_without_torchs_advice(tmp_path, content, needle):
    path = tmp_path / "x.pt"
    torch.save(content, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert needle in msg and str(path) in msg and "\n" not in msg and "weights_only" not in msg, msg


def test_a_zip_that_is_not_a_torch_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(UserError, match="is not an mnist-cloud checkpoint torch can load"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------------- real runs, real CLI
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, mnist_dir):
    """A real run stopped after epoch 2 of 3: last.pt, prev.pt and best.pt, each with its sha256."""
    out = tmp_path_factory.mktemp("run") / "runs"
    fit(TrainConfig(data_dir=str(mnist_dir), out_dir=str(out), train_limit=512, eval_limit=200, epochs=3,
                    stop_after=2, batch_size=128, progress=False, threads=2, report=False, device="cpu", run_id="r"))
    return out / "r"


def copy_run(stopped_run, tmp_path, sidecar: bool):
    """A copy of the run to damage; without sidecar, as a run saved before checkpoints had one."""
    run_dir = shutil.copytree(stopped_run, tmp_path / "r")
    for name in ("last.pt", "prev.pt", "best.pt"):
        assert checksum_path(run_dir / name).is_file(), name
        if not sidecar:
            checksum_path(run_dir / name).unlink()
    return run_dir


def flip_inside_a_tensor(path) -> None:
    raw = bytearray(path.read_bytes())
    offsets = tensor_data_offsets(path)
    raw[offsets[len(offsets) // 2]] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("sidecar", [True, False], ids=["sha256", "zip-crc"])
def test_evaluate_on_a_bit_flipped_checkpoint_is_one_line_and_exit_2(stopped_run, tmp_path, mnist_dir,
                                                                     mnist_cloud, sidecar):
    best = copy_run(stopped_run, tmp_path, sidecar) / "best.pt"
    flip_inside_a_tensor(best)
    proc = run_cli([*mnist_cloud, "evaluate", str(best)], env_extra={"MNIST_DATA_DIR": str(mnist_dir)})
    assert_user_error(proc, str(best), "corrupt or truncated", "prev.pt or best.pt")
    assert "weights_only" not in proc.stderr


@pytest.mark.parametrize("sidecar", [True, False], ids=["sha256", "zip-crc"])
def test_resume_skips_a_bit_flipped_last_pt_and_says_which_it_used(stopped_run, tmp_path, capfd, sidecar):
    run_dir = copy_run(stopped_run, tmp_path, sidecar)
    flip_inside_a_tensor(run_dir / "last.pt")
    capfd.readouterr()
    result = fit(TrainConfig(resume=str(run_dir), progress=False, report=False),
                 explicit={"resume", "progress", "report"})
    assert result["status"] == "completed" and result["epochs"] == 3
    notes = [line for line in capfd.readouterr().err.splitlines() if "last.pt" in line]
    assert len(notes) == 1, notes
    assert "last.pt is corrupt or truncated" in notes[0] and "resuming from" in notes[0], notes
    assert "resuming from last.pt" not in notes[0]
