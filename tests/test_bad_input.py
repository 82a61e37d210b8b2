"""The bad-input table: each row is one line on stderr, exit code 2, no traceback, and no change to
state (local state file, runs/, and what EC2 holds)."""

from __future__ import annotations

import hashlib
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest
import torch

from fixtures.aws import aws_env, moto_server, seed_dlami
from fixtures.cli import assert_user_error, run_cli


@pytest.fixture(scope="module")
def world(tmp_path_factory, mnist_cloud, mnist_dir):
    """A moto server with one launched instance, a finished local run, and some broken files."""
    with moto_server() as endpoint:
        yield from _world(endpoint, tmp_path_factory, mnist_cloud, mnist_dir)


def _world(endpoint, tmp_path_factory, mnist_cloud, mnist_dir):
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).read()
    seed_dlami()
    root = tmp_path_factory.mktemp("bad-input")
    env = aws_env(root, AWS_ENDPOINT_URL=endpoint, MNIST_DATA_DIR=str(mnist_dir))
    launched = run_cli([*mnist_cloud, "launch", "--instance", "g4dn.xlarge", "--name", "real", "--ssh-cidr",
                        "192.0.2.1/32", "--no-wait-ssh"], env_extra=env, cwd=root)
    assert launched.returncode == 0, launched.stderr
    trained = run_cli([*mnist_cloud, "train", "--epochs", "1", "--max-steps", "2", "--eval-limit", "200",
                       "--run-id", "done", "--no-progress", "--no-report"], env_extra=env, cwd=root)
    assert trained.returncode == 0, trained.stderr

    corrupt = root / "corrupt-data"
    corrupt.mkdir()
    for f in mnist_dir.glob("*-ubyte.gz"):
        shutil.copy(f, corrupt / f.name)
    raw = bytearray((corrupt / "t10k-images-idx3-ubyte.gz").read_bytes())
    (corrupt / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(raw[: len(raw) // 2]))  # truncated
    (root / "broken.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    flipped = bytearray((root / "runs" / "done" / "model.pt").read_bytes())
    flipped[len(flipped) // 2] ^= 0x01  # one bit: torch.load alone would not notice
    (root / "flipped.pt").write_bytes(bytes(flipped))
    shutil.copy(root / "runs" / "done" / "model.pt.sha256", root / "flipped.pt.sha256")
    torch.save(torch.nn.Linear(2, 2), root / "module.pt")  # a pickled model, not our checkpoint
    open_key = root / "open_key"
    open_key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    open_key.chmod(0o644)
    closed_key = root / "closed_key"
    closed_key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    closed_key.chmod(0o600)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    yield {"root": root, "env": env, "endpoint": endpoint, "closed_port": closed_port,
           "busy_port": busy.getsockname()[1]}
    busy.close()


def snapshot(world) -> dict:
    """Everything a bad command must leave alone."""
    import boto3

    root = world["root"]
    state = root / "mnist-cloud-home" / "state.json"
    ec2 = boto3.client("ec2", endpoint_url=world["endpoint"], region_name="us-east-1",
                       aws_access_key_id="t", aws_secret_access_key="t")
    instances = sorted((i["InstanceId"], i["State"]["Name"]) for r in ec2.describe_instances()["Reservations"]
                       for i in r["Instances"])
    groups = sorted(g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"])
    files = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(root.rglob("*")) if p.is_file() and "cache" not in p.parts}
    return {"state": state.read_text() if state.exists() else None, "instances": instances, "groups": groups,
            "files": files}


ROWS = [
    ("unknown instance type", ["launch", "--instance", "g9.huge", "--ssh-cidr", "192.0.2.1/32"], {},
     "unknown instance type"),
    # a region that is none: its endpoint does not resolve (forged: a closed port, the same EndpointConnectionError)
    ("unknown region", ["status", "--region", "mars-1"], {"AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                                                          "AWS_MAX_ATTEMPTS": "1"}, "check --region ('mars-1'"),
    ("no credentials", ["status"], {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}, "no AWS credentials"),
    ("no region at all", ["status"], {"AWS_DEFAULT_REGION": ""}, "no AWS region"),
    ("a name that doesn't exist", ["stop", "ghost"], {}, "no instance named 'ghost'"),
    ("train on an unknown name", ["train", "--on", "ghost"], {}, "unknown name 'ghost'"),
    # checked on the laptop, before connecting: "real" has no SSH server behind it, so a check made
    # only on the machine would fail on connecting instead
    ("a bad trainer flag for a remote run", ["train", "--on", "real", "--epochs", "-3"], {},
     "--epochs must be at least 1"),
    ("a trainer flag that isn't one, for a remote run", ["train", "--on", "real", "--lr", "fast"], {},
     "argument --lr: invalid float value: 'fast'"),
    ("a remote-only flag for a local run", ["train", "--gpus", "2", "--epochs", "1"], {},
     "--env, --no-desktop-notify, --budget and --notify need --on NAME"),
    ("a --notify that is no URL", ["train", "--on", "real", "--notify", "slack:hooks.slack.com/T/SECRET"], {},
     "--notify slack:…: not an http(s) URL"),
    ("a budget that is no amount", ["budget", "real", "-3"], {}, "the budget is USD above 0"),
    ("a budget for an unknown name", ["budget", "ghost", "5"], {}, "unknown name 'ghost'"),
    ("a run's budget that is no amount", ["train", "--on", "real", "--budget", "lots"], {}, "--budget is USD above 0"),
    ("a launch's budget that is no amount", ["launch", "--instance", "g4dn.xlarge", "--budget", "0"], {},
     "--budget is USD above 0"),
    ("--ssh-cidr that isn't a CIDR", ["launch", "--instance", "g4dn.xlarge", "--ssh-cidr", "10.0.0.300/8"], {},
     "is not a CIDR"),
    ("an IPv6 --ssh-cidr", ["launch", "--instance", "g4dn.xlarge", "--ssh-cidr", "2001:db8::1/128"], {}, "is IPv6"),
    ("an unknown model", ["train", "--model", "resnet152"], {}, "unknown model 'resnet152'"),
    ("negative epochs", ["train", "--epochs", "-3"], {}, "--epochs must be at least 1"),
    ("a target above 100", ["train", "--target", "100.5"], {}, "--target"),
    ("a missing data dir", ["train", "--data-dir", "{root}/no-such-dir"], {}, "is not a directory"),
    ("a corrupt IDX file", ["train", "--data-dir", "{root}/corrupt-data"], {}, "t10k-images-idx3-ubyte.gz"),
    ("a corrupt checkpoint", ["evaluate", "{root}/broken.pt"], {}, "corrupt or truncated"),
    ("a checkpoint with one bit flipped", ["evaluate", "{root}/flipped.pt"], {},
     "flipped.pt is corrupt or truncated (its sha256 does not match flipped.pt.sha256)"),
    ("a pickled model, not a checkpoint", ["evaluate", "{root}/module.pt"], {},
     "is not an mnist-cloud checkpoint torch can load (Unsupported global"),
    ("a key file with open permissions", ["attach", "--host", "me@127.0.0.1:{closed_port}", "--key",
                                          "{root}/open_key", "--name", "box"], {}, "chmod 600"),
    ("attach --host to a closed port", ["attach", "--host", "me@127.0.0.1:{closed_port}", "--key",
                                        "{root}/closed_key", "--name", "box"], {}, "cannot reach box"),
    ("an unknown run id", ["train", "--resume", "{root}/runs/no-such-run"], {}, "not a run directory"),
    ("an unknown run id for a report", ["report", "{root}/runs/no-such-run"], {}, "does not exist"),
    ("a port already in use for Jupyter", ["jupyter", "real", "--port", "{busy_port}"], {}, "is in use"),
    ("a bad flag", ["train", "--epochs", "many"], {}, "invalid int value"),
    ("--device cuda without a GPU", ["train", "--device", "cuda"], {"CUDA_VISIBLE_DEVICES": ""}, "no CUDA GPU"),
    ("--compile-mode without --compile", ["train", "--compile-mode", "reduce-overhead"], {}, "needs --compile"),
    ("--cuda-graph with Adam", ["train", "--cuda-graph", "--optimizer", "adam"], {}, "--optimizer sgd only"),
    ("an unknown flag", ["status", "--verbose-please"], {}, "unrecognized arguments"),
    ("a tiny disk", ["launch", "--instance", "g4dn.xlarge", "--disk-gb", "1", "--ssh-cidr", "192.0.2.1/32"], {},
     "--disk-gb"),
    ("no IP to open SSH to", ["launch", "--instance", "g4dn.xlarge", "--name", "fresh"], {},
     "could not detect your public IP"),
    ("negative autostop", ["autostop", "real", "-i", "-5"], {}, "0 or more"),
    ("a bad instance name", ["launch", "--instance", "g4dn.xlarge", "--name", "My_Box"], {}, "lowercase"),
    ("a disk smaller than the AMI's snapshot", ["launch", "--instance", "g4dn.xlarge", "--name", "small",
                                                "--disk-gb", "10", "--ssh-cidr", "192.0.2.1/32"], {},
     "smaller than the root snapshot"),
    ("a GPU the DLAMI dropped", ["launch", "--instance", "p3dn.24xlarge", "--name", "volta", "--ssh-cidr",
                                "192.0.2.1/32"], {}, "is not supported by the current PyTorch"),
    ("resume a finished run", ["train", "--resume", "{root}/runs/done"], {}, "already finished"),
    ("an image that isn't one", ["predict", "{root}/runs/done", "{root}/broken.pt"], {}, "cannot decode"),
]


@pytest.mark.slow
@pytest.mark.parametrize("what,args,env,needle", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(world, mnist_cloud, what, args, env, needle):
    args = [a.format(root=world["root"], closed_port=world["closed_port"], busy_port=world["busy_port"])
            for a in args]
    before = snapshot(world)
    proc = run_cli([*mnist_cloud, *args], env_extra={**world["env"], **env}, cwd=world["root"])
    assert_user_error(proc, needle)
    assert snapshot(world) == before, what


def test_the_table_is_at_least_15_rows():
    assert len(ROWS) >= 15
