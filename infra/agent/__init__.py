"""What mnist-cloud runs on the instance itself, shipped inside the package (so a wheel install has it):

- autostop.py: the idle watchdog and the record of pulls, installed as /usr/local/bin/mnist-cloud-autostop
  and run every minute by mnist-cloud-autostop.timer (or cron);
- resume_agent.py: continues spot-interrupted runs at boot (mnist-cloud-resume.service, or cron @reboot);
  the runs it starts must outlive that oneshot service, so stopping the unit ends only the agent
  (KillMode=process);
- spot_watch.py: started beside a trainer on a spot instance, as jobs/spot_watch.py in the work dir.

Each agent is one file of standard-library Python 3: it runs with the instance's system python3, before
anything is installed there. install-autostop.sh and install-resume.sh are the bash installers, with
@@{name} holes that infra/watchdog.py fills (string.Template) before it runs them as user data or over
SSH; this module only reads the files.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def source(name: str) -> str:
    """The text of an agent or unit file in this package, e.g. source("autostop.py")."""
    return files(__name__).joinpath(name).read_text()


def source_path(name: str) -> Path:
    """A file of this package on disk (installed packages are plain directories), e.g. to sync it."""
    return Path(str(files(__name__).joinpath(name)))
