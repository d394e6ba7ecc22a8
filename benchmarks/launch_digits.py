"""The main job per mode (ps-launch: 2 servers, 2 workers, mlp on digits) against one process
training the same model on the same data with the same optimizer and global batch, measured in
the same run. Prints wall time, training time, final test accuracy and the ratios.

    python benchmarks/launch_digits.py [--epochs 20]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

import torch

from ps.config import OptimizerConfig
from ps.data import accuracy, batches, digits, steps_per_epoch
from ps.models import MLP


def single_process(epochs: float, batch: int) -> tuple[float, float]:
    torch.manual_seed(0)
    data = digits()
    model = MLP()
    cfg = OptimizerConfig()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    steps = int(epochs * steps_per_epoch(len(data.train), 1, batch))
    stream = batches(data.train, list(range(len(data.train))), batch, 0)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(stream)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - t0, accuracy(model, data.test, torch.device("cpu"))


def launch(mode: str, epochs: float) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ps.cli.launch", "--mode", mode, "--epochs", str(epochs)],
                         capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    acc = float(re.search(r"final test accuracy: ([0-9.]+)", out).group(1))
    train = max(float(t) for t in re.findall(r"done: \d+ steps in ([0-9.]+)s", out))
    return wall, train, acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=float, default=20.0)
    args = p.parse_args()
    base_time, base_acc = single_process(args.epochs, 64)
    print(f"single process (batch 64): train {base_time:.2f}s, test accuracy {base_acc:.4f}")
    print(f"{'mode':6} {'wall s':>7} {'train s':>8} {'accuracy':>9} {'train / single':>15}")
    for mode in ("sync", "async", "ssp"):
        wall, train, acc = launch(mode, args.epochs)
        print(f"{mode:6} {wall:7.1f} {train:8.2f} {acc:9.4f} {train / base_time:15.1f}")


if __name__ == "__main__":
    main()
