"""How a worker's parameters map to parameter-server keys, with or without tensor parallelism.

A tensor-parallel rank's slice of a split parameter `name` is the key `name@tpR`; replicated
parameters keep their name, and only TP rank 0 pulls (then broadcasts) and pushes them. Every
rank knows the initial value of every key (all build the same unsharded model from the seed), so
any rank can initialise the servers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ps.tp.groups import TPGroup


def tp_key(name: str, rank: int) -> str:
    return f"{name}@tp{rank}"


@dataclass
class Binding:
    params: dict[str, nn.Parameter]   # this rank's parameters, by key
    own: list[str]                    # the keys this rank pulls and pushes
    replicated: list[str]             # keys rank 0 broadcasts to the group after each pull
    init: dict[str, torch.Tensor]     # the initial value of every key of the plan
    tp: TPGroup = field(default_factory=TPGroup)


def plain(model: nn.Module) -> Binding:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return Binding(params, list(params), [], {n: p.detach() for n, p in params.items()})


def tensor_parallel(model: nn.Module, full_state: dict[str, torch.Tensor], dims: dict[str, int],
                    tp: TPGroup) -> Binding:
    """Bind a tensor-parallel model (already holding its shards of `full_state`)."""
    if tp.size == 1:
        return plain(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {(tp_key(n, tp.rank) if n in dims else n): p for n, p in model.named_parameters() if p.requires_grad}
    own = [tp_key(n, tp.rank) if n in dims else n for n in names if n in dims or tp.rank == 0]
    replicated = [n for n in names if n not in dims]
    return Binding(params, own, replicated, tp_init(full_state, dims, tp.size), tp)


def tp_init(full_state: dict[str, torch.Tensor], dims: dict[str, int], size: int) -> dict[str, torch.Tensor]:
    """Every key of a TP job's plan with its value cut from the unsharded state."""
    if size == 1:
        return dict(full_state)
    init: dict[str, torch.Tensor] = {}
    for n, t in full_state.items():
        if n in dims:
            for r, chunk in enumerate(torch.chunk(t, size, dim=dims[n])):
                init[tp_key(n, r)] = chunk
        else:
            init[n] = t
    return init


def unshard_keys(weights: dict[str, torch.Tensor], dims: dict[str, int], size: int) -> dict[str, torch.Tensor]:
    """Unsharded parameters from every key's value (what an observer of a TP job pulls)."""
    if size == 1:
        return dict(weights)
    out = {n: t for n, t in weights.items() if "@tp" not in n}
    for n, dim in dims.items():
        out[n] = torch.cat([weights[tp_key(n, r)] for r in range(size)], dim=dim)
    return out
