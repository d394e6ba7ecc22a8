"""ps-launch: K servers and N workers on this machine, one command; prints the final accuracy."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Mapping, Sequence

import torch

from ps.cli.common import add_flag, add_training_flags, check_job, run_main
from ps.cli.server import READY_PREFIX
from ps.config import MODES
from ps.data import eval_metrics, load_data
from ps.embedding import TableGroup
from ps.errors import InvalidArgument, PSError
from ps.models import build_model, model_loss
from ps.sharding import ParamSpec, dtype_name
from ps.tp.binding import tp_init, unshard_keys
from ps.tp.layers import partition_dims
from ps.worker.client import PSClient

_TRAINING_FLAGS = ("model", "data", "batch_size", "steps", "epochs", "optimizer", "lr", "momentum", "weight_decay",
                   "beta1", "beta2", "eps", "device", "seed", "eval_every", "partition_bytes", "tp", "micro_batches",
                   "compress", "loader_workers", "transport")


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ps-launch", description="Run a local cluster: K ps-servers and N ps-workers.")
    add_flag(p, "--servers", env=env, default=2, type=int, help="number of server shards")
    add_flag(p, "--workers", env=env, default=2, type=int, help="number of workers")
    add_flag(p, "--mode", env=env, default="sync", choices=MODES, help="consistency mode")
    add_flag(p, "--staleness", env=env, default=2, type=int, help="ssp bound")
    add_flag(p, "--table-mode", env=env, default="", choices=("", *MODES),
             help="mode of server-held embedding tables (default: --mode; e.g. sync + async tables: the hybrid)")
    add_flag(p, "--table-staleness", env=env, default=-1, type=int, help="ssp bound of the tables (default: --staleness)")
    add_flag(p, "--worker-timeout", env=env, default=10.0, type=float, help="seconds before a silent worker is evicted")
    add_flag(p, "--host", env=env, default="127.0.0.1", help="address the servers bind")
    add_training_flags(p, env, epochs=20.0)
    add_flag(p, "--timeout", env=env, default=1800.0, type=float, help="give up (and fail) after this many seconds")
    return p


@dataclass(frozen=True)
class Proc:
    name: str
    popen: subprocess.Popen
    address: str = ""


def _forward(name: str, stream: IO[str], out: IO[str]) -> None:
    for line in stream:
        out.write(f"[{name}] {line}")
        out.flush()


# A local cluster on loopback defines its own topology and needs no token: settings meant for a
# real cluster must not leak into its processes (the launcher's own client would lack them).
_CLUSTER_ONLY = ("TF_CONFIG", "PS_AUTH_TOKEN", "PS_AUTH_TOKEN_FILE", "PS_TLS_CERT", "PS_TLS_KEY", "PS_TLS_CA")


def child_env(local_rank: int | None = None) -> dict[str, str]:
    """The environment of a process this launcher starts; a worker's `local_rank` (its index
    among this host's workers) becomes LOCAL_RANK, from which it picks its GPU."""
    env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_ONLY}
    env.setdefault("OMP_NUM_THREADS", "1")  # N processes on few cores: no oversubscription
    env["PYTHONUNBUFFERED"] = "1"
    if local_rank is not None:
        env["LOCAL_RANK"] = str(local_rank)
    return env


def _spawn(module: str, argv: Sequence[str], local_rank: int | None = None) -> subprocess.Popen:
    # `python -m` in the launcher's working directory puts it on the child's path: user modules
    # there (`--model mypkg.job:model`) import in every process as they do in this one.
    return subprocess.Popen([sys.executable, "-m", module, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=child_env(local_rank))


def _wait_ready(name: str, popen: subprocess.Popen, out: IO[str]) -> Proc:
    """Read a starting server's output until it prints its address, then forward the rest."""
    assert popen.stdout is not None
    for line in popen.stdout:
        out.write(f"[{name}] {line}")
        if line.startswith(READY_PREFIX):
            address = line[len(READY_PREFIX):].split()[0]
            threading.Thread(target=_forward, args=(name, popen.stdout, out), daemon=True).start()
            return Proc(name, popen, address)
    raise PSError(f"{name} did not start (exit code {popen.wait()})")


def start_servers(num: int, mode: str, num_workers: int, *, staleness: int = 0, worker_timeout: float = 10.0,
                  host: str = "127.0.0.1", extra: Sequence[str] = (), out: IO[str] = sys.stdout) -> list[Proc]:
    """Start `num` ps-server processes at once on free ports; return when all are listening."""
    popens = [_spawn("ps.cli.server", [
        "--host", host, "--port", "0", "--shard-id", str(k), "--num-shards", str(num), "--mode", mode,
        "--staleness", str(staleness), "--num-workers", str(num_workers),
        "--worker-timeout", str(worker_timeout), *extra]) for k in range(num)]
    procs: list[Proc] = []
    try:
        for k, popen in enumerate(popens):
            procs.append(_wait_ready(f"server-{k}", popen, out))
    except BaseException:
        stop_all([Proc(f"server-{k}", p) for k, p in enumerate(popens)])
        raise
    return procs


def start_worker(name: str, argv: Sequence[str], out: IO[str] = sys.stdout, module: str = "ps.cli.worker",
                 local_rank: int | None = None) -> Proc:
    popen = _spawn(module, argv, local_rank)
    threading.Thread(target=_forward, args=(name, popen.stdout, out), daemon=True).start()
    return Proc(name, popen)


def supervise(workers: Sequence[Proc], servers: Sequence[Proc], timeout: float, may_die: Sequence[str] = ()) -> str | None:
    """Wait until every worker has exited; None if all went well, else what went wrong. A worker
    named in `may_die` (fault injection) may exit with any code."""
    deadline = time.monotonic() + timeout
    while True:
        dead_servers = [p for p in servers if p.popen.poll() is not None]
        failed = [p for p in workers if p.popen.poll() not in (None, 0) and p.name not in may_die]
        if dead_servers or failed:
            bad = dead_servers + failed
            return f"{', '.join(p.name for p in bad)} exited with code {bad[0].popen.returncode}"
        if all(p.popen.poll() is not None for p in workers):
            return None
        if time.monotonic() > deadline:
            return f"training did not finish within {timeout:.0f}s"
        time.sleep(0.1)


def stop_all(procs: Sequence[Proc], grace: float = 5.0) -> None:
    for p in procs:
        if p.popen.poll() is None:
            p.popen.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()


# Observer evaluations of a model with server-held tables read rows a batch at a time: larger
# batches mean fewer round trips (clicks' 20k test samples: 0.4 s at 512 a batch, 0.1 s at 2048).
TABLE_EVAL_BATCH = 4096


def training_argv(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for name in _TRAINING_FLAGS:
        out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.log_dir:
        out += ["--log-dir", args.log_dir]
    for flag in ("recompute", "push_early", "prefetch"):
        if getattr(args, flag):
            out.append(f"--{flag.replace('_', '-')}")
    return out


class Observer:
    """Evaluates the weights the servers hold now (observer reads: no waiting, no joining). For a
    tensor-parallel job (`tp` > 1) it pulls every rank's shards and evaluates the unsharded model."""

    def __init__(self, addresses: Sequence[str], model: str, data: str, seed: int, partition_bytes: int,
                 tp: int = 1):
        torch.manual_seed(seed)
        self.data = load_data(data)
        self.model = build_model(model, self.data.input_shape, self.data.num_classes)
        self.dims, self.tp = partition_dims(self.model), tp
        state = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        self.client = PSClient(addresses, partition_bytes=partition_bytes, heartbeat=False)
        self.client.attach([ParamSpec(k, tuple(t.shape), dtype_name(t.dtype))
                            for k, t in tp_init(state, self.dims, tp).items()])
        # Server-held embedding tables are read as an observer (eval mode, no clock): declaring
        # them is idempotent and joins nothing.
        self.tables = bool(TableGroup(self.model, self.client).setup())
        self._dense_pulled = 0

    @property
    def bytes_pulled(self) -> int:
        """Bytes of weights and table rows this observer has read (not training traffic)."""
        return self._dense_pulled + self.client.table_bytes_pulled

    def weights(self) -> dict[str, torch.Tensor]:
        """The servers' current parameters, unsharded, by parameter name."""
        weights = self.client.pull(0, observer=True)
        self._dense_pulled += sum(t.numel() * 4 for t in weights.values())
        return unshard_keys(weights, self.dims, self.tp)

    def evaluate(self) -> tuple[float, float]:
        """(test accuracy, test loss) of the servers' current weights."""
        m = self.metrics()
        return m["accuracy"], m["loss"]

    def metrics(self) -> dict[str, float]:
        """Test accuracy and loss of the servers' current weights (and rows), plus AUC and
        log-loss for a binary model. A model with server-held tables is evaluated in larger
        batches: each batch reads its rows in a round trip per shard."""
        weights = self.weights()
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in weights:
                    p.copy_(weights[n])
        return eval_metrics(self.model, self.data.test, torch.device("cpu"),
                            lambda out, y: model_loss(self.model, out, y),
                            batch_size=TABLE_EVAL_BATCH if self.tables else 512)

    def close(self) -> None:
        self.client.close()


def run(args: argparse.Namespace, out: IO[str] = sys.stdout) -> int:
    if args.prefetch and args.mode == "sync":
        raise InvalidArgument("--prefetch needs --mode async or ssp: in sync mode the next step's weights exist only "
                              "once every worker has pushed this step")
    check_job(args.model, args.data, args.device)  # a bad job is refused before any process starts
    table_flags = (["--table-mode", args.table_mode] if args.table_mode else []) + (
        ["--table-staleness", str(args.table_staleness)] if args.table_staleness >= 0 else [])
    servers = start_servers(int(args.servers), args.mode, int(args.workers),
                            staleness=int(args.staleness), worker_timeout=float(args.worker_timeout), host=args.host,
                            extra=table_flags, out=out)
    workers: list[Proc] = []
    try:
        addresses = ",".join(p.address for p in servers)
        t0 = time.monotonic()
        for r in range(int(args.workers)):
            workers.append(start_worker(f"worker-{r}", ["--servers", addresses, "--rank", str(r),
                                                        "--num-workers", str(args.workers), "--no-progress",
                                                        *training_argv(args)], out, local_rank=r))
        error = supervise(workers, servers, float(args.timeout))
        if error:
            out.write(f"ps-launch: {error}; stopping the cluster\n")
            return 1
        observer = Observer([p.address for p in servers], args.model, args.data, int(args.seed),
                            int(args.partition_bytes), int(args.tp))
        try:
            final = observer.metrics()
        finally:
            observer.close()
        out.write(f"ps-launch: {args.workers} workers, {args.servers} servers, mode {args.mode}"
                  f"{f', table mode {args.table_mode}' if args.table_mode else ''}: "
                  f"trained in {time.monotonic() - t0:.1f}s\n")
        out.write(f"final test accuracy: {final['accuracy']:.4f}\n")
        if "auc" in final:
            out.write(f"final test AUC: {final['auc']:.4f}, log-loss: {final['logloss']:.4f}\n")
        out.flush()
        return 0
    finally:
        stop_all(workers + servers)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("ps-launch", lambda: run(build_parser().parse_args(argv)), stop_on_sigterm=True)


if __name__ == "__main__":
    sys.exit(main())
