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
