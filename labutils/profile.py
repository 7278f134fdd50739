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
    # lab1 (added after the fields above, so they carry defaults): shape search, waves, launches
    gemm_search: tuple[int, ...] = (192, 256)  # sizes tried for each of M, N, K (a CPU: 8 shapes, all timed)
    gemm_search_budget_s: float = 20.0
    wave_m: int = 256  # the M and K of the wave-quantization sweep ...
    wave_k: int = 256
    wave_n: tuple[int, int] = (64, 1024)  # ... N swept from wave_n[0] to wave_n[1] in steps of wave_n[0]
    launch_ops: int = 100  # length of the chain of tiny ops in the launch-overhead test
    # lab2 §Pipeline, §Data parallelism, §Scaling (lab2b): the model the pipeline / DP experiments build
    par_model: str = "mistral-tiny-small"  # preset whose shape they take (layers and vocab overridden below)
    par_vocab: int = 1024  # vocabulary, shrunk on a CPU so that embeddings do not dominate a tiny model
    par_seq: int = 64  # tokens per sequence
    pp_layers: int = 8  # decoder layers of the pipelined model: 4 ranks x 2 interleaved chunks
    pp_microbatches: tuple[int, ...] = (4, 8)  # micro-batch counts m (each micro-batch pp_mb_size rows)
    pp_mb_size: int = 1
    pp_steps: int = 2  # timed steps per schedule and m (median and spread of the bubble over them)
    dp_layers: int = 2  # decoder layers of the data-parallel model
    dp_batch: int = 2  # rows per rank (the one-rank reference runs world x this)
    dp_steps: int = 3  # AdamW steps of the loss-curve comparison
    fsdp_model: str = "mistral-7b-small"  # the big-model FSDP2 training step
    fsdp_seq: int = 64
    fsdp_batch: int = 1  # rows per rank
    # lab3 part a (two nodes on one host, collectives, networking overhead, mistral-7b over 8 ranks)
    lab3_collective_bytes: tuple[int, ...] = tuple(4**k for k in range(5, 13))  # 1 KiB .. 16 MiB, x4
    ddp_model: str = "mistral-tiny-small"  # the DDP overhead's model (shrunk below on the CPU)
    ddp_layers: int = 2  # 0: the preset's
    ddp_vocab: int = 2048  # 0: the preset's (32000 would make the CPU's gradients 4x larger)
    ddp_batch: int = 2  # sequences per rank per step
    ddp_seq: int = 64
    ddp_bucket_mb: float = 4.0  # DDP's bucket_cap_mb (DDP's own default is 25)
    ddp_steps: int = 3  # timed steps per configuration
    tp_model: str = "mistral-7b-small"  # lab3 §mistral-7b over 8 ranks
    tp_layers: int = 2  # 0: the preset's
    tp_vocab: int = 2048  # 0: the preset's
    tp_batch: int = 2
    tp_seq: int = 32
    tp_new_tokens: int = 8
    # lab3 §Orchestrators and §Fault tolerance (lab3b): labutils/scripts/train.py's model and run
    train_model: str = "mistral-tiny-small"  # a labutils.models preset ...
    train_vocab: int = 1024  # ... with this many token ids (embedding and head rows) ...
    train_layers: int = 2  # ... and this many decoder layers
    train_seq: int = 64  # tokens per sequence
    train_batch: int = 2  # sequences per rank and step
    train_steps: int = 8
    train_ckpt_every: int = 2  # steps between checkpoints

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
    gemm_search=(192, 256),  # a CPU emulates bf16 at ~1 GFLOP/s: 8 small shapes finish well inside the budget
    gemm_search_budget_s=20.0,
    wave_m=256,
    wave_k=256,
    wave_n=(64, 1024),
    launch_ops=100,
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
    gemm_search=tuple(range(7680, 8705, 256)),  # 5 sizes per dimension around 8192: 125 shapes
    gemm_search_budget_s=90.0,
    wave_m=2048,  # 8 rows of 256-row tiles: one wave of 132 SMs every 16.5 columns of 128
    wave_k=4096,
    wave_n=(128, 6912),  # a little over three waves
    launch_ops=200,
    par_model="mistral-7b",
    par_vocab=32000,
    par_seq=1024,
    pp_layers=32,
    pp_microbatches=(4, 8, 16, 32),
    pp_mb_size=1,
    pp_steps=5,
    dp_layers=4,
    dp_batch=2,
    dp_steps=4,
    fsdp_model="mistral-7b",
    fsdp_seq=4096,
    fsdp_batch=2,
    lab3_collective_bytes=tuple(4**k for k in range(5, 16)),  # 1 KiB .. 1 GiB, x4
    ddp_model="mistral-tiny",
    ddp_layers=0,
    ddp_vocab=0,
    ddp_batch=8,
    ddp_seq=1024,
    ddp_bucket_mb=25.0,
    ddp_steps=20,
    tp_model="mistral-7b",
    tp_layers=0,
    tp_vocab=0,
    tp_batch=8,
    tp_seq=512,
    tp_new_tokens=64,
    train_model="mistral-tiny",
    train_vocab=32000,
    train_layers=12,
    train_seq=1024,
    train_batch=8,
    train_steps=60,
    train_ckpt_every=10,
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
