"""A machine's budget: the watchdog on the instance counts its uptime across boots at the price the laptop
wrote, warns the live runs at 80% and, at 100%, checkpoints them and stops the machine. In-process, with a
fake clock (its uptime), a forged price and a fake `shutdown`; the one run on the SSH test host is in
tests/test_reliability.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from fixtures.instance import load_agent

HOUR = 3600.0


@pytest.fixture
def agent(tmp_path, monkeypatch):
    """The watchdog with its files under tmp_path, a forged boot and uptime, and a fake `shutdown`."""
    agent = load_agent("autostop")
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    for name, rel in (("CONFIG", "etc/mnist-cloud/autostop.json"), ("STATE", "var/lib/mnist-cloud/autostop-state.json"),
                      ("BUDGET_STATE", "var/lib/mnist-cloud/budget-state.json"), ("CONSOLE", "dev/console")):
        monkeypatch.setattr(agent, name, root / rel)
    agent.clock = {"boot": "b1", "uptime": 0.0}
    monkeypatch.setattr(agent, "boot_id", lambda: agent.clock["boot"])
    monkeypatch.setattr(agent, "uptime_seconds", lambda: agent.clock["uptime"])
    monkeypatch.setattr(agent, "trainer_running", lambda: False)
    monkeypatch.setattr(agent, "jupyter_activity", lambda servers: (0, None))
    agent.shutdowns = []
    monkeypatch.setattr(agent.subprocess, "call", lambda argv: agent.shutdowns.append(argv) or 0)
    agent.work = tmp_path / "work"
    (agent.work / "jobs").mkdir(parents=True)
    agent.configure = lambda **c: agent.save(agent.CONFIG, {"idle_minutes": 30, "work_dirs": [str(agent.work)], **c})
    return agent


def live_run(agent, run_id: str) -> subprocess.Popen:
    """A job as `train --on --detach` leaves it: jobs/RUN.pid (its own process group) and jobs/RUN.log."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    (agent.work / "jobs" / f"{run_id}.pid").write_text(f"{proc.pid}\n")
    (agent.work / "jobs" / f"{run_id}.log").write_text("Epoch: 1 |\n")
    return proc


def test_uptime_adds_up_across_boots(agent):
    state = agent.count_uptime({}, "b1", 600)
    state = agent.count_uptime(state, "b1", 1800)  # the same boot: its uptime, not added twice
    assert (state["before_s"], state["boot_s"]) == (0, 1800)
    state = agent.count_uptime(state, "b2", 60)  # stopped, started: EC2's LaunchTime resets, this does not
    assert (state["before_s"], state["boot_s"]) == (1800, 60)
    assert agent.spent_usd({"usd_per_hour": 2.0}, state) == pytest.approx(2.0 * 1860 / HOUR)


@pytest.mark.parametrize("hours,expected", [(0.5, None), (0.79, None), (0.8, "warn"), (0.99, "warn"), (1.0, "stop")])
def test_the_budget_decides_at_80_and_100_percent(agent, hours, expected):
    config = {"budget_usd": 5.0, "usd_per_hour": 5.0}
    action, state, said = agent.budget_decide(config, {"boot": "b", "boot_s": hours * HOUR})
    assert action == expected, said
    assert agent.budget_decide(config, state)[0] == (None if expected == "warn" else expected)  # warns once
    assert agent.budget_decide({"usd_per_hour": 5.0}, {"boot": "b", "boot_s": 9 * HOUR})[0] is None  # no budget


def test_under_budget_nothing_happens(agent):
    proc = live_run(agent, "r1")
    try:
        agent.configure(budget_usd=5.0, usd_per_hour=1.0)
        agent.clock["uptime"] = 3 * HOUR
        assert agent.main() == 0
        assert agent.shutdowns == [] and proc.poll() is None
        assert "budget" not in (agent.work / "jobs" / "r1.log").read_text()
        assert json.loads(agent.BUDGET_STATE.read_text())["spent_usd"] == pytest.approx(3.0)
    finally:
        proc.kill()
        proc.wait()


def test_at_80_percent_the_live_runs_are_warned(agent):
    proc = live_run(agent, "r1")
    try:
        agent.configure(budget_usd=5.0, usd_per_hour=1.0)
        agent.clock["uptime"] = 4.1 * HOUR
        assert agent.main() == 0
        assert agent.shutdowns == [] and proc.poll() is None
        log = (agent.work / "jobs" / "r1.log").read_text()
        assert "mnist-cloud budget: warning: spent $4.10 of the $5 budget" in log
        agent.main()
        assert (agent.work / "jobs" / "r1.log").read_text() == log  # once, not every minute
    finally:
        proc.kill()
        proc.wait()


def test_at_100_percent_the_runs_checkpoint_and_the_machine_stops_as_on_autostop(agent):
    """Across a stop and a start: the uptime of the earlier boot counts. The runs get SIGTERM (as on a spot
    notice), then the shutdown goes the autostop's way (`shutdown -h now`, fired_at in its state)."""
    proc = live_run(agent, "r1")
    try:
        agent.configure(budget_usd=5.0, usd_per_hour=2.0)
        agent.clock["uptime"] = 2 * HOUR
        assert agent.main() == 0 and agent.shutdowns == []
        agent.clock.update(boot="b2", uptime=0.5 * HOUR)  # 2.5 h at $2/h: $5
        waits = []  # while the run checkpoints (here, our child: reaped, or it would look alive)
        agent.time = SimpleNamespace(time=time.time, sleep=lambda s: waits.append(s) or proc.wait(timeout=10))
        agent.main()
        assert waits == [1.0]  # it waited for the run to end, and no longer
        assert proc.returncode == -15  # SIGTERM: the trainer finishes its step and writes last.pt
        assert len(agent.shutdowns) == 1 and agent.shutdowns[0][:3] == ["shutdown", "-h", "now"]
        assert "budget reached: spent $5.00 of the $5 budget" in agent.shutdowns[0][3]
        assert "fired_at" in json.loads(agent.STATE.read_text())
        assert "budget reached" in json.loads(agent.BUDGET_STATE.read_text())["stopped"]["reason"]
        assert "mnist-cloud budget: stopped" in agent.CONSOLE.read_text()
        assert "mnist-cloud budget: stopped" in (agent.work / "jobs" / "r1.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_budget_warning_and_stop_and_an_autostop_go_to_the_notifier(agent, tmp_path, monkeypatch):
    """mnist-cloud-notify (infra/agent/notify.py; its POSTs: tests/test_notify.py) hears each event; before a
    shutdown the watchdog waits for it (--wait), or the POST would die with the machine."""
    root, said = tmp_path / "nroot", tmp_path / "said.jsonl"
    notifier = root / "usr/local/bin/mnist-cloud-notify"
    notifier.parent.mkdir(parents=True)
    notifier.write_text(f"import json, sys\nopen({str(said)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    monkeypatch.setattr(agent, "ROOT", root)
    agent.configure(budget_usd=5.0, usd_per_hour=1.0)
    for hours in (4.1, 5.0):
        agent.clock["uptime"] = hours * HOUR
        agent.main()
    agent.power_off({}, time.time(), "idle for 31.0 min (limit 30)")
    assert [json.loads(l) for l in said.read_text().splitlines()] == [
        ["send", "budget-warning", "spent $4.10 of the $5 budget (1 USD/h)"],
        ["send", "budget-stop", "budget reached: spent $5.00 of the $5 budget (1 USD/h)", "--wait"],
        ["send", "autostop", "idle for 31.0 min (limit 30)", "--wait"]]


def test_after_a_budget_stop_a_start_has_time_to_raise_it(agent):
    """The first minutes of the next boot: `start` pushes the raised budget; without it, it stops again."""
    agent.configure(budget_usd=1.0, usd_per_hour=1.0)
    agent.clock["uptime"] = 1.2 * HOUR
    agent.main()
    assert len(agent.shutdowns) == 1
    agent.clock.update(boot="b2", uptime=60)
    agent.main()
    assert len(agent.shutdowns) == 1  # waiting for the laptop
    agent.clock["uptime"] = agent.START_GRACE_S
    agent.main()
    assert len(agent.shutdowns) == 2  # not raised: stopped again
    agent.clock.update(boot="b3", uptime=60)
    assert agent.tool(["set-budget", "3", "1.0", "on-demand"]) == 0  # what `start` runs
    agent.clock["uptime"] = 0.5 * HOUR
    agent.main()
    assert len(agent.shutdowns) == 2


def test_set_budget_writes_the_config_and_says_what_was_spent(agent, capsys):
    agent.configure(idle_minutes=10)
    agent.clock["uptime"] = HOUR
    assert agent.tool(["set-budget", "8", "0.526", "live,", "AWS", "Price", "List"]) == 0
    assert json.loads(capsys.readouterr().out)["spent_usd"] == pytest.approx(0.526)
    config = json.loads(agent.CONFIG.read_text())
    assert (config["budget_usd"], config["usd_per_hour"], config["idle_minutes"]) == (8.0, 0.526, 10)
    assert config["price_source"] == "live, AWS Price List"
    agent.tool(["set-budget", "none", "0.526"])
    assert json.loads(agent.CONFIG.read_text())["budget_usd"] is None


def test_a_new_price_counts_from_when_it_is_written(agent, capsys):
    """Half an hour at $1 seen by the watchdog, half an hour more before the laptop writes $3 (a spot price that
    rose), then an hour at $3: $1 + $3, not two hours at $3."""
    agent.configure(budget_usd=100.0, usd_per_hour=1.0)
    agent.clock["uptime"] = HOUR / 2
    agent.main()
    agent.clock["uptime"] = HOUR
    assert agent.tool(["set-budget", "100", "3", "spot-history"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["spent_usd"] == pytest.approx(1.0)
    agent.clock.update(boot="b2", uptime=HOUR)  # and across a stop and start
    agent.main()
    assert json.loads(agent.BUDGET_STATE.read_text())["spent_usd"] == pytest.approx(4.0)


def test_a_spot_watcher_jupyter_or_tensorboard_is_no_live_run(agent):
    for job in ("r1.spot-watch", "jupyter-abc", "tensorboard-abc"):
        (agent.work / "jobs" / f"{job}.pid").write_text(f"{os.getpid()}\n")
    (agent.work / "jobs" / "done.pid").write_text(f"{os.getpid()}\n")
    (agent.work / "jobs" / "done.exit").write_text("0\n")
    assert agent.live_runs([agent.work]) == {}
    (agent.work / "jobs" / "r1.pid").write_text(f"{os.getpid()}\n")
    assert agent.live_runs([agent.work]) == {agent.work / "jobs" / "r1.log": os.getpid()}


# ---------------------------------------------------------------------------------- EC2's side (in-process moto)
def launch(aws, name="bud", **kw):
    from infra import ec2 as P
    from infra.watchdog import user_data

    spec = P.LaunchSpec(name=name, instance_type="g4dn.xlarge", ssh_cidr="203.0.113.7/32", **kw)
    spec.user_data = user_data(spec.autostop)
    return P.launch(aws, spec, log=lambda m: None)


def shutdown_behavior(aws, inst) -> str:
    return aws.client("ec2").describe_instance_attribute(
        InstanceId=inst.instance_id, Attribute="instanceInitiatedShutdownBehavior")["InstanceInitiatedShutdownBehavior"]["Value"]


def test_a_budget_is_a_tag_and_keeps_the_machine_stopping_not_terminating(aws):
    """`launch --budget --down`: the watchdog stops it at the budget, so EC2 must stop it, whatever autostop wants;
    the user data carries the budget and the price to count with until a connection prices it live."""
    import base64
    import gzip

    from infra import ec2 as P
    from infra.resolve import Shutdown
    from infra.watchdog import AutostopConfig

    inst = launch(aws, autostop_action="terminate", budget_usd=5.0, usd_per_hour=0.526)
    assert inst.budget == 5.0 and shutdown_behavior(aws, inst) == "stop"
    data = aws.client("ec2").describe_instance_attribute(InstanceId=inst.instance_id, Attribute="userData")
    config = gzip.decompress(base64.b64decode(data["UserData"]["Value"])).decode()
    assert '"budget_usd": 5.0, "usd_per_hour": 0.526' in config and '"shutdown_behavior": "stop"' in config
    assert not Shutdown(aws, inst).guarded  # a pull never sets it to terminate
    P.set_autostop(aws, "bud", AutostopConfig(idle_minutes=10, action="terminate"), log=lambda m: None)
    assert shutdown_behavior(aws, inst) == "stop"  # `autostop --down` neither

    [inst] = P.set_budget(aws, "bud", None)
    assert inst.budget is None
    P.set_autostop(aws, "bud", AutostopConfig(idle_minutes=10, action="terminate"), log=lambda m: None)
    assert shutdown_behavior(aws, inst) == "terminate" and Shutdown(aws, P.describe_instance(aws, inst.instance_id)).guarded
    [inst] = P.set_budget(aws, "bud", 8.0)
    assert inst.budget == 8.0 and shutdown_behavior(aws, inst) == "stop"


def test_start_refuses_a_machine_its_budget_stopped_until_it_is_raised(aws, monkeypatch, capsys):
    """The watchdog's line on the serial console (moto's console output is a fixed sample: forged here)."""
    from moto.ec2.responses import general

    from infra import ec2 as P
    from infra.commands import main
    from infra.errors import UserError

    launch(aws, budget_usd=5.0, usd_per_hour=1.0)
    P.stop(aws, "bud", log=lambda m: None)
    monkeypatch.setattr(general, "SAMPLE_CONSOLE_OUTPUT", "[  OK  ] Started ...\nmnist-cloud budget: stopped: spent "
                        "$5.01 of the $5 budget (1 USD/h); `mnist-cloud budget NAME USD` raises it\nreboot: Power down\n")
    with pytest.raises(UserError, match=r"bud was stopped by its budget \(it had cost \$5.01 of \$5\); raise it"):
        P.start(aws, "bud", ssh_cidr="192.0.2.1/32", log=lambda m: None)
    assert main(["status", "bud"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "$5.01/$5"  # SPENT/BUDGET, from the console
    assert main(["status", "bud", "--json"]) == 0
    [machine] = json.loads(capsys.readouterr().out)
    assert (machine["state"], machine["budget_spent_usd"], machine["budget_usd"]) == ("stopped", 5.01, 5.0)
    P.set_budget(aws, "bud", 5.01)
    with pytest.raises(UserError, match="stopped by its budget"):  # not above what it cost
        P.start(aws, "bud", ssh_cidr="192.0.2.1/32", log=lambda m: None)
    P.set_budget(aws, "bud", 8.0)
    assert P.start(aws, "bud", ssh_cidr="192.0.2.1/32", log=lambda m: None).state == "running"
    P.stop(aws, "bud", log=lambda m: None)
    monkeypatch.setattr(general, "SAMPLE_CONSOLE_OUTPUT", "[  OK  ] Started ...\nreboot: Power down\n")
    P.set_budget(aws, "bud", 1.0)  # stopped by someone, not by its budget: start as ever
    assert P.start(aws, "bud", ssh_cidr="192.0.2.1/32", log=lambda m: None).state == "running"
