"""`mnist-cloud` as a user runs it: a subprocess of the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from fixtures import REPO
from fixtures.cli import assert_user_error, run_cli

TINY = ["--device", "cpu", "--epochs", "1", "--train-limit", "3072", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_dir, mnist_cloud):
    """One real `mnist-cloud train` run (a validation split, so best.pt too), tested on the full 10k test set."""
    work = tmp_path_factory.mktemp("cli")
    proc = run_cli([*mnist_cloud, "train", *TINY, "--train-limit", "8192", "--epochs", "2", "--val-size", "10000",
                    "--run-id", "tiny"],
                   env_extra={"MNIST_DATA_DIR": str(mnist_dir)}, cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work / "runs" / "tiny", proc


@pytest.fixture(scope="module")
def trained_ema(tmp_path_factory, mnist_dir, mnist_cloud):
    """A run that delivers the EMA of its weights, without a validation split (so no best.pt)."""
    work = tmp_path_factory.mktemp("cli-ema")
    proc = run_cli([*mnist_cloud, "train", *TINY, "--train-limit", "1024", "--epochs", "2", "--threads", "1",
                    "--ema", "0.9", "--val-size", "0", "--no-report", "--run-id", "ema"],
                   env_extra={"MNIST_DATA_DIR": str(mnist_dir)}, cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work / "runs" / "ema", proc


@pytest.mark.slow
def test_train_runs_the_trainer_and_writes_the_run_dir(trained):
    run_dir, proc = trained
    assert "Epoch: 2 | Train Loss:" in proc.stdout and "test accuracy:" in proc.stdout
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["test_acc"] > 90


@pytest.mark.parametrize("which, weights, label", [("trained", "final", "final weights"),
                                                   ("trained_ema", "ema", "EMA weights")])
@pytest.mark.slow
def test_evaluate_a_run_is_its_delivered_weights_and_reproduces_result_json(request, mnist_cloud, mnist_dir,
                                                                            which, weights, label):
    run_dir, _ = request.getfixturevalue(which)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["weights"] == weights and result["delivered"] == "model.pt"
    env = {"MNIST_DATA_DIR": str(mnist_dir)}
    proc = run_cli([*mnist_cloud, "evaluate", str(run_dir), "--json"], env_extra=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["checkpoint"] == str(run_dir / "model.pt") and out["weights"] == weights
    assert out["images"] == 10000 and out["epoch"] == result["epochs"] == 2
    # the same weights on the same 10k images in the same batches: the very number the run reported
    assert out["test_acc"] == result["test_acc"]
    assert out["test_loss"] == pytest.approx(result["test_loss"], rel=1e-5)
    text = run_cli([*mnist_cloud, "evaluate", str(run_dir)], env_extra=env)
    assert text.returncode == 0, text.stderr
    assert f"{label}, epoch 2 (model.pt): test accuracy {result['test_acc']:.2f}%" in text.stdout


def test_evaluate_an_explicit_checkpoint_is_that_checkpoint(trained, mnist_cloud, mnist_dir):
    run_dir, _ = trained
    result = json.loads((run_dir / "result.json").read_text())
    proc = run_cli([*mnist_cloud, "evaluate", str(run_dir / "best.pt"), "--json"],
                   env_extra={"MNIST_DATA_DIR": str(mnist_dir)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["epoch"] == result["best_epoch"] and out["weights"] is None and out["images"] == 10000


def test_ema_run_without_validation_has_no_best_checkpoint(trained_ema):
    run_dir, _ = trained_ema
    result = json.loads((run_dir / "result.json").read_text())
    assert not (run_dir / "best.pt").exists() and (run_dir / "model.pt").is_file()
    assert result["val_acc"] is None and result["best_val_acc"] is None


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_run_without_model_pt_names_the_checkpoints_to_pass(trained, mnist_cloud, tmp_path, command):
    run_dir, _ = trained
    old = tmp_path / "old-run"  # as an unfinished run, or one an older version made, leaves it
    shutil.copytree(run_dir, old, ignore=shutil.ignore_patterns("model.pt*"))
    args = [str(old)] + ([str(tmp_path / "digit.png")] if command == "predict" else [])
    assert_user_error(run_cli([*mnist_cloud, command, *args]),
                      f"{old} has no delivered weights (model.pt) yet", "not finished", "older version",
                      f"pass {old / 'last.pt'} (or best.pt) explicitly")


def test_predict_reads_png_digits(trained, mnist_cloud, mnist_dir, tmp_path):
    from PIL import Image

    from trainer.data import load_mnist

    run_dir, _ = trained
    mnist = load_mnist(mnist_dir)
    paths, labels = [], []
    for i in range(12):
        img = mnist.test_images[i]
        if i % 2:  # half of them as a dark digit on white paper, scaled up
            img = 255 - torch.nn.functional.interpolate(img[None, None].float(), size=(84, 84))[0, 0].to(torch.uint8)
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(img.numpy()).save(path)
        paths.append(str(path))
        labels.append(int(mnist.test_labels[i]))
    proc = run_cli([*mnist_cloud, "predict", str(run_dir), *paths, "--json"])
    assert proc.returncode == 0, proc.stderr
    preds = [json.loads(l) for l in proc.stdout.splitlines()]
    assert [p["image"] for p in preds] == paths
    for p in preds:
        assert abs(sum(p["probabilities"]) - 1) < 1e-4 and p["digit"] == max(range(10), key=p["probabilities"].__getitem__)
    correct = sum(p["digit"] == y for p, y in zip(preds, labels))
    assert correct >= 10, (correct, [p["digit"] for p in preds], labels)


@pytest.mark.slow
def test_models_lists_the_zoo_with_counted_params(mnist_cloud):
    proc = run_cli([*mnist_cloud, "models"])
    assert proc.returncode == 0, proc.stderr
    for name in ("net8k", "net20k", "seed001", "seed002-relu", "seed002-gap", "seed003", "seed004"):
        assert name in proc.stdout
    assert "23,760" in proc.stdout and "10,170" in proc.stdout and "24,552" in proc.stdout
    rows = json.loads(run_cli([*mnist_cloud, "models", "--json"]).stdout)
    net8k = next(r for r in rows if r["name"] == "net8k")
    assert net8k["params"] < 8000 and net8k["within_budget"] and net8k["gap"] and not net8k["fc"]
    assert net8k["macs"] > 0


def test_help_texts(mnist_cloud):
    top = run_cli([*mnist_cloud, "--help"])
    assert top.returncode == 0 and "train" in top.stdout and "models" in top.stdout
    train = run_cli([*mnist_cloud, "train", "--help"])
    assert train.returncode == 0
    for flag in ("--model", "--epochs", "--rotate", "--target", "--resume", "--device", "--val-size"):
        assert flag in train.stdout, flag
    assert "default: net8k" in train.stdout


@pytest.mark.parametrize("args,needles", [
    (["train", "--model", "nope"], ["unknown model 'nope'"]),
    (["train", "--epochs", "-1"], ["--epochs must be at least 1"]),
    (["train", "--target", "101"], ["--target"]),
    (["train", "--epochs", "many"], ["--epochs", "invalid int"]),
    (["train", "--bogus-flag"], ["unrecognized arguments: --bogus-flag"]),
    (["train", "--data-dir", "/nonexistent/mnist"], ["/nonexistent/mnist is not a directory"]),
    (["train", "--resume", "/nonexistent/run"], ["not a run directory"]),
    (["evaluate", "/nonexistent/best.pt"], ["does not exist"]),
    (["predict"], ["required"]),
    (["train", "--train-limit", "1", "--no-progress"], ["make no batch of 128", "--batch-size"]),
])
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(mnist_cloud, mnist_dir, tmp_path, args, needles):
    proc = run_cli([*mnist_cloud, *args], env_extra={"MNIST_DATA_DIR": str(mnist_dir)}, cwd=tmp_path)
    assert_user_error(proc, *needles)
    assert not (tmp_path / "runs").exists()


def test_corrupt_data_file_is_one_line_and_exit_2(mnist_cloud, mnist_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for f in mnist_dir.glob("*-ubyte.gz"):
        (data / f.name).write_bytes(f.read_bytes())
    (data / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    proc = run_cli([*mnist_cloud, "train", "--data-dir", str(data)], cwd=tmp_path)
    assert_user_error(proc, "t10k-labels-idx1-ubyte.gz")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_corrupt_checkpoint_is_one_line_and_exit_2(mnist_cloud, tmp_path):
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    assert_user_error(run_cli([*mnist_cloud, "evaluate", str(bad)]), "corrupt or truncated")
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, plain)
    assert_user_error(run_cli([*mnist_cloud, "evaluate", str(plain)]), "not an mnist-cloud checkpoint")


@pytest.mark.slow
def test_unreadable_image_is_one_line_and_exit_2(trained, mnist_cloud, tmp_path):
    run_dir, _ = trained
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png")
    assert_user_error(run_cli([*mnist_cloud, "predict", str(run_dir), str(bad)]), "cannot decode")


# Run trainer.cli.main in a fresh interpreter, then fail (a traceback, exit 1) if torch was imported.
_MAIN_WITHOUT_TORCH = """
import sys
from trainer.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:  # --help
    rc = e.code
assert 'torch' not in sys.modules, 'torch was imported'
sys.exit(rc)
"""


@pytest.mark.parametrize("args,needle", [
    (["train", "--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--epochs", "0"], "--epochs must be at least 1"),  # train is the default command
    (["train", "--input-size", "27"], "--input-size must be an even number"),
    (["train", "--compile-mode", "max-autotune"], "--compile-mode needs --compile"),
    (["train", "--optimizer", "lion"], "invalid choice: 'lion'"),
    (["train", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["models", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["evaluate"], "required: weights"),
    (["predict", "x.pt"], "required: images"),
    (["report"], "required: run"),
    (["data", "--bogus-flag"], "unrecognized arguments"),
])
def test_bad_flags_are_rejected_before_torch_is_imported(args, needle):
    """torch takes ~3 s to import: a typo must not wait for it (it used to: validate() ran inside fit())."""
    proc = subprocess.run([sys.executable, "-c", _MAIN_WITHOUT_TORCH, *args], capture_output=True, text=True, cwd=REPO)
    assert_user_error(proc, needle)


@pytest.mark.parametrize("command", ["train", "models", "evaluate", "predict", "data", "report", "compare"])
def test_help_needs_no_torch(command):
    proc = subprocess.run([sys.executable, "-c", _MAIN_WITHOUT_TORCH, command, "--help"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert f"usage: python -m trainer {command}" in proc.stdout


def test_mnist_cloud_train_rejects_a_bad_flag_before_torch_is_imported(mnist_cloud, tmp_path):
    """`mnist-cloud train` runs `python -m trainer train` here; Python's import log of both processes
    (PYTHONPROFILEIMPORTTIME goes to their stderr) must name no torch module."""
    proc = run_cli([*mnist_cloud, "train", "--epochs", "0"], env_extra={"PYTHONPROFILEIMPORTTIME": "1"}, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-1] == "error: --epochs must be at least 1, got 0"
    imported = [line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")]
    assert "trainer.cli" in imported  # the log is there, and it covers the trainer process
    assert not [m for m in imported if m.split(".")[0] == "torch"]


def test_global_region_and_profile_reach_pass_through_commands():
    from infra.commands import build_parser
    from infra.commands.options import global_aws

    args, rest = build_parser().parse_known_args(["--region", "eu-west-1", "--profile", "work", "train", "--on", "x"])
    assert global_aws(rest, args) == ["--profile", "work", "--region", "eu-west-1", "--on", "x"]
    args, rest = build_parser().parse_known_args(["--region", "eu-west-1", "train", "--region", "us-west-2"])
    assert global_aws(rest, args) == ["--region", "us-west-2"]  # the one typed after the command wins


@pytest.mark.parametrize("argv,lr,scaled", [
    ([], 0.2, False),  # net8k's recipe: peak 0.2 at batch 128
    (["--batch-size", "512"], 0.8, True),  # linear rule: the LR tuned at 128, times 512/128
    (["--batch-size", "64"], 0.1, True),
    (["--model", "seed001", "--batch-size", "512"], 0.4, True),  # no recipe LR: the default 0.1, scaled
    (["--batch-size", "512", "--lr", "0.3"], 0.3, False),  # a typed LR is the user's
    (["--batch-size", "512", "--optimizer", "adam"], 0.1, False),  # the recipe's LR and the linear rule are SGD's
    (["--resume", "runs/x", "--batch-size", "512"], 0.1, False),  # a resumed run keeps its saved config
])
def test_batch_size_scales_the_recipes_learning_rate(argv, lr, scaled, capsys):
    from trainer.cli import parse_train_args

    args, _ = parse_train_args(argv)
    assert args.lr == pytest.approx(lr)
    assert ("scales the peak learning rate" in capsys.readouterr().err) == scaled
