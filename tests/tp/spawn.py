"""Run a function on every rank of a real torch.distributed group (spawned processes)."""

import torch

from ps.tp.groups import destroy, free_port, init_group


def _entry(rank, fn, size, port, backend, args):
    tp = init_group(rank, size, f"tcp://127.0.0.1:{port}", backend=backend)
    try:
        fn(tp, *args)
    finally:
        destroy(tp)


def run_group(fn, size=2, backend="gloo", args=()):
    """fn(tp, *args) on `size` ranks; an exception on any rank fails the caller."""
    port = free_port()
    torch.multiprocessing.start_processes(_entry, args=(fn, size, port, backend, args), nprocs=size,
                                          start_method="spawn")
