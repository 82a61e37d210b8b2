"""infra.state: the laptop's address cache survives concurrent writers."""

from __future__ import annotations

import json
import subprocess
import sys

WRITER = """
import sys
from pathlib import Path
from infra.state import Host, State

path, tag, start = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
while not start.exists():  # both writers begin together
    pass
state = State(path)
for i in range(150):
    state.put(Host(name=f"{tag}-{i}", kind="ssh", host="127.0.0.1"))
"""


def test_two_processes_writing_at_once_keep_every_entry(tmp_path):
    path, start = tmp_path / "state.json", tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, str(start)]) for tag in ("a", "b")]
    start.touch()
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    hosts = json.loads(path.read_text())["hosts"]
    assert len(hosts) == 300 and {f"a-{i}" for i in range(150)} | {f"b-{i}" for i in range(150)} == set(hosts)


def test_status_lists_attached_ssh_hosts_without_any_aws(monkeypatch, capsys):
    """A user with only `attach`ed machines has no AWS region or credentials: `status` still lists them, and
    says in one line that EC2 was not asked. With an EC2 name in the state, the missing region stays an error."""
    from infra.commands import main
    from infra.state import Host, State

    for var in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    State().put(Host(name="box", kind="ssh", host="127.0.0.1", port=9))
    assert main(["status"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:3] == ["box", "ssh", "host"], out
    assert out[-1].startswith("EC2 was not asked (no AWS region: pass --region") and "need no AWS" in out[-1]
    assert main(["status", "box"]) == 0  # by name: EC2 is never asked (it once crashed on no regions at all)
    assert capsys.readouterr().out.splitlines()[1].split()[0] == "box"
    State().put(Host(name="gpu", kind="ec2", host="192.0.2.9", instance_id="i-0123456789abcdef0"))
    assert main(["status"]) == 2
    assert "no AWS region" in capsys.readouterr().err
