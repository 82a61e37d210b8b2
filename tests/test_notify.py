"""Notifications from the instance (infra/agent/notify.py): each service's format, the retries, and a receiver
that answers 500 or nothing never holding up the caller. Against an http.server on 127.0.0.1; the one run on
the SSH test host is in tests/test_remote.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from fixtures.instance import load_agent
from fixtures.receiver import Receiver
from infra.agent import source_path


@pytest.fixture
def receiver():
    made = []

    def make(status=200):
        made.append(Receiver(status))
        return made[-1]
    yield make
    for r in made:
        r.close()


@pytest.fixture
def notify(monkeypatch):
    agent = load_agent("notify")
    monkeypatch.setattr(agent, "BACKOFF_S", 0.01)
    return agent


DOC = {"event": "finished", "text": "r1 finished: test accuracy 99.10%", "host": "box", "at": 1.0}


def test_each_service_gets_its_own_format(notify, receiver):
    r = receiver()
    said = notify.deliver([f"{r.url}/plain", f"slack:{r.url}/slack", f"discord:{r.url}/discord", f"ntfy:{r.url}/ntfy"],
                          DOC, cap_s=10)
    assert list(said.values()) == ["ok"] * 4
    plain, slack, discord, ntfy = (next(p for p in r.posts if p[0].endswith(kind))
                                   for kind in ("plain", "slack", "discord", "ntfy"))
    assert json.loads(plain[2]) == DOC
    assert plain[1]["Content-Type"] == "application/json"
    assert json.loads(slack[2]) == {"text": "*mnist-cloud box: run finished*\nr1 finished: test accuracy 99.10%"}
    assert json.loads(discord[2]) == {"content": "**mnist-cloud box: run finished**\nr1 finished: test accuracy 99.10%"}
    assert ntfy[2] == b"r1 finished: test accuracy 99.10%" and ntfy[1]["Title"] == "mnist-cloud box: run finished"


def test_a_url_is_shown_without_its_secret(notify):
    assert notify.shown("https://hooks.slack.com/services/T0/B0/SECRET") == "https://hooks.slack.com/…"
    assert notify.shown("slack:https://hooks.slack.com/services/SECRET") == "slack:https://hooks.slack.com/…"
    assert notify.shown("ntfy:https://u:pw@ntfy.sh/topic?x=1") == "ntfy:https://ntfy.sh/…"
    assert notify.shown("hooks.slack.com/services/SECRET") == "…"


def test_a_failed_post_is_tried_again_a_few_times_then_given_up(notify, receiver):
    r = receiver(500)
    said = notify.deliver([r.url], DOC, cap_s=10)
    assert len(r.posts) == 3 and said == {"http://127.0.0.1/…": "HTTPError 500"}


def test_a_receiver_that_never_answers_is_given_up_at_the_cap(notify, receiver):
    r, ok = receiver(None), receiver(200)
    started = time.monotonic()
    said = notify.deliver([r.url, ok.url], DOC, cap_s=0.5)
    assert time.monotonic() - started < 2.0
    assert r.posts and ok.posts  # the one that hangs holds up no other


def test_the_caller_goes_on_at_once_and_the_post_goes_out_later(receiver, tmp_path):
    """`send` hands the POST to a detached process: a receiver that hangs never holds up the run's wrapper."""
    hang, ok = receiver(None), receiver(200)
    (tmp_path / "etc/mnist-cloud").mkdir(parents=True)
    (tmp_path / "etc/mnist-cloud/notify.json").write_text(json.dumps({"urls": [hang.url, ok.url]}))
    started = time.monotonic()
    out = subprocess.run([sys.executable, str(source_path("notify.py")), "send", "autostop", "idle for 30 min"],
                         cwd=tmp_path, env={"MNIST_CLOUD_ROOT": str(tmp_path), "MNIST_CLOUD_NOTIFY_CAP_S": "3"},
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and time.monotonic() - started < 1.5, out
    deadline = time.monotonic() + 8
    while not ok.posts and time.monotonic() < deadline:
        time.sleep(0.05)
    assert json.loads(ok.posts[0][2])["event"] == "autostop"


def test_a_run_end_says_finished_with_accuracy_and_cost_or_failed_with_the_last_line(notify, tmp_path, monkeypatch):
    import runspec

    monkeypatch.chdir(tmp_path)
    files = {"config": runspec.CONFIG, "result": runspec.RESULT, "metrics": runspec.METRICS}
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (tmp_path / "jobs").mkdir()
    (run / runspec.CONFIG).write_text(json.dumps({"status": "completed", "cloud": {"price_per_hour": 3.6}}))
    (run / runspec.RESULT).write_text(json.dumps({"test_acc": 99.123, "weights": "final"}))
    (run / runspec.METRICS).write_text(json.dumps({"epoch": 1, "elapsed": 10.0}) + "\n")
    event, text, fields = notify.run_ended("r1", "0", files)
    assert (event, text) == ("finished", "r1 finished: test accuracy 99.12% (final weights), cost $0.010")
    assert fields["test_acc"] == 99.123 and fields["cost_usd"] == pytest.approx(0.01)
    (run / runspec.CONFIG).write_text(json.dumps({"status": "running"}))
    (tmp_path / "jobs" / "r1.log").write_text("Epoch: 1 | ...\nRuntimeError: CUDA out of memory\n\n")
    assert notify.run_ended("r1", "1", files)[:2] == ("failed", "r1 failed (exit 1): RuntimeError: CUDA out of memory")
    (run / runspec.CONFIG).write_text(json.dumps({"status": "interrupted"}))
    assert notify.run_ended("r1", "143", files) is None  # the spot watcher or the budget says why
    assert notify.run_ended("r2", "0", files) is None  # on a cluster, the node that holds the run tells of it
    assert notify.run_ended("r2", "1", files)[0] == "failed"


def test_a_spot_notice_goes_to_the_notifier_beside_the_watcher(tmp_path):
    """spot_watch.py calls jobs/notify.py (as `train --on --notify` leaves it there) with the notice."""
    from fixtures.instance import FakeImds

    jobs = tmp_path / "jobs"
    jobs.mkdir()
    shutil.copy(source_path("spot_watch.py"), jobs / "spot_watch.py")
    said = tmp_path / "said.json"
    (jobs / "notify.py").write_text(f"import json, sys\nopen({str(said)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    (jobs / "r1.pid").write_text(f"{run.pid}\n")
    imds = FakeImds("127.0.0.1")
    imds.notice = {"action": "stop", "time": "2026-12-05T00:00:00Z"}
    try:
        out = subprocess.run([sys.executable, "jobs/spot_watch.py", "--pid-file", "jobs/r1.pid", "--imds", imds.url,
                              "--interval", "0.1"], cwd=tmp_path, capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out
        assert run.wait(timeout=10) == -15
    finally:
        imds.close()
        if run.poll() is None:
            run.kill()
    argv = json.loads(said.read_text())
    assert argv[:2] == ["send", "spot"] and argv[2].startswith("r1: spot interruption notice") and "stop" in argv[2]


def test_launch_installs_the_notifier_and_its_urls_with_mode_600(receiver, tmp_path):
    """The installer (launch's user data) writes the URLs only its owner can read; the watchdog's notifier is there."""
    from infra.watchdog import AutostopConfig, installer

    r = receiver()
    script = tmp_path / "install.sh"
    script.write_text(installer(AutostopConfig(enabled=False), notify=[r.url]))
    root = tmp_path / "root"
    out = subprocess.run(["bash", str(script)], env={"MNIST_CLOUD_ROOT": str(root), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out
    urls = root / "etc/mnist-cloud/notify.json"
    assert json.loads(urls.read_text()) == {"urls": [r.url]} and urls.stat().st_mode & 0o777 == 0o600
    sent = subprocess.run([sys.executable, str(root / "usr/local/bin/mnist-cloud-notify"), "send", "autostop", "idle",
                           "--wait"], env={"MNIST_CLOUD_ROOT": str(root)}, cwd=tmp_path, capture_output=True, timeout=30)
    assert sent.returncode == 0 and json.loads(r.posts[0][2])["event"] == "autostop", sent
