"""The all-reduce baseline: torch DistributedDataParallel over gloo (NCCL on CUDA), N processes,
each training on the same data shard and batch stream a ps-worker of that rank would use.

    python -m ps.baselines.allreduce --rank 0 --world-size 4 --master-port 29500 --epochs 5 ...

Rank 0 evaluates every --eval-every steps and logs JSONL like a ps-worker (plus test_loss), and
with --log-dir writes the final weights there (final-weights.safetensors, by parameter name).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ps.cli.common import add_flag, add_training_flags, optimizer_from_args, run_main, setup_logging
from ps.config import WorkerConfig
from ps.data import batches, evaluate, load_data, shard_indices
from ps.models import build_model, model_loss
from ps.server.optim import torch_optimizer
from ps.worker.trainer import JsonlLog, Straggler, resolve_device, total_steps


FINAL_WEIGHTS = "final-weights.safetensors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ps-allreduce", description="DistributedDataParallel baseline.")
    add_flag(p, "--rank", default=0, type=int, help="this process's rank")
    add_flag(p, "--world-size", default=1, type=int, help="number of processes")
    add_flag(p, "--master-addr", default="127.0.0.1", help="rendezvous address (rank 0 listens)")
    add_flag(p, "--master-port", default=29500, type=int, help="rendezvous port")
    add_training_flags(p, ps_only=False)
    add_flag(p, "--straggler", default=1.0, type=float, help="fault injection: steps take this many times longer")
    add_flag(p, "--kill-at", default=-1, type=int, help="fault injection: SIGKILL at this step (-1: never)")
    return p


def train(cfg: WorkerConfig, master: str) -> float | None:
    device = resolve_device(cfg.device, cfg.rank)  # a GPU of its own, chosen as the ps workers choose theirs
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{master}", rank=cfg.rank, world_size=cfg.num_workers,
                            timeout=timedelta(seconds=120))
    try:
        torch.manual_seed(cfg.seed)
        data = load_data(cfg.data)
        model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
        # find_unused_parameters: a parameter without a gradient is not waited for (and not
        # stepped), as the ps servers treat it
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = torch_optimizer(cfg.optimizer, ddp.parameters())
        steps = total_steps(cfg, len(data.train))
        stream = batches(data.train, shard_indices(len(data.train), cfg.rank, cfg.num_workers), cfg.batch_size,
                         cfg.seed * 1_000_003 + cfg.rank)
        log = JsonlLog(os.path.join(cfg.log_dir, f"{cfg.worker_id}.jsonl") if cfg.log_dir else None)
        loss_fn = lambda out, y: model_loss(model, out, y)  # noqa: E731
        dist.barrier()
        straggler = Straggler(cfg.straggler)
        t0 = time.monotonic()
        acc = None
        for step in range(steps):
            if step == cfg.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            work_start = time.perf_counter()
            x, y = next(stream)
            loss = loss_fn(ddp(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            straggler.after_step(time.perf_counter() - work_start)
            record = {"worker": cfg.worker_id, "step": step, "time": time.monotonic() - t0, "loss": float(loss.detach())}
            if cfg.rank == 0 and cfg.eval_every and (step % cfg.eval_every == 0 or step == steps - 1):
                acc, record["test_loss"] = evaluate(model, data.test, device, loss_fn)
                record["test_accuracy"] = acc
                record["time"] = time.monotonic() - t0
            log.write(record)
        log.close()
        if cfg.rank == 0 and cfg.log_dir:  # for ps-compare to set beside a parameter-server run's weights
            save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters()},
                      os.path.join(cfg.log_dir, FINAL_WEIGHTS))
        dist.barrier()  # every rank is done with every collective before any tears its group down
        return acc
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        setup_logging()
        cfg = WorkerConfig(
            servers=(f"{args.master_addr}:{args.master_port}",), worker_id=f"worker-{args.rank}", rank=args.rank,
            num_workers=args.world_size, model=args.model, data=args.data, batch_size=args.batch_size,
            steps=args.steps, epochs=args.epochs, optimizer=optimizer_from_args(args), device=args.device,
            seed=args.seed, log_dir=args.log_dir, eval_every=args.eval_every, straggler=args.straggler,
            kill_at=args.kill_at,
        )
        acc = train(cfg, f"{args.master_addr}:{args.master_port}")
        if acc is not None:
            print(f"worker-{args.rank} done: test_accuracy {acc:.4f}", flush=True)
        return 0

    return run_main("ps-allreduce", body)


if __name__ == "__main__":
    code = main()
    # Leave without running C++ static destructors: after the group is destroyed, torch's
    # distributed runtime was seen to abort a rank at interpreter exit now and then ("terminate
    # called without an active exception", SIGABRT) when its work was done and saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
