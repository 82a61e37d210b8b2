"""The only module that uses Fabric, paramiko, ssh and rsync. It knows nothing about EC2.

An Endpoint is how to reach one machine (host, port, user, key) plus the identity its host key is
pinned under: the EC2 instance id, because EC2 reuses IP addresses, or host:port for any other
machine. Remote work happens in ~/mnist-cloud/<name>/ on the machine; detached jobs keep their
console log, pid and exit code in jobs/, and the trainer writes runs/<run-id>/ exactly as it does on
the laptop.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import posixpath
import re
import secrets
import select
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, TextIO

import paramiko
from fabric import Config, Connection

import runspec
from infra.agent import source as agent_source
from infra.errors import UserError
from infra.poll import poll
from infra.state import check_key_file, config_dir
from runspec import atomic_write

# Never synced: run outputs, caches, VCS data and anything that looks like a secret.
SYNC_EXCLUDES = [
    ".git/", "runs/", "jobs/", ".env", ".env.*", ".aws/", ".ssh/", "*.pem", "*.key", "*.p12", "*.pfx",
    "id_rsa*", "id_ecdsa*", "id_ed25519*", "id_dsa*", ".netrc", ".pypirc", "credentials", "*.tfstate",
    "*credentials*.json", "credentials.*", ".git-credentials", "kaggle.json", "*service-account*.json",
    "secrets.toml", ".npmrc", ".kube/", ".docker/", ".gnupg/",
    ".venv/", "venv/", "__pycache__/", "*.pyc", "*.egg-info/", ".pytest_cache/", ".cache/", ".ipynb_checkpoints/",
    ".mnist-cloud-python",
]
# Made on the machine and never deleted by a sync, though absent here: notebooks written in the
# JupyterLab that `mnist-cloud jupyter` runs in the work dir.
SYNC_PROTECT = ["*.ipynb"]

# Where Homebrew puts a real rsync (Apple silicon, Intel): macOS 15.4+ ships openrsync as /usr/bin/rsync,
# which has no --itemize-changes (what sync reads to list the files it moved) and prints other --stats.
HOMEBREW_RSYNC = ("/opt/homebrew/bin/rsync", "/usr/local/bin/rsync")
# rsync's exit codes for "this rsync cannot do what was asked": an option it lacks, or the other side's
# rsync speaks another protocol. From the first call they mean "use SFTP", not "the sync failed".
RSYNC_CANNOT = {1: "syntax or usage error", 2: "protocol incompatibility"}

Log = Callable[[str], None]


class HostKeyMismatch(UserError):
    pass


class ConnectionLost(UserError):
    """The SSH connection dropped; whatever was started detached on the machine goes on."""


def sha256_file(path: Path) -> str:
    """A file's sha256, read in chunks: checkpoints and pulled runs can be larger than memory wants."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):  # hashlib.file_digest is 3.11+; we run on 3.10
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Endpoint:
    name: str
    host: str
    user: str
    key_path: str
    port: int = 22
    alias: str = ""  # the identity the host key is pinned under
    workdir: str = ""

    def __post_init__(self):
        self.alias = self.alias or f"{self.host}:{self.port}"
        self.workdir = self.workdir or f"mnist-cloud/{self.name}"


def known_hosts_file() -> Path:
    return config_dir() / "known_hosts"


def ssh_options(key_path: str, port: int, alias: str, key_type: str | None) -> dict[str, str]:
    """The OpenSSH options of every connection mnist-cloud makes outside paramiko, as one table:
    rendered as `-o` arguments for ssh, rsync and the Jupyter tunnel (Remote.ssh_argv), and as the
    `Host mnist-NAME` blocks of `mnist-cloud ssh-config`. The host key is the one pinned under the
    alias (an instance id, stable across an instance's new addresses); with none pinned yet, the
    first connection pins it."""
    options = {"Port": str(port), "IdentityFile": str(key_path), "IdentitiesOnly": "yes",
               "UserKnownHostsFile": str(known_hosts_file()), "HostKeyAlias": alias}
    if key_type:
        options |= {"StrictHostKeyChecking": "yes", "HostKeyAlgorithms": key_type}
    else:
        options["StrictHostKeyChecking"] = "accept-new"
    return options | {"ConnectTimeout": "10", "ServerAliveInterval": "15"}


def ssh_value(value: str) -> str:
    """An option value as OpenSSH reads it, in `-o K=V` and in ssh_config alike: a path with a space is
    quoted, or ssh takes the rest for extra arguments."""
    return f'"{value}"' if any(c.isspace() for c in value) else value


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint, as printed in EC2 console output."""
    import base64

    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def pinned_keys(alias: str, path: Path | None = None) -> list[tuple[str, str]]:
    """[(key type, base64)] pinned for an alias."""
    path = path or known_hosts_file()
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == alias:
            out.append((parts[1], parts[2]))
    return out


def forget_host(alias: str, path: Path | None = None) -> None:
    path = path or known_hosts_file()
    if path.exists():
        kept = [l for l in path.read_text().splitlines() if l.split()[:1] != [alias]]
        atomic_write(path, ("\n".join(kept) + "\n" if kept else "").encode(), mode=0o600)


class PinnedHostKeys(paramiko.MissingHostKeyPolicy):
    """Trust on first use, per machine identity, never per IP; a changed key is refused.

    paramiko is given no known hosts, so every connection comes here and this policy decides."""

    def __init__(self, ep: Endpoint, expected: list[str] | None = None, store: Path | None = None):
        self.ep, self.expected, self.store = ep, expected, store or known_hosts_file()

    def missing_host_key(self, client, hostname, key):
        pinned = pinned_keys(self.ep.alias, self.store)
        offered = (key.get_name(), key.get_base64())
        if pinned:
            if offered in pinned:
                return
            raise HostKeyMismatch(
                f"host key of {self.ep.name} ({self.ep.alias}, {self.ep.host}:{self.ep.port}) has CHANGED: "
                f"got {key.get_name()} {fingerprint(key)}, pinned was different. Someone may be intercepting, "
                f"or the machine was rebuilt; if you trust it, run `mnist-cloud forget-host {self.ep.name}`")
        if self.expected and fingerprint(key) not in self.expected:
            raise HostKeyMismatch(
                f"host key of {self.ep.name} ({fingerprint(key)}) is not among the fingerprints the instance "
                f"printed at boot ({', '.join(self.expected)}); refusing to connect")
        self.store.parent.mkdir(parents=True, exist_ok=True)
        existing = self.store.read_text() if self.store.exists() else ""
        atomic_write(self.store, (existing + f"{self.ep.alias} {offered[0]} {offered[1]}\n").encode(), mode=0o600)


class RsyncRefused(UserError):
    """The first rsync call exited with one of RSYNC_CANNOT: that rsync cannot do it, SFTP can."""


@dataclass(frozen=True)
class RsyncChoice:
    """How files move to and from a machine: the local rsync to run, or SFTP (path None), and why when
    that is not the `rsync` on PATH (openrsync, a Homebrew rsync, no rsync on one side)."""

    path: str | None
    why: str = ""

    @property
    def method(self) -> str:
        """What the sync and pull lines say: "rsync", or e.g. "sftp: openrsync at /usr/bin/rsync lacks ..."."""
        name = "rsync" if self.path else "sftp"
        return f"{name}: {self.why}" if self.why else name


def is_openrsync(version_text: str) -> bool:
    """Whether `rsync --version` (stdout and stderr) is openrsync's banner, "openrsync: protocol version 29"
    (macOS adds "rsync version 2.6.9 compatible"), rather than rsync's "rsync  version 3.2.7  protocol
    version 31" (Apple's own 2.6.9 before macOS 15.4 printed that too, and has every option we pass)."""
    return "openrsync" in version_text.lower() or re.search(r"rsync version \S+ compatible", version_text) is not None


def _rsync_version(path: str) -> str:
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout + proc.stderr  # openrsync prints its banner on stderr


def local_rsync() -> RsyncChoice:
    """The rsync this machine transfers with: the first `rsync` on PATH that is not openrsync, or a
    Homebrew one where PATH has only openrsync; SFTP (path None) when there is none."""
    candidates = []
    for d in os.environ.get("PATH", "").split(os.pathsep):
        found = shutil.which("rsync", path=d) if d else None
        if found and found not in candidates:
            candidates.append(found)
    candidates += [p for p in HOMEBREW_RSYNC if p not in candidates and shutil.which(p)]
    openrsync = None
    for path in candidates:
        if not is_openrsync(_rsync_version(path)):
            why = f"{path}, as openrsync at {openrsync} lacks --itemize-changes" if openrsync else ""
            return RsyncChoice(path, why)
        openrsync = openrsync or path
    if openrsync:
        return RsyncChoice(None, f"openrsync at {openrsync} lacks --itemize-changes")
    return RsyncChoice(None, "no rsync here")


@dataclass
class TransferResult:
    """What a sync or pull moved."""

    files: int
    bytes: int
    method: str  # RsyncChoice.method: "rsync" or "sftp", and why when not the plain rsync on PATH
    changed: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # local files that differed and were overwritten
    kept: list[str] = field(default_factory=list)  # locally modified files set aside as .local-<time>
    verified: dict[str, str] = field(default_factory=dict)  # pull: {path: sha256} here that match the machine


class Remote:
    """One SSH machine. The connection opens on first use; use as a context manager to close it."""

    def __init__(self, ep: Endpoint, expected_fingerprints: list[str] | None = None, connect_timeout: float = 10):
        self.ep = ep
        self.expected = expected_fingerprints
        self.connect_timeout = connect_timeout
        self._conn: Connection | None = None
        self._choice: RsyncChoice | None = None
        self._rsync_worked = False  # after one rsync call went through, exit 1/2 is a real failure
        check_key_file(Path(ep.key_path))

    # ------------------------------------------------------------------------------ connection
    def __enter__(self) -> "Remote":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            config = Config(overrides={"load_ssh_configs": False, "run": {"in_stream": False}})
            conn = Connection(self.ep.host, user=self.ep.user, port=self.ep.port, config=config,
                              connect_timeout=self.connect_timeout,
                              connect_kwargs={"key_filename": [self.ep.key_path], "look_for_keys": False,
                                              "allow_agent": False, "banner_timeout": self.connect_timeout})
            conn.client.set_missing_host_key_policy(PinnedHostKeys(self.ep, self.expected))
            try:
                conn.open()
            except HostKeyMismatch:
                raise
            except paramiko.AuthenticationException:
                raise UserError(f"{self.ep.name}: {self.ep.user}@{self.ep.host} refused key {self.ep.key_path}; "
                                "check --key / the user") from None
            except (OSError, paramiko.SSHException, EOFError) as e:
                raise UserError(f"cannot reach {self.ep.name} at {self.ep.host}:{self.ep.port} over SSH "
                                f"({e.__class__.__name__}: {e}); is it running (`mnist-cloud status`)?") from None
            self._conn = conn
        return self._conn

    def wait_ready(self, timeout: float = 300, log: Log = print) -> None:
        """Retry SSH with backoff until it answers, or fail with one clear line after `timeout` s."""
        last = ""

        def answers() -> bool | None:
            nonlocal last
            try:
                self.run("true", timeout=30)
                return True
            except HostKeyMismatch:
                raise
            except UserError as e:
                last = str(e)
                self.close()
                return None

        if poll(answers, timeout, interval=1.0, backoff=2.0, max_interval=15,
                on_wait=lambda _: log(f"waiting for SSH on {self.ep.host}:{self.ep.port} ...")) is None:
            raise UserError(f"{self.ep.name} ({self.ep.host}:{self.ep.port}) did not accept SSH within "
                            f"{timeout:.0f}s (last: {last.split(' (')[0]}); check `mnist-cloud status` and that "
                            f"your IP is allowed (`mnist-cloud start {self.ep.name}` refreshes the rule)")

    def run(self, command: str, timeout: float | None = 120, warn: bool = False, hide: bool = True):
        """Run a shell command; stdin is closed (nothing can hang on it). Returns invoke's Result."""
        try:
            return self.conn.run(command, hide=hide, warn=warn, in_stream=False, timeout=timeout)
        except Exception as e:  # invoke raises UnexpectedExit / CommandTimedOut with the full output
            from invoke.exceptions import CommandTimedOut, UnexpectedExit

            if isinstance(e, UnexpectedExit):
                err = (e.result.stderr or e.result.stdout).strip().splitlines()
                raise UserError(f"on {self.ep.name}: `{command[:80]}` failed (exit {e.result.exited}): "
                                f"{err[-1] if err else 'no output'}") from None
            if isinstance(e, CommandTimedOut):
                raise UserError(f"on {self.ep.name}: `{command[:80]}` timed out after {timeout}s") from None
            if isinstance(e, (OSError, paramiko.SSHException, EOFError)):
                self.close()
                raise ConnectionLost(f"lost the SSH connection to {self.ep.name} ({e})") from None
            raise

    # ------------------------------------------------------------------------------ ssh / rsync argv
    def pinned_key_type(self) -> str:
        """The type of the host key pinned under the alias, pinning it first if need be."""
        pinned = pinned_keys(self.ep.alias)
        if not pinned:
            self.run("true")  # first contact pins the key through paramiko's policy
            pinned = pinned_keys(self.ep.alias)
        return pinned[0][0]

    def ssh_argv(self, tty: bool = False) -> list[str]:
        options = ssh_options(self.ep.key_path, self.ep.port, self.ep.alias, self.pinned_key_type())
        if not tty:
            options["BatchMode"] = "yes"
        return ["ssh", "-F", "/dev/null", *(a for k, v in options.items() for a in ("-o", f"{k}={ssh_value(v)}"))]

    def target(self) -> str:
        host = f"[{self.ep.host}]" if ":" in self.ep.host else self.ep.host
        return f"{self.ep.user}@{host}"

    def rsync_choice(self) -> RsyncChoice:
        """rsync when both sides have one that can do what sync/pull ask (not openrsync), else SFTP."""
        if self._choice is None:
            choice = local_rsync()
            if choice.path and not self.run("command -v rsync", warn=True).ok:
                choice = RsyncChoice(None, f"no rsync on {self.ep.name}")
            self._choice = choice
        return self._choice

    def _transfer(self, over_rsync: Callable[[], TransferResult], over_sftp: Callable[[], TransferResult],
                  log: Log, force_sftp: bool = False) -> TransferResult:
        """over_rsync if rsync_choice() allows and it does not refuse (RsyncRefused), else over_sftp; the
        result's method is the choice's, which says why when it is not the plain rsync."""
        choice = RsyncChoice(None) if force_sftp else self.rsync_choice()
        if choice.path:
            try:
                return replace(over_rsync(), method=choice.method)
            except RsyncRefused:
                choice = self.rsync_choice()  # now SFTP, saying why
        if choice.why:
            log(f"{choice.why}; using SFTP")
        return replace(over_sftp(), method=choice.method)

    # ------------------------------------------------------------------------------ sync
    def sync(self, local_dir: Path, log: Log = print, force_sftp: bool = False,
             extra: dict[str, Path] | None = None) -> TransferResult:
        """Mirror the code in local_dir into the remote work dir. Secrets and outputs never leave.
        `extra`: {name in the work dir: local file or directory} synced beside it (the installed
        trainer, for a project that is not a checkout); the project's mirror never deletes them."""
        local_dir = Path(local_dir).resolve()
        extra = extra or {}
        self.run(f"mkdir -p {shlex.quote(self.ep.workdir)}")
        result = self._transfer(lambda: self._rsync_up(local_dir, protect=list(extra)),
                                lambda: self._sftp_up(local_dir, protect=list(extra)), log, force_sftp)
        if not extra:
            return result
        with tempfile.TemporaryDirectory() as tmp:
            stage = Path(tmp)
            for name, path in extra.items():  # under their work-dir names, without caches
                if path.is_dir():
                    shutil.copytree(path, stage / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(path, stage / name)

            def over_rsync() -> TransferResult:
                out = self._rsync(["-az", "--checksum", "--delete", "--stats", "--itemize-changes",
                                   *(str(stage / name) for name in extra), f"{self.target()}:{self.ep.workdir}/"])
                files, size, changed = self._stats(out)
                return TransferResult(files, size, "rsync", changed)

            more = self._transfer(over_rsync, lambda: self._sftp_up(stage, prune_only=list(extra)),
                                  lambda m: None, force_sftp)  # the same choice: its why is said above
        return TransferResult(result.files + more.files, result.bytes + more.bytes, result.method,
                              result.changed + more.changed)

    def _rsync(self, args: list[str]) -> str:
        path = self.rsync_choice().path
        cmd = [path, "-e", shlex.join(self.ssh_argv()), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            err = proc.stderr.strip().splitlines()
            if any("Host key verification failed" in l or "REMOTE HOST IDENTIFICATION" in l for l in err):
                raise HostKeyMismatch(f"host key of {self.ep.name} has CHANGED (ssh refused it); "
                                      f"if you trust the machine, `mnist-cloud forget-host {self.ep.name}`")
            if proc.returncode in RSYNC_CANNOT and not self._rsync_worked:
                why = f"{path} failed with exit {proc.returncode} ({RSYNC_CANNOT[proc.returncode]})"
                self._choice = RsyncChoice(None, why)
                raise RsyncRefused(why)
            raise UserError(f"rsync to {self.ep.name} failed (exit {proc.returncode}): {err[-1] if err else ''}")
        self._rsync_worked = True
        return proc.stdout

    @staticmethod
    def _stats(out: str) -> tuple[int, int, list[str]]:
        files = re.search(r"Number of regular files transferred: ([\d,]+)", out)
        size = re.search(r"Total transferred file size: ([\d,]+)", out)
        changed = [l.split(" ", 1)[1] for l in out.splitlines() if re.match(r"^[<>]f", l)]
        return (int(files.group(1).replace(",", "")) if files else len(changed),
                int(size.group(1).replace(",", "")) if size else 0, changed)

    def _rsync_up(self, local_dir: Path, protect: list[str] = ()) -> TransferResult:
        filters = ["--filter=:- .gitignore", *(f"--filter=P {p}" for p in SYNC_PROTECT),
                   *(f"--filter=P /{name}/***" for name in protect), *(f"--filter=P /{name}" for name in protect),
                   *(f"--exclude={p}" for p in SYNC_EXCLUDES)]
        out = self._rsync(["-az", "--checksum", "--delete", "--stats", "--itemize-changes", *filters,
                           f"{local_dir}/", f"{self.target()}:{self.ep.workdir}/"])
        files, size, changed = self._stats(out)
        return TransferResult(files, size, "rsync", changed)

    def _sftp_up(self, local_dir: Path, protect: list[str] = (), prune_only: list[str] | None = None) -> TransferResult:
        """Upload what changed, then delete what is gone locally: every other file (but `protect`), or
        only under the top-level names in `prune_only`."""
        files = local_files(local_dir)
        remote = self.remote_hashes(self.ep.workdir, exclude_top=("runs", "jobs", ".mnist-cloud-python"))
        sftp = self.conn.sftp()
        changed, size = [], 0
        for rel in sorted(files):
            path = local_dir / rel
            digest = sha256_file(path)
            if remote.pop(rel, None) == digest:
                continue
            dest = posixpath.join(self._home(), self.ep.workdir, rel)
            self._sftp_mkdirs(sftp, posixpath.dirname(dest))
            tmp = f"{dest}.part-{os.getpid()}"
            self.conn.put(str(path), tmp)  # Fabric: keeps the file's mode (an executable stays one)
            sftp.posix_rename(tmp, dest)
            changed.append(rel)
            size += path.stat().st_size
        for rel in remote:  # gone locally: mirror the deletion, like rsync --delete (notebooks stay)
            if any(fnmatch.fnmatch(posixpath.basename(rel), p) for p in SYNC_PROTECT):
                continue
            top = rel.split("/", 1)[0]
            if top in protect or (prune_only is not None and top not in prune_only):
                continue
            sftp.remove(posixpath.join(self._home(), self.ep.workdir, rel))
        return TransferResult(len(changed), size, "sftp", changed)

    def _home(self) -> str:
        if not hasattr(self, "_home_dir"):
            self._home_dir = self.run("printf %s \"$HOME\"").stdout
        return self._home_dir

    @staticmethod
    def _sftp_mkdirs(sftp, path: str) -> None:
        parts = []
        while path not in ("", "/"):
            try:
                sftp.stat(path)
                break
            except OSError:
                parts.append(path)
                path = posixpath.dirname(path)
        for p in reversed(parts):
            sftp.mkdir(p)

    def remote_hashes(self, directory: str, exclude_top: tuple[str, ...] = ()) -> dict[str, str]:
        """{relative path: sha256} of the regular files under a remote directory."""
        prune = " ".join(f"-path ./{shlex.quote(t)} -prune -o" for t in exclude_top)
        out = self.run(f"cd {shlex.quote(directory)} 2>/dev/null && find . {prune} -type f -print0 | "
                       "xargs -0 -r sha256sum", warn=True).stdout
        hashes = {}
        for line in out.splitlines():
            digest, _, rel = line.partition("  ")
            if rel:
                hashes[rel[2:] if rel.startswith("./") else rel] = digest
        return hashes

    # ------------------------------------------------------------------------------ push
    def push(self, local_dir: Path, remote_dir: str, log: Log = print) -> TransferResult:
        """Copy a local directory to the machine (each file to a temp name, then renamed)."""
        local_dir = Path(local_dir)
        self.run(f"mkdir -p {shlex.quote(remote_dir)}")

        def over_rsync() -> TransferResult:
            out = self._rsync(["-a", "--checksum", "--stats", "--itemize-changes", f"{local_dir}/",
                               f"{self.target()}:{remote_dir.rstrip('/')}/"])
            files, size, changed = self._stats(out)
            return TransferResult(files, size, "rsync", changed)

        return self._transfer(over_rsync, lambda: self._sftp_push(local_dir, remote_dir), log)

    def _sftp_push(self, local_dir: Path, remote_dir: str) -> TransferResult:
        sftp = self.conn.sftp()
        base = remote_dir if remote_dir.startswith("/") else posixpath.join(self._home(), remote_dir)
        changed, size = [], 0
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            dest = posixpath.join(base, rel)
            self._sftp_mkdirs(sftp, posixpath.dirname(dest))
            self.conn.put(str(path), f"{dest}.part-{os.getpid()}")
            sftp.posix_rename(f"{dest}.part-{os.getpid()}", dest)
            changed.append(rel)
            size += path.stat().st_size
        return TransferResult(len(changed), size, "sftp", changed)

    # ------------------------------------------------------------------------------ pull
    def pull(self, remote_dir: str, local_dir: Path, log: Log = print, force_sftp: bool = False) -> TransferResult:
        """Bring remote_dir's files to local_dir: incremental, each file written to a temp name and
        renamed, verified by hash. A local file that differs is replaced only with a word about it,
        and if it is newer than the remote copy (edited here) it is first kept as NAME.local-<time>."""
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        remote = self.remote_stats(remote_dir)
        if not remote:
            raise UserError(f"{self.ep.name} has no {remote_dir}; see `mnist-cloud runs {self.ep.name}`")
        kept, replaced = [], []
        for rel in remote:  # temp files an interrupted pull left behind (rsync's .NAME.XXXXXX, ours .NAME.part-PID)
            path = local_dir / rel
            for stale in path.parent.glob(f".{path.name}.*") if path.parent.is_dir() else []:
                stale.unlink()
        for rel, (digest, mtime, _) in remote.items():
            path = local_dir / rel
            if path.is_file() and sha256_file(path) != digest:
                replaced.append(rel)
                if path.stat().st_mtime > mtime + 1:
                    backup = path.with_name(f"{path.name}.local-{time.strftime('%Y%m%d-%H%M%S')}")
                    path.rename(backup)
                    kept.append(str(backup.relative_to(local_dir)))

        def over_rsync() -> TransferResult:
            # rsync writes each file under a temp name and renames it: never a half file under the real name
            out = self._rsync(["-a", "--checksum", "--stats", "--itemize-changes",
                               f"{self.target()}:{remote_dir.rstrip('/')}/", f"{local_dir}/"])
            files, size, changed = self._stats(out)
            return TransferResult(files, size, "rsync", changed)

        result = self._transfer(over_rsync, lambda: self._sftp_down(remote_dir, local_dir, remote), log, force_sftp)
        # Verify by hash against the remote as it is now; a live run may have moved on meanwhile.
        after = self.remote_stats(remote_dir)
        live = []
        for rel, (digest, _, _) in after.items():
            path = local_dir / rel
            if path.is_file() and sha256_file(path) == digest:
                continue
            if remote.get(rel, (None,))[0] != digest:
                live.append(rel)
                continue
            raise UserError(f"pulled {rel} does not match the remote copy; run the pull again")
        result.replaced, result.kept = replaced, kept
        result.verified = {rel: digest for rel, (digest, _, _) in after.items() if rel not in live}
        for k in kept:
            log(f"kept your local edit as {local_dir / k}")
        if replaced:
            log(f"replaced {len(replaced)} local file(s) with the remote version: {', '.join(sorted(replaced)[:8])}")
        if live:
            log(f"{len(live)} file(s) changed on {self.ep.name} during the pull (the run is live); pull again later")
        return result

    def remote_stats(self, directory: str) -> dict[str, tuple[str, float, int]]:
        """{relative path: (sha256, mtime, size)} under a remote directory (temp files left out)."""
        out = self.agent("stats", directory, warn=True).stdout
        stats = {}
        for line in out.splitlines():
            parts = line.split(" ", 3)
            if len(parts) == 4:
                stats[parts[3]] = (parts[0], float(parts[1]), int(parts[2]))
        return stats

    def agent(self, *args: str, warn: bool = False):
        """Run the watchdog script's tool side on the machine (stdlib python3 there, nothing installed)."""
        return self.run(f"python3 -c {shlex.quote(agent_source('autostop.py'))} {shlex.join(args)}", warn=warn)

    # ------------------------------------------------------------------------------ the pull record
    def record_pulled(self, run_id: str, verified: dict[str, str]) -> list[str]:
        """Record on the machine which files of a run are pulled (those still matching `verified`);
        returns the run's files left unrecorded (changed meanwhile: the run stays unpulled)."""
        return json.loads(self.agent("record", self.ep.workdir, run_id, json.dumps(verified)).stdout)

    def unpulled_runs(self) -> list[str]:
        """Runs on the machine with a file not pulled yet, or changed since its pull."""
        return json.loads(self.agent("unpulled", self.ep.workdir).stdout)

    def _sftp_down(self, remote_dir: str, local_dir: Path, remote: dict) -> TransferResult:
        sftp = self.conn.sftp()  # not Fabric's get: it formats the local path ({host}) and copies the mode
        base = posixpath.join(self._home(), remote_dir) if not remote_dir.startswith("/") else remote_dir
        changed, size = [], 0
        for rel, (digest, _, nbytes) in sorted(remote.items()):
            path = local_dir / rel
            if path.is_file() and sha256_file(path) == digest:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
            sftp.get(posixpath.join(base, rel), str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            changed.append(rel)
            size += nbytes
        return TransferResult(len(changed), size, "sftp", changed)

    # ------------------------------------------------------------------------------ jobs
    def job_paths(self, run_id: str) -> dict[str, str]:
        jobs = f"{self.ep.workdir}/jobs"
        return {"log": f"{jobs}/{run_id}.log", "pid": f"{jobs}/{run_id}.pid", "exit": f"{jobs}/{run_id}.exit"}

    def start_detached(self, argv: list[str], run_id: str, env: dict[str, str] | None = None,
                       env_files: dict[str, str] | None = None, append: bool = False) -> int:
        """Start `argv` in the work dir, detached from this SSH session (setsid nohup), with its own
        console log, pid file and exit-code file under jobs/. Returns the pid, which is also the
        process group of everything the job starts.

        `env_files` maps variable -> file in the work dir to read it from, so that secrets such as a
        Jupyter token never appear on a command line (`ps`)."""
        cmd = self.detached_command(argv, run_id, env, env_files, append)
        return int(self.run(f"bash -c {shlex.quote(cmd)}").stdout.strip())

    def detached_command(self, argv: list[str], run_id: str, env: dict[str, str] | None = None,
                         env_files: dict[str, str] | None = None, append: bool = False) -> str:
        """The bash command, run from the login directory, with which start_detached starts a job; it
        prints the pid. A job record keeps it, so the machine can start the job again by itself."""
        job = shlex.quote(run_id)
        exports = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
        exports += [f'{k}="$(cat {shlex.quote(v)})"' for k, v in (env_files or {}).items()]
        prefix = f"export {' '.join(exports)}; " if exports else ""
        # The wrapper shell traps TERM/INT (a handler, which exec resets) so that when the job's process
        # group is signalled it outlives the trainer long enough to record the trainer's exit code.
        inner = f"trap true TERM INT; {prefix}{shlex.join(argv)}; echo $? > jobs/{job}.exit"
        redirect = ">>" if append else ">"
        return (f"cd {shlex.quote(self.ep.workdir)} && mkdir -p jobs && rm -f jobs/{job}.exit && "
                f"{{ setsid nohup sh -c {shlex.quote(inner)} {redirect} jobs/{job}.log 2>&1 < /dev/null & "
                f"echo $! > jobs/{job}.pid; }} && cat jobs/{job}.pid")

    def record_job(self, run_id: str, commands: list[str]) -> None:
        """Write jobs/RUN.job.json: the commands (detached_command) that continue the run, for the agent
        that resumes a spot-interrupted run at boot (infra/agent/resume_agent.py). It also clears the run's
        spot notice: a run started from here again is no longer waiting for the machine to resume it.
        `status_file` (relative to the work dir) is where the agent reads the run's status.

        The commands hold what the job's own command line already shows (`ps`), nothing more: the
        file is mode 600 all the same."""
        jobs = posixpath.join(self._home(), self.ep.workdir, "jobs")
        self.run(f"mkdir -p {shlex.quote(jobs)} && rm -f {shlex.quote(f'{jobs}/{run_id}.spot-notice')}")
        self.write_file(f"{jobs}/{run_id}.job.json",
                        json.dumps({"run_id": run_id, "workdir": self.ep.workdir, "resume": commands,
                                    "status_file": posixpath.join("runs", run_id, runspec.CONFIG)}, indent=1))

    def write_file(self, path: str, text: str, mode: int = 0o600) -> None:
        """Write `text` to an absolute `path` on the machine whole or not at all (a temp file, then a
        rename); its directory must exist."""
        tmp = f"{path}.part-{secrets.token_hex(6)}"  # two runs starting at once each write their own
        self.conn.put(io.BytesIO(text.encode()), tmp)
        sftp = self.conn.sftp()  # Fabric caches this client: do not close it
        sftp.chmod(tmp, mode)
        sftp.posix_rename(tmp, path)

    def job_state(self, run_id: str) -> tuple[str, int | None]:
        """("running" | "finished" | "unknown", exit code if finished)."""
        p = self.job_paths(run_id)
        out = self.run(f"cat {p['exit']} 2>/dev/null && echo :exit || "
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
        transport = self.conn.client.get_transport()
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
            self.close()
            raise ConnectionLost(f"lost the SSH connection to {self.ep.name} while streaming the log")

    def kill_job(self, run_id: str, signal_name: str = "TERM") -> bool:
        p = self.job_paths(run_id)
        res = self.run(f"kill -{signal_name} -- -$(cat {p['pid']}) 2>/dev/null || kill -{signal_name} $(cat {p['pid']})",
                       warn=True)
        return res.ok

    def list_runs(self) -> list[dict]:
        """Remote runs/: id, status, epochs done, the delivered weights' test accuracy and which weights
        (result.json), job state."""
        # runspec is one standard-library file: the machine's python3 runs it as is (see runspec.list_runs)
        source = Path(runspec.__file__).read_text()
        out = self.run(f"python3 -c {shlex.quote(source)} {shlex.quote(self.ep.workdir)}").stdout
        return [json.loads(l) for l in out.splitlines() if l.strip()]

    # ------------------------------------------------------------------------------ tunnels
    def forward_local(self, local_port: int, remote_port: int):
        """Context manager: 127.0.0.1:local_port here -> 127.0.0.1:remote_port on the machine."""
        return self.conn.forward_local(local_port=local_port, remote_port=remote_port, remote_host="127.0.0.1",
                                       local_host="127.0.0.1")


def local_files(root: Path) -> list[str]:
    """Files to sync from root: git's view (tracked + untracked, .gitignore honoured) when it is a
    repository, else every file; then the secret and output excludes, always."""
    root = Path(root)
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True)
        candidates = [p for p in out.stdout.decode().split("\0") if p and (root / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        candidates = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    return [p for p in candidates if not excluded(p)]


def excluded(rel: str) -> bool:
    parts = rel.split("/")
    for pattern in SYNC_EXCLUDES:
        if pattern.endswith("/"):
            if any(fnmatch.fnmatch(part, pattern[:-1]) for part in parts[:-1]):
                return True
        elif any(fnmatch.fnmatch(part, pattern) for part in parts):
            return True
    return False


def free_port(preferred: int | None = None) -> int:
    """`preferred` if it can be bound on 127.0.0.1, else a free one the OS picks."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise UserError("no free local port")
