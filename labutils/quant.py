"""The fast rungs' models: a lean Mistral and its int8 weight-only copy (lab4).

``LeanMistral`` is a compact Mistral in the spirit of gpt-fast's ``model.py``: a preallocated
KV cache written in place, RoPE from precomputed tables, grouped-query attention folded into
one SDPA call, RMSNorm, SwiGLU, and fused weights (q/k/v in one matmul, gate/up in another).
``from_hf`` builds it from the SAME tensors as a Hugging Face ``MistralForCausalLM``.

Int8 weight-only: decode at batch 1 reads every weight once per token, so int8 weights halve
the bytes -- if the kernel really reads int8. ``quantize_per_channel`` keeps one scale per
output channel: ``w ~= q * scale``, ``q`` in [-127, 127], every weight off by at most
``scale / 2``. ``Int8Linear`` computes ``x @ (q * scale).T`` in one of two ways:

- ``"dequant"``: ``F.linear(x, q.to(x.dtype)) * scale``. Eager, this converts the whole weight
  to bf16 first (reads int8, writes and re-reads bf16: slower than bf16). Under torch.compile
  with ``coordinate_descent_tuning`` Inductor turns an M=1 matmul into a reduction kernel that
  reads int8 and converts in registers (gpt-fast's recipe).
- ``"dequant_fp32"``: the same with int8 -> fp32 directly (one conversion instead of int8 -> bf16
  -> fp32 in the fused kernel; eager it is even worse: a 4-byte copy of the weight).
- ``"dequant_bits"``: int8 -> fp32 without a conversion instruction: ``q + 128`` placed in the
  mantissa of the float 2**23 (integer add and or), then 2**23 + 128 subtracted -- exact.
- ``"int8pack"``: ``torch._weight_int8pack_mm``, an ATen kernel that takes the int8 weight.

``kernel_bench`` times one matrix-vector product per variant, so the fastest is picked on facts.

Used in lab4 §Lean decode loop and §Int8 weight-only (through ``labutils.decode``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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


def _rms(x, w, eps):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, cos, sin):  # x (B, heads, T, hd); cos, sin (T, hd); the halves convention of HF Mistral
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


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

    def attention(self, x, cos, sin, bias, pos):
        (B, T, _), H, KV, hd = x.shape, self.c.n_heads, self.c.n_kv_heads, self.c.head_dim
        q, k, v = self.wqkv(x).split([H * hd, KV * hd, KV * hd], dim=-1)
        q = _rope(q.view(B, T, H, hd).transpose(1, 2), cos, sin)
        self.k_cache.index_copy_(2, pos, _rope(k.view(B, T, KV, hd).transpose(1, 2), cos, sin))
        self.v_cache.index_copy_(2, pos, v.view(B, T, KV, hd).transpose(1, 2))
        g = H // KV  # GQA: the g query heads of one KV head become g*T query rows of that head
        y = F.scaled_dot_product_attention(q.reshape(B, KV, g * T, hd), self.k_cache, self.v_cache,
                                           attn_mask=bias)
        return self.wo(y.reshape(B, H, T, hd).transpose(1, 2).reshape(B, T, H * hd))

    def forward(self, x, cos, sin, bias, pos):
        x = x + self.attention(_rms(x, self.attn_norm, self.c.eps), cos, sin, bias, pos)
        gate, up = self.w13(_rms(x, self.ffn_norm, self.c.eps)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


class LeanMistral(nn.Module):
    """``forward(idx (B, T), pos (T,))`` -> logits (B, T, vocab); K,V written into the preallocated cache."""

    def __init__(self, c: LeanConfig):
        super().__init__()
        self.c = c
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
        inv = 1.0 / c.theta ** (torch.arange(0, c.head_dim, 2, device=dev).float() / c.head_dim)
        f = torch.outer(torch.arange(max_len, device=dev).float(), inv)
        self.cos, self.sin = torch.cat((f, f), -1).cos().to(dt), torch.cat((f, f), -1).sin().to(dt)
        self.causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=dev))
        return self

    def forward(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx)
        cos, sin, g = self.cos[pos], self.sin[pos], self.c.n_heads // self.c.n_kv_heads
        # additive mask, built once for all layers: 0 where a query may attend, -inf elsewhere; one row per
        # folded query (g query heads x T tokens) -- see attention()
        bias = torch.zeros(self.causal[pos].shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~self.causal[pos], float("-inf")).repeat(g, 1)
        for b in self.layers:
            x = b(x, cos, sin, bias, pos)
        return self.output(_rms(x, self.norm, self.c.eps))

    @classmethod
    def from_hf(cls, hf) -> LeanMistral:
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
            m = cls(c)
        m.load_state_dict(new, strict=True, assign=True)
        return m.eval().requires_grad_(False)


# ---------------------------------------------------------------- int8 weight-only
IMPLS = ("dequant", "dequant_fp32", "dequant_bits", "int8pack")


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (q int8 of w's shape, scale float32 per row)."""
    wf = w.detach().float()
    scale = wf.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


class Int8Linear(nn.Module):
    """A bias-free linear layer holding int8 weights (out, in) and one scale per output channel."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, impl: str = "dequant"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"unknown int8 implementation {impl!r}: use one of {IMPLS}")
        self.impl = impl
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scales", scale.to(dtype))

    @classmethod
    def from_linear(cls, lin: nn.Linear, impl: str = "dequant") -> Int8Linear:
        if lin.bias is not None:
            raise ValueError("Int8Linear has no bias: Mistral's linear layers have none")
        q, s = quantize_per_channel(lin.weight)
        return cls(q, s, lin.weight.dtype, impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "int8pack":
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.weight, self.scales)
            return y.view(*x.shape[:-1], self.out_features)
        if self.impl == "dequant_fp32":  # int8 -> fp32 in one conversion (not int8 -> bf16 -> fp32)
            return (F.linear(x.float(), self.weight.float()) * self.scales.float()).to(x.dtype)
        if self.impl == "dequant_bits":  # q + 128 in [1, 255] written into the mantissa of 2**23: integer ops only
            w = ((self.weight.to(torch.int32) + 128) | 0x4B000000).view(torch.float32) - 8388736.0
            return (F.linear(x.float(), w) * self.scales.float()).to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8, impl={self.impl}"


def copy_structure(module: nn.Module, leaf=lambda m: None) -> nn.Module:
    """A new tree of modules that shares every parameter and buffer tensor with ``module`` (no memory).

    Wherever ``leaf(m)`` returns a module it replaces ``m``. Buffers can then be re-assigned in the copy
    (e.g. a KV cache of another batch size) without touching the original.
    """
    new = leaf(module)
    if new is not None:
        return new
    c = copy.copy(module)
    c._parameters = dict(module._parameters)
    c._buffers = dict(module._buffers)
    c._modules = {n: None if m is None else copy_structure(m, leaf) for n, m in module._modules.items()}
    return c


def quantize_int8(model: nn.Module, impl: str = "dequant") -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` as ``Int8Linear``; all other tensors are shared."""
    return copy_structure(model, lambda m: Int8Linear.from_linear(m, impl) if isinstance(m, nn.Linear) else None)


def weight_bytes(model: nn.Module, skip: tuple[str, ...] = ("tok_emb", "embed_tokens")) -> int:
    """Bytes of the parameters and int8 weight buffers a decode step reads (embeddings are looked up, not read)."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if any(s in name for s in skip) or not (isinstance(t, nn.Parameter) or name.endswith(("weight", "scales"))):
            continue
        total += t.numel() * t.element_size()
    return total


def kernel_bench(n: int, k: int, dtype=torch.bfloat16, device=None, compile: bool = False, calls: int = 10,
                 options=None) -> list[dict]:
    """One M=1 product x @ W.T (W: n x k) in ``dtype`` and through each int8 implementation.

    Each variant is checked against the float64 product with the (dequantized) weight, then timed: on a GPU
    ``calls`` back-to-back calls captured in one CUDA graph (no launch gaps); ``compile``: each through
    torch.compile with ``options`` (default: coordinate-descent tuning). GB/s = weight bytes / time.
    """
    from . import decode, timing

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lin = nn.Linear(k, n, bias=False, device=dev, dtype=dtype)
    x = torch.randn(1, k, device=dev, dtype=dtype)
    variants = {str(dtype).split(".")[-1]: lin} | {f"int8 {i}": Int8Linear.from_linear(lin, i) for i in IMPLS}
    rows = []
    for name, mod in variants.items():
        w = dequantize(mod.weight, mod.scales) if isinstance(mod, Int8Linear) else mod.weight
        ref = x.double() @ w.double().T
        fn = torch.compile(mod, options=options or {"coordinate_descent_tuning": True}) if compile else mod
        try:
            err = decode.rel_err(fn(x), ref)
            one = lambda fn=fn: fn(x)  # noqa: E731
            run = decode.cuda_graph(lambda one=one: [one() for _ in range(calls)]) if dev.type == "cuda" else one
            t = timing.benchmark(run, device=dev, warmup=2, reps=30, max_time_s=1.0)
        except Exception as e:  # noqa: BLE001 - e.g. an op with no kernel (or no compiler) for this device
            rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        s = t.median_s / (calls if dev.type == "cuda" else 1)
        nbytes = sum(b.numel() * b.element_size() for b in (mod.weight, getattr(mod, "scales", mod.weight[:0])))
        rows.append({"variant": name, "us": 1e6 * s, "GB/s": nbytes / s / 1e9, "rel err": err})
    return rows
