"""Fault injection and cost safety, end to end with the real sshd and moto server: each test asserts
that nothing is lost."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures import REPO
from fixtures.aws import launch_fresh
from fixtures.cli import assert_user_error, wait_for
from fixtures.instance import FakeImds, load_agent
from fixtures.runs import epochs_written

# ~5 s epochs on 2 CPU cores: long enough to interrupt in the middle
LONG = ["--device", "cpu", "--epochs", "3", "--train-limit", "6144", "--eval-limit", "500", "--no-report"]


# ---------------------------------------------------------------------------------- the watchdog's policy
NOW = 100_000.0


@pytest.mark.parametrize("case,config,state,trainer,ptys,expected", [
    ("just booted", {"idle_minutes": 30}, {}, False, 0, None),
    ("idle long enough", {"idle_minutes": 30}, {"last_active": 0}, False, 0, "shutdown"),
    ("idle, not yet", {"idle_minutes": 30}, {"last_active": NOW - 29 * 60}, False, 0, None),
    ("training", {"idle_minutes": 30}, {"last_active": 0}, True, 0, None),
    ("someone logged in", {"idle_minutes": 30}, {"last_active": 0}, False, 1, None),
    ("disabled", {"idle_minutes": 30, "enabled": False}, {"last_active": 0}, False, 0, None),
    ("zero minutes = never", {"idle_minutes": 0}, {"last_active": 0}, False, 0, None),
    ("after a run ends and the grace period", {"idle_minutes": 0, "after_train": True},
     {"last_active": NOW - 3 * 60, "seen_trainer": True}, False, 0, "shutdown"),
    ("a run just ended: grace period, time to pull it", {"idle_minutes": 0, "after_train": True},
     {"last_active": NOW - 10, "seen_trainer": True}, False, 0, None),
    ("a grace period shorter than 3 min is 3 min", {"idle_minutes": 0, "after_train": True, "grace_minutes": 0.5},
     {"last_active": NOW - 60, "seen_trainer": True}, False, 0, None),
    ("a longer grace period", {"idle_minutes": 0, "after_train": True, "grace_minutes": 10},
     {"last_active": NOW - 5 * 60, "seen_trainer": True}, False, 0, None),
    ("after_train waits for a run", {"idle_minutes": 0, "after_train": True}, {"last_active": 0}, False, 0, None),
    ("after_train, run still going", {"idle_minutes": 0, "after_train": True}, {"seen_trainer": True}, True, 0, None),
])
def test_watchdog_decision(case, config, state, trainer, ptys, expected):
    autostop = load_agent("autostop")
    action, new_state, reason = autostop.decide(NOW, config, state, trainer, ptys)
    assert action == expected, (case, reason)
    if trainer or ptys:
        assert new_state["last_active"] == NOW  # activity resets the idle clock
    if trainer:
        assert new_state["seen_trainer"]


# notty: SSH sessions without a terminal running a command (pull, sync); unpulled: runs not pulled yet
@pytest.mark.parametrize("case,config,state,notty,unpulled,expected,says", [
    ("a pull is running", {"idle_minutes": 30}, {"last_active": 0}, 1, [], None, "without a terminal"),
    ("a pull during the grace period", {"idle_minutes": 0, "after_train": True},
     {"last_active": 0, "seen_trainer": True}, 1, [], None, "without a terminal"),
    ("terminate, all pulled", {"idle_minutes": 30, "action": "terminate"}, {"last_active": 0}, 0, [], "shutdown",
     "idle for"),
    ("terminate with unpulled runs: stop instead", {"idle_minutes": 30, "action": "terminate",
                                                    "shutdown_behavior": "stop"},
     {"last_active": 0}, 0, ["r1"], "shutdown", "stopping instead of terminating: 1 run(s) not pulled (r1)"),
    ("terminate with unpulled runs, EC2 still set to terminate: stay up",
     {"idle_minutes": 30, "action": "terminate"}, {"last_active": 0}, 0, ["r1", "r2"], None, "staying up"),
    ("after_train, terminate, unpulled", {"idle_minutes": 0, "after_train": True, "action": "terminate",
                                          "shutdown_behavior": "stop"},
     {"last_active": NOW - 3 * 60, "seen_trainer": True}, 0, ["r1"], "shutdown", "stopping instead"),
    ("stop: unpulled runs are safe on the disk", {"idle_minutes": 30}, {"last_active": 0}, 0, ["r1"], "shutdown",
     "idle for"),
    ("terminate wished, EC2 set to stop (runs were unpulled): says what happens",
     {"idle_minutes": 30, "action": "terminate", "shutdown_behavior": "stop"}, {"last_active": 0}, 0, [],
     "shutdown", "EC2 will stop it"),
])
def test_watchdog_decision_sessions_and_unpulled_runs(case, config, state, notty, unpulled, expected, says):
    autostop = load_agent("autostop")
    action, new_state, reason = autostop.decide(NOW, config, state, False, 0, notty_sessions=notty,
                                                unpulled=unpulled)
    assert action == expected and says in reason, (case, reason)
    if notty:
        assert new_state["last_active"] == NOW  # a pull or sync resets the idle clock


@pytest.mark.parametrize("old_state", [
    {"boot": "before-stop", "last_active": 0},  # stopped for days: not idle time of this boot
    {"boot": "before-stop", "last_active": NOW - 5 * 60, "seen_trainer": True},  # a run of the last boot
])
def test_watchdog_forgets_the_state_of_an_earlier_boot(old_state):
    autostop = load_agent("autostop")
    config = {"idle_minutes": 30, "after_train": True}
    action, state, reason = autostop.decide(NOW, config, old_state, False, 0, boot="after-start")
    assert action is None, reason
    assert state == {"boot": "after-start", "last_active": NOW}
    # the same state within the same boot still fires: the boot check is what saved it above
    assert autostop.decide(NOW, config, {**old_state, "boot": "b"}, False, 0, boot="b")[0] == "shutdown"


def test_watchdog_under_cron_reads_the_real_root(tmp_path):
    """cron runs it as `MNIST_CLOUD_ROOT= python3 ...`: empty means /, not the working directory."""
    script = REPO / "infra" / "agent" / "autostop.py"
    code = "import runpy,sys; m=runpy.run_path(sys.argv[1]); print(m['CONFIG'])"
    out = subprocess.run([sys.executable, "-c", code, str(script)], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "MNIST_CLOUD_ROOT": ""})
    assert out.stdout.strip() == "/etc/mnist-cloud/autostop.json", out.stderr


@pytest.fixture(scope="module")
def launched(cli, ssh_host_moto):
    launch_fresh(cli, ssh_host_moto, "rel")
    return "rel"


def remote_dir(host, name="rel") -> Path:
    return host.home / "mnist-cloud" / name


# ---------------------------------------------------------------------------------- the watchdog, for real
def test_watchdog_fires_only_when_idle(cli, launched, ssh_host, tmp_path, mnist_dir, laptop_env):
    """The real script on the test host, a fake `shutdown` on PATH: it fires after the idle time, and
    never while a run or an interactive (pty) session is alive. The test host has its own PID
    namespace and terminals, so nothing else on this machine counts; idle time is made by backdating
    the watchdog's state file and the terminal's last input, not by sleeping."""
    from infra.remote import Endpoint, Remote
    from infra.state import State
    from infra.watchdog import AutostopConfig, install_over_ssh

    root = tmp_path / "root"
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    fired = tmp_path / "shutdown-called"
    (fakebin / "shutdown").write_text(f"#!/bin/sh\necho \"$@\" >> {fired}\n")
    (fakebin / "shutdown").chmod(0o755)
    state_file = root / "var/lib/mnist-cloud/autostop-state.json"

    def backdate(minutes: float) -> None:
        """As if the last activity the watchdog saw was `minutes` ago."""
        state = json.loads(state_file.read_text())
        state_file.write_text(json.dumps({**state, "last_active": time.time() - minutes * 60}))

    def ptys() -> list[str]:
        return [p for p in ssh_host.exec("ls /dev/pts").stdout.split() if p.isdigit()]

    os.environ["MNIST_CLOUD_HOME"] = laptop_env["MNIST_CLOUD_HOME"]
    h = State().get(launched)
    ep = Endpoint(name=launched, host=h.host, user=h.user, key_path=h.key_path, alias=h.instance_id)
    with Remote(ep) as remote:
        out = install_over_ssh(remote, AutostopConfig(idle_minutes=30), root=str(root))
        assert "cron entry installed" in out
        assert (root / "etc/cron.d/mnist-cloud-autostop").read_text().startswith("* * * * * root")
        check = (f"MNIST_CLOUD_ROOT={root} PATH={fakebin}:$PATH python3 {root}/usr/local/bin/mnist-cloud-autostop")

        def tick():
            return remote.run(check).stdout

        assert "idle for" in tick() and not fired.exists()  # the first look starts the clock
        backdate(29)
        assert "-> shutdown" not in tick() and not fired.exists()
        backdate(31)
        assert "-> shutdown" in tick() and fired.read_text().startswith("-h now")

        # a training run keeps it up
        fired.unlink()
        install_over_ssh(remote, AutostopConfig(idle_minutes=30), root=str(root))
        start = cli("train", "--on", launched, *LONG, "--epochs", "2", "--data-dir", str(mnist_dir),
                    "--run-id", "busy", "--detach")
        assert start.returncode == 0, start.stderr
        wait_for(lambda: "a trainer is running" in tick(), timeout=60, step=0.5)
        backdate(60)
        assert "a trainer is running" in tick() and not fired.exists()
        wait_for(lambda: (remote_dir(ssh_host) / "jobs" / "busy.exit").exists(), timeout=300, step=1)
        assert not fired.exists()

        # an interactive session (a pty) keeps it up while used; a tunnel-like session without one does not count
        assert ptys() == []
        pty = subprocess.Popen([*remote.ssh_argv(tty=True), "-tt", remote.target(), "sleep 60"],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: ptys(), timeout=30)
            install_over_ssh(remote, AutostopConfig(idle_minutes=30), root=str(root))  # restart the clock
            assert "interactive session" in tick()
            backdate(60)
            assert "interactive session" in tick() and not fired.exists()
            # still open, but no input for longer than the idle time (its atime, as `w` reads it): idle
            for name in ptys():
                assert ssh_host.exec(f"touch -a -d @{int(time.time()) - 31 * 60} /dev/pts/{name}").returncode == 0
            backdate(31)
            said = tick()
            assert "-> shutdown" in said and fired.exists(), said
        finally:
            pty.kill()
            pty.wait()
        fired.unlink()
        tick()
        backdate(31)
        assert "-> shutdown" in tick() and fired.exists()


def test_a_budget_reaches_the_machine_and_stops_it_with_the_run_checkpointed(cli, launched, ssh_host, mnist_dir,
                                                                             tmp_path):
    """`budget NAME USD` writes it (and the price) into the installed watchdog's config; at 100% the watchdog
    SIGTERMs the live run, which saves its last epoch, then shuts down as autostop does (a fake `shutdown` on
    PATH). Spend is made by backdating the uptime of earlier boots in its budget state, not by waiting."""
    root = ssh_host.dir / "root"  # sshd gives the sessions MNIST_CLOUD_ROOT=<host dir>/root
    config_file, budget_state = root / "etc/mnist-cloud/autostop.json", root / "var/lib/mnist-cloud/budget-state.json"
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    fired = tmp_path / "shutdown-called"
    (fakebin / "shutdown").write_text(f"#!/bin/sh\necho \"$@\" >> {fired}\n")
    (fakebin / "shutdown").chmod(0o755)

    def tick() -> str:
        out = ssh_host.exec(f"MNIST_CLOUD_ROOT={root} PATH={fakebin}:$PATH python3 {root}/usr/local/bin/mnist-cloud-autostop")
        return out.stdout + out.stderr

    try:
        set_it = cli("budget", launched, "8")
        assert set_it.returncode == 0 and "has a $8 budget now" in set_it.stdout, set_it.stdout + set_it.stderr
        config = json.loads(config_file.read_text())
        assert config["budget_usd"] == 8 and config["usd_per_hour"] > 0, config
        raised = cli("budget", launched, "9.5")
        assert raised.returncode == 0 and json.loads(config_file.read_text())["budget_usd"] == 9.5
        assert cli("autostop", launched, "-i", "30").returncode == 0  # installs the watchdog again
        assert json.loads(config_file.read_text())["budget_usd"] == 9.5

        start = cli("train", "--on", launched, *LONG, "--data-dir", str(mnist_dir), "--run-id", "over", "--detach")
        assert start.returncode == 0, start.stderr
        run_dir = remote_dir(ssh_host) / "runs" / "over"
        wait_for(lambda: epochs_written(run_dir) == [1], timeout=120)
        assert "-> shutdown" not in tick() and not fired.exists()
        # as if this boot had been up for 85% of the budget's hours: the live run is warned, once, and goes on
        hours = 0.85 * 9.5 / json.loads(config_file.read_text())["usd_per_hour"]
        (root / "proc").mkdir(exist_ok=True)
        (root / "proc" / "uptime").write_text(f"{hours * 3600:.2f} 0.00\n")  # the watchdog reads <root>/proc/uptime
        said = tick() + tick()
        assert "-> shutdown" not in said and not fired.exists(), said
        log = (remote_dir(ssh_host) / "jobs" / "over.log").read_text()
        assert log.count("mnist-cloud budget: warning: spent $8.0") == 1, log[-2000:]
        # as if up for 100 h across earlier boots: far over $9.50 at any GPU's price
        budget_state.write_text(json.dumps({**json.loads(budget_state.read_text()), "before_s": 100 * 3600}))
        said = tick()
        assert "budget reached" in said and "-> shutdown" in said, said
        assert fired.read_text().startswith("-h now mnist-cloud autostop: budget reached"), fired.read_text()
        assert (remote_dir(ssh_host) / "jobs" / "over.exit").exists()  # it waited for the run to end
        assert json.loads((run_dir / "config.json").read_text())["status"] == "interrupted"
        assert (run_dir / "last.pt").exists() and 1 <= max(epochs_written(run_dir)) < 3
        assert "mnist-cloud budget: stopped" in (remote_dir(ssh_host) / "jobs" / "over.log").read_text()

        # raised, the budget lets the run go on from its checkpoint to its end, and the machine stays up
        assert cli("budget", launched, "100000").returncode == 0
        resumed = cli("train", "--on", launched, "--resume", "over", "--no-desktop-notify")
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        assert json.loads((run_dir / "config.json").read_text())["status"] == "completed"
        assert epochs_written(run_dir) == [1, 2, 3]
        shut = fired.read_text()
        assert "-> shutdown" not in tick() and fired.read_text() == shut

        # changed while the machine is stopped (only its tag can be), the budget reaches the watchdog at `start`
        assert cli("stop", launched).returncode == 0
        assert cli("budget", launched, "12").returncode == 0
        assert json.loads(config_file.read_text())["budget_usd"] == 100000
        started = cli("start", launched, "--ssh-cidr", "127.0.0.1/32")
        assert started.returncode == 0, started.stdout + started.stderr
        assert json.loads(config_file.read_text())["budget_usd"] == 12
    finally:
        (root / "proc" / "uptime").unlink(missing_ok=True)
        assert cli("budget", launched, "none").returncode == 0
    assert json.loads(config_file.read_text())["budget_usd"] is None


@pytest.mark.slow
def test_autostop_command_changes_it_and_status_shows_it(cli, launched, ssh_host_moto, ssh_host):
    import boto3

    for line in cli("runs", launched).stdout.splitlines()[1:]:  # earlier tests' runs: all pulled
        assert cli("pull", launched, line.split()[0]).returncode == 0
    out = cli("autostop", launched, "-i", "10", "--down")
    assert out.returncode == 0, out.stderr
    ec2 = boto3.client("ec2", endpoint_url=ssh_host_moto, region_name="us-east-1", aws_access_key_id="t",
                       aws_secret_access_key="t")
    iid = next(i["InstanceId"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
               if any(t["Value"] == launched for t in i.get("Tags", [])) and i["State"]["Name"] == "running")
    attr = ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior")
    assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    wide = cli("status", launched, "--wide").stdout.splitlines()  # AUTOSTOP: a --wide column
    assert "10m:terminate" in next(l for l in wide if l.startswith(launched))
    # what the watchdog on the machine will read (sshd gives sessions MNIST_CLOUD_ROOT=<host dir>/root)
    installed = ssh_host.dir / "root" / "etc" / "mnist-cloud" / "autostop.json"

    def on_machine() -> dict:
        return json.loads(installed.read_text())

    assert {k: on_machine()[k] for k in ("enabled", "idle_minutes", "action")} == {
        "enabled": True, "idle_minutes": 10, "action": "terminate"}
    # with a run not pulled yet, EC2 must stop it instead (the instance cannot change this itself)
    run_dir = remote_dir(ssh_host) / "runs" / "unpulled-one"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    try:
        assert cli("autostop", launched, "-i", "10", "--down").returncode == 0
        attr = ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior")
        assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "stop"
        assert on_machine()["action"] == "terminate" and on_machine()["shutdown_behavior"] == "stop"
    finally:
        (run_dir / "config.json").unlink()
        run_dir.rmdir()
    assert cli("autostop", launched, "--cancel").returncode == 0
    wide = cli("status", launched, "--wide").stdout.splitlines()
    assert " off" in next(l for l in wide if l.startswith(launched))
    assert on_machine()["enabled"] is False
    assert_user_error(cli("autostop", launched), "-i MIN")


def test_launch_installs_the_watchdog_by_user_data(cli, launched, ssh_host_moto):
    import base64
    import gzip

    import boto3

    ec2 = boto3.client("ec2", endpoint_url=ssh_host_moto, region_name="us-east-1", aws_access_key_id="t",
                       aws_secret_access_key="t")
    iid = next(i["InstanceId"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
               if any(t["Value"] == launched for t in i.get("Tags", [])))
    data = ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")["UserData"]["Value"]
    script = gzip.decompress(base64.b64decode(data)).decode()  # cloud-init unpacks gzip by itself
    assert "mnist-cloud-autostop" in script and '"idle_minutes": 30' in script and "systemctl enable --now" in script


# ---------------------------------------------------------------------------------- fault injection
@pytest.mark.slow
def test_1_ssh_connection_killed_mid_training(cli, launched, ssh_host, mnist_cloud, project_checkout, laptop_env,
                                              mnist_dir):
    proc = subprocess.Popen([*mnist_cloud, "train", "--on", launched, *LONG, "--data-dir", str(mnist_dir),
                             "--run-id", "cut"], cwd=project_checkout, env={**os.environ, **laptop_env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = remote_dir(ssh_host) / "runs" / "cut"
    wait_for(lambda: epochs_written(run_dir) == [1])
    ssh_host.kill_connections()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "keeps training on rel" in err + out, (out, err)
    follow = cli("logs", launched, "cut", "-f")  # reattach: streams to the end
    assert follow.returncode == 0 and "Epoch: 3 |" in follow.stdout and "finished with exit 0" in follow.stdout
    pulled = cli("pull", launched, "cut")
    assert pulled.returncode == 0
    assert epochs_written(project_checkout / "runs" / "cut") == [1, 2, 3]


@pytest.mark.slow
def test_2_sigkill_mid_epoch_then_resume_redoes_at_most_one_epoch(cli, launched, ssh_host, project_checkout, mnist_dir):
    start = cli("train", "--on", launched, *LONG, "--data-dir", str(mnist_dir), "--run-id", "killed", "--detach")
    assert start.returncode == 0, start.stderr
    run_dir = remote_dir(ssh_host) / "runs" / "killed"
    # epoch 2 under way (how far depends on the CPU), after epoch 1's checkpoint: its row is written just
    # before it, and on a loaded machine a kill between the two left a run with nothing to resume from
    wait_for(lambda: epochs_written(run_dir) == [1] and (run_dir / "last.pt").exists())
    # the trainer itself, not its wrapper shell (which must live on to record the exit code); looked
    # up on the machine, so a run of the same name elsewhere on this computer is never touched
    killed = ssh_host.exec(r"pkill -KILL -e -f '^\S*python\S* -m trainer train .*--run-id killed'")
    assert killed.returncode == 0 and "killed" in killed.stdout, "trainer process not found"
    wait_for(lambda: (remote_dir(ssh_host) / "jobs" / "killed.exit").exists(), timeout=30)
    assert (remote_dir(ssh_host) / "jobs" / "killed.exit").read_text().strip() == "137"
    done = max(epochs_written(run_dir))  # the last epoch whose row was written before the kill
    assert done < 3, "the run finished before the kill; the test needs a longer run"
    resumed = cli("train", "--on", launched, "--resume", "killed")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    at = re.search(r"resuming \S*killed from \S+ at the end of epoch (\d+)", resumed.stdout)
    # the row is written just before the checkpoint: a kill between the two redoes that one epoch
    assert at and int(at[1]) in (done - 1, done) and int(at[1]) >= 1, resumed.stdout
    assert epochs_written(project_checkout / "runs" / "killed") == [1, 2, 3]  # every epoch exactly once


@pytest.mark.slow
def test_3_spot_notice_checkpoints_and_resume_continues(cli, launched, ssh_host, project_checkout, mnist_dir,
                                                        mnist_cloud, laptop_env):
    imds = FakeImds(f"{ssh_host.subnet}.1")
    try:
        out = cli("launch", "--instance", "g4dn.xlarge", "--name", "spot", "--spot", "--ssh-cidr", "192.0.2.10/32")
        assert out.returncode == 0 and ", spot)" in out.stdout, out.stdout + out.stderr
        # poll every 0.5 s (default 5 s), so the notice lands long before epochs 2-3 end on any machine
        run_env = {**os.environ, **laptop_env, "MNIST_CLOUD_IMDS_URL": imds.url, "MNIST_CLOUD_SPOT_POLL": "0.5"}
        proc = subprocess.Popen([*mnist_cloud, "train", "--on", "spot", *LONG, "--train-limit", "12288",
                                 "--data-dir", str(mnist_dir),
                                 "--run-id", "preempted"], cwd=project_checkout, env=run_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        run_dir = remote_dir(ssh_host, "spot") / "runs" / "preempted"
        wait_for(lambda: epochs_written(run_dir) == [1])
        noticed = time.monotonic()
        imds.notice = {"action": "terminate", "time": "2026-11-22T12:00:00Z"}
        watch_log = remote_dir(ssh_host, "spot") / "jobs" / "preempted.spot-watch.log"
        try:
            wait_for(lambda: json.loads((run_dir / "config.json").read_text())["status"] == "interrupted", timeout=30)
        except AssertionError:
            raise AssertionError(f"no interruption; spot watcher said: "
                                 f"{watch_log.read_text() if watch_log.exists() else '(no log)'}") from None
        assert time.monotonic() - noticed < 0.5 + 10  # one poll, then the checkpoint within 10 s
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, (out, err)
        assert "--resume preempted" in out
        local = project_checkout / "runs" / "preempted"
        assert (local / "last.pt").exists() and json.loads((local / "config.json").read_text())["status"] == "interrupted"
        assert imds.unauthorized == 0  # every GET carried the IMDSv2 token

        imds.notice = None
        resumed = subprocess.run([*mnist_cloud, "train", "--on", "spot", "--resume", "preempted"], cwd=project_checkout,
                                 env=run_env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert epochs_written(local) == [1, 2, 3]
        events = [r for r in map(json.loads, (local / "metrics.jsonl").read_text().splitlines()) if "event" in r]
        stopped, restarted = events[-2], events[-1]
        assert stopped["event"] == "interrupted" and restarted["event"] == "resumed"
        # it continued exactly where it stopped: the same step of the same epoch, nothing redone
        if "step" in stopped["at"]:
            epoch, step = map(int, stopped["at"].replace("epoch ", "").split(" step "))
            assert (restarted["epoch"], restarted["step"]) == (epoch, step) and step > 0
        else:
            assert (restarted["epoch"], restarted["step"]) == (int(stopped["at"].split()[-1]) + 1, 0)
    finally:
        imds.close()
        cli("down", "spot", "--yes")


@pytest.mark.slow
def test_resume_on_a_new_instance_pushes_the_local_run(cli, launched, ssh_host, project_checkout, mnist_dir):
    """The instance is gone (here: its work dir wiped), the laptop still has the run: it goes up first."""
    start = cli("train", "--on", launched, *LONG, "--epochs", "2", "--data-dir", str(mnist_dir),
                "--run-id", "moved", "--stop-after", "1")
    assert start.returncode == 0, start.stdout + start.stderr
    import shutil

    shutil.rmtree(remote_dir(ssh_host) / "runs" / "moved")
    resumed = cli("train", "--on", launched, "--resume", "moved")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "pushed the local copy" in resumed.stdout
    assert epochs_written(project_checkout / "runs" / "moved") == [1, 2]


def test_4_interrupted_pull_leaves_no_half_file(cli, launched, ssh_host, project_checkout, mnist_cloud, laptop_env):
    """A pull killed mid-file: never a half file under the real name, and the next pull removes the
    temp file the killed one left (the project's own cleanup: rsync does not) and completes."""
    run_dir = remote_dir(ssh_host) / "runs" / "halfpull"  # its own run: no other test has to run first
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text('{"run_id": "halfpull", "status": "completed"}')
    big = run_dir / "big.bin"
    big.write_bytes(os.urandom(6 * 1024 * 1024))
    local = project_checkout / "runs" / "halfpull"
    ssh_host.limit_rate("4mbit")  # 6 MiB take about 12 s: the kill below always lands mid-file
    try:
        proc = subprocess.Popen([*mnist_cloud, "pull", launched, "halfpull"], cwd=project_checkout,
                                env={**os.environ, **laptop_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)

        def temp_files() -> list[Path]:
            return [p for p in local.iterdir() if p.name.startswith(".big.bin.")] if local.is_dir() else []

        wait_for(lambda: temp_files() and temp_files()[0].stat().st_size > 0, timeout=60, step=0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        left = temp_files()
        assert left and left[0].stat().st_size < big.stat().st_size  # killed mid-file: its temp file stays
        assert not (local / "big.bin").exists()  # never a half file under its real name
    finally:
        ssh_host.limit_rate(None)
    again = cli("pull", launched, "halfpull")
    assert again.returncode == 0, again.stderr
    try:
        assert (local / "big.bin").read_bytes() == big.read_bytes()
        assert temp_files() == []  # the leftover was cleaned up, not kept beside the real file
    finally:
        shutil.rmtree(run_dir)  # pulled: nothing left unpulled for the module's later tests


def test_5_ctrl_c_during_launch_leaves_a_tagged_instance_that_down_removes(tmp_path, monkeypatch, ssh_host_moto):
    # against the module's moto server, not mock_aws(): that would reset the backends the server
    # shares, and every later test in the module would find its instance gone
    from fixtures.aws import aws_env, seed_dlami
    from infra import ec2 as P
    from infra.aws import Aws
    from infra.state import State

    for k, v in aws_env(tmp_path, AWS_ENDPOINT_URL=ssh_host_moto).items():
        monkeypatch.setenv(k, v)
    seed_dlami()  # as the module's earlier launches did: the test also runs alone
    aws = Aws()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # the user hits Ctrl-C while we wait for the instance

    real_wait = aws.wait
    aws.wait = interrupted
    with pytest.raises(KeyboardInterrupt):
        P.launch(aws, P.LaunchSpec(name="ctrlc", instance_type="g4dn.xlarge", ssh_cidr="192.0.2.1/32"),
                 log=lambda m: None)
    aws.wait = real_wait
    ec2 = aws.client("ec2")
    instances = [i for r in ec2.describe_instances(Filters=[{"Name": "tag:mnist-cloud:name", "Values": ["ctrlc"]}])
                 ["Reservations"] for i in r["Instances"]]
    assert len(instances) == 1
    assert {t["Key"]: t["Value"] for t in instances[0]["Tags"]}["mnist-cloud:name"] == "ctrlc"  # tagged at birth
    assert State().get("ctrlc").instance_id == instances[0]["InstanceId"]
    report = P.down(aws, "ctrlc", log=lambda m: None)
    assert report.terminated == [instances[0]["InstanceId"]]
    assert ec2.describe_instances(InstanceIds=[instances[0]["InstanceId"]])["Reservations"][0]["Instances"][0][
        "State"]["Name"] == "terminated"


def test_down_terminates_and_removes_what_launch_made(cli, launched, ssh_host_moto):
    """Its own machine, so it holds whatever order the tests run in; `down` must make it disappear."""
    import boto3

    ec2 = boto3.client("ec2", endpoint_url=ssh_host_moto, region_name="us-east-1", aws_access_key_id="t",
                       aws_secret_access_key="t")
    out = cli("launch", "--instance", "g4dn.xlarge", "--name", "gone", "--ssh-cidr", "192.0.2.10/32")
    assert out.returncode == 0, out.stdout + out.stderr
    tagged = [{"Name": "tag:mnist-cloud:name", "Values": ["gone"]}]
    [iid] = [i["InstanceId"] for r in ec2.describe_instances(Filters=tagged)["Reservations"] for i in r["Instances"]]
    assert ec2.describe_security_groups(Filters=tagged)["SecurityGroups"]
    assert ec2.describe_key_pairs(Filters=tagged)["KeyPairs"]
    down = cli("down", "gone", "--yes")
    assert down.returncode == 0, down.stdout + down.stderr
    state = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state == "terminated"
    assert not ec2.describe_security_groups(Filters=tagged)["SecurityGroups"]
    assert not ec2.describe_key_pairs(Filters=tagged)["KeyPairs"]
    assert "gone" not in cli("status").stdout
    # the module's machine is untouched
    assert any(l.startswith(launched) and "running" in l for l in cli("status", launched).stdout.splitlines())
