"""Step time (forward + backward) of a GPT built from ps's tensor-parallel layers: TP=1 against
TP=2, measured in the same run (gloo on CPU; NCCL on CUDA when 2 GPUs are present).

    python benchmarks/tp_step.py [--dim 256 --layers 4 --heads 8 --seq 64 --batch 16 --steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ps.models.gpt import GPT
from ps.tp.groups import TPGroup, destroy, free_port, init_group
from ps.tp.layers import partition_dims, shard_state


def measure(tp: TPGroup, args, device: torch.device, out) -> None:
    torch.manual_seed(0)
    full = GPT(vocab=args.vocab, seq_len=args.seq, dim=args.dim, layers=args.layers, heads=args.heads)
    model = GPT(vocab=args.vocab, seq_len=args.seq, dim=args.dim, layers=args.layers, heads=args.heads, tp=tp)
    model.load_state_dict(shard_state(full.state_dict(), partition_dims(full), tp.rank, tp.size))
    model.to(device)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    times = []
    for i in range(args.steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.zero_grad()
        model.loss(model(x), x).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
    if tp.rank == 0:
        out.put(statistics.median(times))


def _rank(rank, size, port, args, out):
    cuda = torch.cuda.device_count() >= size and torch.cuda.is_available()
    tp = init_group(rank, size, f"tcp://127.0.0.1:{port}", backend="nccl" if cuda else "gloo")
    try:
        measure(tp, args, torch.device("cuda", rank) if cuda else torch.device("cpu"), out)
    finally:
        destroy(tp)


def run(size: int, args) -> float:
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    torch.multiprocessing.start_processes(_rank, args=(size, port, args, out), nprocs=size, start_method="spawn")
    return out.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    for name, default in (("vocab", 512), ("seq", 64), ("dim", 256), ("layers", 4), ("heads", 8), ("batch", 16),
                          ("steps", 20)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    one, two = run(1, args), run(2, args)
    where = "CUDA/NCCL" if torch.cuda.device_count() >= 2 else "CPU/gloo"
    print(f"gpt dim {args.dim}, {args.layers} layers, {args.heads} heads, seq {args.seq}, batch {args.batch} ({where})")
    print(f"TP=1 step p50 {one * 1e3:.1f} ms; TP=2 step p50 {two * 1e3:.1f} ms; TP=2 / TP=1 = {two / one:.2f}")


if __name__ == "__main__":
    main()
