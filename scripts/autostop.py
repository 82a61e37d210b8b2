#!/usr/bin/env python3
"""mnist-cloud autostop: shut an idle instance down, so nothing idles on the bill.

Installed by `mnist-cloud launch` (cloud-init user data) or `mnist-cloud autostop` (over SSH) as
/usr/local/bin/mnist-cloud-autostop, and run once a minute by a systemd timer (or cron). The timer
lives on the instance, so the laptop may be closed.

Idle means: no trainer running (`python -m trainer`, torchrun) and no interactive SSH session (a pty
in /dev/pts). A Jupyter tunnel alone is not activity. After `idle_minutes` of that, it runs
`shutdown -h now`; EC2 then stops or terminates the instance, per its shutdown behaviour, which
mnist-cloud sets to match the autostop action. With `after_train`, it shuts down as soon as a run
it has seen ends.

Python 3 standard library only: it runs with the system python3, before anything is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.environ.get("MNIST_CLOUD_ROOT") or "/")  # cron passes it empty on a real machine
CONFIG = ROOT / "etc/mnist-cloud/autostop.json"
STATE = ROOT / "var/lib/mnist-cloud/autostop-state.json"
TRAINER_MARKERS = ("-m trainer", "torchrun", "trainer/__main__.py")


def decide(now: float, config: dict, state: dict, trainer_running: bool, pty_sessions: int,
           boot: str = "") -> tuple[str | None, dict, str]:
    """(action or None, new state, reason). Pure: the whole policy, testable without a machine.

    `boot` identifies this boot: the state file lives on the root volume and survives a stop/start,
    so a state from an earlier boot is dropped; otherwise a restarted instance would count its
    stopped hours as idle (or remember a finished run) and shut down at the first check."""
    state = dict(state)
    if state.get("boot", boot) != boot:
        state = {}
    state["boot"] = boot
    state.setdefault("last_active", now)
    if not config.get("enabled", True):
        return None, state, "autostop is off"
    if trainer_running:
        state.update(last_active=now, seen_trainer=True)
        return None, state, "a trainer is running"
    if pty_sessions:
        state["last_active"] = now
        return None, state, f"{pty_sessions} interactive session(s)"
    if config.get("after_train") and state.get("seen_trainer"):
        return "shutdown", state, "the run ended (after_train)"
    idle_minutes = float(config.get("idle_minutes", 30))
    idle_for = now - state["last_active"]
    if idle_minutes > 0 and idle_for >= idle_minutes * 60:
        return "shutdown", state, f"idle for {idle_for / 60:.1f} min (limit {idle_minutes:g})"
    return None, state, f"idle for {idle_for / 60:.1f} min of {idle_minutes:g}"


def trainer_running(proc: Path = Path("/proc")) -> bool:
    me = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "mnist-cloud-autostop" not in cmdline and any(m in cmdline for m in TRAINER_MARKERS):
            return True
    return False


def pty_sessions(pts: Path = Path("/dev/pts")) -> int:
    """Open pseudo-terminals: an interactive ssh (or tmux/screen) session holds one."""
    try:
        return sum(1 for p in pts.iterdir() if p.name.isdigit())
    except OSError:
        return 0


def boot_id(path: Path = Path("/proc/sys/kernel/random/boot_id")) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def load(path: Path, default: dict) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return dict(default)


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main() -> int:
    config = load(CONFIG, {"enabled": False})
    state = load(STATE, {})
    now = time.time()
    action, state, reason = decide(now, config, state, trainer_running(), pty_sessions(), boot_id())
    save(STATE, state)
    print(f"mnist-cloud-autostop: {reason}" + (f" -> {action}" if action else ""), flush=True)
    if action == "shutdown":
        save(STATE, {**state, "fired_at": now})
        return subprocess.call(["shutdown", "-h", "now", "mnist-cloud autostop: " + reason])
    return 0


if __name__ == "__main__":
    sys.exit(main())
