"""Built-in models and loading of user models (`--model pkg.mod:factory`).

A factory returns a `torch.nn.Module`; it may accept `input_shape` and `num_classes` (taken from
the dataset). A model may define `loss(outputs, targets)`; otherwise cross-entropy is used.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from ps.errors import InvalidArgument
from ps.plugins import call_with_known, load_object


class MLP(nn.Module):
    def __init__(self, input_shape=(1, 8, 8), num_classes: int = 10, hidden: int = 128):
        super().__init__()
        features = int(torch.Size(input_shape).numel())
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(self, input_shape=(1, 8, 8), num_classes: int = 10, channels: int = 32):
        super().__init__()
        if len(input_shape) != 3 or min(input_shape[1:]) < 2:
            raise InvalidArgument(f"cnn needs images: input_shape ({tuple(input_shape)}) must be (C, H, W), H, W >= 2")
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * (h // 2) * (w // 2), 64), nn.ReLU(),
                                  nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _gpt_tiny(**kwargs):
    from ps.models.gpt import gpt_tiny

    return gpt_tiny(**kwargs)


def _dlrm_tiny(**kwargs):
    from ps.models.dlrm import dlrm_tiny

    return call_with_known(dlrm_tiny, **kwargs)


BUILTIN: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": CNN, "gpt-tiny": _gpt_tiny, "dlrm-tiny": _dlrm_tiny}
TP_AWARE = {"gpt-tiny"}


def build_model(spec: str, input_shape: tuple[int, ...], num_classes: int, **extra) -> nn.Module:
    """A built-in name (mlp, cnn, gpt-tiny, dlrm-tiny) or `package.module:factory`. `extra` (e.g. `tp`,
    `recompute`) goes to factories that accept it; a factory that does not accept `tp` cannot run
    tensor-parallel."""
    if spec in BUILTIN:
        factory = BUILTIN[spec]
    elif ":" in spec:
        factory = load_object(spec)
    else:
        raise InvalidArgument(f"model ({spec!r}) must be one of {sorted(BUILTIN)} or package.module:factory")
    tp = extra.get("tp")
    if tp is not None and tp.size > 1 and spec not in TP_AWARE and not _accepts(factory, "tp"):
        raise InvalidArgument(f"model ({spec!r}) does not support tensor parallelism: its factory takes no `tp`")
    model = call_with_known(factory, input_shape=input_shape, num_classes=num_classes, **extra)
    if not isinstance(model, nn.Module):
        raise InvalidArgument(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _accepts(factory: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def model_loss(model: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    loss_fn = getattr(model, "loss", None)
    if callable(loss_fn):
        return loss_fn(outputs, targets)
    return nn.functional.cross_entropy(outputs, targets)
