"""Devices, and process-group helpers for training under `torchrun --nproc_per_node N`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every process it starts. Without them (a plain
`duodiff train`) everything here is a no-op for a single process, so the training loop reads the
same either way. CPU uses the gloo backend, CUDA uses nccl with one GPU per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def default_device() -> str:
    """The device every `duodiff` command uses when --device is not given."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files and shows the progress bar."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> DistInfo:
    """What torchrun asked for (a single process when its variables are absent)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def setup(info: DistInfo, device_type: str) -> torch.device:
    """Join the process group (if there is one) and return this process's device."""
    if device_type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if info.enabled and not dist.is_initialized():
        # MASTER_ADDR / MASTER_PORT come from torchrun through the environment.
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", init_method="env://")
    return device


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (identity for a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

