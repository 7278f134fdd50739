"""Data parallelism: every rank a replica (or a shard) of the model, each on its own slice of the batch.

One interface, ``wrap(model, kind, group)``, for every kind; call the result like the model, then
``.sync()`` after ``loss.backward()`` and before ``optimizer.step()``:

- ``"naive"``: after backward, all-reduce every gradient one by one and divide by the world size.
- ``"bucket"``: gradients packed into buckets of about ``bucket_bytes``, in the order backward produces
  them; a hook (``register_post_accumulate_grad_hook``) launches a bucket's asynchronous all-reduce the
  moment its last gradient is ready, so communication overlaps the rest of the backward pass.
  ``"bucket-late"``: the same buckets, all-reduced only after backward (no overlap), for comparison.
- ``"ddp"``: ``torch.nn.parallel.DistributedDataParallel`` (buckets + overlap, in C++).
- ``"fsdp"``: FSDP2, ``fully_shard`` on every decoder layer, then the root, over an explicit mesh;
  parameters, gradients and optimizer state are sharded (ZeRO-3).
- ``"local"``: no communication at all (each rank keeps its own gradients): the compute-only time.

The per-rank memory of ZeRO stages 0-3 is ``labutils.parallel.memory.per_rank_training_bytes``; ``rank_bytes``
measures parameters, gradients and optimizer state held by this rank (local shards of DTensors).

Used in lab2 §Data parallelism and §Scaling laws.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

KINDS = ("naive", "bucket", "bucket-late", "ddp", "fsdp", "local")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def rank_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Bytes this rank holds: parameters, gradients, optimizer state (local shards for FSDP's DTensors)."""
    size = (lambda t: _local(t).numel() * _local(t).element_size())
    params = list(module.parameters())
    state = [v for s in (optimizer.state.values() if optimizer else []) for v in s.values()
             if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {"params": sum(map(size, params)), "grads": sum(size(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(map(size, state))}


def _broadcast_params(module: nn.Module, group) -> None:
    """Start every replica from the same weights (those of the group's first rank)."""
    src = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t, src=src, group=group)


class _Wrapper:
    def __init__(self, module: nn.Module, kind: str):
        self.module, self.kind = module, kind

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def sync(self) -> None:
        """Gradients averaged over the group (a no-op where the wrapped module does it itself)."""


class NaiveDP(_Wrapper):
    """All-reduce every gradient after backward (picotron's DataParallelNaive does the same)."""

    def __init__(self, module, group=None):
        super().__init__(module, "naive")
        self.group, self.world = group, dist.get_world_size(group)
        _broadcast_params(module, group)

    def sync(self) -> None:
        for p in self.module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)
                p.grad /= self.world


class BucketDP(_Wrapper):
    """Buckets of gradients all-reduced asynchronously as backward fills them (``overlap``), or after it."""

    def __init__(self, module, group=None, bucket_bytes: int = 2**20, overlap: bool = True):
        super().__init__(module, "bucket" if overlap else "bucket-late")
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
        self.group, self.world = group, dist.get_world_size(group)
        _broadcast_params(module, group)
        self.buckets: list[list[nn.Parameter]] = [[]]
        size = 0
        for p in reversed([p for p in module.parameters() if p.requires_grad]):  # ~ the order backward runs
            if size >= bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.where = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.left = [len(b) for b in self.buckets]
        self.works: dict[int, tuple] = {}
        if overlap:
            for p in module.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._ready)

    def _ready(self, p: nn.Parameter) -> None:
        i = self.where[id(p)]
        self.left[i] -= 1
        if self.left[i] == 0:
            self._launch(i)

    def _launch(self, i: int) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.buckets[i]]
        flat = torch.cat([g.flatten() for g in grads])
        self.works[i] = (dist.all_reduce(flat, group=self.group, async_op=True), flat)

    def sync(self) -> None:
        for i in range(len(self.buckets)):
            if i not in self.works:  # no overlap, or a bucket whose gradients never all arrived
                self._launch(i)
        for i, (work, flat) in self.works.items():
            work.wait()
            flat /= self.world
            offset = 0
            for p in self.buckets[i]:
                n = p.numel()
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(flat[offset:offset + n].view_as(p))
                offset += n
        self.works, self.left = {}, [len(b) for b in self.buckets]


def mesh_1d(group_ranks: list[int] | None = None, device_type: str = "cpu"):
    """A 1-D DeviceMesh over ``group_ranks`` (default: every rank); its size must be the group's."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    world = dist.get_world_size()
    if group_ranks is None or list(group_ranks) == list(range(world)):
        return init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    return DeviceMesh(device_type, list(group_ranks), mesh_dim_names=("dp",))


def fully_shard_model(model: nn.Module, mesh, mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer (one all-gather each), then the root (embeddings, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh.ndim != 1:
        raise ValueError(f"fully_shard_model shards over a 1-D mesh, got {mesh.ndim} dimensions: pass mesh['dp']")
    kw = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(),
          "reshard_after_forward": reshard_after_forward}
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def wrap(model: nn.Module, kind: str, group=None, *, mesh=None, bucket_bytes: int = 2**20, mp_policy=None):
    """``model`` made data-parallel over ``group`` (default: the world) by ``kind`` (see the module doc)."""
    if kind not in KINDS:
        raise ValueError(f"unknown data-parallel kind {kind!r}: one of {', '.join(KINDS)}")
    if mesh is not None and group is not None and mesh.size() != dist.get_world_size(group):
        raise ValueError(f"the mesh has {mesh.size()} ranks but the group has {dist.get_world_size(group)}: "
                         f"build the mesh over the group's ranks (mesh_1d(ranks))")
    if kind == "naive":
        return NaiveDP(model, group)
    if kind in ("bucket", "bucket-late"):
        return BucketDP(model, group, bucket_bytes, overlap=kind == "bucket")
    if kind == "ddp":
        dev = next(model.parameters()).device
        ids = [dev.index] if dev.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, process_group=group,
                                                        bucket_cap_mb=bucket_bytes / 2**20)
        return _Wrapper(ddp, "ddp")
    if kind == "fsdp":
        dev = next(model.parameters()).device
        return _Wrapper(fully_shard_model(model, mesh or mesh_1d(device_type=dev.type), mp_policy), "fsdp")
    return _Wrapper(model, "local")


def train(dp, optimizer, batches, loss_fn, group=None) -> list[float]:
    """A few optimizer steps; the loss of each step averaged over the group (the global-batch loss)."""
    world, losses = dist.get_world_size(group), []
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(dp(input_ids=x).logits, y)
        loss.backward()
        dp.sync()
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        losses.append(total.item() / world)
    return losses
