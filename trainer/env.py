"""Where a run ran, as its config.json records it: torch, Python, the device as configured, the process
group, the host and the cloud machine."""

from __future__ import annotations

import platform
import socket
from typing import Any

import torch

import runspec
from trainer.device import device_name
from trainer.distributed import Dist


def environment(device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool,
                dist: Dist) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": {"type": device.type, "name": device_name(device), "amp": str(amp_dtype).replace("torch.", "")
                   if amp_dtype else None, "channels_last": channels_last},
        "distributed": {"world_size": dist.world, "backend": dist.backend(device)} if dist.active else None,
        "host": socket.gethostname(),
        "cloud": runspec.cloud_info(),
    }
