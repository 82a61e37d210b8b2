"""The --notify URLs, on the laptop: checked as typed (or as the settings' `notify` gives them, comma-separated),
and shown only as scheme://host/… (a webhook's path is its secret). The instance POSTs to them
(infra/agent/notify.py), from files of mode 600 that `launch` and `train --on` write there."""

from __future__ import annotations

import json
import posixpath
import shlex
import urllib.parse

import runspec
from infra.agent import source as agent_source
from infra.agent.notify import shown
from infra.errors import UserError

SERVICES = ("slack", "discord", "ntfy")

__all__ = ["notify_urls", "push_notify", "shown", "shown_all"]


def notify_urls(typed: list[str] | None, setting: str | None = None) -> list[str]:
    """The URLs from the flags, else from the setting (comma-separated); UserError for one that is no URL."""
    values = list(typed or []) or [u for u in (setting or "").split(",")]
    urls = []
    for value in (v.strip() for v in values):
        if not value:
            continue
        kind, _, rest = value.partition(":")
        target = rest if kind in SERVICES else value
        parts = urllib.parse.urlsplit(target)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"--notify {shown(value)}: not an http(s) URL; give http(s)://..., or "
                            f"{', '.join(s + ':https://...' for s in SERVICES)}")
        urls.append(value)
    return list(dict.fromkeys(urls))


def shown_all(urls: list[str]) -> str:
    return ", ".join(shown(u) for u in urls)


def push_notify(remote, urls: list[str], log=print) -> None:
    """The URLs the machine's agents POST to, into jobs/notify.json of the work dir (mode 600), with the notifier
    that a run's wrapper calls when the run ends (infra/jobs.py) and the run dir's file names it reads;
    no URLs: no file, no POSTs."""
    from infra.transfer import write_file

    jobs = posixpath.join(remote.home(), remote.ep.workdir, "jobs")
    if not urls:
        remote.run(f"rm -f {shlex.quote(jobs)}/notify.json")
        return
    remote.run(f"mkdir -p {shlex.quote(jobs)}")
    write_file(remote, f"{jobs}/notify.py", agent_source("notify.py"), mode=0o755)
    files = {"config": runspec.CONFIG, "result": runspec.RESULT, "metrics": runspec.METRICS}
    write_file(remote, f"{jobs}/notify.json", json.dumps({"urls": urls, "files": files}))
    log(f"{remote.ep.name} posts the run's end and its own events to {shown_all(urls)}")


def remember_urls(name: str, urls: list[str]) -> None:
    """`launch --notify`'s URLs in the name's record (the state file is mode 600), for the runs `train --on`
    starts there without URLs of their own: the job runs as the login, which cannot read root's copy."""
    from infra.state import State

    state = State()
    host = state.get(name)
    if host is not None:
        host.extra = {**host.extra, "notify": list(urls)}
        state.put(host)


def launched_urls(name: str) -> list[str]:
    """The URLs `launch --notify` gave the name, [] for none."""
    from infra.state import State

    host = State().get(name)
    return list(host.extra.get("notify") or []) if host is not None else []

