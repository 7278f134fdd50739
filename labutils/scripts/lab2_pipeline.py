"""Pipeline parallelism of a Mistral over the ranks: GPipe, 1F1B and Interleaved1F1B, checked then timed.

First, for every schedule, one step at the check size (the small profile's model) is compared with the
unpipelined HF model on the same batch: the loss and every parameter's gradient, by relative error.
Then, at the profile's size, each schedule runs ``--steps`` steps for each micro-batch count m with every
forward / backward of every micro-batch timestamped on every rank; the bubble (idle / span) per rank is
set beside (p-1)/(m+p-1). With fewer GPUs than ranks (gloo), everything runs at the small sizes.

Run from the repository root (``--out FILE`` writes the JSON the notebook reads):

  CPU, 4 gloo ranks:  python -m labutils.launch --nproc 4 labutils.scripts.lab2_pipeline -- --out pp.json
                      (or: SMML_DIST_BACKEND=gloo OMP_NUM_THREADS=1 python -m torch.distributed.run
                       --standalone --nproc-per-node 4 -m labutils.scripts.lab2_pipeline --out pp.json)
  4 GPUs, nccl:       python -m torch.distributed.run --standalone --nproc-per-node 4 \\
                          -m labutils.scripts.lab2_pipeline --out pp.json
  2 nodes x 4 GPUs, on each node (HEAD = the first node's hostname):
                      python -m torch.distributed.run --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
                          --rdzv-endpoint HEAD:29500 --rdzv-id pp -m labutils.scripts.lab2_pipeline --out pp.json
                      (8 stages: pass --layers divisible by 16 for the interleaved schedule)

Used in lab2 §Pipeline parallelism.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from labutils import dist, profile, timing
from labutils.parallel import pipeline as pl

TOL = 1e-4  # loss and gradient relative error a correct fp32 pipeline stays under


def parse_args(argv=None) -> argparse.Namespace:
    prof = profile.get()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--schedules", nargs="+", choices=pl.SCHEDULES, default=list(pl.SCHEDULES))
    ap.add_argument("--microbatches", nargs="+", type=int, default=list(prof.pp_microbatches),
                    help="micro-batch counts m to time (>= the number of ranks)")
    ap.add_argument("--steps", type=int, default=prof.pp_steps, help="timed steps per schedule and m")
    ap.add_argument("--model", default=None, help=f"preset shape (default: profile's, {prof.par_model})")
    ap.add_argument("--layers", type=int, default=None, help=f"decoder layers (default {prof.pp_layers})")
    ap.add_argument("--seq", type=int, default=None, help=f"tokens per row (default {prof.par_seq})")
    ap.add_argument("--mb-size", type=int, default=None, help=f"rows per micro-batch ({prof.pp_mb_size})")
    ap.add_argument("--no-check", action="store_true", help="skip the check against the unpipelined model")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON (rank 0, atomic)")
    return ap.parse_args(argv)


def sizes(args, ctx) -> dict:
    """The profile's sizes; the small ones when gloo CPU ranks stand in for GPUs."""
    prof = profile.get("small") if ctx.backend == "gloo" else profile.get()
    return {"model": args.model or prof.par_model, "layers": args.layers or prof.pp_layers,
            "vocab": prof.par_vocab, "seq": args.seq or prof.par_seq, "mb": args.mb_size or prof.pp_mb_size,
            "dtype": "float32" if ctx.device.type == "cpu" else "bfloat16", "profile": prof.name}


def batch(rows: int, seq: int, vocab: int, device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (rows, seq + 1), generator=g).to(device)
    return ids[:, :-1], ids[:, 1:]


def make_stages(kind: str, model, ctx, copy_weights: bool, device):
    """This rank's PipelineStage(s) over ``model`` (copied, or cut out of a meta model and materialised)."""
    from torch.distributed.pipelining import PipelineStage

    chunks = 2 if kind == "interleaved" else 1
    n = ctx.world * chunks
    ranges = pl.split_layers(model.config.num_hidden_layers, n)
    mine = pl.stage_indices(ctx.rank, ctx.world, chunks)
    mods = {i: pl.Stage(model, ranges[i], copy_weights=copy_weights) for i in mine}
    if not copy_weights:
        for i, mod in mods.items():
            pl.materialize(mod, device, seed=i)
    return mods, [PipelineStage(mod, i, n, device) for i, mod in mods.items()]


def step(sched, mods: dict, n_stages: int, x, y) -> list:
    """One schedule step on this rank: inputs where the first stage lives, targets where the last does."""
    losses: list = []
    kw = {"target": y, "losses": losses} if (n_stages - 1) in mods else {}
    sched.step(x, **kw) if 0 in mods else sched.step(**kw)
    return losses


def check(kind: str, sz: dict, ctx) -> dict:
    """Loss and gradients of one pipelined step against the unpipelined HF model on the same batch."""
    small = profile.get("small")
    ref = pl.make_model(small.par_model, small.pp_layers, small.par_vocab, seed=0, device=ctx.device)
    m = max(ctx.world, 4)
    x, y = batch(m * small.pp_mb_size, small.par_seq, small.par_vocab, ctx.device)
    ref_loss = pl.loss_fn(ref(input_ids=x).logits, y)
    ref_loss.backward()
    mods, stages = make_stages(kind, ref, ctx, True, ctx.device)
    n = len(stages) * ctx.world
    losses = step(pl.schedule(kind, stages, m), mods, n, x, y)
    refp = dict(ref.named_parameters())
    grad_err = max(timing.rel_err(p.grad, refp[mod.ref_name(k)].grad)
                   for mod in mods.values() for k, p in mod.named_parameters())
    loss_err = timing.rel_err(torch.stack(losses).mean(), ref_loss) if losses else 0.0
    errs = torch.tensor([loss_err, grad_err], dtype=torch.float64, device=ctx.device)
    tdist.all_reduce(errs, op=tdist.ReduceOp.MAX)
    return {"schedule": kind, "m": m, "loss_rel_err": errs[0].item(), "grad_rel_err": errs[1].item(),
            "ok": bool(errs.max().item() < TOL)}


def measure(kind: str, mods: dict, stages: list, m: int, sz: dict, steps: int, ctx) -> dict:
    """``steps`` timed steps (after one untimed): bubble per rank per step, step time, one step's events."""
    sched = pl.schedule(kind, stages, m)
    rec = pl.Recorder(stages, ctx.device)
    x, y = batch(m * sz["mb"], sz["seq"], sz["vocab"], ctx.device)
    bubbles, times, events = [], [], None
    for i in range(steps + 1):
        for mod in mods.values():
            mod.zero_grad(set_to_none=True)
        tdist.barrier()
        rec.start()
        with timing.stopwatch(ctx.device) as t:
            step(sched, mods, len(stages) * ctx.world, x, y)
        everyone = [None] * ctx.world
        tdist.all_gather_object(everyone, rec.events())
        if i:  # the first step holds one-off costs (buffers, shape inference)
            bubbles.append(pl.bubble(everyone))
            times.append(t.seconds)
            events = everyone
    chunks = len(stages)
    per_rank = [timing.stats([b[r] for b in bubbles]).as_dict() for r in range(ctx.world)]
    all_b = [v for b in bubbles for v in b]
    return {"schedule": kind, "m": m, "p": ctx.world, "chunks": chunks,
            "predicted": pl.bubble_fraction(ctx.world, m, chunks), "predicted_v1": pl.bubble_fraction(ctx.world, m),
            "measured": timing.stats(all_b).as_dict(), "per_rank": per_rank,
            "step_s": timing.stats(times).as_dict(), "events": events}


def time_all(args, sz: dict, ctx, meta) -> list[dict]:
    """Every schedule at every m (>= the ranks), on stages cut out of the meta model and materialised."""
    runs = []
    for kind in args.schedules:
        mods, _ = make_stages(kind, meta, ctx, False, ctx.device)
        for m in [m for m in args.microbatches if m >= ctx.world]:
            r = measure(kind, mods, rebuild(mods, ctx, kind), m, sz, args.steps, ctx)
            runs.append(r)
            dist.print0(f"{kind:>11} m={m:>3}: bubble predicted {r['predicted']:.3f}, measured median "
                        f"{r['measured']['p50']:.3f} (p20 {r['measured']['p20']:.3f}, p80 "
                        f"{r['measured']['p80']:.3f}); step {timing.fmt_s(r['step_s']['p50'])}")
    return runs


def verify(runs: list, schedules, microbatches, world: int) -> list[str]:
    """What is wrong with rank 0's timed runs (empty: nothing; losses and gradients were checked before any
    timing): every schedule timed at every m >= the ranks, the predicted bubble is the formula's, the measured
    one a fraction, and every stage of every rank ran each micro-batch's forward and backward once per chunk."""
    bad = []
    want = sorted((k, m) for k in schedules for m in microbatches if m >= world)
    if sorted((r["schedule"], r["m"]) for r in runs) != want:
        bad.append(f"timed {sorted((r['schedule'], r['m']) for r in runs)}, asked {want}")
    for r in runs:
        name = f"{r['schedule']} m={r['m']}"
        if r["p"] != world or len(r["events"]) != world:
            bad.append(f"{name}: p={r['p']} with events from {len(r['events'])} ranks, the job has {world}")
        if abs(r["predicted"] - pl.bubble_fraction(world, r["m"], r["chunks"])) > 1e-12:
            bad.append(f"{name}: predicted bubble {r['predicted']} is not (p-1)/(v m + p-1)")
        if not 0.0 <= r["measured"]["p50"] < 1.0:
            bad.append(f"{name}: measured bubble {r['measured']['p50']} is not a fraction")
        want_ev = sorted((k, mb) for k in "FB" for mb in range(r["m"]) for _ in range(r["chunks"]))
        for rank, evs in enumerate(r["events"]):
            if sorted((e["kind"], e["mb"]) for e in evs) != want_ev:
                bad.append(f"{name}: rank {rank} did not run every forward and backward once per chunk")
    return bad


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = dist.init()
    torch.manual_seed(0)
    try:
        sz = sizes(args, ctx)
        if ctx.backend == "gloo" and profile.get().name == "full":
            dist.print0("gloo CPU ranks stand in for GPUs: running at the small profile's sizes")
        dt = getattr(torch, sz["dtype"])
        checks = [] if args.no_check else [check(k, sz, ctx) for k in args.schedules]
        for c in checks:
            dist.print0(f"check {c['schedule']:>11} (m={c['m']}): loss rel err {c['loss_rel_err']:.1e}, "
                        f"grads max rel err {c['grad_rel_err']:.1e} -> {'OK' if c['ok'] else 'WRONG'}")
        if not all(c["ok"] for c in checks):
            dist.print0(f"pipelined step differs from the unpipelined model (tolerance {TOL:g}): not timing it")
            return 1
        runs = time_all(args, sz, ctx, pl.make_model(sz["model"], sz["layers"], sz["vocab"], device="meta", dtype=dt))
        status = dist.report("lab2_pipeline",
                             verify(runs, args.schedules, args.microbatches, ctx.world) if ctx.is_main else [])
        if args.out and ctx.is_main:
            from labutils import hardware, results

            doc = {"context": ctx.as_dict(), "sizes": sz, "checks": checks, "runs": runs,
                   "fingerprint": hardware.fingerprint()}
            results.atomic_write_bytes(args.out, json.dumps(doc, default=str).encode())
            dist.print0(f"wrote {args.out}")
        return status
    finally:
        dist.destroy()


def rebuild(mods: dict, ctx, kind: str) -> list:
    """Fresh PipelineStage wrappers (a schedule's buffers depend on m) around the same stage modules."""
    from torch.distributed.pipelining import PipelineStage

    n = ctx.world * (2 if kind == "interleaved" else 1)
    return [PipelineStage(mod, i, n, ctx.device) for i, mod in mods.items()]


if __name__ == "__main__":
    sys.exit(main())
