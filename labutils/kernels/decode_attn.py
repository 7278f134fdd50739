"""One new token's attention in one Triton kernel: RoPE, the KV-cache write and GQA attention over the cache
(lab4 §Rung d′; the lean model's ``attn="triton"``).

At batch 1 the attention of a decode step is tiny work -- 32 query heads of 128 over a few hundred cached
tokens -- but written in torch it is six or seven small kernels per layer (RoPE of q and of k, two cache
writes, scores, softmax, weighted sum of V), each a few microseconds of launch and ramp-up. Here one
program per (sequence, KV head) does all of it:

1. it reads the new k and v of its KV head from the q/k/v projection's output, rotates k (RoPE, the
   halves convention of HF Mistral) and writes both into the cache at position ``pos``;
2. it rotates its ``G`` query heads (GQA: the heads that share this KV head) and scales them;
3. it walks the cache slots before ``pos`` in blocks of ``BLOCK_S`` with an online softmax (flash
   attention's running max and sum), scores and weighted sum as ``tl.dot`` on the tensor cores (the G
   query rows padded to 16); the new token itself is counted from registers, so nothing reads a slot
   this program has just written.

Only ``pos + 1`` slots are read, not the whole preallocated cache. Long contexts would want the cache
split across several programs per head (flash-decoding) -- lab4's exercise 7; at a few hundred tokens
one program per head is enough.

Without Triton or a GPU, ``attend`` is the same maths in torch (``reference``). Tested against it on the
CPU through Triton's interpreter (tests/gemv_interpreted.py). Used in lab4 §Rung d′ and §Rung e.
"""

from __future__ import annotations

import torch

from .. import ops
from . import _triton
from ._triton import tl, triton  # the Triton modules themselves (None without Triton), for the kernel code

if triton is not None:

    @triton.jit
    def _attn_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, y_ptr, S, scale, H: tl.constexpr,
                     KV: tl.constexpr, G: tl.constexpr, HD: tl.constexpr, BLOCK_S: tl.constexpr,
                     PDL: tl.constexpr):
        b, h = tl.program_id(0), tl.program_id(1)
        _triton.pdl_wait(PDL)  # everything this kernel reads but the cache comes from the kernel before it
        p = tl.load(pos_ptr)
        d = tl.arange(0, HD)
        partner = (d + HD // 2) % HD  # rotate_half: (-x2, x1)
        sign = tl.where(d < HD // 2, -1.0, 1.0)
        cos, sin = tl.load(cos_ptr + p * HD + d).to(tl.float32), tl.load(sin_ptr + p * HD + d).to(tl.float32)
        row = qkv_ptr + b * (H + 2 * KV) * HD
        k_at, v_at = row + (H + h) * HD, row + (H + KV + h) * HD
        k = tl.load(k_at + d).to(tl.float32) * cos + sign * tl.load(k_at + partner).to(tl.float32) * sin
        v = tl.load(v_at + d)
        k = k.to(kc_ptr.dtype.element_ty)
        cache = (b * KV + h) * S * HD
        tl.store(kc_ptr + cache + p * HD + d, k)
        tl.store(vc_ptr + cache + p * HD + d, v)
        g = tl.arange(0, 16)  # query rows: the first G are this KV head's query heads
        gm = g < G
        q_at = row + (h * G + g)[:, None] * HD
        q = tl.load(q_at + d[None, :], mask=gm[:, None], other=0).to(tl.float32) * cos[None, :] + sign[None, :] * \
            tl.load(q_at + partner[None, :], mask=gm[:, None], other=0).to(tl.float32) * sin[None, :]
        q = q.to(kc_ptr.dtype.element_ty)  # rounded like the cached k: the same q as the torch path
        m_i = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1) * scale  # the new token's score
        l_i = tl.full((16,), 1.0, tl.float32)
        acc = tl.zeros((16, HD), tl.float32) + v.to(tl.float32)[None, :]
        for s0 in range(0, p, BLOCK_S):
            rs = s0 + tl.arange(0, BLOCK_S)
            sm = rs < p
            kb = tl.load(kc_ptr + cache + rs[:, None] * HD + d[None, :], mask=sm[:, None], other=0)
            s = tl.where(sm[None, :], tl.dot(q, tl.trans(kb)) * scale, float("-inf"))  # (16, BLOCK_S)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha, pr = tl.exp(m_i - m_new), tl.exp(s - m_new[:, None])
            vb = tl.load(vc_ptr + cache + rs[:, None] * HD + d[None, :], mask=sm[:, None], other=0)
            acc = acc * alpha[:, None] + tl.dot(pr.to(vb.dtype), vb)
            l_i, m_i = l_i * alpha + tl.sum(pr, axis=1), m_new
        _triton.pdl_launch_next(PDL)
        out = acc / l_i[:, None]
        tl.store(y_ptr + b * H * HD + (h * G + g)[:, None] * HD + d[None, :], out.to(y_ptr.dtype.element_ty),
                 mask=gm[:, None])

    @torch.library.custom_op("smml::decode_attn", mutates_args=("k_cache", "v_cache"))
    def _attn_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, block_s: int) -> torch.Tensor:
        B, KV, S, HD = k_cache.shape
        H = qkv.shape[-1] // HD - 2 * KV
        y, pdl = qkv.new_empty((B, H * HD)), _triton.pdl_ok(qkv)
        _attn_kernel[(B, KV)](qkv, cos, sin, pos, k_cache, v_cache, y, S, HD ** -0.5, H=H, KV=KV, G=H // KV,
                              HD=HD, BLOCK_S=block_s, PDL=pdl, num_warps=4, launch_pdl=pdl, enable_fp_fusion=True)
        return y

    @_attn_op.register_fake
    def _(qkv, cos, sin, pos, k_cache, v_cache, block_s):
        B, KV, _, HD = k_cache.shape
        return qkv.new_empty((B, qkv.shape[-1] - 2 * KV * HD))


def reference(qkv, cos, sin, pos, k_cache, v_cache) -> torch.Tensor:
    """The kernel's maths in torch: writes k (rotated) and v at ``pos`` into the caches, returns (B, H * hd)."""
    B, KV, S, hd = k_cache.shape
    H = qkv.shape[-1] // hd - 2 * KV
    q, k, v = qkv.view(B, H + 2 * KV, hd).split([H, KV, KV], dim=1)
    cos, sin = cos[pos], sin[pos]
    k_cache[:, :, pos] = ops.rope(k, cos, sin).to(k_cache.dtype)[:, :, None]
    v_cache[:, :, pos] = v.to(v_cache.dtype)[:, :, None]
    q = ops.rope(q, cos, sin).to(k_cache.dtype).float().view(B, KV, H // KV, hd)
    n = int(pos) + 1
    s = (q @ k_cache[:, :, :n].float().transpose(-1, -2)) * hd ** -0.5
    return (torch.softmax(s, -1) @ v_cache[:, :, :n].float()).to(qkv.dtype).reshape(B, H * hd)


def attend(qkv, cos, sin, pos, k_cache, v_cache, block_s: int = 128) -> torch.Tensor:
    """Attention of one new token per sequence: ``qkv`` (B, (H + 2 KV) * hd), the q/k/v projection's output;
    ``cos``, ``sin``: the RoPE tables (S, hd), read at row ``pos`` (a one-element tensor) inside the kernel
    (indexing them in torch cost a gather kernel per layer); caches (B, KV, S, hd), written at ``pos``.
    -> (B, H * hd). The kernel on a GPU (launched with PDL where ``_triton.pdl_ok``), else ``reference``."""
    if not _triton.available(qkv):
        return reference(qkv, cos, sin, pos, k_cache, v_cache)
    return torch.ops.smml.decode_attn(qkv.contiguous(), cos.contiguous(), sin.contiguous(), pos, k_cache, v_cache,
                                      block_s)
