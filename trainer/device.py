"""The three devices a run meets, a laptop's CPU, Apple's MPS and an EC2 GPU, and what differs on each.

Each decision is a small pure function of the device facts (its type, a CUDA capability), so a CPU
test can check the CUDA and MPS policy without the hardware:
- MPS has no float64: the trainer makes none (tests/test_devices.py runs it under a guard).
- A T4 (sm75) has no real bf16: `torch.cuda.is_bf16_supported()` says True through emulation, so
  bf16 is chosen only from sm80 (A10G, A100, L4, H100) and fp16 with a loss scaler below that.
- Random generators are device-typed: a CPU generator's state is 5,056 bytes, a CUDA one's 16, so a
  state saved on one device cannot be set on another. Checkpoints carry the device type, and a
  resume on another device re-seeds from (seed, epoch, step) instead: statistically the same run,
  not bit-for-bit (a different device draws different numbers from the same seed anyway).
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UserError


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch; use --device auto or cpu")
    if name == "mps" and not mps_available():
        raise UserError("--device mps: MPS is not available on this machine; use --device auto or cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def channels_last(setting: str, device_type: str) -> bool:
    """--channels-last: `auto` is on for CPU and CUDA, off for MPS."""
    return device_type in ("cpu", "cuda") if setting == "auto" else setting == "on"


def capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) CUDA compute capability, None off CUDA."""
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


# ---------------------------------------------------------------------------------- precision
def torch_version(text: str | None = None) -> tuple[int, int]:
    major, minor = (text or torch.__version__).split("+")[0].split(".")[:2]
    return int(major), int(minor)


def amp_dtype(device_type: str, amp: str, capability: tuple[int, int] | None = None,
              version: tuple[int, int] | None = None) -> torch.dtype | None:
    """The autocast dtype for `--amp` on this device, or None for plain fp32.

    `auto` is fp32 everywhere: these nets are launch-bound, not FLOP-bound, and autocast adds cast
    kernels to every step; AMP is on only when asked for, until scripts/gpu_bench.py shows it pays.
    `on` picks bf16 where the hardware has it (CUDA sm80+, CPU) and fp16 elsewhere (a T4 is sm75:
    its bf16 is emulated and slow, and Triton refuses it under --compile; MPS autocasts fp16)."""
    if amp != "on":
        return None
    if device_type == "cuda":
        return torch.bfloat16 if capability is not None and capability[0] >= 8 else torch.float16
    if device_type == "mps":
        version = version or torch_version()
        if version < (2, 8):  # MPS autocast came in 2.5, its loss scaler's kernels in 2.8
            raise UserError(f"--amp on for MPS needs torch 2.8 or newer (fp16 loss scaling); this is torch "
                            f"{version[0]}.{version[1]}: upgrade torch, or use --amp off")
        return torch.float16
    return torch.bfloat16


def solves_on_device(device_type: str, version: tuple[int, int] | None = None) -> bool:
    """Whether `torch.linalg.solve_ex` runs on this device. MPS has had it since torch 2.7 (pytorch#146531);
    before that it raises NotImplementedError (pytorch#148547), and --perspective solves its [n, 8, 8]
    systems on the CPU instead."""
    if device_type == "mps":
        return (version or torch_version()) >= (2, 7)
    return True


@dataclass(frozen=True)
class CudaVariant:
    """A way to run the default recipe on CUDA, as scripts/gpu_bench.py names and measures it."""

    name: str
    cuda_graph: bool
    amp: str  # "on" is bf16 here: a captured step cannot hold fp16's loss scaler
    batch_size: int = 128  # 128: the run's own batch; another only for a model whose recipe was validated at it
    min_capability: tuple[int, int] = (0, 0)


# The CUDA default, fastest first (docs/gpu.md). The rule, from scripts/gpu_check.sh on an H200
# (sm90, torch 2.11): the fastest variant that delivered >= 99.45% test accuracy on seeds 1-2 was run
# on seeds 3-5 too, and is the default wherever the GPU and the run allow it. graph-amp-b256 won
# (1.6 s of training warm, 3.1 s in a fresh process; test 99.44-99.52% over seeds 1-5, the 99.44 on
# seed 4). It needs bf16, so sm80+; below that the fastest fp32 variant that held on seeds 1-2 is
# `graph` at batch 128 (2.4 s warm). The eager variants took 21-31 s.
CUDA_VARIANTS = (
    CudaVariant("graph-amp-b256", cuda_graph=True, amp="on", batch_size=256, min_capability=(8, 0)),
    CudaVariant("graph", cuda_graph=True, amp="off"),
)


def cuda_default(capability: tuple[int, int], capturable: bool, batches: set[int]) -> CudaVariant | None:
    """The first variant of CUDA_VARIANTS that this run can take whole: the GPU has the capability, the
    run can be captured (SGD, a fixed schedule, one process, no --ema or --compile), and the variant's
    batch is one of `batches` (those the model's recipe was validated at, when --batch-size and --lr
    are not typed). None: the recipe runs as typed, eagerly."""
    if not capturable:
        return None
    return next((v for v in CUDA_VARIANTS if capability >= v.min_capability and v.batch_size in batches), None)


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """fp16 underflows small gradients without loss scaling; bf16 has fp32's range and needs none."""
    return dtype == torch.float16


def fused_optimizer(device_type: str) -> bool:
    """CUDA's fused SGD/Adam/AdamW: one kernel for all parameters, and with a GradScaler the
    unscale/inf check happens inside it, without the host sync of `scaler.step`'s `.item()`."""
    return device_type == "cuda"


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """cuDNN picks the fastest conv algorithms per shape (benchmark) unless --deterministic asks
    for repeatable ones. Under --deterministic the ops that have no deterministic CUDA kernel
    (adaptive_avg_pool2d's backward, for one) warn instead of failing."""
    if deterministic:
        # cuBLAS (torch < 2.10) reads this before its first handle: deterministic workspaces
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


# ---------------------------------------------------------------------------------- random state
def derived_seed(seed: int, epoch: int, step: int, stream: int) -> int:
    """A seed for one random stream at one point of a run, the same on every machine."""
    return (((seed * 1_000_003 + epoch) * 1_000_033 + step) * 101 + stream) % (2 ** 63)


def generator_state(gen: torch.Generator) -> dict[str, Any]:
    return {"device": gen.device.type, "state": gen.get_state().cpu()}


def accelerator_rng_state(device: torch.device) -> dict[str, Any] | None:
    """The default generator of the training device (dropout draws from it off the CPU)."""
    if device.type == "cuda":
        return {"device": "cuda", "state": torch.cuda.get_rng_state(device)}
    if device.type == "mps":
        return {"device": "mps", "state": torch.mps.get_rng_state()}
    return None


def _saved_device(saved: Any) -> str | None:
    """The device type of a saved state; None for the raw tensors of older checkpoints."""
    return saved.get("device") if isinstance(saved, dict) else None


def restore_generator(gen: torch.Generator, saved: Any, fallback_seed: int) -> bool:
    """Set `gen` to `saved` if it came from the same kind of device; else seed it with
    `fallback_seed`. True if the saved state was used."""
    state = saved.get("state") if isinstance(saved, dict) else saved
    device = _saved_device(saved)
    if state is not None and (device is None or device == gen.device.type):
        try:
            gen.set_state(state.cpu())
            return True
        except (RuntimeError, TypeError, ValueError):  # an older checkpoint's state from another device
            pass
    gen.manual_seed(fallback_seed)
    return False


def restore_accelerator_rng(device: torch.device, saved: Any, fallback_seed: int) -> bool:
    if device.type not in ("cuda", "mps"):
        return True  # the CPU's default generator is restored from the "torch" entry
    state = saved.get("state") if isinstance(saved, dict) else None
    if _saved_device(saved) == device.type and state is not None:
        try:
            if device.type == "cuda":
                torch.cuda.set_rng_state(state.cpu(), device)
            else:
                torch.mps.set_rng_state(state.cpu())
            return True
        except RuntimeError:
            pass
    if device.type == "cuda":
        torch.cuda.manual_seed(fallback_seed)
    else:
        torch.mps.manual_seed(fallback_seed)
    return False


def warn_reseeded(saved_on: str | None, device: torch.device, seed: int, epoch: int, step: int) -> None:
    where = f"on {saved_on}" if saved_on and saved_on != device.type else "on another device or process count"
    print(f"note: the checkpoint's random state was saved {where}; continuing on {device.type} with random "
          f"draws re-seeded from (seed {seed}, epoch {epoch}, step {step}): the same recipe, not bit-for-bit "
          "the same numbers", file=sys.stderr, flush=True)
