"""The roofline: FLOPs, bytes and arithmetic intensity of GEMMs and of mistral layers.

A kernel that does ``F`` FLOPs and moves ``B`` bytes cannot finish faster than
``max(F / peak, B / bandwidth)``. Its arithmetic intensity ``AI = F / B`` (FLOP/byte)
says which term wins: below the ridge point ``peak / bandwidth`` it is memory-bound,
above it compute-bound. ``attainable(AI) = min(peak, AI * bandwidth)`` is the roof, and
a measured FLOP/s divided by it is the kernel's "% of roof".

Conventions (state them, then keep them): a GEMM (m,k)@(k,n) does ``2mnk`` FLOPs and
reads each input once and writes the output once; a model's FLOPs are the matmul
multiply-adds only (as ``models.estimate`` counts them); element-wise work (norms,
SiLU, RoPE, softmax) is counted as bytes only.

Used in lab1 §GEMM arithmetic, §Roofline, §Layer by layer, §Improvements; lab4 §Roofline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import models, timing

#: bytes per element as stored in memory (tf32 is an fp32 tensor computed on tensor cores)
DTYPE_BYTES = {"float32": 4, "tf32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}
SHORT = {"float32": "fp32", "tf32": "tf32", "float16": "fp16", "bfloat16": "bf16", "float8_e4m3fn": "fp8"}


@dataclass(frozen=True)
class Cost:
    """What one kernel (or a group of them) must do: FLOPs and bytes moved to/from memory."""

    name: str
    flops: float
    bytes: float
    weight_bytes: float = 0.0  # the part of ``bytes`` that is parameters
    kv_bytes: float = 0.0  # the part of ``bytes`` that is reading the KV cache
    group: str = ""

    @property
    def ai(self) -> float:
        """Arithmetic intensity, FLOP/byte."""
        return self.flops / self.bytes if self.bytes else float("inf")

    def time(self, peak: float, bw: float) -> float:
        """Roofline lower bound on seconds: max(FLOPs / peak, bytes / bandwidth)."""
        return max(self.flops / peak, self.bytes / bw)

    def bound(self, peak: float, bw: float) -> str:
        return "compute" if self.flops / peak >= self.bytes / bw else "memory"

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.name if self.name == other.name else f"{self.name}+{other.name}",
                    self.flops + other.flops, self.bytes + other.bytes, self.weight_bytes + other.weight_bytes,
                    self.kv_bytes + other.kv_bytes, self.group if self.group == other.group else "")

    def times(self, k: float) -> Cost:
        return Cost(self.name, self.flops * k, self.bytes * k, self.weight_bytes * k, self.kv_bytes * k, self.group)


def gemm_cost(m: int, n: int, k: int, dtype_bytes: float = 2, out_bytes: float | None = None,
              name: str = "gemm", weight: str | None = None, group: str = "") -> Cost:
    """(m,k)@(k,n): 2mnk FLOPs; bytes = inputs read once + output written once.

    ``out_bytes`` defaults to ``dtype_bytes`` (fp8 GEMMs write bf16: pass 2). ``weight="b"``
    marks the (k,n) operand as parameters (a linear layer), so ``weight_bytes`` is set.
    """
    out_bytes = dtype_bytes if out_bytes is None else out_bytes
    w = k * n * dtype_bytes if weight == "b" else 0.0
    return Cost(name, 2.0 * m * n * k, (m * k + k * n) * dtype_bytes + m * n * out_bytes, w, 0.0, group)


def ridge(peak: float, bw: float) -> float:
    """The arithmetic intensity (FLOP/byte) where the memory roof meets the compute roof."""
    return peak / bw


def attainable(ai: float, peak: float, bw: float) -> float:
    """The roof at intensity ``ai``: min(peak, ai * bandwidth), in FLOP/s."""
    return min(peak, ai * bw)


def pct_of_roof(flops_per_s: float, ai: float, peak: float, bw: float) -> float:
    """Measured FLOP/s as a percentage of the roof at its intensity."""
    return 100.0 * flops_per_s / attainable(ai, peak, bw)


# ---------------------------------------------------------------- model layers
ATTN_IMPLS = ("sdpa", "eager", "sdpa-masked")


def attention_cost(p: models.Preset, batch: int, tokens: int, kv_len: int, dt: float,
                   impl: str = "sdpa") -> Cost:
    """Attention core of one layer (QK^T, softmax, AV) for ``tokens`` new tokens over ``kv_len`` keys.

    ``sdpa``: a fused kernel reads Q and the cached K,V once (GQA native), writes O.
    ``sdpa-masked``: HF passes a mask (static cache), so K,V are first expanded to all heads
    (repeat_kv: read KV, write and re-read the copy). ``eager``: the expansion plus the score
    matrix (B·H·T·S) materialised in memory, about 6 fp32 passes (matmul, scale, mask, softmax, cast).
    """
    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}: use one of {ATTN_IMPLS}")
    h, H = p.hidden_size, p.num_attention_heads
    kvd = p.num_key_value_heads * (h // H)
    kv_read = 2 * batch * kv_len * kvd * dt
    nbytes = 2 * batch * tokens * h * dt + 2 * batch * tokens * kvd * dt + kv_read  # q, o; new k,v; cache
    if impl in ("eager", "sdpa-masked") and kvd != h:
        nbytes += 2 * (2 * batch * kv_len * h * dt)  # write the expanded K,V, read it back
    if impl == "eager":
        nbytes += 6 * batch * H * tokens * kv_len * 4
    return Cost("attention", 4.0 * batch * tokens * kv_len * h, nbytes, 0.0, kv_read, "attention core")


def layer_costs(name: str, batch: int, context: int, *, tokens: int = 1, dtype: str = "bfloat16",
                attn: str = "sdpa", kv_len: int | None = None) -> list[Cost]:
    """Per-kernel costs of one decoder layer: ``tokens`` new tokens per sequence, ``context`` cached.

    ``kv_len`` is how many keys each query reads (default ``context + tokens``; a static cache
    reads its whole ``max_cache_len``).
    """
    p = models.preset(name)
    dt = DTYPE_BYTES[dtype]
    h, i = p.hidden_size, p.intermediate_size
    kvd = p.num_key_value_heads * (h // p.num_attention_heads)
    m = batch * tokens
    act = m * h * dt

    def lin(nm, k_in, n_out, grp):
        return gemm_cost(m, n_out, k_in, dt, name=nm, weight="b", group=grp)

    norm = Cost("norm", 0.0, 2 * act + h * dt, h * dt, 0.0, "norms")
    return [norm,
            lin("q_proj", h, h, "attn proj"), lin("k_proj", h, kvd, "attn proj"), lin("v_proj", h, kvd, "attn proj"),
            attention_cost(p, batch, tokens, kv_len or context + tokens, dt, attn),
            lin("o_proj", h, h, "attn proj"), norm,
            lin("gate_proj", h, i, "mlp"), lin("up_proj", h, i, "mlp"),
            Cost("silu*mul", 0.0, 3 * m * i * dt, 0.0, 0.0, "mlp"), lin("down_proj", i, h, "mlp")]


def model_costs(name: str, batch: int, context: int, **kw) -> list[Cost]:
    """Every kernel of one forward step: all layers, the final norm and the lm_head."""
    p = models.preset(name)
    dt = DTYPE_BYTES[kw.get("dtype", "bfloat16")]
    m = batch * kw.get("tokens", 1)
    layer = layer_costs(name, batch, context, **kw)
    final_norm = Cost("norm", 0.0, 2 * m * p.hidden_size * dt + p.hidden_size * dt, p.hidden_size * dt, 0.0,
                      "norms")
    head = gemm_cost(m, p.vocab_size, p.hidden_size, dt, name="lm_head", weight="b", group="lm_head")
    return layer * p.num_hidden_layers + [final_norm, head]


def by_group(costs: Sequence[Cost]) -> dict[str, list[Cost]]:
    out: dict[str, list[Cost]] = {}
    for c in costs:
        out.setdefault(c.group or c.name, []).append(c)
    return out


def predict_time(costs: Sequence[Cost], peak: float, bw: float) -> float:
    """Roofline time of a sequence of kernels: the sum of each kernel's max(FLOPs/peak, bytes/bw)."""
    return sum(c.time(peak, bw) for c in costs)


def total(costs: Sequence[Cost], name: str = "total") -> Cost:
    out = Cost(name, 0.0, 0.0)
    for c in costs:
        out = out + c
    return Cost(name, out.flops, out.bytes, out.weight_bytes, out.kv_bytes)


# ---------------------------------------------------------------- ceilings and the plot
@dataclass
class Ceilings:
    """Measured roofs (bandwidth, peak FLOP/s per dtype) and, if known, the datasheet's."""

    bw: float
    peaks: dict[str, float]
    datasheet_bw: float | None = None
    datasheet_peaks: dict[str, float] = field(default_factory=dict)

    def roof(self, ai: float, dtype: str) -> float:
        return attainable(ai, self.peaks[dtype], self.bw)

    def pct(self, flops_per_s: float, ai: float, dtype: str) -> float:
        return pct_of_roof(flops_per_s, ai, self.peaks[dtype], self.bw)

    def ridge(self, dtype: str) -> float:
        return ridge(self.peaks[dtype], self.bw)


@dataclass(frozen=True)
class Point:
    """One measured kernel on the roofline."""

    ai: float
    flops_per_s: float
    dtype: str
    series: str
    label: str = ""


def gemm_point(r, series: str) -> Point:
    """A ``hardware.GemmResult`` as a roofline point (fp8 products write bf16)."""
    dt = DTYPE_BYTES[r.dtype]
    c = gemm_cost(r.m, r.n, r.k, dt, 2 if r.dtype == "float8_e4m3fn" else dt)
    return Point(c.ai, r.flops_per_s, r.dtype, series, f"{r.m}x{r.n}x{r.k}")


_COLORS = {"float32": "tab:blue", "tf32": "tab:cyan", "float16": "tab:orange", "bfloat16": "tab:red",
           "float8_e4m3fn": "tab:purple"}
_MARKERS = "os^Dvx*P"


def roofline_figure(points: Sequence[Point], ceilings: Ceilings, title: str = "Roofline (measured ceilings)",
                    annotate: bool = True):
    """Log-log roofline: one solid roof per measured dtype, the datasheet's dashed, points with % of roof."""
    from . import plots

    fig, ax = plots.figure(title, "arithmetic intensity (FLOP/byte)", "TFLOP/s", size=(9, 5.2))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ais = [p.ai for p in points] + [ceilings.ridge(d) for d in ceilings.peaks]
    lo, hi = min(ais + [1.0]) / 2, max(ais + [1.0]) * 2
    xs = [lo * (hi / lo) ** (j / 200) for j in range(201)]
    for d, peak in ceilings.peaks.items():
        c = _COLORS.get(d, "gray")
        ax.plot(xs, [attainable(x, peak, ceilings.bw) / 1e12 for x in xs], color=c, lw=1.8,
                label=f"{SHORT.get(d, d)} roof: {peak / 1e12:.3g} TFLOP/s, {ceilings.bw / 1e9:.3g} GB/s")
        ds = ceilings.datasheet_peaks.get(d)
        if ds and ceilings.datasheet_bw:
            ax.plot(xs, [attainable(x, ds, ceilings.datasheet_bw) / 1e12 for x in xs], color=c, ls="--", lw=1)
    series = list(dict.fromkeys(p.series for p in points))
    for p in points:
        i = series.index(p.series)
        ax.scatter(p.ai, p.flops_per_s / 1e12, color=_COLORS.get(p.dtype, "k"), edgecolor="k", zorder=3,
                   marker=_MARKERS[i % len(_MARKERS)], s=28)
    if annotate:
        _place_labels(ax, [(p.ai, p.flops_per_s / 1e12, f"{ceilings.pct(p.flops_per_s, p.ai, p.dtype):.0f}%",
                            _COLORS.get(p.dtype, "k")) for p in points])
    for s in series:
        ax.scatter([], [], marker=_MARKERS[series.index(s) % len(_MARKERS)], color="w", edgecolor="k", label=s)
    if ceilings.datasheet_bw:
        ax.plot([], [], color="gray", ls="--", lw=1, label="datasheet roofs (dashed)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


_OFFSETS = [(4, 3), (4, -10), (-22, 3), (-22, -10), (4, 11), (4, -18), (-22, 11), (-22, -18), (12, -4), (-30, -4)]


def _place_labels(ax, items, fontsize: float = 6.5) -> None:
    """Annotate (x, y, text, color) items, each at the first offset whose box overlaps no label placed
    before it and no marker (greedy, in display pixels): points of two dtypes often coincide."""
    ax.get_xlim(), ax.get_ylim()  # applies the pending autoscale: data -> pixel is final from here
    px = ax.figure.dpi / 72
    marks = [tuple(ax.transData.transform((x, y))) for x, y, _, _ in items]
    boxes = [(mx - 4 * px, my - 4 * px, mx + 4 * px, my + 4 * px) for mx, my in marks]
    for (x, y, text, color), (mx, my) in zip(items, marks):
        w, h = 0.62 * fontsize * len(text) * px, 1.15 * fontsize * px
        cands = [(mx + dx * px, my + dy * px, mx + dx * px + w, my + dy * px + h) for dx, dy in _OFFSETS]
        hits = [sum(_overlap(c, b) for b in boxes) for c in cands]
        j = hits.index(min(hits))
        boxes.append(cands[j])
        ax.annotate(text, (x, y), textcoords="offset points", xytext=_OFFSETS[j], fontsize=fontsize, color=color)


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


# ---------------------------------------------------------------- measured: one forward step
def token_ids(batch: int, length: int, vocab: int = 32000, seed: int = 0):
    """Seeded random token ids (B, length): the same prefix for every batch size and dtype."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def last_logits(model, ids):
    """Reference: a forward over all of ``ids`` without a cache, logits of the last position (float32)."""
    with torch.no_grad():
        return model(ids.to(model.device), use_cache=False, logits_to_keep=1).logits[:, -1].float()


def decode_step(model, ids, cache: str = "dynamic", max_len: int | None = None):
    """One decode forward, repeatable: prefill ``ids[:, :-1]`` into a KV cache, then ``run()`` feeds
    ``ids[:, -1:]`` (one new token per sequence) and rolls the cache back, so every call costs the same.

    Returns ``(run, logits)``: the step and the last-position logits of its first call (check these
    against ``last_logits`` before timing). ``cache``: "dynamic" (HF DynamicCache: grows by concatenation)
    or "static" (StaticCache of ``max_len`` slots: preallocated, attends over all of them with a mask).
    """
    from transformers import DynamicCache, StaticCache

    ids = ids.to(model.device)
    c = ids.shape[1] - 1
    prompt, new = ids[:, :c], ids[:, c:]
    with torch.no_grad():
        if cache == "dynamic":
            kv = DynamicCache(config=model.config)
            model(prompt, past_key_values=kv)
            kw, reset = {}, lambda: kv.crop(-1)
        elif cache == "static":
            kv = StaticCache(config=model.config, max_cache_len=max_len or 2 * (c + 1))
            model(prompt, past_key_values=kv, cache_position=torch.arange(c, device=model.device))
            kw = {"cache_position": torch.tensor([c], device=model.device)}
            reset = lambda: [layer.cumulative_length.fill_(c) for layer in kv.layers]  # noqa: E731
        else:
            raise ValueError(f"cache must be 'dynamic' or 'static', not {cache!r}")

    def run():
        with torch.no_grad():
            out = model(new, past_key_values=kv, **kw)
        reset()
        return out

    return run, run().logits[:, -1].float()


def _module_ref(module, x):
    import copy

    return copy.deepcopy(module).double()(x.double())


def components(model, batch: int, context: int) -> dict[str, tuple]:
    """Layer 0's parts and the lm_head as separate callables with decode-step inputs (B new tokens,
    ``context`` cached keys): {group: (fn, rel_err vs float64, how many per forward)}."""
    import torch.nn.functional as F

    cfg, layer = model.config, model.model.layers[0]
    a, dev, dt = layer.self_attn, model.device, model.dtype
    h, H, kvh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    x = torch.randn(batch, 1, h, device=dev, dtype=dt)
    q = torch.randn(batch, H, 1, h // H, device=dev, dtype=dt)
    k, v = (torch.randn(batch, kvh, context + 1, h // H, device=dev, dtype=dt) for _ in range(2))
    projs = (a.q_proj, a.k_proj, a.v_proj, a.o_proj)

    def attn_ref():
        kd, vd = (t.double().repeat_interleave(H // kvh, dim=1) for t in (k, v))
        return torch.softmax(q.double() @ kd.transpose(-1, -2) / (h // H) ** 0.5, -1) @ vd

    def norm_ref():  # HF's RMSNorm computes in fp32 even when cast to fp64: write it out instead
        xd, ln = x.double(), layer.input_layernorm
        return ln.weight.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + ln.variance_epsilon)

    parts = {
        "norms": (lambda: layer.input_layernorm(x), norm_ref, 2 * cfg.num_hidden_layers + 1),
        "attn proj": (lambda: torch.cat([m(x) for m in projs], -1),
                      lambda: torch.cat([_module_ref(m, x) for m in projs], -1), cfg.num_hidden_layers),
        "attention core": (lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), attn_ref,
                           cfg.num_hidden_layers),
        "mlp": (lambda: layer.mlp(x), lambda: _module_ref(layer.mlp, x), cfg.num_hidden_layers),
        "lm_head": (lambda: model.lm_head(x), lambda: _module_ref(model.lm_head, x), 1),
    }
    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    return {g: (no_grad(fn), timing.rel_err(no_grad(fn)(), no_grad(ref)()), n) for g, (fn, ref, n) in parts.items()}


def count_ops(fn) -> int:
    """How many operators one call of ``fn`` sends to a device (views excluded): on a GPU each is at
    least one kernel launch, so this times the per-launch cost is a floor the roofline does not see."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 0 if func.is_view else 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), _Count() as c:
        fn()
    return c.n
