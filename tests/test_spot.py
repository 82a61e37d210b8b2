"""Spot instances on EC2's terms: a persistent request that stops on interruption, `down` that cancels
the request before it terminates, and a run that resumes on the instance by itself when EC2 starts it
again (infra/agent/resume_agent.py), end to end with the moto server and the real sshd.

moto reads only InstanceMarketOptions.MarketType from run_instances and makes no spot request for it,
so `SpotEC2` records what was sent and fulfils each spot launch through a spot request of the type
asked, as EC2 does; an interruption is EC2's stop of the instance with EC2's own codes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from fixtures.aws import REGION, seed_dlami
from fixtures.cli import assert_user_error, run_cli, wait_for
from fixtures.instance import FakeImds, load_agent
from fixtures.runs import epochs_written
from fixtures.sshhost import tools_available

# ~3-5 s epochs on 2 shared CPU cores: long enough to interrupt the second one
TINY = ["--device", "cpu", "--epochs", "3", "--train-limit", "4096", "--eval-limit", "300", "--no-report"]


# ---------------------------------------------------------------------------------- the agent's policy
@pytest.mark.parametrize("case,notice,record,status,alive,expected", [
    ("interrupted by a notice", True, True, "interrupted", False, True),
    ("killed before it could checkpoint", True, True, "running", False, True),
    ("already running again (second start)", True, True, "interrupted", True, False),
    ("no notice: stopped on purpose", False, True, "interrupted", False, False),
    ("no notice, config still says running", False, True, "running", False, False),
    ("finished after the notice", True, True, "completed", False, False),
    ("--stop-after", True, True, "stopped", False, False),
    ("failed", True, True, "failed", False, False),
    ("no job record (cluster)", True, False, "interrupted", False, False),
    ("no run directory yet", True, True, None, False, False),
])
def test_agent_decision(case, notice, record, status, alive, expected):
    go, why = load_agent("resume_agent").decide(has_notice=notice, has_record=record, status=status, alive=alive)
    assert go is expected, (case, why)
    assert why


def test_agent_leaves_a_finished_or_stopped_run_alone_and_resumes_only_once(tmp_path):
    """The real agent over a work dir: it starts exactly the interrupted run, once, even when run twice."""
    agent = load_agent("resume_agent")
    work = tmp_path / "home" / "mnist-cloud" / "box"
    jobs = work / "jobs"
    jobs.mkdir(parents=True)
    started = tmp_path / "started"
    for run_id, status in (("cut", "interrupted"), ("done", "completed"), ("paused", "stopped"), ("mine", "interrupted")):
        (work / "runs" / run_id).mkdir(parents=True)
        (work / "runs" / run_id / "config.json").write_text(json.dumps({"status": status}))
        record = jobs / f"{run_id}.job.json"
        record.write_text(json.dumps({"run_id": run_id, "resume": [f"echo {run_id} >> {started}; echo 4242"],
                                     "status_file": f"runs/{run_id}/config.json"}))
        record.chmod(0o600)
        if run_id != "mine":  # the user stopped `mine` by hand: no notice
            (jobs / f"{run_id}.spot-notice").write_text("{}")
    for _ in range(2):  # a second boot, or a second start of the unit
        assert agent.main(["--home", str(tmp_path / "home")]) == 0
    assert started.read_text().split() == ["cut"]
    assert not (jobs / "cut.spot-notice").exists() and (jobs / "cut.spot-notice.resumed").exists()


def test_agent_still_reads_a_job_record_from_before_status_file(tmp_path):
    """A spot run started by the previous version (its record names no status file) still resumes."""
    agent = load_agent("resume_agent")
    work = tmp_path / "home" / "mnist-cloud" / "box"
    (work / "jobs").mkdir(parents=True)
    (work / "runs" / "old").mkdir(parents=True)
    (work / "runs" / "old" / "config.json").write_text(json.dumps({"status": "interrupted"}))
    (work / "jobs" / "old.job.json").write_text(json.dumps({"run_id": "old", "resume": ["true"]}))
    assert agent.run_status(work, "old") == "interrupted"


def test_agent_refuses_a_record_others_can_write(tmp_path):
    agent = load_agent("resume_agent")
    work = tmp_path / "home" / "mnist-cloud" / "box"
    (work / "jobs").mkdir(parents=True)
    (work / "runs" / "r").mkdir(parents=True)
    (work / "runs" / "r" / "config.json").write_text(json.dumps({"status": "interrupted"}))
    record = work / "jobs" / "r.job.json"
    record.write_text(json.dumps({"resume": [f"touch {tmp_path / 'ran'}"], "status_file": "runs/r/config.json"}))
    record.chmod(0o666)
    (work / "jobs" / "r.spot-notice").write_text("{}")
    assert agent.main(["--home", str(tmp_path / "home")]) == 1
    assert not (tmp_path / "ran").exists()


def test_the_user_data_installs_the_agent_and_fits_ec2s_limit():
    """EC2 refuses user data over 16 KB (raw, before base64); moto does not check it. Gzipped whole, as
    cloud-init takes it, with every field of the config set."""
    import gzip

    from infra.watchdog import USER_DATA_LIMIT, AutostopConfig, user_data

    data = user_data(AutostopConfig(idle_minutes=30, after_train=True, action="terminate", shutdown_behavior="stop",
                                    budget_usd=12.5, usd_per_hour=3.0, price_source="live, AWS Price List",
                                    work_dirs=["/home/ubuntu/mnist-cloud/*"]))
    script = gzip.decompress(data).decode()
    assert "mnist-cloud-resume.service" in script and "@reboot" in script and '"budget_usd": 12.5' in script
    assert USER_DATA_LIMIT == 16 * 1024 and len(data) <= USER_DATA_LIMIT, f"{len(data)} bytes: trim the scripts"


# ---------------------------------------------------------------------------------- EC2's spot requests in moto
class SpotEC2:
    """Teaches the in-process moto what EC2 does with a spot run_instances, and records what was sent."""

    def __init__(self, monkeypatch):
        from moto.ec2.responses.instances import InstanceResponse
        from moto.ec2.responses.spot_instances import SpotInstances

        self.sent: list[dict] = []  # run_instances querystrings, as the server received them
        self.order: list[str] = []  # cancel / terminate, in the order they came
        outer = self
        run, terminate = InstanceResponse.run_instances, InstanceResponse.terminate_instances
        cancel = SpotInstances.cancel_spot_instance_requests

        def run_instances(resp):
            outer.sent.append({k: v[0] if isinstance(v, list) and len(v) == 1 else v
                               for k, v in resp.querystring.items()})
            result = run(resp)
            if resp._get_param("InstanceMarketOptions.MarketType") == "spot":
                for inst in result.result.instances:
                    outer.fulfil(resp, inst)
            return result

        def terminate_instances(resp):
            outer.order.append("terminate")
            return terminate(resp)

        def cancel_spot_instance_requests(resp):
            outer.order.append("cancel")
            return cancel(resp)

        monkeypatch.setattr(InstanceResponse, "run_instances", run_instances)
        monkeypatch.setattr(InstanceResponse, "terminate_instances", terminate_instances)
        monkeypatch.setattr(SpotInstances, "cancel_spot_instance_requests", cancel_spot_instance_requests)

    @staticmethod
    def fulfil(resp, inst) -> None:
        """A spot request of the type asked, fulfilled by this very instance (moto's own would launch another)."""
        from moto.ec2.models.spot_requests import SpotInstanceRequest
        from moto.ec2.utils import random_spot_request_id

        launch = SpotInstanceRequest.launch_instance
        SpotInstanceRequest.launch_instance = lambda self: inst
        try:
            request = SpotInstanceRequest(
                resp.ec2_backend, random_spot_request_id(), None, inst.image_id,
                resp._get_param("InstanceMarketOptions.SpotOptions.SpotInstanceType") or "one-time",
                None, None, None, None, inst.key_name, [g.id for g in inst.security_groups], None,
                inst.instance_type, None, None, None, False, inst.subnet_id, resp._parse_tag_specification(), None,
                resp._get_param("InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"))
        finally:
            SpotInstanceRequest.launch_instance = launch
        resp.ec2_backend.spot_instance_requests[request.id] = request

    @staticmethod
    def backend():
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.ec2.models import ec2_backends

        return ec2_backends[DEFAULT_ACCOUNT_ID][REGION]

    def request_of(self, instance_id: str):
        return next((r for r in self.backend().spot_instance_requests.values() if r.instance.id == instance_id), None)

    def interrupt(self, instance_id: str) -> None:
        """EC2 stops the instance for a spot interruption, with the codes EC2 gives."""
        from moto.ec2.models.instances import StateReason

        inst = self.backend().get_instance(instance_id)
        inst.stop()
        inst.state_reason = StateReason("Server.SpotInstanceShutdown: Server.SpotInstanceShutdown",
                                        "Server.SpotInstanceShutdown")
        request = self.request_of(instance_id)
        request.state, request._status_code = "disabled", "instance-stopped-no-capacity"

    def capacity_returns(self, instance_id: str) -> None:
        self.backend().get_instance(instance_id).start()
        request = self.request_of(instance_id)
        request.state, request._status_code = "active", "fulfilled"


@pytest.fixture
def spot_ec2(monkeypatch):
    return SpotEC2(monkeypatch)


# ---------------------------------------------------------------------------------- our functions, moto in process
def launch_spot(aws, **kw):
    from infra import ec2 as P

    spec = P.LaunchSpec(name="sp", instance_type="g4dn.xlarge", spot=True, ssh_cidr="192.0.2.1/32",
                        wait_status_checks=False, **kw)
    logs = []
    return P.launch(aws, spec, log=logs.append), logs


def test_spot_launch_asks_for_a_persistent_request_that_stops(aws, spot_ec2):
    inst, logs = launch_spot(aws, autostop_action="terminate")
    sent = spot_ec2.sent[-1]
    assert sent["InstanceMarketOptions.MarketType"] == "spot"
    assert sent["InstanceMarketOptions.SpotOptions.SpotInstanceType"] == "persistent"
    assert sent["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"] == "stop"
    # a shutdown of its own (autostop) stops it too: terminating would relaunch through the request
    assert sent["InstanceInitiatedShutdownBehavior"] == "stop"
    assert inst.autostop.endswith(":stop") and any("stops it" in line for line in logs)
    tagged = [v for k, v in sent.items() if k.startswith("TagSpecification") and k.endswith("ResourceType")]
    assert "spot-instances-request" in tagged  # so `down` finds the request even without its instance


def test_down_cancels_the_spot_request_before_it_terminates(aws, spot_ec2):
    from infra import ec2 as P

    inst, _ = launch_spot(aws)
    assert spot_ec2.request_of(inst.instance_id).type == "persistent"
    report = P.down(aws, "sp", log=lambda m: None)
    assert report.terminated == [inst.instance_id]
    assert spot_ec2.order == ["cancel", "terminate"]
    assert spot_ec2.request_of(inst.instance_id) is None  # moto forgets a cancelled request


def test_stop_works_for_a_persistent_spot_instance_and_autostop_stops_it(aws, spot_ec2):
    from infra import ec2 as P
    from infra.watchdog import AutostopConfig

    inst, _ = launch_spot(aws)
    assert P.stop(aws, "sp", log=lambda m: None).state == "stopped"
    P.start(aws, "sp", ssh_cidr="192.0.2.1/32", log=lambda m: None)
    logs = []
    after = P.set_autostop(aws, "sp", AutostopConfig(idle_minutes=10, action="terminate"), log=logs.append)
    behaviour = aws.call("ec2", "describe_instance_attribute", InstanceId=inst.instance_id,
                         Attribute="instanceInitiatedShutdownBehavior")["InstanceInitiatedShutdownBehavior"]["Value"]
    assert behaviour == "stop" and after.autostop == "10m:stop" and any("stops it" in line for line in logs)


def test_stop_refuses_a_one_time_spot_instance(aws, spot_ec2, monkeypatch):
    from infra import ec2 as P
    from infra.ec2 import launching
    from infra.errors import UserError

    monkeypatch.setattr(launching, "SPOT_OPTIONS", {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"})
    launch_spot(aws)  # as an older mnist-cloud launched it
    with pytest.raises(UserError, match="one-time spot instance"):
        P.stop(aws, "sp", log=lambda m: None)


def test_an_interrupted_instance_shows_as_interrupted_and_start_says_ec2_starts_it(aws, spot_ec2):
    from infra import ec2 as P
    from infra.errors import UserError

    inst, _ = launch_spot(aws)
    assert P.spot_interruptions(aws, P.find_instances(aws, "sp")) == {}
    spot_ec2.interrupt(inst.instance_id)
    assert P.spot_interruptions(aws, P.find_instances(aws, "sp")) == {inst.instance_id: "instance-stopped-no-capacity"}
    with pytest.raises(UserError, match="only EC2 can start it"):
        P.start(aws, "sp", ssh_cidr="192.0.2.1/32", log=lambda m: None)
    spot_ec2.capacity_returns(inst.instance_id)
    P.stop(aws, "sp", log=lambda m: None)  # a user's stop is no interruption
    spot_ec2.request_of(inst.instance_id)._status_code = "instance-stopped-by-user"
    assert P.spot_interruptions(aws, P.find_instances(aws, "sp")) == {}


# ---------------------------------------------------------------------------------- end to end: sshd + moto server
pytestmark_ssh = pytest.mark.skipif(tools_available() is not None, reason=str(tools_available()))


def status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "config.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow
@pytestmark_ssh
def test_spot_interruption_resumes_on_the_instance_by_itself(cli, ssh_host_moto, ssh_host, project_checkout, mnist_dir,
                                                             laptop_env, mnist_cloud, spot_ec2, tmp_path):
    """Notice -> checkpoint -> EC2 stops the instance -> EC2 starts it -> the boot's agent resumes the
    run -> it finishes with every epoch exactly once; `status` and `logs -f` say so, `down` cancels."""
    import base64
    import urllib.request as u

    import boto3

    u.urlopen(u.Request(f"{ssh_host_moto}/moto-api/reset", method="POST")).read()
    seed_dlami()
    imds = FakeImds(f"{ssh_host.subnet}.1")
    try:
        out = cli("launch", "--instance", "g4dn.xlarge", "--name", "sp", "--spot", "--autostop", "0",
                  "--ssh-cidr", "192.0.2.10/32")
        assert out.returncode == 0 and ", spot)" in out.stdout, out.stdout + out.stderr
        sent = spot_ec2.sent[-1]
        assert (sent["InstanceMarketOptions.SpotOptions.SpotInstanceType"],
                sent["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"]) == ("persistent", "stop")
        ec2 = boto3.client("ec2", endpoint_url=ssh_host_moto, region_name=REGION, aws_access_key_id="t",
                           aws_secret_access_key="t")
        iid = next(i["InstanceId"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
                   if i["State"]["Name"] == "running")

        # first boot: cloud-init runs the user data (no autostop asked, but a spot instance gets the agent)
        root = tmp_path / "root"
        user_data = tmp_path / "user-data.sh"
        user_data.write_bytes(gzip.decompress(base64.b64decode(  # gzipped: cloud-init unpacks it
            ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")["UserData"]["Value"])))
        installed = ssh_host.exec(f"MNIST_CLOUD_ROOT={root} bash {user_data}")
        assert "resume agent" in installed.stdout, installed.stdout + installed.stderr
        reboot = (root / "etc/cron.d/mnist-cloud-resume").read_text().strip()
        assert reboot.startswith("@reboot root ")

        def boot() -> str:
            """What cron does at boot: the @reboot line's command, as root, on the instance."""
            done = ssh_host.exec(reboot.removeprefix("@reboot root "))
            assert done.returncode == 0, done.stdout + done.stderr
            return (root / "var/log/mnist-cloud-resume.log").read_text()

        run_env = {**laptop_env, "MNIST_CLOUD_IMDS_URL": imds.url, "MNIST_CLOUD_SPOT_POLL": "0.3"}
        start = run_cli([*mnist_cloud, "train", "--on", "sp", *TINY, "--data-dir", str(mnist_dir), "--run-id", "r",
                         "--detach"], env_extra=run_env, cwd=project_checkout, timeout=300)
        assert start.returncode == 0, start.stdout + start.stderr
        work = ssh_host.home / "mnist-cloud" / "sp"
        run_dir = work / "runs" / "r"
        assert json.loads((work / "jobs" / "r.job.json").read_text())["resume"]  # what the agent will run

        wait_for(lambda: epochs_written(run_dir) == [1])
        imds.notice = {"action": "stop", "time": "2026-11-23T12:00:00Z"}
        wait_for(lambda: status(run_dir) == "interrupted", timeout=30)
        wait_for(lambda: (work / "jobs" / "r.exit").exists(), timeout=30)
        assert (work / "jobs" / "r.spot-notice").exists()  # the watcher's word: EC2 did it, not a person
        assert epochs_written(run_dir) != [1, 2, 3]

        # two minutes later EC2 stops the instance; the laptop is closed from here on
        imds.notice = None
        spot_ec2.interrupt(iid)
        shown = cli("status", "sp")
        row = next(line for line in shown.stdout.splitlines() if line.startswith("sp "))
        assert " interrupted " in row and "instance-stopped-no-capacity" in shown.stdout, shown.stdout
        assert "mnist-cloud logs sp -f" in shown.stdout
        assert_user_error(cli("start", "sp", "--ssh-cidr", "192.0.2.10/32"), "only EC2 can start it")

        # capacity returns: EC2 starts it, and the boot resumes the run with nobody watching
        spot_ec2.capacity_returns(iid)
        log = boot()
        assert "r: resuming" in log, log
        first_pid = (work / "jobs" / "r.pid").read_text()
        assert "r: left alone, it is running" in boot().removeprefix(log)  # a second start of the unit
        assert (work / "jobs" / "r.pid").read_text() == first_pid
        runs = cli("runs", "sp")
        assert any(line.split()[:2] == ["r", "running"] for line in runs.stdout.splitlines()), runs.stdout

        follow = cli("logs", "sp", "r", "-f", timeout=300)
        jobs = work / "jobs"
        assert follow.returncode == 0 and "finished with exit 0" in follow.stdout, (
            follow.stdout[-600:] + follow.stderr + "\nAGENT:\n" + (root / "var/log/mnist-cloud-resume.log").read_text()
            + "\nJOBS: " + " ".join(sorted(p.name for p in jobs.iterdir())) + "\nPID: " + (jobs / "r.pid").read_text()
            + "\nWATCH: " + (jobs / "r.spot-watch.log").read_text()[-500:])
        assert "resuming" in follow.stdout  # the same console log, appended
        assert status(run_dir) == "completed"
        assert epochs_written(run_dir) == [1, 2, 3]  # every epoch exactly once, as without the interruption
        events = [r["event"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                  if "event" in r]
        assert events == ["interrupted", "resumed"]
        log = (root / "var/log/mnist-cloud-resume.log").read_text()
        assert "r: resuming" not in boot().removeprefix(log)  # a later boot leaves the finished run alone

        # autostop --down on a spot instance stops it, and everything that shows the setting says so
        autostop = cli("autostop", "sp", "-i", "10", "--down")
        assert autostop.returncode == 0 and "stops it" in autostop.stdout and "(10m:stop)" in autostop.stdout, (
            autostop.stdout + autostop.stderr)
        wide = cli("status", "sp", "--wide").stdout.splitlines()  # AUTOSTOP: a --wide column
        assert "10m:stop" in next(line for line in wide if line.startswith("sp "))

        spot_ec2.order.clear()
        down = cli("down", "sp", "--yes")
        assert down.returncode == 0, down.stdout + down.stderr
        assert spot_ec2.order == ["cancel", "terminate"] and spot_ec2.request_of(iid) is None
    finally:
        imds.close()
        cli("down", "sp", "--yes")
