"""Local files of the laptop side: the config dir, key files, and the address cache.

The state file only caches how to reach a name (host, user, port, key, instance id, region).
Whether an instance exists and what state it is in is always read live from EC2.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra.errors import UserError
from runspec import atomic_write


def config_dir() -> Path:
    """$MNIST_CLOUD_HOME, else $XDG_CONFIG_HOME/mnist-cloud, else ~/.config/mnist-cloud."""
    if os.environ.get("MNIST_CLOUD_HOME"):
        return Path(os.environ["MNIST_CLOUD_HOME"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "mnist-cloud"


def keys_dir() -> Path:
    path = config_dir() / "keys"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def write_private_key(path: Path, material: str) -> None:
    atomic_write(path, material.encode(), mode=0o600)


def check_key_file(path: Path) -> Path:
    """A private key must exist and be readable by its owner only, as ssh itself insists."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"key file {path} does not exist")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise UserError(f"key file {path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")
    return path


@dataclass
class Host:
    """How to reach a name: an EC2 instance we launched or adopted, or any SSH machine."""

    name: str
    kind: str  # "ec2" or "ssh"
    host: str | None = None
    user: str = "ubuntu"
    port: int = 22
    key_path: str | None = None
    instance_id: str | None = None
    region: str | None = None
    key_name: str | None = None
    created_key: bool = False  # the key pair is ours to delete with the name
    instance_type: str | None = None  # as launched (EC2 is the truth: `status` reads it live)
    extra: dict = field(default_factory=dict)


class State:
    def __init__(self, path: Path | None = None):
        self.path = path or config_dir() / "state.json"

    def _load(self) -> dict:
        if not self.path.exists():
            return {"hosts": {}}
        try:
            data = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{self.path} is damaged; move it aside (it only caches addresses) and retry") from None
        data.setdefault("hosts", {})
        return data

    def get(self, name: str) -> Host | None:
        raw = self._load()["hosts"].get(name)
        return Host(**raw) if raw else None

    def all(self) -> list[Host]:
        return [Host(**raw) for raw in self._load()["hosts"].values()]

    @contextlib.contextmanager
    def _locked(self):
        """One writer at a time (two terminals, a sweep's workers): the read-modify-write of put/remove runs
        under an exclusive flock on a lock file beside the state file. Readers need none: writes are atomic."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _save(self, data: dict) -> None:
        atomic_write(self.path, (json.dumps(data, indent=2) + "\n").encode(), mode=0o600)

    def put(self, host: Host) -> None:
        with self._locked():
            data = self._load()
            data["hosts"][host.name] = asdict(host)
            self._save(data)

    def remove(self, name: str) -> None:
        with self._locked():
            data = self._load()
            if data["hosts"].pop(name, None) is not None:
                self._save(data)
