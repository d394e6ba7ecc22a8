"""A user model with a parameter no batch ever gives a gradient (for tests/rpc/test_no_grad.py)."""

import torch
from torch import nn


class WithUnused(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.Size(input_shape).numel()), 24), nn.Tanh(),
                                  nn.Linear(24, num_classes))
        self.unused = nn.Parameter(torch.ones(7))  # e.g. a head another task would train

    def forward(self, x):
        return self.body(x)


def model(input_shape, num_classes):
    return WithUnused(input_shape, num_classes)
