"""Int8 weight-only copies of a model (lab4's rung e), and the weight-sharing copies that swap a model's
linear layers (``copy_structure``, ``use_gemv``); the lean Mistral itself is ``labutils.lean``.

Int8 weight-only: decode at batch 1 reads every weight once per token, so int8 weights halve
the bytes -- if the kernel really reads int8. ``ops.quantize_per_channel`` keeps one scale per
output channel: ``w ~= q * scale``, ``q`` in [-127, 127], every weight off by at most
``scale / 2``. ``Int8Linear`` computes ``x @ (q * scale).T`` in one of these ways:

- ``"triton"`` (default): at batch 1 on a GPU, the hand-written Triton kernel of ``kernels.gemv``,
  which reads the int8 weight once and converts it in registers, as its own kernel in the compiled
  graph, and also does the RMSNorm before the layer, the residual add after it and SiLU(gate) x up
  (``lean.apply``); its block shape tuned per matrix (``gemv_tune.tune_model``). Elsewhere, and for a
  prefill's many rows, the same maths in plain torch (``gemv.reference``: dequantize, then matmul).
- ``"triton_plain"``: the same kernel without those fusions (the lean model then runs them as Inductor's
  kernels around it): what the fusion is worth.

- ``"dequant"``: ``F.linear(x, q.to(x.dtype)) * scale``. Eager, this converts the whole weight
  to bf16 first (reads int8, writes and re-reads bf16: slower than bf16). Under torch.compile
  with ``coordinate_descent_tuning`` Inductor turns an M=1 matmul into a reduction kernel that
  reads int8 and converts in registers (gpt-fast's recipe).
- ``"dequant_fp32"``: the same with int8 -> fp32 directly (one conversion instead of int8 -> bf16
  -> fp32 in the fused kernel; eager it is even worse: a 4-byte copy of the weight).
- ``"dequant_bits"``: int8 -> fp32 without a conversion instruction: ``q + 128`` placed in the
  mantissa of the float 2**23 (integer add and or), then 2**23 + 128 subtracted -- exact.
- ``"int8pack"``: ``torch._weight_int8pack_mm``, PyTorch's own int8 weight-only kernel (a library rung):
  ``(x (M, K), q (N, K) int8, scales (N,)) -> (M, N)`` in x's dtype. On a CPU (torch 2.13) the scales must have
  x's dtype; on CUDA (torch 2.11, ``aten/src/ATen/native/cuda/int8mm.cu``) x and the scales are first copied
  to float32 and a plain CUDA kernel does float32 sums (one thread -- in later revisions one warp -- per
  output), then the result is cast back: no tensor cores, two extra conversion kernels per call. Used for
  decode steps (one token per sequence) only: a prefill's rows take the ``"dequant"`` maths (on this CPU, 32
  rows through ``_weight_int8pack_mm`` took ~10x as long), like the Triton impls, so TTFT is not the library's.

``torchao_int8`` is the other library rung: torchao's ``quantize_`` with ``Int8WeightOnlyConfig`` (the same
per-row symmetric scheme, weights held as a tensor subclass; its linear is ``mm(x, q.T.to(x.dtype)) * scale``,
gpt-fast's formulation, which Inductor fuses under torch.compile). ``LIBRARY`` names both.

``kernel_bench`` times one matrix-vector product per variant, so the fastest is picked on facts.

Used in lab4 §Rung d′, §Which int8 kernel really reads int8? and §Rung e.
"""

from __future__ import annotations

import copy
from dataclasses import astuple

import torch
import torch.nn.functional as F
from torch import nn

from . import hardware, ops, timing
from .kernels import gemv, gemv_tune

# ---------------------------------------------------------------- int8 weight-only
IMPLS = ("triton", "triton_plain", "dequant", "dequant_fp32", "dequant_bits", "int8pack")
#: the int8 paths that are a library's, not this repo's: what each rung label says ran
LIBRARY = {"int8pack": "PyTorch torch._weight_int8pack_mm", "torchao": "torchao Int8WeightOnlyConfig"}
TORCHAO_TESTED = "0.18.0"  # built for torch >= 2.11; runs on the CPU's torch 2.13 and the GPU's 2.11 (optional:
# not in requirements.txt, which says why)


class Int8Linear(nn.Module):
    """A bias-free linear layer holding int8 weights (out, in) and one scale per output channel."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, impl: str = "triton"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"unknown int8 implementation {impl!r}: use one of {IMPLS}")
        self.impl = impl
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scales", scale.to(dtype))
        self.fuse = impl == "triton"  # lean.apply hands this layer its norm and residual
        if impl.startswith("triton"):
            self.cfg = astuple(gemv.DEFAULT)  # the kernel's block shape: gemv_tune.tune_model sets the tuned one

    @classmethod
    def from_linear(cls, lin: nn.Linear, impl: str = "triton") -> Int8Linear:
        if lin.bias is not None:
            raise ValueError("Int8Linear has no bias: Mistral's linear layers have none")
        q, s = ops.quantize_per_channel(lin.weight)
        return cls(q, s, lin.weight.dtype, impl)

    def forward(self, x: torch.Tensor, norm=None, eps: float = 0.0, residual=None, glu: bool = False):
        if self.impl.startswith("triton"):
            return gemv.linear(x, self.weight, self.scales, self.cfg, norm, eps, residual, glu)
        if self.impl == "int8pack" and not (x.dim() == 3 and x.shape[1] > 1):  # decode; a prefill: dequant below
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


def quantize_int8(model: nn.Module, impl: str = "triton") -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` as ``Int8Linear``; all other tensors are shared.
    For the "triton" impls on a GPU, call ``gemv_tune.tune_model`` on the copy next (else the layers keep the
    default block shape)."""
    return copy_structure(model, lambda m: Int8Linear.from_linear(m, impl) if isinstance(m, nn.Linear) else None)


def use_gemv(model: nn.Module, fuse: bool = True) -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers run the Triton kernel at batch 1 (same weight tensors);
    ``fuse``: with the RMSNorm and residual add done inside it (see ``gemv``)."""
    return copy_structure(model, lambda m: gemv.Linear.from_linear(m, fuse) if isinstance(m, nn.Linear) else None)


def quiet_torchao() -> None:
    """Keep torchao's import-time log lines out of the output: that it cannot load its CUDA extensions on a CPU
    build (or one built for another CUDA), and a pytree deprecation note. Call it before anything imports torchao
    (transformers does at every model load when torchao is installed)."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def torchao_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` weights are torchao int8 weight-only tensors (``quantize_`` with
    ``Int8WeightOnlyConfig``, per output row); the original keeps its weights. Raises ImportError with the fix if
    torchao cannot be imported. ``set_inductor_config=False``: the rung's own compile options apply, no global
    setting changes."""
    quiet_torchao()
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise ImportError(f"torchao is not installed ({e}); it is optional (requirements.txt says why): "
                          f"pip install torchao=={TORCHAO_TESTED} (needs torch >= 2.11)") from e
    new = copy_structure(model)
    quantize_(new, Int8WeightOnlyConfig(set_inductor_config=False))
    return new


def library_int8(model: nn.Module, impl: str) -> tuple[nn.Module, str, str]:
    """A library rung's int8 copy of ``model``: ``impl`` one of ``LIBRARY``. -> (model, what ran, why not what was
    asked: "" when it ran). torchao that cannot be imported falls back to its own maths in plain torch
    (``"dequant"``: ``mm(x, q.T.to(x.dtype)) * scale``), and the reason says how to install it."""
    if impl not in LIBRARY:
        raise ValueError(f"unknown library int8 path {impl!r}: use one of {tuple(LIBRARY)}")
    if impl == "int8pack":
        return quantize_int8(model, "int8pack"), impl, ""
    try:
        return torchao_int8(model), impl, ""
    except ImportError as e:
        return quantize_int8(model, "dequant"), "dequant", f"torchao cannot run here: {e}; ran its maths in plain torch"


def _nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor; a tensor subclass (torchao's int8 weights) counts the tensors it holds."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        held = [a for a in t.__tensor_flatten__()[0] if a in ("qdata", "scale")] or t.__tensor_flatten__()[0]
        return sum(_nbytes(getattr(t, a)) for a in held if getattr(t, a) is not None)  # (no zero point: unread)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module, skip: tuple[str, ...] = ("tok_emb", "embed_tokens")) -> int:
    """Bytes of the parameters and int8 weight buffers a decode step reads (embeddings are looked up, not read)."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if any(s in name for s in skip) or not (isinstance(t, nn.Parameter) or name.endswith(("weight", "scales"))):
            continue
        total += _nbytes(t)
    return total


def kernel_bench(n: int, k: int, dtype=torch.bfloat16, device=None, compile: bool = False, calls: int = 10,
                 options=None) -> list[dict]:
    """One M=1 product x @ W.T (W: n x k) in ``dtype`` (cuBLAS/Inductor, and the Triton kernel of ``gemv``)
    and through each int8 implementation (the "triton" ones with their block shape tuned first).

    Each variant is checked against the float64 product with the (dequantized) weight, then timed: on a GPU
    ``calls`` back-to-back calls captured in one CUDA graph (no launch gaps); ``compile``: each through
    torch.compile with ``options`` (default: coordinate-descent tuning). GB/s = weight bytes / time.
    """
    dev = torch.device(device) if device is not None else hardware.default_device()
    lin = nn.Linear(k, n, bias=False, device=dev, dtype=dtype)
    x = torch.randn(1, k, device=dev, dtype=dtype)
    name16 = str(dtype).split(".")[-1]
    variants = {name16: lin, f"{name16} triton": gemv.Linear.from_linear(lin)} | {
        f"int8 {i}": Int8Linear.from_linear(lin, i) for i in IMPLS}
    rows = []
    for name, mod in variants.items():
        gemv_tune.tune_model(mod)  # the kernel-run variants get their tuned block shape (others: no rows, no-op)
        w = ops.dequantize(mod.weight, mod.scales) if isinstance(mod, Int8Linear) else mod.weight
        ref = x.double() @ w.double().T
        fn = torch.compile(mod, options=options or {"coordinate_descent_tuning": True}) if compile else mod
        try:
            err = timing.rel_err(fn(x), ref)
            one = lambda fn=fn: fn(x)  # noqa: E731
            run = timing.graphed(lambda one=one: [one() for _ in range(calls)], dev).run if dev.type == "cuda" else one
            t = timing.benchmark(run, device=dev, warmup=2, reps=30, max_time_s=1.0)
        except Exception as e:  # noqa: BLE001 - e.g. an op with no kernel (or no compiler) for this device
            rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        s = t.median_s / (calls if dev.type == "cuda" else 1)
        nbytes = sum(b.numel() * b.element_size() for b in (mod.weight, getattr(mod, "scales", None)) if b is not None)
        rows.append({"variant": name, "us": 1e6 * s, "GB/s": nbytes / s / 1e9, "rel err": err})
    return rows
