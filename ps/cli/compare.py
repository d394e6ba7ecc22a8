"""ps-compare: run several update modes on the same seed, data, model and faults; write a report."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import IO, Mapping, Sequence

from ps.cli.common import add_compress_flag, add_flag, add_training_flags, check_job, optimizer_from_args, run_main
from ps.compare import report
from ps.compare.runner import RunResult, check_runs
from ps.compare.runner import run as run_one
from ps.compare.spec import CompareConfig, parse_faults, parse_runs
from ps.errors import PSError

DEFAULT_MODES = "sync,async,ssp:2,ssp:4,allreduce"


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ps-compare", description="Compare sync, async, ssp and an all-reduce baseline on the same job.")
    add_flag(p, "--modes", env=env, default=DEFAULT_MODES,
             help="comma-separated: sync, async, ssp:S, allreduce; options +backup=B (sync), +slr and +prefetch "
                  "(async, ssp), +early (sync, async, ssp), +tables=MODE (server-held embedding tables in MODE: "
                  "sync, async or ssp:S, e.g. the hybrid sync+tables=async)")
    add_flag(p, "--workers", env=env, default=4, type=int, help="workers per configuration")
    add_flag(p, "--servers", env=env, default=2, type=int, help="server shards per configuration")
    add_flag(p, "--straggler", env=env, action="append", metavar="WORKER:FACTOR",
             help="that worker's steps take FACTOR times longer (repeatable)")
    add_flag(p, "--kill", env=env, action="append", metavar="WORKER:STEP",
             help="SIGKILL that worker when it reaches STEP (repeatable)")
    add_flag(p, "--target-accuracy", env=env, default=None, type=float, help="test accuracy that counts as reached")
    add_flag(p, "--target-loss", env=env, default=None, type=float, help="test loss that counts as reached")
    add_flag(p, "--target-auc", env=env, default=None, type=float,
             help="test AUC that counts as reached (binary models, e.g. dlrm-tiny on clicks), in (0.5, 1]")
    add_flag(p, "--out", env=env, default="runs/compare", help="output directory")
    add_flag(p, "--eval-interval", env=env, default=0.25, type=float, help="seconds between evaluations")
    add_flag(p, "--worker-timeout", env=env, default=5.0, type=float, help="seconds before a silent worker is evicted")
    add_flag(p, "--timeout", env=env, default=900.0, type=float, help="limit per configuration, seconds")
    add_training_flags(p, env, worker_outputs=False, ps_only=False, epochs=20.0)
    add_compress_flag(p, env)
    return p


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    workers = int(args.workers)
    return CompareConfig(
        runs=tuple(parse_runs(args.modes, workers)), workers=workers, servers=int(args.servers), model=args.model,
        data=args.data, batch_size=int(args.batch_size), steps=int(args.steps), epochs=float(args.epochs),
        optimizer=optimizer_from_args(args), seed=int(args.seed),
        stragglers=parse_faults(args.straggler, "straggler", workers, float),
        kills={w: int(s) for w, s in parse_faults(args.kill, "kill", workers, int).items()},
        target_accuracy=args.target_accuracy, target_loss=args.target_loss, target_auc=args.target_auc,
        eval_interval=float(args.eval_interval),
        worker_timeout=float(args.worker_timeout), timeout=float(args.timeout),
        partition_bytes=int(args.partition_bytes), device=args.device, out=args.out, compress=args.compress,
    )


class Progress:
    """One status line: rewritten in place on a terminal, printed every few seconds otherwise."""

    def __init__(self, out: IO[str]):
        self.out, self.tty, self.last = out, out.isatty(), 0.0
        self.prefix = ""

    def __call__(self, point: dict) -> None:
        line = (f"{self.prefix} t={point['time']:6.1f}s step {point['step']:7.1f} "
                + (f"auc {point['auc']:.4f} " if "auc" in point else "")
                + f"accuracy {point['accuracy']:.4f} loss {point['loss']:.4f}")
        if self.tty:
            self.out.write("\r" + line)
        elif time.monotonic() - self.last > 3:
            self.out.write(line + "\n")
            self.last = time.monotonic()
        self.out.flush()


def run(cfg: CompareConfig, out: IO[str] = sys.stdout) -> int:
    check_job(cfg.model, cfg.data, cfg.device)  # a bad job is refused before any configuration runs
    check_runs(cfg)
    os.makedirs(os.path.join(cfg.out, "logs"), exist_ok=True)
    out.write(f"ps-compare: {report.describe(cfg)}\n")
    progress = Progress(out)
    results = []
    for i, spec in enumerate(cfg.runs, 1):
        progress.prefix = f"[{i}/{len(cfg.runs)} {spec.label}]"
        with open(os.path.join(cfg.out, "logs", f"{spec.label}.log"), "w", encoding="utf-8") as log:
            try:
                result = run_one(spec, cfg, log, progress)
            except PSError as e:  # one configuration failing does not end the comparison
                result = RunResult(spec, error=str(e))
        results.append(result)
        status = "ok" if result.error is None else f"failed: {result.error}"
        out.write(("\n" if progress.tty else "") + f"{progress.prefix} done in {result.train_time:.1f}s: {status}\n")
    rows = report.write(results, cfg)
    out.write("\n" + report.table(rows) + "\n\n")
    out.write(f"wrote {', '.join(os.path.join(cfg.out, f) for f in ('report.md', 'convergence.png', 'results.json', 'curves.csv'))}\n")
    return 0 if all(r.error is None or r.spec.mode == "allreduce" and cfg.kills for r in results) else 1


# This command's own WORKER:VALUE lists; its workers get their own --straggler / --kill-at and
# must not take PS_STRAGGLER for the default of theirs (a factor).
_COMPARE_ONLY = ("PS_STRAGGLER", "PS_KILL")


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        cfg = config_from_args(build_parser().parse_args(argv))
        for name in _COMPARE_ONLY:
            os.environ.pop(name, None)
        return run(cfg)

    return run_main("ps-compare", body, stop_on_sigterm=True)


if __name__ == "__main__":
    sys.exit(main())
