"""No run is destroyed before it is pulled: the pull record on the machine, `down` pulling (or
refusing), autostop stopping instead of terminating, and what counts as activity. The watchdog's
activity rules run against fake /dev/pts and /proc trees; `down` runs against the real sshd and the
moto server (fixtures/ssh.py's `ssh_host`, `ssh_host_moto`, `cli`)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from fixtures.aws import ec2_client, seed_dlami
from fixtures.cli import assert_user_error
from fixtures.instance import load_agent
from fixtures.sshhost import tools_available

TINY = ["--device", "cpu", "--epochs", "1", "--train-limit", "1024", "--eval-limit", "500", "--batch-size", "128",
        "--no-report"]


# ---------------------------------------------------------------------------------- activity
def test_a_terminal_counts_only_while_it_is_used(tmp_path):
    """A pty's atime is its last input (as `w` reads it): an old one is a forgotten shell."""
    agent = load_agent("autostop")
    pts = tmp_path / "pts"
    pts.mkdir()
    now = time.time()
    for name, idle_for in (("0", 5), ("1", 40 * 60), ("2", 29 * 60), ("ptmx", 0)):
        (pts / name).touch()
        os.utime(pts / name, (now - idle_for, now - idle_for))
    assert agent.active_ptys(now, 30 * 60, pts) == 2  # 0 and 2; 1 is idle longer than 30 min; ptmx is no session
    assert agent.active_ptys(now, 60, pts) == 1
    assert agent.active_ptys(now, 60, tmp_path / "missing") == 0


def fake_process(proc: Path, pid: int, ppid: int, cmdline: str, netns: str = "net:[4026531840]") -> None:
    entry = proc / str(pid)
    (entry / "ns").mkdir(parents=True)
    comm = cmdline.split()[0].split("/")[-1].rstrip(":")
    (entry / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560\n")
    (entry / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")
    os.symlink(netns, entry / "ns" / "net")


def test_ssh_sessions_without_a_terminal_count_when_they_run_something(tmp_path):
    agent = load_agent("autostop")
    proc = tmp_path / "proc"
    proc.mkdir()
    fake_process(proc, 1, 0, "/sbin/init")
    fake_process(proc, 400, 1, "sshd: ubuntu@notty")  # the session this check itself runs in
    fake_process(proc, 500, 400, "python3 /usr/local/bin/mnist-cloud-autostop")
    fake_process(proc, 600, 1, "sshd: ubuntu@notty")  # a pull: rsync runs under it
    fake_process(proc, 601, 600, "rsync --server --sender -logDtpre.iLsfxCIvu . runs/r1/")
    fake_process(proc, 700, 1, "sshd: ubuntu@notty")  # a Jupyter tunnel: no command
    fake_process(proc, 800, 1, "sshd: ubuntu@notty", netns="net:[4026532999]")  # another namespace's sshd
    fake_process(proc, 801, 800, "sftp-server")
    fake_process(proc, 900, 1, "sshd: ubuntu@pts/0")  # a terminal: the pty rule decides
    fake_process(proc, 901, 900, "-bash")
    fake_process(proc, 1000, 1, "sshd-session: ubuntu@notty")  # OpenSSH 9.8 names it so
    fake_process(proc, 1001, 1000, "python3 -c ...")
    os.symlink("500", proc / "self")
    assert agent.notty_sessions(proc) == 2  # 600 and 1000
    (proc / "601").rename(proc / "gone")  # the pull ended
    assert agent.notty_sessions(proc) == 1


# ---------------------------------------------------------------------------------- the pull record
def write_run(run_dir: Path, epochs: int = 1) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"status": "completed", "run_id": run_dir.name}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e + 1}) + "\n" for e in range(epochs)))
    (run_dir / "result.json").write_text(json.dumps({"test_acc": 97.25}))
    (run_dir / "last.pt").write_bytes(os.urandom(2048))


def hashes(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in run_dir.rglob("*") if p.is_file()}


def test_a_run_is_unpulled_until_every_file_is_recorded_and_again_when_it_changes(tmp_path):
    agent = load_agent("autostop")
    work = tmp_path / "mnist-cloud" / "box"
    write_run(work / "runs" / "r1")
    write_run(work / "runs" / "r2")
    assert agent.unpulled_runs([work]) == ["r1", "r2"]
    verified = hashes(work / "runs" / "r1")
    assert agent.record_pulled(work, "r1", verified) == []
    assert agent.unpulled_runs([work]) == ["r2"]
    (work / "runs" / "r1" / ".last.pt.tmp123").write_bytes(b"half")  # a checkpoint being written: not yet a file
    assert agent.unpulled_runs([work]) == ["r2"]
    write_run(work / "runs" / "r1", epochs=2)  # resumed: more epochs, a new last.pt
    assert agent.unpulled_runs([work]) == ["r1", "r2"]
    # a file that changed after the laptop verified it is not recorded: the run stays unpulled
    stale = {**hashes(work / "runs" / "r1"), "last.pt": "0" * 64}
    assert agent.record_pulled(work, "r1", stale) == ["last.pt"]
    assert agent.unpulled_runs([work]) == ["r1", "r2"]


# ---------------------------------------------------------------------------------- down, for real
ssh = pytest.mark.skipif(tools_available() is not None, reason=str(tools_available()))


@pytest.fixture(scope="module")
def seeded_moto(ssh_host_moto):
    """ssh_host_moto, reset and seeded with the DLAMI once for this module's launches."""
    import urllib.request as u

    u.urlopen(u.Request(f"{ssh_host_moto}/moto-api/reset", method="POST")).read()
    seed_dlami()
    return ssh_host_moto


def launch(cli, name: str, *extra: str) -> None:
    out = cli("launch", "--instance", "g4dn.xlarge", "--name", name, "--ssh-cidr", "192.0.2.10/32", *extra)
    assert out.returncode == 0, out.stdout + out.stderr


def instance_state(endpoint, name: str) -> str:
    ec2 = ec2_client(endpoint)
    states = [i["State"]["Name"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
              if {t["Key"]: t["Value"] for t in i.get("Tags", [])}.get("mnist-cloud:name") == name]
    return states[-1] if states else "none"


def shutdown_behavior(endpoint, name: str) -> str:
    ec2 = ec2_client(endpoint)
    iid = next(i["InstanceId"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
               if i["State"]["Name"] == "running"
               and {t["Key"]: t["Value"] for t in i.get("Tags", [])}.get("mnist-cloud:name") == name)
    attr = ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior")
    return attr["InstanceInitiatedShutdownBehavior"]["Value"]


def remote_run(host, name: str, run_id: str, epochs: int = 1) -> Path:
    """A finished run on the machine, as the trainer leaves it (no need to train for `down`)."""
    run_dir = host.home / "mnist-cloud" / name / "runs" / run_id
    write_run(run_dir, epochs)
    return run_dir


@ssh
def test_down_pulls_unpulled_runs_first(cli, seeded_moto, ssh_host, project_checkout):
    launch(cli, "keep1")
    remote = remote_run(ssh_host, "keep1", "keep1-run")
    out = cli("down", "keep1", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pulled keep1-run from keep1 before terminating it" in out.stdout
    assert hashes(project_checkout / "runs" / "keep1-run") == hashes(remote)  # every file, byte for byte
    assert instance_state(seeded_moto, "keep1") == "terminated"


@ssh
def test_down_no_pull_refuses_naming_the_runs_and_discard_runs_goes_ahead(cli, seeded_moto, ssh_host, project_checkout):
    launch(cli, "keep2")
    remote_run(ssh_host, "keep2", "keep2-a")
    remote_run(ssh_host, "keep2", "keep2-b")
    refused = cli("down", "keep2", "--yes", "--no-pull")
    assert_user_error(refused, "keep2 holds unpulled run(s) keep2-a, keep2-b", "--discard-runs")
    assert instance_state(seeded_moto, "keep2") == "running"
    assert not (project_checkout / "runs" / "keep2-a").exists()
    # --all checks the same, per machine
    assert_user_error(cli("down", "--all", "--yes", "--no-pull"), "keep2 holds unpulled run(s) keep2-a, keep2-b")
    assert instance_state(seeded_moto, "keep2") == "running"
    gone = cli("down", "keep2", "--yes", "--discard-runs")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert instance_state(seeded_moto, "keep2") == "terminated" and not (project_checkout / "runs" / "keep2-a").exists()


@pytest.mark.slow
@ssh
def test_pull_then_down_terminates_without_pulling_again_until_the_run_changes(cli, seeded_moto, ssh_host,
                                                                               project_checkout):
    launch(cli, "keep3")
    remote = remote_run(ssh_host, "keep3", "keep3-run")
    assert cli("pull", "keep3", "keep3-run").returncode == 0
    record = json.loads((ssh_host.home / "mnist-cloud" / "keep3" / "jobs" / "keep3-run.pulled.json").read_text())
    assert set(record["files"]) == set(hashes(remote))  # the record is on the machine
    remote_run(ssh_host, "keep3", "keep3-run", epochs=2)  # resumed there: it wrote another epoch
    assert_user_error(cli("down", "keep3", "--yes", "--no-pull"), "keep3 holds unpulled run(s) keep3-run")
    assert cli("pull", "keep3").returncode == 0  # the newest run
    out = cli("down", "keep3", "--yes", "--no-pull")  # nothing left to pull: --no-pull does not refuse
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pulled" not in out.stdout and instance_state(seeded_moto, "keep3") == "terminated"
    assert len((project_checkout / "runs" / "keep3-run" / "metrics.jsonl").read_text().splitlines()) == 2


@ssh
def test_down_of_a_stopped_instance_refuses_with_what_to_do(cli, seeded_moto, ssh_host):
    launch(cli, "keep4")
    assert cli("stop", "keep4").returncode == 0
    assert_user_error(cli("down", "keep4", "--yes"), "keep4 is stopped", "mnist-cloud start keep4", "--discard-runs")
    assert instance_state(seeded_moto, "keep4") == "stopped"
    assert cli("down", "keep4", "--yes", "--discard-runs").returncode == 0
    assert instance_state(seeded_moto, "keep4") == "terminated"


@pytest.mark.slow
@ssh
def test_autostop_terminate_stops_instead_while_runs_are_unpulled(cli, seeded_moto, ssh_host, project_checkout,
                                                                  laptop_env, mnist_dir, tmp_path, monkeypatch):
    """launch --down: a run started on it sets EC2's shutdown behaviour to stop, and the watchdog
    (the real script, a fake `shutdown`) says it stops instead; `logs -f` pulls the run when it
    ends, which sets terminate again."""
    from infra.remote import Endpoint, Remote
    from infra.state import State
    from infra.watchdog import AutostopConfig, install_over_ssh

    launch(cli, "keep5", "--down")
    assert shutdown_behavior(seeded_moto, "keep5") == "terminate"  # nothing on it yet
    root, fakebin = tmp_path / "root", tmp_path / "bin"
    fakebin.mkdir()
    fired = tmp_path / "shutdown-called"
    (fakebin / "shutdown").write_text(f"#!/bin/sh\necho \"$@\" >> {fired}\n")
    (fakebin / "shutdown").chmod(0o755)
    monkeypatch.setenv("MNIST_CLOUD_HOME", laptop_env["MNIST_CLOUD_HOME"])
    h = State().get("keep5")
    with Remote(Endpoint(name="keep5", host=h.host, user=h.user, key_path=h.key_path, alias=h.instance_id)) as remote:
        install_over_ssh(remote, AutostopConfig(idle_minutes=0.01, action="terminate"), root=str(root))

        def tick():  # in a PID namespace of its own: trainers of other tests on this machine are no activity here
            return remote.run(f"MNIST_CLOUD_ROOT={root} PATH={fakebin}:$PATH unshare --pid --fork --mount-proc "
                              f"python3 {root}/usr/local/bin/mnist-cloud-autostop").stdout

        monkeypatch.setenv("MNIST_CLOUD_AGENT_ROOT", str(root))  # where the laptop writes the shutdown behaviour
        start = cli("train", "--on", "keep5", *TINY, "--data-dir", str(mnist_dir), "--run-id", "keep5-run",
                    "--detach")
        assert start.returncode == 0, start.stdout + start.stderr
        assert shutdown_behavior(seeded_moto, "keep5") == "stop"
        assert json.loads((root / "etc/mnist-cloud/autostop.json").read_text())["shutdown_behavior"] == "stop"
        follow = cli("logs", "keep5", "keep5-run", "-f")
        assert follow.returncode == 0, follow.stdout + follow.stderr
        assert ("(final weights, model.pt)" in follow.stdout
                and (project_checkout / "runs" / "keep5-run" / "result.json").exists())
        assert shutdown_behavior(seeded_moto, "keep5") == "terminate"  # all pulled: terminate is safe again
        assert json.loads((root / "etc/mnist-cloud/autostop.json").read_text())["shutdown_behavior"] == "terminate"

        remote_run(ssh_host, "keep5", "keep5-more")  # a run made without mnist-cloud, e.g. by hand over ssh
        tick()
        time.sleep(1)
        said = tick()
        assert "staying up" in said and "keep5-more" in said and not fired.exists()
        remote.run(f"MNIST_CLOUD_ROOT={root} python3 {root}/usr/local/bin/mnist-cloud-autostop set-shutdown stop")
        said = tick()
        assert "stopping instead of terminating: 1 run(s) not pulled (keep5-more)" in said and fired.exists()
    assert cli("down", "keep5", "--yes", "--discard-runs").returncode == 0


# ---------------------------------------------------------------------------------- everything waiting, in one go
def pull_column(out, name: str) -> str:
    """status's PULL cell on NAME's row."""
    import re

    lines = [l for l in out.stdout.splitlines() if l.strip()]
    header = [(m.group(), m.start()) for m in re.finditer(r"\S+(?: \S+)*", lines[0])]  # "COST SO FAR" is one
    at = [h for h, _ in header].index("PULL")
    start, end = header[at][1], header[at + 1][1] if at + 1 < len(header) else None
    row = next(l for l in lines[1:] if l.split()[0] == name)
    return row[start:end].strip()


@pytest.mark.parametrize("args,needle", [
    (["pull", "box", "r1", "--all"], "give a RUN or --all, not both"),
    (["pull", "box", "--every-machine"], "it takes no NAME, RUN or --all"),
    (["pull", "--all", "--every-machine"], "it takes no NAME, RUN or --all"),
])
def test_pull_all_and_every_machine_refuse_what_they_cannot_mean(capsys, args, needle):
    from infra.commands import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.splitlines()) == 1, err


def test_pull_every_machine_without_aws_pulls_the_ssh_hosts_and_says_there_is_nothing(capsys, monkeypatch, tmp_path):
    """No AWS credentials and no EC2 name in the state: every machine is the SSH hosts (here none)."""
    from infra.commands import main

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert main(["pull", "--every-machine"]) == 0
    assert capsys.readouterr().out.startswith("no machines")


def test_status_count_gives_up_on_a_silent_machine_within_the_connect_timeout_concurrently(tmp_path):
    """A machine that accepts the connection and never speaks (a half-dead instance, a firewall that
    holds) costs status one short timeout, shared by every such machine, and shows "?"."""
    import socket

    from infra.remote import known_hosts_file
    from infra.resolve import answered_before
    from infra.state import Host
    from infra.unpulled import count_waiting

    key = tmp_path / "key"
    key.write_text("not used: no banner ever comes\n")
    key.chmod(0o600)
    silent, machines = [], []
    for n in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()  # the kernel completes the handshake; nobody ever sends the SSH banner
        silent.append(s)
        host = Host(f"silent{n}", "ssh", host="127.0.0.1", port=s.getsockname()[1], key_path=str(key))
        known_hosts_file().parent.mkdir(parents=True, exist_ok=True)
        with known_hosts_file().open("a") as f:  # it answered once: status asks it
            f.write(f"127.0.0.1:{host.port} ssh-ed25519 AAAA\n")
        machines.append((host, answered_before(host, {})))
    try:
        started = time.monotonic()
        counts = count_waiting(machines, connect_timeout=1)
        assert time.monotonic() - started < 1.8  # one timeout, not one per machine, nor paramiko's 15 s
        assert counts == {f"127.0.0.1:{h.port}": None for h, _ in machines}
        started = time.monotonic()  # connected, then stuck (here: before the banner): the deadline ends it
        assert count_waiting(machines, connect_timeout=30, deadline=0.5) == counts
        assert time.monotonic() - started < 1.3
    finally:
        for s in silent:
            s.close()


@ssh
def test_pull_all_pulls_exactly_the_unpulled_runs_and_status_counts_them(cli, seeded_moto, ssh_host,
                                                                         project_checkout):
    launch(cli, "wait1")
    remote = {r: remote_run(ssh_host, "wait1", f"wait1-{r}") for r in "abc"}
    for r in "ab":
        assert cli("pull", "wait1", f"wait1-{r}").returncode == 0
    remote_run(ssh_host, "wait1", "wait1-b", epochs=2)  # b resumed there after its pull: unpulled again
    (project_checkout / "runs" / "wait1-a" / "result.json").unlink()  # a is pulled: --all leaves it alone
    status = cli("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert pull_column(status, "wait1") == "2"  # b and c
    [machine] = [m for m in json.loads(cli("status", "--json").stdout) if m["name"] == "wait1"]
    assert machine["runs_to_pull"] == 2
    out = cli("pull", "wait1", "--all")
    assert out.returncode == 0, out.stdout + out.stderr
    pulled = sorted(l.split()[1] for l in out.stdout.splitlines() if l.startswith("pulled wait1-"))
    assert pulled == ["wait1-b", "wait1-c"] and "pulled 2 run(s) from wait1" in out.stdout
    assert not (project_checkout / "runs" / "wait1-a" / "result.json").exists()
    for r in "bc":
        assert hashes(project_checkout / "runs" / f"wait1-{r}") == hashes(remote[r])
    assert pull_column(cli("status"), "wait1") == "0"
    assert cli("down", "wait1", "--yes", "--no-pull").returncode == 0  # nothing left unpulled: no refusal


@ssh
def test_pull_every_machine_pulls_each_running_machine_and_names_the_one_it_cannot_reach(
        cli, seeded_moto, ssh_host, project_checkout, laptop_env, monkeypatch):
    """wait2 cannot be reached (its key is away), wait3 answered before, wait4 never did (status does not
    ask it: a machine never reached may be anyone's address), wait5 is stopped."""
    from infra.state import State

    for name in ("wait2", "wait3", "wait4", "wait5"):
        launch(cli, name, *(["--no-wait-ssh"] if name == "wait4" else []))
        remote_run(ssh_host, name, f"{name}-run")
    assert cli("stop", "wait5").returncode == 0
    monkeypatch.setenv("MNIST_CLOUD_HOME", laptop_env["MNIST_CLOUD_HOME"])
    key = Path(State().get("wait2").key_path)
    key.rename(key.with_suffix(".away"))
    try:
        status = cli("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert [pull_column(status, n) for n in ("wait2", "wait3", "wait4", "wait5")] == ["?", "1", "?", "-"]
        listed = {m["name"]: m for m in json.loads(cli("status", "--json").stdout)}  # null: not known
        assert [listed[n]["runs_to_pull"] for n in ("wait2", "wait3", "wait4", "wait5")] == [None, 1, None, None]
        out = cli("pull", "--every-machine")
    finally:
        key.with_suffix(".away").rename(key)
    assert out.returncode == 1, out.stdout + out.stderr
    assert [l for l in out.stdout.splitlines() if l.startswith("wait2")] == [
        f"wait2: not pulled: key file {key} does not exist"]
    for name in ("wait3", "wait4"):  # after wait2 failed
        assert f"pulled {name}-run from {name}" in out.stdout and f"{name}: pulled 1 run(s)" in out.stdout
        assert (project_checkout / "runs" / f"{name}-run" / "result.json").exists()
    assert "wait5 is stopped: skipped" in out.stdout and not (project_checkout / "runs" / "wait5-run").exists()
    assert out.stdout.splitlines()[-1] == "1 machine(s) not pulled: wait2"
    assert cli("down", "--all", "--yes", "--discard-runs").returncode == 0
