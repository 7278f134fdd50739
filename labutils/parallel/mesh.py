"""The parallel layout of a job: data, tensor and pipeline degrees, checked, and the DeviceMesh built from them.

``ParallelDims(dp=1, tp=4, pp=1).build(device_type)`` checks that dp * tp * pp equals the world size
(a clear ValueError otherwise) and returns a ``torch.distributed.device_mesh.DeviceMesh`` with the
dimensions named ("pp", "dp", "tp") - tp innermost, so that a TP group is made of neighbouring ranks
(one node's GPUs). The mesh is returned and passed explicitly to whatever needs it: nothing global.

Used in lab2 §Tensor parallelism and lab2 §mistral-7b across 4 devices (lab3 for 8-rank layouts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        for k in ("dp", "tp", "pp"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be an integer >= 1, got {v!r}")

    @property
    def size(self) -> int:
        return self.dp * self.tp * self.pp

    def check(self, world: int) -> None:
        """The degrees must multiply to the world size: say which ones would."""
        if self.size != world:
            hint = ", ".join(f"{k}={world // (self.size // getattr(self, k))}" for k in ("dp", "tp", "pp")
                             if world % (self.size // getattr(self, k)) == 0)
            raise ValueError(f"dp*tp*pp = {self.dp}*{self.tp}*{self.pp} = {self.size} but the job has {world} "
                             f"ranks: change the degrees so they multiply to {world}"
                             + (f" (e.g. {hint})" if hint else "") + f", or start {self.size} ranks.")

    def build(self, device_type: str = "cpu", world: int | None = None):
        """The DeviceMesh of this layout over the running job (only the dims > 1, at least one)."""
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size() if world is None else world
        self.check(world)
        names = [k for k in ("pp", "dp", "tp") if getattr(self, k) > 1] or ["tp"]
        return init_device_mesh(device_type, tuple(getattr(self, k) for k in names), mesh_dim_names=tuple(names))
