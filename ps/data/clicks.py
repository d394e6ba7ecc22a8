"""A synthetic click log for recommendation models (`--data clicks`): generated from a fixed seed
by vectorised numpy, the same on every machine, no files.

Each sample is one impression: DENSE float features, CATEGORICAL hashed ids and a 0/1 click.

- Categorical feature f draws a Zipf rank r in [1, VOCAB] (P(r) proportional to r**-ZIPF) and
  its id is `mix64(r + f * 2**32) >> 12`: 52-bit ids spread over int64 like hashed feature values
  (unbounded, not 0..VOCAB-1; features never share an id in practice), exactly representable in
  float64.
- Dense features are standard normal.
- The click comes from a hidden logistic model: logit = BIAS + sum_f ID_SCALE * w(f, id)
  + DENSE_WEIGHTS . dense + PAIR_SCALE * dense[0] * dense[1], where w(f, id) is a standard
  normal computed from a hash of (f, id) alone; the label is Bernoulli(sigmoid(logit)) drawn
  from the seed. Frequent ids can be learned from the data; the long tail is noise to a model
  (as it is in real click logs), so a model's test AUC tops out below the hidden model's own.

A sample's input is one float64 row [dense..., ids...] (ids < 2**53 survive float64 exactly; a
model splits the row, see ps.models.dlrm); its target is a float32 0/1.
"""

from __future__ import annotations

import numpy as np
import torch

from ps.data import Datasets
from ps.errors import InvalidArgument
from ps.tables import mix64

DENSE = 4
CATEGORICAL = 4
VOCAB = 1_000_000
ZIPF = 1.1
ID_BITS = 52
ID_SCALE = 0.8
DENSE_WEIGHTS = (0.8, -0.6, 0.4, 0.0)  # the last dense feature is pure noise
PAIR_SCALE = 0.3
BIAS = -1.0  # about a 30% click rate
SEED = 20240601

_WEIGHT_SALT = np.uint64(0x77E1_6E70_C11C_0000)


def feature_ids(ranks: np.ndarray, feature: int) -> np.ndarray:
    """The int64 ids of Zipf ranks (1..VOCAB) of categorical feature `feature`."""
    key = ranks.astype(np.uint64) + np.uint64(feature << 32)
    return (mix64(key) >> np.uint64(64 - ID_BITS)).astype(np.int64)


def hidden_weights(ids: np.ndarray, feature: int) -> np.ndarray:
    """The hidden model's standard-normal weight of each id of `feature` (float64)."""
    salt = mix64(np.array([feature], np.uint64) ^ _WEIGHT_SALT)
    with np.errstate(over="ignore"):
        bits1 = mix64(ids.view(np.uint64) ^ salt)
        bits2 = mix64(bits1 + np.uint64(0x9E3779B97F4A7C15))
    u1 = ((bits1 >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
    u2 = (bits2 >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)  # Box-Muller


def _zipf_cdf() -> np.ndarray:
    p = np.arange(1, VOCAB + 1, dtype=np.float64) ** -ZIPF
    cdf = np.cumsum(p)
    return cdf / cdf[-1]


def hidden_logits(x: np.ndarray) -> np.ndarray:
    """The hidden model's logit of each row of inputs [N, DENSE + CATEGORICAL] (float64)."""
    dense, ids = x[:, :DENSE], x[:, DENSE:].astype(np.int64)
    logit = BIAS + dense @ np.asarray(DENSE_WEIGHTS) + PAIR_SCALE * dense[:, 0] * dense[:, 1]
    for f in range(ids.shape[1]):
        logit += ID_SCALE * hidden_weights(ids[:, f], f)
    return logit


def generate(num_samples: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(inputs float64 [num_samples, DENSE + CATEGORICAL], labels float32 [num_samples])."""
    rng = np.random.default_rng(seed)
    cdf = _zipf_cdf()
    x = np.empty((num_samples, DENSE + CATEGORICAL), np.float64)
    x[:, :DENSE] = rng.standard_normal((num_samples, DENSE))
    for f in range(CATEGORICAL):
        ranks = np.minimum(np.searchsorted(cdf, rng.random(num_samples), side="right"), VOCAB - 1) + 1
        x[:, DENSE + f] = feature_ids(ranks, f)
    p = 1.0 / (1.0 + np.exp(-hidden_logits(x)))
    y = (rng.random(num_samples) < p).astype(np.float32)
    return x, y


def clicks(num_train: int = 100_000, num_test: int = 20_000) -> Datasets:
    """The click log: `num_train` training and `num_test` test impressions (one draw, split in
    order: the test set is a later stretch of the same log)."""
    if num_train < 1 or num_test < 0:
        raise InvalidArgument(f"clicks needs num_train >= 1 ({num_train}) and num_test >= 0 ({num_test})")
    x, y = generate(num_train + num_test)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    test = (xs[num_train:], ys[num_train:]) if num_test else None
    return Datasets((xs[:num_train], ys[:num_train]), test, (DENSE + CATEGORICAL,), 1)
