"""DDP of a small Mistral on one node's ranks vs on both nodes: compute, exposed communication, check.

Every rank trains the same model on its own slice of a global batch. First the check: one DDP
backward on the world group gives the loss and gradients that rank 0 gets on its own from the whole
global batch (gradient accumulation over the ranks' slices) -- compared by relative error. Then
three timings per configuration, every rank running the same number of steps:

- ``compute``: forward + backward + SGD step inside ``ddp.no_sync()`` (no all-reduce at all);
- ``ddp``: the same step with DDP's bucketed all-reduce overlapping the backward pass;
- ``comm``: the gradient buckets all-reduced alone, back to back (no compute to hide behind).

exposed communication = ddp - compute. Configurations: ``node`` = DDP over each node's own ranks
(the two nodes run side by side as two 1-node jobs), ``world`` = DDP over all ranks of both nodes.

Run from the repository root:

  CPU, 2 nodes x 2 gloo ranks simulated on this host (the lab's CPU run):
      SMML_DIST_BACKEND=gloo python -m labutils.launch --nodes 2 --nproc 2 labutils.scripts.ddp_overhead \\
          -- --out /tmp/ddp.json
  CPU, 4 gloo ranks on one node (world only):
      OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 4 \\
          -m labutils.scripts.ddp_overhead --out /tmp/ddp.json
  4 GPUs:  python -m torch.distributed.run --standalone --nproc-per-node 4 -m labutils.scripts.ddp_overhead
  8 GPUs as 2 simulated nodes x 4 (NCCL_HOSTID per node: NET between the groups):
      SMML_SPLIT_HOSTS=1 python -m labutils.launch --nodes 2 --nproc 4 labutils.scripts.ddp_overhead \\
          -- --out /tmp/ddp.json
  2 real nodes x 4 GPUs, on each node (HEAD = the first node's hostname):
      python -m torch.distributed.run --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
          --rdzv-endpoint HEAD:29500 --rdzv-id ddp -m labutils.scripts.ddp_overhead --out /tmp/ddp.json

Used in lab3 §Networking overhead of training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

from labutils import dist, netcost, profile, timing, topology


def parse_args(argv=None) -> argparse.Namespace:
    prof = profile.get()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=prof.ddp_model, help="labutils.models preset")
    ap.add_argument("--layers", type=int, default=prof.ddp_layers, help="decoder layers (0: the preset's)")
    ap.add_argument("--vocab", type=int, default=prof.ddp_vocab, help="vocabulary size (0: the preset's)")
    ap.add_argument("--batch", type=int, default=prof.ddp_batch, help="sequences per rank per step")
    ap.add_argument("--seq", type=int, default=prof.ddp_seq, help="tokens per sequence")
    ap.add_argument("--bucket-mb", type=float, default=prof.ddp_bucket_mb, help="DDP bucket_cap_mb")
    ap.add_argument("--steps", type=int, default=prof.ddp_steps, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    ap.add_argument("--dtype", default=prof.dtype, choices=["float32", "bfloat16"], help="parameters and grads")
    ap.add_argument("--configs", nargs="+", choices=["node", "world"], default=["node", "world"],
                    help="DDP over each node's ranks and/or over all ranks")
    ap.add_argument("--timeout", type=float, default=600.0, help="collective timeout in seconds")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON (rank 0, atomic)")
    return ap.parse_args(argv)


def build(args, device):
    p = netcost.shrunk(args.model, args.layers, args.vocab)
    from transformers import MistralForCausalLM

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    return MistralForCausalLM(p.config()).to(device=device, dtype=getattr(torch, args.dtype)), p


def batch_of(rank: int, args, vocab: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)


def loss_of(model, ids) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def check(args, ctx, model) -> dict:
    """DDP on the world vs rank 0 alone on the global batch: loss and gradients, by relative error."""
    vocab = model.config.vocab_size
    ddp = DDP(model, process_group=None, bucket_cap_mb=args.bucket_mb)
    model.zero_grad(set_to_none=True)
    loss = loss_of(ddp, batch_of(ctx.rank, args, vocab, ctx.device))
    loss.backward()
    mean_loss = loss.detach().clone()
    tdist.all_reduce(mean_loss)
    mean_loss /= ctx.world
    got = torch.cat([p.grad.flatten() for p in model.parameters()]).float()
    out = {}
    if ctx.is_main:  # the reference: one device, the whole global batch, the same mean loss
        model.zero_grad(set_to_none=True)
        ref_loss = 0.0
        for r in range(ctx.world):
            part = loss_of(model, batch_of(r, args, vocab, ctx.device)) / ctx.world
            part.backward()
            ref_loss += part.item()
        ref = torch.cat([p.grad.flatten() for p in model.parameters()]).float()
        out = {"loss_ddp": mean_loss.item(), "loss_ref": ref_loss,
               "loss_rel_err": abs(mean_loss.item() - ref_loss) / abs(ref_loss),
               "grad_rel_err": timing.rel_err(got, ref)}
    tdist.barrier()
    model.zero_grad(set_to_none=True)
    del ddp
    return out


def buckets_of(ddp, model, cap_bytes: int) -> list[int]:
    """DDP's own bucket sizes (after its first iterations), else DDP's rule applied here."""
    text = str(ddp._get_ddp_logging_data().get("bucket_sizes", ""))
    sizes = [int(x) for x in re.findall(r"\d+", text)]
    if len(sizes) > 1:
        return sizes
    return netcost.ddp_buckets([p.numel() * p.element_size() for p in model.parameters()], cap_bytes)


def time_config(name, group, args, ctx, model) -> dict:
    """compute / ddp / comm medians (slowest rank of the group) for DDP over ``group``."""
    ddp = DDP(model, process_group=group, bucket_cap_mb=args.bucket_mb)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    ids = batch_of(ctx.rank, args, model.config.vocab_size, ctx.device)

    def step(sync: bool):
        opt.zero_grad(set_to_none=True)
        if sync:
            loss_of(ddp, ids).backward()
        else:
            with ddp.no_sync():
                loss_of(ddp, ids).backward()
        opt.step()

    step(True)
    step(True)  # DDP rebuilds its buckets in grad-ready order after the first iteration
    sizes = buckets_of(ddp, model, int(args.bucket_mb * 2**20))
    flats = [torch.zeros(max(b // model.dtype.itemsize, 1), dtype=model.dtype, device=ctx.device) for b in sizes]

    def comm():
        for w in [tdist.all_reduce(f, group=group, async_op=True) for f in flats]:
            w.wait()

    kw = {"device": ctx.device, "warmup": args.warmup, "reps": args.steps, "min_reps": args.steps,
          "max_time_s": float("inf")}
    res = {}
    for key, fn in (("compute_s", lambda: step(False)), ("ddp_s", lambda: step(True)), ("comm_s", comm)):
        tdist.barrier(group=group)
        t = timing.benchmark(fn, label=key, **kw)
        m = torch.tensor([t.median_s, t.p20_s, t.p80_s], dtype=torch.float64, device=ctx.device)
        tdist.all_reduce(m, op=tdist.ReduceOp.MAX, group=group)
        res[key], res[key.replace("_s", "_p20_s")], res[key.replace("_s", "_p80_s")] = m.tolist()
    return res | {"config": name, "ranks": tdist.get_world_size(group), "buckets": sizes,
                  "grad_bytes": int(sum(sizes)), "tokens_per_rank_step": args.batch * args.seq}


def verify(rows: list, configs, ranks: dict, grad_bytes: int) -> list[str]:
    """What is wrong with the timed rows (empty: nothing): every configuration ran on its number of ranks, its
    buckets hold every gradient byte once, and each of compute, DDP step and communication took some time."""
    bad = []
    if [(r["config"], r["ranks"]) for r in rows] != [(c, ranks[c]) for c in configs]:
        bad.append(f"ran {[(r['config'], r['ranks']) for r in rows]}, asked {[(c, ranks[c]) for c in configs]}")
    for r in rows:
        if not sum(r["buckets"]) == r["grad_bytes"] == grad_bytes:
            bad.append(f"{r['config']}: buckets sum to {sum(r['buckets']):,} bytes, gradients {r['grad_bytes']:,}, "
                       f"parameters {grad_bytes:,}")
        if not (r["compute_s"] > 0 and r["ddp_s"] > 0 and r["comm_s"] > 0):
            bad.append(f"{r['config']}: compute {r['compute_s']}, ddp {r['ddp_s']}, comm {r['comm_s']} s")
    return bad


def main(argv=None) -> int:
    args = parse_args(argv)
    hostid = topology.split_hosts_from_env()
    ctx = dist.init(timeout_s=args.timeout)
    try:
        ranks = topology.layout(ctx)
        nodes = sorted({r["node"] for r in ranks})
        node_pgs = {n: tdist.new_group(sorted(r["rank"] for r in ranks if r["node"] == n)) for n in nodes}
        mine = node_pgs[int(ranks[ctx.rank]["node"])]
        model, p = build(args, ctx.device)
        n_params = sum(x.numel() for x in model.parameters())
        dist.print0(f"ddp_overhead: world={ctx.world} nodes={len(nodes)} backend={ctx.backend} model={p.name} "
                    f"({p.num_hidden_layers} layers, vocab {p.vocab_size}, {n_params / 1e6:.1f} M params, "
                    f"{args.dtype}); {args.batch} x {args.seq} tokens per rank per step; "
                    f"NCCL_HOSTID={hostid or 'unset'}")
        chk = check(args, ctx, model)
        dist.print0(f"check: DDP loss vs one rank on the global batch rel err {chk.get('loss_rel_err', 0):.2e}, "
                    f"gradients rel err {chk.get('grad_rel_err', 0):.2e}")
        tol = 1e-4 if args.dtype == "float32" else 3e-2  # bf16: the reduction order shows in the last bits
        if chk and not (chk["loss_rel_err"] < tol and chk["grad_rel_err"] < 10 * tol):
            dist.print0("ddp_overhead: FAILED, DDP does not match one rank: nothing timed")
            return 1
        rows = []
        for name in args.configs:
            if name == "node" and len(nodes) < 2:
                continue  # one node: "node" is the world
            r = time_config(name, mine if name == "node" else None, args, ctx, model)
            rows.append(r)
            dist.print0(f"  {name:>5} ({r['ranks']} ranks): compute {timing.fmt_s(r['compute_s'])}, ddp "
                        f"{timing.fmt_s(r['ddp_s'])}, comm alone {timing.fmt_s(r['comm_s'])} "
                        f"({len(r['buckets'])} buckets, {r['grad_bytes'] / 2**20:.1f} MiB)")
        if ctx.is_main and args.out:
            from labutils import hardware, results

            doc = {"context": ctx.as_dict(), "ranks": ranks, "check": chk, "rows": rows, "params": n_params,
                   "model": dataclasses.asdict(p), "args": vars(args), "fingerprint": hardware.fingerprint()}
            results.atomic_write_bytes(args.out, json.dumps(doc, indent=1, default=str).encode())
            dist.print0(f"wrote {args.out}")
        per_elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
        status = dist.report("ddp_overhead", verify(rows, [c for c in args.configs if c != "node" or len(nodes) > 1],
                                                    {"node": ctx.world // len(nodes), "world": ctx.world},
                                                    n_params * per_elem))
        tdist.barrier()
        dist.print0("ddp_overhead: OK" if not status else "ddp_overhead: FAILED")
        return status
    finally:
        dist.destroy()


if __name__ == "__main__":
    sys.exit(main())
