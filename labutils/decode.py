"""Generation benchmarks (TTFT, TPOT, ITL, tokens/s, MBU, MFU) and the decode loops of lab4.

- Cost model: bytes and FLOPs of one decode step (``step_cost``), MBU/MFU, $/1M tokens.
- Steppers: ``prefill(ids)`` and ``step(token, pos)`` -> logits, what every rung of the ladder does:
  ``HFStepper`` (HF model, dynamic or static cache, optionally compiled) and ``LeanStepper`` (the
  lean model, ``lean.LeanMistral``, compiled with CUDA graphs on a GPU, gpt-fast's recipe).
- ``loop_generate`` / ``hf_generate`` with a ``TokenClock``; ``measure`` -> ``DecodeRun``; ``check``:
  teacher-forced logits vs the HF model's (random weights make greedy tokens flip on near-ties).
- ``profile_decode`` (from ``profiling``: busy vs wall time) and ``batch_sweep`` (memory -> compute bound).

Used in lab4 §Roofline, §Profile, §Ladder, §Batch sweep, §Cost.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch

from . import lean, models, quant, roofline, timing
from .profiling import profile_decode  # noqa: F401 - lab4 and decode_bench call it as decode.profile_decode

# Logit tolerances (relative error) of a decode path against the HF reference: bf16 paths that fuse or reorder
# sums differ by ~5e-2 on random weights (near-uniform logits), int8 weights by ~0.2; float32 paths by ~1e-6.
LOGIT_TOL = {"bfloat16": 0.1, "float16": 0.1, "float32": 1e-4}
INT8_TOL = 0.3


# ---------------------------------------------------------------- cost model

def step_cost(name: str, batch: int, context: int, weight_bytes: float, kv_dtype_bytes: float = 2) -> roofline.Cost:
    """Weights read once per step (shared by the batch) + every sequence's ``context`` cached K,V;
    FLOPs: 2 per multiplied weight per token + attention over ``context`` keys (``models.estimate``)."""
    e = models.estimate(name)
    kv = batch * context * e.kv_bytes_per_token(kv_dtype_bytes)
    return roofline.Cost(f"decode step, batch {batch}", batch * e.flops_per_token(context), weight_bytes + kv,
                         weight_bytes=weight_bytes, kv_bytes=kv)


def rung_label(base: str, attn: str, impl: str, compiled: bool, kernels: bool, pdl: bool = True,
               instead_of: str = "") -> str:
    """What a lean rung ran, in words: ``base`` ("d: lean"), a library kernel by its library (``quant.LIBRARY``,
    "via ... (library)"), compiled or eager, then [attention, linear kernel]. A Triton kernel that cannot run here
    (``kernels`` False) is labelled as the plain torch that ran instead; ``instead_of``: the library that was asked
    for and could not run (its maths ran in plain torch)."""
    head = base
    if impl in quant.LIBRARY:
        head = f"{base} via {quant.LIBRARY[impl]} (library)"
    elif instead_of:
        head = f"{base}: {quant.LIBRARY[instead_of].split()[0]}'s maths in plain torch (it cannot run here)"
    if not kernels and (attn.startswith("triton") or impl.startswith("triton")):
        head += ": Triton kernels' maths in plain torch (no GPU)"
    parts = [attn] + ([impl] if impl and impl not in quant.LIBRARY else [])
    return (f"{head}, {'compiled' if compiled else 'eager'} [{', '.join(parts)}"
            f"{', no PDL' if kernels and not pdl else ''}]")


def mbu(bytes_per_step: float, step_s: float, read_Bps: float) -> float:
    """Model bandwidth utilisation: bytes a step must read / its time / the measured read bandwidth."""
    return bytes_per_step / step_s / read_Bps


def usd_per_million_tokens(tok_s: float, usd_per_hour: float) -> float:
    return usd_per_hour / 3600 / tok_s * 1e6


# ---------------------------------------------------------------- steppers: prefill + one-token step
# Inductor warns at every compile on a TF32-capable GPU that float32 matmuls do not use TF32. That is deliberate
# here: the bf16 models' only float32 matmul is HF's RoPE angle (positions x inverse frequencies), which TF32's
# 10-bit mantissa would round; the warning is not about anything an attendee should change.
warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores for float32 matrix multiplication available",
                        category=UserWarning)

#: torch.compile options of the lean rung: CUDA graphs (what mode="reduce-overhead" sets) plus gpt-fast's
#: coordinate-descent tuning, under which Inductor turns an M=1 matmul into a tuned reduction kernel (and an
#: int8 -> bf16 conversion fuses into its weight read), and kernel names that say which ops each fused
#: kernel holds (for the profile). Passed per compile: no global setting changes.
FAST_OPTIONS = {"triton.cudagraphs": True, "coordinate_descent_tuning": True, "triton.unique_kernel_names": True}


class LeanStepper:
    """Prefill eagerly; ``step`` eager, or compiled with ``options`` (default ``FAST_OPTIONS``).

    ``dynamic=False``: every shape is static (the position is a tensor, so one graph serves every step);
    a second model compiled in the same process then recompiles with static shapes too, instead of
    possibly being generalised to dynamic shapes (torch.compile's automatic dynamic on a recompile)."""

    def __init__(self, model: lean.LeanMistral, batch: int, max_len: int, compile: bool = False, options=None):
        self.model, self.compiled = model.setup_cache(batch, max_len), compile
        opts = FAST_OPTIONS if options is None else options
        self.fn = torch.compile(model, fullgraph=True, dynamic=False, options=opts) if compile else model

    @torch.no_grad()
    def prefill(self, ids):
        return self.model(ids, torch.arange(ids.shape[1], device=ids.device))[:, -1]

    @torch.no_grad()
    def step(self, tok, pos):
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        return self.fn(tok, pos)[:, -1].clone()  # a graph's output is overwritten by its next replay


class HFStepper:
    """The HF model with a DynamicCache (grows by concatenation) or a StaticCache (preallocated)."""

    def __init__(self, model, batch: int, max_len: int, static: bool = True, compile: bool = False):
        from transformers import StaticCache

        self.model, self.static, self.compiled = model, static, compile
        self.cache = StaticCache(config=model.config, max_cache_len=max_len) if static else None
        self.fn = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) if compile else model.forward

    @torch.no_grad()
    def prefill(self, ids):
        from transformers import DynamicCache

        if self.static:
            self.cache.reset()
        else:
            self.cache = DynamicCache(config=self.model.config)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        return self.model(input_ids=ids, position_ids=pos, past_key_values=self.cache, use_cache=True).logits[:, -1]

    @torch.no_grad()
    def step(self, tok, pos):
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        out = self.fn(input_ids=tok, position_ids=pos.view(1, 1), past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1].clone()


# ---------------------------------------------------------------- generation with a token clock
def loop_generate(stepper, prompt, new_tokens: int, clock: timing.TokenClock | None = None):
    """Greedy: prefill, then ``new_tokens - 1`` steps; the next token never leaves the device. -> (B, new_tokens)"""
    P = prompt.shape[1]
    pos = torch.arange(P, P + new_tokens, device=prompt.device)
    clock and clock.start()
    out = [stepper.prefill(prompt).argmax(-1, keepdim=True)]
    clock and clock.mark()
    for i in range(new_tokens - 1):
        out.append(stepper.step(out[-1], pos[i:i + 1]).argmax(-1, keepdim=True))
        clock and clock.mark()
    return torch.cat(out, 1)


def hf_generate(model, prompt, new_tokens: int, clock: timing.TokenClock | None = None, static: bool = False,
                compile: bool = False):
    """``model.generate`` greedy, exactly ``new_tokens`` new tokens; a streamer marks the clock at each.
    ``static``: a StaticCache; on a GPU transformers then compiles the forward itself unless ``compile=False``."""
    from transformers.generation.streamers import BaseStreamer

    class Marks(BaseStreamer):
        first = True  # generate puts the prompt first

        def put(self, value):
            if not self.first:
                clock.mark()
            self.first = False

        def end(self):
            pass

    clock and clock.start()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id,
                         streamer=Marks() if clock else None, disable_compile=not compile,
                         **({"cache_implementation": "static"} if static else {}))
    return out[:, prompt.shape[1]:]


# ---------------------------------------------------------------- one rung, measured
@dataclass
class DecodeRun:
    rung: str
    batch: int
    prompt_len: int
    new_tokens: int
    tokens: int  # new tokens counted in the output of a run (batch x new_tokens)
    ttft_s: float  # prefill -> first token
    tpot_s: float  # (e2e - ttft) / (new_tokens - 1): one decode step
    itl_p50_s: float
    itl_p99_s: float
    e2e_s: float
    warmup_s: float  # first call: compilation, CUDA-graph capture, lazy allocation
    cost: roofline.Cost
    read_Bps: float
    peak_flops: float
    note: str = ""

    @property
    def tok_s(self) -> float:
        return self.batch / self.tpot_s

    @property
    def mbu(self) -> float:
        return mbu(self.cost.bytes, self.tpot_s, self.read_Bps)

    @property
    def mfu(self) -> float:
        return self.cost.flops / self.tpot_s / self.peak_flops

    def as_dict(self) -> dict:
        return asdict(self) | {"tok_s": self.tok_s, "mbu": self.mbu, "mfu": self.mfu}

    def row(self) -> dict:
        return {"rung": self.rung, "tok/s": self.tok_s, "MBU %": 100 * self.mbu, "TTFT ms": 1e3 * self.ttft_s,
                "TPOT ms": 1e3 * self.tpot_s, "ITL p50 ms": 1e3 * self.itl_p50_s, "ITL p99 ms": 1e3 * self.itl_p99_s,
                "warm-up s": self.warmup_s}


def measure(rung: str, generate, prompt, new_tokens: int, cost: roofline.Cost, read_Bps: float, peak_flops: float,
            reps: int = 3, warmup: int = 1, note: str = "") -> DecodeRun:
    """``generate(prompt, new_tokens, clock)``: a first call (timed apart), ``warmup`` more, ``reps`` timed runs."""
    clock, runs = timing.TokenClock(prompt.device), []

    def once():
        clock.start()
        out = generate(prompt, new_tokens, clock)
        runs.append((clock.seconds(), out))

    t = timing.benchmark(once, warmup=warmup, reps=reps, min_reps=reps, max_time_s=float("inf"), device=prompt.device)
    timed = runs[1 + warmup:]
    for marks, out in runs:
        if tuple(out.shape) != (prompt.shape[0], new_tokens) or len(marks) != new_tokens:
            raise RuntimeError(f"{rung}: expected {new_tokens} tokens per sequence, got {tuple(out.shape)}")
    ttft = timing.stats([m[0] for m, _ in timed]).p50
    e2e = timing.stats([m[-1] for m, _ in timed]).p50
    itl = timing.stats([b - a for m, _ in timed for a, b in zip(m, m[1:])])
    tpot = (e2e - ttft) / max(new_tokens - 1, 1)
    return DecodeRun(rung, prompt.shape[0], prompt.shape[1], new_tokens, timed[0][1].numel(), ttft, tpot,
                     itl.p50, itl.p99, e2e, t.first_call_s, cost, read_Bps, peak_flops, note)


# ---------------------------------------------------------------- correctness: teacher-forced logits
@torch.no_grad()
def reference_logits(model, prompt, forced):
    """HF forward over prompt + forced tokens without a cache: the logits that predict each forced token."""
    ids = torch.cat([prompt, forced[:, :-1]], 1)
    return model(input_ids=ids, use_cache=False).logits[:, prompt.shape[1] - 1:].float().transpose(0, 1)


@torch.no_grad()
def teacher_forced(stepper, prompt, forced):
    """The stepper's logits (steps, B, vocab) when fed ``forced`` instead of its own greedy tokens."""
    P = prompt.shape[1]
    out = [stepper.prefill(prompt).float()]
    for i in range(forced.shape[1] - 1):  # inputs laid out as loop_generate's (same strides: no recompile)
        tok = forced[:, i:i + 1].clone(memory_format=torch.contiguous_format)
        out.append(stepper.step(tok, torch.arange(P + i, P + i + 1, device=prompt.device)).float())
    return torch.stack(out)


def check(stepper, prompt, forced, ref, tol: float) -> dict:
    """Relative error of the stepper's teacher-forced logits vs ``ref``; raises above ``tol``.
    Timed with a stopwatch: on a compiled stepper this first use holds the compilation."""
    with timing.stopwatch(prompt.device) as t:
        err = timing.rel_err(teacher_forced(stepper, prompt, forced), ref)
    if not err <= tol:  # also catches NaN
        raise RuntimeError(f"logits differ from the reference by {err:.2e} (relative) > tolerance {tol:.0e}")
    return {"rel_err": err, "tol": tol, "steps": forced.shape[1], "first_use_s": t.seconds}


# ---------------------------------------------------------------- batch sweep
@torch.no_grad()
def batch_sweep(model: lean.LeanMistral, name: str, batches, context: int, read_Bps: float, peak_flops: float,
                graphs: bool | None = None, max_time_s: float = 1.0) -> list[dict]:
    """One decode step at each batch size over a ``context``-token KV cache (random K,V, never zeros).

    The eager lean model, replayed as a CUDA graph on a GPU (one capture per batch size, no recompile);
    each batch size gets its own cache in a weight-sharing copy, so ``model`` is left as it was.
    """
    dev, wbytes, rows = model.norm.device, quant.weight_bytes(model), []
    graphs = dev.type == "cuda" if graphs is None else graphs
    S = -(-(context + 1) // 64) * 64  # cache slots, all read every step (masked SDPA)
    for b in batches:
        m = quant.copy_structure(model).setup_cache(b, S)
        for blk in m.layers:
            blk.k_cache.normal_(), blk.v_cache.normal_()
        tok = torch.randint(3, m.c.vocab, (b, 1), device=dev)
        pos = torch.tensor([context], device=dev)
        ref = m(tok, pos).float()
        fwd = lambda m=m, tok=tok, pos=pos: m(tok, pos)  # noqa: E731
        g = timing.graphed(fwd, dev) if graphs else timing.Graphed(fwd, fwd, False, "eager")
        err = timing.rel_err(g.check().float(), ref)  # a graph's output is poisoned first, then replayed
        t = timing.benchmark(g.run, device=dev, warmup=2, reps=30, max_time_s=max_time_s)
        c = step_cost(name, b, S, wbytes)
        rows.append({"batch": b, "step_ms": 1e3 * t.median_s, "tok_s": b / t.median_s,
                     "roofline_tok_s": b / c.time(peak_flops, read_Bps),
                     "mbu": mbu(c.bytes, t.median_s, read_Bps), "mfu": c.flops / t.median_s / peak_flops,
                     "rel_err_graph_vs_eager": err})
        del m, g
    return rows
