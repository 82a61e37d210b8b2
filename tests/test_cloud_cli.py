"""`mnist-cloud launch/status/stop/start/down` as subprocesses against a moto server on 127.0.0.1."""

from __future__ import annotations

import functools
import json
import stat
import urllib.request

import pytest

from fixtures.aws import DLAMI_ID, aws_env, ec2_client, moto_server, seed_dlami
from fixtures.cli import assert_user_error, run_cli


@pytest.fixture(scope="module")
def loopback_moto():
    """A moto server on 127.0.0.1 whose instances' public IPs are loopback: nothing here leaves the machine."""
    with moto_server() as url:
        yield url


@pytest.fixture
def moto_cli(loopback_moto, ip_service, tmp_path, mnist_cloud):
    """moto_cli(*args) runs mnist-cloud against a freshly reset, DLAMI-seeded moto server."""
    urllib.request.urlopen(urllib.request.Request(f"{loopback_moto}/moto-api/reset", method="POST")).read()
    seed_dlami()
    env = aws_env(tmp_path, AWS_ENDPOINT_URL=loopback_moto, MNIST_CLOUD_IP_URL=ip_service)

    def run(*args, extra_env=None):
        if args and args[0] == "launch":
            # no SSH here: moto's instances have made-up public IPs that must never be contacted
            args = (*args, "--no-wait-ssh")
        return run_cli([*mnist_cloud, *args], env_extra={**env, **(extra_env or {})}, cwd=tmp_path)

    run.home = tmp_path / "mnist-cloud-home"
    run.endpoint = loopback_moto
    return run


def started_hours_ago(endpoint, name: str, hours: float) -> None:
    """Move the launch time of `name`'s instance back, in the moto server's own backend (it runs in this
    process), so `status` sees an instance that has been up for `hours`."""
    from datetime import timedelta

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    tagged = [{"Name": "tag:mnist-cloud:name", "Values": [name]}]
    [iid] = [i["InstanceId"] for r in ec2_client(endpoint).describe_instances(Filters=tagged)["Reservations"]
             for i in r["Instances"]]
    inst = ec2_backends[DEFAULT_ACCOUNT_ID]["us-east-1"].get_instance(iid)
    inst.launch_time -= timedelta(hours=hours)


def status_row(cloud, name: str, extra_env=None) -> dict[str, str]:
    """`mnist-cloud status NAME --wide`'s row, by column."""
    out = cloud("status", name, "--wide", extra_env=extra_env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = lines[0].replace("COST SO FAR", "COST").replace("PRICED BY", "PRICED_BY").split()
    [row] = [l.split() for l in lines[1:] if l.startswith(name + " ")]
    assert len(row) == len(header), lines
    return dict(zip(header, row))


@pytest.mark.slow
def test_launch_status_stop_start_down(moto_cli):
    out = moto_cli("launch", "--instance", "g4dn.xlarge", "--name", "exp1")
    assert out.returncode == 0, out.stderr
    assert f"AMI {DLAMI_ID}" in out.stdout and "newest PyTorch DLAMI" in out.stdout
    assert "SSH (22) from 198.51.100.23/32 only" in out.stdout
    assert "ready: exp1" in out.stdout and "mnist-cloud down exp1" in out.stdout
    key = moto_cli.home / "keys" / "mnist-cloud-exp1.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().splitlines()[1] not in out.stdout + out.stderr

    # cost so far = hours up x the hourly price: here from the user's prices.json, at a price no table has
    prices = moto_cli.home.parent / "prices.json"
    prices.write_text(json.dumps({"g4dn.xlarge": 1.234}))
    started_hours_ago(moto_cli.endpoint, "exp1", 10)
    row = status_row(moto_cli, "exp1", extra_env={"MNIST_CLOUD_PRICES": str(prices)})
    assert row["TYPE"] == "g4dn.xlarge" and row["STATE"] == "running" and row["LIFECYCLE"] == "on-demand"
    assert row["UPTIME"] == "10h00m" and row["COST"] == f"${10 * 1.234:.2f}" == "$12.34"
    assert row["AUTOSTOP"] == "30m:stop"

    again = moto_cli("launch", "--instance", "g4dn.xlarge", "--name", "exp1")
    assert again.returncode == 0 and "already exists" in again.stdout
    assert len([l for l in moto_cli("ls").stdout.splitlines() if l.startswith("exp1")]) == 1

    assert moto_cli("stop", "exp1").returncode == 0
    stopped = status_row(moto_cli, "exp1")
    assert stopped["STATE"] == "stopped" and stopped["UPTIME"] == "-" and stopped["COST"] == "$0.00"  # disk only
    started = moto_cli("start", "exp1")
    assert started.returncode == 0 and "running" in started.stdout

    # moto's instances here have no SSH: nothing can check them for unpulled runs, so down refuses
    assert_user_error(moto_cli("down", "exp1", "--yes"), "exp1 cannot be checked", "--discard-runs")
    assert "running" in moto_cli("status", "exp1").stdout
    down = moto_cli("down", "exp1", "--yes", "--discard-runs")
    assert down.returncode == 0, down.stderr
    assert "1 instance(s)" in down.stdout and "1 key pair(s)" in down.stdout
    assert "no instances" in moto_cli("status").stdout
    assert not key.exists()
    assert "nothing to delete" in moto_cli("down", "exp1", "--yes").stdout


@pytest.mark.slow
def test_spot_launch_and_down_all(moto_cli):
    assert moto_cli("launch", "--instance", "g4dn.xlarge", "--name", "a", "--spot").returncode == 0
    assert moto_cli("launch", "--instance", "g5.xlarge", "--name", "b", "--ssh-cidr", "192.0.2.1/32").returncode == 0
    assert status_row(moto_cli, "a")["LIFECYCLE"] == "spot"
    # without prices.json: the built-in table, us-east-1's on-demand list price of a g5.xlarge ($1.006/h)
    started_hours_ago(moto_cli.endpoint, "b", 3)
    b = status_row(moto_cli, "b")
    assert b["UPTIME"] == "3h00m" and b["COST"] == f"${3 * 1.006:.2f}" == "$3.02"
    down = moto_cli("down", "--all", "--yes", "--discard-runs")  # no SSH here to check them for runs
    assert down.returncode == 0 and "2 instance(s)" in down.stdout
    ec2 = ec2_client(moto_cli.endpoint)
    tagged = [{"Name": "tag-key", "Values": ["mnist-cloud:name"]}]
    alive = [i for r in ec2.describe_instances(Filters=tagged)["Reservations"] for i in r["Instances"]
             if i["State"]["Name"] != "terminated"]
    assert alive == [] and ec2.describe_security_groups(Filters=tagged)["SecurityGroups"] == []
    assert ec2.describe_key_pairs(Filters=tagged)["KeyPairs"] == []


@pytest.mark.slow
def test_terminated_behind_our_back(moto_cli):
    assert moto_cli("launch", "--instance", "g4dn.xlarge", "--name", "gone",
                    "--ssh-cidr", "192.0.2.1/32").returncode == 0
    ec2 = ec2_client(moto_cli.endpoint)
    ids = [i["InstanceId"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
    ec2.terminate_instances(InstanceIds=ids)
    status = moto_cli("status", "gone")
    assert status.returncode == 0 and "gone" in status.stdout.split("\n")[1]
    down = moto_cli("down", "gone", "--yes")
    assert down.returncode == 0 and "1 security group(s)" in down.stdout
    assert "nothing to delete" in moto_cli("down", "gone", "--yes").stdout


def test_down_without_yes_off_a_terminal_changes_nothing(moto_cli):
    assert moto_cli("launch", "--instance", "g4dn.xlarge", "--name", "keep",
                    "--ssh-cidr", "192.0.2.1/32").returncode == 0
    assert_user_error(moto_cli("down", "keep"), "needs --yes")
    assert "running" in moto_cli("status", "keep").stdout


@pytest.mark.parametrize("args,env,needles", [
    (["launch", "--instance", "g9.huge"], {}, ["unknown instance type 'g9.huge'"]),
    (["launch", "--instance", "g4dn.xlarge", "--region", "mars-1"],
     {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}, ["cannot reach AWS", "--region ('mars-1'"]),
    (["launch", "--instance", "g4dn.xlarge"], {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""},
     ["no AWS credentials"]),
    (["launch", "--instance", "g4dn.xlarge", "--ssh-cidr", "my-laptop"], {}, ["is not a CIDR"]),
    (["launch", "--instance", "g4dn.xlarge", "--name", "Bad_Name"], {}, ["lowercase letters"]),
    (["launch", "--instance", "g4dn.xlarge", "--disk-gb", "2"], {}, ["--disk-gb"]),
    (["launch"], {}, ["--instance"]),
    (["stop", "ghost"], {}, ["no instance named 'ghost'"]),
    (["start", "ghost"], {}, ["no instance named 'ghost'"]),
    (["down"], {}, ["give a NAME, or --all"]),
    (["attach", "--host", "me@127.0.0.1:1"], {}, ["--key"]),
    (["attach", "--host", "not-a-target", "--key", "/etc/hostname"], {}, ["expected USER@HOST"]),
    (["attach", "i-0123456789abcdef0"], {}, ["no instance i-0123456789abcdef0"]),
    (["status", "--bogus"], {}, ["unrecognized arguments: --bogus"]),
])
def test_bad_input(moto_cli, args, env, needles):
    proc = moto_cli(*args, extra_env=env)
    assert_user_error(proc, *needles)
    ec2 = ec2_client(moto_cli.endpoint)
    assert [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]] == []  # nothing launched


def test_launch_notify_urls_reach_the_runs_and_survive_a_stop_and_start(moto_cli, monkeypatch):
    """The job that runs a `train --on` is the login's, which cannot read root's copy of launch's URLs: the
    laptop keeps them with the name (state.json, mode 600) and gives them to every run that names none."""
    url = "https://ntfy.example.com/s3cr3t-topic"
    out = moto_cli("launch", "--instance", "g4dn.xlarge", "--name", "hooked", "--notify", f"ntfy:{url}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "s3cr3t" not in out.stdout + out.stderr and "of each run's end" in out.stdout

    def kept() -> list[str]:
        state = moto_cli.home / "state.json"
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        return json.loads(state.read_text())["hosts"]["hooked"]["extra"].get("notify")

    assert kept() == [f"ntfy:{url}"]
    assert moto_cli("stop", "hooked").returncode == 0 and moto_cli("start", "hooked").returncode == 0
    assert kept() == [f"ntfy:{url}"]  # a start records the name again, and keeps what it had

    # train --on without URLs of its own gives the run launch's; its own replace them
    import infra.runner
    from infra.commands.train import cmd_train

    monkeypatch.setenv("MNIST_CLOUD_HOME", str(moto_cli.home))
    monkeypatch.chdir(moto_cli.home.parent)
    jobs = []
    monkeypatch.setattr(infra.runner, "train_remote", lambda job, log: jobs.append(job) or 0)
    args = type("Args", (), {"region": None, "profile": None})()
    assert cmd_train(args, ["--on", "hooked", "--epochs", "1"]) == 0
    assert cmd_train(args, ["--on", "hooked", "--epochs", "1", "--notify", "https://other.example.com/h"]) == 0
    assert [job.notify for job in jobs] == [[f"ntfy:{url}"], ["https://other.example.com/h"]]

