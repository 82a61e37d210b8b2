"""The whole remote loop through the `mnist-cloud` executable, with real parts: a moto server on
127.0.0.1 whose fake public IP is mapped to a real OpenSSH server in a network namespace, rsync,
the trainer running there, and JupyterLab through the tunnel."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

import pytest

import runspec
from fixtures import REPO
from fixtures.aws import launch_fresh
from fixtures.cli import assert_user_error, first_line_with, output_lines, run_cli, wait_for
from fixtures.receiver import Receiver
from fixtures.ssh import LEAK_CANARY
from fixtures.sshhost import SSHTestHost

TINY = ["--epochs", "1", "--train-limit", "1024", "--eval-limit", "500", "--batch-size", "128"]


@pytest.fixture(scope="module")
def launched(cli, ssh_host_moto):
    assert "SSH is up" in launch_fresh(cli, ssh_host_moto, "e2e").stdout
    yield "e2e"


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def desktop(tmp_path) -> tuple[dict[str, str], Path]:
    """A laptop desktop session whose notify-send records each notification (title, body) in a file."""
    bin_dir, said = tmp_path / "bin", tmp_path / "notifications"
    bin_dir.mkdir()
    tool = bin_dir / "notify-send"
    tool.write_text(f'#!/bin/sh\nshift\nprintf "%s | %s\\n" "$1" "$2" >> {said}\n')
    tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "DISPLAY": ":99"}, said


@pytest.mark.slow
def test_train_on_instance_streams_pulls_and_matches(cli, launched, ssh_host, project_checkout, mnist_dir,
                                                      tmp_path):
    session, said = desktop(tmp_path)
    hook = Receiver(host=f"{ssh_host.subnet}.1")  # the instance's agents reach the laptop over the veth pair
    # and two receivers that fail: one answers 500, one never answers; neither may harm the run
    failing, silent = Receiver(500, host=f"{ssh_host.subnet}.1"), Receiver(None, host=f"{ssh_host.subnet}.1")
    try:
        out = cli("train", "--on", launched, *TINY, "--data-dir", str(mnist_dir), "--run-id", "remote1",
                  "--notify", hook.url, "--notify", failing.url, "--notify", f"slack:{silent.url}", env=session)
        assert out.returncode == 0, out.stdout + out.stderr
        wait_for(lambda: hook.posts and len(failing.posts) >= 2 and silent.posts, timeout=30)
    finally:
        for receiver in (hook, failing, silent):
            receiver.close()
    assert len(hook.posts) == 1  # answered: told once
    assert "remote1 finished: test accuracy" in json.loads(silent.posts[0][2])["text"]  # in Slack's format
    assert "SECRET-TOKEN" not in out.stdout + out.stderr and f"http://{ssh_host.subnet}.1/…" in out.stdout
    assert "synced" in out.stdout and "setting up e2e" in out.stdout
    assert "Epoch: 1 | Train Loss:" in out.stdout  # streamed live from the instance
    assert re.search(r"test accuracy \d+\.\d\d% \(final weights, model.pt\)", out.stdout), out.stdout
    local = project_checkout / "runs" / "remote1"
    remote = ssh_host.home / "mnist-cloud" / "e2e" / "runs" / "remote1"
    assert (local / "result.json").exists() and (local / "model.pt").exists()
    assert tree_hashes(local) == tree_hashes(remote)  # the pulled run dir is the remote one, byte for byte
    config = json.loads((local / "config.json").read_text())
    assert config["status"] == "completed" and config["git"]["sha"] is None  # the copy has no .git
    result = json.loads((local / "result.json").read_text())
    # the machine tells the --notify URL, with the delivered weights' test accuracy
    told = json.loads(hook.posts[0][2])
    assert (told["event"], told["run_id"], told["test_acc"]) == ("finished", "remote1", result["test_acc"]), told
    # the laptop says so on the desktop when the run it follows ends
    assert said.read_text().splitlines() == [
        f"mnist-cloud: remote1 finished | test accuracy {result['test_acc']:.2f}% on {launched}; pulled into "
        f"runs/remote1"]

    runs = cli("runs", launched)
    assert runs.returncode == 0, runs.stdout + runs.stderr
    line = next(l for l in runs.stdout.splitlines() if l.startswith("remote1 "))
    result = json.loads((local / "result.json").read_text())  # the delivered weights' test accuracy
    assert line.split()[1:] == ["completed", "1", f"{result['test_acc']:.2f}%", "final"], line
    listed = cli("runs", launched, "--json")  # the same row, as JSON and nothing else on stdout
    assert listed.returncode == 0, listed.stdout + listed.stderr
    [record] = [r for r in json.loads(listed.stdout) if r["run_id"] == "remote1"]
    assert (record["status"], record["epochs"], record["test_acc"], record["weights"]) == (
        "completed", 1, result["test_acc"], "final")
    logs = cli("logs", launched, "remote1")
    assert logs.returncode == 0 and "Epoch: 1 |" in logs.stdout


@pytest.mark.slow
def test_your_own_model_file_travels_with_the_code(cli, launched, ssh_host, project_checkout, mnist_dir, tmp_path):
    """`--model models/mynet.py:Net` (the path as typed on the laptop, absolute here) trains there as it
    would here, and comes back like any other run."""
    from fixtures.project import MYNET, NET_PARAMS

    (project_checkout / "models").mkdir(exist_ok=True)
    (project_checkout / "models" / "mynet.py").write_text(MYNET)
    session, said = desktop(tmp_path)
    out = cli("train", "--on", launched, "--model", f"{project_checkout / 'models' / 'mynet.py'}:Net", *TINY,
              "--no-report", "--data-dir", str(mnist_dir), "--run-id", "own-model", "--no-desktop-notify",
              env=session)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not said.exists()  # --no-desktop-notify: a desktop there, and nothing shown on it
    local = project_checkout / "runs" / "own-model"
    model = json.loads((local / "config.json").read_text())["model"]
    assert model["name"] == "models/mynet.py:Net" and model["params"] == NET_PARAMS  # named as the machine has it
    assert model["source"]["sha256"] == hashlib.sha256(MYNET.encode()).hexdigest()
    assert (ssh_host.home / "mnist-cloud" / "e2e" / "models" / "mynet.py").read_text() == MYNET
    assert (local / "model.pt").exists()


def test_secrets_never_reach_the_instance_and_resync_sends_nothing(cli, launched, ssh_host):
    assert cli("sync", launched).returncode == 0
    workdir = ssh_host.home / "mnist-cloud" / "e2e"
    assert (workdir / "trainer" / "train.py").exists()
    names = {p.name for p in workdir.rglob("*")}
    assert ".env" not in names and "deploy.pem" not in names and ".aws" not in names and "id_ed25519" not in names
    assert "kaggle.json" not in names and ".kube" not in names
    again = cli("sync", launched)
    assert again.returncode == 0 and "synced 0 file(s)" in again.stdout


def test_sync_keeps_notebooks_made_on_the_machine(cli, launched, ssh_host):
    """Jupyter runs in the work dir: a notebook written there must survive the next sync, while a
    file deleted here is still deleted there (the mirror stays a mirror for code)."""
    workdir = ssh_host.home / "mnist-cloud" / "e2e"
    assert cli("sync", launched).returncode == 0
    notebook, stale = workdir / "analysis.ipynb", workdir / "trainer" / "stale_module.py"
    notebook.write_text('{"cells": []}')
    stale.write_text("x = 1\n")
    try:
        assert cli("sync", launched).returncode == 0
        assert notebook.read_text() == '{"cells": []}'
        assert not stale.exists()
    finally:
        notebook.unlink(missing_ok=True)


def test_changed_file_is_synced_even_with_the_same_size_and_mtime(cli, launched, ssh_host, project_checkout):
    assert cli("sync", launched).returncode == 0
    path = project_checkout / "trainer" / "__init__.py"
    before = path.stat()
    text = path.read_text()
    path.write_text(text.replace("0.1.0", "0.9.0"))  # same length
    os.utime(path, (before.st_atime, before.st_mtime))  # same mtime: only --checksum notices
    try:
        out = cli("sync", launched)
        assert "synced 1 file(s)" in out.stdout
        assert "0.9.0" in (ssh_host.home / "mnist-cloud" / "e2e" / "trainer" / "__init__.py").read_text()
    finally:
        path.write_text(text)
        cli("sync", launched)


@pytest.mark.slow
def test_remote_exit_status_becomes_ours(cli, launched, mnist_dir):
    out = cli("train", "--on", launched, "--model", "nope", "--data-dir", str(mnist_dir))
    assert out.returncode == 2
    assert "unknown model 'nope'" in out.stdout


def test_detach_then_logs_follow_and_pull(cli, launched, project_checkout, mnist_dir, ssh_host, tmp_path):
    out = cli("train", "--on", launched, *TINY, "--data-dir", str(mnist_dir), "--run-id", "detached1", "--detach")
    assert out.returncode == 0 and "mnist-cloud logs e2e detached1 -f" in out.stdout
    # AWS credentials never reach the instance: not in the trainer's environment, not in any file there
    # the pid file names the job's wrapper shell (in the machine's own PID namespace); the trainer is its child
    wrapper = (ssh_host.home / "mnist-cloud" / "e2e" / "jobs" / "detached1.pid").read_text().strip()

    def trainer() -> str:
        return ssh_host.exec(f"pgrep -P {wrapper} -f 'python.* -m trainer train'").stdout.strip()

    wait_for(trainer, timeout=60, step=0.05)  # still starting: torch alone takes seconds to import
    environ = ssh_host.exec(f"cat /proc/{trainer()}/environ").stdout
    assert "PATH=" in environ and "--run-id\0detached1" in ssh_host.exec(f"cat /proc/{trainer()}/cmdline").stdout
    assert LEAK_CANARY not in environ and "AWS_SECRET_ACCESS_KEY" not in environ
    leaked = subprocess.run(["grep", "-rl", LEAK_CANARY, str(ssh_host.home / "mnist-cloud")], capture_output=True,
                            text=True)
    assert leaked.stdout == ""
    session, said = desktop(tmp_path)
    follow = cli("logs", launched, "detached1", "-f", env=session)
    assert follow.returncode == 0 and "test accuracy" in follow.stdout and "finished with exit 0" in follow.stdout
    assert said.read_text().startswith("mnist-cloud: detached1 finished | test accuracy ")
    pulled = cli("pull", launched, "detached1")
    assert pulled.returncode == 0 and (project_checkout / "runs" / "detached1" / "result.json").exists()
    again = cli("pull", launched, "detached1")
    assert "pulled 0 file(s)" in again.stdout  # incremental


def test_pull_keeps_a_locally_edited_file(cli, launched, project_checkout, ssh_host):
    remote = ssh_host.home / "mnist-cloud" / "e2e" / "runs" / "edited"  # its own run: needs no other test first
    remote.mkdir(parents=True)
    (remote / "config.json").write_text('{"run_id": "edited", "status": "completed"}')
    (remote / "train.log").write_text("Epoch: 1 | Train Loss: 0.1\n")
    os.utime(remote / "train.log", (time.time() - 3600,) * 2)  # written an hour ago
    assert cli("pull", launched, "edited").returncode == 0
    local = project_checkout / "runs" / "edited" / "train.log"
    local.write_text("my notes\n")  # edited here since
    out = cli("pull", launched, "edited")
    assert out.returncode == 0 and "kept your local edit" in out.stdout and "replaced 1 local file" in out.stdout
    kept = list(local.parent.glob("train.log.local-*"))
    assert len(kept) == 1 and kept[0].read_text() == "my notes\n"
    assert "Epoch: 1" in local.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])  # Ctrl-C; `kill`, or a closed terminal (SIGHUP alike)
def test_jupyter_through_the_tunnel(cli, launched, laptop_env, mnist_cloud, project_checkout, ssh_host, stop):
    # Ctrl-C as in a terminal: a suite started in the background (`pytest &`) has SIGINT ignored, the
    # child would inherit that, and Python then installs no KeyboardInterrupt handler (seen in CI runs
    # started with `&`). PYTHONFAULTHANDLER: if it hangs anyway, SIGABRT below prints every thread's stack.
    proc = subprocess.Popen([*mnist_cloud, "jupyter", launched], cwd=project_checkout,
                            env={**os.environ, **laptop_env, "PYTHONFAULTHANDLER": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = output_lines(proc)
        base, token = first_line_with(out, "/lab?token=").split("/lab?token=")
        ok = urllib.request.urlopen(urllib.request.Request(f"{base}/api/status",
                                                           headers={"Authorization": f"token {token}"}))
        assert ok.status == 200
        # the notebook the README points to, synced with the code and served from the work dir
        nb = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{base}/api/contents/notebooks/train_on_instance.ipynb", headers={"Authorization": f"token {token}"})
        ).read())
        assert nb["type"] == "notebook" and any("fit(cfg, typed)" in "".join(c["source"]) for c in nb["content"]["cells"])
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{base}/api/status")
        assert denied.value.code == 403
        # bound to the instance's loopback only: not reachable on its network address
        listening = ssh_host.exec("ss -ltnH")
        jupyter_ports = [l.split()[3] for l in listening.stdout.splitlines() if ":22 " not in l and l.strip()]
        assert jupyter_ports and all(a.startswith("127.0.0.1:") for a in jupyter_ports), listening.stdout
        proc.send_signal(getattr(signal, stop))
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=30)
            raise AssertionError(f"jupyter did not stop on {stop}:\n" + "".join(iter(lambda: out.get(timeout=10), "")))
        rest = "".join(iter(lambda: out.get(timeout=10), ""))  # what the reader got after the URL, to EOF
        assert proc.returncode == 0, rest
        assert "stopped JupyterLab" in rest
        remaining = [l for l in ssh_host.exec("ss -ltnH").stdout.splitlines() if "127.0.0.1:" in l]
        assert remaining == []  # the server is gone
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_tensorboard_through_the_tunnel(launched, laptop_env, mnist_cloud, project_checkout, ssh_host):
    """`mnist-cloud tensorboard NAME` serves the machine's runs/ (a run's event files show), bound to its
    127.0.0.1 only, and Ctrl-C stops it."""
    from torch.utils.tensorboard import SummaryWriter  # here: the module's other tests need no torch

    with SummaryWriter(str(ssh_host.home / "mnist-cloud" / launched / "runs" / "boarded" / runspec.TENSORBOARD)) as w:
        w.add_scalar("accuracy/val", 98.5, 1)
    proc = subprocess.Popen([*mnist_cloud, "tensorboard", launched], cwd=project_checkout,
                            env={**os.environ, **laptop_env, "PYTHONFAULTHANDLER": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = output_lines(proc)
        url = first_line_with(out, "http://127.0.0.1:")

        def tags() -> dict:
            with urllib.request.urlopen(f"{url}data/plugin/scalars/tags", timeout=10) as response:
                return json.loads(response.read())

        wait_for(lambda: "accuracy/val" in tags().get(f"boarded/{runspec.TENSORBOARD}", {}), timeout=60)
        listening = [l.split()[3] for l in ssh_host.exec("ss -ltnH").stdout.splitlines() if ":22 " not in l and l]
        assert listening and all(a.startswith("127.0.0.1:") for a in listening), listening
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        rest = "".join(iter(lambda: out.get(timeout=10), ""))
        assert proc.returncode == 0 and "stopped TensorBoard" in rest, rest
        assert [l for l in ssh_host.exec("ss -ltnH").stdout.splitlines() if "127.0.0.1:" in l] == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_jupyter_port_in_use_is_a_clear_error(cli, launched):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_user_error(cli("jupyter", launched, "--port", str(port)), f"local port {port} is in use")


def test_ssh_runs_a_command(cli, launched):
    out = cli("ssh", launched, "--", "echo", "hello-from", "$HOME")
    assert out.returncode == 0 and out.stdout.startswith("hello-from /")


def test_ssh_config_entry(cli, launched, laptop_env):
    out = cli("ssh-config")
    assert out.returncode == 0
    text = (cli.home / "ssh_config").read_text()
    assert "Host mnist-e2e" in text and "HostKeyAlias i-" in text and "StrictHostKeyChecking yes" in text
    probe = subprocess.run(["ssh", "-F", str(cli.home / "ssh_config"), "-o", "BatchMode=yes", "mnist-e2e", "true"],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode == 0, probe.stderr


def test_changed_host_key_is_refused(cli, launched, ssh_host):
    ssh_host.restart_with_new_host_key()
    try:
        out = cli("runs", launched)
        assert_user_error(out, "CHANGED")
        rsync = cli("sync", launched)
        assert_user_error(rsync, "CHANGED")
    finally:  # even when the refusal is missing: later tests in the module need the new key pinned
        forgot = cli("forget-host", launched)
    assert forgot.returncode == 0, forgot.stdout + forgot.stderr
    assert cli("runs", launched).returncode == 0  # re-pinned after the user said so


@pytest.mark.slow
def test_attach_host_runs_the_same_flow(cli, ssh_host, project_checkout, mnist_dir, tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    ssh_host.authorize((tmp_path / "id_ed25519.pub").read_text())
    out = cli("attach", "--host", f"ubuntu@{ssh_host.addr}", "--key", str(key), "--name", "box")
    assert out.returncode == 0, out.stderr
    out = cli("train", "--on", "box", *TINY, "--data-dir", str(mnist_dir), "--run-id", "boxrun")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (project_checkout / "runs" / "boxrun" / "result.json").exists()


def test_attach_host_closed_port_records_nothing(cli, tmp_path, ssh_host):
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    before = (cli.home / "state.json").read_text()
    assert_user_error(cli("attach", "--host", f"ubuntu@{ssh_host.addr}:2", "--key", str(key), "--name", "closed"),
                      "cannot reach closed")
    assert (cli.home / "state.json").read_text() == before


@pytest.mark.slow
def test_sweep_on_the_instance_pulls_every_run(cli, launched, project_checkout, mnist_dir, ssh_host):
    hook = Receiver(host=f"{ssh_host.subnet}.1")
    try:
        out = cli("sweep", "--on", launched, "--seeds", "1,2", *TINY, "--no-report", "--data-dir", str(mnist_dir),
                  "--name", "rsweep", "--notify", hook.url)
        assert out.returncode == 0, out.stdout + out.stderr
        wait_for(lambda: len(hook.posts) >= 2, timeout=30)
    finally:
        hook.close()
    told = sorted((json.loads(body)["event"], json.loads(body)["run_id"]) for _, _, body in hook.posts)
    assert "sweep: 2 run(s) on 1 slot(s): e2e" in out.stdout  # no GPU there: one run at a time
    points = json.loads((project_checkout / "runs" / "rsweep.json").read_text())["points"]
    assert [p["status"] for p in points] == ["completed", "completed"]
    for p in points:
        local = project_checkout / "runs" / p["run_id"]
        remote = ssh_host.home / "mnist-cloud" / "e2e" / "runs" / p["run_id"]
        assert tree_hashes(local) == tree_hashes(remote)  # ran there, pulled back whole
        assert json.loads((local / "config.json").read_text())["config"]["seed"] == p["seed"]
    assert told == sorted(("finished", p["run_id"]) for p in points)  # each run's end, from the machine
    line = next(l for l in out.stdout.splitlines() if l.startswith("defaults "))
    assert "2/2" in line


def test_down_after_remote_work(cli, launched):
    out = cli("down", launched, "--yes")
    assert out.returncode == 0 and "1 instance(s)" in out.stdout


def test_list_runs_reports_result_json_not_the_epochs(tmp_path):
    """What list_runs runs on the machine (runspec, as `python3 -c`), run here on a forged workdir: test
    accuracy and weights come from result.json (per-epoch test is null without --test-every-epoch)."""
    import runspec
    from infra.commands.machine import run_record, runs_table

    def forge(run_id, status, result=None):
        d = tmp_path / "runs" / run_id
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"status": status}))
        (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": None}) + "\n"
                                         + json.dumps({"event": "resumed"}) + "\n"
                                         + json.dumps({"epoch": 2, "test_acc": 12.5}) + "\n")
        if result is not None:
            (d / "result.json").write_text(json.dumps(result))

    forge("a-ema", "completed", {"test_acc": 99.45, "weights": "ema"})
    forge("b-old", "completed", {"test_acc": 98.5})  # an older version's result.json: the final weights
    forge("c-gone", "running")  # no result yet, and no process: it died
    source = Path(runspec.__file__).read_text()
    out = subprocess.run([sys.executable, "-c", source, str(tmp_path)], capture_output=True, text=True, check=True)
    rows = [json.loads(l) for l in out.stdout.splitlines()]
    assert [(r["run_id"], r["epochs"], r["test_acc"], r["weights"], r["alive"]) for r in rows] == [
        ("a-ema", 2, 99.45, "ema", False), ("b-old", 2, 98.5, "final", False), ("c-gone", 2, None, None, False)]
    records = [run_record(r) for r in rows]
    lines = runs_table(records)
    assert lines[0].split() == ["RUN", "STATUS", "EPOCHS", "TEST", "ACC", "WEIGHTS"]
    assert [l.split() for l in lines[1:]] == [["a-ema", "completed", "2", "99.45%", "ema"],
                                              ["b-old", "completed", "2", "98.50%", "final"],
                                              ["c-gone", "died", "2", "-", "-"]]
    # `runs --json`: the same facts, typed, under the keys docs/reference.md lists; the time in ISO 8601, UTC
    printed = json.loads(json.dumps(records))
    assert [list(r) for r in printed] == [["run_id", "status", "alive", "epochs", "test_acc", "weights",
                                           "modified_at"]] * 3
    assert [(r["run_id"], r["status"], r["epochs"], r["test_acc"], r["weights"]) for r in printed] == [
        ("a-ema", "completed", 2, 99.45, "ema"), ("b-old", "completed", 2, 98.5, "final"),
        ("c-gone", "died", 2, None, None)]
    modified = datetime.fromisoformat(printed[0]["modified_at"])
    assert modified.utcoffset() == timedelta(0)
    assert modified.timestamp() == pytest.approx((tmp_path / "runs" / "a-ema").stat().st_mtime, abs=1e-3)


def test_sftp_fallback_syncs_and_pulls_the_same(ssh_host, project_checkout, tmp_path, monkeypatch):
    """When rsync is missing on either side the same sync/pull runs over SFTP."""
    from infra.remote import Endpoint, Remote

    monkeypatch.setenv("MNIST_CLOUD_HOME", str(tmp_path / "home"))
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    ssh_host.authorize((tmp_path / "id_ed25519.pub").read_text())
    ep = Endpoint(name="sftp", host=ssh_host.addr, user="ubuntu", key_path=str(key), workdir="mnist-cloud/sftp-test")
    with Remote(ep) as remote:
        first = remote.sync(project_checkout, log=lambda m: None, force_sftp=True)
        assert first.method == "sftp" and first.files > 20
        workdir = ssh_host.home / "mnist-cloud" / "sftp-test"
        assert ((workdir / "trainer" / "train.py").read_bytes()
                == (project_checkout / "trainer" / "train.py").read_bytes())
        names = {p.name for p in workdir.rglob("*")}
        assert not names & {".env", "deploy.pem", "credentials", "id_ed25519"}
        assert remote.sync(project_checkout, log=lambda m: None, force_sftp=True).files == 0
        (workdir / "made-there.ipynb").write_text("{}")  # a notebook from Jupyter on the machine
        (workdir / "trainer" / "stale_module.py").write_text("x = 1\n")  # code deleted here
        remote.sync(project_checkout, log=lambda m: None, force_sftp=True)
        assert (workdir / "made-there.ipynb").exists() and not (workdir / "trainer" / "stale_module.py").exists()
        (workdir / "runs" / "r1").mkdir(parents=True)
        (workdir / "runs" / "r1" / "metrics.jsonl").write_text('{"epoch": 1}\n')
        pulled = remote.pull("mnist-cloud/sftp-test/runs/r1", tmp_path / "local" / "r1", log=lambda m: None,
                             force_sftp=True)
        assert pulled.method == "sftp" and pulled.files == 1
        assert (tmp_path / "local" / "r1" / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
        assert not list((tmp_path / "local" / "r1").glob(".*part*"))
