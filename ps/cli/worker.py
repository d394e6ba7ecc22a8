"""ps-worker: pull weights, compute gradients with PyTorch, push them back."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, Sequence

import torch

from ps.cli.common import (add_auth_flags, add_flag, add_tls_flags, add_training_flags, auth_token_from_args,
                           check_device, cluster_env, optimizer_from_args, run_main, setup_logging)
from ps.config import WorkerConfig
from ps.data import Datasets, load_data
from ps.errors import InvalidArgument
from ps.models import build_model
from ps.tp.binding import Binding, plain, tensor_parallel
from ps.tp.groups import TPGroup, destroy, free_port, from_torchrun, group_timeout, init_group
from ps.tp.layers import partition_dims, shard_state
from ps.worker.client import PSClient
from ps.worker.trainer import TrainResult, local_index, resolve_device, train


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ps-worker", description="Train against ps-server shards. A TF_CONFIG "
                                "cluster spec in the environment gives defaults for --servers, --rank, --num-workers.")
    env = cluster_env(os.environ if env is None else env)
    add_flag(p, "--servers", env=env, default="", help="comma-separated host:port of every shard, in shard order")
    add_flag(p, "--rank", env=env, default=0, type=int, help="this worker's index (picks its data shard)")
    add_flag(p, "--num-workers", env=env, default=1, type=int, help="number of data-parallel workers")
    add_flag(p, "--worker-id", env=env, default="", help="stable id (default worker-RANK); reuse it to rejoin")
    add_training_flags(p, env)
    add_flag(p, "--connect-timeout", env=env, default=60.0, type=float, help="seconds to wait for the servers")
    add_flag(p, "--retry-timeout", env=env, default=300.0, type=float,
             help="seconds a call keeps retrying a server that is down (e.g. restarting from a checkpoint)")
    add_flag(p, "--straggler", env=env, default=1.0, type=float,
             help="fault injection: make each step take this many times longer")
    add_flag(p, "--kill-at", env=env, default=-1, type=int,
             help="fault injection: SIGKILL this worker when it reaches this step (-1: never)")
    add_auth_flags(p, env)
    add_tls_flags(p, env, server=False)
    add_flag(p, "--no-progress", env=env, action="store_true", default=False, help="no progress bar")
    add_flag(p, "--verbose", env=env, action="store_true", default=False, help="debug logging")
    return p


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    rank = int(args.rank)
    check_device(args.device)
    return WorkerConfig(
        servers=tuple(s.strip() for s in args.servers.split(",") if s.strip()),
        worker_id=args.worker_id or f"worker-{rank}", rank=rank, num_workers=int(args.num_workers),
        model=args.model, data=args.data, batch_size=int(args.batch_size), steps=int(args.steps),
        epochs=float(args.epochs), optimizer=optimizer_from_args(args), device=args.device, seed=int(args.seed),
        log_dir=args.log_dir, eval_every=int(args.eval_every), partition_bytes=int(args.partition_bytes),
        progress=not args.no_progress, connect_timeout=float(args.connect_timeout),
        retry_timeout=float(args.retry_timeout),
        straggler=float(args.straggler), kill_at=int(args.kill_at), tp=int(args.tp), compress=args.compress, transport=args.transport,
        micro_batches=int(args.micro_batches), recompute=bool(args.recompute),
        push_early=bool(args.push_early), prefetch=bool(args.prefetch),
        loader_workers=int(args.loader_workers), auth_token=auth_token_from_args(args),
        tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
    )


class Progress:
    """A progress bar on a terminal; otherwise one line per evaluation (for launchers and logs)."""

    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.bar = None
        if cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=cfg.worker_id, unit="step", dynamic_ncols=True)

    def __call__(self, r: dict) -> None:
        if self.bar is not None:
            self.bar.total = r["steps"]
            self.bar.set_postfix(loss=f"{r['loss']:.3f}", refresh=False)
            self.bar.update(1)
        elif "test_accuracy" in r:
            auc = f" test_auc {r['test_auc']:.4f}" if "test_auc" in r else ""
            print(f"{self.cfg.worker_id} step {r['step'] + 1}/{r['steps']} loss {r['loss']:.4f} "
                  f"test_accuracy {r['test_accuracy']:.4f}{auc} staleness {r['staleness']}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def build(cfg: WorkerConfig, tp: TPGroup) -> tuple[torch.nn.Module, Datasets, Binding]:
    """The model (this rank's shards of it), the data and how parameters map to server keys.
    Every rank builds the same unsharded model from the seed and keeps its slices."""
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data)
    full = build_model(cfg.model, data.input_shape, data.num_classes, recompute=cfg.recompute)
    if tp.size == 1:
        return full, data, plain(full)
    model = build_model(cfg.model, data.input_shape, data.num_classes, tp=tp, recompute=cfg.recompute)
    dims = partition_dims(full)
    model.load_state_dict(shard_state(full.state_dict(), dims, tp.rank, tp.size))
    state = {n: p.detach() for n, p in full.named_parameters() if p.requires_grad}
    return model, data, tensor_parallel(model, state, dims, tp)


def run_rank(cfg: WorkerConfig, tp: TPGroup) -> TrainResult:
    """Train as one rank of a (possibly single-rank) tensor-parallel group."""
    model, data, binding = build(cfg, tp)
    progress = Progress(cfg)
    # The group's ranks push as one worker (one clock, one version per step), each its own keys.
    with PSClient(cfg.servers, cfg.worker_id, member=(tp.rank, tp.size), partition_bytes=cfg.partition_bytes,
                  connect_timeout=cfg.connect_timeout, retry_timeout=cfg.retry_timeout, compress=cfg.compress, transport=cfg.transport,
                  auth_token=cfg.auth_token, tls_ca=cfg.tls_ca, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key) as client:
        try:
            result = train(cfg, client, model, data, on_step=progress, binding=binding)
        finally:
            progress.close()
    if tp.rank == 0:
        acc = "n/a" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
        print(f"{cfg.worker_id} done: {result.steps} steps in {result.wall_time:.1f}s, loss {result.final_loss:.4f}, "
              f"test_accuracy {acc}" + ("" if result.test_auc is None else f" test_auc {result.test_auc:.4f}"),
              flush=True)
    return result


def _backend(cfg: WorkerConfig) -> str:
    return "nccl" if resolve_device(cfg.device).type == "cuda" else "gloo"


def _spawned_rank(rank: int, cfg: WorkerConfig, init_method: str) -> None:
    # The group's ranks take consecutive GPUs from the worker's own block: worker i of a host
    # (LOCAL_RANK, else its rank) holds GPUs i*tp .. i*tp + tp - 1 (mod the device count).
    os.environ["LOCAL_RANK"] = str(local_index(cfg.rank) * cfg.tp + rank)
    tp = init_group(rank, cfg.tp, init_method, backend=_backend(cfg), seed=cfg.seed,
                    timeout=group_timeout(cfg.retry_timeout))
    try:
        run_rank(cfg, tp)
    finally:
        destroy(tp)


def run(cfg: WorkerConfig) -> TrainResult | None:
    if cfg.tp == 1:
        return run_rank(cfg, TPGroup())
    if "WORLD_SIZE" in os.environ:  # under torchrun: this process is one rank of the group
        if int(os.environ["WORLD_SIZE"]) != cfg.tp:
            raise InvalidArgument(f"tp ({cfg.tp}) must equal torchrun's WORLD_SIZE ({os.environ['WORLD_SIZE']})")
        tp = from_torchrun(cfg.seed, _backend(cfg), group_timeout(cfg.retry_timeout))
        try:
            return run_rank(cfg, tp)
        finally:
            destroy(tp)
    torch.multiprocessing.start_processes(_spawned_rank, args=(cfg, f"tcp://127.0.0.1:{free_port()}"), nprocs=cfg.tp,
                                          start_method="spawn")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        setup_logging(args.verbose)
        run(config_from_args(args))
        return 0

    return run_main("ps-worker", body)


if __name__ == "__main__":
    sys.exit(main())
