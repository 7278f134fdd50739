"""Size profiles: every size a lab uses comes from here.

``small`` runs on a 2-core laptop CPU or in CI (shrunk models, few sweep
points, gloo ranks standing in for GPUs); ``full`` is the real thing on GPUs.
The profile is ``full`` when a CUDA device is present, else ``small``; the
environment variable ``SMML_PROFILE`` overrides either way.

Used in every lab, first in lab0 §Environment.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

PROFILES = ("small", "full")


@dataclass(frozen=True)
class Profile:
    """The sizes of one profile. Fields are grouped by the lab that uses them."""

    name: str
    # models (labutils.models presets)
    tiny_model: str  # the "mistral-tiny" of lab0/1/4
    big_model: str  # the "mistral-7b" of lab2/3/4
    dtype: str  # default dtype for model work
    # lab0: generation and serving
    prompt_tokens: int
    new_tokens: int
    concurrency: tuple[int, ...]
    requests_per_level: int
    # lab1: GEMMs and the roofline
    gemm_square: tuple[int, ...]
    gemm_skinny_m: tuple[int, ...]
    gemm_dtypes: tuple[str, ...]
    bandwidth_bytes: int
    batch_sweep: tuple[int, ...]
    # lab2/3: distributed
    world_size: int
    nodes: int
    procs_per_node: int
    collective_bytes: tuple[int, ...]
    # timing defaults (labutils.timing)
    warmup: int
    reps: int

    def as_dict(self) -> dict:
        return asdict(self)


_SMALL = Profile(
    name="small",
    tiny_model="mistral-tiny-small",
    big_model="mistral-7b-small",
    dtype="float32",
    prompt_tokens=32,
    new_tokens=16,
    concurrency=(1, 2),
    requests_per_level=4,
    gemm_square=(64, 128, 256, 512),
    gemm_skinny_m=(1, 4, 16, 64, 256),
    gemm_dtypes=("float32", "bfloat16"),
    bandwidth_bytes=64 * 2**20,
    batch_sweep=(1, 4, 16),
    world_size=4,
    nodes=2,
    procs_per_node=2,
    collective_bytes=tuple(2**k for k in range(10, 21, 2)),  # 1 KiB .. 1 MiB
    warmup=2,
    reps=10,
)

_FULL = Profile(
    name="full",
    tiny_model="mistral-tiny",
    big_model="mistral-7b",
    dtype="bfloat16",
    prompt_tokens=128,
    new_tokens=128,
    concurrency=(1, 2, 4, 8),
    requests_per_level=16,
    gemm_square=(256, 512, 1024, 2048, 4096, 8192),
    gemm_skinny_m=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    gemm_dtypes=("float32", "tf32", "float16", "bfloat16", "float8_e4m3fn"),
    bandwidth_bytes=2 * 2**30,
    batch_sweep=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    world_size=4,
    nodes=2,
    procs_per_node=4,
    collective_bytes=tuple(2**k for k in range(10, 31, 2)),  # 1 KiB .. 1 GiB
    warmup=5,
    reps=50,
)


def get(name: str | None = None) -> Profile:
    """The profile named ``name``, else ``$SMML_PROFILE``, else by hardware."""
    name = name or os.environ.get("SMML_PROFILE") or ("full" if torch.cuda.is_available() else "small")
    name = name.strip().lower()
    if name == "small":
        return _SMALL
    if name == "full":
        return _FULL
    raise ValueError(f"unknown profile {name!r}: set SMML_PROFILE to one of {', '.join(PROFILES)}")
