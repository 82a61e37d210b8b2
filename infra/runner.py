"""`mnist-cloud train --on NAME`: the job planned from the flags as typed (where the run lives is the
laptop's to decide, the trainer flags are checked before anything moves), then sync, set up, start the
same `python -m trainer train` detached on the machine (or under torchrun: --gpus N on one machine,
--nodes K across a cluster), stream rank 0's log, and pull runs/<run-id>/ back. The remote exit status
becomes ours."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import runspec
from infra.errors import ConnectionLost, Parser, UserError
from infra.notify import push_notify
from infra.poll import poll
from infra.targets import SSHTarget, code_dir, new_run_id
from runspec import ExitCode

RDZV_PORT = 29500


@dataclass
class RemoteTrain:
    name: str
    trainer_args: list[str]
    run_id: str
    resume: str | None = None  # the run to continue (its id or local path)
    detach: bool = False
    python: str | None = None
    code: str | None = None
    gpus: str | None = None  # "N" or "all": torchrun --nproc_per_node on each machine
    nodes: int | None = None  # K: torchrun --nnodes K across the cluster called `name`
    env: dict[str, str] = field(default_factory=dict)
    local_runs: Path = Path("runs")
    region: str | None = None
    profile: str | None = None
    desktop_notify: bool = True  # a desktop notification when the followed run ends (infra/desktop.py)
    notify: list[str] = field(default_factory=list)  # URLs the machine POSTs its events to (infra/agent/notify.py)


# The trainer flags that say where a run lives: on a machine, the laptop decides them (the run is
# runs/RUN there, and pulled into --out-dir here).
PLACEMENT = ("out_dir", "run_id", "resume")


def plan_remote_train(name: str, rest: list[str], *, detach: bool = False, python: str | None = None,
                      code: str | None = None, gpus: str | None = None, nodes: str | None = None,
                      env: list[str] = (), region: str | None = None, profile: str | None = None) -> RemoteTrain:
    """`train --on NAME`'s job, from mnist-cloud train's own flags and the trainer flags as typed (`rest`):
    checked here, in one line, before any sync or setup."""
    resumed = placement_and_flags(rest, check=False)[0]["resume"]
    checked = not resumed and not code
    where, trainer_args = placement_and_flags(rest, check=checked, code=None if resumed else code_dir(code))
    if where["resume"] and where["run_id"]:
        raise UserError("--resume continues an existing run; it takes no --run-id")
    if nodes is not None and (not nodes.isdigit() or int(nodes) < 1):
        raise UserError(f"--nodes {nodes!r}: give the number of machines, e.g. --nodes 2")
    resume = where["resume"]
    run_id = Path(resume).name if resume else where["run_id"] or new_run_id(name, where["model"])
    return RemoteTrain(name=name, trainer_args=trainer_args, run_id=run_id, resume=resume, detach=detach,
                       python=python, code=code, gpus=gpus, nodes=int(nodes) if nodes else None,
                       env=parse_env(env), local_runs=Path(where["out_dir"] or "runs"), region=region,
                       profile=profile)


def placement_and_flags(rest: list[str], check: bool, code=None) -> tuple[dict[str, str | None], list[str]]:
    """({out_dir, run_id, resume, model}: what was typed, else None; the other trainer flags).

    check: the flags are parsed and checked with the trainer's own definition (runspec.config), so a
    typo fails here in one line, before any sync or setup, and the machine gets them as parsed.
    Otherwise (a resume, whose flags are its config.json's, or --code, whose trainer may know other
    flags) they pass through as typed."""
    from runspec.config import parse_train_args, to_argv

    if check:
        _, typed = parse_train_args(rest)
        where = {key: typed.pop(key, None) for key in PLACEMENT}
        if "model" in typed and code is not None:
            typed["model"] = model_for_machine(typed["model"], code)
        return {**where, "model": typed.get("model")}, to_argv(typed)
    p = Parser(prog="mnist-cloud train", add_help=False)
    for key in (*PLACEMENT, "model"):
        p.add_argument("--" + key.replace("_", "-"))
    where, other = p.parse_known_args(rest)
    model = ["--model", model_for_machine(where.model, code) if code is not None else where.model] if where.model else []
    return vars(where), model + other


def model_for_machine(model: str | None, code) -> str | None:
    """`--model FILE.py:Name` on a machine: the file travels with the synced code, so it must lie in
    that directory, and the machine names it relative to its work dir. Other specs pass as typed."""
    from infra.transfer import local_files

    target, _, attr = (model or "").rpartition(":")
    if not target or not (target.endswith(".py") or "/" in target):
        return model
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"--model {model}: {target} does not exist")
    try:
        rel = path.relative_to(code).as_posix()
    except ValueError:
        raise UserError(f"--model {model}: {path} is outside {code}, the directory synced to the machine; "
                        "move it into your project, or pass --code DIR") from None
    if rel not in set(local_files(code)):
        raise UserError(f"--model {model}: {rel} is not synced (ignored by .gitignore, or a name mnist-cloud "
                        "never syncs); move or rename it")
    return f"{rel}:{attr}"


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.replace("_", "").isalnum():
            raise UserError(f"--env {pair!r}: expected NAME=VALUE")
        env[key] = value
    return env


def nproc(target: SSHTarget, python: str, gpus: str | None) -> int | None:
    """Processes per machine for torchrun, or None for a plain single process."""
    if gpus is None:
        return None
    if gpus == "all":
        count = target.gpu_count(python)
        if count == 0:
            raise UserError(f"{target.name} has no GPU that torch can see; use --gpus N to run N CPU processes")
        return count
    if not gpus.isdigit() or int(gpus) < 1:
        raise UserError(f"--gpus {gpus!r}: give a number of processes per machine, or 'all'")
    return int(gpus)


def ensure_run_there(target: SSHTarget, job: RemoteTrain, log) -> None:
    """--resume on a machine that lacks the run (a new instance): push the laptop's copy first."""
    if target.has_run(job.run_id):
        return
    local_run = Path(job.resume) if Path(job.resume).is_dir() else job.local_runs / job.run_id
    if not (local_run / runspec.CONFIG).is_file():
        raise UserError(f"no run {job.run_id!r} on {job.name} nor in {job.local_runs}; "
                        f"`mnist-cloud runs {job.name}` lists them")
    pushed = target.push_run(local_run, log=log)
    log(f"{job.name} did not have {job.run_id} (a new instance?): pushed the local copy, {pushed.files} file(s)")


def train_remote(job: RemoteTrain, log=print) -> int:
    if job.nodes and job.nodes > 1:
        return _train_cluster(job, log)
    source = code_dir(job.code)
    target = SSHTarget.resolve(job.name, job.region, job.profile)
    with target.remote:
        py = with_extras(target, target.prepare(source, job.python, log), job, log)
        push_notify(target.remote, job.notify, log)
        if job.resume:
            ensure_run_there(target, job, log)
        n = nproc(target, py, job.gpus)
        launcher = ["--standalone", "--nproc_per_node", str(n)] if n else None
        pid = target.run(job.trainer_args, job.run_id, py, env={**runspec.git_env(source), **job.env},
                         resume=bool(job.resume), launcher=launcher)
        log(f"{'resumed' if job.resume else 'started'} {job.run_id} on {job.name} (pid {pid}"
            f"{f', torchrun x {n}' if n else ''}); it runs detached and survives this laptop disconnecting"
            + ("; a spot-interruption watcher runs with it" if target.lifecycle == "spot" else ""))
        return _follow(target, job, log)


def with_extras(target: SSHTarget, python: str, job: RemoteTrain, log) -> str:
    """The interpreter, with tensorboard installed there first when the run writes its event files."""
    if "--tensorboard" not in job.trainer_args:
        return python
    from infra.tensorboard import ensure_tensorboard

    return ensure_tensorboard(target, python, log)


def _follow(target: SSHTarget, job: RemoteTrain, log, others: list[SSHTarget] = ()) -> int:
    """Stream the log until the run ends, pull it, and return the remote exit code."""
    name, run_id = job.name, job.run_id
    reattach = f"reattach: mnist-cloud logs {name} {run_id} -f   |   fetch: mnist-cloud pull {name} {run_id}"
    if job.detach:
        log(f"follow: mnist-cloud logs {name} {run_id} -f   |   fetch: mnist-cloud pull {name} {run_id}")
        return ExitCode.OK
    try:
        target.logs(run_id, follow=True)
        _, code = target.wait_finished(run_id)
        for other in others:  # every node's torchrun must be done too
            _, other_code = other.wait_finished(run_id, timeout=120)
            if code == ExitCode.OK and other_code:
                code = other_code
    except KeyboardInterrupt:
        print(f"\nstopped streaming; {run_id} keeps training on {name}.\n{reattach}", file=sys.stderr, flush=True)
        return ExitCode.INTERRUPTED
    except ConnectionLost as e:
        print(f"\n{e}; {run_id} keeps training on {name}.\n{reattach}", file=sys.stderr, flush=True)
        tell(job, "lost the connection", f"{run_id} keeps training on {name}; mnist-cloud logs {name} {run_id} -f")
        return ExitCode.CONNECTION_LOST
    if not target.has_run(run_id):
        log(f"{run_id} ended (exit {code}) before writing a run directory; see the log above")
        tell(job, "failed", f"exit {code} on {name} before writing a run directory")
        return code if code is not None else ExitCode.FAILED
    pulled = target.pull(run_id, job.local_runs, log=log)
    result_file = job.local_runs / run_id / runspec.RESULT
    if code is not None and code > ExitCode.KILLED_BY_SIGNAL:
        log(f"{run_id} was interrupted (signal {code - ExitCode.KILLED_BY_SIGNAL}); its checkpoint is pulled. "
            f"Continue it with: mnist-cloud train --on {name} --resume {run_id}")
        tell(job, "interrupted", f"signal {code - ExitCode.KILLED_BY_SIGNAL} on {name}; its checkpoint is pulled")
    elif result_file.exists():
        result = json.loads(result_file.read_text())
        weights = "EMA of the weights" if result.get("weights") == "ema" else "final weights"
        log(f"test accuracy {result['test_acc']:.2f}% ({weights}, model.pt) | {pulled.files} file(s) pulled into "
            f"{job.local_runs / run_id}")
        tell(job, "finished",
             f"test accuracy {result['test_acc']:.2f}% on {name}; pulled into {job.local_runs / run_id}")
    else:
        log(f"{run_id} ended with exit {code}; partial results pulled into {job.local_runs / run_id}")
        tell(job, "failed", f"exit {code} on {name}; partial results pulled into {job.local_runs / run_id}")
    return code if code is not None else ExitCode.FAILED


def tell(job: RemoteTrain, what: str, detail: str) -> None:
    """The desktop notification that the followed run ended (unless --no-desktop-notify)."""
    if job.desktop_notify:
        from infra.desktop import notify

        notify(f"mnist-cloud: {job.run_id} {what}", detail)


def _train_cluster(job: RemoteTrain, log) -> int:
    """torchrun on every node with c10d rendezvous at node 0; stream and pull the node that holds rank 0."""
    source = code_dir(job.code)
    nodes = SSHTarget.resolve_cluster(job.name, job.region, job.profile)
    if len(nodes) != job.nodes:
        raise UserError(f"{job.name} has {len(nodes)} node(s), not {job.nodes}; "
                        f"launch it with `mnist-cloud launch --nodes {job.nodes} --name {job.name} ...`")
    try:
        pythons = [with_extras(t, t.prepare(source, job.python, log), job, log) for t in nodes]
        for t in nodes:  # each node's wrapper: the one holding the run tells of its end, any failing one of its failure
            push_notify(t.remote, job.notify, log)
        if job.resume:  # whichever node takes rank 0 continues it
            for t in nodes:
                ensure_run_there(t, job, log)
        per_node = nproc(nodes[0], pythons[0], job.gpus) or 1
        addresses = [t.address() for t in nodes]
        endpoint = f"{addresses[0]}:{RDZV_PORT}"
        log(f"rendezvous at {endpoint} (node 0); {len(nodes)} nodes x {per_node} process(es)")
        marker = f"jobs/{job.run_id}.rank0"
        for rank, (target, py) in enumerate(zip(nodes, pythons)):
            target.remote.run(f"rm -f {target.remote.ep.workdir}/{marker}")
            # is_host: node 0 serves the rendezvous store; --local-addr: the address its peers reach it
            # on. Both said explicitly rather than guessed from the hostname and DNS
            launcher = ["--nnodes", str(len(nodes)), "--node_rank", str(rank), "--nproc_per_node", str(per_node),
                        "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", job.run_id,
                        "--rdzv_conf", f"is_host={1 if rank == 0 else 0}", "--local-addr", addresses[rank]]
            pid = target.run(job.trainer_args, job.run_id, py,
                             env={**runspec.git_env(source), **job.env, runspec.ENV_RANK0_FILE: marker},
                             resume=bool(job.resume), launcher=launcher)
            log(f"started {job.run_id} on {target.label} (pid {pid})")
        # c10d hands out ranks by arrival: the trainer that got rank 0 leaves a marker on its node
        def rank0() -> SSHTarget | bool | None:
            holder = next((t for t in nodes if t.remote.run(f"test -f {t.remote.ep.workdir}/{marker}",
                                                             warn=True).ok), None)
            if holder is None and all(t.jobs.job_state(job.run_id)[0] == "finished" for t in nodes):
                return False  # all ended before one said it was rank 0
            return holder

        holder = poll(rank0, 600) or nodes[0]
        log(f"rank 0 is on {holder.label}; streaming its log")
        return _follow(holder, job, log, others=[t for t in nodes if t is not holder])
    finally:
        for t in nodes:
            t.remote.close()
