"""Tensor parallelism: Megatron's column- and row-parallel layers by hand, the same through PyTorch's
``parallelize_module``, transformers' own TP, and the checks that keep them honest.

- ``ColumnParallelLinear`` / ``RowParallelLinear``: cut from a dense ``nn.Linear`` (its output rows /
  input columns split over the group), communication through ``labutils.parallel.comms``.
- ``MegatronMLP.from_dense(mlp, group)``: a Mistral MLP (``gate_proj``, ``up_proj``, ``down_proj``):
  gate and up column-parallel, down row-parallel: ONE all_reduce forward (after down) and one backward
  (before gate/up). ``parallelize_mlp(mlp, mesh)``: the same split with ``ColwiseParallel`` /
  ``RowwiseParallel``, behind the same interface (``forward(x)`` -> the full output on every rank).
- ``check_tp_size(config, tp)``: a TP size must divide the heads and the KV heads - said before
  transformers fails much later with ``shape '[2, 48, -1, 32]' is invalid``.
- ``load_hf_tp(path, tp)``: transformers' TP (``DistributedConfig(tp_size=tp)``; ``tp_plan=`` is
  deprecated from transformers 5.18).
- ``shard_lean(model, group)``: cut a ``labutils.lean.LeanMistral`` for TP decode (gpt-fast's ``apply_tp``):
  whole heads and FFN columns per rank, an all_reduce after ``wo`` and after ``w2``.

Used in lab2 §Tensor parallelism and §mistral-7b across 4 devices.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import comms


def _chunk(w: torch.Tensor, n: int, r: int, dim: int) -> torch.Tensor:
    if w.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {w.shape[dim]} is not divisible by the TP size {n}: "
                         f"pick a TP size that divides it")
    return w.chunk(n, dim=dim)[r].detach().clone()


class ColumnParallelLinear(nn.Module):
    """y_r = x @ W_r^T: this rank's block of output features. ``gather`` all-gathers y (else it stays split)."""

    def __init__(self, dense: nn.Linear, group, gather: bool = False):
        super().__init__()
        n, r = dist.get_world_size(group), dist.get_rank(group)
        self.group, self.gather = group, gather
        self.weight = nn.Parameter(_chunk(dense.weight, n, r, 0))
        self.bias = nn.Parameter(_chunk(dense.bias, n, r, 0)) if dense.bias is not None else None

    def forward(self, x):
        y = F.linear(comms.copy_to(x, self.group), self.weight, self.bias)
        return comms.gather_from(y, self.group) if self.gather else y


class RowParallelLinear(nn.Module):
    """y = sum_r x_r @ W_r^T: the input's features split over ranks, partial sums all-reduced."""

    def __init__(self, dense: nn.Linear, group, split_input: bool = False):
        super().__init__()
        n, r = dist.get_world_size(group), dist.get_rank(group)
        self.group, self.split_input = group, split_input
        self.weight = nn.Parameter(_chunk(dense.weight, n, r, 1))
        self.bias = nn.Parameter(dense.bias.detach().clone()) if dense.bias is not None else None

    def forward(self, x):
        x = comms.split_to(x, self.group) if self.split_input else x
        y = comms.reduce_from(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class DenseMLP(nn.Module):
    """A Mistral MLP: down(silu(gate(x)) * up(x)) (the names of HF's MistralMLP)."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MegatronMLP(nn.Module):
    """The dense MLP cut over ``group``; same forward and (summed) gradients as the dense one."""

    def __init__(self, gate, up, down):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down

    @classmethod
    def from_dense(cls, mlp: nn.Module, group) -> MegatronMLP:
        return cls(ColumnParallelLinear(mlp.gate_proj, group), ColumnParallelLinear(mlp.up_proj, group),
                   RowParallelLinear(mlp.down_proj, group))

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def parallelize_mlp(mlp: nn.Module, mesh) -> nn.Module:
    """The same Megatron split through ``torch.distributed.tensor.parallel`` (DTensor weights); ``mlp`` is
    changed in place and returned. Input and output are plain tensors, replicated on every rank."""
    import copy

    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()}
    return parallelize_module(copy.deepcopy(mlp), mesh, plan)


def local_grad(p: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient as this rank holds it (a DTensor's local shard)."""
    g = p.grad
    return g.to_local() if hasattr(g, "to_local") else g


# ---------------------------------------------------------------- transformers' TP
def check_tp_size(config, tp: int) -> None:
    """ValueError unless ``tp`` divides the attention heads and the KV heads of ``config`` (HF or Preset)."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if tp >= 1 and heads % tp == 0 and kv % tp == 0:
        return
    ok = [d for d in range(1, heads + 1) if heads % d == 0 and kv % d == 0]
    raise ValueError(f"TP size {tp} does not divide the model's {heads} attention heads and {kv} KV heads "
                     f"(each rank must own whole heads): use a TP size in {ok}. Without this check transformers "
                     f"loads the model and fails later in attention with \"shape '[...]' is invalid\".")


def load_hf_tp(path: str, tp: int, dtype=torch.float32):
    """A HF causal LM loaded with transformers' TP plan (``DistributedConfig(tp_size=tp)``).

    ``tp`` = the world size: one TP group. ``tp`` < world: a (world/tp) x tp mesh from ``ParallelDims``, each
    row one TP group holding a full replica (transformers then applies TP only; its ``fsdp_size`` is set
    to world/tp solely to pass its tp * fsdp == world check - no FSDP is applied)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from .mesh import ParallelDims

    check_tp_size(AutoConfig.from_pretrained(path), tp)
    world = dist.get_world_size()
    if world % tp:
        raise ValueError(f"TP size {tp} does not divide the world size {world}: start a multiple of {tp} ranks")
    if tp == world:
        cfg, kw = DistributedConfig(tp_size=tp), {}
    else:
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        cfg = DistributedConfig(tp_size=tp, fsdp_size=world // tp)
        kw = {"device_mesh": ParallelDims(dp=world // tp, tp=tp).build(dev)}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, distributed_config=cfg, **kw).eval()


# ---------------------------------------------------------------- TP for the lean decode model
class _ReducedLinear(nn.Module):
    """A row-parallel linear for decode: local matmul, then all_reduce of the partial sums (no autograd)."""

    def __init__(self, weight: torch.Tensor, group):
        super().__init__()
        self.weight, self.group = nn.Parameter(weight, requires_grad=False), group

    def forward(self, x):  # the group size is > 1 (shard_lean is not asked for 1 rank): no size query here
        return comms.all_reduce_sum(F.linear(x, self.weight), self.group)


def _rows(w: torch.Tensor, sizes: list[int], n: int, r: int) -> torch.Tensor:
    """Of a fused weight whose output rows are blocks of ``sizes``, this rank's slice of each block."""
    return torch.cat([_chunk(part, n, r, 0) for part in w.split(sizes, dim=0)])


def shard_lean(model, group):
    """Cut a ``LeanMistral`` (in place) for TP over ``group``: heads, KV heads and FFN columns divided,
    ``wo`` and ``w2`` row-parallel with an all_reduce. Embedding, norms and head stay replicated."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    c = model.c
    check_tp_size(type("C", (), {"num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads}), n)
    hd = c.head_dim
    small = dataclasses.replace(c, n_heads=c.n_heads // n, n_kv_heads=c.n_kv_heads // n, ffn=c.ffn // n)
    for b in model.layers:
        qkv = [c.n_heads * hd, c.n_kv_heads * hd, c.n_kv_heads * hd]
        b.wqkv.weight = nn.Parameter(_rows(b.wqkv.weight, qkv, n, r), requires_grad=False)
        b.w13.weight = nn.Parameter(_rows(b.w13.weight, [c.ffn, c.ffn], n, r), requires_grad=False)
        b.wo = _ReducedLinear(_chunk(b.wo.weight, n, r, 1), group)
        b.w2 = _ReducedLinear(_chunk(b.w2.weight, n, r, 1), group)
        b.c = small
    model.c = small
    return model


def decode_rows(rec: dict) -> list[dict]:
    """lab2_decode's layouts as table rows: tokens/s, latency, prefill, memory, speed-up vs TP=1."""
    base = {x["batch"]: x["tok_s"] for x in rec["decode"][0]["runs"]}
    return [{"layout": r["layout"], "batch": x["batch"], "logits rel_err": r["rel_err"], "tok/s": x["tok_s"],
             "vs TP=1": x["tok_s"] / base[x["batch"]], "ms/token p50": x["itl_p50_s"] * 1e3,
             "p20-p80 ms": f"{x['itl_p20_s'] * 1e3:.3g}-{x['itl_p80_s'] * 1e3:.3g}",
             "prefill ms": x["prefill_s"] * 1e3, "MB/device": r["max_bytes_per_device"] / 1e6}
            for r in rec["decode"] for x in r["runs"]]
