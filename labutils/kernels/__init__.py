"""The hand-written Triton kernels (lab4's; lab1's fixed-tile GEMM), the one place in labutils that imports Triton.

- ``gemv``: the batch-1 matrix-vector kernel (bf16 or int8 weights; RMSNorm, residual add and SiLU-GLU fused
  in) as the custom op ``torch.ops.smml.gemv``, its plain-torch ``reference`` and the ``Linear`` layer;
- ``gemv_tune``: the block shape (and PDL) per weight matrix, timed on this GPU;
- ``decode_attn``: RoPE, the KV-cache write and GQA attention of one new token in one kernel;
- ``fixed_tile_gemm``: lab1's matmul with one pinned block shape, which shows wave quantization (§5b′);
- ``_triton``: the Triton import (None without it), ``available``, ``pdl_ok``, the ``PDL`` switch and the
  PDL intrinsics the kernels share.

Kernels import ``ops`` (the shared maths, for their references) and ``timing``, never model code: ``lean``
and ``quant`` import them. This file imports nothing: call each function by its module
(``gemv.linear``, ``gemv_tune.tune_model``). Used in lab4 §Rung d′ and §Rung e.
"""
