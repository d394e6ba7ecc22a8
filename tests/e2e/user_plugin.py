"""A user's own model and data, loaded by ps-worker through --model / --data."""

import torch

from ps.data import Datasets


def make_model(input_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[0], num_classes))


def make_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 6, generator=gen)
    y = (x[:, 0] > 0).long()
    return Datasets((x[:400], y[:400]), (x[400:], y[400:]), (6,), 2)


class _FailsInTraining(torch.nn.Linear):
    def forward(self, x):
        raise RuntimeError("this model fails in its first step")


def make_failing_model(input_shape, num_classes):
    """Builds (so a launcher's check passes) but fails in the worker's first step."""
    return torch.nn.Sequential(torch.nn.Flatten(), _FailsInTraining(input_shape[0], num_classes))
