"""A lean Mistral for fast decode (lab4's rungs d and e), in the spirit of gpt-fast's ``model.py``.

A preallocated KV cache written in place, RoPE from precomputed tables, RMSNorm, SwiGLU, and fused
weights (q/k/v in one matmul, gate/up in another). Every linear layer is called through ``apply``, so a
layer that can do the RMSNorm before it and the residual add after it in its own kernel is handed them.
``from_hf`` builds it from the SAME tensors as a Hugging Face ``MistralForCausalLM``.

Attention (``LeanMistral.attn``; the prefill, T > 1, always takes SDPA with the folded mask):

- ``"sdpa"``: grouped-query attention folded into one SDPA call (the g query heads of a KV head become
  g query rows of that head: no K/V copies) with an additive float mask over the whole cache.
- ``"sdpa_bool"``: the same with a boolean mask; ``"sdpa_gqa"``: unfolded, ``enable_gqa=True``.
- ``"reduce"`` (default): at T = 1, scores, softmax and the weighted sum of V written as plain
  multiply-and-sum over the cache, masked with ``where``: under torch.compile Inductor generates its
  own small fused Triton kernels instead of calling an attention library kernel. Eagerly the same
  maths runs as two matmuls.
- ``"triton"``: at T = 1 on a GPU, RoPE, the cache write and the attention in ONE hand-written Triton
  kernel (``kernels.decode_attn``); elsewhere the ``"reduce"`` maths.

The shared maths (RMSNorm, RoPE, SiLU-GLU) is ``labutils.ops``. Used in lab4 §Rung d, §Rung d′ and §Rung e.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .kernels import _triton, decode_attn

ATTN = ("reduce", "triton", "sdpa", "sdpa_bool", "sdpa_gqa")


@dataclass(frozen=True)
class LeanConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    eps: float
    theta: float

    @classmethod
    def from_hf(cls, c) -> LeanConfig:
        theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 1e4))
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, hd,
                   c.intermediate_size, c.vocab_size, c.rms_norm_eps, float(theta))


def apply(layer: nn.Module, x, norm=None, eps: float = 0.0, residual=None, glu: bool = False):
    """``residual + layer(ops.rms_norm(x, norm, eps))``, each part where given; ``glu``: the output's two halves
    (gate, up) become ``silu(gate) * up`` (``ops.silu_glu``). A layer with ``fuse`` set (the Triton-kernel layers
    of ``kernels.gemv`` / ``quant``) is handed all of it to do inside its own kernel; any other layer gets it
    done around it, here."""
    if getattr(layer, "fuse", False):
        return layer(x, norm=norm, eps=eps, residual=residual, glu=glu)
    y = layer(x if norm is None else ops.rms_norm(x, norm, eps))
    if glu:
        y = ops.silu_glu(y)
    return y if residual is None else residual + y


def attend_one(q, k, v, keep):
    """Attention of ONE new token per sequence over the whole cache, no library kernel.

    q (B, KV, g, hd): the g query heads that share each KV head; k, v (B, KV, S, hd); keep (S,) bool.
    -> (B, KV, g, hd). Compiled, each product-and-sum becomes a Triton reduction that reads the cache
    once (the mask and the scale fuse into it); eagerly, two matmuls.
    """
    scale = q.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        s = (q[:, :, :, None, :].float() * k[:, :, None].float()).sum(-1)  # (B, KV, g, S)
    else:
        s = (q @ k.transpose(-1, -2)).float()
    p = torch.softmax(torch.where(keep, s * scale, float("-inf")), dim=-1)
    if torch.compiler.is_compiling():
        return (p[..., None] * v[:, :, None].float()).sum(-2).to(q.dtype)
    return p.to(v.dtype) @ v


class _Block(nn.Module):
    def __init__(self, c: LeanConfig):
        super().__init__()
        self.c = c
        self.wqkv = nn.Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.w13 = nn.Linear(c.dim, 2 * c.ffn, bias=False)  # gate and up projections, one matmul
        self.w2 = nn.Linear(c.ffn, c.dim, bias=False)
        self.attn_norm = nn.Parameter(torch.ones(c.dim))
        self.ffn_norm = nn.Parameter(torch.ones(c.dim))
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)
        self.register_buffer("attn_locks", None, persistent=False)  # the attention kernel's counters

    def attention(self, x, cos, sin, mask, pos, attn, rope):
        """Attention of the block's (un-normed) input ``x`` -> its output before ``wo``; ``cos``, ``sin`` at
        ``pos``, ``rope``: the whole tables (the decode kernel reads its row itself)."""
        (B, T, _), H, KV, hd = x.shape, self.c.n_heads, self.c.n_kv_heads, self.c.head_dim
        qkv = apply(self.wqkv, x, self.attn_norm, self.c.eps)
        if attn == "triton" and T == 1 and _triton.available(qkv):  # RoPE, cache write, attention: 1 kernel
            return decode_attn.attend(qkv.view(B, -1), *rope, pos, self.k_cache, self.v_cache,
                                      self.attn_locks).view(B, 1, -1)
        q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
        q = ops.rope(q.view(B, T, H, hd).transpose(1, 2), cos, sin)
        self.k_cache.index_copy_(2, pos, ops.rope(k.view(B, T, KV, hd).transpose(1, 2), cos, sin))
        self.v_cache.index_copy_(2, pos, v.view(B, T, KV, hd).transpose(1, 2))
        g = H // KV  # GQA: g query heads per KV head
        if attn in ("reduce", "triton") and T == 1:  # "triton" without a GPU: the same maths, eagerly
            y = attend_one(q.view(B, KV, g, hd), self.k_cache, self.v_cache, mask)
        elif attn == "sdpa_gqa":
            y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        else:  # folded: the g query heads of one KV head become g*T query rows of that head
            y = F.scaled_dot_product_attention(q.reshape(B, KV, g * T, hd), self.k_cache, self.v_cache,
                                               attn_mask=mask)
        return y.reshape(B, H, T, hd).transpose(1, 2).reshape(B, T, H * hd)

    def forward(self, x, cos, sin, mask, pos, attn, rope):
        x = apply(self.wo, self.attention(x, cos, sin, mask, pos, attn, rope), residual=x)
        return apply(self.w2, apply(self.w13, x, self.ffn_norm, self.c.eps, glu=True), residual=x)


class LeanMistral(nn.Module):
    """``forward(idx (B, T), pos (T,))`` -> logits (B, T, vocab); K,V written into the preallocated cache."""

    #: what ``apply`` hands each linear layer besides its input; a kernel layer fuses it (gemv_tune.tune_model)
    FUSED_WITH = {"wqkv": "norm", "wo": "residual", "w13": "norm+glu", "w2": "residual", "output": "norm"}

    def __init__(self, c: LeanConfig, attn: str = "reduce"):
        super().__init__()
        self.c, self.attn = c, attn
        self.tok_emb = nn.Embedding(c.vocab, c.dim)
        self.layers = nn.ModuleList(_Block(c) for _ in range(c.n_layers))
        self.norm = nn.Parameter(torch.ones(c.dim))
        self.output = nn.Linear(c.dim, c.vocab, bias=False)
        for name in ("cos", "sin", "causal"):
            self.register_buffer(name, None, persistent=False)

    def setup_cache(self, batch: int, max_len: int) -> LeanMistral:
        """(Re)allocate the KV cache for ``batch`` sequences of up to ``max_len`` tokens, and the RoPE tables."""
        c, dev, dt = self.c, self.norm.device, self.norm.dtype
        for b in self.layers:
            b.k_cache = torch.zeros(batch, c.n_kv_heads, max_len, c.head_dim, device=dev, dtype=dt)
            b.v_cache = torch.zeros_like(b.k_cache)
            b.attn_locks = decode_attn.locks_for(b.k_cache)
        inv = 1.0 / c.theta ** (torch.arange(0, c.head_dim, 2, device=dev).float() / c.head_dim)
        f = torch.outer(torch.arange(max_len, device=dev).float(), inv)
        self.cos, self.sin = torch.cat((f, f), -1).cos().to(dt), torch.cat((f, f), -1).sin().to(dt)
        self.causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=dev))
        return self

    def mask(self, pos: torch.Tensor, dtype: torch.dtype):
        """The attention mask, built once per forward for all layers (its form depends on ``attn``)."""
        keep, T, g = self.causal[pos], pos.shape[0], self.c.n_heads // self.c.n_kv_heads  # (T, S) bool
        if self.attn in ("reduce", "triton") and T == 1:
            return keep[0]
        if self.attn == "sdpa_gqa":
            return keep
        if self.attn == "sdpa_bool":
            return keep.repeat(g, 1)
        # additive: 0 where a query may attend, -inf elsewhere; one row per folded query (g heads x T tokens)
        return torch.zeros(keep.shape, dtype=dtype, device=pos.device).masked_fill(~keep, float("-inf")).repeat(g, 1)

    def forward(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.attn not in ATTN:
            raise ValueError(f"unknown attention {self.attn!r}: use one of {ATTN}")
        x = self.tok_emb(idx)
        cos, sin, mask = self.cos[pos], self.sin[pos], self.mask(pos, x.dtype)
        for b in self.layers:
            x = b(x, cos, sin, mask, pos, self.attn, (self.cos, self.sin))
        return apply(self.output, x, self.norm, self.c.eps)

    @classmethod
    def from_hf(cls, hf, attn: str = "reduce") -> LeanMistral:
        """The same weights as a HF MistralForCausalLM: q/k/v and gate/up concatenated, the rest shared."""
        sd, c = hf.state_dict(), LeanConfig.from_hf(hf.config)
        new = {"tok_emb.weight": sd["model.embed_tokens.weight"], "norm": sd["model.norm.weight"],
               "output.weight": sd["lm_head.weight"]}
        for i in range(c.n_layers):
            p, n = f"model.layers.{i}.", f"layers.{i}."
            new[n + "wqkv.weight"] = torch.cat([sd[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"])
            new[n + "wo.weight"] = sd[p + "self_attn.o_proj.weight"]
            new[n + "w13.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
            new[n + "w2.weight"] = sd[p + "mlp.down_proj.weight"]
            new[n + "attn_norm"] = sd[p + "input_layernorm.weight"]
            new[n + "ffn_norm"] = sd[p + "post_attention_layernorm.weight"]
        with torch.device("meta"):
            m = cls(c, attn)
        m.load_state_dict(new, strict=True, assign=True)
        return m.eval().requires_grad_(False)
