"""Data parallelism of a Mistral: naive, bucketed, DDP and FSDP2 checked against one rank, the overlap of
communication with backward, per-rank memory of DDP vs FSDP2, one big-model FSDP2 training step, and
strong / weak scaling at 1, 2 and 4 ranks (sub-groups of one launch) with an all-reduce alpha-beta fit.

Every kind is first checked: W ranks x batch b for a few AdamW steps against one rank x batch W b
(loss per step and final weights, by relative error). With fewer GPUs than ranks (gloo), everything
runs at the small profile's sizes.

Run from the repository root (``--out FILE`` writes the JSON the notebook reads):

  CPU, 4 gloo ranks:  python -m labutils.launch --nproc 4 labutils.scripts.lab2_data -- --out dp.json
                      (or: SMML_DIST_BACKEND=gloo OMP_NUM_THREADS=1 python -m torch.distributed.run
                       --standalone --nproc-per-node 4 -m labutils.scripts.lab2_data --out dp.json)
  4 GPUs, nccl:       python -m torch.distributed.run --standalone --nproc-per-node 4 \\
                          -m labutils.scripts.lab2_data --out dp.json
                      (mistral-7b FSDP2 step only: --parts big --big-batch 2 --big-seq 4096)
  2 nodes x 4 GPUs, on each node (HEAD = the first node's hostname):
                      python -m torch.distributed.run --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
                          --rdzv-endpoint HEAD:29500 --rdzv-id dp -m labutils.scripts.lab2_data --out dp.json

Used in lab2 §Data parallelism and §Scaling laws.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from labutils import dist, profile, timing
from labutils.parallel import data as dp
from labutils.parallel import memory as mem_model
from labutils.parallel import pipeline as pl

PARTS = ("check", "overlap", "memory", "big", "scaling")
TOL = 1e-4  # loss-curve relative difference a correct fp32 data-parallel run stays under
WTOL = 1e-3  # weights after a few AdamW steps (Adam divides by sqrt(v): tiny gradient noise is amplified)


def parse_args(argv=None) -> argparse.Namespace:
    prof = profile.get()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--kinds", nargs="+", choices=dp.KINDS[:-1], default=["naive", "bucket", "ddp", "fsdp"])
    ap.add_argument("--steps", type=int, default=None, help=f"AdamW steps of the check ({prof.dp_steps})")
    ap.add_argument("--reps", type=int, default=None, help=f"timed steps per point ({prof.reps})")
    ap.add_argument("--bucket-mb", type=float, default=None, help="gradient bucket size, MiB (1 on gloo, 25 nccl)")
    ap.add_argument("--big-model", default=None, help=f"preset of the FSDP2 step ({prof.fsdp_model})")
    ap.add_argument("--big-seq", type=int, default=None, help=f"tokens per row ({prof.fsdp_seq})")
    ap.add_argument("--big-batch", type=int, default=None, help=f"rows per rank ({prof.fsdp_batch})")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing per decoder layer (big step)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON (rank 0, atomic)")
    return ap.parse_args(argv)


def sizes(args, ctx) -> dict:
    prof = profile.get("small") if ctx.backend == "gloo" else profile.get()
    big_vocab = prof.par_vocab if ctx.backend == "gloo" else None  # a CPU run keeps payloads small
    return {"model": prof.par_model, "layers": prof.dp_layers, "vocab": prof.par_vocab, "seq": prof.par_seq,
            "batch": prof.dp_batch, "steps": args.steps or prof.dp_steps,
            "reps": args.reps or (3 if ctx.backend == "gloo" else prof.reps),
            "big_model": args.big_model or prof.fsdp_model, "big_seq": args.big_seq or prof.fsdp_seq,
            "big_batch": args.big_batch or prof.fsdp_batch, "big_vocab": big_vocab, "profile": prof.name,
            "bucket_bytes": int((args.bucket_mb or (1.0 if ctx.backend == "gloo" else 25.0)) * 2**20)}


def model(sz, ctx):
    return pl.make_model(sz["model"], sz["layers"], sz["vocab"], seed=0, device=ctx.device)


def batches(sz, ctx, rows: int, n: int, seed: int = 1):
    """``n`` global batches of ``rows`` rows; the same on every rank."""
    return [pl_batch(rows, sz["seq"], sz["vocab"], ctx.device, seed + i) for i in range(n)]


def pl_batch(rows, seq, vocab, device, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (rows, seq + 1), generator=g).to(device)
    return ids[:, :-1], ids[:, 1:]


def shard(bs, rank: int, n: int):
    """This rank's rows of every global batch."""
    return [(x.chunk(n)[rank], y.chunk(n)[rank]) for x, y in bs]


def full_params(module) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for p in module.parameters()]


def check(sz, ctx, kinds) -> list[dict]:
    """Each kind on W ranks x b rows against one rank x W b rows: loss per step and final weights."""
    bs = batches(sz, ctx, ctx.world * sz["batch"], sz["steps"])
    ref_losses, ref_params = _reference(sz, ctx, bs)
    out = []
    for kind in kinds:
        m = dp.wrap(model(sz, ctx), kind, bucket_bytes=sz["bucket_bytes"])
        losses = dp.train(m, torch.optim.AdamW(m.module.parameters(), lr=1e-3), shard(bs, ctx.rank, ctx.world),
                          pl.loss_fn)
        params = full_params(m.module)
        w_err = max(timing.rel_err(p, r) for p, r in zip(params, ref_params)) if ctx.is_main else 0.0
        l_err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
        errs = torch.tensor([l_err, w_err], dtype=torch.float64, device=ctx.device)
        tdist.all_reduce(errs, op=tdist.ReduceOp.MAX)
        out.append({"kind": kind, "losses": losses, "ref_losses": ref_losses, "loss_rel_err": errs[0].item(),
                    "weight_rel_err": errs[1].item(), "ok": bool(errs[0].item() < TOL and errs[1].item() < WTOL)})
        dist.print0(f"check {kind:>6}: {ctx.world} ranks x {sz['batch']} rows vs 1 rank x "
                    f"{ctx.world * sz['batch']}: loss max rel diff {errs[0].item():.1e}, weights "
                    f"{errs[1].item():.1e} over {len(losses)} AdamW steps -> {'OK' if out[-1]['ok'] else 'WRONG'}")
    return out


def _reference(sz, ctx, bs):
    """The one-rank run (on rank 0, shared with the others): losses, and final weights on rank 0."""
    losses, params = [None], []
    if ctx.is_main:
        ref = model(sz, ctx)
        opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
        losses[0] = []
        for x, y in bs:
            opt.zero_grad(set_to_none=True)
            loss = pl.loss_fn(ref(input_ids=x).logits, y)
            loss.backward()
            opt.step()
            losses[0].append(loss.item())
        params = [p.detach() for p in ref.parameters()]
    tdist.broadcast_object_list(losses, src=0)
    return losses[0], params


def step_time(m, batch, sz, ctx, group=None, reps=None) -> float:
    """Median forward + backward + gradient sync (no optimizer), the slowest rank's; same reps everywhere."""
    x, y = batch

    def one():
        m.module.zero_grad(set_to_none=True)
        pl.loss_fn(m(input_ids=x).logits, y).backward()
        m.sync()

    reps = reps or sz["reps"]
    t = timing.benchmark(one, device=ctx.device, warmup=1, reps=reps, min_reps=reps, max_time_s=float("inf"))
    worst = torch.tensor([t.median_s], dtype=torch.float64, device=ctx.device)
    tdist.all_reduce(worst, op=tdist.ReduceOp.MAX, group=group)
    return worst.item()


def overlap(sz, ctx) -> dict:
    """Step time of each kind, and how much of the all-reduce the overlapped ones hid."""
    x, y = shard(batches(sz, ctx, ctx.world * sz["batch"], 1), ctx.rank, ctx.world)[0]
    t = {k: step_time(dp.wrap(model(sz, ctx), k, bucket_bytes=sz["bucket_bytes"]), (x, y), sz, ctx)
         for k in ("local", "bucket-late", "bucket", "ddp")}
    comm = t["bucket-late"] - t["local"]
    hidden = {k: (t["bucket-late"] - t[k]) / comm if comm > 0 else float("nan") for k in ("bucket", "ddp")}
    dist.print0("step (fwd+bwd+grad sync): " + ", ".join(f"{k} {timing.fmt_s(v)}" for k, v in t.items()))
    return {"step_s": t, "exposed_comm_s": comm, "hidden_fraction": hidden}


def _per_param(z: dict) -> dict:
    """Bytes per parameter of each part (the formula's dict without its stage/world labels)."""
    return {k: z[k] for k in ("params", "grads", "optimizer", "total")}


def memory(sz, ctx) -> dict:
    """Per-rank bytes of parameters, gradients and AdamW state after one step: DDP vs FSDP2."""
    rows = {}
    x, y = shard(batches(sz, ctx, ctx.world * sz["batch"], 1), ctx.rank, ctx.world)[0]
    for kind in ("ddp", "fsdp"):
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        m = dp.wrap(model(sz, ctx), kind, bucket_bytes=sz["bucket_bytes"])
        opt = torch.optim.AdamW(m.module.parameters(), lr=1e-3)
        dp.train(m, opt, [(x, y)], pl.loss_fn)
        got = dp.rank_bytes(m.module, opt)
        if ctx.device.type == "cuda":
            got["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        n = sum(p.numel() for p in m.module.parameters())  # a DTensor counts its global elements
        stage = 0 if kind == "ddp" else 3
        z = _per_param(mem_model.per_rank_training_bytes(1, ctx.world, stage, weight=4, grad=4, optim=8))  # fp32 + Adam
        rows[kind] = {"n_params": n, "measured": got, "predicted": {k: v * n for k, v in z.items()}}
        del m, opt
    return rows


def big_step(sz, ctx, ac: bool) -> dict:
    """One FSDP2 training step (after one warm-up) of the big preset: tokens/s and per-rank memory."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    cuda = ctx.device.type == "cuda"
    meta = pl.make_model(sz["big_model"], vocab=sz["big_vocab"], device="meta")
    if ac:
        meta.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else None
    m = dp.fully_shard_model(meta, dp.mesh_1d(device_type=ctx.device.type), mp)
    pl.materialize(m, ctx.device, seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    x, y = pl_batch(sz["big_batch"], sz["big_seq"], m.config.vocab_size, ctx.device, seed=ctx.rank)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(1 + 3):
        with timing.stopwatch(ctx.device) as t:
            opt.zero_grad(set_to_none=True)
            loss = pl.loss_fn(m(input_ids=x).logits, y)
            loss.backward()
            opt.step()
        times.append(t.seconds)
    cfg, n = m.config, sum(p.numel() for p in m.parameters())
    med = timing.stats(times[1:]).p50
    tok = ctx.world * sz["big_batch"] * sz["big_seq"] / med
    got = dp.rank_bytes(m, opt) | ({"cuda_max_allocated": torch.cuda.max_memory_allocated()} if cuda else {})
    z = _per_param(mem_model.per_rank_training_bytes(1, ctx.world, 3, weight=4, grad=4, optim=8))
    return {"model": sz["big_model"], "n_params": n, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "vocab": cfg.vocab_size, "seq": sz["big_seq"], "batch_per_rank": sz["big_batch"], "world": ctx.world,
            "mixed_precision": "bf16 params, fp32 reduce" if cuda else "fp32 (CPU)", "activation_checkpointing": ac,
            "step_s": timing.stats(times[1:]).as_dict(), "first_step_s": times[0], "tokens_per_s": tok,
            "loss": loss.item(), "measured": got, "predicted": {k: v * n for k, v in z.items()},
            "ddp_predicted_bytes": 16 * n}


def allreduce_s(group, ctx, nbytes: int, reps: int = 5) -> float:
    buf = torch.ones(nbytes // 4, device=ctx.device)
    t = timing.benchmark(lambda: tdist.all_reduce(buf, group=group), device=ctx.device, warmup=1, reps=reps,
                         min_reps=reps, max_time_s=float("inf"))
    worst = torch.tensor([t.median_s], dtype=torch.float64, device=ctx.device)
    tdist.all_reduce(worst, op=tdist.ReduceOp.MAX, group=group)
    return worst.item()


def scaling(sz, ctx) -> dict:
    """DDP step time on the first n ranks (sub-groups of this launch), n = 1, 2, 4, ...: strong scaling
    (global batch fixed at world x b rows) and weak (b rows per rank); all-reduce times for alpha-beta."""
    ns = [n for n in (1, 2, 4, 8, 16) if n <= ctx.world]
    groups = {n: tdist.new_group(list(range(n))) for n in ns}  # every rank creates every group, in order
    rows = ctx.world * sz["batch"]
    sizes = [2**14, 2**18, 2**20, 2**22] if ctx.backend == "gloo" else [2**20, 2**24, 2**26, 2**28]
    out = {"ranks": ns, "strong_s": [], "weak_s": [], "allreduce": {}, "global_rows": rows,
           "rows_per_rank_weak": sz["batch"], "allreduce_bytes": sizes}
    for n in ns:
        if ctx.rank < n:
            g = groups[n]
            m = dp.wrap(model(sz, ctx), "ddp", g, bucket_bytes=sz["bucket_bytes"])
            (x, y), = shard(batches(sz, ctx, rows, 1), ctx.rank, n)
            out["strong_s"].append(step_time(m, (x, y), sz, ctx, group=g))
            (x, y), = shard(batches(sz, ctx, n * sz["batch"], 1, seed=7), ctx.rank, n)
            out["weak_s"].append(step_time(m, (x, y), sz, ctx, group=g))
            if n > 1:
                out["allreduce"][n] = [allreduce_s(g, ctx, b) for b in sizes]
        tdist.barrier()
        if ctx.is_main:
            dist.print0(f"scaling n={n}: strong {timing.fmt_s(out['strong_s'][-1])}, "
                        f"weak {timing.fmt_s(out['weak_s'][-1])}")
    out["grad_bytes"] = 4 * sum(p.numel() for p in pl.make_model(sz["model"], sz["layers"], sz["vocab"],
                                                                  device="meta").parameters())
    return out


def verify(doc: dict, kinds, steps: int, world: int) -> list[str]:
    """What is wrong with rank 0's record (empty: nothing): every kind checked over every step, DDP holding
    4 bytes per parameter of weights and gradients and 8 of AdamW state, FSDP2 a 1/world share of each (up to
    the padding of each shard), and the big model's FSDP2 step the same share of its weights."""
    bad = []

    def near(a, b, what):
        if not abs(a - b) <= 0.02 * abs(b):
            bad.append(f"{what}: {a:,.0f} bytes, expected {b:,.0f} (within 2 %)")

    if "checks" in doc:
        if [c["kind"] for c in doc["checks"]] != list(kinds):
            bad.append(f"checked {[c['kind'] for c in doc['checks']]}, asked {list(kinds)}")
        bad += [f"{c['kind']}: {len(c['losses'])} losses for {steps} steps" for c in doc["checks"]
                if len(c["losses"]) != steps]
    if "memory" in doc:
        mem = doc["memory"]
        ddp, fsdp = mem["ddp"]["measured"], mem["fsdp"]["measured"]
        if not ddp["params"] == mem["ddp"]["predicted"]["params"] == 4 * mem["ddp"]["n_params"]:
            bad.append(f"DDP parameters {ddp['params']:,} bytes, predicted {mem['ddp']['predicted']['params']:,}, "
                       f"4 x {mem['ddp']['n_params']:,} parameters")
        if ddp["optimizer"] != 2 * ddp["params"]:
            bad.append(f"DDP AdamW state {ddp['optimizer']:,} bytes is not twice the parameters' {ddp['params']:,}")
        for part in ("params", "grads", "optimizer"):
            near(fsdp[part], ddp[part] / world, f"FSDP2 {part} per rank (DDP's / {world})")
    if "big" in doc:
        big = doc["big"]
        if not (big["tokens_per_s"] > 0 and big["world"] == world):
            bad.append(f"big step: {big['tokens_per_s']} tokens/s on {big['world']} ranks")
        near(big["measured"]["params"], big["n_params"] * 4 / world, "big model's FSDP2 parameters per rank")
    return bad


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = dist.init()
    try:
        sz = sizes(args, ctx)
        if ctx.backend == "gloo" and profile.get().name == "full":
            dist.print0("gloo CPU ranks stand in for GPUs: running at the small profile's sizes")
        doc = {"context": ctx.as_dict(), "sizes": sz}
        if "check" in args.parts:
            doc["checks"] = check(sz, ctx, args.kinds)
            if not all(c["ok"] for c in doc["checks"]):
                dist.print0(f"a data-parallel run differs from one rank (tolerance {TOL:g}): not timing it")
                return 1
        if "overlap" in args.parts:
            doc["overlap"] = overlap(sz, ctx)
        if "memory" in args.parts:
            doc["memory"] = memory(sz, ctx)
        if "big" in args.parts:
            doc["big"] = big_step(sz, ctx, args.ac)
            dist.print0(f"FSDP2 step of {sz['big_model']}: {doc['big']['tokens_per_s']:,.0f} tokens/s")
        if "scaling" in args.parts:
            doc["scaling"] = scaling(sz, ctx)
        status = dist.report("lab2_data", verify(doc, args.kinds, sz["steps"], ctx.world) if ctx.is_main else [])
        if args.out and ctx.is_main:
            from labutils import hardware, results

            doc["fingerprint"] = hardware.fingerprint()
            results.atomic_write_bytes(args.out, json.dumps(doc, default=str).encode())
            dist.print0(f"wrote {args.out}")
        return status
    finally:
        dist.destroy()


if __name__ == "__main__":
    sys.exit(main())
