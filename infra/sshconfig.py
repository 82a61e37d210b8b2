"""`Host mnist-<name>` entries, so plain `ssh mnist-<name>` and VS Code Remote-SSH use the same pinned
key, user and address as mnist-cloud."""

from __future__ import annotations

from pathlib import Path

from infra.errors import UserError
from infra.remote import pinned_keys, ssh_options, ssh_value
from infra.state import State, config_dir
from runspec import atomic_write


def write_ssh_config(names: list[str]) -> tuple[Path, list[str]]:
    state = State()
    hosts = [h for h in state.all() if not names or h.name in names]
    missing = set(names) - {h.name for h in hosts}
    if missing:
        raise UserError(f"unknown name(s): {', '.join(sorted(missing))}")
    blocks = ["# written by `mnist-cloud ssh-config`; EC2 addresses change on stop/start: run it again after `start`\n"]
    for h in hosts:
        alias = h.instance_id or f"{h.host}:{h.port}"
        pinned = pinned_keys(alias)
        options = {"HostName": h.host, "User": h.user,
                   **ssh_options(h.key_path, h.port, alias, pinned[0][0] if pinned else None)}
        blocks.append("\n".join([f"Host mnist-{h.name}", *(f"    {k} {ssh_value(v)}" for k, v in options.items())]) + "\n")
    path = config_dir() / "ssh_config"
    atomic_write(path, "\n".join(blocks).encode(), mode=0o600)
    return path, [h.name for h in hosts]
