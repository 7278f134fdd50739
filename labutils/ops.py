"""The maths a decoder layer shares across labutils' layers: RMSNorm, RoPE, the SiLU-GLU, per-channel int8.

A leaf: it imports nothing from labutils, so the model (``lean``), its int8 copies (``quant``) and the
kernels' plain-torch references (``kernels.gemv``, ``kernels.decode_attn``) all compute the same thing
from one definition, and none of them needs another to reach it.

- ``rms_norm(x, w, eps)``: ``w * x / rms(x)``, the square mean taken in float32;
- ``rope(x, cos, sin)``: rotary position embedding, the halves convention of HF Mistral
  (``x * cos + rotate_half(x) * sin``);
- ``silu_glu(y)``: the last dimension's two halves (gate, up) -> ``silu(gate) * up``;
- ``quantize_per_channel(w)`` / ``dequantize(q, scale)``: symmetric int8 with one scale per output row,
  ``w ~= q * scale``, ``q`` in [-127, 127], every weight off by at most ``scale / 2``.

Used in lab4 §Rung d, §Rung d′ and §Rung e (through ``lean``, ``quant`` and ``kernels``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dimension with gain ``w``; the mean of squares in float32."""
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (..., hd) with tables ``cos``, ``sin`` broadcast to it (the halves convention:
    dimension i pairs with i + hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def silu_glu(y: torch.Tensor) -> torch.Tensor:
    """``y``'s last dimension holds (gate, up) -> ``silu(gate) * up`` (the SwiGLU of Mistral's MLP)."""
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (q int8 of w's shape, scale float32 per row)."""
    wf = w.detach().float()
    scale = wf.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` per row, in float32."""
    return q.float() * scale.float()[:, None]
