"""A server on the machine, bound to 127.0.0.1 there and reached only through an SSH tunnel: what
`mnist-cloud jupyter` (infra/jupyter.py) and `mnist-cloud tensorboard` (infra/tensorboard.py) share.

Nothing is opened in the security group. The server runs as a detached job in the work dir; the tunnel
is held until Ctrl-C (or `kill`, or a closed terminal), and then the server is stopped unless kept.
"""

from __future__ import annotations

import shlex
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from infra.errors import UserError
from infra.poll import poll
from infra.remote import free_port

READY_TIMEOUT_S = 90


def check_port_free(port: int) -> None:
    """An explicit --port must be free here; only the default falls back to another port."""
    if not 0 < port < 65536 or free_port(port) != port:
        raise UserError(f"local port {port} is in use (or invalid); pick another --port, or omit it to get a free one")


def local_port(port: int | None, default: int, log) -> int:
    """The typed --port, else `default`, else a free one (said)."""
    if port is not None:
        return port
    chosen = free_port(default)
    if chosen != default:
        log(f"local port {default} is taken; using {chosen}")
    return chosen


def remote_free_port(target, python: str) -> int:
    code = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
    return int(target.remote.run(f"{shlex.quote(python)} -c {shlex.quote(code)}").stdout.strip())


def wait_listening(target, python: str, port: int, job: str, what: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Wait on the machine until the server accepts connections on 127.0.0.1:port (before any tunnel
    traffic: a tunnel to a closed port fails noisily)."""
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"

    def listening() -> bool | None:
        if target.remote.run(f"{shlex.quote(python)} -c {shlex.quote(probe)}", warn=True).ok:
            return True
        state, code = target.jobs.job_state(job)
        if state == "finished":
            tail = target.remote.run(f"tail -n 5 {target.jobs.job_paths(job)['log']}", warn=True).stdout.strip()
            raise UserError(f"{what} exited on {target.name} (exit {code}): {tail.splitlines()[-1] if tail else ''}")
        return None

    if poll(listening, timeout) is None:
        raise UserError(f"{what} did not start listening on {target.name} within {timeout:.0f}s")


def wait_answering(request: urllib.request.Request, what: str, logs: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll `request` through the tunnel until the server answers 200."""
    last = None

    def answering() -> bool | None:
        nonlocal last
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return True if response.status == 200 else None
        except (urllib.error.URLError, OSError, ConnectionError) as e:
            last = e
            return None

    if poll(answering, timeout, interval=0.5) is not None:
        return
    raise UserError(f"{what} did not answer through the tunnel within {timeout:.0f}s ({last}); see {logs} on the machine")


def hold(target, what: str, job: str, python: str, ports: tuple[int, int], answering: Callable[[], None],
         lines: list[str], keep: bool, cleanup: str | None, again: str, log=print, until=None) -> None:
    """Wait for the server, open the tunnel (local port -> the machine's 127.0.0.1 port), say `lines`, and
    hold it until Ctrl-C (or `until()`); then stop the server (and run `cleanup` there) unless `keep`."""
    local, remote = ports
    # `kill`, a closed terminal or a process manager stop us as Ctrl-C does: Python's default for SIGTERM
    # and SIGHUP ends the process at once, skipping the finally below, and the server would run on
    handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        wait_listening(target, python, remote, job, what)
        with target.remote.forward_local(local, remote):
            answering()
            for line in lines:
                log(line)
            log("Ctrl-C closes the tunnel" + (" (the server keeps running)" if keep else " and stops the server"))
            try:
                while until is None or not until():
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
    finally:
        for sig in handlers:  # a second TERM/HUP (a closing terminal can send two) must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        if not keep:
            target.jobs.kill_job(job)
            if cleanup:
                target.remote.run(cleanup, warn=True)
            log(f"stopped {what} on {target.name}")
        else:
            log(f"{what} keeps running on {target.name} (job {job}); `mnist-cloud {again} {target.name}` "
                "opens a new tunnel and server")
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
