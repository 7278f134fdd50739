"""Sweep every collective on the intra-node, inter-node and world groups; #wrong, algbw, busbw, alpha-beta.

Each point is checked first (fresh rank-dependent data into NaN outputs, ``#wrong`` summed over the
group), then timed; the JSON (``--out``) holds every point, the alpha-beta fit per (group, op), the
rank layout, and, on nccl, each rank's NCCL topology/transport log parsed (``--nccl-log DIR``).
Groups (from the node layout; see labutils.topology.node_groups): ``intra`` = node 0's ranks,
``inter`` = as many ranks taken half from node 0 and half from node 1, ``world`` = all ranks.

Run from the repository root:

  CPU, 2 nodes x 2 gloo ranks simulated on this host (what the lab runs without GPUs):
      SMML_DIST_BACKEND=gloo python -m labutils.launch --nodes 2 --nproc 2 \\
          labutils.scripts.collectives_bench -- --out /tmp/coll.json
  CPU, 4 gloo ranks, one node (world group only):
      OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 4 \\
          -m labutils.scripts.collectives_bench --out /tmp/coll.json
  4 GPUs (one node; intra-node NVLink only):
      python -m torch.distributed.run --standalone --nproc-per-node 4 -m labutils.scripts.collectives_bench
  8 GPUs as 2 simulated nodes x 4 (GPUs 0-3 and 4-7; NCCL_HOSTID per node, so NET between them):
      SMML_SPLIT_HOSTS=1 python -m labutils.launch --nodes 2 --nproc 4 \\
          labutils.scripts.collectives_bench -- --nccl-log /tmp/nccl --out /tmp/coll.json
  2 real nodes x 4 GPUs, on each node (HEAD = the first node's hostname):
      python -m torch.distributed.run --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
          --rdzv-endpoint HEAD:29500 --rdzv-id coll -m labutils.scripts.collectives_bench --nccl-log /tmp/nccl

Used in lab3 §Two nodes on one host, §Collectives.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from labutils import collectives, dist, profile, topology
from labutils.timing import fmt_s


def parse_args(argv=None) -> argparse.Namespace:
    prof = profile.get()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ops", nargs="+", choices=collectives.OPS, default=list(collectives.OPS), metavar="OP",
                    help=f"collectives to sweep, of: {', '.join(collectives.OPS)}")
    ap.add_argument("--sizes", nargs="+", type=int, default=list(prof.lab3_collective_bytes),
                    help=f"bytes per collective (profile {prof.name})")
    ap.add_argument("--groups", nargs="+", choices=["intra", "inter", "world"], default=["intra", "inter", "world"],
                    help="groups to sweep (intra/inter exist only with >= 2 nodes of >= 2 ranks)")
    ap.add_argument("--world-ops", nargs="+", choices=collectives.OPS, default=None, metavar="OP",
                    help="collectives for the world group (default: --ops); the DDP prediction needs all_reduce")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="element type")
    ap.add_argument("--warmup", type=int, default=prof.warmup, help="untimed calls per point")
    ap.add_argument("--reps", type=int, default=prof.reps, help="timed calls per point")
    ap.add_argument("--timeout", type=float, default=300.0, help="collective timeout in seconds")
    ap.add_argument("--nccl-log", type=Path, default=None,
                    help="directory for NCCL's INFO log (INIT,GRAPH,NET), parsed into the JSON (nccl only)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON (rank 0, atomic)")
    return ap.parse_args(argv)


def sweep_groups(args, ctx, ranks) -> tuple[dict, list[dict]]:
    """Every group of ``args.groups`` that exists here, swept by its members (the others wait)."""
    wanted = {k: v for k, v in topology.node_groups(ranks).items() if k in args.groups}
    handles = {k: (None if k == "world" else tdist.new_group(v)) for k, v in wanted.items()}  # all ranks, same order
    rows = []
    for op in args.ops:  # op outer, group inner: a change of load on a shared machine hits every group alike
        for name, members in wanted.items():
            if name == "world" and args.world_ops and op not in args.world_ops:
                continue
            if ctx.rank in members:
                got = collectives.sweep([op], args.sizes, getattr(torch, args.dtype), args.warmup, args.reps,
                                        ctx=ctx, group=handles[name])
                rows += [r | {"group": name, "ranks": members} for r in got]
                r = got[-1]
                dist.print0(f"  {name:>5} {op:>14}: {len(got)} sizes to {r['bytes']} B, busbw {r['busbw_GBps']:.3g} "
                            f"GB/s at {fmt_s(r['median_s'])}, wrong {sum(x['wrong'] for x in got)}")
            tdist.barrier()
    return wanted, rows


def nccl_summary(args, ctx) -> dict | None:
    if args.nccl_log is None or ctx.backend != "nccl":
        return None
    tdist.barrier()
    mine = topology.parse_nccl_log(topology.own_log(args.nccl_log))
    everyone = [None] * ctx.world
    tdist.all_gather_object(everyone, mine)
    return topology.merge(everyone) | {"per_rank": everyone}


def verify(ranks: list, groups: dict, rows: list, fits: dict, split: bool, wanted) -> list[str]:
    """What is wrong with rank 0's sweep beyond #wrong (empty: nothing): two nodes of two or more ranks give the
    intra- and inter-node groups, split hosts give each node its own NCCL host id, and every (group, op) swept
    has its alpha-beta fit."""
    bad, nodes = [], {r["node"] for r in ranks}
    per = [sum(r["node"] == n for r in ranks) for n in sorted(nodes)]
    for g in ("intra", "inter", "world"):
        if g in wanted and (g == "world" or (len(nodes) >= 2 and per[0] >= 2 and per[0] == per[1])) and g not in groups:
            bad.append(f"no {g!r} group with {len(nodes)} nodes of {per} ranks")
    if split and len({r["nccl_hostid"] for r in ranks}) != len(nodes):
        bad.append(f"NCCL host ids {sorted({str(r['nccl_hostid']) for r in ranks})} for {len(nodes)} nodes")
    swept = {f"{r['group']}/{r['op']}" for r in rows}
    if set(fits) != swept:
        bad.append(f"alpha-beta fits for {sorted(fits)}, swept {sorted(swept)}")
    return bad


def main(argv=None) -> int:
    args = parse_args(argv)
    hostid = topology.split_hosts_from_env()
    if args.nccl_log:
        args.nccl_log.mkdir(parents=True, exist_ok=True)
        os.environ.update(topology.nccl_debug_env(args.nccl_log))
    ctx = dist.init(timeout_s=args.timeout)
    t0 = time.perf_counter()
    try:
        ranks = topology.layout(ctx)
        dist.print0(f"collectives_bench: world={ctx.world} backend={ctx.backend} "
                    f"nodes={len({r['node'] for r in ranks})} NCCL_HOSTID={hostid or 'unset'}")
        groups, rows = sweep_groups(args, ctx, ranks)
        nccl = nccl_summary(args, ctx)
        wrong = sum(r["wrong"] for r in rows)
        if ctx.is_main:
            fits = {f"{g}/{op}": f.as_dict() for (g, op), f in collectives.fit_sweep(rows).items()}
            problems = verify(ranks, groups, rows, fits, hostid is not None, args.groups)
            dist.report("collectives_bench", problems)
            wrong += len(problems)  # counted with the sweep's wrong results: the job fails on either
            if nccl:
                dist.print0("NCCL: " + topology.describe(nccl))
            if args.out:
                from labutils import hardware, results

                doc = {"context": ctx.as_dict(), "ranks": ranks, "groups": groups, "sweep": rows, "fits": fits,
                       "nccl": nccl, "split_hosts": hostid is not None, "args": vars(args),
                       "script_s": time.perf_counter() - t0,
                       "fingerprint": hardware.fingerprint()}
                results.atomic_write_bytes(args.out, json.dumps(doc, indent=1, default=str).encode())
                dist.print0(f"wrote {args.out}")
        dist.print0("collectives_bench: OK, #wrong = 0" if wrong == 0 else f"collectives_bench: FAILED, {wrong} wrong")
        return 0 if wrong == 0 else 1
    finally:
        dist.destroy()


if __name__ == "__main__":
    sys.exit(main())
