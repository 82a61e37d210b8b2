"""`Host mnist-<name>` entries, so plain `ssh mnist-<name>` and VS Code Remote-SSH use the same pinned
key, user and address as mnist-cloud."""

from __future__ import annotations

from pathlib import Path

from runspec import atomic_write
from infra.errors import UserError
from infra.remote import known_hosts_file, pinned_keys
from infra.state import State, config_dir


def write_ssh_config(names: list[str]) -> tuple[Path, list[str]]:
    state = State()
    hosts = [h for h in state.all() if not names or h.name in names]
    missing = set(names) - {h.name for h in hosts}
    if missing:
        raise UserError(f"unknown name(s): {', '.join(sorted(missing))}")
    blocks = ["# written by `mnist-cloud ssh-config`; EC2 addresses change on stop/start: run it again after `start`\n"]
    for h in hosts:
        alias = h.instance_id or f"{h.host}:{h.port}"
        lines = [f"Host mnist-{h.name}", f"    HostName {h.host}", f"    User {h.user}", f"    Port {h.port}",
                 f"    IdentityFile {h.key_path}", "    IdentitiesOnly yes",
                 f"    UserKnownHostsFile {known_hosts_file()}", f"    HostKeyAlias {alias}"]
        pinned = pinned_keys(alias)
        if pinned:  # the key mnist-cloud pinned; anything else is refused
            lines += ["    StrictHostKeyChecking yes", f"    HostKeyAlgorithms {pinned[0][0]}"]
        else:  # not pinned yet: the first connection pins it, under the same alias mnist-cloud uses
            lines.append("    StrictHostKeyChecking accept-new")
        blocks.append("\n".join(lines) + "\n")
    path = config_dir() / "ssh_config"
    atomic_write(path, "\n".join(blocks).encode(), mode=0o600)
    return path, [h.name for h in hosts]
