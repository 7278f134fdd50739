"""Tuning ``kernels.gemv``'s kernel: the block shape (and PDL) per weight matrix, chosen by timing on this GPU.

A matrix-vector kernel's best block shape depends on the matrix (few rows: many small programs to fill the
SMs; many rows: fewer, longer ones), on the weight's dtype and on what is fused in. ``tune`` times every
candidate in ``CONFIGS`` for one case -- each first checked against a float64 result -- then the PDL variants
of the fastest few; ``tune_model`` does that for every distinct kernel-run weight of a model and sets each
layer's ``cfg``. Timing is ``labutils.timing`` over a CUDA graph of launches on enough weight copies to
fill 3x the L2, as in the model, where each layer's weight comes from HBM. Winners are remembered per process.

Needs a GPU with triton (on a CPU the layers run the plain path and there is nothing to tune). Used in lab4
§Rung d′ and §Rung e (also through ``quant.kernel_bench`` and ``scripts/decode_bench``).
"""

from __future__ import annotations

import math
from dataclasses import astuple, replace

import torch

from .. import ops, timing
from . import _triton, gemv

#: Candidates for ``tune``: many programs of a few rows (for matrices with few rows, e.g. 4096 x 4096) to
#: fewer programs of more rows (fewer re-reads of x per weight byte); long K steps keep bytes in flight;
#: each with a row sum per K step, or one 2-D running sum reduced at the end.
CONFIGS = tuple(gemv.Config(*c, True, False) for c in (
    (4, 1024, 4, 1), (4, 2048, 4, 1), (8, 1024, 4, 1), (8, 2048, 8, 1), (16, 1024, 8, 2), (16, 2048, 8, 1),
    (32, 512, 8, 1), (32, 256, 4, 2),
)) + tuple(gemv.Config(*c, True, True) for c in (
    (4, 1024, 4, 1), (8, 512, 4, 1), (8, 1024, 8, 1), (16, 512, 8, 1), (16, 256, 4, 2), (32, 256, 8, 1),
    (32, 128, 4, 2), (64, 128, 8, 1),
)) + tuple(gemv.Config(*c, True, False, True) for c in (  # int8 weights only (bf16: rejected before compiling)
    (4, 1024, 4, 1), (4, 2048, 4, 1), (8, 1024, 4, 1), (8, 2048, 8, 1), (16, 1024, 8, 1), (16, 2048, 8, 1),
    (32, 512, 8, 1), (32, 256, 4, 2),
))
_TUNED: dict[tuple, list[dict]] = {}  # (n, k, weight dtype, x dtype, GPU index, fused, PDL) -> tune()'s table


def _key(n, k, wdtype, xdtype, dev, fused: str | None) -> tuple:
    return (n, k, wdtype, xdtype, dev.index, fused, _triton.PDL)  # tuned with PDL allowed or not


def rel_err_of(cfg: gemv.Config, x, w, scale, ref, **fused) -> float:
    """Relative error of one launch against ``ref``; the output is poisoned (NaN) first."""
    y = torch.full(ref.shape, float("nan"), dtype=x.dtype, device=x.device)
    return timing.rel_err(gemv._launch(x, w, scale, y, cfg, **fused), ref)


def _problem(n: int, k: int, wdtype, xdtype, dev, fused: str | None):
    """Random x (1, k), w (n, k) (int8 with per-row scales, or ``wdtype``), the kernel's fused inputs
    (``fused``: "norm", "residual", "norm+glu"; see ``lean.LeanMistral.FUSED_WITH``) and the float64 result."""
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(1, k, device=dev, dtype=xdtype, generator=g)
    w, scale = torch.randn(n, k, device=dev, generator=g), None
    if wdtype == torch.int8:
        w, scale = ops.quantize_per_channel(w)
        scale = scale.to(xdtype)
    w = w.to(wdtype)
    parts, kw = set((fused or "").split("+")), {}
    if "norm" in parts:
        kw |= {"norm": (1 + 0.1 * torch.randn(k, device=dev, generator=g)).to(xdtype), "eps": 1e-5}
    if "residual" in parts:
        kw |= {"residual": torch.randn(1, n, device=dev, generator=g).to(xdtype)}
    if "glu" in parts:
        kw |= {"glu": True}
    d = {key: v.double() if torch.is_tensor(v) else v for key, v in kw.items()}
    ref = gemv.reference(x.double(), w.double(), None if scale is None else scale.double(), **d)
    return x, w, scale, kw, ref


def tune(n: int, k: int, wdtype=torch.int8, xdtype=torch.bfloat16, device=None, fused: str | None = None,
         configs=CONFIGS, tol: float = 1e-2, max_time_s: float = 0.2, variants_of: int = 2) -> list[dict]:
    """Time every candidate config for an (n x k) weight at M = 1 on this GPU, with what the layer fuses in
    (``fused``: None, "norm", "residual" or "norm+glu"); then, on a GPU with PDL (``_triton.pdl_ok``), the
    ``variants_of`` fastest again with ``pdl=True``. Remember the table.

    Each candidate is first checked against the float64 result. Timing: ``labutils.timing``, over a
    CUDA graph of one call per weight copy, with enough copies to fill 3x the L2 (as in the model, where
    each layer's weight comes from HBM, not from cache). -> rows (config, us, GB/s, rel err), fastest first.
    """
    dev = torch.device(device or "cuda")
    if _triton.triton is None or dev.type != "cuda":
        raise RuntimeError("gemv_tune.tune needs a CUDA GPU and triton; on a CPU the layers use the plain path")
    dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    x, w0, scale, kw, ref = _problem(n, k, wdtype, xdtype, dev, fused)
    wbytes = w0.numel() * w0.element_size()
    copies = math.ceil(3 * torch.cuda.get_device_properties(dev).L2_cache_size / wbytes)
    ws = [w0] + [w0.clone() for _ in range(copies - 1)]
    y = torch.empty(1, n // 2 if kw.get("glu") else n, device=dev, dtype=xdtype)
    rows = []

    def run(cfg):
        row = {"config": cfg}
        try:
            row["rel err"] = err = rel_err_of(cfg, x, w0, scale, ref, **kw)
            if not err <= tol:
                raise RuntimeError(f"wrong result: rel err {err:.2e} > {tol:.0e}")
            g = timing.graphed(lambda c=cfg: [gemv._launch(x, w, scale, y, c, **kw) for w in ws], dev)
            t = timing.benchmark(g.run, device=dev, warmup=2, reps=20, max_time_s=max_time_s)
            row |= {"us": 1e6 * t.median_s / len(ws), "GB/s": wbytes * len(ws) / t.median_s / 1e9,
                    "spread": t.spread}
        except Exception as e:  # noqa: BLE001 - a config that does not compile or fit: reported, not chosen
            row["error"] = f"{type(e).__name__}: {str(e)[:100]}"
        rows.append(row)

    for cfg in configs:
        run(cfg)
    best = [r["config"] for r in sorted((r for r in rows if "us" in r), key=lambda r: r["us"])[:variants_of]]
    for cfg in best if _triton.pdl_ok(x) else ():  # PDL changes a kernel's start and end, not its loop
        run(replace(cfg, pdl=True))
    ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    if not ok:
        raise RuntimeError(f"no gemv config ran for {n}x{k}: {rows[0].get('error')}")
    _TUNED[_key(n, k, wdtype, xdtype, dev, fused)] = table = ok + [r for r in rows if "us" not in r]
    return table


def tune_model(model: torch.nn.Module, progress: bool = False, **kw) -> list[dict]:
    """``tune`` every distinct weight (shape, dtype, fusion) of the kernel-run layers of ``model`` (those
    with a ``cfg``: ``Linear`` and ``quant.Int8Linear`` "triton"), and set each layer's ``cfg`` to the winner.
    Which layer gets the norm or the residual fused in is read from ``model.FUSED_WITH`` (layer name ->
    "norm" | "residual" | "norm+glu", as ``lean.LeanMistral`` declares it). A case already tuned in this process is not
    timed again. -> one row per case: its best config, its time (median; spread = (p80 - p20) / median), the
    runner-up's time. No GPU: no rows. ``progress``: a tqdm bar over the layers (the first tuning takes a minute)."""
    rows, done, roles = [], {}, getattr(model, "FUSED_WITH", {})
    layers = [(n, m) for n, m in model.named_modules()
              if hasattr(m, "cfg") and hasattr(m, "weight") and _triton.available(m.weight)]
    if progress and layers:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="tuning the GEMV block shapes", unit="layer")
    for name, m in layers:
        w, fused = m.weight, roles.get(name.rsplit(".", 1)[-1]) if m.fuse else None
        xd = m.scales.dtype if m.scales is not None else w.dtype
        key = _key(*w.shape, w.dtype, xd, w.device, fused)
        if key not in done:
            table = _TUNED.get(key) or tune(*w.shape, w.dtype, xd, w.device, fused, **kw)
            done[key] = table[0]["config"]
            rows.append({"weight": f"{w.shape[0]}x{w.shape[1]} {str(w.dtype)[6:]}", "fused": fused or "-",
                         "best": table[0]["config"], "us": table[0]["us"], "GB/s": table[0]["GB/s"],
                         "spread": table[0]["spread"], "rel err": table[0]["rel err"],
                         "runner-up us": table[1].get("us") if len(table) > 1 else None})
        m.cfg = astuple(done[key])
    return rows
