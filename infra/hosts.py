"""The name a machine goes by, and adopting any SSH machine under one (a lab box, another cloud).

Nothing here knows EC2: the EC2 rooms (infra/ec2/) use the same name rule."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from infra.errors import UserError
from infra.state import Host, State, check_key_file

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,38}$")


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise UserError(f"name {name!r}: use 1-39 lowercase letters, digits and dashes, starting with a letter or digit")
    return name


def parse_ssh_target(target: str) -> tuple[str, str, int]:
    """USER@HOST[:PORT] -> (user, host, port)."""
    m = re.match(r"^(?P<user>[^@\s]+)@(?P<host>\[[^\]]+\]|[^:\s]+)(?::(?P<port>\d+))?$", target or "")
    if not m:
        raise UserError(f"--host {target!r}: expected USER@HOST or USER@HOST:PORT")
    port = int(m.group("port") or 22)
    if not 0 < port < 65536:
        raise UserError(f"--host {target!r}: port must be 1-65535")
    return m.group("user"), m.group("host").strip("[]"), port


def attach_host(target: str, name: str, key_path: str, log: Callable[[str], None] = print,
                state: State | None = None, verify: Callable[[Host], None] | None = None) -> Host:
    """Adopt any SSH machine (a lab box, another cloud) under a name. `verify` (e.g. a test login)
    runs before anything is recorded."""
    check_name(name)
    state = state or State()
    user, host, port = parse_ssh_target(target)
    key = check_key_file(Path(key_path))
    existing = state.get(name)
    if existing and existing.kind == "ec2":
        raise UserError(f"name {name!r} already names EC2 instance {existing.instance_id}; pick another --name")
    record = Host(name=name, kind="ssh", host=host, user=user, port=port, key_path=str(key))
    if verify is not None:
        verify(record)
    state.put(record)
    log(f"attached {user}@{host}:{port} as {name!r} with key {key}")
    return record
