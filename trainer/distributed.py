"""Data parallelism across processes (torchrun): one rank per device, DDP over the trainable parameters.

Every rank builds the same model and the same step plan; each optimizer step's sequences are dealt
round-robin to the ranks, which cut their share into micro-batches of batch_size. The loss of each
micro-batch is divided by the target tokens of the whole step on all ranks (an all_reduce), so the
summed gradient equals a single-process step over the same global batch. Only rank 0 writes; a
checkpoint gathers every rank's random states to it (trainer.resume).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float | int | torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The sum over ranks of a number (returned as a tensor on this rank's device)."""
        t = torch.as_tensor(value, dtype=dtype, device=self.device).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` (picklable), indexed by rank, on rank 0; None on the other ranks. Collective."""
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        dist.barrier()


def from_environment(device_name: str) -> DataParallel | None:
    """Join the torchrun job described by the environment (NCCL on CUDA, gloo on CPU); None when alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DataParallel(rank, world, device)


def shutdown(dp: DataParallel | None) -> None:
    """Leave the process group (no-op when alone)."""
    if dp is not None and dist.is_initialized():
        dist.destroy_process_group()


def shard_step(step: list[list[int]], rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """This rank's micro-batches of one optimizer step: every world_size-th sequence, cut into batch_size."""
    mine = [i for micro in step for i in micro][rank::world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def wrap(model: nn.Module, dp: DataParallel) -> nn.Module:
    """DDP over the trainable parameters; frozen weights are identical on every rank already (same seed).

    static_graph stays off: with offloaded checkpointing (gradients made in a nested backward) it
    left gradients unreduced in the gloo test, while the dynamic default matches one process."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [dp.device.index] if dp.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
