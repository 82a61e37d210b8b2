"""One table of SSH options, two renderings: the `-o` arguments mnist-cloud runs ssh/rsync with, and
the `Host mnist-NAME` block `mnist-cloud ssh-config` writes for plain ssh and VS Code. The real OpenSSH
client resolves both (`ssh -G` prints the options a connection would use, without connecting), and
they must agree: a pinned host key, checked strictly, under the instance's alias."""

from __future__ import annotations

import shutil
import subprocess

import pytest

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")

COMPARED = ("hostname", "user", "port", "identityfile", "identitiesonly", "userknownhostsfile", "hostkeyalias",
            "stricthostkeychecking", "hostkeyalgorithms", "connecttimeout", "serveraliveinterval")


def resolved(*args: str) -> dict[str, str]:
    out = subprocess.run(["ssh", "-G", *args], capture_output=True, text=True, check=True).stdout
    return {k: v for k, _, v in (line.partition(" ") for line in out.splitlines()) if k in COMPARED}


@pytest.fixture(params=["plain", "with space"])
def box(tmp_path, monkeypatch, request):
    """A key file and the state dir, in a plain path and in one with a space (`My Keys/`, `Application
    Support/`): ssh reads an unquoted space as the end of the value."""
    from infra.state import Host, State

    where = tmp_path / ("My Keys" if request.param == "with space" else "keys")
    where.mkdir()
    monkeypatch.setenv("MNIST_CLOUD_HOME", str(where / "home"))
    key = where / "box.pem"
    key.write_text("not read by ssh -G\n")
    key.chmod(0o600)
    # TEST-NET-3: never contacted, `ssh -G` only resolves
    State().put(Host(name="box", kind="ec2", host="203.0.113.5", port=2222, key_path=str(key),
                     instance_id="i-0abc"))
    return key


def test_ssh_config_and_ssh_argv_resolve_to_the_same_options(box, tmp_path):
    from infra.remote import Endpoint, Remote, known_hosts_file
    from infra.sshconfig import write_ssh_config

    unpinned = resolved("-F", str(write_ssh_config(["box"])[0]), "mnist-box")
    assert unpinned["stricthostkeychecking"] == "accept-new"  # the first connection pins it

    known_hosts_file().parent.mkdir(parents=True, exist_ok=True)
    known_hosts_file().write_text("i-0abc ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDummyKeyForTheTest\n")
    from_config = resolved("-F", str(write_ssh_config(["box"])[0]), "mnist-box")
    argv = Remote(Endpoint(name="box", host="203.0.113.5", user="ubuntu", key_path=str(box), port=2222,
                           alias="i-0abc")).ssh_argv()
    assert argv[:3] == ["ssh", "-F", "/dev/null"]
    from_argv = resolved(*argv[1:], "ubuntu@203.0.113.5")
    assert from_argv == from_config
    assert from_config == {
        "hostname": "203.0.113.5", "user": "ubuntu", "port": "2222", "identityfile": str(box),
        "identitiesonly": "yes", "userknownhostsfile": str(known_hosts_file()), "hostkeyalias": "i-0abc",
        "stricthostkeychecking": "true", "hostkeyalgorithms": "ssh-ed25519", "connecttimeout": "10",
        "serveraliveinterval": "15"}
