#!/usr/bin/env python3
"""mnist-cloud resume agent: at boot, continue the runs that a spot interruption stopped.

Installed with the autostop watchdog (infra/watchdog.py) as /usr/local/bin/mnist-cloud-resume, and run
once per boot by systemd (mnist-cloud-resume.service) or cron (@reboot). `mnist-cloud launch --spot`
asks EC2 to stop the instance on an interruption and to start it again when capacity returns; this
agent then continues the runs by itself, with the laptop closed all along.

A run is resumed when all of these hold (decide()):
- the spot watcher saw the interruption notice (jobs/RUN.spot-notice, infra/agent/spot_watch.py). A run
  stopped on purpose (kill, `mnist-cloud stop`, --stop-after) has none;
- `mnist-cloud train --on` left its job record (jobs/RUN.job.json): the commands that continue it,
  the very ones it starts jobs with, so the same pid and log files serve `logs -f` and `runs`;
- the run has not finished (config.json says "interrupted", or "running" when it died before it
  could say so), and it is not running now.
The notice is renamed to RUN.spot-notice.resumed before the run starts again. A rename succeeds
once: of two agents, one wins, and a second boot finds no notice, so no run is ever started twice.

Python 3 standard library only: it runs with the system python3.

    mnist-cloud-resume [--home DIR ...]   (default: every user's home)
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

JOB_SUFFIX = ".job.json"  # written by infra/jobs.py record_job
NOTICE_SUFFIX = ".spot-notice"  # written by infra/agent/spot_watch.py
LEGACY_STATUS_FILE = "config.json"  # records from before status_file: where the run's status was then
RESUMABLE = {"interrupted", "running"}
NOT_RESUMABLE = {
    "completed": "it finished",
    "stopped": "it stopped on purpose (--stop-after)",
    "failed": "it failed; see its log",
}
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def decide(has_notice: bool, has_record: bool, status: str | None, alive: bool) -> tuple[bool, str]:
    """(resume it?, why). Pure: the whole policy, testable without a machine."""
    if alive:
        return False, "it is running"
    if not has_notice:
        return False, "no spot interruption notice: stopped on purpose, or by a shutdown of its own"
    if not has_record:
        return False, "no job record (a cluster run?): continue it with `mnist-cloud train --on NAME --resume RUN`"
    if status is None:
        return False, "interrupted before it wrote its run directory: start it again from the laptop"
    if status not in RESUMABLE:
        return False, NOT_RESUMABLE.get(status, f"its status is {status!r}")
    return True, f"a spot interruption stopped it (status {status})"


# ---------------------------------------------------------------------------------- facts
def run_status(workdir: Path, run_id: str) -> str | None:
    """The run's status, from the file its job record names (the run directory's config.json, as
    runspec spells it); None when there is no record, no such file yet, or either is damaged."""
    try:
        record = json.loads((workdir / "jobs" / f"{run_id}{JOB_SUFFIX}").read_text())
        status_file = record.get("status_file") or f"runs/{run_id}/{LEGACY_STATUS_FILE}"
        return json.loads((workdir / status_file).read_text()).get("status")
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def job_alive(workdir: Path, run_id: str) -> bool:
    """Whether the job's wrapper process lives. A pid file from an earlier boot may name a process
    that has since reused the number, so its command line must be the wrapper's: it ends by writing
    jobs/RUN.exit (infra/jobs.py detached_command)."""
    try:
        pid = int((workdir / "jobs" / f"{run_id}.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return False
    return f"jobs/{run_id}.exit" in cmdline


def candidates(workdir: Path) -> list[str]:
    """Run ids in jobs/ with a job record or a notice."""
    jobs = workdir / "jobs"
    ids = {p.name[:-len(suffix)] for suffix in (JOB_SUFFIX, NOTICE_SUFFIX) for p in jobs.glob(f"*{suffix}")}
    return sorted(ids)


def workdirs(homes: list[Path]) -> list[Path]:
    """~/mnist-cloud/NAME directories that hold jobs/."""
    found = []
    for home in homes:
        root = home / "mnist-cloud"
        if root.is_dir():
            found += sorted(d for d in root.iterdir() if (d / "jobs").is_dir())
    return found


def user_homes() -> list[Path]:
    return sorted({Path(p.pw_dir) for p in pwd.getpwall() if p.pw_dir and p.pw_dir != "/"})


# ---------------------------------------------------------------------------------- acting
def load_record(path: Path) -> tuple[dict, int]:
    """The job record and the uid it belongs to; refused if anyone else could have written it."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o022:
        raise ValueError(f"{path} is not a regular file that only its owner can write")
    return json.loads(path.read_text()), st.st_uid


def as_user(uid: int, home: Path) -> dict:
    """subprocess arguments that run a command as the job's owner, from the home its work dir is in
    (the commands start with `cd mnist-cloud/NAME`, as over SSH)."""
    try:
        user = pwd.getpwuid(uid)
        name, gid = user.pw_name, user.pw_gid
    except KeyError:
        name, gid = str(uid), uid
    env = {"HOME": str(home), "USER": name, "LOGNAME": name, "PATH": PATH, "LANG": "C.UTF-8"}
    kwargs = {"cwd": str(home), "env": env}
    if os.geteuid() == 0 and uid != 0:  # systemd and cron run the agent as root
        kwargs.update(user=uid, group=gid, extra_groups=os.getgrouplist(name, gid))
    return kwargs


def resume(workdir: Path, run_id: str, log) -> bool:
    jobs = workdir / "jobs"
    try:
        record, uid = load_record(jobs / f"{run_id}{JOB_SUFFIX}")
        commands = record["resume"]
    except (OSError, ValueError, KeyError) as e:
        log(f"{run_id}: unreadable job record ({e}); not resumed")
        return False
    notice = jobs / f"{run_id}{NOTICE_SUFFIX}"
    try:
        os.rename(notice, notice.with_name(notice.name + ".resumed"))
    except FileNotFoundError:
        log(f"{run_id}: another agent resumed it just now")
        return False
    home = workdir.parent.parent  # HOME/mnist-cloud/NAME
    for command in commands:  # the trainer with --resume, then its spot watcher
        out = subprocess.run(["bash", "-c", command], check=False, capture_output=True, text=True, timeout=120,
                             **as_user(uid, home))
        if out.returncode != 0:
            log(f"{run_id}: `{command[:80]}` failed (exit {out.returncode}): {out.stderr.strip()[-300:]}")
            return False
        log(f"{run_id}: started pid {out.stdout.strip()} (uid {uid})")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", action="append", type=Path, help="look only in this home directory (repeatable)")
    args = p.parse_args(argv)

    def log(message: str) -> None:
        print(f"mnist-cloud-resume: {message}", flush=True)

    failed = False
    for workdir in workdirs(args.home or user_homes()):
        jobs = workdir / "jobs"
        for run_id in candidates(workdir):
            go, why = decide(has_notice=(jobs / f"{run_id}{NOTICE_SUFFIX}").exists(),
                             has_record=(jobs / f"{run_id}{JOB_SUFFIX}").exists(),
                             status=run_status(workdir, run_id), alive=job_alive(workdir, run_id))
            log(f"{workdir}: {run_id}: {'resuming, ' if go else 'left alone, '}{why}")
            if go and not resume(workdir, run_id, log):
                failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
