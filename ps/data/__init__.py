"""Built-in datasets, user datasets (`--data pkg.mod:factory`) and per-worker data shards.

A data factory returns `Datasets(train, test, input_shape, num_classes)`; `train` and `test` are
map-style datasets of (input, target) pairs, or a pair of tensors (inputs, targets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ps.errors import InvalidArgument
from ps.plugins import call_with_known, load_object

_SPLIT_SEED = 0  # the train/test split never depends on the training seed


@dataclass
class Datasets:
    train: Any
    test: Any
    input_shape: tuple[int, ...]
    num_classes: int

    def __post_init__(self) -> None:
        self.train = _as_dataset(self.train, "train")
        self.test = _as_dataset(self.test, "test") if self.test is not None else None


def _as_dataset(obj: Any, what: str) -> Dataset:
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj):
        return TensorDataset(*obj)
    if not hasattr(obj, "__getitem__") or not hasattr(obj, "__len__"):
        raise InvalidArgument(f"{what} data ({type(obj).__name__}) must be a map-style dataset or (inputs, targets)")
    return obj


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float) -> tuple[TensorDataset, TensorDataset]:
    perm = torch.from_numpy(np.random.default_rng(_SPLIT_SEED).permutation(len(x)))
    n_test = int(round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def digits() -> Datasets:
    """scikit-learn's 8x8 handwritten digits (1797 images, shipped inside its wheel: offline)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(raw.target, dtype=torch.long)
    train, test = _split(x, y, 0.2)
    return Datasets(train, test, (1, 8, 8), 10)


def synthetic(num_samples: int = 4096, features: int = 32, num_classes: int = 10) -> Datasets:
    """Gaussian clusters, one per class: a quick, dependency-free classification task."""
    gen = torch.Generator().manual_seed(_SPLIT_SEED)
    centers = torch.randn(num_classes, features, generator=gen) * 2.0
    y = torch.randint(0, num_classes, (num_samples,), generator=gen)
    x = centers[y] + torch.randn(num_samples, features, generator=gen)
    train, test = _split(x, y, 0.2)
    return Datasets(train, test, (features,), num_classes)


def sequences(num_samples: int = 2048, seq_len: int = 32, vocab: int = 64) -> Datasets:
    """Next-token prediction on a seeded Markov chain: each token has three likely successors
    (probabilities 0.7, 0.2, 0.1), so a model can go from ln(vocab) ~ 4.2 nats to ~0.8."""
    gen = torch.Generator().manual_seed(_SPLIT_SEED)
    successors = torch.stack([torch.randperm(vocab, generator=gen)[:3] for _ in range(vocab)])
    choice = torch.multinomial(torch.tensor([0.7, 0.2, 0.1]), num_samples * seq_len, replacement=True,
                               generator=gen).view(num_samples, seq_len)
    tokens = torch.empty(num_samples, seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (num_samples,), generator=gen)
    for t in range(seq_len):
        tokens[:, t + 1] = successors[tokens[:, t], choice[:, t]]
    train, test = _split(tokens[:, :-1], tokens[:, 1:], 0.2)
    return Datasets(train, test, (seq_len,), vocab)


BUILTIN = {"digits": digits, "synthetic": synthetic, "sequences": sequences}


def load_data(spec: str) -> Datasets:
    """A built-in name (digits, synthetic) or `package.module:factory`."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    if ":" not in spec:
        raise InvalidArgument(f"data ({spec!r}) must be one of {sorted(BUILTIN)} or package.module:factory")
    data = call_with_known(load_object(spec))
    if not isinstance(data, Datasets):
        raise InvalidArgument(f"data factory {spec!r} returned {type(data).__name__}, not ps.data.Datasets")
    return data


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """This worker's share of n samples: every world-th index, starting at rank."""
    return list(range(rank, n, world))


def steps_per_epoch(n: int, world: int, batch_size: int) -> int:
    """Steps for every worker to see its share once (the largest share decides)."""
    return max(1, math.ceil(math.ceil(n / world) / batch_size))


def batches(dataset: Dataset, indices: list[int], batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches over `indices`, reshuffled each epoch (deterministic per seed)."""
    gen = torch.Generator().manual_seed(seed)
    epoch: list[int] = []
    while True:
        if len(epoch) < batch_size:
            order = torch.randperm(len(indices), generator=gen).tolist()
            epoch += [indices[i] for i in order]
        take, epoch = epoch[:batch_size], epoch[batch_size:]
        xs, ys = zip(*(dataset[i] for i in take))
        yield torch.stack(xs), torch.stack([torch.as_tensor(t) for t in ys])


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, device: torch.device, loss_fn=None,
             batch_size: int = 512) -> tuple[float, float]:
    """(accuracy, mean loss) of the model on `dataset`; accuracy counts every target (each token of
    a sequence); loss_fn(outputs, targets) defaults to the model's `loss`, else cross-entropy."""
    loss_fn = loss_fn or getattr(model, "loss", None) or torch.nn.functional.cross_entropy
    was_training = model.training
    model.eval()
    correct = total = tokens = 0
    loss_sum = 0.0
    for start in range(0, len(dataset), batch_size):
        xs, ys = zip(*(dataset[i] for i in range(start, min(start + batch_size, len(dataset)))))
        out = model(torch.stack(xs).to(device))
        target = torch.stack([torch.as_tensor(t) for t in ys]).to(device)
        correct += int((out.argmax(-1) == target).sum())
        loss_sum += float(loss_fn(out, target)) * len(xs)
        total += len(xs)
        tokens += target.numel()
    model.train(was_training)
    return correct / max(1, tokens), loss_sum / max(1, total)


def accuracy(model: torch.nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 512) -> float:
    """Fraction of `dataset` the model classifies correctly."""
    return evaluate(model, dataset, device, batch_size=batch_size)[0]
