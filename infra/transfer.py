"""Files between the laptop and one machine (Fabric's Transfer): sync the code up, push a run up, pull a
run down verified by hash, and the machine's record of which runs are pulled.

Files move over rsync when both sides have a real one, else over SFTP (RsyncChoice says which and why:
macOS 15.4+ ships openrsync as /usr/bin/rsync, which cannot list what it moved). Either way a file lands
under a temp name and is renamed: nobody ever reads half a file under the real name.
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
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Callable, NamedTuple, Protocol

from infra.agent import source as agent_source
from infra.errors import HostKeyMismatch, UserError



class Connection(Protocol):
    """What a transfer needs of a connection (infra.remote.Remote is the one): Fabric's `conn`, the endpoint
    `ep`, `target`, `run`, `home()` and `ssh_argv()`. Described here rather than imported, so that the
    connection can hand work to its Transfer (as Fabric's Connection.put does) without an import cycle."""

    conn: Any
    ep: Any
    target: str

    def run(self, command: str, **kwargs) -> Any: ...

    def home(self) -> str: ...

    def ssh_argv(self, *args, **kwargs) -> list[str]: ...

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


def sha256_file(path: Path) -> str:
    """A file's sha256, read in chunks: checkpoints and pulled runs can be larger than memory wants."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):  # hashlib.file_digest is 3.11+; we run on 3.10
            digest.update(chunk)
    return digest.hexdigest()


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


def rsync_result(out: str) -> TransferResult:
    """What `rsync --stats --itemize-changes` printed that it moved."""
    files = re.search(r"Number of regular files transferred: ([\d,]+)", out)
    size = re.search(r"Total transferred file size: ([\d,]+)", out)
    changed = [l.split(" ", 1)[1] for l in out.splitlines() if re.match(r"^[<>]f", l)]
    return TransferResult(int(files.group(1).replace(",", "")) if files else len(changed),
                          int(size.group(1).replace(",", "")) if size else 0, "rsync", changed)


class RemoteFile(NamedTuple):
    """One regular file under a remote directory, as the machine's agent reports it."""

    sha256: str
    mtime: float
    size: int


def run_agent(remote: Connection, *args: str, warn: bool = False):
    """Run the watchdog script's tool side on the machine (stdlib python3 there, nothing installed)."""
    return remote.run(f"python3 -c {shlex.quote(agent_source('autostop.py'))} {shlex.join(args)}", warn=warn)


def remote_stats(remote: Connection, directory: str) -> dict[str, RemoteFile]:
    """{relative path: RemoteFile} under a remote directory (temp files left out)."""
    stats = {}
    for line in run_agent(remote, "stats", directory, warn=True).stdout.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4:
            stats[parts[3]] = RemoteFile(parts[0], float(parts[1]), int(parts[2]))
    return stats


def remote_hashes(remote: Connection, directory: str, exclude_top: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative path: sha256} of the regular files under a remote directory."""
    prune = " ".join(f"-path ./{shlex.quote(t)} -prune -o" for t in exclude_top)
    out = remote.run(f"cd {shlex.quote(directory)} 2>/dev/null && find . {prune} -type f -print0 | "
                     "xargs -0 -r sha256sum", warn=True).stdout
    hashes = {}
    for line in out.splitlines():
        digest, _, rel = line.partition("  ")
        if rel:
            hashes[rel[2:] if rel.startswith("./") else rel] = digest
    return hashes


def record_pulled(remote: Connection, run_id: str, verified: dict[str, str]) -> list[str]:
    """Record on the machine which files of a run are pulled (those still matching `verified`);
    returns the run's files left unrecorded (changed meanwhile: the run stays unpulled)."""
    return json.loads(run_agent(remote, "record", remote.ep.workdir, run_id, json.dumps(verified)).stdout)


def unpulled_runs(remote: Connection) -> list[str]:
    """Runs on the machine with a file not pulled yet, or changed since its pull."""
    return json.loads(run_agent(remote, "unpulled", remote.ep.workdir).stdout)


def put_atomic(remote: Connection, source: str | IO[bytes], dest: str, mode: int | None = None) -> None:
    """Put a local file (Fabric keeps its mode: an executable stays one) or a file object at the absolute
    path `dest` on the machine, whole or not at all: under a temp name of its own, then renamed. `mode`
    is set before the rename. dest's directory must exist."""
    tmp = f"{dest}.part-{secrets.token_hex(6)}"  # two writers at once (two runs starting) each have their own
    remote.conn.put(source, tmp)
    sftp = remote.conn.sftp()  # Fabric caches this client: do not close it
    if mode is not None:
        sftp.chmod(tmp, mode)
    sftp.posix_rename(tmp, dest)


def write_file(remote: Connection, path: str, text: str, mode: int = 0o600) -> None:
    """Write `text` to an absolute `path` on the machine whole or not at all; its directory must exist."""
    put_atomic(remote, io.BytesIO(text.encode()), path, mode)


def sftp_makedirs(sftp, path: str) -> None:
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


def set_aside_local_edits(local_dir: Path, remote: dict[str, RemoteFile]) -> tuple[list[str], list[str]]:
    """Before a pull: drop the temp files an interrupted pull left (rsync's .NAME.XXXXXX, ours
    .NAME.part-PID), and find the local files that differ from the remote copy; one newer than it (edited
    here) is renamed NAME.local-<time>. Returns (differing files, the set-aside names)."""
    for rel in remote:
        path = local_dir / rel
        for stale in path.parent.glob(f".{path.name}.*") if path.parent.is_dir() else []:
            stale.unlink()
    replaced, kept = [], []
    for rel, file in remote.items():
        path = local_dir / rel
        if path.is_file() and sha256_file(path) != file.sha256:
            replaced.append(rel)
            if path.stat().st_mtime > file.mtime + 1:
                backup = path.with_name(f"{path.name}.local-{time.strftime('%Y%m%d-%H%M%S')}")
                path.rename(backup)
                kept.append(str(backup.relative_to(local_dir)))
    return replaced, kept


def changed_during_pull(local_dir: Path, before: dict[str, RemoteFile], after: dict[str, RemoteFile]) -> list[str]:
    """Verify a pull by hash against the remote as it is now: the files a live run changed meanwhile
    (left for the next pull); any other file that does not match is an error."""
    live = []
    for rel, file in after.items():
        path = local_dir / rel
        if path.is_file() and sha256_file(path) == file.sha256:
            continue
        if rel not in before or before[rel].sha256 != file.sha256:
            live.append(rel)
            continue
        raise UserError(f"pulled {rel} does not match the remote copy; run the pull again")
    return live


class Transfer:
    """Sync, push and pull for one machine. It remembers how files move there: the RsyncChoice made at
    the first transfer, and whether an rsync call has gone through (after which rsync's exit 1 or 2 is a
    real failure, not "this rsync cannot")."""

    def __init__(self, remote: Connection):
        self.remote = remote
        self._choice: RsyncChoice | None = None
        self._rsync_worked = False

    def rsync_choice(self) -> RsyncChoice:
        """rsync when both sides have one that can do what sync/pull ask (not openrsync), else SFTP."""
        if self._choice is None:
            choice = local_rsync()
            if choice.path and not self.remote.run("command -v rsync", warn=True).ok:
                choice = RsyncChoice(None, f"no rsync on {self.remote.ep.name}")
            self._choice = choice
        return self._choice

    def _either(self, over_rsync: Callable[[], TransferResult], over_sftp: Callable[[], TransferResult],
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

    def _rsync(self, args: list[str]) -> TransferResult:
        path, name = self.rsync_choice().path, self.remote.ep.name
        proc = subprocess.run([path, "-e", shlex.join(self.remote.ssh_argv()), *args], capture_output=True, text=True)
        if proc.returncode != 0:
            err = proc.stderr.strip().splitlines()
            if any("Host key verification failed" in l or "REMOTE HOST IDENTIFICATION" in l for l in err):
                raise HostKeyMismatch(f"host key of {name} has CHANGED (ssh refused it); "
                                      f"if you trust the machine, `mnist-cloud forget-host {name}`")
            if proc.returncode in RSYNC_CANNOT and not self._rsync_worked:
                why = f"{path} failed with exit {proc.returncode} ({RSYNC_CANNOT[proc.returncode]})"
                self._choice = RsyncChoice(None, why)
                raise RsyncRefused(why)
            raise UserError(f"rsync to {name} failed (exit {proc.returncode}): {err[-1] if err else ''}")
        self._rsync_worked = True
        return rsync_result(proc.stdout)

    def _remote_path(self, path: str) -> str:
        return path if path.startswith("/") else posixpath.join(self.remote.home(), path)

    # ---- sync: the code up, mirrored
    def sync(self, local_dir: Path, log: Log = print, force_sftp: bool = False,
             extra: dict[str, Path] | None = None) -> TransferResult:
        """Mirror the code in local_dir into the remote work dir. Secrets and outputs never leave.
        `extra`: {name in the work dir: local file or directory} synced beside it (the installed
        trainer, for a project that is not a checkout); the project's mirror never deletes them."""
        local_dir = Path(local_dir).resolve()
        extra = extra or {}
        self.remote.run(f"mkdir -p {shlex.quote(self.remote.ep.workdir)}")
        result = self._either(lambda: self._rsync_up(local_dir, protect=list(extra)),
                              lambda: self._sftp_up(local_dir, protect=list(extra)), log, force_sftp)
        if not extra:
            return result
        more = self._sync_extra(extra, force_sftp)
        return TransferResult(result.files + more.files, result.bytes + more.bytes, result.method,
                              result.changed + more.changed)

    def _sync_extra(self, extra: dict[str, Path], force_sftp: bool) -> TransferResult:
        with tempfile.TemporaryDirectory() as tmp:
            stage = Path(tmp)
            for name, path in extra.items():  # under their work-dir names, without caches
                if path.is_dir():
                    shutil.copytree(path, stage / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(path, stage / name)
            return self._either(
                lambda: self._rsync(["-az", "--checksum", "--delete", "--stats", "--itemize-changes",
                                     *(str(stage / name) for name in extra),
                                     f"{self.remote.target()}:{self.remote.ep.workdir}/"]),
                lambda: self._sftp_up(stage, prune_only=list(extra)),
                lambda m: None, force_sftp)  # the same choice as the project's: its why is said there

    def _rsync_up(self, local_dir: Path, protect: list[str] = ()) -> TransferResult:
        filters = ["--filter=:- .gitignore", *(f"--filter=P {p}" for p in SYNC_PROTECT),
                   *(f"--filter=P /{name}/***" for name in protect), *(f"--filter=P /{name}" for name in protect),
                   *(f"--exclude={p}" for p in SYNC_EXCLUDES)]
        return self._rsync(["-az", "--checksum", "--delete", "--stats", "--itemize-changes", *filters,
                            f"{local_dir}/", f"{self.remote.target()}:{self.remote.ep.workdir}/"])

    def _sftp_up(self, local_dir: Path, protect: list[str] = (), prune_only: list[str] | None = None) -> TransferResult:
        """Upload what changed, then delete what is gone locally: every other file (but `protect`), or
        only under the top-level names in `prune_only`."""
        workdir = self.remote.ep.workdir
        remote = remote_hashes(self.remote, workdir, exclude_top=("runs", "jobs", ".mnist-cloud-python"))
        sftp = self.remote.conn.sftp()
        changed, size = [], 0
        for rel in sorted(local_files(local_dir)):
            path = local_dir / rel
            if remote.pop(rel, None) == sha256_file(path):
                continue
            dest = self._remote_path(posixpath.join(workdir, rel))
            sftp_makedirs(sftp, posixpath.dirname(dest))
            put_atomic(self.remote, str(path), dest)
            changed.append(rel)
            size += path.stat().st_size
        for rel in remote:  # gone locally: mirror the deletion, like rsync --delete (notebooks stay)
            if any(fnmatch.fnmatch(posixpath.basename(rel), p) for p in SYNC_PROTECT):
                continue
            top = rel.split("/", 1)[0]
            if top in protect or (prune_only is not None and top not in prune_only):
                continue
            sftp.remove(self._remote_path(posixpath.join(workdir, rel)))
        return TransferResult(len(changed), size, "sftp", changed)

    # ---- push: a run up (to resume it on another machine)
    def push(self, local_dir: Path, remote_dir: str, log: Log = print) -> TransferResult:
        """Copy a local directory to the machine (each file to a temp name, then renamed)."""
        local_dir = Path(local_dir)
        self.remote.run(f"mkdir -p {shlex.quote(remote_dir)}")
        return self._either(lambda: self._rsync(["-a", "--checksum", "--stats", "--itemize-changes", f"{local_dir}/",
                                                 f"{self.remote.target()}:{remote_dir.rstrip('/')}/"]),
                            lambda: self._sftp_push(local_dir, remote_dir), log)

    def _sftp_push(self, local_dir: Path, remote_dir: str) -> TransferResult:
        sftp = self.remote.conn.sftp()
        base = self._remote_path(remote_dir)
        changed, size = [], 0
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            dest = posixpath.join(base, rel)
            sftp_makedirs(sftp, posixpath.dirname(dest))
            put_atomic(self.remote, str(path), dest)
            changed.append(rel)
            size += path.stat().st_size
        return TransferResult(len(changed), size, "sftp", changed)

    # ---- pull: a run down, verified
    def pull(self, remote_dir: str, local_dir: Path, log: Log = print, force_sftp: bool = False) -> TransferResult:
        """Bring remote_dir's files to local_dir: incremental, each file written to a temp name and
        renamed, verified by hash. A local file that differs is replaced only with a word about it,
        and if it is newer than the remote copy (edited here) it is first kept as NAME.local-<time>."""
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        before = remote_stats(self.remote, remote_dir)
        if not before:
            raise UserError(f"{self.remote.ep.name} has no {remote_dir}; see `mnist-cloud runs {self.remote.ep.name}`")
        replaced, kept = set_aside_local_edits(local_dir, before)
        # rsync writes each file under a temp name and renames it: never a half file under the real name
        source = f"{self.remote.target()}:{remote_dir.rstrip('/')}/"
        result = self._either(lambda: self._rsync(["-a", "--checksum", "--stats", "--itemize-changes", source,
                                                   f"{local_dir}/"]),
                              lambda: self._sftp_down(remote_dir, local_dir, before), log, force_sftp)
        after = remote_stats(self.remote, remote_dir)  # a live run may have moved on meanwhile
        live = changed_during_pull(local_dir, before, after)
        result.replaced, result.kept = replaced, kept
        result.verified = {rel: file.sha256 for rel, file in after.items() if rel not in live}
        for k in kept:
            log(f"kept your local edit as {local_dir / k}")
        if replaced:
            log(f"replaced {len(replaced)} local file(s) with the remote version: {', '.join(sorted(replaced)[:8])}")
        if live:
            log(f"{len(live)} file(s) changed on {self.remote.ep.name} during the pull (the run is live); "
                "pull again later")
        return result

    def _sftp_down(self, remote_dir: str, local_dir: Path, remote: dict[str, RemoteFile]) -> TransferResult:
        sftp = self.remote.conn.sftp()  # not Fabric's get: it formats the local path ({host}) and copies the mode
        base = self._remote_path(remote_dir)
        changed, size = [], 0
        for rel, file in sorted(remote.items()):
            path = local_dir / rel
            if path.is_file() and sha256_file(path) == file.sha256:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
            sftp.get(posixpath.join(base, rel), str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            changed.append(rel)
            size += file.size
        return TransferResult(len(changed), size, "sftp", changed)
