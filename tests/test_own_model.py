"""Your own model, as the seed projects' exercise asks: `--model file.py:Name` wherever a model name
goes, and `mnist-cloud check` for the brief (params, BN, Dropout, GAP, no FC), as a command and as a
function for your own pytest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from torch import nn

from fixtures.cli import assert_user_error, run_cli
from fixtures.project import MYNET, NET_PARAMS, NET_RF


@pytest.fixture
def mynet_project(tmp_path) -> Path:
    (tmp_path / "mynet.py").write_text(MYNET)
    (tmp_path / "broken.py").write_text("def Net(:\n")
    return tmp_path


def test_check_passes_a_net_that_meets_the_brief(mynet_project, mnist_cloud):
    out = run_cli([*mnist_cloud, "check", "mynet.py:Net", "--max-params", "8000", "--require", "bn,dropout,gap",
                   "--no-fc"], cwd=mynet_project)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{NET_PARAMS:,} params" in out.stdout and f"receptive field {NET_RF} px" in out.stdout
    assert "every claim holds" in out.stdout and "FAILS" not in out.stdout
    data = json.loads(run_cli([*mnist_cloud, "check", "mynet.py:Net", "--json"], cwd=mynet_project).stdout)
    assert (data["params"], data["receptive_field"], data["ok"], data["claims"]) == (NET_PARAMS, NET_RF, True, [])
    assert (data["batchnorm"], data["dropout"], data["gap"], data["fc"]) == (True, True, True, False)


def test_check_names_each_claim_that_fails_and_exits_1(mynet_project, mnist_cloud):
    out = run_cli([*mnist_cloud, "check", "mynet.py:mlp", "--max-params", "8000", "--require", "bn,gap", "--no-fc"],
                  cwd=mynet_project)
    assert out.returncode == 1, out.stdout + out.stderr
    failing = {line.split()[0] for line in out.stdout.splitlines() if line.endswith("FAILS")}
    assert failing == {"params", "batchnorm", "gap", "fc"}
    data = json.loads(run_cli([*mnist_cloud, "check", "mynet.py:mlp", "--no-fc", "--json"], cwd=mynet_project).stdout)
    assert data["ok"] is False and data["claims"] == [{"name": "fc", "wanted": "no", "actual": "yes", "ok": False}]


@pytest.mark.parametrize("spec, needle", [
    ("broken.py:Net", "importing broken.py failed: SyntaxError"),
    ("mynet.py:five", "gives [2, 5]; mnist-cloud needs [N, 10] logits"),
    ("mynet.py:not_a_module", "returned a str, not an nn.Module"),
    ("mynet.py:Nope", "mynet.py has no class or function 'Nope'"),
    ("nowhere.py:Net", "nowhere.py does not exist"),
    ("mynet.py", "unknown model"),
])
def test_a_model_that_cannot_be_used_is_one_line_and_exit_2(mynet_project, mnist_cloud, spec, needle):
    assert_user_error(run_cli([*mnist_cloud, "check", spec], cwd=mynet_project), needle)


def test_check_model_from_your_own_pytest(mynet_project, monkeypatch):
    """The README's example: the same checks as a function, on a spec or on a module."""
    from trainer.check import check_model

    monkeypatch.chdir(mynet_project)
    result = check_model("mynet.py:Net", max_params=8000, require=("bn", "dropout", "gap"), no_fc=True)
    assert result.ok and result.failures == [] and result.receptive_field == NET_RF
    strided = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.Conv2d(4, 4, 3, dilation=2), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 10))
    tight = check_model(strided, max_params=10, no_fc=True)
    assert not tight.ok and [f.split(":")[0] for f in tight.failures] == ["params", "fc"]
    assert tight.receptive_field == 3 + 2 * 2 * 2  # stride 2 doubles the jump, dilation 2 the kernel's reach
    # a conv that collapses the image to 1x1 is no GAP: its own kernel counts (28, not 1)
    collapse = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 10, 26), nn.Flatten())
    assert check_model(collapse).receptive_field == 28 and not check_model(collapse).gap

    class MyLinear(nn.Linear):  # a subclass is still a fully connected layer
        pass

    sneaky = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), MyLinear(4, 10))
    assert check_model(sneaky, no_fc=True).failures == ["fc: wanted no, got yes"]


@pytest.mark.slow
def test_train_evaluate_and_a_changed_file(mynet_project, mnist_cloud, mnist_dir):
    """Trained like a zoo model; config.json keeps the spec and the file's sha256; evaluating after the
    file changed says so in one line, and still evaluates."""
    out = run_cli([*mnist_cloud, "train", "--model", "mynet.py:Net", "--epochs", "1", "--train-limit", "1024",
                   "--eval-limit", "300", "--no-report", "--data-dir", str(mnist_dir)], cwd=mynet_project)
    assert out.returncode == 0, out.stdout + out.stderr
    (run,) = (mynet_project / "runs").iterdir()
    assert "-mynet-Net-s1" in run.name  # a directory name: no slash, no colon
    model = json.loads((run / "config.json").read_text())["model"]
    assert model["name"] == "mynet.py:Net" and model["params"] == NET_PARAMS
    assert model["source"]["sha256"] == hashlib.sha256(MYNET.encode()).hexdigest()
    same = run_cli([*mnist_cloud, "evaluate", str(run), "--data-dir", str(mnist_dir)], cwd=mynet_project)
    assert same.returncode == 0 and "has changed" not in same.stderr and "mynet.py:Net" in same.stdout
    elsewhere = mynet_project / "elsewhere"  # the spec is relative; the run recorded the file's absolute path
    elsewhere.mkdir()
    away = run_cli([*mnist_cloud, "evaluate", str(run), "--data-dir", str(mnist_dir)], cwd=elsewhere)
    assert away.returncode == 0 and "mynet.py:Net" in away.stdout, away.stdout + away.stderr
    (mynet_project / "mynet.py").write_text(MYNET + "\n# tuned the dropout later\n")
    later = run_cli([*mnist_cloud, "evaluate", str(run), "--data-dir", str(mnist_dir)], cwd=mynet_project)
    assert later.returncode == 0, later.stderr
    notes = [line for line in later.stderr.splitlines() if "has changed since this run was trained" in line]
    assert len(notes) == 1 and "mynet.py" in notes[0]
    summary = run_cli([*mnist_cloud, "models", "--summary", "mynet.py:Net"], cwd=mynet_project)
    assert summary.returncode == 0 and f"{NET_PARAMS:,}" in summary.stdout


def test_a_model_file_outside_the_synced_code_is_refused_before_connecting(mynet_project, mnist_cloud):
    """From the checkout (what `train --on` syncs), a model file elsewhere could not reach the machine."""
    from fixtures import REPO

    out = run_cli([*mnist_cloud, "train", "--on", "box", "--model", f"{mynet_project / 'mynet.py'}:Net"], cwd=REPO)
    assert_user_error(out, "is outside", "the directory synced to the machine")


def test_an_edited_model_file_is_imported_again_in_the_same_process(mynet_project, monkeypatch):
    """In a notebook, the net is edited and rebuilt: the edit must show (the import is cached per version)."""
    import os
    import time

    from trainer.models import count_params, get_spec

    monkeypatch.chdir(mynet_project)
    before = count_params(get_spec("mynet.py:Net").build())
    (mynet_project / "mynet.py").write_text(MYNET.replace("block(16, 16)", "block(16, 24)")
                                            .replace("nn.Conv2d(16, 10, 1)", "nn.Conv2d(24, 10, 1)"))
    later = time.time() + 5
    os.utime(mynet_project / "mynet.py", (later, later))  # a new mtime even on a coarse clock
    after = count_params(get_spec("mynet.py:Net").build())
    assert after > before


def test_a_trainer_py_of_the_project_never_shadows_the_trainer(mynet_project, mnist_cloud):
    """`trainer.py` is a common name in a project; `python -m trainer` here must still be the tool's."""
    (mynet_project / "trainer.py").write_text('print("THE PROJECT\'S trainer.py RAN")\nraise SystemExit(3)\n')
    out = run_cli([*mnist_cloud, "check", "mynet.py:Net"], cwd=mynet_project)
    assert out.returncode == 0 and "RAN" not in out.stdout, out.stdout + out.stderr


def test_with_code_dir_the_model_file_is_named_relative_to_it_and_must_be_synced(mynet_project):
    """train --on NAME --code DIR --model DIR/mynet.py:Net: the machine gets mynet.py:Net; a file git
    ignores would never arrive, so it is refused before anything connects."""
    from infra.runner import placement_and_flags
    from runspec import UserError

    _, argv = placement_and_flags(["--model", f"{mynet_project / 'mynet.py'}:Net", "--epochs", "1"], check=False,
                                  code=mynet_project)
    assert argv[:2] == ["--model", "mynet.py:Net"]
    (mynet_project / ".gitignore").write_text("scratch/\n")
    (mynet_project / "scratch").mkdir()
    (mynet_project / "scratch" / "mynet.py").write_text(MYNET)
    import subprocess

    subprocess.run(["git", "init", "-q", str(mynet_project)], check=True)
    with pytest.raises(UserError, match="is not synced"):
        placement_and_flags(["--model", f"{mynet_project / 'scratch' / 'mynet.py'}:Net"], check=False,
                            code=mynet_project)
