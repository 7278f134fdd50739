"""lab2: the link (alpha-beta), a GEMM in every placement, and a Megatron MLP - each checked against one device.

One launch does it all (a torchrun start costs ~20 s): an all_reduce sweep fitted to t = alpha + bytes/beta;
C = A @ B replicated / row / col / k (all_reduce and reduce_scatter) / 2d, by hand and with DTensor, every
result against the one-device product by rel_err, compute and communication timed apart and the
communication beside its alpha-beta prediction; then the SwiGLU MLP tensor-parallel by hand
(labutils.parallel.tensor.MegatronMLP) and with parallelize_module, outputs and gradients against nn.Linear.

  CPU, 4 gloo ranks:  python -m labutils.launch --nproc 4 labutils.scripts.lab2_shard -- --out /tmp/shard.json
                      (or OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 4 \\
                           -m labutils.scripts.lab2_shard --out /tmp/shard.json)
  4 GPUs, nccl:       python -m labutils.launch --nproc 4 labutils.scripts.lab2_shard -- --size 8192 --out shard.json
  2 nodes x 4 GPUs, on each node (HEAD = the first node's hostname):
                      python -m torch.distributed.run --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
                          --rdzv-endpoint HEAD:29500 --rdzv-id shard -m labutils.scripts.lab2_shard --out shard.json
                      (the 2d placement then needs a square world: pass --placements without 2d)

Used in lab2 §A GEMM across 4 ranks and §Tensor parallelism.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from labutils import dist, profile, results
from labutils.parallel import gemm, tensor
from labutils.timing import rel_err


def _profile():
    """The profile's sizes - but gloo CPU ranks standing in for GPUs always run the small ones."""
    if os.environ.get("SMML_DIST_BACKEND") == "gloo" or not torch.cuda.is_available():
        return profile.get("small")
    return profile.get()


def parse_args(argv=None):
    small = _profile().name == "small"
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size", type=int, default=512 if small else 8192, help="M = N = K of the GEMM")
    ap.add_argument("--dtype", default="float32", help="dtype of the GEMM (bfloat16 on GPUs)")
    ap.add_argument("--placements", nargs="+", default=list(gemm.PLACEMENTS), help="placements to run")
    ap.add_argument("--link-sizes", type=int, nargs="+", default=[2**k for k in range(10, 25, 2)],
                    help="all_reduce sizes (bytes) of the alpha-beta sweep")
    ap.add_argument("--mlp", type=int, nargs=2, default=(256, 1024), metavar=("HIDDEN", "FFN"),
                    help="width of the MLP checked under TP")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return ap.parse_args(argv)


def gemm_rows(a, b, ref, link, placements, mesh1, mesh2, reps, world):
    rows = []
    for pl in placements:
        if pl == "2d" and mesh2 is None:
            continue
        hand = gemm.by_hand(pl, a, b, reps=reps)
        dt = gemm.with_dtensor(pl, a, b, mesh1, mesh2)
        want = ref.chunk(world, 0)[tdist.get_rank()] if pl == "k_scatter" else ref
        pred = gemm.predict_comm_s(pl, a.shape[0], b.shape[1], a.element_size(), world,
                                   link["alpha_s"], link["beta_Bps"])
        rows.append({"placement": pl, "collective": hand["collective"], "comm_bytes": hand["comm_bytes"],
                     "rel_err_hand": rel_err(hand["out"], want), "rel_err_dtensor": rel_err(dt["out"], ref),
                     "dtensor_c": dt["c_placements"], "dtensor_target": dt["target"],
                     "local_flops": hand["local_flops"], "compute_s": hand["compute_s"],
                     "comm_s": hand["comm_s"], "predicted_comm_s": pred})
        dist.print0(f"{pl + ':':<11} {str(hand['collective']):<14}  {hand['comm_bytes'] / 2**20:5.2f} MiB/rank  "
                    f"rel_err hand {rows[-1]['rel_err_hand']:.1e}  DTensor {rows[-1]['rel_err_dtensor']:.1e}  "
                    f"(C was {dt['c_placements']})")
    return rows


def mlp_check(hidden, ffn, ctx, mesh1) -> dict:
    """The dense MLP vs the hand-written Megatron MLP vs parallelize_module: outputs and gradients."""
    torch.manual_seed(0)  # the same dense weights and input on every rank
    dense = tensor.DenseMLP(hidden, ffn).to(ctx.device)
    x = torch.randn(4, 8, hidden, device=ctx.device)
    y = dense(x)
    y.square().sum().backward()
    n, r = ctx.world, ctx.rank
    out = {}
    for name, tp in (("by hand", tensor.MegatronMLP.from_dense(dense, None)),
                     ("parallelize_module", tensor.parallelize_mlp(dense, mesh1))):
        tp.zero_grad()
        yt = tp(x)
        yt = yt.full_tensor() if hasattr(yt, "full_tensor") else yt
        yt.square().sum().backward()
        g = {k: (1 if k == "down_proj" else 0, tensor.local_grad(getattr(tp, k).weight))
             for k in ("gate_proj", "up_proj", "down_proj")}  # column-parallel: rows split; row-parallel: columns
        errs = {k: rel_err(v, getattr(dense, k).weight.grad.chunk(n, d)[r]) for k, (d, v) in g.items()}
        out[name] = {"rel_err_out": rel_err(yt, y), "rel_err_grads": max(errs.values())}
        dist.print0(f"MLP TP={n} {name:>18}: output rel_err {out[name]['rel_err_out']:.1e}, "
                    f"weight grads rel_err <= {out[name]['rel_err_grads']:.1e}")
    return out


TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}  # rel err of a sharded product vs one device


def verify(rec: dict, placements) -> list[str]:
    """What is wrong with a run's record (empty: nothing). The run's own check, made before its figures are
    shown: every placement ran and equals the one-device product, by hand and through DTensor, DTensor's C has the
    placement the derivation gives, every timing is positive, and the TP MLP's output and gradients match."""
    tol, bad = TOL.get(rec["dtype"], 5e-2), []
    want = [p for p in placements if p != "2d" or round(rec["world"] ** 0.5) ** 2 == rec["world"]]
    rows = {r["placement"]: r for r in rec["gemm"]}
    if sorted(rows) != sorted(want):
        bad.append(f"placements run {sorted(rows)}, asked {sorted(want)}")
    for pl, r in rows.items():
        for k in ("rel_err_hand", "rel_err_dtensor"):
            if not r[k] < tol:
                bad.append(f"{pl}: {k} {r[k]:.2e} >= {tol:g}: the sharded product is wrong")
        if not (r["compute_s"] > 0 and (r["comm_s"] > 0 or r["collective"] is None)):
            bad.append(f"{pl}: compute {r['compute_s']} s, comm {r['comm_s']} s ({r['collective']}): not timed")
    for pl, c in (("k", ["P(sum)"]), ("2d", ["S(0)", "S(1)"])):
        if pl in rows and rows[pl]["dtensor_c"] != c:
            bad.append(f"{pl}: DTensor's C is {rows[pl]['dtensor_c']}, the derivation says {c}")
    if not rec["link"]["beta_Bps"] > 0:
        bad.append(f"link beta {rec['link']['beta_Bps']}: the alpha-beta fit failed")
    for how, m in rec["mlp"].items():
        if not (m["rel_err_out"] < tol and m["rel_err_grads"] < tol):
            bad.append(f"MLP {how}: output {m['rel_err_out']:.1e}, gradients {m['rel_err_grads']:.1e} >= {tol:g}")
    return bad


def main(argv=None):
    a = parse_args(argv)
    ctx = dist.init()
    if ctx.backend == "gloo" and profile.get().name == "full":
        dist.print0("gloo CPU ranks stand in for GPUs here: running the small profile's sizes")
    from torch.distributed.device_mesh import init_device_mesh

    dev, world = ctx.device, ctx.world
    mesh1 = init_device_mesh(dev.type, (world,))
    side = int(round(world ** 0.5))
    mesh2 = init_device_mesh(dev.type, (side, side), mesh_dim_names=("i", "j")) if side * side == world else None
    link = gemm.measure_link(a.link_sizes, device=dev, reps=a.reps)
    dist.print0(f"link ({ctx.backend}, {world} ranks): alpha {link['alpha_s'] * 1e6:.0f} us, "
                f"beta {link['beta_Bps'] / 1e9:.3f} GB/s (all_reduce sweep, {len(a.link_sizes)} sizes)")
    g = torch.Generator().manual_seed(0)  # the same A and B on every rank
    dt = getattr(torch, a.dtype)
    A = torch.randn(a.size, a.size, generator=g).to(dev, dt)
    B = torch.randn(a.size, a.size, generator=g).to(dev, dt)
    ref = A @ B  # the one-device product
    rows = gemm_rows(A, B, ref, link, a.placements, mesh1, mesh2, a.reps, world)
    mlp = mlp_check(*a.mlp, ctx, mesh1)
    rec = {"world": world, "backend": ctx.backend, "device": str(dev), "size": a.size, "dtype": a.dtype,
           "link": link, "gemm": rows, "mlp": mlp, "mlp_shape": list(a.mlp)}
    rec["problems"] = verify(rec, a.placements)
    dist.report("lab2_shard", rec["problems"], every_rank=True)  # each rank checks its own shard
    if ctx.is_main and a.out:
        results.atomic_write_bytes(a.out, json.dumps(rec, indent=1).encode())
    dist.destroy()
    dist.print0("lab2_shard: OK" if not rec["problems"] else "lab2_shard: FAILED")
    return rec


if __name__ == "__main__":
    sys.exit(1 if main()["problems"] else 0)
