"""Training throughput: samples per second of a sync-mode run (2 workers, 2 servers) against
torch DistributedDataParallel over gloo (2 processes) on the same model, data, batches and
optimizer, measured in the same run. Both are timed the same way, from worker 0's own step
log: from the end of the first step (its pull and warm-up left out) to the end of the last.
Neither run evaluates anything while it trains (no observer samples for ps, no rank-0
evaluations for DDP: `CompareConfig.curves` off), and start-up and process exit are outside
the window for both.

    python benchmarks/train.py [--model mlp --data digits --epochs 10]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile

from ps.compare.runner import run
from ps.compare.spec import CompareConfig, RunSpec


def step_time(log_dir: str) -> tuple[int, int, float]:
    """(steps run, steps timed, seconds) from worker 0's step log: every step but the first
    (its pull and warm-up), each from the end of the one before."""
    with open(os.path.join(log_dir, "worker-0.jsonl"), encoding="utf-8") as f:
        records = [r for r in map(json.loads, f) if "step" in r and not r.get("final")]
    assert not any("test_accuracy" in r for r in records), "the benchmark runs evaluate nothing while they train"
    return len(records), len(records) - 1, records[-1]["time"] - records[0]["time"]


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
                            curves=False, out=out)
        rates = {}
        for spec in cfg.runs:
            result = run(spec, cfg, io.StringIO(), lambda point: None)
            assert result.error is None, result.error
            steps, timed, seconds = step_time(os.path.join(out, "logs", spec.label))
            assert steps == result.updates, (steps, result.updates)
            rates[spec.label] = timed * cfg.workers * cfg.batch_size / seconds
            print(f"{spec.label:10} {steps} steps, {timed} timed in {seconds:.2f}s: {rates[spec.label]:8.0f} "
                  f"samples/s (start to exit: {result.train_time:.2f}s)")
    print(f"{args.model} on {args.data}, 2 workers x batch {args.batch_size}: "
          f"ps sync / DDP = {rates['sync'] / rates['allreduce']:.2f}")


if __name__ == "__main__":
    main()
