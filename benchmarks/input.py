"""Input batching: the sample-by-sample stack that `batches` did before it became the in-process
`loader`, against `loader` with 0 and with worker processes, on the built-in datasets (batches of
64 over one worker's shard) and on a map-style dataset whose __getitem__ costs time. Prints
microseconds per batch (median of rounds, after warm-up) and, for workers, the seconds until the
first batch (process start).

    python benchmarks/input.py [--batch 64] [--steps 200] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import Dataset

from ps.data import EpochBatches, digits, loader, shard_indices, synthetic


def sample_by_sample(dataset, indices, batch_size, seed):
    """The batching of ps.data.batches before `loader` (the same order): a Python stack of samples."""
    for take in EpochBatches(indices, batch_size, seed):
        xs, ys = zip(*(dataset[i] for i in take))
        yield torch.stack(xs), torch.stack([torch.as_tensor(t) for t in ys])


class Costly(Dataset):
    """4096 samples of 3x32x32 whose __getitem__ does some work (a stand-in for decoding)."""

    def __len__(self):
        return 4096

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(i)
        img = torch.rand(3, 32, 32, generator=gen)
        for _ in range(20):
            img = (img * 1.0001).clamp_(0, 1)
        return img, i % 10


def per_batch(stream, steps: int, rounds: int = 5) -> float:
    for _ in range(5):
        next(stream)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            next(stream)
        times.append((time.perf_counter() - t) / steps)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    cases = [("digits", digits().train), ("synthetic", synthetic().train), ("costly", Costly())]
    print(f"torch threads {torch.get_num_threads()}; batch {args.batch}; rank 0 of 2 workers' shards")
    print(f"{'data':10} {'sample-by-sample':>17} {'loader 0':>9} {f'loader {args.workers}w':>10} "
          f"{'1st batch s':>12}  (us per batch)")
    for name, data in cases:
        idx = shard_indices(len(data), 0, 2)
        steps = args.steps if name != "costly" else max(10, args.steps // 10)
        old = per_batch(sample_by_sample(data, idx, args.batch, 0), steps)
        new = per_batch(loader(data, idx, args.batch, 0), steps)
        t = time.perf_counter()
        stream = loader(data, idx, args.batch, 0, workers=args.workers)
        next(stream)
        start = time.perf_counter() - t
        par = per_batch(stream, steps)
        del stream
        print(f"{name:10} {old * 1e6:17.0f} {new * 1e6:9.0f} {par * 1e6:10.0f} {start:12.2f}")


if __name__ == "__main__":
    main()
