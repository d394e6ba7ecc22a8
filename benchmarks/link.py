"""Push + pull behind real links: 2 workers, each in its own network namespace behind a veth pair
shaped to --rate both ways (tc tbf), against 2 ps-server processes (async, so the workers do not
wait for each other), every transport the pair supports (a worker in another namespace never
takes shared memory: auto means the data port, tcp, there). Prints each worker's push + pull time and the
bytes it moved per second as a share of the link rate. Needs root and `ip netns`.

    python benchmarks/link.py [--rate 1gbit] [--mib 25] [--rounds 10]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
from contextlib import ExitStack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = """
import json, sys, time, torch
from ps.config import OptimizerConfig
from ps.worker.client import PSClient
servers, worker, transport, n, rounds = sys.argv[1].split(","), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
with PSClient(servers, worker, transport=transport, connect_timeout=30) as c:
    clock = c.setup({"w": torch.zeros(n)}, OptimizerConfig("sgd", lr=1e-6))
    grad, weights, times = {"w": torch.full((n,), 1e-3)}, {"w": torch.zeros(n)}, []
    for step in range(rounds + 2):
        t = time.perf_counter()
        c.push(grad, clock + step)
        c.pull(clock + step + 1, into=weights)
        if step >= 2:
            times.append(time.perf_counter() - t)
    print(json.dumps({"paths": c.paths(), "times": times}), flush=True)
"""


def rate_bits(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise SystemExit(f"--rate ({rate!r}) must end in one of {', '.join(units)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--mib", type=float, default=25.0)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--transports", default="unary,stream,tcp,auto")
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    from ps.cli.launch import start_servers, stop_all
    from tests.netns import usable, veth_namespace

    if not usable():
        raise SystemExit("needs root and network namespaces (ip netns)")
    n = int(args.mib * (1 << 20)) // 4
    link = rate_bits(args.rate) / 8  # bytes per second, each way
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    print(f"model {args.mib:.0f} MiB fp32, 2 workers (each behind its own {args.rate} link), 2 servers, async, "
          f"{args.rounds} rounds")
    with ExitStack() as stack:
        links = [(stack.enter_context(veth_namespace(f"10.235.{r}.1", f"10.235.{r}.2", args.rate))[0],
                  f"10.235.{r}.1") for r in range(2)]
        for transport in args.transports.split(","):
            servers = start_servers(2, "async", 2, host="0.0.0.0", out=io.StringIO())
            try:
                ports = [s.address.rsplit(":", 1)[1] for s in servers]
                procs = [subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, "-c", WORKER, ",".join(f"{host}:{p}" for p in ports),
                     f"w{r}", transport, str(n), str(args.rounds)], stdout=subprocess.PIPE, env=env, text=True)
                    for r, (ns, host) in enumerate(links)]
                outs = [json.loads(proc.communicate(timeout=600)[0]) for proc in procs]
            finally:
                stop_all(servers)
            for r, out in enumerate(outs):
                t = statistics.median(out["times"])
                share = 2 * 4 * n / t / link  # push one way, pull the other, one after the other
                print(f"{transport:7} worker {r} ({'/'.join(sorted(set(out['paths'])))}): push+pull p50 "
                      f"{t * 1e3:8.1f} ms, {2 * 4 * n / t / 1e6:7.1f} MB/s = {share * 100:5.1f}% of the link rate "
                      "(goal >= 85%)")


if __name__ == "__main__":
    main()
