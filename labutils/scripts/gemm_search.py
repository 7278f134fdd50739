"""The command line of lab1's shape search (the library is ``labutils.gemm_bench``): the best GEMM this
device can do, and (``--names``) the GPU kernel each product launches.

    python -m labutils.scripts.gemm_search                       # bf16, M,N,K in 7680..8704 on a GPU
    python -m labutils.scripts.gemm_search --values 448 512 576  # the small-profile grid (CPU)
    python -m labutils.scripts.gemm_search --dtype float16 --budget 60 --json out.json

One device only (no torchrun): the search is a property of one GPU.

Used in lab1 §3 Measured ceilings (shape search) and §5b Wave quantization (``gemm_bench.kernel_names`` runs
``--names`` in a separate process).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from labutils import gemm_bench, hardware, results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(hardware.GEMM_TOL), help="GEMM dtype")
    ap.add_argument("--values", type=int, nargs="+", default=None,
                    help="sizes tried for each of M, N, K (default: 7680..8704 step 256 on a GPU, 448..576 on CPU)")
    ap.add_argument("--budget", type=float, default=90.0, help="seconds before the search stops")
    ap.add_argument("--settle", type=float, default=None,
                    help=f"seconds each GEMM runs before it is timed (default {hardware.SETTLE_S} on a GPU, 0 on CPU)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--names", nargs="+", metavar="M,N,K", default=None,
                    help="instead of searching, print (JSON) the GPU kernel each product launches")
    args = ap.parse_args(argv)
    if args.names:
        print(json.dumps(gemm_bench.profile_names([tuple(map(int, s.split(","))) for s in args.names], args.dtype)))
        return 0
    gpu = torch.cuda.is_available()
    values = args.values or (list(range(7680, 8705, 256)) if gpu else [448, 512, 576])
    s = gemm_bench.search(values, args.dtype, budget_s=args.budget, settle_s=args.settle)
    for r in s.confirmed:
        print(f"{r.m:6d} {r.n:6d} {r.k:6d}  {r.flops_per_s / 1e12:8.2f} TFLOP/s  rel err {r.rel_err:.1e}")
    print(f"best of {len(s.results)}/{s.n_total} shapes (re-measured) in {s.seconds:.0f} s: "
          f"{s.best.m}x{s.best.n}x{s.best.k} {s.best.flops_per_s / 1e12:.1f} TFLOP/s ({args.dtype})")
    if args.json:
        rec = {"fingerprint": hardware.fingerprint(), "search": s.as_dict()}
        results.atomic_write_bytes(Path(args.json), json.dumps(rec, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
