"""Overlap of communication with computation: step time of a training run with and without
pushing gradients during backward (`--push-early`) and prefetching the next step's weights
(`--prefetch`, async), each configuration on a fresh local cluster (2 workers, 2 servers), in
one run.

On loopback every byte moved costs CPU time on the same cores as the compute, so there is
little idle time to overlap. `--link 1gbit` puts each worker in its own network namespace behind
a veth pair shaped to that rate both ways (tc tbf), as a worker on its own machine with a
1 Gbit/s NIC would be: then the transfer is time the CPU could compute in. Needs root.

    python benchmarks/overlap.py [--link 1gbit] [--hidden 1024 --layers 3 --batch-size 256 --steps 30]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack

from torch import nn

DEFAULT_RUNS = "sync,sync+early,async,async+early,async+prefetch,async+prefetch+early"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wide_mlp(input_shape=(1, 8, 8), num_classes: int = 10) -> nn.Module:
    """An MLP with PS_BENCH_LAYERS hidden layers PS_BENCH_HIDDEN wide (set by this script)."""
    hidden = int(os.environ.get("PS_BENCH_HIDDEN", 1024))
    layers = int(os.environ.get("PS_BENCH_LAYERS", 3))
    features = 1
    for d in input_shape:
        features *= d
    blocks: list[nn.Module] = [nn.Flatten(), nn.Linear(features, hidden), nn.ReLU()]
    for _ in range(layers - 1):
        blocks += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*blocks, nn.Linear(hidden, num_classes))


def step_time(path: str) -> float:
    """Seconds per step in the steady state: from the first step's record to the last one's
    (start-up and exit do not count)."""
    with open(path, encoding="utf-8") as f:
        times = [r["time"] for r in map(json.loads, f) if "final" not in r]
    return (times[-1] - times[0]) / (len(times) - 1)


def compute_time(args) -> float:
    """Median seconds of one forward + backward of the model on one thread, with no communication:
    the floor a perfectly overlapped step could reach."""
    import time

    import torch

    from ps.data import batches, load_data
    from ps.models import model_loss

    torch.set_num_threads(1)
    data = load_data("digits")
    model = wide_mlp(data.input_shape, data.num_classes)
    x, y = next(batches(data.train, list(range(len(data.train))), args.batch_size, 0))
    times = []
    for _ in range(12):
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model_loss(model, model(x), y).backward()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def run_one(spec, args, links, log_dir: str) -> float:
    """One configuration on a fresh cluster; the slower worker's steady-state step time."""
    from ps.cli.launch import start_servers, stop_all, supervise, Proc

    extra = ["--worker-timeout", "60"]
    servers = start_servers(2, spec.mode, 2, staleness=spec.staleness, host="0.0.0.0" if links else "127.0.0.1",
                            extra=extra, out=io.StringIO())
    workers = []
    try:
        ports = [p.address.rsplit(":", 1)[1] for p in servers]
        for r in range(2):
            host = links[r][1] if links else "127.0.0.1"
            argv = [sys.executable, "-m", "ps.cli.worker", "--servers", ",".join(f"{host}:{p}" for p in ports),
                    "--rank", str(r), "--num-workers", "2", "--model", "benchmarks.overlap:wide_mlp",
                    "--data", "digits", "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                    "--optimizer", "sgd", "--lr", "0.01", "--eval-every", "0", "--no-progress",
                    "--log-dir", log_dir, "--device", "cpu"]
            argv += ["--push-early"] if spec.push_early else []
            argv += ["--prefetch"] if spec.prefetch else []
            prefix = ["ip", "netns", "exec", links[r][0]] if links else []
            popen = subprocess.Popen(prefix + argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
            workers.append(Proc(f"worker-{r}", popen))
        error = supervise(workers, servers, timeout=600)
        if error:
            raise SystemExit(f"{spec.label}: {error}\n" + "".join(w.popen.stderr.read() for w in workers))
    finally:
        stop_all(workers + servers)
    return max(step_time(os.path.join(log_dir, f"worker-{r}.jsonl")) for r in range(2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--modes", default=DEFAULT_RUNS)
    p.add_argument("--link", default="", help="shape each worker's link to this rate (tc tbf, e.g. 1gbit); needs root")
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    os.environ["PS_BENCH_HIDDEN"], os.environ["PS_BENCH_LAYERS"] = str(args.hidden), str(args.layers)
    from ps.compare.spec import parse_runs

    runs = parse_runs(args.modes, 2)
    mib = sum(t.numel() for t in wide_mlp().parameters()) * 4 / 2**20
    print(f"model: {args.layers} hidden layers of {args.hidden} ({mib:.1f} MiB fp32), batch {args.batch_size} per "
          f"worker, {args.steps} steps, 2 workers, 2 servers, OMP_NUM_THREADS=1, "
          f"{'each worker behind a ' + args.link + ' link' if args.link else 'loopback'}")
    print(f"{'compute alone':24} step {1000 * compute_time(args):7.1f} ms  (forward + backward, one thread, no "
          "communication)", flush=True)
    times: dict[str, float] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as out:
        from tests.netns import veth_namespace

        links = [(stack.enter_context(veth_namespace(f"10.234.{r}.1", f"10.234.{r}.2", args.link))[0], f"10.234.{r}.1")
                 for r in (1, 2)] if args.link else []
        for spec in runs:
            times[spec.label] = run_one(spec, args, links, os.path.join(out, spec.label))
            base = times.get(spec.mode, times[spec.label])
            print(f"{spec.label:24} step {1000 * times[spec.label]:7.1f} ms  "
                  f"{2 * args.batch_size / times[spec.label]:7.0f} samples/s  x{base / times[spec.label]:.2f} "
                  f"the speed of plain {spec.mode}", flush=True)


if __name__ == "__main__":
    main()
