"""TensorBoard on a machine's runs/, reached only through an SSH tunnel, as `mnist-cloud jupyter` is
(infra/tunnelled.py): bound to 127.0.0.1 there, nothing opened in the security group. TensorBoard has
no login of its own; the tunnel is the only way in, and its local end binds this machine's 127.0.0.1.

Runs trained with --tensorboard (or given event files by `export-tb`) show up; a TensorBoard that is
only open is not activity to the autostop watchdog, as a Jupyter tunnel alone is not.
"""

from __future__ import annotations

import shlex
import time
import urllib.request

import runspec
from infra.agent.autostop import TENSORBOARD_JOB_PREFIX
from infra.tunnelled import check_port_free, hold, local_port, remote_free_port, wait_answering

DEFAULT_PORT = 6006  # TensorBoard's own


def ensure_tensorboard(target, python: str, log) -> str:
    """The interpreter to serve TensorBoard with: `python`, once it has tensorboard; a missing one is
    installed by setup_ec2.sh the way `jupyter` installs jupyterlab (infra/jupyter.py ensure_jupyterlab)."""
    if target.remote.run(f"{shlex.quote(python)} -c 'import tensorboard'", warn=True).ok:
        return python
    log(f"installing tensorboard for {python} on {target.name} (once)")
    return target.setup(python, log, extra=["tensorboard"])


def serve(target, port: int | None, keep: bool, python: str | None, log=print, until=None) -> str:
    """Start TensorBoard on the work dir's runs/, open the tunnel, print the URL, wait for Ctrl-C (or
    `until()`), clean up."""
    if port is not None:
        check_port_free(port)
    python = target.ensure_setup(python, log=log)
    python = ensure_tensorboard(target, python, log)
    remote_port = remote_free_port(target, python)
    job = f"{TENSORBOARD_JOB_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    target.remote.run(f"mkdir -p {shlex.quote(target.remote.ep.workdir)}/runs")  # a machine with no run yet
    argv = [python, "-m", "tensorboard.main", "--logdir", "runs", "--host", "127.0.0.1",
            f"--port={remote_port}", "--reload_interval=15"]
    target.jobs.start_detached(argv, job)
    port = local_port(port, DEFAULT_PORT, log)
    url = f"http://127.0.0.1:{port}/"
    hold(target, "TensorBoard", job, python, (port, remote_port),
         answering=lambda: wait_answering(urllib.request.Request(f"{url}data/environment"), "TensorBoard",
                                          f"`mnist-cloud logs {target.name} {job}`"),
         lines=[f"TensorBoard on {target.name}'s {runspec.TENSORBOARD} files under runs/ (bound to 127.0.0.1 "
                "there), tunnelled to this machine:", f"  {url}"],
         keep=keep, cleanup=None, again="tensorboard", log=log, until=until)
    return url
