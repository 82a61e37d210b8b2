"""A desktop notification on the laptop when a run that `train --on` or `logs -f` follows ends, so that
nobody has to watch the terminal: `osascript` on macOS, `notify-send` (libnotify) elsewhere, where there is
a desktop session to show it. Best effort: a missing tool, no display or a tool that fails or hangs is
silently nothing, and never changes the command's outcome."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

TIMEOUT_S = 5.0


def _applescript_string(text: str) -> str:
    """`text` as an AppleScript string literal (backslashes and quotes escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def command(title: str, body: str, platform: str = sys.platform) -> list[str] | None:
    """The argv that shows the notification here, or None where nothing can."""
    if platform == "darwin":
        tool = shutil.which("osascript")
        if tool is None:
            return None
        return [tool, "-e", f"display notification {_applescript_string(body)} with title {_applescript_string(title)}"]
    tool = shutil.which("notify-send")
    has_session = any(os.environ.get(k) for k in ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS"))
    if tool is None or not has_session:
        return None
    return [tool, "--app-name=mnist-cloud", title, body]


def notify(title: str, body: str, platform: str = sys.platform) -> bool:
    """Show it; True when the tool ran and said it did."""
    argv = command(title, body, platform)
    if argv is None:
        return False
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=TIMEOUT_S).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
