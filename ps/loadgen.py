"""Load generator: T simulated workers in one process, each a PSClient on its own thread.

    python -m ps.loadgen --servers HOST:PORT,... [--first 0] [--workers T] [--steps S] [--numel E]
        [--partition-bytes P] [--call push_pull|push+pull] [--auth-token TOKEN] [--retry-timeout 300]
        [--timeout SECONDS]

Worker i (global index) is "w{i}": it sets up one fp32 parameter "w" of E zeros (sgd, lr 1), then
at every clock pushes a gradient of (i + 1)s and pulls the weights for the next clock. It prints
one JSON line when it ends ({"worker", "step_times", "outcomes", "final_clock", "error",
"loop_start", "loop_end"}, times in seconds, loop_* since the epoch); the process ends with
{"done": true, "workers": T}. The servers must be running already (see ps.cli.launch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Sequence

import torch

from ps.config import OptimizerConfig
from ps.worker.client import PSClient

CALLS = ("push_pull", "push+pull")
_STUCK = "worker did not finish within"


def _worker(servers: Sequence[str], i: int, steps: int, numel: int, partition_bytes: int, call: str,
            result: dict, client_kwargs: dict[str, Any], retry_every: int = 0) -> None:
    """One simulated worker; fills `result` as it goes (so a timed-out worker still reports)."""
    outcomes: Counter[str] = Counter()
    result.update(worker=i, step_times=[], outcomes=outcomes, final_clock=0, error=None)
    try:
        with PSClient(list(servers), f"w{i}", partition_bytes=partition_bytes, **client_kwargs) as client:
            clock = result["final_clock"] = client.setup({"w": torch.zeros(numel)},
                                                         OptimizerConfig("sgd", lr=1.0, momentum=0.0))
            grads, weights = {"w": torch.full((numel,), float(i + 1))}, {"w": torch.zeros(numel)}
            result["loop_start"] = time.time()  # epoch seconds: comparable across processes
            for clock in range(clock, steps):
                t = time.perf_counter()
                if call == "push_pull":
                    pushed, _ = client.push_pull(grads, clock, into=weights)
                else:
                    pushed = client.push(grads, clock)
                    client.pull(clock + 1, into=weights)
                result["step_times"].append(time.perf_counter() - t)
                outcomes.update(r["outcome"] for r in pushed)
                if retry_every and clock % retry_every == 0:  # a retry, as after a lost reply
                    outcomes.update(r["outcome"] for r in client.push(grads, clock))
                result["final_clock"] = clock + 1
            result["loop_end"] = time.time()
            client.leave()
    except Exception as e:  # noqa: BLE001 - reported in this worker's line
        result["error"] = f"{type(e).__name__}: {e}"


def run_workers(servers: Sequence[str], first: int, count: int, steps: int, numel: int, partition_bytes: int,
                call: str = "push_pull", *, timeout: float | None = None, retry_every: int = 0,
                on_result: Callable[[dict], None] | None = None, **client_kwargs: Any) -> list[dict]:
    """Run workers first..first+count-1 on threads; one result dict each, in worker order.
    `on_result` is called (under a lock) as each worker ends. A worker still running after
    `timeout` seconds is reported with a TimeoutError (its thread is left behind, a daemon)."""
    if call not in CALLS:
        raise ValueError(f"call ({call!r}) must be one of {CALLS}")
    lock = threading.Lock()
    results = [dict(worker=first + k) for k in range(count)]

    def body(k: int) -> None:
        _worker(servers, first + k, steps, numel, partition_bytes, call, results[k], client_kwargs, retry_every)
        with lock:
            if results[k].get("done"):  # already reported as timed out
                return
            results[k]["done"] = True
            if on_result is not None:
                on_result(_plain(results[k]))

    threads = [threading.Thread(target=body, args=(k,), daemon=True, name=f"loadgen-w{first + k}")
               for k in range(count)]
    for t in threads:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    with lock:
        for r in results:
            if not r.get("done"):
                r["done"] = True  # from now on its thread reports nothing
                r["error"] = f"TimeoutError: {_STUCK} {timeout}s"
                if on_result is not None:
                    on_result(_plain(r))
        return [_plain(r) for r in results]


def _plain(r: dict) -> dict:
    """A copy of a worker's result, safe to serialize while its thread may still run."""
    return dict(worker=r["worker"], step_times=list(r.get("step_times", [])), outcomes=dict(r.get("outcomes", {})),
                final_clock=r.get("final_clock", 0), error=r.get("error"), loop_start=r.get("loop_start"),
                loop_end=r.get("loop_end"))


def spawn(servers: Sequence[str], first: int, count: int, steps: int, numel: int = 1 << 20,
          partition_bytes: int = 262144, call: str = "push_pull", extra: Sequence[str] = ()) -> subprocess.Popen:
    """Start `python -m ps.loadgen` for these workers (`extra`: more of its flags, e.g. --auth-token);
    stdout and stderr are pipes, read them with `collect`."""
    argv = [sys.executable, "-m", "ps.loadgen", "--servers", ",".join(servers), "--first", str(first),
            "--workers", str(count), "--steps", str(steps), "--numel", str(numel),
            "--partition-bytes", str(partition_bytes), "--call", call, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def collect(procs: Sequence[subprocess.Popen], timeout: float | None = None) -> list[dict]:
    """Wait for spawned load generators (read concurrently) and return all their worker lines.
    Raises TimeoutError (after killing them all) past `timeout`, RuntimeError with the stderr
    tail if one exits non-zero or without its "done" line."""
    outs: list[tuple[str, str] | None] = [None] * len(procs)

    def read(k: int) -> None:
        outs[k] = procs[k].communicate()

    readers = [threading.Thread(target=read, args=(k,), daemon=True) for k in range(len(procs))]
    for t in readers:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    for t in readers:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in readers):
        for p in procs:
            p.kill()
        raise TimeoutError(f"load generators did not finish within {timeout}s")
    workers: list[dict] = []
    for p, out in zip(procs, outs):
        stdout, stderr = out or ("", "")
        lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        if p.returncode != 0 or not any(line.get("done") for line in lines):
            errors = sorted({line["error"] for line in lines if line.get("error")})[:3]
            tail = "\n".join(stderr.splitlines()[-20:])
            raise RuntimeError(f"loadgen (pid {p.pid}) exited with code {p.returncode}"
                               f"{'' if lines and lines[-1].get('done') else ', no done line'}; "
                               f"worker errors {errors}; stderr tail:\n{tail}")
        workers += [line for line in lines if "worker" in line]
    return workers


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ps.loadgen", description=__doc__.splitlines()[0])
    p.add_argument("--servers", required=True, help="host:port,... of every shard, in shard order")
    p.add_argument("--first", type=int, default=0, help="global index of this process's first worker")
    p.add_argument("--workers", type=int, default=1, help="workers (threads) in this process")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--numel", type=int, default=1 << 20, help="elements of the fp32 parameter 'w'")
    p.add_argument("--partition-bytes", type=int, default=262144)
    p.add_argument("--call", choices=CALLS, default="push_pull")
    p.add_argument("--retry-every", type=int, default=0,
                   help="every this many clocks, push the same clock again (a retry: must be a DUPLICATE)")
    p.add_argument("--auth-token", default="")
    p.add_argument("--retry-timeout", type=float, default=300.0)
    p.add_argument("--timeout", type=float, default=None, help="report unfinished workers as errors after this")
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    def emit(result: dict) -> None:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()

    results = run_workers(a.servers.split(","), a.first, a.workers, a.steps, a.numel, a.partition_bytes, a.call,
                          timeout=a.timeout, retry_every=a.retry_every, on_result=emit, auth_token=a.auth_token, retry_timeout=a.retry_timeout)
    emit({"done": True, "workers": a.workers})
    if any(_STUCK in (r["error"] or "") for r in results):
        os._exit(1)  # stuck worker threads (and their clients' pools) would hold up a normal exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
