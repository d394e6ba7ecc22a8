"""Training throughput: samples per second of a sync-mode run (2 workers, 2 servers) against
torch DistributedDataParallel over gloo (2 processes) on the same model, data, batches and
optimizer, measured in the same run. Both are timed the same way, from the workers' own step
logs: from the moment every worker is ready (after setup and the start barrier) to the end of
the last step of the slowest worker; start-up and process exit are left out of both.

    python benchmarks/train.py [--model mlp --data digits --epochs 10]
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import tempfile

from ps.compare.runner import run
from ps.compare.spec import CompareConfig, RunSpec


def step_time(log_dir: str) -> tuple[int, float]:
    """(steps, seconds) of a run from its workers' step logs: the steps worker 0 logged, and
    the time of the slowest worker's last step (each worker's clock starts once all are ready)."""
    steps, seconds = 0, 0.0
    for path in glob.glob(os.path.join(log_dir, "*.jsonl")):
        records = [r for r in map(json.loads, open(path, encoding="utf-8")) if "step" in r and not r.get("final")]
        if records:
            seconds = max(seconds, records[-1]["time"])
            if path.endswith("worker-0.jsonl"):
                steps = len(records)
    return steps, seconds


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
            steps, seconds = step_time(os.path.join(out, "logs", spec.label))
            assert steps == result.updates, (steps, result.updates)
            rates[spec.label] = steps * cfg.workers * cfg.batch_size / seconds
            print(f"{spec.label:10} {steps} steps in {seconds:.2f}s: {rates[spec.label]:8.0f} samples/s "
                  f"(start to exit: {result.train_time:.2f}s)")
    print(f"{args.model} on {args.data}, 2 workers x batch {args.batch_size}: "
          f"ps sync / DDP = {rates['sync'] / rates['allreduce']:.2f}")


if __name__ == "__main__":
    main()
