"""Transport: one push plus one pull of a model through 2 real ps-server processes (1 worker;
each path: unary calls, the gRPC stream, the data port (tcp), shared memory, and the default,
ps-worker's --transport auto: shared memory on this host), and, for the small model, the
combined push_pull call; against a gloo all-reduce of the same tensor between 2 processes, raw
TCP moving the same bytes (there and back), and the ceiling of gRPC Python itself (2 echo
servers of raw bytes, same slices, no protobuf, no ps; for the small model, 1 KiB echoed by 2
servers at once; and a bare health-check round trip), all measured in this run. The 100 MiB
paths and their baselines are measured in turn, --repeat times. Prints p50 and p99 over the
rounds, and the ratios.

    python benchmarks/transport.py [--mib 100] [--rounds 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
import torch.distributed as dist
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps.cli.launch import start_servers, stop_all
from ps.config import DEFAULT_PARTITION_BYTES, OptimizerConfig, WorkerConfig, grpc_options
from ps.tp.groups import free_port
from ps.worker.client import PSClient


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


DEFAULT = WorkerConfig.transport  # what ps-worker and ps-launch use (the dataclass default)


def bench_ps(nbytes: int, rounds: int, compress: str = "none", combined: bool = False,
             transport: str = DEFAULT) -> list[float]:
    procs = start_servers(2, "async", 1, out=io.StringIO())
    try:
        n = nbytes // 4
        with PSClient([p.address for p in procs], "bench", compress=compress, transport=transport) as client:
            client.setup({"w": torch.zeros(n)}, OptimizerConfig("sgd", lr=1e-6))
            grad = {"w": torch.full((n,), 1e-3)}
            weights = {"w": torch.zeros(n)}  # pulled into place, as the trainer pulls into its parameters
            times = []
            for clock in range(rounds + 2):
                t = time.perf_counter()
                if combined:
                    client.push_pull(grad, clock, into=weights)
                else:
                    client.push(grad, clock)
                    client.pull(clock + 1, into=weights)
                if clock >= 2:
                    times.append(time.perf_counter() - t)
            return times
    finally:
        stop_all(procs)


def bench_health_rtt(rounds: int) -> list[float]:
    """A bare unary gRPC round trip (the standard health check) to a ps-server: the floor of any call."""
    procs = start_servers(1, "async", 1, out=io.StringIO())
    try:
        with grpc.insecure_channel(procs[0].address) as ch:
            stub, times = health_pb2_grpc.HealthStub(ch), []
            for i in range(rounds + 2):
                t = time.perf_counter()
                stub.Check(health_pb2.HealthCheckRequest())
                if i >= 2:
                    times.append(time.perf_counter() - t)
            return times
    finally:
        stop_all(procs)


def _grpc_echo(port: int, ready) -> None:
    """A gRPC server whose one method answers the request's bytes (no protobuf, no ps)."""
    from concurrent import futures

    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(
        lambda request, context: request, request_deserializer=None, response_serializer=None)})
    server = grpc.server(futures.ThreadPoolExecutor(8), handlers=[handler], options=grpc_options())
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    ready.set()
    server.wait_for_termination()


class EchoServers:
    """Two gRPC servers whose one method answers the request's bytes (no protobuf, no ps)."""

    def __enter__(self):
        ctx = torch.multiprocessing.get_context("spawn")
        ports, self.procs = [free_port(), free_port()], []
        for port in ports:
            ready = ctx.Event()
            self.procs.append(ctx.Process(target=_grpc_echo, args=(port, ready), daemon=True))
            self.procs[-1].start()
            ready.wait(60)
        self.channels = [grpc.insecure_channel(f"127.0.0.1:{p}", options=grpc_options()) for p in ports]
        return [ch.unary_unary("/bench.Echo/Echo") for ch in self.channels]

    def __exit__(self, *exc):
        for ch in self.channels:
            ch.close()
        for proc in self.procs:
            proc.kill()


def bench_grpc_ceiling(nbytes: int, rounds: int) -> list[float]:
    """gRPC Python's own ceiling: the model's bytes in 4 MiB raw-bytes messages sent to 2 echo
    servers as concurrent futures and answered back (push + pull in one), as ps splits them."""
    chunk = DEFAULT_PARTITION_BYTES
    data = [os.urandom(min(chunk, nbytes - off)) for off in range(0, nbytes, chunk)]
    times = []
    with EchoServers() as echo:
        for i in range(rounds + 2):
            t = time.perf_counter()
            calls = [echo[j % 2].future(d) for j, d in enumerate(data)]
            assert sum(len(c.result()) for c in calls) == nbytes
            if i >= 2:
                times.append(time.perf_counter() - t)
    return times


def bench_grpc_small_floor(nbytes: int, rounds: int) -> list[float]:
    """gRPC Python's floor for a small step: `nbytes` echoed by each of 2 servers at once, one
    blocking call on this thread and one on a pool thread (as ps's push_pull issues them)."""
    data = os.urandom(nbytes)
    times = []
    with EchoServers() as echo, ThreadPoolExecutor(1) as pool:
        for i in range(rounds + 2):
            t = time.perf_counter()
            other = pool.submit(echo[1], data)
            assert len(echo[0](data)) == len(other.result()) == nbytes
            if i >= 2:
                times.append(time.perf_counter() - t)
    return times


def _allreduce_rank(rank: int, port: int, nbytes: int, rounds: int, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    t = torch.ones(nbytes // 4)
    times = []
    for i in range(rounds + 2):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(t)
        if i >= 2:
            times.append(time.perf_counter() - start)
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def bench_allreduce(nbytes: int, rounds: int) -> list[float]:
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.Queue()
    torch.multiprocessing.start_processes(_allreduce_rank, args=(free_port(), nbytes, rounds, out), nprocs=2,
                                          start_method="spawn")
    return out.get()


def _recv_exactly(sock: socket.socket, buf: bytearray) -> None:
    view, got = memoryview(buf), 0
    while got < len(buf):
        got += sock.recv_into(view[got:])


def _echo(port: int, nbytes: int, rounds: int) -> None:
    with socket.create_server(("127.0.0.1", port)) as srv:
        conn, _ = srv.accept()
        buf = bytearray(nbytes)
        for _ in range(rounds + 2):
            _recv_exactly(conn, buf)
            conn.sendall(buf)
        conn.close()


def bench_tcp(nbytes: int, rounds: int) -> list[float]:
    """Raw TCP, Python sockets, loopback: send the bytes and receive them back (push + pull)."""
    port = free_port()
    ctx = torch.multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_echo, args=(port, nbytes, rounds))
    proc.start()
    for _ in range(100):
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            break
        except ConnectionRefusedError:
            time.sleep(0.05)
    data, back, times = bytearray(os.urandom(16)) * (nbytes // 16), bytearray(nbytes), []
    for i in range(rounds + 2):
        t = time.perf_counter()
        sock.sendall(data)
        _recv_exactly(sock, back)
        if i >= 2:
            times.append(time.perf_counter() - t)
    sock.close()
    proc.join()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mib", type=float, default=100.0)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3,
                   help="times the 100 MiB paths and their baselines are measured, in turn (a machine whose speed "
                        "drifts then weighs on each alike; p50 and p99 are over every round of every turn)")
    args = p.parse_args()
    big = int(args.mib * (1 << 20)) // 16 * 16
    rounds = max(1, args.rounds // args.repeat)
    measured: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        for name, measure in (("allreduce", bench_allreduce), ("raw", bench_tcp),
                              *((t, functools.partial(bench_ps, transport=t)) for t in ("unary", "stream", "tcp", "shm")),
                              ("default", bench_ps)):
            measured.setdefault(name, []).extend(measure(big, rounds))
    paths = {t: measured[t] for t in ("unary", "stream", "tcp", "shm")}
    ar, tcp, ps_big = measured["allreduce"], measured["raw"], measured["default"]
    ps_bf16 = bench_ps(big, args.rounds, compress="bf16")
    ps_topk = bench_ps(big, args.rounds, compress="topk:0.01")
    ceiling = bench_grpc_ceiling(big, args.rounds)
    small_rounds = max(args.rounds, 200)
    ps_small = bench_ps(1024, small_rounds)
    small = {t: bench_ps(1024, small_rounds, combined=True, transport=t) for t in ("unary", "stream", "tcp", DEFAULT)}
    small_floor = bench_grpc_small_floor(1024, small_rounds)
    rtt = bench_health_rtt(small_rounds)
    med = statistics.median
    gb = lambda seconds: 2 * big / seconds / 1e9  # noqa: E731 - bytes there and back
    print(f"model {big / (1 << 20):.0f} MiB fp32, 1 worker, 2 servers, {args.repeat} x {rounds} rounds of each path "
          f"and baseline, in turn; default path {DEFAULT}")
    print(f"{'':34} {'p50 ms':>9} {'p99 ms':>9}")
    for name, xs in ((f"ps push+pull ({DEFAULT}, default)", ps_big),
                     *((f"ps push+pull ({t})", xs) for t, xs in paths.items()),
                     (f"ps push+pull, bf16 push ({DEFAULT})", ps_bf16),
                     (f"ps push+pull, topk:0.01 push ({DEFAULT})", ps_topk), ("gloo all-reduce (2 procs)", ar),
                     ("raw TCP there and back", tcp), ("gRPC raw-bytes echo (ceiling)", ceiling)):
        print(f"{name:34} {med(xs) * 1e3:9.1f} {pct(xs, 0.99) * 1e3:9.1f}")
    print(f"push+pull / all-reduce = {med(ps_big) / med(ar):.2f} (the default path, {DEFAULT})")
    print(f"  per path: unary {med(paths['unary']) / med(ar):.2f}, stream {med(paths['stream']) / med(ar):.2f}, "
          f"tcp {med(paths['tcp']) / med(ar):.2f} (goal <= 1.5 for the network path), shm "
          f"{med(paths['shm']) / med(ar):.2f} (goal <= 0.5)")
    for t in ("unary", "stream", "tcp"):
        print(f"ps bandwidth ({t}) {gb(med(paths[t])):.2f} GB/s = {med(tcp) / med(paths[t]) * 100:.0f}% of raw TCP's "
              f"{gb(med(tcp)):.2f} GB/s (goal >= 60% for the network path)")
    print(f"gRPC ceiling {gb(med(ceiling)):.2f} GB/s; unary ps reaches {med(ceiling) / med(paths['unary']) * 100:.0f}% "
          f"of it; the ceiling itself is {med(ceiling) / med(ar):.2f}x the all-reduce")
    print(f"1 KiB model push+pull ({DEFAULT}): p50 {med(ps_small) * 1e3:.3f} ms, p99 {pct(ps_small, 0.99) * 1e3:.3f} ms")
    print("1 KiB model push_pull (one round trip), p50 (goal < 1 ms): "
          + ", ".join(f"{t} {med(xs) * 1e3:.3f} ms" for t, xs in small.items()))
    print(f"gRPC floor for it (1 KiB echoed by 2 servers at once): p50 {med(small_floor) * 1e3:.3f} ms, "
          f"p99 {pct(small_floor, 0.99) * 1e3:.3f} ms")
    print(f"bare gRPC round trip (health check): p50 {med(rtt) * 1e3:.3f} ms, p99 {pct(rtt, 0.99) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
