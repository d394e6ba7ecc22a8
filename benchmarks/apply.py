"""Server-side update bandwidth: sgd, momentum and adam applied by a shard's store to 100 MiB of
fp32 parameters (in 4 MiB slices, as the servers hold them), against memcpy of the same bytes,
measured in the same run. Bandwidth counts parameter bytes updated per second.

    python benchmarks/apply.py [--mib 100] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ps.config import OptimizerConfig
from ps.server.store import ParamStore

SLICE = 1 << 20  # fp32 elements: 4 MiB


def timed(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mib", type=int, default=100)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    n_slices = args.mib // 4
    nbytes = n_slices * SLICE * 4
    grads = {f"w#{i}": torch.randn(SLICE) for i in range(n_slices)}
    src, dst = torch.randn(n_slices * SLICE), torch.empty(n_slices * SLICE)
    memcpy = timed(lambda: dst.copy_(src), args.rounds)
    print(f"torch threads {torch.get_num_threads()}; {args.mib} MiB of fp32 parameters in 4 MiB slices")
    print(f"{'':10} {'ms':>8} {'GB/s':>7} {'/ memcpy':>9}")
    print(f"{'memcpy':10} {memcpy * 1e3:8.1f} {nbytes / memcpy / 1e9:7.2f} {1.0:9.2f}")
    for name in ("sgd", "momentum", "adam"):
        store = ParamStore()
        store.init({k: torch.zeros(SLICE) for k in grads}, OptimizerConfig(name, lr=1e-3))
        t = timed(lambda: store.apply(grads), args.rounds)
        print(f"{name:10} {t * 1e3:8.1f} {nbytes / t / 1e9:7.2f} {memcpy / t:9.2f}")
    store = ParamStore()
    store.init({k: torch.zeros(SLICE) for k in grads}, OptimizerConfig("sgd", lr=1e-3))
    t = timed(lambda: store.validate(list(grads.items())), args.rounds)
    print(f"{'validate':10} {t * 1e3:8.1f} {nbytes / t / 1e9:7.2f} {memcpy / t:9.2f}   (shape and finiteness checks of a push)")
    print("goal: sgd at least 0.5 of memcpy")


if __name__ == "__main__":
    main()
