"""Training throughput: samples per second of a sync-mode run (2 workers, 2 servers) against
torch DistributedDataParallel over gloo (2 processes) on the same model, data, batches and
optimizer, measured in the same run.

    python benchmarks/train.py [--model mlp --data digits --epochs 10]
"""

from __future__ import annotations

import argparse
import io
import tempfile

from ps.compare.runner import run
from ps.compare.spec import CompareConfig, RunSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="mlp")
    p.add_argument("--data", default="digits")
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = CompareConfig(runs=(RunSpec("sync", "sync"), RunSpec("allreduce", "allreduce")), workers=2, servers=2,
                            model=args.model, data=args.data, epochs=args.epochs, batch_size=args.batch_size,
                            eval_interval=5.0, out=out)
        rates = {}
        for spec in cfg.runs:
            result = run(spec, cfg, io.StringIO(), lambda point: None)
            assert result.error is None, result.error
            rates[spec.label] = result.updates * cfg.workers * cfg.batch_size / result.train_time
            print(f"{spec.label:10} {result.updates} steps in {result.train_time:.2f}s: "
                  f"{rates[spec.label]:8.0f} samples/s")
    print(f"{args.model} on {args.data}, 2 workers x batch {args.batch_size}: "
          f"ps sync / DDP = {rates['sync'] / rates['allreduce']:.2f}")


if __name__ == "__main__":
    main()
