"""The desktop notification the laptop shows when a followed run ends (infra/desktop.py), with stand-in
notify-send and osascript tools that record what they are asked; the end-to-end uses are in test_remote.py."""

from __future__ import annotations

import pytest

from infra import desktop


def tool(tmp_path, name: str, body: str | None = None) -> None:
    """A stand-in `name` in tmp_path: by default it writes its arguments, one per line, to tmp_path/asked."""
    record = 'printf "%s\\n" "$@" > ' + str(tmp_path / "asked")
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + (body or record) + "\n")
    path.chmod(0o755)


@pytest.fixture
def bare(tmp_path, monkeypatch):
    """A PATH holding only tmp_path, and no desktop session."""
    monkeypatch.setenv("PATH", str(tmp_path))
    for key in ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


def test_macos_quotes_what_it_shows_for_applescript(bare):
    tool(bare, "osascript")
    assert desktop.notify('run "a\\b" finished', 'acc 99.5% on "box"', platform="darwin")
    script = (bare / "asked").read_text().splitlines()
    assert script == ["-e", 'display notification "acc 99.5% on \\"box\\"" with title "run \\"a\\\\b\\" finished"']


def test_linux_needs_notify_send_and_a_desktop_session(bare, monkeypatch):
    tool(bare, "notify-send")
    assert desktop.command("t", "b", platform="linux") is None  # a server over SSH: no session, nothing shown
    monkeypatch.setenv("DISPLAY", ":0")
    assert desktop.notify("mnist-cloud: r1 finished", "test accuracy 99.41% on box", platform="linux")
    assert (bare / "asked").read_text().splitlines() == ["--app-name=mnist-cloud", "mnist-cloud: r1 finished",
                                                         "test accuracy 99.41% on box"]


def test_a_missing_failing_or_hanging_tool_is_quietly_nothing(bare, monkeypatch):
    monkeypatch.setenv("DISPLAY", ":0")
    assert desktop.notify("t", "b", platform="linux") is False  # none on PATH
    tool(bare, "notify-send", "exit 3")
    assert desktop.notify("t", "b", platform="linux") is False
    tool(bare, "notify-send", "exec /bin/sleep 30")
    monkeypatch.setattr(desktop, "TIMEOUT_S", 0.2)
    assert desktop.notify("t", "b", platform="linux") is False
