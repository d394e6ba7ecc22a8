"""The only module that calls collectives: autograd primitives named by direction (Megatron's
mappings). Each is an identity for a group of one.

    copy_to      forward: identity            backward: all-reduce (sum) over the group
    reduce_from  forward: all-reduce (sum)    backward: identity
    scatter_to   forward: keep this rank's chunk of the last dim    backward: all-gather it
    gather_from  forward: all-gather along the last dim             backward: keep this rank's chunk
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ps.tp.groups import TPGroup


def _all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=tp.group)
    return x


def _split_last(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return torch.chunk(x, tp.size, dim=-1)[tp.rank].contiguous()


def _gather_last(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.tp), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        return _all_reduce(x.clone(), tp)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _split_last(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.tp), None


class _GatherFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _gather_last(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.tp), None


def copy_to(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _CopyTo.apply(x, tp)


def reduce_from(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _ReduceFrom.apply(x, tp)


def scatter_to(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _ScatterTo.apply(x, tp)


def gather_from(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _GatherFrom.apply(x, tp)


def broadcast_(tensors: list[torch.Tensor], tp: TPGroup, src: int = 0) -> None:
    """Overwrite `tensors` on every rank with rank `src`'s values (no autograd)."""
    if tp.size == 1:
        return
    for t in tensors:
        dist.broadcast(t, src=src, group=tp.group)


def all_reduce_max(value: int, tp: TPGroup) -> int:
    if tp.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend(tp.group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=tp.group)
    return int(t.item())
