"""Detached jobs on one machine: started with setsid nohup so that they outlive the SSH session, each
with its console log, pid file and exit-code file in jobs/ of the work dir; their state, their log
streamed here, and the runs/ they leave, listed.
"""

from __future__ import annotations

import json
import posixpath
import select
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import runspec
from infra.errors import ConnectionLost
from infra.transfer import write_file

if TYPE_CHECKING:
    from infra.remote import Remote


class Jobs:
    """The detached jobs in one machine's work dir."""

    def __init__(self, remote: Remote):
        self.remote = remote

    def job_paths(self, run_id: str) -> dict[str, str]:
        jobs = f"{self.remote.ep.workdir}/jobs"
        return {"log": f"{jobs}/{run_id}.log", "pid": f"{jobs}/{run_id}.pid", "exit": f"{jobs}/{run_id}.exit"}

    def start_detached(self, argv: list[str], run_id: str, env: dict[str, str] | None = None,
                       env_files: dict[str, str] | None = None, append: bool = False, notify: bool = False) -> int:
        """Start `argv` in the work dir, detached from this SSH session (setsid nohup), with its own
        console log, pid file and exit-code file under jobs/. Returns the pid, which is also the
        process group of everything the job starts.

        `env_files` maps variable -> file in the work dir to read it from, so that secrets such as a
        Jupyter token never appear on a command line (`ps`)."""
        cmd = self.detached_command(argv, run_id, env, env_files, append, notify)
        return int(self.remote.run(f"bash -c {shlex.quote(cmd)}").stdout.strip())

    def detached_command(self, argv: list[str], run_id: str, env: dict[str, str] | None = None,
                         env_files: dict[str, str] | None = None, append: bool = False, notify: bool = False) -> str:
        """The bash command, run from the login directory, with which start_detached starts a job; it
        prints the pid. A job record keeps it, so the machine can start the job again by itself."""
        job = shlex.quote(run_id)
        exports = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
        exports += [f'{k}="$(cat {shlex.quote(v)})"' for k, v in (env_files or {}).items()]
        prefix = f"export {' '.join(exports)}; " if exports else ""
        # The wrapper shell traps TERM/INT (a handler, which exec resets) so that when the job's process
        # group is signalled it outlives the trainer long enough to record the trainer's exit code.
        inner = f"trap true TERM INT; {prefix}{shlex.join(argv)}; echo $? > jobs/{job}.exit"
        if notify:  # a run's end to the --notify URLs (infra/agent/notify.py), never holding up the exit file
            inner += f'; [ -f jobs/notify.json ] && python3 jobs/notify.py run-ended {job} "$(cat jobs/{job}.exit)"'

        # always appended (O_APPEND), a new job's log emptied first: a line the watchdog adds (a budget warning)
        # lands at the end, not under the trainer's next write
        fresh = "" if append else f": > jobs/{job}.log && "
        return (f"cd {shlex.quote(self.remote.ep.workdir)} && mkdir -p jobs && rm -f jobs/{job}.exit && {fresh}"
                f"{{ setsid nohup sh -c {shlex.quote(inner)} >> jobs/{job}.log 2>&1 < /dev/null & "
                f"echo $! > jobs/{job}.pid; }} && cat jobs/{job}.pid")

    def record_job(self, run_id: str, commands: list[str]) -> None:
        """Write jobs/RUN.job.json: the commands (detached_command) that continue the run, for the agent
        that resumes a spot-interrupted run at boot (infra/agent/resume_agent.py). It also clears the run's
        spot notice: a run started from here again is no longer waiting for the machine to resume it.
        `status_file` (relative to the work dir) is where the agent reads the run's status.

        The commands hold what the job's own command line already shows (`ps`), nothing more: the
        file is mode 600 all the same."""
        jobs = posixpath.join(self.remote.home(), self.remote.ep.workdir, "jobs")
        self.remote.run(f"mkdir -p {shlex.quote(jobs)} && rm -f {shlex.quote(f'{jobs}/{run_id}.spot-notice')}")
        write_file(self.remote, f"{jobs}/{run_id}.job.json",
                   json.dumps({"run_id": run_id, "workdir": self.remote.ep.workdir, "resume": commands,
                               "status_file": posixpath.join("runs", run_id, runspec.CONFIG)}, indent=1))

    def job_state(self, run_id: str) -> tuple[str, int | None]:
        """("running" | "finished" | "unknown", exit code if finished)."""
        p = self.job_paths(run_id)
        out = self.remote.run(f"cat {p['exit']} 2>/dev/null && echo :exit || "
                              f"(kill -0 $(cat {p['pid']} 2>/dev/null) 2>/dev/null && echo :running || echo :unknown)",
                              warn=True).stdout.strip().splitlines()
        if out and out[-1] == ":exit":
            return "finished", int(out[0]) if out[0].strip().lstrip("-").isdigit() else None
        return (out[-1][1:] if out else "unknown"), None

    def stream_log(self, run_id: str, follow: bool, out: TextIO = sys.stdout) -> None:
        """Print the job's console log from the start; with follow, until the job ends.

        Reads the channel itself so that Ctrl-C (KeyboardInterrupt) just closes this stream: the
        job, started with setsid nohup, keeps running."""
        p = self.job_paths(run_id)
        if follow:
            cmd = (f"pid=$(cat {p['pid']} 2>/dev/null); "
                   f"if [ -n \"$pid\" ] && kill -0 $pid 2>/dev/null; then tail -n +1 --pid=$pid -F {p['log']} 2>/dev/null; "
                   f"else cat {p['log']}; fi")
        else:
            cmd = f"cat {p['log']}"
        transport = self.remote.conn.client.get_transport()
        channel = transport.open_session()
        try:
            channel.exec_command(f"bash -c {shlex.quote(cmd)}")
            channel.shutdown_write()
            while True:
                ready, _, _ = select.select([channel], [], [], 1.0)
                if ready or channel.recv_ready():
                    data = channel.recv(65536)
                    if not data:
                        break
                    out.write(data.decode(errors="replace"))
                    out.flush()
                elif channel.exit_status_ready() and not channel.recv_ready():
                    break
        finally:
            channel.close()
        if not transport.is_active():
            self.remote.close()
            raise ConnectionLost(f"lost the SSH connection to {self.remote.ep.name} while streaming the log")

    def kill_job(self, run_id: str, signal_name: str = "TERM") -> bool:
        p = self.job_paths(run_id)
        res = self.remote.run(f"kill -{signal_name} -- -$(cat {p['pid']}) 2>/dev/null || "
                              f"kill -{signal_name} $(cat {p['pid']})", warn=True)
        return res.ok

    def list_runs(self) -> list[dict]:
        """Remote runs/: id, status, epochs done, the delivered weights' test accuracy and which weights
        (result.json), job state."""
        # runspec is one standard-library file: the machine's python3 runs it as is (see runspec.list_runs)
        source = Path(runspec.__file__).read_text()
        out = self.remote.run(f"python3 -c {shlex.quote(source)} {shlex.quote(self.remote.ep.workdir)}").stdout
        return [json.loads(l) for l in out.splitlines() if l.strip()]
