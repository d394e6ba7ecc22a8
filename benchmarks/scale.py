"""Scale: hold hundreds of workers. For each mode, shard count and N, start real ps-server
processes and N simulated workers (ps.loadgen: at most --per-process threads per process, each
its own PSClient) pushing and pulling a small model (one fp32 tensor spanning every shard) for
--steps steps; all measured in this run. Prints updates/s (N * steps / wall time from spawning
the load generators to all done, process start-up included; the steady rate without it is on
the summary lines), p50/p99 step time (each worker's first step left out), evictions, push
outcomes other than APPLIED/ACCUMULATED/BUFFERED, and exactness: the final weights against the
closed form (sgd, lr 1, worker i pushes i + 1s: sync w = -steps (N+1)/2, async w = minus the sum
of (i + 1) times the steps worker i pushed: a late joiner starts at the slowest clock). A configuration past --timeout is killed and reported as "timeout".

    python benchmarks/scale.py [--workers-list 1,4,16,64,256] [--modes sync,async] [--shards-list 1,2]
        [--steps 20] [--numel 65536] [--partition-bytes 65536] [--per-process 32] [--call push_pull]
        [--timeout 300] [--server-args "--worker-timeout 30"] [--ref-n 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import time

import torch

from ps.cli.launch import start_servers, stop_all
from ps.loadgen import collect, spawn
from ps.sharding import ParamSpec
from ps.worker.client import PSClient

GOOD = {"APPLIED", "ACCUMULATED", "BUFFERED"}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def expected(mode: str, n: int, steps: int, workers: list[dict]) -> float:
    """sync: every step subtracts the mean gradient (quorum: all N from step 0). async: every push
    subtracts its gradient; a worker that joins after the others have pushed starts at the
    slowest clock (as async registration places it), so count the steps each one pushed."""
    if mode == "sync":
        return -steps * (n + 1) / 2
    return -float(sum((w["worker"] + 1) * len(w["step_times"]) for w in workers))


def run_config(mode: str, shards: int, n: int, a: argparse.Namespace) -> dict:
    row: dict = dict(mode=mode, shards=shards, N=n, status="ok", errors=[], wall_s=None, updates_per_s=None,
                     p50_ms=None, p99_ms=None, outcomes={}, bad_outcomes=0)
    t_start = time.monotonic()
    try:
        servers = start_servers(shards, mode, n, extra=shlex.split(a.server_args), out=io.StringIO())
    except Exception as e:  # noqa: BLE001 - reported in the row
        row.update(status="failed", errors=[f"servers: {type(e).__name__}: {e}"])
        return row
    procs = []
    try:
        addrs = [p.address for p in servers]
        t0 = time.perf_counter()
        for first in range(0, n, a.per_process):
            procs.append(spawn(addrs, first, min(a.per_process, n - first), a.steps, a.numel, a.partition_bytes,
                               a.call))
        try:
            workers = collect(procs, timeout=max(1.0, a.timeout - (time.monotonic() - t_start)))
        except TimeoutError:
            row.update(status="timeout", wall_s=time.perf_counter() - t0)
            workers = []
        except RuntimeError as e:
            row.update(status="failed", wall_s=time.perf_counter() - t0)
            row["errors"].append(str(e))
            workers = []
        if row["status"] == "ok":
            row["wall_s"] = time.perf_counter() - t0
        times = [t for w in workers for t in w["step_times"][1:]]
        # Steady state, without process start-up: from the first end of a first step to the last loop end.
        done = [w for w in workers if w["loop_end"] and w["step_times"]]
        if len(done) == n and a.steps > 1:
            begin = min(w["loop_start"] + w["step_times"][0] for w in done)
            row["steady_updates_per_s"] = n * (a.steps - 1) / max(1e-9, max(w["loop_end"] for w in done) - begin)
        outcomes: dict[str, int] = {}
        for w in workers:
            for k, v in w["outcomes"].items():
                outcomes[k] = outcomes.get(k, 0) + v
            if w["error"]:
                row["errors"].append(f"w{w['worker']}: {w['error']}")
        row.update(updates_per_s=n * a.steps / row["wall_s"] if row["status"] == "ok" else None,
                   p50_ms=1e3 * pct(times, 0.5) if times else None,
                   p99_ms=1e3 * pct(times, 0.99) if times else None, outcomes=outcomes,
                   bad_outcomes=sum(v for k, v in outcomes.items() if k not in GOOD),
                   final_clocks=sorted({w["final_clock"] for w in workers}))
        try:
            with PSClient(addrs, "scale-observer", partition_bytes=a.partition_bytes, heartbeat=False,
                          rpc_timeout=30.0, retry_timeout=10.0) as observer:
                stats = observer.stats()  # no registration needed
                for key in ("evictions", "duplicates", "dropped"):
                    row[key] = sum(s[key] for s in stats)
                observer.attach([ParamSpec("w", (a.numel,), "float32")])
                w = observer.pull(a.steps, observer=True)["w"]
                row["max_error"] = (w - expected(mode, n, a.steps, workers)).abs().max().item()
        except Exception as e:  # noqa: BLE001 - reported in the row
            row["errors"].append(f"observer: {type(e).__name__}: {e}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        stop_all(servers)
    return row


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description="Scale: hold hundreds of workers (see the module docstring).")
    p.add_argument("--workers-list", default="1,4,16,64,256")
    p.add_argument("--modes", default="sync,async")
    p.add_argument("--shards-list", default="1,2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--numel", type=int, default=65536, help="elements of the one fp32 parameter (256 KiB)")
    p.add_argument("--partition-bytes", type=int, default=65536, help="64 KiB: the parameter spans every shard")
    p.add_argument("--per-process", type=int, default=32, help="most simulated workers in one loadgen process")
    p.add_argument("--call", choices=("push_pull", "push+pull"), default="push_pull")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration before it is killed")
    p.add_argument("--server-args", default="", help="extra ps-server flags, e.g. '--worker-timeout 30'")
    p.add_argument("--ref-n", type=int, default=64, help="the N whose throughput is compared with the best N's")
    p.add_argument("--json", default="", help="also write the results there")
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for mode in a.modes.split(","):
        for shards in (int(s) for s in a.shards_list.split(",")):
            for n in (int(s) for s in a.workers_list.split(",")):
                rows.append(run_config(mode, shards, n, a))
                r = rows[-1]
                print(f"# {mode} shards={shards} N={n}: {r['status']}, {fmt(r.get('wall_s'), '.1f')} s", flush=True)
    cols = ["mode", "shards", "N", "updates/s", "p50 step ms", "p99 step ms", "evictions", "bad outcomes",
            "max error", "wall s"]
    print("\n| " + " | ".join(cols) + " |\n" + "| --- " * len(cols) + "|")
    for r in rows:
        ups = fmt(r["updates_per_s"], ".0f") if r["status"] == "ok" else r["status"]
        bad = f"{r['bad_outcomes']}" + (f" (+{len(r['errors'])} errors)" if r["errors"] else "")
        print(f"| {r['mode']} | {r['shards']} | {r['N']} | {ups} | {fmt(r['p50_ms'], '.2f')} | "
              f"{fmt(r['p99_ms'], '.2f')} | {r.get('evictions', '-')} | {bad} | "
              f"{fmt(r.get('max_error'), '.3g')} | {fmt(r['wall_s'], '.1f')} |")
    print()
    for r in rows:
        if r["errors"] or r.get("duplicates") or r.get("dropped"):
            print(f"{r['mode']} shards={r['shards']} N={r['N']}: duplicates {r.get('duplicates')}, dropped "
                  f"{r.get('dropped')}, outcomes {r['outcomes']}, {len(r['errors'])} errors"
                  + (f", first: {r['errors'][0][:300]}" if r["errors"] else ""))
    for mode in a.modes.split(","):
        for shards in (int(s) for s in a.shards_list.split(",")):
            ok = [r for r in rows if (r["mode"], r["shards"]) == (mode, shards) and r["updates_per_s"]]
            if not ok:
                print(f"{mode}, {shards} shards: no configuration finished")
                continue
            best = max(ok, key=lambda r: r["updates_per_s"])
            ref = next((r for r in ok if r["N"] == a.ref_n), None) or max(ok, key=lambda r: r["N"])
            steady = {r["N"]: f"{r['steady_updates_per_s']:.0f}" for r in ok if r.get("steady_updates_per_s")}
            print(f"{mode}, {shards} shards: throughput at N={ref['N']} / best N = "
                  f"{ref['updates_per_s'] / best['updates_per_s']:.2f} (best N={best['N']}: "
                  f"{best['updates_per_s']:.0f} updates/s; steady updates/s without start-up, by N: {steady})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
