"""JupyterLab on a machine, reached only through an SSH tunnel.

The server binds 127.0.0.1 on the machine, so nothing is opened in the security group; its token is
random, written to a mode-600 file there and passed by environment, never on a command line. The port
goes in a file beside it: the autostop watchdog asks the server, with that token, whether it is in use.
"""

from __future__ import annotations

import io
import secrets
import shlex
import time
import urllib.request

from infra.agent.autostop import JUPYTER_JOB_PREFIX, jupyter_files
from infra.tunnelled import check_port_free, hold, local_port, remote_free_port, wait_answering

__all__ = ["DEFAULT_PORT", "check_port_free", "ensure_jupyterlab", "serve"]

DEFAULT_PORT = 8888


def ensure_jupyterlab(target, python: str, log) -> str:
    """The interpreter to serve JupyterLab with: `python`, once it has jupyterlab. A missing one is
    installed by setup_ec2.sh the way it installs the tool's requirements: with sudo -n where the env is
    not writable (a root-owned /opt/pytorch), else into a venv layered over it, which is then the
    interpreter (setup records it, and trainer runs use it too)."""
    if target.remote.run(f"{shlex.quote(python)} -c 'import jupyterlab'", warn=True).ok:
        return python
    log(f"installing jupyterlab for {python} on {target.name} (once)")
    return target.setup(python, log, extra=["jupyterlab"])


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
    port = local_port(port, DEFAULT_PORT, log)
    url = f"http://127.0.0.1:{port}/lab?token={token}"
    status = urllib.request.Request(f"http://127.0.0.1:{port}/api/status", headers={"Authorization": f"token {token}"})
    hold(target, "JupyterLab", job, python, (port, remote_port),
         answering=lambda: wait_answering(status, "JupyterLab", f"`mnist-cloud logs {target.name} {job}`"),
         lines=[f"JupyterLab on {target.name} (bound to 127.0.0.1 there), tunnelled to this machine:", f"  {url}"],
         keep=keep, cleanup=f"cd {wd} && rm -f {token_file} {port_file}", again="jupyter", log=log, until=until)
    return url
