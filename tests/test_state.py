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
