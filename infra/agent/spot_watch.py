#!/usr/bin/env python3
"""Watch for a spot interruption notice and stop the trainer gracefully.

Started next to the trainer on a spot instance by `mnist-cloud train --on`. Every 5 s it asks the
instance metadata service (IMDSv2: PUT /latest/api/token, then GET
/latest/meta-data/spot/instance-action with that token). The answer is 404 until AWS schedules the
interruption, about two minutes ahead. Then it writes the notice to jobs/RUN.spot-notice and sends
SIGTERM to the trainer's process group: the trainer finishes its step, writes last.pt and marks the
run interrupted. EC2 then stops the instance (`launch --spot` asks for that), and when it starts it
again the resume agent (infra/agent/resume_agent.py) continues every run that has a notice. Without the
instance, `mnist-cloud train --on NAME --resume RUN` continues it on another one. The notice goes to the
--notify URLs too (jobs/notify.py, infra/agent/notify.py).

    python3 jobs/spot_watch.py --pid-file jobs/RUN.pid [--imds http://169.254.169.254] [--interval 5]

Python 3 standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

TOKEN_TTL_S = 21600


class Imds:
    def __init__(self, base: str, timeout: float = 2.0):
        self.base = base.rstrip("/")
        self.timeout = timeout
        self.token: str | None = None
        self.token_expires = 0.0

    def _token(self) -> str:
        if self.token is None or time.time() > self.token_expires - 60:
            request = urllib.request.Request(f"{self.base}/latest/api/token", method="PUT",
                                             headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                self.token = response.read().decode()
            self.token_expires = time.time() + TOKEN_TTL_S
        return self.token

    def instance_action(self) -> dict | None:
        """The scheduled spot action ({"action": "terminate", "time": ...}) or None while there is none."""
        request = urllib.request.Request(f"{self.base}/latest/meta-data/spot/instance-action",
                                         headers={"X-aws-ec2-metadata-token": self._token()})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            if e.code == 401:  # token expired or revoked: get a new one next time
                self.token = None
                return None
            raise


def notice_path(pid_file: str) -> str:
    """jobs/RUN.pid -> jobs/RUN.spot-notice, the file the resume agent looks for."""
    return pid_file.removesuffix(".pid") + ".spot-notice"


def write_notice(path: str, notice: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({**notice, "seen_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f)
    os.replace(tmp, path)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def tell(text: str) -> None:
    """To the --notify URLs: the notifier beside this file (jobs/notify.py) returns at once, whatever they answer."""
    notifier = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notify.py")
    if os.path.exists(notifier):
        subprocess.run([sys.executable, notifier, "send", "spot", text], capture_output=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pid-file", required=True, help="the trainer job's pid file (its process group leader)")
    p.add_argument("--imds", default="http://169.254.169.254", help="metadata endpoint (default: %(default)s)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default: %(default)s)")
    args = p.parse_args()

    deadline = time.time() + 60
    while not os.path.exists(args.pid_file) and time.time() < deadline:
        time.sleep(0.2)
    try:
        pid = int(open(args.pid_file).read().strip())
    except (OSError, ValueError) as e:
        print(f"spot-watch: no trainer pid in {args.pid_file} after 60 s ({e}); not watching", flush=True)
        return 1
    imds = Imds(args.imds)
    print(f"spot-watch: watching pid {pid} via {args.imds} every {args.interval:g}s", flush=True)
    while alive(pid):
        try:
            notice = imds.instance_action()
        except (OSError, ValueError) as e:
            print(f"spot-watch: metadata service error: {e}", flush=True)
            notice = None
        if notice:
            print(f"spot-watch: interruption notice {notice}; sending SIGTERM to the trainer", flush=True)
            # first the notice, then the signal: whatever the trainer's exit, the run is marked as
            # interrupted by EC2, not stopped by someone, and the machine resumes it at its next boot
            write_notice(notice_path(args.pid_file), notice)
            tell(f"{os.path.basename(args.pid_file).removesuffix('.pid')}: spot interruption notice ({notice}); the run "
                 "checkpoints, and resumes when EC2 starts the machine again")
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            except PermissionError:
                os.kill(pid, signal.SIGTERM)
            return 0
        time.sleep(args.interval)
    print("spot-watch: the trainer has exited", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
