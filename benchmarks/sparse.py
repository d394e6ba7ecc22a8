"""Server-held embedding tables: rows per second pulled and pushed for batches of 4k-64k distinct
ids, against a local torch.nn.Embedding lookup of the same rows, measured in the same run; and
the bytes a step moves against a dense push and pull of the whole table; and what eviction
costs a server's update (in this process, on one shard's table: no servers).

One worker process (this one), 2 server shards on this host (async mode: nothing waits for
other workers), a table of `--rows` rows of `--dim` floats filled first; then per batch size,
`--repeat` batches of distinct ids drawn Zipf-like from the table's ids, each pulled, then its
gradients pushed (sgd). Times are medians over the batches.

    python benchmarks/sparse.py [--rows 1000000 --dim 16 --repeat 20 --transport auto --evict-rows 2000000]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch

from ps.cli.launch import start_servers, stop_all
from ps.config import OptimizerConfig
from ps.tables import TableSpec
from ps.worker.client import PSClient

SIZES = (4096, 16384, 65536)


def zipf_ids(rng: np.random.Generator, rows: int, unique: int) -> torch.Tensor:
    """`unique` distinct ids in [0, rows), the low ones far more likely (a Zipf-like draw)."""
    out: set[int] = set()
    while len(out) < unique:
        draw = (rows * rng.random(2 * unique) ** 3).astype(np.int64)
        out.update(draw.tolist())
    return torch.tensor(sorted(out)[:unique])


def eviction_cost(rows: int, dim: int, batch: int = 4096, updates: int = 30) -> None:
    """ms per update of `batch` rows (half of them new) on one shard's table of `rows` rows:
    without eviction, at a max_rows cap (every update evicts), and with idle eviction."""
    from ps.server.table import Table

    rng = np.random.default_rng(1)
    print(f"eviction: one shard's table of {rows:,} rows x {dim}, updates of {batch} rows (half new)")
    for label, extra in (("no eviction", {}), ("at max_rows", {"max_rows": rows}), ("evict_after 50", {"evict_after": 50})):
        table = Table(TableSpec("t", dim, **extra))
        for v, start in enumerate(range(0, rows, 65536), start=1):  # filled first
            ids = np.arange(start, min(rows, start + 65536), dtype=np.int64)
            table.apply(v, ids, torch.zeros(len(ids), dim), np.ones(len(ids), np.int64))
        version, fresh, times = v, rows, []
        for _ in range(updates):
            old = rng.choice(rows, batch // 2, replace=False).astype(np.int64)
            new = np.arange(fresh, fresh + batch // 2, dtype=np.int64)
            fresh += batch // 2
            ids = np.unique(np.concatenate([old, new]))
            version += 1
            t = time.perf_counter()
            table.apply(version, ids, torch.ones(len(ids), dim), np.ones(len(ids), np.int64))
            times.append(time.perf_counter() - t)
        print(f"  {label:15} {1000 * statistics.median(times):6.2f} ms per update, {table.rows:,} rows held, "
              f"evicted {table.stats()['evicted_lru'] + table.stats()['evicted_idle']:,}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--transport", default="auto")
    p.add_argument("--evict-rows", type=int, default=2_000_000, help="table size for the eviction cost (0: skip)")
    args = p.parse_args()
    spec = TableSpec("t", args.dim, lr=0.01)
    rng = np.random.default_rng(0)
    procs = start_servers(2, "async", 1, out=io.StringIO())
    try:
        with PSClient([pr.address for pr in procs], "bench", transport=args.transport) as c:
            c.setup({"b": torch.zeros(2)}, OptimizerConfig("sgd", lr=0.1, momentum=0.0))
            c.init_tables([spec])
            clock = 0
            t0 = time.perf_counter()
            for start in range(0, args.rows, 65536):  # every row exists on the servers
                ids = torch.arange(start, min(args.rows, start + 65536))
                c.push_rows(clock, {"t": (ids, torch.zeros(len(ids), args.dim))})
                clock += 1
            fill = time.perf_counter() - t0
            print(f"table: {args.rows} rows x {args.dim} dims on 2 shards ({c.paths()[0]} path), filled in "
                  f"{fill:.1f}s ({args.rows / fill:,.0f} rows/s)")
            local = torch.nn.Embedding(args.rows, args.dim)
            print(f"{'ids/batch':>9} {'pull rows/s':>12} {'push rows/s':>12} {'local rows/s':>13} "
                  f"{'pull/local':>10} {'bytes/step':>11} {'dense/sparse':>12}")
            for size in SIZES:
                pulls, pushes, locals_ = [], [], []
                for _ in range(args.repeat):
                    ids = zipf_ids(rng, args.rows, size)
                    t = time.perf_counter()
                    rows = c.pull_rows(clock, {"t": ids})["t"]
                    pulls.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    c.push_rows(clock, {"t": (ids, torch.ones_like(rows))})
                    pushes.append(time.perf_counter() - t)
                    clock += 1
                    t = time.perf_counter()
                    with torch.no_grad():
                        local(ids)
                    locals_.append(time.perf_counter() - t)
                pull, push, loc = (statistics.median(x) for x in (pulls, pushes, locals_))
                sparse_bytes = 2 * size * (8 + 4 * args.dim)  # ids and rows, each way
                dense_bytes = 2 * args.rows * 4 * args.dim    # the whole table, each way
                print(f"{size:>9} {size / pull:>12,.0f} {size / push:>12,.0f} {size / loc:>13,.0f} "
                      f"{loc / pull:>10.3f} {sparse_bytes:>11,} {dense_bytes / sparse_bytes:>12,.0f}")
    finally:
        stop_all(procs)
    if args.evict_rows:
        eviction_cost(args.evict_rows, args.dim)


if __name__ == "__main__":
    main()
