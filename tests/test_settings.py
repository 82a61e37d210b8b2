"""Settings from files (infra/settings.py): flag, then environment, then the project's file, then the
user's, then the default; a typo or a wrong type is one line naming the file and the key."""

from __future__ import annotations

import json

import pytest

from fixtures.aws import aws_env, moto_server, seed_dlami
from fixtures.cli import assert_user_error, run_cli


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A project (with a pyproject.toml) and a user config dir, both empty of settings."""
    project, home = tmp_path / "project", tmp_path / "home"
    (project / "src").mkdir(parents=True)
    home.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "mine"\n')
    monkeypatch.setenv("MNIST_CLOUD_HOME", str(home))
    monkeypatch.chdir(project / "src")  # the project file is found from a subdirectory too
    return project, home


def test_each_source_wins_over_the_next(files, monkeypatch):
    from infra import settings

    project, home = files
    (home / "config.toml").write_text('instance = "g5.xlarge"\nautostop = 45\nepochs = 9\nregion = "eu-west-1"\n')
    (project / "pyproject.toml").write_text('[project]\nname = "mine"\n\n[tool.mnist-cloud]\nautostop = 10\n'
                                            'epochs = 12\n')
    monkeypatch.setenv("MNIST_CLOUD_DEFAULT_EPOCHS", "20")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    found = settings.resolve({"region": "us-west-2"})
    got = {k: (v.value, v.source) for k, v in found.items()}
    assert got == {
        "region": ("us-west-2", "flag"),
        "profile": (None, "default"),
        "instance": ("g5.xlarge", str(home / "config.toml")),
        "autostop": (10.0, str(project / "pyproject.toml")),
        "model": (None, "default"),
        "epochs": (20, "environment ($MNIST_CLOUD_DEFAULT_EPOCHS)"),
        "budget": (None, "default"),
        "notify": (None, "default"),
        "tensorboard": (False, "default"),
    }
    assert settings.resolve()["region"].value == "eu-west-1"  # no flag, no environment: the user file
    (project / "mnist-cloud.toml").write_text("autostop = 0\n")  # beside pyproject.toml, it is the project's
    assert settings.value("autostop") == 0.0


@pytest.mark.parametrize("text, needle", [
    ("[tool.mnist-cloud]\nepoch = 3\n", "[tool.mnist-cloud]: unknown key 'epoch'; the keys are"),
    ("[tool.mnist-cloud]\nepochs = \"3\"\n", "[tool.mnist-cloud]: epochs must be a whole number, got '3'"),
    ("[tool.mnist-cloud]\nautostop = true\n", "autostop must be a number, got True"),
    ("[tool.mnist-cloud\n", "is not valid TOML"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_key(files, mnist_cloud, text, needle):
    project, _ = files
    (project / "pyproject.toml").write_text(text)
    out = run_cli([*mnist_cloud, "config"], cwd=project / "src")
    assert_user_error(out, needle, str(project / "pyproject.toml"))


def test_an_unrelated_pyproject_that_does_not_parse_blocks_nothing(files, mnist_cloud):
    """A cookiecutter template's pyproject.toml above the project is not ours: `stop` must still work."""
    project, _ = files
    (project / "pyproject.toml").write_text('[project]\nversion = {{ cookiecutter.version }}\n')
    out = run_cli([*mnist_cloud, "config"], cwd=project / "src")
    assert out.returncode == 0, out.stderr


def test_config_shows_each_value_and_where_it_came_from(files, mnist_cloud):
    project, home = files
    (project / "mnist-cloud.toml").write_text('model = "mynet.py:Net"\n')
    (home / "config.toml").write_text('autostop = 15\nnotify = "slack:https://hooks.slack.com/T/SECRET, https://x.io/h"\n')
    out = run_cli([*mnist_cloud, "config"], cwd=project / "src", env_extra={"MNIST_CLOUD_DEFAULT_EPOCHS": "7"})
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in out.stdout.splitlines()[1:]
            if not line.startswith("project file:")}
    # a webhook's URL is its secret: only its scheme and host are shown
    assert "SECRET" not in out.stdout and rows["notify"][0] == "slack:https://hooks.slack.com/…,"
    # a model file named in a settings file is relative to that file, wherever the command runs
    assert rows["model"] == [f"{project / 'mynet.py'}:Net", str(project / "mnist-cloud.toml")]
    assert rows["autostop"] == ["15.0", str(home / "config.toml")]
    assert rows["epochs"] == ["7", "environment ($MNIST_CLOUD_DEFAULT_EPOCHS)"]
    assert rows["instance"] == ["-", "default"]
    assert rows["tensorboard"] == ["false", "default"]  # as a settings file spells it

    # --json: every row of the table, typed (None for "-"), the URL still hidden, and the two files
    out = run_cli([*mnist_cloud, "config", "--json"], cwd=project / "src",
                  env_extra={"MNIST_CLOUD_DEFAULT_EPOCHS": "7"})
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert list(shown) == ["settings", "project_file", "user_file", "user_file_exists"]
    assert list(shown["settings"]) == list(rows)
    assert {k: (v["value"], v["source"]) for k, v in shown["settings"].items() if k != "notify"} == {
        k: (None if value == "-" else value, source) for k, (value, source) in rows.items() if k != "notify"} | {
        "autostop": (15.0, str(home / "config.toml")), "epochs": (7, "environment ($MNIST_CLOUD_DEFAULT_EPOCHS)"),
        "tensorboard": (False, "default")}
    assert "SECRET" not in out.stdout and shown["settings"]["notify"]["value"].startswith("slack:https://hooks.slack")
    assert (shown["project_file"], shown["user_file"], shown["user_file_exists"]) == (
        str(project / "mnist-cloud.toml"), str(home / "config.toml"), True)


def test_launch_takes_the_instance_type_and_autostop_from_the_project(tmp_path, mnist_cloud):
    with moto_server() as endpoint:
        seed_dlami()
        env = aws_env(tmp_path, AWS_ENDPOINT_URL=endpoint)
        refused = run_cli([*mnist_cloud, "launch", "--name", "cfg", "--ssh-cidr", "192.0.2.1/32"], env_extra=env,
                          cwd=tmp_path)
        assert_user_error(refused, "give --instance TYPE")
        (tmp_path / "mnist-cloud.toml").write_text('instance = "g4dn.xlarge"\nautostop = 12\nbudget = 4\n'
                                                   'notify = "slack:https://hooks.slack.com/T/SECRET"\n')
        out = run_cli([*mnist_cloud, "launch", "--name", "cfg", "--ssh-cidr", "192.0.2.1/32", "--no-wait-ssh"],
                      env_extra=env, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        status = run_cli([*mnist_cloud, "status", "cfg", "--wide"], env_extra=env, cwd=tmp_path)
        header, row = (line.replace("COST SO FAR", "COST").replace("PRICED BY", "PRICED_BY").split()
                       for line in status.stdout.splitlines()[:2])
        cells = dict(zip(header, row))
        assert (cells["TYPE"], cells["AUTOSTOP"], cells["BUDGET"]) == ("g4dn.xlarge", "12m:stop", "$0.00/$4"), \
            status.stdout  # BUDGET: spent/budget
        # the machine's own events go to the config's notify: its URL in the user data, never on the screen
        import base64
        import gzip

        import boto3

        ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="t",
                           aws_secret_access_key="t")
        (reservation,) = ec2.describe_instances(Filters=[{"Name": "tag:mnist-cloud:name", "Values": ["cfg"]}])["Reservations"]
        instance = reservation["Instances"][0]["InstanceId"]
        data = ec2.describe_instance_attribute(InstanceId=instance, Attribute="userData")["UserData"]["Value"]
        assert '{"urls": ["slack:https://hooks.slack.com/T/SECRET"]}' in gzip.decompress(base64.b64decode(data)).decode()
        assert "SECRET" not in out.stdout + out.stderr and "slack:https://hooks.slack.com/…" in out.stdout


@pytest.mark.slow
def test_train_takes_model_and_epochs_from_the_project(tmp_path, mnist_cloud, mnist_dir):
    (tmp_path / "mnist-cloud.toml").write_text('model = "seed002-gap"\nepochs = 1\n')
    out = run_cli([*mnist_cloud, "train", "--train-limit", "512", "--eval-limit", "200", "--no-report",
                   "--data-dir", str(mnist_dir)], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["model"], config["epochs"]) == ("seed002-gap", 1)


def test_a_resume_never_takes_the_files_model_or_epochs(files):
    """A resume's flags are its config.json's: not even an abbreviated --res gets the defaults added."""
    from infra.commands.train import with_defaults

    project, _ = files
    (project / "mnist-cloud.toml").write_text('model = "seed002-gap"\nepochs = 4\n')
    assert with_defaults(["--lr", "0.1"]) == ["--epochs", "4", "--model", "seed002-gap", "--lr", "0.1"]
    for resume in (["--resume", "runs/x"], ["--res", "runs/x"], ["--resume=runs/x"]):
        assert with_defaults(resume) == resume


def test_tensorboard_from_the_files_or_the_environment_unless_typed(files, monkeypatch):
    from infra import settings
    from infra.commands.train import with_defaults

    project, _ = files
    (project / "mnist-cloud.toml").write_text("tensorboard = true\n")
    assert with_defaults(["--lr", "0.1"]) == ["--tensorboard", "--lr", "0.1"]
    assert with_defaults(["--no-tensorboard"]) == ["--no-tensorboard"]  # a typed flag wins
    monkeypatch.setenv("MNIST_CLOUD_TENSORBOARD", "0")
    assert settings.resolve()["tensorboard"] == settings.Value(False, "environment ($MNIST_CLOUD_TENSORBOARD)")
    assert with_defaults(["--lr", "0.1"]) == ["--lr", "0.1"]
    monkeypatch.setenv("MNIST_CLOUD_TENSORBOARD", "maybe")
    with pytest.raises(settings.UserError, match="tensorboard must be true or false"):
        settings.resolve()
    monkeypatch.delenv("MNIST_CLOUD_TENSORBOARD")
    (project / "mnist-cloud.toml").write_text('tensorboard = "yes"\n')
    with pytest.raises(settings.UserError, match="tensorboard must be true or false, got 'yes'"):
        settings.resolve()


def test_the_project_is_found_from_a_subdirectory(files):
    """Run from src/ (or a checkout's notebooks/), the whole project is synced, not the subdirectory."""
    from infra.targets import code_dir

    project, _ = files
    assert code_dir() == project.resolve()  # the fixture works in project/src, beside its pyproject.toml
