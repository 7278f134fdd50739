"""The collectives of tensor parallelism as autograd functions, apart from the layers that use them.

Each function is a pair (forward, backward) over one process group, passed in explicitly:

- ``copy_to(x, group)``: identity forward, all_reduce backward (a replicated input feeds sharded
  layers; each rank's gradient covers only its shard, so the gradients are summed).
- ``reduce_from(x, group)``: all_reduce forward (partial sums of a row-parallel layer), identity backward.
- ``gather_from(x, group)``: all_gather along the last dim forward, keep this rank's slice backward.
- ``split_to(x, group)``: keep this rank's slice of the last dim forward, all_gather backward.

Under torch.compile the functional collectives (traceable) are used; eagerly the ordinary ones.

Used in lab2 §Tensor parallelism (Megatron MLP by hand).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if dist.get_world_size(group) == 1:
        return x
    return all_reduce_sum(x, group)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """A summed copy of ``x`` over ``group``: the functional (traceable) collective when compiled, so a
    compiled decode step with CUDA graphs keeps it inside the graph; the ordinary one eagerly."""
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as fc

        return fc.all_reduce(x, "sum", group)
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _all_gather_last(x: torch.Tensor, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[-1] % n:
        raise ValueError(f"last dim {x.shape[-1]} is not divisible by the group size {n}")
    return x.chunk(n, dim=-1)[r].contiguous()


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _split_last(g, ctx.group), None


class _SplitTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_last(g, ctx.group), None


def copy_to(x, group):
    return _CopyTo.apply(x, group)


def reduce_from(x, group):
    return _ReduceFrom.apply(x, group)


def gather_from(x, group):
    return _GatherFrom.apply(x, group)


def split_to(x, group):
    return _SplitTo.apply(x, group)


def same_on_all_ranks(x: torch.Tensor, group=None) -> bool:
    """True when every rank of ``group`` holds the same ``x`` (compares a checksum of its bytes)."""
    v = x.detach().to(torch.float64).flatten().cpu()
    w = torch.arange(1, v.numel() + 1, dtype=torch.float64)
    sig = torch.stack([v.sum(), (v * w).sum(), (v * v).sum()])
    if dist.get_backend(group) == "nccl":
        sig = sig.cuda()
    lo, hi = sig.clone(), sig.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(lo, hi))


def require_same_input(x: torch.Tensor, group=None, what: str = "input ids") -> None:
    """Raise on every rank if the ranks of ``group`` were given different ``x``: with TP, different inputs
    do not fail, they give silently wrong outputs."""
    if not same_on_all_ranks(x, group):
        raise ValueError(f"the {what} differ between ranks: every TP rank must get the same input (same "
                         f"seed / same batch; broadcast it from rank 0 with dist.broadcast), or the outputs "
                         f"are silently wrong")
