"""Install the autostop watchdog (infra/agent/autostop.py), and the agent that resumes spot-interrupted
runs at boot (infra/agent/resume_agent.py), on a machine: as cloud-init user data at launch, or over SSH
with `mnist-cloud autostop`. Same bash installer both ways; idempotent. The agents and their systemd
units are files of the package (infra/agent/), so an installed mnist-cloud has them without a checkout."""

from __future__ import annotations

import gzip
import io
import json
import posixpath
from dataclasses import asdict, dataclass, field, replace
from string import Template

from infra.agent import source

AUTOSTOP_UNITS = ("mnist-cloud-autostop.service", "mnist-cloud-autostop.timer")
RESUME_UNIT = "mnist-cloud-resume.service"


@dataclass
class AutostopConfig:
    idle_minutes: float = 30
    action: str = "stop"  # "stop" or "terminate": what the user wants on autostop
    after_train: bool = False
    enabled: bool = True
    grace_minutes: float = 3  # after_train: wait this long after a run ends (3 at least), time to pull it
    # What EC2 does on the instance's own shutdown, as mnist-cloud last set it (None: the action).
    # The laptop keeps it at "stop" while runs are unpulled; the watchdog cannot change it itself.
    shutdown_behavior: str | None = None
    # Work dirs whose runs/ must be pulled before a terminate (globs; default: every name's, see
    # infra/agent/autostop.py DEFAULT_WORK_DIRS)
    work_dirs: list[str] = field(default_factory=list)
    # The machine's budget in USD since launch, compute only (None: none), and what an hour of it costs, as the
    # laptop last priced it (the instance cannot ask AWS): the watchdog stops the machine at the budget.
    budget_usd: float | None = None
    usd_per_hour: float | None = None
    price_source: str = ""

    @property
    def tag(self) -> str:
        if not self.enabled:
            return "off"
        parts = [f"{self.idle_minutes:g}m" if self.idle_minutes else "", "after-train" if self.after_train else ""]
        return "+".join(p for p in parts if p) + f":{self.action}"


def write_script(dest: str, text: str) -> str:
    """Bash lines that write `text` to `dest` (mode 755), as it is: a quoted here-document. EC2 takes at most 16 KB
    of user data; user_data() gzips the installer whole, and plain text packs better there than base64."""
    assert "\nMNIST_CLOUD_SCRIPT\n" not in text and text.endswith("\n")
    return f"""cat > "{dest}" <<'MNIST_CLOUD_SCRIPT'
{text}MNIST_CLOUD_SCRIPT
chmod 755 "{dest}"
"""


class Installer(Template):
    """The installers are bash files of the package (infra/agent/install-*.sh) with @@{name} holes:
    bash's own $ and ${...} stay as they are."""

    delimiter = "@@"


def render(name: str, **holes: str) -> str:
    return Installer(source(name)).substitute(holes)


def installer(config: AutostopConfig, notify: list[str] = ()) -> str:
    """A bash script that installs the watchdog, its config and a systemd timer (cron without systemd), and the
    notifier (infra/agent/notify.py) that the agents call; with `notify`, its URLs (mode 600: they are secrets).

    $MNIST_CLOUD_ROOT relocates every file (the tests install into a temp dir)."""
    units = "".join(f"cat > \"$ROOT/etc/systemd/system/{name}\" <<'MNIST_CLOUD_UNIT'\n{source(name)}MNIST_CLOUD_UNIT\n"
                    for name in AUTOSTOP_UNITS)
    notifier = write_script("$ROOT/usr/local/bin/mnist-cloud-notify", source("notify.py"))
    if notify:  # the umask makes it 600 before a byte is in it
        notifier += (f"(umask 077; cat > \"$ROOT/etc/mnist-cloud/notify.json\") <<'MNIST_CLOUD_CONFIG'\n"
                     f"{json.dumps({'urls': list(notify)})}\nMNIST_CLOUD_CONFIG\n")
    return render("install-autostop.sh", autostop_script=write_script("$ROOT/usr/local/bin/mnist-cloud-autostop",
                                                                      source("autostop.py")) + notifier,
                  config=json.dumps(asdict(config)), units=units, tag=config.tag, resume_agent=resume_agent_installer())


USER_DATA_LIMIT = 16 * 1024  # bytes EC2 takes, before base64


def user_data(config: AutostopConfig, notify: list[str] = ()) -> bytes:
    """The installer as launch user data: gzipped whole (cloud-init unpacks gzip itself), since the plain
    script is about EC2's limit. boto3 base64-encodes bytes as it does text."""
    return gzip.compress(installer(config, notify).encode(), mtime=0)


def resume_agent_installer() -> str:
    """Bash lines that install the resume agent and run it at every boot: a systemd unit, or a cron
    @reboot entry without systemd. Part of installer(); $ROOT as there."""
    return render("install-resume.sh", resume_script=write_script("$ROOT/usr/local/bin/mnist-cloud-resume",
                                                                  source("resume_agent.py")),
                  unit=RESUME_UNIT, unit_text=source(RESUME_UNIT))


def install_over_ssh(remote, config: AutostopConfig, root: str = "") -> str:
    """Upload and run the installer as root (sudo -n when not root). Returns its output line."""
    import shlex

    if not config.work_dirs:  # where this name's runs are; the watchdog looks at every name's too
        config = replace(config, work_dirs=[posixpath.join(remote.home(), remote.ep.workdir)])
    script = installer(config)
    # mktemp creates it (O_EXCL, mode 600, ours): no other user of a shared host can plant or swap
    # the script that root then runs, as they could with a predictable /tmp name
    path = remote.run("mktemp /tmp/mnist-cloud-autostop.XXXXXXXX").stdout.strip()
    remote.conn.put(io.BytesIO(script.encode()), path)  # into the file mktemp made: its mode stays 600
    env = f"MNIST_CLOUD_ROOT={shlex.quote(root)} " if root else ""
    sudo = "" if remote.run("id -u").stdout.strip() == "0" else "sudo -n "
    out = remote.run(f"{sudo}env {env}bash {path}; rc=$?; rm -f {path}; exit $rc", timeout=60)
    return out.stdout.strip()
