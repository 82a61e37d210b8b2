"""JupyterLab on a machine, reached only through an SSH tunnel.

The server binds 127.0.0.1 on the machine, so nothing is opened in the security group; its token is
random, written to a mode-600 file there and passed by environment, never on a command line. The port
goes in a file beside it: the autostop watchdog asks the server, with that token, whether it is in use.
"""

from __future__ import annotations

import io
import secrets
import shlex
import signal
import time
import urllib.error
import urllib.request

from infra.agent.autostop import JUPYTER_JOB_PREFIX, jupyter_files
from infra.errors import UserError
from infra.poll import poll
from infra.remote import free_port

READY_TIMEOUT_S = 90
DEFAULT_PORT = 8888


def check_port_free(port: int) -> None:
    """An explicit --port must be free here; only the default falls back to another port."""
    if not 0 < port < 65536 or free_port(port) != port:
        raise UserError(f"local port {port} is in use (or invalid); pick another --port, or omit it to get a free one")


def remote_free_port(target, python: str) -> int:
    code = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
    return int(target.remote.run(f"{shlex.quote(python)} -c {shlex.quote(code)}").stdout.strip())


def ensure_jupyterlab(target, python: str, log) -> str:
    """The interpreter to serve JupyterLab with: `python`, once it has jupyterlab. A missing one is
    installed by setup_ec2.sh the way it installs the tool's requirements: with sudo -n where the env is
    not writable (a root-owned /opt/pytorch), else into a venv layered over it, which is then the
    interpreter (setup records it, and trainer runs use it too)."""
    if target.remote.run(f"{shlex.quote(python)} -c 'import jupyterlab'", warn=True).ok:
        return python
    log(f"installing jupyterlab for {python} on {target.name} (once)")
    return target.setup(python, log, extra=["jupyterlab"])


def wait_listening(target, python: str, port: int, job: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Wait on the machine until the server accepts connections on 127.0.0.1:port (before any tunnel
    traffic: a tunnel to a closed port fails noisily)."""
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"

    def listening() -> bool | None:
        if target.remote.run(f"{shlex.quote(python)} -c {shlex.quote(probe)}", warn=True).ok:
            return True
        state, code = target.jobs.job_state(job)
        if state == "finished":
            tail = target.remote.run(f"tail -n 5 {target.jobs.job_paths(job)['log']}", warn=True).stdout.strip()
            raise UserError(f"JupyterLab exited on {target.name} (exit {code}): {tail.splitlines()[-1] if tail else ''}")
        return None

    if poll(listening, timeout) is None:
        raise UserError(f"JupyterLab did not start listening on {target.name} within {timeout:.0f}s")


def wait_answering(port: int, token: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll GET /api/status through the tunnel until the server answers 200."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status", headers={"Authorization": f"token {token}"})
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
    raise UserError(f"JupyterLab did not answer through the tunnel within {timeout:.0f}s ({last}); "
                    "see `mnist-cloud logs NAME jupyter` on the machine")


def serve(target, port: int | None, keep: bool, python: str | None, log=print, until=None) -> str:
    """Start the server, open the tunnel, print the URL, wait for Ctrl-C (or `until()`), clean up."""
    if port is not None:
        check_port_free(port)
    python = target.ensure_setup(python, log=log)
    python = ensure_jupyterlab(target, python, log)
    remote_port = remote_free_port(target, python)
    token = secrets.token_urlsafe(24)
    job = f"{JUPYTER_JOB_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    wd = shlex.quote(target.remote.ep.workdir)
    token_file, port_file = jupyter_files(job)  # where the autostop watchdog looks for them
    # the file is made empty with mode 600 first, then the token goes in over SFTP: it never appears
    # on a command line (the remote shell's argv is visible in `ps` to every user of the machine)
    target.remote.run(f"cd {wd} && mkdir -p jobs && (umask 077 && : > {token_file}) && "
                      f"echo {remote_port} > {port_file}")
    # over an SFTP session of its own, closed at once (not Fabric's cached one): left open for the life of
    # the tunnel, it is a command under this SSH session, which the watchdog takes for a pull (activity)
    sftp = target.remote.conn.client.open_sftp()
    try:
        sftp.putfo(io.BytesIO(token.encode()), f"{target.remote.ep.workdir}/{token_file}")
    finally:
        sftp.close()
    argv = [python, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={remote_port}",
            "--ServerApp.port_retries=0", "--ServerApp.open_browser=False", "--allow-root"]
    target.jobs.start_detached(argv, job, env_files={"JUPYTER_TOKEN": token_file})
    if port is None:
        local_port = free_port(DEFAULT_PORT)
        if local_port != DEFAULT_PORT:
            log(f"local port {DEFAULT_PORT} is taken; using {local_port}")
    else:
        local_port = port
    url = f"http://127.0.0.1:{local_port}/lab?token={token}"
    # `kill`, a closed terminal or a process manager stop us as Ctrl-C does: Python's default for SIGTERM
    # and SIGHUP ends the process at once, skipping the finally below, and the server would run on
    handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        wait_listening(target, python, remote_port, job)
        with target.remote.forward_local(local_port, remote_port):
            wait_answering(local_port, token)
            log(f"JupyterLab on {target.name} (bound to 127.0.0.1 there), tunnelled to this machine:")
            log(f"  {url}")
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
            target.remote.run(f"cd {wd} && rm -f {token_file} {port_file}", warn=True)
            log(f"stopped JupyterLab on {target.name}")
        else:
            log(f"JupyterLab keeps running on {target.name} (job {job}); `mnist-cloud jupyter {target.name}` "
                "opens a new tunnel and server")
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return url


def _interrupt(signum, frame):
    raise KeyboardInterrupt
