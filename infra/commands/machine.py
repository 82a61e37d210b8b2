"""The commands that work on a named machine over SSH: setup, sync, logs, runs, pull, jupyter, tensorboard, ssh, and the
host records behind them (ssh-config, forget-host)."""

from __future__ import annotations

import argparse
import json
import sys

import runspec
from infra.commands.options import (DEFAULT_NAME, cloud_command, code_option, machine_name, python_option, say,
                                   target_for)
from infra.errors import UserError
from runspec import ExitCode


def add_setup(sub, name: str, summary: str) -> None:
    p = cloud_command(sub, name, summary)
    machine_name(p)
    python_option(p, help="interpreter to use there (default: $MNIST_CLOUD_REMOTE_PYTHON, the DLAMI's, a venv)")
    code_option(p)
    p.set_defaults(handler=cmd_setup)


def cmd_setup(args) -> int:
    from infra.targets import code_dir

    target = target_for(args)
    with target.remote:
        py = target.prepare(code_dir(args.code), args.python, log=say, setup=True)
    say(f"{args.name} is set up: python {py}")
    return ExitCode.OK


def add_sync(sub, name: str, summary: str) -> None:
    p = cloud_command(sub, name, summary)
    machine_name(p)
    code_option(p)
    p.set_defaults(handler=cmd_sync)


def cmd_sync(args) -> int:
    from infra.targets import code_dir

    target = target_for(args)
    with target.remote:
        synced = target.sync(code_dir(args.code), log=say)
    say(f"synced {synced.files} file(s), {synced.bytes:,} bytes ({synced.method}) to "
        f"{args.name}:~/{target.remote.ep.workdir}")
    for rel in synced.changed[:20]:
        say(f"  {rel}")
    return ExitCode.OK


def add_logs(sub, name: str, summary: str) -> None:
    p = cloud_command(sub, name, summary)
    machine_name(p)
    p.add_argument("run", nargs="?", help="run id (default: the newest)")
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming until the run ends (Ctrl-C detaches)")
    p.add_argument("--no-desktop-notify", action="store_true",
                   help="-f: no desktop notification (notify-send / osascript) when the run ends")
    p.set_defaults(handler=cmd_logs)


def cmd_logs(args) -> int:
    target = target_for(args)
    with target.remote:
        run_id = args.run or target.latest_run()
        if args.run:
            target.check_run(run_id)
        if args.follow:  # to the end of the run, then pull it: what an attached `train --on` does
            from pathlib import Path

            from infra.runner import RemoteTrain, _follow

            job = RemoteTrain(name=args.name, trainer_args=[], run_id=run_id, local_runs=Path("runs"),
                              desktop_notify=not args.no_desktop_notify)
            code = _follow(target, job, log=say)
            if code in (ExitCode.INTERRUPTED, ExitCode.CONNECTION_LOST):  # detached from a run that goes on
                return code
            say(f"{run_id} finished with exit {code}")
            return code
        target.logs(run_id, follow=False)
    return ExitCode.OK


def add_runs(sub, name: str, summary: str) -> None:
    p = cloud_command(sub, name, summary,
                      description="Each run directory in the machine's runs/: its state (running, "
                                  "completed, interrupted, stopped, or died where no process is left), epochs "
                                  "done, and the delivered weights' test accuracy. `mnist-cloud pull NAME RUN` "
                                  "fetches one; `mnist-cloud logs NAME RUN` shows its log.")
    machine_name(p)
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per run")
    p.set_defaults(handler=cmd_runs)


def cmd_runs(args) -> int:
    target = target_for(args)
    with target.remote:
        runs = [run_record(r) for r in target.runs()]
    if args.json:
        say(json.dumps(runs, indent=2))
    if not runs:
        print(f"no runs on {args.name} yet", file=sys.stderr if args.json else sys.stdout, flush=True)
    elif not args.json:
        for line in runs_table(runs):
            say(line)
    return ExitCode.OK


def run_record(r: dict) -> dict:
    """One run as `runs --json` prints it (keys in docs/reference.md): status says "died" where config.json
    says running but no process is (killed, or the machine rebooted); test_acc and weights are result.json's,
    the weights the run delivers."""
    from datetime import datetime, timezone

    status = "running" if r["alive"] else (r.get("status") or "?")
    if not r["alive"] and status == "running":
        status = "died"
    acc = r.get("test_acc")
    mtime = r.get("mtime")
    return {"run_id": r["run_id"], "status": status, "alive": bool(r["alive"]), "epochs": r.get("epochs"),
            "test_acc": acc if isinstance(acc, (int, float)) else None, "weights": r.get("weights"),
            "modified_at": None if mtime is None else datetime.fromtimestamp(mtime, timezone.utc).isoformat()}


def runs_table(runs: list[dict]) -> list[str]:
    """`mnist-cloud runs`, from run_record()s: TEST ACC is result.json's, the weights the run delivers
    (WEIGHTS: final or ema)."""
    rows = [[r["run_id"], r["status"], r["epochs"], "-" if r["test_acc"] is None else f"{r['test_acc']:.2f}%",
             r["weights"] or "-"] for r in runs]
    return runspec.table(["RUN", "STATUS", "EPOCHS", "TEST ACC", "WEIGHTS"], rows, right=(2, 3))


def add_pull(sub, name: str, summary: str) -> None:
    p = cloud_command(sub, name, summary,
                      description="A run is unpulled until every file of it is here (the record `pull` leaves on "
                                  "the machine), and again once it changes there (a resumed run). --all pulls "
                                  "every unpulled run of NAME; --every-machine does so on every running machine "
                                  "of yours (stopped ones are skipped), and exits 1 if one could not be pulled.")
    machine_name(p, default=None, help=f"the machine (default: {DEFAULT_NAME})")
    p.add_argument("run", nargs="?", help="run id (default: the newest)")
    p.add_argument("--all", action="store_true", help="every run of NAME not pulled yet, or changed since its pull")
    p.add_argument("--every-machine", action="store_true", help="--all, on every running machine of yours")
    p.add_argument("--to", default="runs", metavar="DIR", help="local runs directory (default: %(default)s)")
    p.set_defaults(handler=cmd_pull)


def cmd_pull(args) -> int:
    from pathlib import Path

    if args.every_machine:
        if args.name or args.all:
            raise UserError("--every-machine pulls every run waiting on every machine; it takes no NAME, RUN or --all")
        return pull_every_machine(args)
    args.name = args.name or DEFAULT_NAME
    if args.all:
        if args.run:
            raise UserError(f"--all pulls every unpulled run of {args.name}; give a RUN or --all, not both")
        from infra.unpulled import pull_waiting

        pulled = pull_waiting(args.name, Path(args.to), getattr(args, "region", None), getattr(args, "profile", None),
                              log=say)
        say(f"pulled {len(pulled)} run(s) from {args.name}" if pulled else f"nothing to pull on {args.name}: "
            "every run there is pulled")
        return ExitCode.OK
    target = target_for(args)
    with target.remote:
        run_id = args.run or target.latest_run()
        target.check_run(run_id)
        res = target.pull(run_id, Path(args.to), log=say)
    say(f"pulled {res.files} file(s), {res.bytes:,} bytes ({res.method}) into {Path(args.to) / run_id}")
    return ExitCode.OK


def pull_every_machine(args) -> int:
    """Every unpulled run of every running machine of yours; a machine that cannot be reached is one line,
    and the others are still pulled."""
    from pathlib import Path

    from infra.commands.lifecycle import running_machines
    from infra.unpulled import pull_waiting

    machines, skipped, unasked = running_machines(args)
    for line in skipped + unasked:
        say(line)
    failed = ["EC2"] if unasked else []
    for name, region in machines:
        try:
            pulled = pull_waiting(name, Path(args.to), getattr(args, "region", None) or region,
                                  getattr(args, "profile", None), log=say)
        except UserError as e:
            failed.append(name)
            say(f"{name}: not pulled: {e}")
            continue
        say(f"{name}: pulled {len(pulled)} run(s)" if pulled else f"{name}: nothing to pull")
    if not machines and not skipped and not unasked:
        say("no machines; launch one: mnist-cloud launch --instance g4dn.xlarge")
    if failed:
        say(f"{len(failed)} machine(s) not pulled: {', '.join(failed)}")
        return ExitCode.FAILED
    return ExitCode.OK


def add_jupyter(sub, name: str, summary: str) -> None:
    add_tunnelled(sub, name, summary, cmd_jupyter, 8888,
                  "Start JupyterLab on the machine bound to 127.0.0.1 with a random token, forward a local port to it "
                  "over SSH and print the URL. Ctrl-C closes the tunnel and stops the server (--keep leaves it "
                  "running). No port is opened in the security group.")


def cmd_jupyter(args) -> int:
    from infra.jupyter import serve

    return serve_tunnelled(args, serve)


def add_tensorboard(sub, name: str, summary: str) -> None:
    add_tunnelled(sub, name, summary, cmd_tensorboard, 6006,
                  "Start TensorBoard on the machine's runs/ (the runs trained with --tensorboard), bound to 127.0.0.1 "
                  "there, forward a local port to it over SSH and print the URL. Ctrl-C closes the tunnel and stops "
                  "the server (--keep leaves it running). No port is opened in the security group. Here: "
                  "`tensorboard --logdir runs`.")


def cmd_tensorboard(args) -> int:
    from infra.tensorboard import serve

    return serve_tunnelled(args, serve)


def add_tunnelled(sub, name: str, summary: str, handler, port: int, description: str) -> None:
    """A server on the machine, bound to 127.0.0.1 there, reached through an SSH tunnel (jupyter, tensorboard)."""
    p = cloud_command(sub, name, summary, description=description)
    machine_name(p)
    p.add_argument("--port", type=int, help=f"local port (default: {port}, or a free one if {port} is taken)")
    p.add_argument("--keep", action="store_true", help="leave the server running after the tunnel closes")
    python_option(p, help="interpreter on the machine (default: the one setup chose)")
    code_option(p, help="checkout to sync first (default: the current directory)")
    p.set_defaults(handler=handler)


def serve_tunnelled(args, serve) -> int:
    """Sync and prepare the machine, then serve(target, port, ...) until Ctrl-C (infra/tunnelled.py)."""
    from infra.targets import code_dir
    from infra.tunnelled import check_port_free

    if args.port is not None:
        check_port_free(args.port)
    target = target_for(args)
    with target.remote:
        python = target.prepare(code_dir(args.code), args.python, log=say, ready_timeout=60)
        serve(target, args.port, keep=args.keep, python=python, log=say)
    return ExitCode.OK


def add_ssh(sub, name: str, summary: str) -> None:
    p = cloud_command(sub, name, summary)
    machine_name(p)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="command to run instead of a shell (after --)")
    p.set_defaults(handler=cmd_ssh)


def cmd_ssh(args) -> int:
    import subprocess

    target = target_for(args)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    with target.remote:
        argv = target.remote.ssh_argv(tty=not cmd) + (["-t"] if not cmd and sys.stdin.isatty() else [])
    return subprocess.call([*argv, target.remote.target(), *cmd])


def add_ssh_config(sub, name: str, summary: str) -> None:
    p = cloud_command(sub, name, summary)
    p.add_argument("names", nargs="*", help="names to include (default: all)")
    p.set_defaults(handler=cmd_ssh_config)


def cmd_ssh_config(args) -> int:
    from infra.sshconfig import write_ssh_config

    path, names = write_ssh_config(args.names)
    say(f"wrote {len(names)} host(s) to {path}: {', '.join('mnist-' + n for n in names)}")
    say(f"add this line at the top of ~/.ssh/config (once):  Include {path}")
    return ExitCode.OK


def add_forget_host(sub, name: str, summary: str) -> None:
    p = sub.add_parser(name, help=summary)
    machine_name(p, required=True)
    p.set_defaults(handler=cmd_forget_host)


def cmd_forget_host(args) -> int:
    from infra.remote import forget_host
    from infra.state import State

    host = State().get(args.name)
    if host is None:
        raise UserError(f"unknown name {args.name!r}")
    forget_host(host.instance_id or f"{host.host}:{host.port}")
    say(f"forgot the pinned host key of {args.name}; the next connection pins the key it sees")
    return ExitCode.OK
