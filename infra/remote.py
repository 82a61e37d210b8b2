"""A connection to one machine over SSH (Fabric's Connection): the only module that opens one, and with
infra/transfer.py and infra/jobs.py the only users of Fabric, paramiko, ssh and rsync. It knows nothing
about EC2.

An Endpoint is how to reach one machine (host, port, user, key) plus the identity its host key is
pinned under: the EC2 instance id, because EC2 reuses IP addresses, or host:port for any other
machine. A Remote opens on first use, pins and checks the host key, runs commands, renders the same
options for ssh and rsync, and forwards ports. Remote work happens in ~/mnist-cloud/<name>/ on the
machine; files move through infra/transfer.py and detached jobs run through infra/jobs.py.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path

import paramiko
from fabric import Config, Connection

from infra.errors import ConnectionLost, HostKeyMismatch, UserError
from infra.poll import poll
from infra.state import check_key_file, config_dir
from infra.transfer import Log, Transfer, TransferResult
from runspec import atomic_write


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


class Remote:
    """One SSH machine. The connection opens on first use; use as a context manager to close it."""

    def __init__(self, ep: Endpoint, expected_fingerprints: list[str] | None = None, connect_timeout: float = 10):
        self.ep = ep
        self.expected = expected_fingerprints
        self.connect_timeout = connect_timeout
        self._conn: Connection | None = None
        self._home: str | None = None
        self.transfer = Transfer(self)  # how files move there, remembered for this machine
        check_key_file(Path(ep.key_path))

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

    def home(self) -> str:
        """The login directory on the machine, asked once."""
        if self._home is None:
            self._home = self.run("printf %s \"$HOME\"").stdout
        return self._home

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

    def forward_local(self, local_port: int, remote_port: int):
        """Context manager: 127.0.0.1:local_port here -> 127.0.0.1:remote_port on the machine."""
        return self.conn.forward_local(local_port=local_port, remote_port=remote_port, remote_host="127.0.0.1",
                                       local_host="127.0.0.1")

    # Fabric's shape: Connection.put and .get hand the work to a Transfer; so do these (infra/transfer.py)
    def sync(self, local_dir: Path, log: Log = print, force_sftp: bool = False,
             extra: dict[str, Path] | None = None) -> TransferResult:
        """Mirror the code in local_dir into the work dir (Transfer.sync)."""
        return self.transfer.sync(local_dir, log=log, force_sftp=force_sftp, extra=extra)

    def push(self, local_dir: Path, remote_dir: str, log: Log = print) -> TransferResult:
        """Copy a local directory to the machine (Transfer.push)."""
        return self.transfer.push(local_dir, remote_dir, log=log)

    def pull(self, remote_dir: str, local_dir: Path, log: Log = print, force_sftp: bool = False) -> TransferResult:
        """Bring a remote directory here, verified (Transfer.pull)."""
        return self.transfer.pull(remote_dir, local_dir, log=log, force_sftp=force_sftp)


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
