"""infra/commands/: `mnist-cloud --help` and a typo answer at once, because building the whole parser tree
imports no cloud library and no torch (each handler imports what it needs when it runs)."""

from __future__ import annotations

import json
import subprocess
import sys

from fixtures import REPO

HEAVY = ("boto3", "botocore", "fabric", "paramiko", "torch")

# In a fresh interpreter: import infra.commands, build every command's parser, and say how long that took
# and which of HEAVY got imported.
_BUILD_THE_TREE = f"""
import json, sys, time
started = time.perf_counter()
import infra.commands
parser = infra.commands.build_parser()
seconds = time.perf_counter() - started
commands = sorted(next(a for a in parser._actions if a.dest == "command").choices)
print(json.dumps({{"seconds": seconds, "commands": commands,
                   "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""


def test_building_every_parser_imports_no_cloud_library_or_torch_and_is_quick():
    out = subprocess.run([sys.executable, "-c", _BUILD_THE_TREE], capture_output=True, text=True, cwd=REPO,
                         check=True, timeout=60)
    found = json.loads(out.stdout)
    from infra.commands import COMMANDS

    assert found["commands"] == sorted(COMMANDS)
    assert found["heavy"] == [], f"imported while building the parsers: {found['heavy']}"
    # about 0.25 s measured on a loaded 2-core machine (load 7); the bound leaves room for a slower one
    assert found["seconds"] < 1.0, found["seconds"]
