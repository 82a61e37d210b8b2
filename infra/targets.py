"""Where `python -m trainer` runs: here, or on a named machine.

Here, run_trainer runs it as a subprocess of the CLI with the CLI's own interpreter: there is nothing
to sync or pull, the run directory is written in place. SSHTarget is a named machine (an EC2 instance
we launched or adopted, or any SSH host): sync copies the code up, run starts the same
`python -m trainer` detached, logs streams its console, pull brings runs/<run-id>/ back. After a run,
both leave the same runs/<run-id>/ on the laptop.
"""

from __future__ import annotations

import json
import os
import posixpath
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import runspec
from infra.agent import source as agent_source
from infra.errors import UserError
from infra.poll import poll
from infra.pricing import Price, fallback_price
from infra.jobs import Jobs
from infra.remote import Remote
from infra.state import Host
from infra.transfer import TransferResult, record_pulled, unpulled_runs, write_file

SETUP_SCRIPT = "setup_ec2.sh"
PYTHON_MARKER = ".mnist-cloud-python"


def trainer_command(python: str, args: list[str]) -> list[str]:
    return [python, "-m", "trainer", *args]


PROJECT_MARKERS = (".git", "pyproject.toml", "mnist-cloud.toml", "setup.py", "setup.cfg")


def code_dir(explicit: str | None = None) -> Path:
    """The project to sync: --code, else the project the current directory is in (the nearest
    directory above it, below your home, that is a checkout or has .git, pyproject.toml, ...), else
    the current directory. An mnist-cloud checkout carries its own trainer; any other project gets
    the installed one with it (tool_files). Never your home directory or one above it."""
    home = Path.home().resolve()
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise UserError(f"--code {explicit}: not a directory")
        path = path.resolve()
    else:
        here = Path.cwd().resolve()
        candidates = [d for d in (here, *here.parents) if d != home and d not in home.parents]  # not home, not "/"
        path = next((d for d in candidates if is_checkout(d) or any((d / m).exists() for m in PROJECT_MARKERS)),
                    here)
    if path == home or path in home.parents or path == Path(path.anchor):
        raise UserError(f"{path} is your home directory or above it, not a project: everything in it would be "
                        "synced; run from your project's directory, or pass --code DIR")
    return path


# What a project that is not a checkout gets beside its own files, from this installation: the trainer,
# the run vocabulary, and the bootstrap with the tool's requirements (under names of their own, so the
# project's requirements.txt stays the project's).
BUNDLED_SETUP, BUNDLED_REQUIREMENTS = ".mnist-cloud-setup.sh", ".mnist-cloud-requirements.txt"


def is_checkout(project: Path) -> bool:
    return (project / "trainer" / "__main__.py").is_file() and (project / SETUP_SCRIPT).is_file()


def tool_files(project: Path) -> dict[str, Path]:
    """{name in the work dir: local path} of the installed mnist-cloud to sync with a project that is
    not a checkout; {} for a checkout, which has them all."""
    import importlib.util

    from infra.agent import source_path

    if is_checkout(project):
        return {}
    files = {}
    for package in ("trainer", "runspec"):
        if (project / package).exists():
            raise UserError(f"{project / package} is in the way: mnist-cloud syncs its own {package}/ into the "
                            "work dir; rename yours, or run from an mnist-cloud checkout")
        spec = importlib.util.find_spec(package)  # found, not imported: no torch here
        files[package] = Path(spec.submodule_search_locations[0])
    files[BUNDLED_SETUP] = source_path("setup_ec2.sh")
    files[BUNDLED_REQUIREMENTS] = source_path("requirements.txt")
    return files


def run_trainer(args: list[str], python: str = sys.executable, cwd: Path | None = None) -> int:
    """Run `python -m trainer ARGS` here in the foreground; its output is ours and its exit code is returned.

    Ctrl-C at the terminal reaches the trainer too (same process group); we wait for it to finish
    its way out and return its exit code."""
    # the installed trainer, never a trainer.py of the user's project in the current directory
    proc = subprocess.Popen(trainer_command(python, args), cwd=cwd, env={**os.environ, "PYTHONSAFEPATH": "1"})
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


class SSHTarget:
    """A named machine reached over SSH."""

    def __init__(self, host: Host, remote: Remote, instance_type: str | None = None, lifecycle: str | None = None,
                 price: Callable[[], Price] | None = None):
        self.host = host
        self.name = host.name
        self.label = remote.ep.name  # "NAME", or "NAME/node1" for the other nodes of a cluster
        self.remote = remote
        self.jobs = Jobs(remote)
        self.instance_type = instance_type
        self.lifecycle = lifecycle  # "spot" or "on-demand" on EC2
        self.price = price  # asks AWS what an hour of this machine costs (infra/resolve.py); None: not EC2
        self.shutdown_behavior: str | None = None  # as this object last set it
        self.bundled = False  # the last sync sent the installed trainer with a project (setup runs its bootstrap)
        self.shutdown = None  # EC2's shutdown behaviour (infra.resolve.Shutdown): kept safe for unpulled runs

    def job_env(self) -> dict[str, str]:
        """What the trainer records about where it ran, for the report's header and cost: the machine's
        price now (for spot, the mean over its uptime so far) and where that price came from."""
        env = {runspec.ENV_NAME: self.name}
        if self.instance_type:
            env[runspec.ENV_INSTANCE_TYPE] = self.instance_type
            price = self.price() if self.price else fallback_price(self.instance_type)
            if price.usd_per_hour is not None:
                env[runspec.ENV_PRICE] = str(price.usd_per_hour)
                env[runspec.ENV_PRICE_SOURCE] = price.source
        return env

    @classmethod
    def resolve(cls, name: str, region: str | None = None, profile: str | None = None) -> "SSHTarget":
        """The machine called `name` (node 0 of a cluster), per infra/resolve.py."""
        return cls.resolve_cluster(name, region, profile)[0]

    @classmethod
    def resolve_cluster(cls, name: str, region: str | None = None, profile: str | None = None) -> list["SSHTarget"]:
        """Every node of `name`, node 0 first (one for a single machine)."""
        from infra.resolve import resolve

        targets = []
        for r in resolve(name, region, profile):
            target = cls(r.host, Remote(r.ep, expected_fingerprints=r.expected_fingerprints),
                         instance_type=r.instance_type, lifecycle=r.lifecycle, price=r.price)
            target.shutdown = r.shutdown
            targets.append(target)
        return targets

    # ---------------------------------------------------------------------------------- verbs
    def prepare(self, code: Path, python: str | None = None, log=print, setup: bool = False,
                ready_timeout: float = 120) -> str:
        """Wait for SSH, sync the code, and set up the machine if it is not yet (always, with setup=True);
        returns the interpreter jobs run with. The one way a machine gets ready: `train --on` (one
        machine or a cluster's nodes), `setup`, `jupyter` and `sweep` all come through here."""
        self.remote.wait_ready(timeout=ready_timeout, log=log)
        if self.shutdown is not None and self.shutdown.instance.budget is not None:
            self.push_budget(self.shutdown.instance.budget)  # the price now: spot's moves
        synced = self.sync(code, log=log)
        log(f"synced {synced.files} file(s), {synced.bytes:,} bytes ({synced.method}) to "
            f"{self.label}:~/{self.remote.ep.workdir}")
        python = python or env_python()
        return self.setup(python, log) if setup else self.ensure_setup(python, log)

    def sync(self, code: Path, log=print) -> TransferResult:
        extra = tool_files(code)
        self.bundled = bool(extra)  # setup then runs the bundled bootstrap
        return self.remote.sync(code, log=log, extra=extra)

    def python(self) -> str | None:
        """The interpreter setup chose, or None if setup has not run."""
        wd = shlex.quote(self.remote.ep.workdir)
        res = self.remote.run(f"p=$(cat {wd}/{PYTHON_MARKER} 2>/dev/null) && [ -x \"$p\" ] && printf %s \"$p\"",
                              warn=True)
        return res.stdout.strip() or None if res.ok else None

    def setup(self, python: str | None = None, log=print, extra: list[str] = ()) -> str:
        """Run setup_ec2.sh in the work dir (synced first), showing its output; returns the python it chose.
        `extra`: more requirements (jupyterlab), installed the way setup installs its own."""
        wd = shlex.quote(self.remote.ep.workdir)
        env = f"MNIST_CLOUD_PYTHON={shlex.quote(python)} " if python else ""
        script = SETUP_SCRIPT
        if getattr(self, "bundled", False):
            env += f"MNIST_CLOUD_REQUIREMENTS={BUNDLED_REQUIREMENTS} "
            script = BUNDLED_SETUP
        more = f" --extra {shlex.join(extra)}" if extra else ""
        res = self.remote.run(f"cd {wd} && {env}bash {script}{more}", timeout=3600, warn=True, hide=True)
        for line in (res.stdout + res.stderr).splitlines():
            log(f"  [{self.label}] {line}")
        if not res.ok:
            raise UserError(f"setup on {self.label} failed (exit {res.exited}); see the lines above")
        chosen = self.python()
        if not chosen:
            raise UserError(f"setup on {self.label} did not record a python; see the lines above")
        return chosen

    def ensure_setup(self, python: str | None = None, log=print) -> str:
        current = self.python()
        if current and (python is None or current == python):
            return current
        log(f"setting up {self.label} (first run here)")
        return self.setup(python, log)

    def run(self, args: list[str], run_id: str, python: str, env: dict[str, str] | None = None,
            resume: bool = False, launcher: list[str] | None = None) -> int:
        """Start `python -m trainer train ARGS --run-id RUN --out-dir runs` (or `--resume runs/RUN`)
        detached; returns its pid. `launcher` runs it under torchrun instead (its arguments, without
        the python). On a spot instance a watcher goes with it (infra/agent/spot_watch.py)."""
        env = {"PYTHONUNBUFFERED": "1", **self.job_env(), **(env or {})}

        def trainer_argv(extra: list[str], resume: bool) -> list[str]:
            where = ["--resume", f"runs/{run_id}"] if resume else ["--run-id", run_id, "--out-dir", "runs"]
            trainer_args = ["train", *extra, *where, "--no-progress"]
            if launcher:
                return [python, "-m", "torch.distributed.run", *launcher, "-m", "trainer", *trainer_args]
            return trainer_command(python, trainer_args)

        self.keep_runs_on_shutdown(unpulled=True)  # this run is unpulled until pulled
        if self.lifecycle != "spot":
            return self.jobs.start_detached(trainer_argv(args, resume), run_id, env=env, append=resume, notify=True)
        imds = os.environ.get("MNIST_CLOUD_IMDS_URL", "http://169.254.169.254")
        poll = os.environ.get("MNIST_CLOUD_SPOT_POLL", "5")  # seconds; AWS gives two minutes' notice
        # the watcher travels with the run, from the package: the work dir may be any project
        jobs = posixpath.join(self.remote.home(), self.remote.ep.workdir, "jobs")
        self.remote.run(f"mkdir -p {shlex.quote(jobs)}")
        write_file(self.remote, f"{jobs}/spot_watch.py", agent_source("spot_watch.py"))
        watch = [python, "jobs/spot_watch.py", "--pid-file", f"jobs/{run_id}.pid", "--imds", imds,
                 "--interval", poll]
        # What the instance runs by itself to continue this run once EC2 starts it again after an
        # interruption (the saved config.json holds the run's flags). Not for a cluster: its nodes come
        # back one by one, and the rendezvous needs them all.
        if not launcher or "--standalone" in launcher:
            self.jobs.record_job(run_id, [
                self.jobs.detached_command(trainer_argv([], True), run_id, env=env, append=True, notify=True),
                self.jobs.detached_command(watch, f"{run_id}.spot-watch")])
        pid = self.jobs.start_detached(trainer_argv(args, resume), run_id, env=env, append=resume, notify=True)
        self.jobs.start_detached(watch, f"{run_id}.spot-watch")
        return pid

    def gpu_count(self, python: str) -> int:
        code = "import torch; print(torch.cuda.device_count())"
        return int(self.remote.run(f"{shlex.quote(python)} -c {shlex.quote(code)}").stdout.strip() or 0)

    def address(self) -> str:
        """The machine's own (private) address, as its peers in a cluster reach it."""
        out = self.remote.run("hostname -I 2>/dev/null || hostname -i").stdout.split()
        if not out:
            raise UserError(f"{self.name}: cannot tell its private address")
        return out[0]

    def has_run(self, run_id: str) -> bool:
        config = posixpath.join(self.remote.ep.workdir, "runs", run_id, runspec.CONFIG)
        return self.remote.run(f"test -f {shlex.quote(config)}", warn=True).ok

    def push_run(self, local_run: Path, log=print) -> TransferResult:
        """Copy a run directory from here to the machine (to resume it on a new instance)."""
        return self.remote.push(local_run, f"{self.remote.ep.workdir}/runs/{local_run.name}", log=log)

    def logs(self, run_id: str, follow: bool) -> None:
        self.jobs.stream_log(run_id, follow)

    def wait_finished(self, run_id: str, timeout: float = 30) -> tuple[str, int | None]:
        def ended() -> tuple[str, int | None] | None:
            state, code = self.jobs.job_state(run_id)
            return (state, code) if state != "running" else None

        return poll(ended, timeout) or ("running", None)

    def pull(self, run_id: str, local_runs: Path, log=print) -> TransferResult:
        """Bring runs/<run-id>/ here, then record on the machine which of its files are here now: a
        run whose files all are is no longer "unpulled" (see infra/agent/autostop.py)."""
        result = self.remote.pull(f"{self.remote.ep.workdir}/runs/{run_id}", Path(local_runs) / run_id, log=log)
        record_pulled(self.remote, run_id, result.verified)
        self.keep_runs_on_shutdown(unpulled=bool(self.unpulled_runs()))
        return result

    def unpulled_runs(self) -> list[str]:
        return unpulled_runs(self.remote)

    def keep_runs_on_shutdown(self, unpulled: bool) -> None:
        """Autostop with terminate: EC2 must stop the instance, not terminate it, while it holds
        unpulled runs. The instance cannot change its own shutdown behaviour (it holds no AWS
        credentials), so we set it here, where a run starts and where runs are pulled, and write it
        into the watchdog's config, which then never shuts down into a terminate with unpulled runs."""
        if self.shutdown is None or not self.shutdown.guarded:
            return
        behavior = "stop" if unpulled else "terminate"
        if self.shutdown_behavior == behavior:
            return
        # Ordered so that a failure half way leaves the safe pair: the watchdog believing "terminate"
        # while EC2 would stop (it stays up), never believing "stop" while EC2 would terminate.
        steps = [self.shutdown.set, self._tell_watchdog]
        for step in steps if behavior == "stop" else reversed(steps):
            step(behavior)
        self.shutdown_behavior = behavior

    def _tell_watchdog(self, behavior: str) -> None:
        self._agent(f"set-shutdown {behavior}")

    def _agent(self, command: str) -> str:
        """Run the watchdog's tool (infra/agent/autostop.py) as root on the machine; its output."""
        sudo = "" if self.remote.run("id -u").stdout.strip() == "0" else "sudo -n "
        root = os.environ.get("MNIST_CLOUD_AGENT_ROOT")  # tests: the watchdog installed under a temp root
        env = f"env MNIST_CLOUD_ROOT={shlex.quote(root)} " if root else ""
        return self.remote.run(f"{sudo}{env}python3 -c {shlex.quote(agent_source('autostop.py'))} {command}").stdout

    def push_budget(self, budget: float | None) -> dict:
        """Write the budget and the price of an hour now into the watchdog's config (installing the watchdog,
        off but for the budget, where the machine has none): it stops the machine there, laptop closed or
        not. Returns what the machine has cost so far, also kept in the state: `status` shows it when stopped."""
        from infra.state import State
        from infra.watchdog import AutostopConfig, install_over_ssh

        price = self.price() if self.price else fallback_price(self.instance_type or "")
        if price.usd_per_hour is None:
            raise UserError(f"{self.name}: no price for {self.instance_type}, so no budget can be kept; "
                            f"give it one in prices.json ({price.note or price.source})")
        said = json.loads(self._agent(f"set-budget {'none' if budget is None else f'{budget:g}'} {price.usd_per_hour} "
                                      f"{shlex.quote(price.source)}").strip().splitlines()[-1])
        if not said["installed"] and budget is not None:
            install_over_ssh(self.remote, AutostopConfig(enabled=False, shutdown_behavior="stop", budget_usd=budget,
                                                         usd_per_hour=price.usd_per_hour, price_source=price.source),
                             root=os.environ.get("MNIST_CLOUD_AGENT_ROOT") or "")
        seen = {"spent_usd": said["spent_usd"], "budget_usd": budget, "usd_per_hour": price.usd_per_hour,
                "at": time.time()}
        state = State()
        host = state.get(self.name) or self.host
        host.extra["budget"] = seen
        state.put(host)
        return seen

    def runs(self) -> list[dict]:
        return self.jobs.list_runs()

    def latest_run(self) -> str:
        runs = self.runs()
        if not runs:
            raise UserError(f"{self.name} has no runs yet; `mnist-cloud train --on {self.name}`")
        return max(runs, key=lambda r: r["mtime"])["run_id"]

    def check_run(self, run_id: str) -> None:
        """A run exists once its job was started, even before the trainer has made its directory."""
        if self.remote.run(f"test -e {shlex.quote(self.jobs.job_paths(run_id)['pid'])}", warn=True).ok:
            return
        if run_id not in {r["run_id"] for r in self.runs()}:
            raise UserError(f"{self.name} has no run {run_id!r}; `mnist-cloud runs {self.name}` lists them")


def new_run_id(name: str, model: str | None = None) -> str:
    """<time>-<name>[-<model>], for a run whose --run-id was not given."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return "-".join(x for x in (stamp, name, model and runspec.model_slug(model)) if x)


def has_option(args: list[str], flag: str) -> bool:
    """Whether a pass-through argument list sets `--flag` (as `--flag VALUE` or `--flag=VALUE`)."""
    return any(a == flag or a.startswith(flag + "=") for a in args)


def env_python() -> str | None:
    """$MNIST_CLOUD_REMOTE_PYTHON: the interpreter to use on remote machines, if the user pins one."""
    return os.environ.get("MNIST_CLOUD_REMOTE_PYTHON") or None


def wait_for_ssh(name: str, instance_id: str, address: str, boot_fingerprints, log=print) -> None:
    """Wait until a new instance of `name` answers SSH at `address`. The first connection is checked against
    the host key fingerprints the instance printed at boot (`boot_fingerprints()`, asked only then, since
    cloud-init prints them late and they are polled for); a key pinned by an earlier connection is checked
    instead."""
    from infra.remote import Endpoint, pinned_keys
    from infra.state import State

    host = State().get(name)
    ep = Endpoint(name=name, host=address, user=host.user, key_path=host.key_path, alias=instance_id)
    expected = None if pinned_keys(instance_id) else boot_fingerprints()
    with Remote(ep, expected_fingerprints=expected or None) as remote:
        remote.wait_ready(timeout=600, log=log)
