"""A hand-written Triton matrix-vector kernel for batch-1 decode (lab4 §Rung d′, §Int8 weight-only).

At batch 1 every linear layer is ``y = x @ W.T`` with ONE row of ``x``: each weight is read once and used
once, so the kernel's only job is to stream ``W`` at the memory's bandwidth. ``_gemv_kernel`` gives each
program ``BLOCK_N`` output rows; it walks along K in ``BLOCK_K`` steps, multiplies the weight tile by the
matching slice of ``x`` (which every program reads from L2) and sums in float32. Int8 weights
(``scale`` given) are converted in registers and scaled once per output row: the weight really is read
as int8, one byte each. At several TB/s of int8 the instructions spent per weight, not the memory, can set
the pace, so there are three ways to convert a byte (``Config.bits``, ``Config.prmt``):

- ``w.to(float32)``: one int-to-float instruction, which Hopper issues at a quarter of its add rate;
- ``bits``: the byte with its sign bit flipped (``q + 128``, 0..255) is written into the mantissa of the
  float 2**23 with one XOR (giving 2**23 + q + 128 exactly), then 2**23 + 128 is subtracted;
- ``prmt``: four weights per 32-bit load, the four sign bits flipped with one XOR, and each weight made the
  float ``1 + (q + 128) / 2**15`` by ONE byte-permute instruction (inline PTX ``prmt``; GPU only) with no
  subtraction: the kernel sums ``f * x`` and corrects each row once with the sum of ``x``. Two instructions
  per weight (permute, multiply-add) instead of three; the large int8 GEMVs went from 3.2 to 3.5-3.7 TB/s.

Three fusions that cost no extra bytes, because one row of ``x`` is all each program needs:

- ``norm``: RMSNorm of ``x`` inside the product. ``W @ (g * x * r) = r * (W @ (g * x))`` with the scalar
  ``r = 1 / rms(x)``: each program sums ``x**2`` while it streams and multiplies once at the end;
- ``residual``: ``y = residual + W @ x`` in the epilogue;
- ``glu``: the gate and up projections in one weight: each program takes a gate row and its up row and
  writes ``silu(gate) * up``.

So a decoder layer's four products also do its two norms, two residual adds and its SiLU: fewer small
kernels per token, each a fixed cost that int8 does not shrink (``lean.apply`` hands them over).

The kernel runs as the custom op ``torch.ops.smml.gemv`` (``torch.library.custom_op``): torch.compile puts
it in its CUDA graph as it is and fuses nothing into it -- Inductor's own M = 1 reductions recompute a
fused producer (RMSNorm, SiLU-times-up) for every block of rows, which cost the int8 rung most of its
speed-up. ``kernels.gemv_tune`` picks the block shape per matrix and fusion on this GPU, every candidate
checked against a float64 result first. On Hopper and newer (``_triton.pdl_ok``) it also tries
programmatic dependent launch (``Config.pdl``): the kernel is launched while the one before it is still
finishing, and waits (``griddepcontrol.wait``) before it reads any activation -- part of each kernel's
start-up then hides under the previous one's tail. Without Triton, on a CPU, or for many rows (a prefill)
``linear`` runs the same maths in plain torch (``reference``).

Tested on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``; tests/test_gemv.py) and compiled
there for sm_90 with the ptxas Triton ships. Used in lab4 §Rung d′ and §Rung e (through
``labutils.quant`` and ``lean.apply``).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .. import ops
from . import _triton
from ._triton import tl, triton  # the Triton modules themselves (None without Triton), for the kernel code


@dataclass(frozen=True)
class Config:
    block_n: int = 16
    block_k: int = 1024
    warps: int = 8
    stages: int = 1
    bits: bool = True
    acc2d: bool = False  # sum a (block_n, block_k) tile per step, reduce once at the end (not every step)
    prmt: bool = False  # int8, GPU only: 4 weights per 32-bit load, each made a float by one byte permute
    pdl: bool = False  # sm_90+: start while the kernel before is still running (programmatic dependent launch)


DEFAULT = Config()


if triton is not None:

    @triton.jit
    def _as_float(w, INT8: tl.constexpr, BITS: tl.constexpr):
        if INT8 and BITS:  # int8 -> float with integer ops: 2**23 + (q + 128), minus 2**23 + 128
            u = w.to(tl.uint8, bitcast=True).to(tl.int32)
            return (u ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        return w.to(tl.float32)

    @triton.jit
    def _byte_as_unit(v, J: tl.constexpr):
        """Byte J of each 32-bit word (u = q + 128, see PRMT below) as the float 1 + u / 2**15, built by ONE
        byte-permute instruction: its four bytes are 0x00, u, 0x80, 0x3F (1.0 is 0x3F800000, and u lands in
        mantissa bits 8-15). Nothing is subtracted per weight: the kernel sums f * x and corrects each row
        once with the sum of x (``q = 2**15 (f - 1) - 128``)."""
        one = tl.zeros_like(v) + 0x3F800000
        if J == 0:
            b = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7604;", "=r,r,r", [v, one], tl.int32, True, 1)
        elif J == 1:
            b = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7614;", "=r,r,r", [v, one], tl.int32, True, 1)
        elif J == 2:
            b = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7624;", "=r,r,r", [v, one], tl.int32, True, 1)
        else:
            b = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7634;", "=r,r,r", [v, one], tl.int32, True, 1)
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, g_ptr, r_ptr, y_ptr, N, K, eps, HAS_SCALE: tl.constexpr,
                     RMS: tl.constexpr, RES: tl.constexpr, GLU: tl.constexpr, BITS: tl.constexpr,
                     ACC2D: tl.constexpr, PRMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN: tl.constexpr, PDL: tl.constexpr):
        # N: output width; with GLU the weight has 2N rows (gate, then up) and y = silu(gate) * up
        m = tl.program_id(1)  # one row of x per grid column (batch 1: one)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
        up = N.to(tl.int64) * K  # offset of the up rows (GLU)
        _triton.pdl_wait(PDL)
        if ACC2D:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)  # RMS: running sum of x**2
        ss4 = tl.zeros((BLOCK_K // 4,), dtype=tl.float32)  # the same, for the PRMT loop
        sx4 = tl.zeros((BLOCK_K // 4,), dtype=tl.float32)  # PRMT: running sum of x (the rows' correction)
        acc4 = tl.zeros((BLOCK_N, BLOCK_K // 4), dtype=tl.float32)  # PRMT: 2-D sums, reduced once at the end
        acc4u = tl.zeros((BLOCK_N, BLOCK_K // 4), dtype=tl.float32)
        if PRMT:  # int8 and EVEN only (checked by _launch): w_ptr read as int32, 4 weights a word
            r4 = tl.arange(0, BLOCK_K // 4)
            w4_ptrs = w_ptr.to(tl.pointer_type(tl.int32)) + rn[:, None].to(tl.int64) * (K // 4) + r4[None, :]
            for k0 in range(0, K, BLOCK_K):
                v = tl.load(w4_ptrs, eviction_policy="evict_first") ^ -2139062144  # 0x80808080: each byte + 128
                if GLU:
                    vu = tl.load(w4_ptrs + up // 4, eviction_policy="evict_first") ^ -2139062144
                for j in tl.static_range(4):  # byte j of word i is column 4 i + j
                    xj = tl.load(x_ptr + m * K + k0 + 4 * r4 + j).to(tl.float32)
                    if RMS:
                        ss4 += xj * xj
                        xj = xj * tl.load(g_ptr + k0 + 4 * r4 + j).to(tl.float32)
                    sx4 += xj
                    acc4 += _byte_as_unit(v, j) * xj[None, :]
                    if GLU:
                        acc4u += _byte_as_unit(vu, j) * xj[None, :]
                w4_ptrs += BLOCK_K // 4
        for k0 in range(0, K if not PRMT else 0, BLOCK_K):
            km = rk < K - k0
            wm = (rn[:, None] < N) & km[None, :]
            if EVEN:
                x = tl.load(x_ptr + m * K + k0 + rk).to(tl.float32)
            else:
                x = tl.load(x_ptr + m * K + k0 + rk, mask=km, other=0).to(tl.float32)
            if RMS:
                ss += x * x
                x = x * tl.load(g_ptr + k0 + rk, mask=km, other=0).to(tl.float32)
            if EVEN:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs, mask=wm, other=0, eviction_policy="evict_first")
            p = _as_float(w, HAS_SCALE, BITS) * x[None, :]
            if ACC2D:
                acc += p
            else:
                acc += tl.sum(p, axis=1)
            if GLU:
                if EVEN:
                    wu = tl.load(w_ptrs + up, eviction_policy="evict_first")
                else:
                    wu = tl.load(w_ptrs + up, mask=wm, other=0, eviction_policy="evict_first")
                pu = _as_float(wu, HAS_SCALE, BITS) * x[None, :]
                if ACC2D:
                    acc_u += pu
                else:
                    acc_u += tl.sum(pu, axis=1)
            w_ptrs += BLOCK_K
        _triton.pdl_launch_next(PDL)
        if ACC2D:
            a = tl.sum(acc, axis=1)
            a_u = tl.sum(acc_u, axis=1)
        else:
            a = acc
            a_u = acc_u
        if PRMT:  # sum of q x = 2**15 sum(f x) - (2**15 + 128) sum(x)
            sx = tl.sum(sx4, axis=0) * 32896.0
            a += tl.sum(acc4, axis=1) * 32768.0 - sx
            a_u += tl.sum(acc4u, axis=1) * 32768.0 - sx
        nm = rn < N
        if RMS:
            r = tl.rsqrt((tl.sum(ss, axis=0) + tl.sum(ss4, axis=0)) / K + eps)
            a = a * r
            a_u = a_u * r
        if HAS_SCALE:
            a = a * tl.load(s_ptr + rn, mask=nm, other=0).to(tl.float32)
            if GLU:
                a_u = a_u * tl.load(s_ptr + N + rn, mask=nm, other=0).to(tl.float32)
        if GLU:
            a = a / (1 + tl.exp(-a)) * a_u  # silu(gate) * up
        if RES:
            a += tl.load(r_ptr + m * N + rn, mask=nm, other=0).to(tl.float32)
        tl.store(y_ptr + m * N + rn, a.to(y_ptr.dtype.element_ty), mask=nm)

    def _launch(x, w, scale, y, cfg: Config, norm=None, eps: float = 0.0, residual=None, glu: bool = False):
        (M, K), N = x.shape, w.shape[0] // 2 if glu else w.shape[0]
        even = N % cfg.block_n == 0 and K % cfg.block_k == 0
        if cfg.prmt and not (scale is not None and even and cfg.bits and not cfg.acc2d and x.is_cuda
                             and w.data_ptr() % 16 == 0):
            raise ValueError("prmt: int8 weights (16-byte aligned), shapes that divide into whole blocks, "
                             "bits=True, acc2d=False, and a GPU (the interpreter has no inline assembly)")
        if cfg.pdl and not _triton.pdl_ok(x):
            raise ValueError("pdl needs a Hopper or newer GPU and a triton with gdc_wait (_triton.pdl_ok): use a "
                             "Config with pdl=False here")
        grid = (triton.cdiv(N, cfg.block_n), M)
        _gemv_kernel[grid](x, w, w if scale is None else scale, x if norm is None else norm,
                           y if residual is None else residual, y, N, K, eps, HAS_SCALE=scale is not None,
                           RMS=norm is not None, RES=residual is not None, GLU=glu, BITS=cfg.bits,
                           ACC2D=cfg.acc2d, PRMT=cfg.prmt, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN=even,
                           PDL=cfg.pdl, num_warps=cfg.warps, num_stages=cfg.stages, launch_pdl=cfg.pdl,
                           enable_fp_fusion=True)  # multiply-adds as FFMA (said here: Triton 3.10 turns it off)
        return y

    # An opaque custom op: torch.compile calls it as it is (in its CUDA graph) and fuses nothing into it.
    # (torch.library.triton_op would let Inductor see the kernel, but where it cannot analyse which pointers
    # the kernel writes it copies every input first -- the whole weight, every call.) Optional, not "| None":
    # the op's schema is read from these annotations.
    @torch.library.custom_op("smml::gemv", mutates_args=())
    def _gemv_op(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor],  # noqa: UP045
                 norm: Optional[torch.Tensor], eps: float, residual: Optional[torch.Tensor],  # noqa: UP045
                 glu: bool, block_n: int, block_k: int, warps: int, stages: int, bits: bool,
                 acc2d: bool, prmt: bool, pdl: bool) -> torch.Tensor:
        y = x.new_empty((x.shape[0], w.shape[0] // 2 if glu else w.shape[0]))
        cfg = Config(block_n, block_k, warps, stages, bits, acc2d, prmt, pdl)
        return _launch(x, w, scale, y, cfg, norm, eps, residual, glu)

    @_gemv_op.register_fake
    def _(x, w, scale, norm, eps, residual, glu, *cfg):
        return x.new_empty((x.shape[0], w.shape[0] // 2 if glu else w.shape[0]))


def core_loop() -> str:
    """The source of ``_gemv_kernel``'s main loop over K (the general path; the int8 PRMT path is the loop above
    it in this file), dedented, for lab4 to show: read from this file, so it is always the code that runs."""
    import inspect
    import textwrap

    src = inspect.getsource(inspect.getmodule(core_loop))
    start = src.index("        for k0 in range(0, K if not PRMT")
    end = src.index("            w_ptrs += BLOCK_K\n", start) + len("            w_ptrs += BLOCK_K\n")
    return textwrap.dedent(src[start:end])


def reference(x, w, scale=None, norm=None, eps: float = 0.0, residual=None, glu: bool = False) -> torch.Tensor:
    """What the kernel computes, in plain torch and x's dtype: ``residual + rms_norm(x) @ (w * scale).T``;
    ``glu``: the product's two halves (gate, up) become ``silu(gate) * up``."""
    y = F.linear(x if norm is None else ops.rms_norm(x, norm, eps), w.to(x.dtype))
    y = y if scale is None else y * scale.to(x.dtype)
    if glu:
        y = ops.silu_glu(y)
    return y if residual is None else residual + y


def linear(x, w, scale, cfg: tuple, norm=None, eps: float = 0.0, residual=None, glu: bool = False):
    """A linear layer's forward on ``x (..., K)``: the kernel for a single row on a GPU, else ``reference``
    (a prefill's many rows reuse each weight across rows: there cuBLAS is the right tool).
    ``cfg``: ``astuple(Config)``, plain values, so that torch.compile sees constants."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] != 1 or not _triton.available(x2):
        return reference(x, w, scale, norm, eps, residual, glu)
    r2 = None if residual is None else residual.reshape(1, -1).contiguous()
    y = torch.ops.smml.gemv(x2.contiguous(), w, scale, norm, eps, r2, glu, *cfg)
    return y.view(*x.shape[:-1], -1)


class Linear(torch.nn.Module):
    """A bias-free linear layer run by the kernel at batch 1; the bf16 counterpart of ``quant.Int8Linear``
    with impl "triton". ``from_linear`` shares the weight tensor (no copy). ``fuse``: the lean model hands
    it the RMSNorm before it and the residual after it (``lean.apply``)."""

    def __init__(self, weight: torch.Tensor, fuse: bool = True):
        super().__init__()
        self.weight, self.scales, self.fuse, self.cfg = weight, None, fuse, astuple(DEFAULT)

    @classmethod
    def from_linear(cls, lin: torch.nn.Linear, fuse: bool = True) -> Linear:
        if lin.bias is not None:
            raise ValueError("gemv.Linear has no bias: Mistral's linear layers have none")
        return cls(lin.weight, fuse)

    def forward(self, x, norm=None, eps: float = 0.0, residual=None, glu: bool = False):
        return linear(x, self.weight, self.scales, self.cfg, norm, eps, residual, glu)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, {self.weight.dtype}, fuse={self.fuse}"
