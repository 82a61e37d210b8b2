"""Autostop and JupyterLab: a notebook in use keeps the machine up, an idle one does not, and the
watchdog's own questions are not use.

End to end with real parts: a moto server whose instance is the SSH test host, `mnist-cloud jupyter`
running there (the real JupyterLab, through the real tunnel), kernels driven as JupyterLab drives them
(REST and the kernel websocket), and the real watchdog installed by `install_over_ssh`, run on the
machine as its timer runs it, with a `shutdown` that only records. Its idle time is 6 s, and before each
check its state says the machine has been idle for an hour, so only JupyterLab can keep it up.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from fixtures.aws import launch_fresh
from fixtures.cli import first_line_with, output_lines
from fixtures.instance import load_agent

IDLE_S = 6.0  # the watchdog's idle time in these tests


# ---------------------------------------------------------------------------------- broken answers
class Answer(http.server.BaseHTTPRequestHandler):
    """A stand-in that answers every request with `self.server.body` (or hangs, or dies mid-answer)."""

    def do_GET(self):
        body = self.server.body
        if body == "hang":
            time.sleep(5)
            return
        if body == "die":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def answering(body: str):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    server.body = body
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize("body", ["not json", '{"started": "x"}', '{"last_activity": "yesterday"}',
                                  '["a list"]', "hang", "die"])
def test_a_server_that_answers_nonsense_or_nothing_adds_no_activity(body):
    agent = load_agent("autostop")
    with answering(body) as port:
        assert agent.jupyter_activity([(port, "t")], timeout=1) == (0, None)
    assert agent.jupyter_activity([(port, "t")], timeout=1) == (0, None)  # gone: connection refused


def test_a_last_activity_ahead_of_the_clock_does_not_keep_the_machine_up():
    """A broken clock or answer must not keep a machine up for good: far in the future is not use."""
    agent = load_agent("autostop")
    now = time.time()
    with answering(json.dumps({"last_activity": iso(now + 86400)})) as port:
        used = agent.jupyter_activity([(port, "t")], timeout=1)
    assert used[0] == 0 and used[1] > now
    config, state = {"idle_minutes": 30}, {"last_active": now - 3600}
    action, _, reason = agent.decide(now, config, state, False, 0, jupyter_used=used[1])
    assert action == "shutdown", reason
    # within the idle time, and not ahead: in use
    assert agent.decide(now, config, state, False, 0, jupyter_used=now - 60)[0] is None


# ---------------------------------------------------------------------------------- for real
@pytest.fixture(scope="module")
def launched(cli, ssh_host_moto):
    launch_fresh(cli, ssh_host_moto, "nb")
    return "nb"


@pytest.fixture(scope="module")
def notebook(launched, laptop_env, mnist_cloud, project_checkout):
    """`mnist-cloud jupyter nb` running for the module: (base URL through the tunnel, token)."""
    proc = subprocess.Popen([*mnist_cloud, "jupyter", launched], cwd=project_checkout, env={**os.environ, **laptop_env},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base, token = first_line_with(output_lines(proc), "/lab?token=").split("/lab?token=")
        yield base, token
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def tick(launched, laptop_env, ssh_host, tmp_path_factory):
    """The watchdog, installed over SSH into a root of its own; tick() runs it once on the machine (as
    its timer does, with /usr/bin/python3) after an hour of no other activity, and returns what it
    said and whether it called `shutdown`."""
    from infra.remote import Endpoint, Remote
    from infra.state import State
    from infra.watchdog import AutostopConfig, install_over_ssh

    root, fakebin = tmp_path_factory.mktemp("agent-root"), tmp_path_factory.mktemp("bin")
    fired = fakebin / "shutdown-called"
    (fakebin / "shutdown").write_text(f"#!/bin/sh\necho \"$@\" >> {fired}\n")
    (fakebin / "shutdown").chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNIST_CLOUD_HOME", laptop_env["MNIST_CLOUD_HOME"])
        h = State().get(launched)
        with Remote(Endpoint(name=launched, host=h.host, user=h.user, key_path=h.key_path,
                             alias=h.instance_id)) as remote:
            install_over_ssh(remote, AutostopConfig(idle_minutes=IDLE_S / 60), root=str(root))
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()

    def run() -> tuple[str, bool]:
        state = root / "var/lib/mnist-cloud/autostop-state.json"
        state.write_text(json.dumps({"boot": boot, "last_active": time.time() - 3600}))
        fired.unlink(missing_ok=True)
        out = ssh_host.exec(f"MNIST_CLOUD_ROOT={root} PATH={fakebin}:$PATH /usr/bin/python3 "
                            f"{root}/usr/local/bin/mnist-cloud-autostop")
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout, fired.exists()

    return run


def api(notebook, path: str, method: str = "GET", track: bool = False):
    """JupyterLab's REST API through the tunnel; track=False asks as a monitor (not as the user)."""
    import urllib.request

    base, token = notebook
    request = urllib.request.Request(f"{base}{path}" + ("" if track else "?no_track_activity=1"), method=method,
                                     data=b"{}" if method == "POST" else None,
                                     headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body else None


def last_activity(notebook) -> str:
    return api(notebook, "/api/status")["last_activity"]


def idle_for(notebook) -> float:
    return time.time() - datetime.fromisoformat(last_activity(notebook).replace("Z", "+00:00")).timestamp()


def wait_until(predicate, timeout: float = 60, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def execute(notebook, kernel_id: str, code: str, until: str) -> None:
    """Send `code` to the kernel over its websocket, as JupyterLab does, and return when the kernel says
    `until` ("busy": it started; "idle": it finished) about it. The code runs on when we hang up."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    base, token = notebook

    async def go():
        ws = await websocket_connect(HTTPRequest(f"ws{base[4:]}/api/kernels/{kernel_id}/channels",
                                                 headers={"Authorization": f"token {token}"}, connect_timeout=30))
        msg_id = uuid.uuid4().hex
        ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                       "session": uuid.uuid4().hex, "date": datetime.now(timezone.utc).isoformat(), "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        try:
            while True:
                raw = await asyncio.wait_for(ws.read_message(), 60)
                assert raw is not None, "the kernel websocket closed"
                msg = json.loads(raw)
                if (msg.get("msg_type") == "status" and msg["parent_header"].get("msg_id") == msg_id
                        and msg["content"]["execution_state"] == until):
                    return
        finally:
            ws.close()

    asyncio.run(go())


@contextlib.contextmanager
def kernel(notebook):
    """A kernel of a notebook opened in JupyterLab, shut down afterwards."""
    kernel_id = api(notebook, "/api/kernels", "POST", track=True)["id"]
    try:
        yield kernel_id
    finally:
        api(notebook, f"/api/kernels/{kernel_id}", "DELETE", track=True)


@pytest.mark.slow
def test_a_busy_kernel_keeps_the_machine_up(notebook, tick):
    """A cell still running (fit() in a notebook) is work, though JupyterLab has seen no use for longer
    than the idle time: the kernel prints nothing while it sleeps."""
    with kernel(notebook) as kernel_id:
        execute(notebook, kernel_id, "import time; time.sleep(30)", until="busy")
        wait_until(lambda: idle_for(notebook) > IDLE_S + 1, what="last_activity to age past the idle time")
        assert api(notebook, f"/api/kernels/{kernel_id}")["execution_state"] == "busy"
        said, fired = tick()
        assert not fired and "1 Jupyter kernel(s) busy" in said, said


@pytest.mark.slow
def test_an_open_notebook_counts_while_used_and_lets_the_machine_stop_when_idle(notebook, tick):
    with kernel(notebook) as kernel_id:
        execute(notebook, kernel_id, "1 + 1", until="idle")  # a cell run just now
        said, fired = tick()
        assert not fired and "JupyterLab used" in said, said
        # the notebook stays open, its kernel idle, the tunnel up: nobody uses it
        wait_until(lambda: idle_for(notebook) > IDLE_S + 1, what="last_activity to age past the idle time")
        said, fired = tick()
        assert fired and "idle for 60.0 min" in said, said


@pytest.mark.slow
def test_the_watchdog_asking_jupyterlab_is_not_activity(notebook, tick):
    """Jupyter Server counts every authenticated API request as activity unless it says
    no_track_activity: a watchdog that did not would keep the machine up forever by asking."""
    with kernel(notebook) as kernel_id:
        execute(notebook, kernel_id, "import time; time.sleep(30)", until="busy")  # the watchdog lists kernels
        before = last_activity(notebook)
        for _ in range(2):
            said, fired = tick()
            assert not fired and "Jupyter kernel(s) busy" in said, said  # it asked, and was answered
        assert last_activity(notebook) == before
