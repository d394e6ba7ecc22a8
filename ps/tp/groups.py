"""A tensor-parallel group: which rank this process is, how many there are, and the process group.

Groups are passed explicitly to every layer (no module-global state). A group of one needs no
torch.distributed at all.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ps.errors import InvalidArgument


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup; None for a group of one
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise InvalidArgument(f"tp rank ({self.rank}) must be in [0, size={self.size})")

    def generator(self, device: torch.device) -> torch.Generator:
        """An RNG stream of this rank's own (dropout inside the parallel region must differ)."""
        return torch.Generator(device=device).manual_seed(self.seed * 1009 + self.rank)


GROUP_TIMEOUT = 120.0  # seconds a collective waits for the group's other ranks, at least


def group_timeout(retry_timeout: float) -> float:
    """How long a collective waits for a peer: longer than a rank may spend retrying a server
    that restarts (`retry_timeout`), so a group rides out what its workers ride out."""
    return max(GROUP_TIMEOUT, retry_timeout + 60.0)


def init_group(rank: int, size: int, init_method: str, backend: str | None = None, seed: int = 0,
               timeout: float = GROUP_TIMEOUT) -> TPGroup:
    """Join (rendezvous) a group of `size` processes; NCCL when CUDA is present, else gloo. With
    NCCL a rank uses GPU LOCAL_RANK (else its rank) mod the device count."""
    if size == 1:
        return TPGroup(0, 1, None, seed)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout))
    return TPGroup(rank, size, dist.group.WORLD, seed)


def from_torchrun(seed: int = 0, backend: str | None = None, timeout: float = GROUP_TIMEOUT) -> TPGroup:
    """Join the group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return init_group(rank, size, "env://", backend, seed, timeout)


def destroy(tp: TPGroup) -> None:
    if tp.group is not None and dist.is_initialized():
        dist.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on `host`, for a rendezvous (rank 0 binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
