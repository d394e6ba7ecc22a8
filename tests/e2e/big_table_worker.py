"""A worker process that fills a server-held table of `total` rows x 16 dims, a batch of ids at a
time, then checks a sample of rows; prints its peak resident memory (used by test_big_table).
The peak is VmHWM, this process's own: getrusage's maxrss survives exec on Linux, so it would
report the forking parent's size when that is larger."""

import json
import sys

import torch

from ps.config import OptimizerConfig
from ps.tables import TableSpec
from ps.worker.client import PSClient


def main(addresses: str, total: int, batch: int, transport: str) -> None:
    with PSClient(addresses.split(","), "big", transport=transport) as c:
        c.setup({"b": torch.zeros(2)}, OptimizerConfig("sgd", lr=1.0, momentum=0.0))
        c.init_tables([TableSpec("big", 16, init="zeros", lr=1.0)])
        grads = torch.ones(batch, 16)
        for clock, start in enumerate(range(0, total, batch)):
            ids = torch.arange(start, min(total, start + batch))
            c.push_rows(clock, {"big": (ids, grads[:len(ids)])})
        probe = torch.arange(0, total, 997)
        rows = c.pull_rows(None, {"big": probe})["big"]
        stats = c.stats()
    print(json.dumps({"rows": sum(s["tables"]["big"]["rows"] for s in stats),
                      "per_shard": [s["tables"]["big"]["rows"] for s in stats],
                      "probe_ok": bool(torch.equal(rows, -torch.ones(len(probe), 16))),
                      "maxrss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
