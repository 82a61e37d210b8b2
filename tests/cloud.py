"""Helpers for the AWS tests: a seeded moto (in-process or as a loopback server) and a clean AWS env.

moto ships no Deep Learning AMI and none of the /aws/service/deeplearning SSM parameters (and, as
on AWS, refuses put_parameter under /aws), so the fake DLAMI and its parameter go straight into
moto's backends. moto makes up public IPs (54.x.x.x) for its instances; a test must never contact
them, so every moto server the tests start maps them to loopback or to a network namespace the
test created itself (`moto_server`).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from moto.core import DEFAULT_ACCOUNT_ID

REGION = "us-east-1"
DLAMI_ID = "ami-0d1a0000000000012"
DLAMI_NAME = "Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.12 (Ubuntu 24.04) 20261101"
DLAMI_PARAMETERS = {
    # the newest PyTorch on Ubuntu must win; the Amazon Linux one is newer but not Ubuntu
    "oss-nvidia-driver-gpu-pytorch-2.12-ubuntu-24.04": DLAMI_ID,
    "oss-nvidia-driver-gpu-pytorch-2.9-ubuntu-22.04": "ami-0d1a0000000000009",
    "oss-nvidia-driver-gpu-pytorch-2.13-amazon-linux-2023": "ami-0d1a00000000000a1",
    "base-oss-nvidia-driver-gpu-ubuntu-24.04": "ami-0d1a00000000000b0",
}


def seed_dlami(region: str = REGION, ssm: bool = True, image: bool = True) -> None:
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.amis import Ami
    from moto.ssm.models import Parameter, ssm_backends

    if image:
        ec2 = ec2_backends[DEFAULT_ACCOUNT_ID][region]
        ec2.amis[DLAMI_ID] = Ami(ec2, DLAMI_ID, name=DLAMI_NAME, owner_alias="amazon", owner_id="898082745236",
                                 architecture="x86_64", root_device_name="/dev/sda1",
                                 creation_date=datetime(2026, 11, 1, tzinfo=timezone.utc))
    if ssm:
        params = ssm_backends[DEFAULT_ACCOUNT_ID][region]._parameters
        for ami_type, value in DLAMI_PARAMETERS.items():
            path = f"/aws/service/deeplearning/ami/x86_64/{ami_type}/latest/ami-id"
            params[path].append(Parameter(DEFAULT_ACCOUNT_ID, path, value, "String", None, None, None,
                                          datetime.now(timezone.utc), 1, "aws:ec2:image"))


def aws_env(tmp_path, **extra) -> dict[str, str]:
    """Environment for a test: fake credentials, no developer ~/.aws, no instance-metadata lookups."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "MNIST_CLOUD_HOME": str(tmp_path / "mnist-cloud-home"),
        # the what-is-my-IP lookup goes to a closed loopback port unless a test serves one: never the internet
        "MNIST_CLOUD_IP_URL": "http://127.0.0.1:9/",
    }
    env.update(extra)
    return env


@dataclass
class Fault:
    action: str  # e.g. "RunInstances"
    times: int  # how many matching requests get it
    code: str = ""  # an EC2 error code to answer with; empty: drop the connection instead
    status: int = 400
    when: Callable[[dict], bool] = lambda query: True


class Faults:
    """What real EC2 does to a client now and then, injected into the in-process moto server: an error
    answer (throttling, "not found" right after a create) or a dropped connection, for the next `times`
    matching requests. Also records every request's parameters (`sent`), to assert on what was asked."""

    def __init__(self):
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self.sent: dict[str, list[dict]] = defaultdict(list)
        self.hits: dict[str, int] = defaultdict(int)

    def fail(self, action: str, code: str, times: int = 1, status: int = 400, when=lambda query: True) -> None:
        self._faults.append(Fault(action, times, code, status, when))

    def drop(self, action: str, times: int = 1, when=lambda query: True) -> None:
        self._faults.append(Fault(action, times, "", 0, when))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.sent.clear()
            self.hits.clear()

    def take(self, action: str, query: dict) -> Fault | None:
        with self._lock:
            self.sent[action].append(query)
            for fault in self._faults:
                if fault.action == action and fault.times > 0 and fault.when(query):
                    fault.times -= 1
                    self.hits[action] += 1
                    return fault
        return None

    def install(self, patches) -> None:
        from moto.core.responses import BaseResponse

        original = BaseResponse.call_action
        faults = self

        def call_action(response):
            action = response._get_action()
            fault = faults.take(action, {k: v[0] if isinstance(v, list) and len(v) == 1 else v
                                         for k, v in response.querystring.items()})
            if fault is None:
                return original(response)
            if not fault.code:  # the client sees the connection closed without an answer
                sock = response.request.environ.get("werkzeug.socket")
                sock.shutdown(socket.SHUT_RDWR)
                return 500, {}, ""
            body = (f"<Response><Errors><Error><Code>{fault.code}</Code><Message>injected by the test</Message>"
                    "</Error></Errors><RequestID>fault</RequestID></Response>")
            return fault.status, {"Content-Type": "text/xml"}, body

        patches.setattr(BaseResponse, "call_action", call_action)


def console_with_host_keys(hosts: Sequence) -> str:
    """A first-boot console as cloud-init prints it, with the SSH test hosts' real host key fingerprints."""
    prints = [subprocess.run(["ssh-keygen", "-l", "-f", str(h.dir / "ssh_host_ed25519_key.pub")], check=True,
                             capture_output=True, text=True).stdout.strip() for h in hosts]
    return ("[   12.3] cloud-init[1234]: Cloud-init v. 24.1 running 'modules:final'\n"
            "-----BEGIN SSH HOST KEY FINGERPRINTS-----\n" + "\n".join(prints) +
            "\n-----END SSH HOST KEY FINGERPRINTS-----\n")


@contextlib.contextmanager
def moto_server(public_ip: Callable[[], str] = lambda: "127.0.0.1", key_hosts: Sequence = (),
                faults: Faults | None = None) -> Iterator[str]:
    """A moto server on 127.0.0.1 (yields its URL). Its instances' public IPs come from `public_ip`:
    loopback unless the test hands out addresses of its own network namespaces, so that even a
    command that tries to reach an instance can never leave this machine. Every key pair it creates
    or imports is authorized on each of `key_hosts` (SSH test hosts), as EC2 installs it on an instance,
    and the instances' console shows those hosts' host key fingerprints, as cloud-init prints them.
    `faults` (see Faults) makes it answer some requests the way a busy or flaky EC2 does."""
    import pytest
    from moto.ec2.models import elastic_network_interfaces, key_pairs
    from moto.server import ThreadedMotoServer

    patches = pytest.MonkeyPatch()
    patches.setattr(elastic_network_interfaces, "random_public_ip", public_ip)
    if key_hosts:
        original_create = key_pairs.KeyPairBackend.create_key_pair
        original_import = key_pairs.KeyPairBackend.import_key_pair

        def create_and_install(self, *args, **kwargs):
            pair = original_create(self, *args, **kwargs)
            for h in key_hosts:
                h.authorize(pair.material_public)
            return pair

        def import_and_install(self, key_name, public_key_material, *args, **kwargs):
            pair = original_import(self, key_name, public_key_material, *args, **kwargs)
            for h in key_hosts:
                h.authorize(public_key_material)
            return pair

        patches.setattr(key_pairs.KeyPairBackend, "create_key_pair", create_and_install)
        patches.setattr(key_pairs.KeyPairBackend, "import_key_pair", import_and_install)
        from moto.ec2.responses import general

        original_console = general.General.get_console_output

        def console_of_the_test_hosts(self):  # read at each request: a test may give a host a new key
            general.SAMPLE_CONSOLE_OUTPUT = console_with_host_keys(key_hosts)
            return original_console(self)

        patches.setattr(general, "SAMPLE_CONSOLE_OUTPUT", general.SAMPLE_CONSOLE_OUTPUT)  # restored by undo()
        patches.setattr(general.General, "get_console_output", console_of_the_test_hosts)
    if faults is not None:
        faults.install(patches)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        patches.undo()


def launch_fresh(cli, moto: str, name: str):
    """A module's machine: the moto server reset and seeded with the DLAMI, then `launch` through the
    CLI (SSH from 192.0.2.10/32). Returns the launch's completed process, already checked."""
    import urllib.request as u

    u.urlopen(u.Request(f"{moto}/moto-api/reset", method="POST")).read()
    seed_dlami()
    out = cli("launch", "--instance", "g4dn.xlarge", "--name", name, "--ssh-cidr", "192.0.2.10/32")
    assert out.returncode == 0, out.stdout + out.stderr
    return out
