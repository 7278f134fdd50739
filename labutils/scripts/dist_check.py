"""Check a distributed set-up: every rank joins, all_reduce is exact, optionally a collectives sweep.

Run from the repository root (add ``--sweep`` for the collectives, ``--out FILE`` for JSON):

  CPU, 4 gloo ranks:  OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone \\
                          --nproc-per-node 4 -m labutils.scripts.dist_check
                      python -m labutils.launch --nproc 4 labutils.scripts.dist_check
  1 GPU (or no torchrun at all, a world of one):
                      python -m labutils.scripts.dist_check
  4 GPUs, nccl:       python -m torch.distributed.run --standalone --nproc-per-node 4 \\
                          -m labutils.scripts.dist_check --sweep
                      python -m labutils.launch --nproc 4 labutils.scripts.dist_check -- --sweep
  2 nodes x 4 GPUs, on each node (HEAD = the first node's hostname):
                      python -m torch.distributed.run --nnodes 2 --nproc-per-node 4 \\
                          --rdzv-backend c10d --rdzv-endpoint HEAD:29500 --rdzv-id check \\
                          -m labutils.scripts.dist_check --sweep
                      (Slurm: launch/slurm/dist_check.sbatch; Kubernetes: launch/k8s/dist_check.yaml)
  2 nodes x 2 ranks simulated on this host:
                      python -m labutils.launch --nodes 2 --nproc 2 labutils.scripts.dist_check

Failure drills: ``--fail-rank R`` makes rank R exit with code 3 after init; ``--hang-rank R``
makes it sleep forever (the launcher's timeout, or --timeout here, must end the job).

Used in lab2 §Four ranks and lab3 §Orchestrators, §Collectives.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch.distributed as tdist

from labutils import collectives, dist, profile
from labutils.timing import fmt_s


def parse_args(argv=None) -> argparse.Namespace:
    prof = profile.get()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                    help="auto: nccl on GPUs, else gloo (SMML_DIST_BACKEND also sets it)")
    ap.add_argument("--timeout", type=float, default=120.0, help="collective timeout in seconds")
    ap.add_argument("--check-bytes", type=int, default=2**20, help="size of the all_reduce check")
    ap.add_argument("--sweep", action="store_true", help="also check and time every collective")
    ap.add_argument("--ops", nargs="+", choices=collectives.OPS, default=list(collectives.OPS), metavar="OP",
                    help=f"collectives to sweep, of: {', '.join(collectives.OPS)}")
    ap.add_argument("--sizes", nargs="+", type=int, default=list(prof.collective_bytes),
                    help=f"bytes per collective (profile {prof.name})")
    ap.add_argument("--warmup", type=int, default=prof.warmup, help="untimed calls per point")
    ap.add_argument("--reps", type=int, default=prof.reps, help="timed calls per point")
    ap.add_argument("--fail-rank", type=int, default=None, help="this rank exits with code 3 after init")
    ap.add_argument("--hang-rank", type=int, default=None, help="this rank sleeps forever after init")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON (rank 0, atomic)")
    return ap.parse_args(argv)


def layout(ctx) -> list[dict]:
    """Where every rank runs: host, node (torchrun's GROUP_RANK) and local rank."""
    me = {"rank": ctx.rank, "host": socket.gethostname(), "node": int(os.environ.get("GROUP_RANK", 0)),
          "local_rank": ctx.local_rank, "device": str(ctx.device)}
    everyone = [None] * ctx.world
    tdist.all_gather_object(everyone, me)
    return everyone


def drills(args, ctx) -> None:
    if args.fail_rank == ctx.rank:
        dist.say(f"rank {ctx.rank}: --fail-rank, exiting with code 3")
        sys.exit(3)
    if args.fail_rank is not None and 0 <= args.fail_rank < ctx.world:
        # the others wait instead of meeting the dead rank in a collective: otherwise one of them may crash
        # first ("connection closed by peer", exit code 1) and torchrun would name IT as the root cause.
        # torchrun sees rank R's exit within its monitor interval (0.1 s) and stops these ranks.
        time.sleep(30)
    if args.hang_rank == ctx.rank:
        dist.say(f"rank {ctx.rank}: --hang-rank, sleeping forever")
        while True:
            time.sleep(3600)


def report_sweep(rows: list[dict]) -> None:
    dist.print0(f"{'op':>15} {'bytes':>10} {'time':>10} {'algbw GB/s':>11} {'busbw GB/s':>11} {'wrong':>6}")
    for r in rows:
        dist.print0(f"{r['op']:>15} {r['bytes']:>10} {fmt_s(r['median_s']):>10} "
                    f"{r['algbw_GBps']:>11.3f} {r['busbw_GBps']:>11.3f} {r['wrong']:>6}")


def write_json(path: Path, doc: dict) -> None:
    from labutils import hardware, results

    doc = doc | {"fingerprint": hardware.fingerprint()}
    results.atomic_write_bytes(path, json.dumps(doc, indent=1, default=str).encode())


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = dist.init(None if args.backend == "auto" else args.backend, timeout_s=args.timeout)
    try:
        ranks = layout(ctx)
        drills(args, ctx)
        dist.print0(f"dist_check: world={ctx.world} backend={ctx.backend} "
                    f"nodes={len({r['node'] for r in ranks})} hosts={len({r['host'] for r in ranks})}")
        for r in ranks:
            dist.print0(f"  rank {r['rank']}: node {r['node']} local_rank {r['local_rank']} "
                        f"{r['device']} on {r['host']}")
        check = collectives.check_collective("all_reduce", args.check_bytes, ctx=ctx)
        dist.print0(f"all_reduce check: {check['wrong']} wrong of {check['count']} elements x {ctx.world} ranks")
        rows = (collectives.sweep(args.ops, args.sizes, warmup=args.warmup, reps=args.reps, ctx=ctx)
                if args.sweep else [])
        if rows:
            report_sweep(rows)
        wrong = check["wrong"] + sum(r["wrong"] for r in rows)
        if args.out and ctx.is_main:
            write_json(args.out, {"context": ctx.as_dict(), "ranks": ranks, "check": check, "sweep": rows})
            dist.print0(f"wrote {args.out}")
        dist.print0("dist_check: OK" if wrong == 0 else f"dist_check: FAILED, {wrong} wrong values")
        return 0 if wrong == 0 else 1
    finally:
        dist.destroy()


if __name__ == "__main__":
    sys.exit(main())
