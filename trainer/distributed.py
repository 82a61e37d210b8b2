"""PyTorch's own distributed engine, as `torchrun` sets it up: RANK, LOCAL_RANK, WORLD_SIZE.

`python -m trainer train` runs unchanged under `torchrun --nproc_per_node N` (and `--nnodes K`):
NCCL on CUDA, gloo on CPU. Every rank holds the whole dataset on its device, draws the same epoch
permutation and trains on its own slice of each global batch; DistributedDataParallel averages the
gradients, and on GPUs SyncBatchNorm computes batch statistics over the global batch, so N ranks with
global batch B take the same steps as one process with batch B. Only rank 0 writes the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   world=world)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local rank."""
        if self.active and device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    @staticmethod
    def backend(device: torch.device) -> str:
        """NCCL between GPUs, gloo between CPUs (config.json records which)."""
        return "nccl" if device.type == "cuda" else "gloo"

    def init(self, device: torch.device) -> None:
        if self.active and not dist.is_initialized():
            # torch._dynamo first (DDP imports it; --compile too): imported once the group exists, it keeps a
            # reference to it (torch 2.14), destroy_process_group() then frees nothing, and gloo's threads
            # and sockets live on into the interpreter's exit, where a peer's closing socket wakes them while
            # the process is torn down under them: "terminate called without an active exception" at the
            # very end of a two-node run. Imported before, the group is gone when shutdown() returns.
            import torch._dynamo  # noqa: F401

            if device.type == "cuda":  # binds this rank's GPU: NCCL never guesses, barrier() needs no device
                dist.init_process_group(backend=self.backend(device), device_id=device)
            else:
                dist.init_process_group(backend=self.backend(device))

    def shutdown(self) -> None:
        """The group torn down now, while Python is whole: gloo joins its threads and closes its sockets
        here (see init), so none of them is left running while the process exits."""
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """SyncBatchNorm (batch statistics over the global batch) and DDP; a no-op for one process."""
        if not self.active:
            return model
        # SyncBatchNorm where it matters and where it runs: across GPUs, whose per-GPU batches are small.
        # (PyTorch implements it for GPUs only; on CPU/gloo each rank normalizes over its own slice.)
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            # SyncBatchNorm keeps the running statistics equal on every rank: broadcasting rank 0's
            # buffers before every forward would be one more collective per step for nothing
            return nn.parallel.DistributedDataParallel(model, device_ids=[device.index], broadcast_buffers=False)
        return nn.parallel.DistributedDataParallel(model)

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.active:
            return values
        # float32 (MPS and some backends have no float64); counts stay exact below 2**24 images
        t = torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [type(v)(round(s)) if isinstance(v, int) else s for v, s in zip(values, t.tolist())]

    def any(self, flag: bool, device: torch.device) -> bool:
        """True if any rank says so: every rank then stops at the same step (else DDP would hang)."""
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj: Any, device: torch.device) -> Any:
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        return box[0]

    def gather(self, obj: Any, device: torch.device) -> list[Any] | None:
        """Every rank's obj on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()
