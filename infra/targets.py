"""Where `python -m trainer` runs. Every target has the same four verbs: sync, run, logs, pull.

LocalTarget runs the trainer as a subprocess of the CLI, with the CLI's own interpreter, so there is
nothing to sync or pull: the run directory is written in place.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def trainer_command(python: str, args: list[str]) -> list[str]:
    return [python, "-m", "trainer", *args]


class LocalTarget:
    name = "local"

    def __init__(self, python: str = sys.executable, cwd: Path | None = None):
        self.python = python
        self.cwd = cwd

    def sync(self) -> None:
        """Nothing to copy: the code is already here."""

    def run(self, args: list[str]) -> int:
        """Run `python -m trainer ARGS` in the foreground; its output is ours and its exit code is returned.

        Ctrl-C at the terminal reaches the trainer too (same process group); we wait for it to finish
        its way out and return its exit code."""
        proc = subprocess.Popen(trainer_command(self.python, args), cwd=self.cwd)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue

    def logs(self, run_dir: Path) -> str:
        return (Path(run_dir) / "train.log").read_text()

    def pull(self, run_id: str) -> None:
        """Nothing to fetch: the run directory is local."""
