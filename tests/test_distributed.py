"""torchrun/DDP for real on this machine: 2 CPU processes (gloo) against 1, a distributed resume, and a
two-node cluster launched and driven by the CLI through moto and two SSH test hosts on one bridge."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fixtures import REPO
from fixtures.aws import aws_env, moto_server, seed_dlami
from fixtures.cli import run_cli
from fixtures.runs import epochs_without_timing
from fixtures.sshhost import tools_available
from trainer.checkpoint import load_checkpoint

TINY = ["--device", "cpu", "--epochs", "3", "--train-limit", "8192", "--eval-limit", "2000", "--batch-size", "128", "--no-progress",
        "--no-report"]


def torchrun(nproc: int, args: list[str], tmp_path: Path, mnist_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "trainer", "train", *args, "--data-dir", str(mnist_dir), "--out-dir", str(tmp_path / "runs"),
           "--threads", "1"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def epochs(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, mnist_dir):
    """TINY on 2 processes, uninterrupted: what the 1-process run and the distributed resume are held to."""
    tmp = tmp_path_factory.mktemp("ddp")
    double = torchrun(2, [*TINY, "--run-id", "two"], tmp, mnist_dir)
    assert double.returncode == 0, double.stdout[-2000:] + double.stderr[-3000:]
    return tmp / "runs" / "two", double


@pytest.fixture(scope="module")
def one_and_two(two_processes, mnist_dir):
    two, double = two_processes
    single = subprocess.run([sys.executable, "-m", "trainer", "train", *TINY, "--run-id", "one", "--data-dir",
                             str(mnist_dir), "--out-dir", str(two.parent), "--threads", "2"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert single.returncode == 0, single.stderr
    return two.parent / "one", two, double


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(one_and_two):
    one, two, proc = one_and_two
    a, b = epochs(one), epochs(two)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2, 3]
    config = json.loads((two / "config.json").read_text())
    assert config["distributed"] == {"world_size": 2, "backend": "gloo"}
    # same steps (64 images per rank x 2 = the global batch of 128), same schedule
    assert [r["lr"] for r in a] == pytest.approx([r["lr"] for r in b])
    # different dropout/augmentation draws, per-rank BatchNorm on CPU: close, not identical
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (one, two))  # the delivered weights' test
    assert abs(ra["test_acc"] - rb["test_acc"]) < 1.5, (ra, rb)
    assert b[-1]["train_loss"] == pytest.approx(a[-1]["train_loss"], rel=0.25)
    assert rb["test_acc"] > 95


@pytest.mark.slow  # shares the slow 1- and 2-process runs
def test_only_rank_zero_writes(one_and_two):
    _, two, proc = one_and_two
    assert proc.stdout.count("Epoch: 3 |") == 1  # one console, not two
    assert sorted(p.name for p in two.parent.iterdir()) == ["one", "two"]
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_distributed_resume(two_processes, tmp_path, mnist_dir):
    """Stopped after epoch 1 of 3 on 2 processes and resumed on 2: the same run as the uninterrupted one."""
    straight, _ = two_processes
    first = torchrun(2, [*TINY, "--run-id", "r", "--stop-after", "1"], tmp_path, mnist_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = load_checkpoint(tmp_path / "runs" / "r" / "last.pt")  # here: a process of its own cost a torch import
    assert (saved["world_size"], len(saved["rng_ranks"])) == (2, 2)  # every rank's RNG state is in the checkpoint
    second = torchrun(2, ["--resume", str(tmp_path / "runs" / "r"), "--no-progress", "--no-report"], tmp_path, mnist_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    split = tmp_path / "runs" / "r"
    assert [r["epoch"] for r in epochs(split)] == [1, 2, 3]
    # Bit-for-bit, as one process's resume is (test_train.py): the same 2 ranks, each with 1 thread,
    # restore their own RNG streams, and gloo's all-reduce of 2 gradients is a single a + b, the same
    # sum in either order. A resume that dropped the weights, the optimizer state or a rank's RNG differs.
    assert epochs_without_timing(split) == epochs_without_timing(straight)
    delivered = [load_checkpoint(d / "model.pt")["model_state"] for d in (straight, split)]
    assert delivered[0].keys() == delivered[1].keys()
    assert all(torch.equal(delivered[0][k], delivered[1][k]) for k in delivered[0]), "model.pt differs"
    results = [json.loads((d / "result.json").read_text()) for d in (straight, split)]
    assert results[1]["test_acc"] == results[0]["test_acc"]


FIT_THEN_THREADS = textwrap.dedent("""
    import os, sys
    from trainer.cli import main
    code = main(sys.argv[1:])
    names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    print(f"rank {os.environ['RANK']} exit {code} threads {names}", flush=True)
""")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process's threads from /proc (Linux)")
def test_no_gloo_thread_outlives_fit(tmp_path, mnist_dir):
    """When fit() returns, the process group is gone for real: gloo's threads joined, its sockets closed. One
    left running into the interpreter's exit is woken there by the peer's closing socket, and a rank of a
    two-node run aborted at the very end ("terminate called without an active exception")."""
    script = tmp_path / "fit_then_threads.py"
    script.write_text(FIT_THEN_THREADS)
    small = ["--device", "cpu", "--epochs", "1", "--train-limit", "1024", "--eval-limit", "300", "--no-progress",
             "--no-report", "--data-dir", str(mnist_dir), "--out-dir", str(tmp_path / "runs"), "--threads", "1"]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), "train", *small], capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    # the two ranks print to one pipe: their lines may run together, so each report is found, not each line
    found = sorted(re.findall(r"rank (\d) exit (\d+) threads (\[[^\]]*\])", out.stdout))
    assert [(rank, code) for rank, code, _ in found] == [("0", "0"), ("1", "0")], out.stdout[-2000:]
    assert not [threads for _, _, threads in found if "gloo" in threads], found


# ---------------------------------------------------------------------------------- a two-node cluster
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = tools_available()
    if reason:
        pytest.skip(reason)
    from fixtures.sshhost import USER, Bridge, SSHTestHost, ensure_user

    work = tmp_path_factory.mktemp("cluster")
    ensure_user(USER)  # kept: another test session may be using it
    bridge = Bridge()
    hosts = [SSHTestHost(work / f"node{i}", index=i, bridge=bridge) for i in range(2)]
    addresses = iter([h.addr for h in hosts])  # node 0's instance gets the first host, node 1's the second
    try:
        bridge.create()
        for h in hosts:
            h.create_namespace()
            h.start()
        with moto_server(lambda: next(addresses), key_hosts=hosts) as endpoint:
            seed_dlami()
            yield {"hosts": hosts, "endpoint": endpoint}  # each node its own home: host.home
    finally:
        for h in hosts:
            h.teardown()
        bridge.delete()


@pytest.mark.slow
def test_two_nodes_through_the_cli(cluster, tmp_path, mnist_cloud, mnist_dir):
    import boto3

    env = aws_env(tmp_path, AWS_ENDPOINT_URL=cluster["endpoint"], MNIST_CLOUD_REMOTE_PYTHON=sys.executable)
    code = tmp_path / "project"
    shutil.copytree(REPO, code, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "runs", "__pycache__",
                                                              "*.egg-info", ".pytest_cache"))

    def cli(*args, timeout=300):
        try:
            return run_cli([*mnist_cloud, *args], env_extra=env, cwd=code, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            def text(b):
                return (b.decode() if isinstance(b, bytes) else b or "")[-4000:]
            logs = "".join(f"\n--- {f}\n{f.read_text()[-3000:]}"
                           for h in cluster["hosts"] for f in sorted((h.home / "mnist-cloud").glob("*/jobs/*.log")))
            raise AssertionError(f"{args[0]} timed out\n{text(e.stdout)}\n{text(e.stderr)}{logs}") from None

    out = cli("launch", "--instance", "g4dn.12xlarge", "--nodes", "2", "--name", "duo", "--ssh-cidr", "192.0.2.7/32")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cluster: 2 nodes" in out.stdout and out.stdout.count("SSH is up") == 2

    ec2 = boto3.client("ec2", endpoint_url=cluster["endpoint"], region_name="us-east-1", aws_access_key_id="t",
                       aws_secret_access_key="t")
    group = ec2.describe_security_groups(GroupNames=["mnist-cloud-duo"])["SecurityGroups"][0]
    rules = {(p["IpProtocol"], tuple(r["CidrIp"] for r in p["IpRanges"]), tuple(g["GroupId"] for g in p["UserIdGroupPairs"]))
             for p in group["IpPermissions"]}
    # SSH from the caller only; everything else only between members of this same group
    assert rules == {("tcp", ("192.0.2.7/32",), ()), ("-1", (), (group["GroupId"],))}
    nodes = sorted({t["Value"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
                    for t in i["Tags"] if t["Key"] == "mnist-cloud:node"})
    assert nodes == ["0", "1"]

    out = cli("train", "--on", "duo", "--nodes", "2", "--env", "GLOO_SOCKET_IFNAME=eth0",
              "--epochs", "2", "--train-limit", "1024", "--eval-limit", "300", "--no-report", "--data-dir",
              str(mnist_dir), "--run-id", "duo-run")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "rendezvous at" in out.stdout and "test accuracy" in out.stdout and "(final weights, model.pt)" in out.stdout
    config = json.loads((code / "runs" / "duo-run" / "config.json").read_text())
    assert config["distributed"]["world_size"] == 2 and config["status"] == "completed"
    assert len(epochs(code / "runs" / "duo-run")) == 2

    out = cli("train", "--on", "duo", "--gpus", "2", "--epochs", "1", "--train-limit", "1024", "--eval-limit", "300",
              "--no-report", "--data-dir", str(mnist_dir), "--run-id", "pair")  # one machine, torchrun x 2 (CPU: gloo)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads((code / "runs" / "pair" / "config.json").read_text())["distributed"]["world_size"] == 2

    down = cli("down", "duo", "--yes")
    assert down.returncode == 0 and "2 instance(s)" in down.stdout


@pytest.mark.slow
def test_distributed_resume_of_a_model_not_the_default(tmp_path, mnist_dir):
    """The saved config reaches every rank before any of them builds its model: a rank that built the
    default net from its own command line would not match rank 0's (DDP refuses mismatched ranks)."""
    small = ["--device", "cpu", "--model", "seed002-gap", "--epochs", "2", "--train-limit", "2048", "--eval-limit",
             "500", "--no-progress", "--no-report"]
    first = torchrun(2, [*small, "--run-id", "g", "--stop-after", "1"], tmp_path, mnist_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(2, ["--resume", str(tmp_path / "runs" / "g"), "--no-progress", "--no-report"], tmp_path, mnist_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [r["epoch"] for r in epochs(tmp_path / "runs" / "g")] == [1, 2]
    assert json.loads((tmp_path / "runs" / "g" / "config.json").read_text())["config"]["model"] == "seed002-gap"
