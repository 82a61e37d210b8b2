#!/usr/bin/env python3
"""mnist-cloud notify: POST what happened on the instance to the --notify URLs (laptop closed or not).

    notify.py send EVENT TEXT [--wait]    # returns at once: a detached child POSTs (--wait: this process)
    notify.py run-ended RUN EXIT          # in the work dir (the job's wrapper): "finished" or "failed"

A plain URL gets JSON ({"event", "text", "host", ...}); slack:URL {"text"}, discord:URL {"content"}, ntfy:URL a
plain body with a Title header. ATTEMPTS tries each, all within CAP_S: a receiver that fails costs the run nothing.
The URLs are secrets: in files of mode 600 ($ROOT/etc/mnist-cloud/notify.json from launch, jobs/notify.json from
train --on), shown only as scheme://host/…. Python 3 standard library only; see infra/agent/__init__.py.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(os.environ.get("MNIST_CLOUD_ROOT") or "/")
# launch's; the work dir's (the job's wrapper and the spot watcher run there); every name's (for root, the watchdog)
URL_FILES = [str(ROOT / "etc/mnist-cloud/notify.json"), "jobs/notify.json",
             "/home/*/mnist-cloud/*/jobs/notify.json", "/root/mnist-cloud/*/jobs/notify.json"]
ATTEMPTS = 3
BACKOFF_S = 1.0  # then 2 s
CAP_S = float(os.environ.get("MNIST_CLOUD_NOTIFY_CAP_S") or 30)  # every URL, every try
TITLES = {"finished": "run finished", "failed": "run failed", "spot": "spot interruption", "autostop": "autostop",
          "budget-warning": "budget warning", "budget-stop": "budget stop"}


def shown(url: str) -> str:
    """What may be printed of a URL: scheme and host, never its path or query (a webhook's token)."""
    kind, _, rest = url.partition(":") if url.split(":", 1)[0] in ("slack", "discord", "ntfy") else ("", "", url)
    parts, kind = urllib.parse.urlsplit(rest), kind + ":" if kind else ""
    return f"{kind}{parts.scheme}://{parts.hostname}/…" if parts.scheme and parts.hostname else f"{kind}…"


def request(url: str, doc: dict) -> urllib.request.Request:
    """The POST for one URL, in its service's format."""
    kind, _, target = url.partition(":")
    title = f"mnist-cloud {doc['host']}: {TITLES.get(doc['event'], doc['event'])}"
    if kind == "ntfy":
        return urllib.request.Request(target, data=doc["text"].encode(), method="POST",
                                      headers={"Title": title, "Content-Type": "text/plain; charset=utf-8"})
    if kind == "slack":
        body = {"text": f"*{title}*\n{doc['text']}"}
    elif kind == "discord":
        body = {"content": f"**{title}**\n{doc['text']}"}
    else:
        target, body = url, doc
    return urllib.request.Request(target, data=json.dumps(body).encode(), method="POST",
                                  headers={"Content-Type": "application/json"})


def deliver(urls: list[str], doc: dict, cap_s: float = CAP_S) -> dict[str, str]:
    """POST to each URL at once (one that hangs holds up no other). {shown URL: "ok" | the last error}."""
    deadline, said = time.monotonic() + cap_s, {}
    threads = [threading.Thread(target=post, args=(url, doc, deadline, said), daemon=True) for url in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return {shown(url): said.get(url, "gave up") for url in urls}


def post(url: str, doc: dict, deadline: float, said: dict) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for attempt in range(ATTEMPTS):
        left = deadline - time.monotonic()
        if left <= 0.1:
            return
        try:
            with opener.open(request(url, doc), timeout=min(left, 10.0)) as response:
                response.read(1 << 16)
            said[url] = "ok"
            return
        except Exception as e:  # whatever goes wrong, the run carries on
            said[url] = type(e).__name__ + (f" {e.code}" if hasattr(e, "code") else "")
        time.sleep(max(0.0, min(BACKOFF_S * 2 ** attempt, deadline - time.monotonic())))


def urls() -> list[str]:
    found = []
    for pattern in URL_FILES:
        for path in sorted(glob.glob(pattern)):
            try:
                found += json.loads(Path(path).read_text()).get("urls", [])
            except (OSError, ValueError, AttributeError):
                continue
    return list(dict.fromkeys(u for u in found if isinstance(u, str) and u))


def send(event: str, text: str, wait: bool = False, **fields) -> int:
    """POST the event to every URL; unless `wait`, from a detached grandchild."""
    targets = urls()
    if not targets:
        return 0
    doc = {"event": event, "text": text, "host": socket.gethostname(), "at": time.time(), **fields}
    if not wait:
        if os.fork():  # the caller (a job's wrapper, the watchdog) goes on at once
            return 0
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
    said = deliver(targets, doc)
    print(f"mnist-cloud notify: {event}: {json.dumps(said)}", flush=True)
    if not wait:
        os._exit(0)
    return 0


def run_ended(run_id: str, exit_code: str, files: dict) -> tuple[str, str, dict] | None:
    """(event, text, fields) for a run's end; None for one interrupted or stopped (a spot notice, the budget: each
    says so itself). `files`: the run dir's file names, as the laptop wrote them into jobs/notify.json."""
    run = Path("runs") / run_id
    try:
        status = json.loads((run / files["config"]).read_text()).get("status")
    except (OSError, ValueError, AttributeError, KeyError):
        status = None
    if status in ("interrupted", "stopped") or (exit_code == "0" and not run.is_dir()):  # a cluster's other node
        return None
    try:
        result = json.loads((run / files["result"]).read_text())
    except (OSError, ValueError, KeyError):
        result = None
    if status == "completed" and isinstance(result, dict) and exit_code == "0":
        fields = {"run_id": run_id, "test_acc": result.get("test_acc"), "weights": result.get("weights")}
        acc = result.get("test_acc")
        text = (f"{run_id} finished: test accuracy {acc:.2f}%" if isinstance(acc, (int, float)) else
                f"{run_id} finished") + f" ({result.get('weights')} weights)"
        cost = run_cost(run, files)
        if cost is not None:
            fields["cost_usd"] = cost
            text += f", cost ${cost:.3f}"
        return "finished", text, fields
    try:
        lines = [l for l in Path(f"jobs/{run_id}.log").read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        lines = []
    last = lines[-1].strip()[:300] if lines else "(no log)"
    return "failed", f"{run_id} failed (exit {exit_code}): {last}", {"run_id": run_id, "exit": exit_code}


def run_cost(run: Path, files: dict) -> float | None:
    """Price times training time, as the report counts it; None without a price."""
    try:
        price = (json.loads((run / files["config"]).read_text()).get("cloud") or {}).get("price_per_hour")
        rows = (run / files["metrics"]).read_text().splitlines()
        return None if price is None else float(price) * float(json.loads(rows[-1])["elapsed"]) / 3600
    except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError):
        return None


def main(argv: list[str]) -> int:
    if argv[:1] == ["send"] and len(argv) >= 3:
        return send(argv[1], argv[2], wait="--wait" in argv[3:])
    if argv[:1] == ["run-ended"] and len(argv) == 3:
        try:
            files = json.loads(Path("jobs/notify.json").read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return 0  # no URLs from `train --on` here
        ended = run_ended(argv[1], argv[2], files)
        return send(ended[0], ended[1], **ended[2]) if ended else 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
