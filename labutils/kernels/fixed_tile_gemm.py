"""A Triton matmul with ONE pinned block shape, to show wave quantization where it is real.

cuBLAS picks a tile (and sometimes a persistent, stream-K kernel) per shape, and so hides the sawtooth the
one-tile-per-SM model predicts (lab1 §5b measured ×0.94 … ×1.04 where ×0.5 … ×0.85 was predicted). This
kernel never switches: each program computes one ``BLOCK_M × BLOCK_N`` tile of C = A·B, looping over K in
``BLOCK_K`` steps, and a block this large (128 × 256, 3 stages: 144 KiB of shared memory) fits once per SM.
So T tiles run in ⌈T / SMs⌉ waves of equal length, and time per FLOP jumps where T passes a multiple of the
SM count.

- ``matmul(a, b)``: the kernel on a GPU (Triton), the same tile loop in plain torch elsewhere (``tiled``);
- ``predict(m, n, sms)``: tiles, waves and the efficiency T / (waves · SMs · programs per SM), the latter read
  from the compiled kernel's registers and shared memory (``programs_per_sm``);
- ``sweep(shapes, dtype)``: check each product against torch.matmul, then time it (CUDA-graph replays);
- ``figure(...)``: fixed tile vs cuBLAS vs the prediction, the predicted drops marked;
- ``python -m labutils.kernels.fixed_tile_gemm --out x.json`` (a GPU): the same sweep from the shell.

Tested under ``TRITON_INTERPRET=1`` at tiny sizes (tests/fixed_tile_interpreted.py). Used in lab1 §5b
Wave quantization.
"""

from __future__ import annotations

import math

import torch

from .. import timing
from ._triton import available, tl, triton

BLOCK = (128, 256, 64)  # (BLOCK_M, BLOCK_N, BLOCK_K): pinned for every shape
WARPS, STAGES = 8, 3
TOL = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # fp32 may run as tf32 in tl.dot

if triton is not None:

    @triton.jit
    def _kernel(a_ptr, b_ptr, c_ptr, M, N, K, sam, sak, sbk, sbn, scm, scn,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)  # one program = one output tile, never more
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # the main loop: a BLOCK_K slice of A's rows and B's columns
            a = tl.load(a_ptr + rm[:, None] * sam + (k0 + rk)[None, :] * sak,
                        mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
            b = tl.load(b_ptr + (k0 + rk)[:, None] * sbk + rn[None, :] * sbn,
                        mask=((k0 + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or a.dtype != b.dtype:
        raise ValueError(f"need A (M x K) and B (K x N) of one dtype; got {tuple(a.shape)} {a.dtype} and "
                         f"{tuple(b.shape)} {b.dtype}: transpose or cast one of them")


def launch(a: torch.Tensor, b: torch.Tensor, block=BLOCK, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel itself (a GPU, or any device under ``TRITON_INTERPRET=1``)."""
    _check(a, b)
    if triton is None:
        raise ValueError("Triton is not installed: use matmul(), which falls back to the plain-torch tiles")
    (m, k), n = a.shape, b.shape[1]
    c = torch.full((m, n), float("nan"), dtype=a.dtype, device=a.device) if out is None else out
    bm, bn, bk = block
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _kernel[grid](a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=WARPS, num_stages=STAGES)
    return c


def tiled(a: torch.Tensor, b: torch.Tensor, block=BLOCK) -> torch.Tensor:
    """The kernel's algorithm in plain torch (fp32 accumulator per tile): the CPU path, for reading."""
    _check(a, b)
    (m, k), n = a.shape, b.shape[1]
    bm, bn, bk = block
    c = torch.empty(m, n, dtype=a.dtype, device=a.device)
    for i in range(0, m, bm):
        for j in range(0, n, bn):
            acc = torch.zeros(min(bm, m - i), min(bn, n - j), dtype=torch.float32, device=a.device)
            for k0 in range(0, k, bk):
                acc += a[i:i + bm, k0:k0 + bk].float() @ b[k0:k0 + bk, j:j + bn].float()
            c[i:i + bm, j:j + bn] = acc.to(a.dtype)
    return c


def matmul(a: torch.Tensor, b: torch.Tensor, block=BLOCK) -> torch.Tensor:
    """C = A·B with the pinned tile: the Triton kernel where it can run, else ``tiled``."""
    return launch(a, b, block) if available(a) else tiled(a, b, block)


def per_sm(block=BLOCK, stages: int = STAGES, elem: int = 2, device=None) -> int:
    """Programs of this block shape that fit on one SM at once, by shared memory (1 for the default)."""
    bm, bn, bk = block
    need = stages * (bm * bk + bk * bn) * elem
    have = 228 * 2**10  # Hopper; read from the device where torch exposes it
    if device is not None and torch.device(device).type == "cuda":
        have = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_multiprocessor", have)
    return max(1, have // need)


def _probe(dev: torch.device, dtype=torch.bfloat16):
    """One launch of the kernel on a one-tile problem; returns what Triton returns (the compiled kernel)."""
    a = torch.zeros(BLOCK[0], BLOCK[2], device=dev, dtype=dtype)
    b = torch.zeros(BLOCK[2], BLOCK[1], device=dev, dtype=dtype)
    c = torch.empty(BLOCK[0], BLOCK[1], device=dev, dtype=dtype)
    return _kernel[(1, 1)](a, b, c, a.shape[0], b.shape[1], a.shape[1], a.stride(0), a.stride(1), b.stride(0),
                           b.stride(1), c.stride(0), c.stride(1), BLOCK_M=BLOCK[0], BLOCK_N=BLOCK[1], BLOCK_K=BLOCK[2],
                           num_warps=WARPS, num_stages=STAGES)


def programs_per_sm(device=None) -> int:
    """On a GPU: how many programs of the compiled kernel fit on one SM at once, from its registers and shared
    memory as Triton compiled it (the wave size is that x SMs); elsewhere the shared-memory estimate ``per_sm``."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if triton is None or dev.type != "cuda":
        return per_sm()
    k = _probe(dev)
    regs, shared = getattr(k, "n_regs", None), getattr(getattr(k, "metadata", None), "shared", None)
    if not regs or shared is None:
        return per_sm(device=dev)
    p = torch.cuda.get_device_properties(dev)
    by_regs = getattr(p, "regs_per_multiprocessor", 65536) // (regs * 32 * WARPS)
    by_smem = getattr(p, "shared_memory_per_multiprocessor", 228 * 2**10) // max(shared, 1)
    return max(1, min(by_regs, by_smem, getattr(p, "max_threads_per_multi_processor", 2048) // (32 * WARPS)))


def predict(m: int, n: int, sms: int, block=BLOCK, slots_per_sm: int = 1) -> tuple[int, int, float]:
    """(tiles, waves, efficiency) for an m x n output: efficiency = tiles / (waves * SMs * slots_per_sm)."""
    tiles = math.ceil(m / block[0]) * math.ceil(n / block[1])
    units = sms * slots_per_sm
    waves = math.ceil(tiles / units)
    return tiles, waves, tiles / (waves * units)


def drops(ns, m: int, sms: int, block=BLOCK, slots_per_sm: int = 1) -> list[int]:
    """The N of ``ns`` just after which a new wave starts (the predicted cliffs of the sawtooth)."""
    w = [predict(m, n, sms, block, slots_per_sm)[1] for n in ns]
    return [ns[i] for i in range(1, len(ns)) if w[i] > w[i - 1]]


def sweep(shapes, dtype=torch.bfloat16, device="cuda", reps: int = 30, calls: int = 4,
          progress: bool = True) -> list[dict]:
    """Per (m, n, k): the kernel's rel err vs torch.matmul, then its time (``calls`` launches per CUDA-graph
    replay, divided back), TFLOP/s. Operands rotate when they fit in the L2, as in ``gemm_bench.sweep``."""
    from tqdm.auto import tqdm

    dev = torch.device(device)  # a CPU only under TRITON_INTERPRET=1 (the tests): no graphs, nothing meaningful
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20) if dev.type == "cuda" else 2**20
    out = []
    for m, n, k in tqdm(list(shapes), desc="fixed-tile N sweep", disable=not progress, leave=False):
        rot = max(1, min(16, math.ceil(2 * l2 / ((m * k + k * n + m * n) * 2))))
        ops = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
               for _ in range(rot)]
        err = timing.rel_err(launch(*ops[0]), ops[0][0].float() @ ops[0][1].float())
        if not err < TOL[dtype]:
            raise RuntimeError(f"fixed-tile GEMM {m}x{n}x{k}: rel err {err:.1e} vs torch.matmul")
        outs = [torch.empty(m, n, device=device, dtype=dtype) for _ in range(rot)]
        g = timing.graphed(lambda ops=ops, outs=outs: [launch(*ops[i % len(ops)], out=outs[i % len(ops)])
                                                       for i in range(calls)], device=device)
        t = timing.benchmark(g.run, device=device, reps=reps, settle_s=0.25 if dev.type == "cuda" else 0.0,
                             label=f"fixed tile {m}x{n}x{k}")
        out.append({"m": m, "n": n, "k": k, "rel_err": err, "s": t.median_s / calls,
                    "spread": t.spread, "flops_per_s": 2 * m * n * k * calls / t.median_s})
    return out


def figure(ns, fixed: list[dict] | None, cublas, eff, drop_ns, title: str):
    """TFLOP/s vs N: the fixed-tile kernel, cuBLAS (``cublas``: TFLOP/s per N), the prediction (best fixed-tile
    point x efficiency ``eff``), and a dotted line at each predicted drop. ``fixed`` None: cuBLAS only."""
    from .. import plots

    fig, ax = plots.figure(title, "N", "TFLOP/s", size=(8, 4.4))
    ax.plot(ns, cublas, "o-", ms=3, label="cuBLAS (torch.matmul): tile chosen per shape")
    if fixed:
        top = max(r["flops_per_s"] for r in fixed) / 1e12
        ax.plot(ns, [r["flops_per_s"] / 1e12 for r in fixed], "s-", ms=3,
                label=f"Triton, one pinned tile {BLOCK[0]}x{BLOCK[1]}")
        ax.plot(ns, [top * e for e in eff], "--", color="gray", label="predicted: best x tiles / (waves x SMs)")
    for i, n in enumerate(drop_ns):
        ax.axvline(n, color="red", ls=":", lw=1, label="predicted drop (a new wave starts)" if i == 0 else None)
    ax.legend(fontsize=7)
    return fig


def main(argv=None) -> int:
    """``python -m labutils.kernels.fixed_tile_gemm``: the pinned tile vs cuBLAS over N on this GPU, as JSON."""
    import argparse
    import json
    from pathlib import Path

    from .. import hardware
    from ..results import atomic_write_bytes

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--m", type=int, default=2048, help="rows of A and C (default: %(default)s)")
    ap.add_argument("--k", type=int, default=4096, help="inner size (default: %(default)s)")
    ap.add_argument("--n", default="128:6912:128", help="N as start:stop:step, stop included (default: %(default)s)")
    ap.add_argument("--out", default="fixed_tile_gemm.json", help="JSON written here (default: %(default)s)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or triton is None:
        raise SystemExit("needs a CUDA GPU with Triton; on a CPU run tests/test_fixed_tile_gemm.py (interpreter)")
    a, b, c = (int(x) for x in args.n.split(":"))
    ns, sms = list(range(a, b + 1, c)), torch.cuda.get_device_properties(0).multi_processor_count
    fixed = sweep([(args.m, n, args.k) for n in ns])
    cublas = [hardware.gemm(args.m, n, args.k, "bfloat16", graph=True).flops_per_s for n in ns]
    slots = programs_per_sm(0)
    eff = [predict(args.m, n, sms, slots_per_sm=slots)[2] for n in ns]
    drop_ns = drops(ns, args.m, sms, slots_per_sm=slots)
    for n in drop_ns:
        j = ns.index(n)
        print(f"N {ns[j - 1]} -> {n}: predicted x{eff[j] / eff[j - 1]:.2f}, pinned tile "
              f"x{fixed[j]['flops_per_s'] / fixed[j - 1]['flops_per_s']:.2f}, cuBLAS x{cublas[j] / cublas[j - 1]:.2f}")
    doc = {"fingerprint": hardware.fingerprint(), "block": BLOCK, "sms": sms, "per_sm": slots, "m": args.m,
           "k": args.k, "n": ns, "drops": drop_ns, "predicted": eff, "fixed": fixed, "cublas_flops_per_s": cublas}
    atomic_write_bytes(Path(args.out), json.dumps(doc, indent=1, default=str).encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
