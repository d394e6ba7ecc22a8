"""Why async training can collapse when a worker comes back late, shown in one process with no
parameter server at all.

An async run of two workers in which one is away for a while (it waited out a server restart
longer than the other) trains alone on fresh gradients, then with the late one back, on
gradients a version or two stale. This replays that: the built-in mlp on digits, the servers'
default optimizer (momentum SGD, lr 0.05, momentum 0.9, applied as torch.optim.SGD does), worker
0's batches alone with fresh gradients for the first `--switch` updates, then workers 0 and 1
alternating, each gradient computed on the weights `--delay` updates old. Trained alone, the
model settles where fresh-gradient momentum SGD is just stable; the same lr and momentum with
delayed gradients are not stable there, and the loss blows up. `--staleness-lr` scales each
update by 1 / (1 + delay), as `ps-server --staleness-lr` does.

    python benchmarks/rejoin.py                 # each case below, one line each
    python benchmarks/rejoin.py --switch 200 --delay 1 [--staleness-lr]
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch import nn

from ps.data import accuracy, batches, digits, shard_indices, steps_per_epoch
from ps.models import MLP

LR, MOMENTUM, BATCH = 0.05, 0.9, 32
CASES = [(0, 1, False), (200, 0, False), (200, 1, False), (240, 1, False), (200, 2, False),
         (200, 1, True), (240, 1, True), (200, 2, True)]


def run(switch: int, delay: int, staleness_lr: bool, epochs: int = 12) -> tuple[float, float]:
    """(test accuracy at the end, the highest batch loss after the switch)."""
    torch.manual_seed(0)
    data = digits()
    n = len(data.train)
    per_worker = round(epochs * steps_per_epoch(n, 2, BATCH))  # ps-worker's --epochs 12 on 2 workers
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    streams = [batches(data.train, shard_indices(n, r, 2), BATCH, r) for r in range(2)]
    weights = collections.deque([[p.detach().clone() for p in model.parameters()]], maxlen=delay + 1)
    worst = 0.0
    for t in range(2 * per_worker - switch):  # worker 0 alone for `switch` updates, then both
        together = t >= switch
        x, y = next(streams[t % 2 if together else 0])
        lag = delay if together else 0
        now = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():  # the gradient is computed on the weights `lag` updates old
            for p, old in zip(model.parameters(), weights[-1 - min(lag, len(weights) - 1)]):
                p.copy_(old)
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        with torch.no_grad():
            for p, w in zip(model.parameters(), now):
                p.copy_(w)
        for group in opt.param_groups:
            group["lr"] = LR / (1 + lag) if staleness_lr else LR
        opt.step()
        weights.append([p.detach().clone() for p in model.parameters()])
        if together and t > switch:
            worst = max(worst, float(loss.detach()))
    return accuracy(model, data.test, torch.device("cpu")), worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--switch", type=int, help="updates worker 0 makes alone before worker 1 is back")
    ap.add_argument("--delay", type=int, default=1, help="staleness of every gradient once both train")
    ap.add_argument("--staleness-lr", action="store_true", help="scale each update by 1 / (1 + delay)")
    args = ap.parse_args()
    cases = CASES if args.switch is None else [(args.switch, args.delay, args.staleness_lr)]
    for switch, delay, slr in cases:
        acc, worst = run(switch, delay, slr)
        print(f"alone for {switch:3d} updates, then delay {delay}{' staleness-lr' if slr else '             '}: "
              f"test accuracy {acc:.3f}, worst batch loss after the switch {worst:.2f}")


if __name__ == "__main__":
    main()
