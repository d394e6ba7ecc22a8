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
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, default_collate

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


def _clicks() -> Datasets:
    """A synthetic click log: 4 dense features, 4 Zipf-distributed categorical ids over a
    vocabulary of a million each, 0/1 clicks from a hidden model (ps.data.clicks)."""
    from ps.data.clicks import clicks

    return clicks()


BUILTIN = {"digits": digits, "synthetic": synthetic, "sequences": sequences, "clicks": _clicks}


def load_data(spec: str) -> Datasets:
    """A built-in name (digits, synthetic, sequences, clicks) or `package.module:factory`."""
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


class EpochBatches(Sampler):
    """Endless batches of indices out of `indices`: a shuffled order per epoch from a generator
    seeded by `seed`, and when fewer than `batch_size` are left of an epoch, the next epoch's order is
    appended to them, so every batch is full and the remainder leads the next batch."""

    def __init__(self, indices: list[int], batch_size: int, seed: int) -> None:
        if batch_size < 1 or not indices:
            raise InvalidArgument(f"batches need batch_size >= 1 ({batch_size}) and some indices ({len(indices)})")
        self.indices, self.batch_size, self.seed = list(indices), batch_size, seed

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed)
        epoch: list[int] = []
        at = 0  # epoch[at:] is still to come (a cursor: slicing off each batch would copy the rest)
        while True:
            if len(epoch) - at < self.batch_size:
                order = torch.randperm(len(self.indices), generator=gen).tolist()
                epoch, at = epoch[at:] + [self.indices[i] for i in order], 0
            yield epoch[at:at + self.batch_size]
            at += self.batch_size


def collate(samples: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of (input, target) samples, stacked along a new first dimension; a target
    goes through torch.as_tensor first (a Python int becomes int64, a float the default dtype). In
    a loader's worker the stack is written straight into shared memory (default_collate's way)."""
    xs, ys = zip(*samples)
    return (default_collate([torch.as_tensor(x) for x in xs]),
            default_collate([torch.as_tensor(y) for y in ys]))


class _Batch(Dataset):
    """`dataset` read a batch at a time: `[indices]` is one (inputs, targets) pair. A TensorDataset
    of (inputs, targets) is indexed with the whole list (one index_select per tensor: the same values as
    stacking its samples); any other dataset is read sample by sample and collated."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        plain = type(dataset) is TensorDataset and len(dataset.tensors) == 2  # a subclass may override __getitem__
        self.tensors = dataset.tensors if plain else None

    def __getitem__(self, take: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tensors is not None:
            index = torch.tensor(take, dtype=torch.long)
            return self.tensors[0].index_select(0, index), self.tensors[1].index_select(0, index)
        return collate([self.dataset[i] for i in take])

    def __len__(self) -> int:
        return len(self.dataset)


def _pair(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def loader(dataset: Dataset, indices: list[int], batch_size: int, seed: int, *, workers: int = 0,
           pin_memory: bool = False, prefetch: int = 4,
           start_method: str = "spawn") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled (inputs, targets) batches over `indices` (EpochBatches' order, deterministic
    per seed), read by a torch DataLoader.

    workers=0 reads in this process, on the caller's thread. workers > 0 reads in that many
    persistent worker processes, `prefetch` batches ahead each, started with `start_method`
    ("spawn": safe beside the client's threads; the dataset must pickle and its class import).
    Starting them costs seconds (each imports torch), so they pay off only when __getitem__ is
    costly (decoding, augmenting); the built-in in-memory datasets are gathered a batch at a time
    and need none. The batches do not depend on `workers`.

    pin_memory=True puts batches in page-locked memory for a faster, non-blocking copy to a CUDA
    device; it is ignored where CUDA is not available. The global torch RNG is left untouched."""
    if workers < 0:
        raise InvalidArgument(f"loader workers ({workers}) must be >= 0")
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = dict(persistent_workers=True, prefetch_factor=max(1, prefetch),
                     multiprocessing_context=start_method)
    data = DataLoader(_Batch(dataset), sampler=EpochBatches(indices, batch_size, seed), batch_size=None,
                      collate_fn=_pair, num_workers=workers, pin_memory=pin_memory and torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed), **extra)
    return iter(data)


def batches(dataset: Dataset, indices: list[int], batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`loader` in this process: endless shuffled batches over `indices`, reshuffled each epoch."""
    return loader(dataset, indices, batch_size, seed)


def _binary(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """The outputs as one logit per target when the model is binary (outputs [B] or [B, 1] for
    targets [B]); None for a classifier (outputs [..., C] for class targets [...])."""
    if outputs.dim() == targets.dim() + 1 and outputs.shape[-1] == 1:
        outputs = outputs.squeeze(-1)
    return outputs if outputs.shape == targets.shape else None


@torch.no_grad()
def _evaluate(model: torch.nn.Module, dataset: Dataset, device: torch.device, loss_fn=None, batch_size: int = 512,
              keep_logits: bool = False) -> dict:
    """One pass over `dataset` in eval mode: accuracy, mean loss, whether the model is binary,
    and (keep_logits) a binary model's logits and labels as float64 numpy arrays."""
    own_loss = loss_fn or getattr(model, "loss", None)
    was_training = model.training
    model.eval()
    correct = total = tokens = 0
    loss_sum = 0.0
    binary = False
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    read = _Batch(dataset)
    try:
        for start in range(0, len(dataset), batch_size):
            x, target = read[list(range(start, min(start + batch_size, len(dataset))))]
            out = model(x.to(device))
            target = target.to(device)
            logit = _binary(out, target)
            binary = logit is not None
            if logit is None:
                correct += int((out.argmax(-1) == target).sum())
                loss = (own_loss or torch.nn.functional.cross_entropy)(out, target)
            else:
                correct += int(((logit > 0) == (target > 0.5)).sum())
                loss = (own_loss(out, target) if own_loss else
                        torch.nn.functional.binary_cross_entropy_with_logits(logit, target.to(logit.dtype)))
                if keep_logits:
                    logits.append(logit.detach().to("cpu", torch.float64))
                    labels.append(target.detach().to("cpu", torch.float64))
            loss_sum += float(loss) * len(x)
            total += len(x)
            tokens += target.numel()
    finally:
        model.train(was_training)
    out = {"accuracy": correct / max(1, tokens), "loss": loss_sum / max(1, total), "binary": binary}
    if binary and keep_logits:
        out["logits"] = torch.cat(logits).reshape(-1).numpy()
        out["labels"] = torch.cat(labels).reshape(-1).numpy()
    return out


def evaluate(model: torch.nn.Module, dataset: Dataset, device: torch.device, loss_fn=None,
             batch_size: int = 512) -> tuple[float, float]:
    """(accuracy, mean loss) of the model on `dataset`; accuracy counts every target (each token of
    a sequence); loss_fn(outputs, targets) defaults to the model's `loss`, else cross-entropy. A
    binary model (one logit per sample: outputs [B] or [B, 1] for 0/1 targets [B]) is right where
    (logit > 0) == label, and its default loss is binary cross-entropy on the logits."""
    result = _evaluate(model, dataset, device, loss_fn, batch_size)
    return result["accuracy"], result["loss"]


def accuracy(model: torch.nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 512) -> float:
    """Fraction of `dataset` the model classifies correctly."""
    return evaluate(model, dataset, device, batch_size=batch_size)[0]


def auc(scores, labels) -> float:
    """The area under the ROC curve of `scores` for 0/1 `labels`, exactly: the probability that a
    random positive scores above a random negative, ties counting one half (Mann-Whitney U from
    average ranks). NaN when either class is absent or a score is NaN."""
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) > 0.5
    if len(s) != len(y):
        raise InvalidArgument(f"auc needs one label per score ({len(s)} scores, {len(y)} labels)")
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0 or np.isnan(s).any():
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranked = s[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # first position of each run of ties
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(s), np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based average rank of each run
    return float((ranks[y].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def logloss(logits, labels) -> float:
    """Mean binary cross-entropy of logits against 0/1 labels (float64, stable for any logit)."""
    z = np.asarray(logits, np.float64).reshape(-1)
    y = np.asarray(labels, np.float64).reshape(-1)
    return float(np.mean(np.logaddexp(0.0, z) - y * z)) if len(z) else float("nan")


def eval_metrics(model: torch.nn.Module, dataset: Dataset, device: torch.device, loss_fn=None,
                 batch_size: int = 512) -> dict[str, float]:
    """{"accuracy", "loss"} of the model on `dataset` in one pass (as `evaluate`), plus {"auc",
    "logloss"} for a binary model."""
    result = _evaluate(model, dataset, device, loss_fn, batch_size, keep_logits=True)
    out = {"accuracy": result["accuracy"], "loss": result["loss"]}
    if result["binary"]:
        out.update(auc=auc(result["logits"], result["labels"]), logloss=logloss(result["logits"], result["labels"]))
    return out


def binary_metrics(model: torch.nn.Module, dataset: Dataset, device: torch.device,
                   batch_size: int = 512) -> dict[str, float]:
    """{"auc", "logloss"} of a binary model (one logit per sample) on `dataset`."""
    result = _evaluate(model, dataset, device, batch_size=batch_size, keep_logits=True)
    if not result["binary"]:
        raise InvalidArgument("binary metrics need a model with one logit per sample (outputs [B] or [B, 1] "
                              "for 0/1 targets [B])")
    return {"auc": auc(result["logits"], result["labels"]), "logloss": logloss(result["logits"], result["labels"])}


def test_metrics(model: torch.nn.Module, dataset: Dataset, device: torch.device,
                 batch_size: int = 512) -> dict[str, float]:
    """What a worker logs about the test set: {"test_accuracy"}, plus {"test_auc",
    "test_logloss"} for a binary model; one pass over the data."""
    result = eval_metrics(model, dataset, device, batch_size=batch_size)
    out = {"test_accuracy": result["accuracy"]}
    if "auc" in result:
        out.update(test_auc=result["auc"], test_logloss=result["logloss"])
    return out


test_metrics.__test__ = False  # not a test, for pytest, in a test module that imports it
