#!/usr/bin/env python3
"""mnist-cloud autostop: shut an idle instance down, so nothing idles on the bill, and never destroy an unpulled run.

Installed by `mnist-cloud launch` (cloud-init user data) or `mnist-cloud autostop` (over SSH) as /usr/local/bin/
mnist-cloud-autostop, and run once a minute by a systemd timer (or cron) on the instance: the laptop may be closed.

Idle means: no trainer running (`python -m trainer`, torchrun), no interactive SSH session used within the idle time
(a pty in /dev/pts whose last input, its atime, is recent, as `w` reads it), no SSH session without a terminal (a
pull or sync: sshd's `user@notty`), and no `mnist-cloud jupyter` server with a busy kernel or used within the idle
time (its API says); a Jupyter tunnel alone is not activity. After `idle_minutes` of that, it runs `shutdown -h
now`; EC2 then stops or terminates the instance, per its InstanceInitiatedShutdownBehavior. With `after_train`, it
shuts down `grace_minutes` after a run ends.

Nothing on the instance may call the EC2 API (it holds no credentials), so it cannot choose between stop and
terminate itself: the laptop sets the shutdown behaviour and writes it here (`shutdown_behavior`), and keeps it at
`stop` while runs are not yet pulled. If it is `terminate` while unpulled runs exist (a run made without
mnist-cloud), this watchdog does not shut down at all, and says so.

The same file is the record of pulls (`mnist-cloud pull` runs it with `record`/`unpulled`/`stats`): a run is
unpulled when a file is missing from jobs/<run-id>.pulled.json (size, mtime, sha256) or changed since.

It also holds the machine to its budget (`budget_usd`): its uptime across boots, each minute at the `usd_per_hour`
the laptop had written by then. At 80% it warns in the logs of live runs; at 100% it SIGTERMs them (they checkpoint,
as on a spot notice), shuts down as above, and says why in its budget state and on /dev/console (GetConsoleOutput,
while stopped). The budget's warning and stop, and an autostop, go to the --notify URLs too (infra/agent/notify.py).
Python 3 standard library only: it runs with the system python3, before anything is installed."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(os.environ.get("MNIST_CLOUD_ROOT") or "/")  # cron passes it empty on a real machine
CONFIG = ROOT / "etc/mnist-cloud/autostop.json"
STATE = ROOT / "var/lib/mnist-cloud/autostop-state.json"
BUDGET_STATE = ROOT / "var/lib/mnist-cloud/budget-state.json"  # kept over installs and boots, unlike STATE
CONSOLE = ROOT / "dev/console"  # the serial console: GetConsoleOutput shows it while the machine is stopped
BUDGET_WARN = 0.8
CHECKPOINT_WAIT_S = 120.0  # after SIGTERM: time for the live runs to write last.pt before the shutdown
START_GRACE_S = 300.0  # after a boot that follows a budget stop: time for `start` to push the raised budget
TRAINER_MARKERS = ("-m trainer", "torchrun", "trainer/__main__.py")
MIN_GRACE_MINUTES = 3.0  # after a run ends: time for `logs -f` / `train --on` to pull it
# where `mnist-cloud` keeps each name's work dir, under the login user's home (Endpoint.workdir)
DEFAULT_WORK_DIRS = ["/home/*/mnist-cloud/*", "/root/mnist-cloud/*"]
# the jobs of `mnist-cloud jupyter` (infra/jupyter.py, see jupyter_files) and `tensorboard` (infra/tensorboard.py)
JUPYTER_JOB_PREFIX, TENSORBOARD_JOB_PREFIX = "jupyter-", "tensorboard-"
JUPYTER_TIMEOUT_S = 3.0
CLOCK_SLACK_S = 60.0  # a last_activity further ahead than this is a broken answer


def decide(now: float, config: dict, state: dict, trainer_running: bool, pty_sessions: int,
           boot: str = "", notty_sessions: int = 0, unpulled: list[str] = (), busy_kernels: int = 0,
           jupyter_used: float | None = None) -> tuple[str | None, dict, str]:
    """(action or None, new state, reason). Pure: the whole policy, testable without a machine.

    `pty_sessions` counts only terminals used within the idle time (see active_ptys); `notty_sessions` counts SSH
    sessions without a terminal (pull, sync, rsync), which are activity too, as are `busy_kernels` and a
    `jupyter_used` (Unix time) within the idle time (see jupyter_activity). `unpulled` names runs not yet pulled:
    with action terminate, the instance stops instead. `boot` identifies this boot: the state file survives a
    stop/start, so an earlier boot's state is dropped; else a restarted instance would count its stopped hours as
    idle (or remember a finished run) and shut down at the first check."""
    state = dict(state)
    if state.get("boot", boot) != boot:
        state = {}
    state["boot"] = boot
    state.setdefault("last_active", now)
    if not config.get("enabled", True):
        return None, state, "autostop is off"
    if trainer_running:
        state.update(last_active=now, seen_trainer=True)
        return None, state, "a trainer is running"
    for count, what in ((pty_sessions, "interactive session(s)"), (notty_sessions, "SSH session(s) without a "
                        "terminal (a pull or sync)"), (busy_kernels, "Jupyter kernel(s) busy")):
        if count:  # busy: e.g. a cell running fit()
            state["last_active"] = now
            return None, state, f"{count} {what}"
    # a time far ahead is a broken answer: taken as activity, it could keep the machine up for good
    if jupyter_used is not None and now - activity_window(config) < jupyter_used <= now + CLOCK_SLACK_S:
        state["last_active"] = max(state["last_active"], min(jupyter_used, now))
        return None, state, f"JupyterLab used {max(now - jupyter_used, 0) / 60:.1f} min ago"
    idle_for, idle_minutes = now - state["last_active"], float(config.get("idle_minutes", 30))
    grace = max(MIN_GRACE_MINUTES, float(config.get("grace_minutes", MIN_GRACE_MINUTES)))
    if config.get("after_train") and state.get("seen_trainer"):
        if idle_for < grace * 60:
            return None, state, f"the run ended {idle_for / 60:.1f} min ago; grace period {grace:g} min"
        action, reason = shutdown(config, unpulled, "the run ended (after_train)")
        return action, state, reason
    if idle_minutes > 0 and idle_for >= idle_minutes * 60:
        action, reason = shutdown(config, unpulled, f"idle for {idle_for / 60:.1f} min (limit {idle_minutes:g})")
        return action, state, reason
    return None, state, f"idle for {idle_for / 60:.1f} min of {idle_minutes:g}"


def activity_window(config: dict) -> float:
    """Seconds within which a use (a terminal's input, JupyterLab's) counts: the idle time, or the
    shortest grace period with after_train alone."""
    return float(config.get("idle_minutes", 30)) * 60 or MIN_GRACE_MINUTES * 60


def shutdown(config: dict, unpulled: list[str], reason: str) -> tuple[str | None, str]:
    """(action, reason) for a shutdown due now. EC2 does what its shutdown behaviour says, which the laptop set (and
    wrote into our config); we cannot change it, only decide not to shut down."""
    wanted = config.get("action", "stop")
    behavior = config.get("shutdown_behavior") or wanted
    if unpulled and wanted == "terminate":
        names = ", ".join(sorted(unpulled)[:5]) + (" ..." if len(unpulled) > 5 else "")
        if behavior == "terminate":
            return None, (f"{reason}, but EC2 would terminate it and {len(unpulled)} run(s) are not pulled "
                          f"({names}): staying up; `mnist-cloud pull` them or `mnist-cloud down` the name")
        return "shutdown", f"{reason}; stopping instead of terminating: {len(unpulled)} run(s) not pulled ({names})"
    if behavior != wanted:
        return "shutdown", f"{reason} (EC2 will {behavior} it, as mnist-cloud last set it)"
    return "shutdown", reason


# ---------------------------------------------------------------------------------- the budget
def uptime_seconds(path: Path = ROOT / "proc/uptime") -> float:  # ROOT is / but on a test host, which forges it
    try:
        return float(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def count_uptime(bstate: dict, boot: str, uptime: float) -> dict:
    """With this boot's uptime: earlier boots' add up in before_s (the whole uptime: before_s + boot_s)."""
    bstate = dict(bstate)
    if bstate.get("boot", boot) != boot:
        bstate["before_s"] = float(bstate.get("before_s", 0)) + float(bstate.get("boot_s", 0))
    bstate.update(boot=boot, boot_s=uptime, before_s=float(bstate.get("before_s", 0)))
    return bstate


def spent_usd(config: dict, bstate: dict) -> float | None:
    """What the machine has cost since launch (compute only), or None without a price: the uptime already counted
    (priced_s) at the prices of its time (paid_usd), and the rest at today's price."""
    price, up_s = config.get("usd_per_hour"), float(bstate.get("before_s", 0)) + float(bstate.get("boot_s", 0))
    unpaid_s = max(0.0, up_s - float(bstate.get("priced_s", 0)))
    return None if price is None else float(bstate.get("paid_usd", 0)) + unpaid_s / 3600 * float(price)


def settle(config: dict, bstate: dict) -> dict:
    """Keep what the uptime so far cost at the price in force, so that a new price counts from now on only."""
    spent, up_s = spent_usd(config, bstate), float(bstate.get("before_s", 0)) + float(bstate.get("boot_s", 0))
    return bstate if spent is None else dict(bstate, paid_usd=spent, priced_s=max(up_s, bstate.get("priced_s", 0)))


def budget_decide(config: dict, bstate: dict) -> tuple[str | None, dict, str]:
    """("warn" | "stop" | None, new budget state, what it says). Pure. Warns once per budget."""
    budget, spent = config.get("budget_usd"), spent_usd(config, bstate)
    bstate = dict(settle(config, bstate), spent_usd=spent, budget_usd=budget)
    if budget is None:
        return None, bstate, ""
    if spent is None:
        return None, bstate, f"budget ${budget:g}, but no price yet: not counted"
    said = f"spent ${spent:.2f} of the ${budget:g} budget ({float(config['usd_per_hour']):g} USD/h)"
    stopped = bstate.get("stopped") or {}
    if spent >= budget and stopped.get("boot", bstate["boot"]) != bstate["boot"] and bstate["boot_s"] < START_GRACE_S:
        return None, bstate, f"{said}; it stopped the machine before: time for `mnist-cloud start` to raise it"
    if spent >= budget:
        return "stop", bstate, said
    if spent >= BUDGET_WARN * budget and bstate.get("warned") != budget:
        bstate["warned"] = budget
        return "warn", bstate, said
    return None, bstate, said


def live_runs(workdirs: list[Path]) -> dict[Path, int]:
    """{jobs/RUN.log: pid} of the jobs still running (not Jupyter or TensorBoard, nor a spot watcher)."""
    out = {}
    for workdir in workdirs:
        for pid_file in sorted(Path(workdir).glob("jobs/*.pid")):
            if pid_file.stem.startswith((JUPYTER_JOB_PREFIX, TENSORBOARD_JOB_PREFIX)) or \
                    pid_file.stem.endswith(".spot-watch") or pid_file.with_suffix(".exit").exists():
                continue
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            if alive(pid):
                out[pid_file.with_suffix(".log")] = pid
    return out


def tell(logs: list[Path], line: str) -> None:
    for path in [*logs, CONSOLE]:
        try:
            with open(path, "a") as f:
                f.write(line + "\n")
        except OSError:
            continue


def enforce_budget(config: dict, workdirs: list[Path], now: float, uptime: float, boot: str) -> str | None:
    """Count this minute, warn or checkpoint the live runs; the reason to shut down, if over budget."""
    action, bstate, said = budget_decide(config, count_uptime(load(BUDGET_STATE, {}), boot, uptime))
    runs = live_runs(workdirs) if action else {}
    if action == "stop":
        bstate["stopped"] = {"at": now, "boot": boot, "reason": f"budget reached: {said}"}
    save(BUDGET_STATE, bstate)
    if action == "warn":
        tell(list(runs), f"mnist-cloud budget: warning: {said}; at 100% the runs checkpoint and the machine stops")
        notify("budget-warning", said)
    if action != "stop":
        return None
    tell(list(runs), f"mnist-cloud budget: stopped: {said}; `mnist-cloud budget NAME USD` raises it")
    for pid in runs.values():  # as on a spot notice: each finishes its step and writes last.pt
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            continue
    for _ in range(int(CHECKPOINT_WAIT_S)):
        if not any(alive(pid) for pid in runs.values()):
            break
        time.sleep(1.0)
    return bstate["stopped"]["reason"]


def notify(event: str, text: str, *how: str) -> None:  # to the --notify URLs: at once (--wait: by its cap), never fails
    subprocess.run([sys.executable, str(ROOT / "usr/local/bin/mnist-cloud-notify"), "send", event, text, *how],
                   capture_output=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# ---------------------------------------------------------------------------------- activity
def trainer_running(proc: Path = Path("/proc")) -> bool:
    me = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "mnist-cloud-autostop" not in cmdline and any(m in cmdline for m in TRAINER_MARKERS):
            return True
    return False


def active_ptys(now: float, idle_seconds: float, pts: Path = Path("/dev/pts")) -> int:
    """Pseudo-terminals (an interactive ssh, tmux, screen) with input within `idle_seconds`. A terminal's atime is
    its last input, as `w` reads it: a forgotten open shell does not count."""
    count = 0
    try:
        entries = list(pts.iterdir())
    except OSError:
        return 0
    for p in entries:
        if not p.name.isdigit():
            continue
        try:
            if idle_seconds <= 0 or now - p.stat().st_atime < idle_seconds:
                count += 1
        except OSError:
            continue
    return count


def processes(proc: Path) -> dict[int, tuple[int, str, str]]:
    """{pid: (parent pid, command line, network namespace)} of every process we can read."""
    out = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # after "pid (comm) state"
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            netns = os.readlink(entry / "ns" / "net")
        except (OSError, ValueError, IndexError):
            continue
        out[int(entry.name)] = (ppid, cmdline, netns)
    return out


def notty_sessions(proc: Path = Path("/proc")) -> int:
    """SSH sessions without a terminal that are doing something: sshd names such a session's
    process `sshd: USER@notty` (`sshd-session: ...` from OpenSSH 9.8), and a pull or sync runs a
    command under it (rsync, sftp-server, python3). A tunnel alone (Jupyter) runs none: not activity.
    Only sessions of our own network namespace count, and never the one this check runs in."""
    table = processes(proc)
    me = int(os.readlink(proc / "self"))
    mine = table.get(me, (0, "", ""))[2]
    ancestors, pid = set(), me
    while pid in table and pid not in ancestors:
        ancestors.add(pid)
        pid = table[pid][0]
    parents = {ppid for ppid, _, _ in table.values()}
    return sum(1 for pid, (_, cmdline, netns) in table.items()
               if cmdline.startswith("sshd") and cmdline.endswith("@notty") and netns == mine
               and pid not in ancestors and pid in parents)


def jupyter_files(job: str) -> tuple[str, str]:
    """A `mnist-cloud jupyter` server's token file (mode 600) and port file (127.0.0.1), in its work dir."""
    return f"jobs/{job}.token", f"jobs/{job}.port"


def jupyter_servers(workdirs: list[Path]) -> list[tuple[int, str]]:
    """(port, token) of each `mnist-cloud jupyter` server with files in these work dirs (a dead one's may linger)."""
    servers = []
    for workdir in workdirs:
        for token_file in sorted(Path(workdir).glob(f"jobs/{JUPYTER_JOB_PREFIX}*.token")):
            token_path, port_path = jupyter_files(token_file.name[:-len(".token")])
            try:
                servers.append((int((Path(workdir) / port_path).read_text()),
                                (Path(workdir) / token_path).read_text().strip()))
            except (OSError, ValueError):
                continue
    return servers


def jupyter_activity(servers: list[tuple[int, str]], timeout: float = JUPYTER_TIMEOUT_S) -> tuple[int, float | None]:
    """(busy kernels, latest last_activity as a Unix time or None) of these servers, from their /api/status and
    /api/kernels. Jupyter Server counts any other API request as activity: `no_track_activity` keeps ours out, or
    asking would keep the machine up. A server that is gone, slow or answers nonsense adds nothing."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via an http_proxy
    busy, latest = 0, None
    for port, token in servers:
        def get(path: str):
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}?no_track_activity=1",
                                             headers={"Authorization": f"token {token}"})
            with opener.open(request, timeout=timeout) as response:
                return json.loads(response.read(1 << 20))

        try:  # whatever a server answers, the watchdog carries on
            used = iso_time(get("/api/status")["last_activity"])
            kernels = get("/api/kernels")
            busy += sum(1 for k in kernels if isinstance(k, dict) and k.get("execution_state") == "busy")
        except Exception:
            continue
        latest = used if latest is None else max(latest, used)
    return busy, latest


def iso_time(text: str) -> float:
    """Jupyter's "2025-01-02T03:04:05.678901Z" as a Unix time (fromisoformat takes "Z" from 3.11 on)."""
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def boot_id(path: Path = Path("/proc/sys/kernel/random/boot_id")) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------- the pull record; files
def is_temp(name: str) -> bool:
    """A write in progress (ours `.NAME.part-PID`, the trainer's `.NAME.tmpPID`): never part of a run."""
    return ".part-" in name or (name.startswith(".") and ".tmp" in name)


def file_stats(root: Path, with_hash: bool = False) -> dict[str, list]:
    """{relative path: [size, mtime] (+ [sha256])} of the files under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if is_temp(f):
                continue
            path = os.path.join(d, f)
            try:
                st = os.stat(path)
                row = [st.st_size, st.st_mtime]
                if with_hash:
                    with open(path, "rb") as fh:
                        row.append(hashlib.file_digest(fh, "sha256").hexdigest() if hasattr(hashlib, "file_digest")
                                   else hashlib.sha256(fh.read()).hexdigest())
            except OSError:
                continue
            out[os.path.relpath(path, root)] = row
    return out


def record_path(workdir: Path, run_id: str) -> Path:  # the pull record of a run
    return Path(workdir) / "jobs" / f"{run_id}.pulled.json"


def record_pulled(workdir: Path, run_id: str, verified: dict[str, str]) -> list[str]:
    """Record the files of a run that the laptop holds, as {path: sha256} it verified. A file that
    changed since (a live run) is left out, so the run stays unpulled. Returns what is unrecorded."""
    now = file_stats(Path(workdir) / "runs" / run_id, with_hash=True)
    files = {rel: row for rel, row in now.items() if verified.get(rel) == row[2]}
    save(record_path(workdir, run_id), {"run_id": run_id, "pulled_at": time.time(), "files": files})
    return sorted(set(now) - set(files))


def unpulled_runs(workdirs: list[Path]) -> list[str]:
    """Runs with a file that is not in their pull record, or has another size or mtime than recorded."""
    out = []
    for workdir in workdirs:
        runs = Path(workdir) / "runs"
        try:
            run_ids = sorted(p.name for p in runs.iterdir() if p.is_dir())
        except OSError:
            continue
        for run_id in run_ids:
            record = load(record_path(workdir, run_id), {}).get("files", {})
            current = file_stats(runs / run_id)
            if any(record.get(rel, [None, None])[:2] != row for rel, row in current.items()):
                out.append(run_id)
    return out


def work_dirs(config: dict) -> list[Path]:
    """The config's work dirs (the one `mnist-cloud autostop` installed from) and every name's."""
    found = [os.path.realpath(p) for pattern in [*config.get("work_dirs", []), *DEFAULT_WORK_DIRS]
             for p in sorted(glob.glob(pattern))]
    return [Path(p) for p in dict.fromkeys(found)]


def load(path: Path, default: dict) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return dict(default)


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def tool(argv: list[str]) -> int:
    """The laptop's side, over SSH as `python3 -c SOURCE COMMAND ARGS`: `stats DIR` (each file's size, mtime, sha256),
    `record WORKDIR RUN JSON`, `unpulled WORKDIR`, as root `set-shutdown stop|terminate` (what EC2 now does on
    shutdown) and `set-budget USD|none USD_PER_HOUR SOURCE` (prints what the machine has cost)."""
    command, args = argv[0], argv[1:]
    if command == "stats":
        for rel, (size, mtime, digest) in file_stats(Path(os.path.expanduser(args[0])), with_hash=True).items():
            print(digest, mtime, size, rel)
    elif command == "record":
        left = record_pulled(Path(os.path.expanduser(args[0])), args[1], json.loads(args[2]))
        print(json.dumps(left))
    elif command == "unpulled":
        print(json.dumps(unpulled_runs([Path(os.path.expanduser(args[0]))])))
    elif command == "set-budget":  # BUDGET|none USD_PER_HOUR SOURCE: as root; prints what it has cost
        installed, config = CONFIG.exists(), load(CONFIG, {"enabled": False})
        bstate = settle(config, count_uptime(load(BUDGET_STATE, {}), boot_id(), uptime_seconds()))  # at the old price
        save(BUDGET_STATE, bstate)
        config.update(budget_usd=None if args[0] == "none" else float(args[0]),
                      usd_per_hour=float(args[1]), price_source=" ".join(args[2:]))
        save(CONFIG, config)
        print(json.dumps({"spent_usd": spent_usd(config, bstate), "installed": installed}))
    elif command == "set-shutdown":
        config = load(CONFIG, {})
        if config:  # no watchdog installed: nothing here acts on it
            save(CONFIG, {**config, "shutdown_behavior": args[0]})
    else:
        print(f"unknown command {command!r}", file=sys.stderr)
        return 2
    return 0


def main() -> int:
    config = load(CONFIG, {"enabled": False})
    state = load(STATE, {})
    now = time.time()
    workdirs = work_dirs(config)
    over = enforce_budget(config, workdirs, now, uptime_seconds(), boot_id())
    if over:  # whatever autostop's own setting: the laptop keeps EC2's shutdown behaviour at stop
        print(f"mnist-cloud-autostop: {over} -> shutdown", flush=True)
        return power_off(state, now, over)
    busy_kernels, jupyter_used = jupyter_activity(jupyter_servers(workdirs))
    action, new_state, reason = decide(now, config, state, trainer_running(), active_ptys(now, activity_window(config)),
                                       boot_id(), notty_sessions(), unpulled_runs(workdirs), busy_kernels, jupyter_used)
    save(STATE, new_state or state)
    print(f"mnist-cloud-autostop: {reason}" + (f" -> {action}" if action else ""), flush=True)
    return power_off(new_state or state, now, reason) if action == "shutdown" else 0


def power_off(state: dict, now: float, reason: str) -> int:
    """The one way the watchdog shuts the machine down (idle, after a run, over budget)."""
    save(STATE, {**state, "fired_at": now})
    notify("budget-stop" if reason.startswith("budget") else "autostop", reason, "--wait")  # before it is down
    return subprocess.call(["shutdown", "-h", "now", "mnist-cloud autostop: " + reason])


if __name__ == "__main__":
    sys.exit(tool(sys.argv[1:]) if len(sys.argv) > 1 else main())
