"""Train a small Mistral for a few AdamW steps on seeded synthetic tokens: DDP or FSDP2, resumable.

The one training script every orchestrator of lab3 starts (torchrun, Slurm, Kubernetes). Each
rank prints ``READY`` once it has joined; rank 0 prints one ``step`` line per step (loss and a
wall-clock timestamp) and writes a JSON result (``--out``). With ``--ckpt-dir`` it saves a
checkpoint every ``--ckpt-every`` steps (plain per-rank files for DDP, torch.distributed.checkpoint
for FSDP2) and, when started again (a torchrun restart, a requeued job), resumes from the newest
complete one. The data of step s depends only on (seed, s), so a resumed run ends with the same
loss as an unbroken one. Run from the repository root; TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 lets a
torchrun restart reconnect with gloo on torch 2.13 (pytorch issue #135712).

  CPU, 4 gloo ranks:  OMP_NUM_THREADS=1 SMML_DIST_BACKEND=gloo TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \\
                        python -m torch.distributed.run --standalone --nproc-per-node 4 \\
                        -m labutils.scripts.train --parallel fsdp
                      python -m labutils.launch --nproc 4 labutils.scripts.train -- --parallel fsdp
  kill rank 1 at step 5, restart once, resume (CPU):
                      OMP_NUM_THREADS=1 SMML_DIST_BACKEND=gloo TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \\
                        python -m torch.distributed.run --standalone --nproc-per-node 4 --max-restarts 1 \\
                        -m labutils.scripts.train --ckpt-dir /tmp/ckpt --crash-at-step 5 --crash-rank 1
  4 GPUs, nccl:       TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 python -m torch.distributed.run --standalone \\
                        --nproc-per-node 4 --max-restarts 1 -m labutils.scripts.train --ckpt-dir /tmp/ckpt
  2 nodes x 4 GPUs, on each node (HEAD = the first node's address):
                      TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 python -m torch.distributed.run --nnodes 2 \\
                        --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 --rdzv-id train \\
                        --max-restarts 1 -m labutils.scripts.train --ckpt-dir /shared/ckpt
  2 nodes x 2 ranks simulated on this host:
                      python -m labutils.launch --nodes 2 --nproc 2 labutils.scripts.train
  Slurm:              sbatch launch/slurm/train.sbatch --ckpt-dir /shared/ckpt
  Kubernetes:         kubectl apply -f launch/k8s/train.yaml

Drills: ``--crash-at-step N --crash-rank R`` (rank R SIGKILLs itself at step N, on the first
attempt only: TORCHELASTIC_RESTART_COUNT=0); ``--hang-at-step N --hang-rank R`` (rank R sleeps;
the per-step heartbeat, a gloo ``monitored_barrier`` of ``--heartbeat-s``, names it);
``--exit-before-init R`` (rank R exits with code 4 before joining the process group).

Used in lab3 §Orchestrators and lab3 §Fault tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

T_START = time.time()

import torch  # noqa: E402 - T_START measures the imports too
import torch.distributed as tdist  # noqa: E402

from labutils import checkpoint, dist, models, profile, results  # noqa: E402


def sizes() -> tuple[profile.Profile, str]:
    """The profile's sizes, but the small ones when gloo CPU ranks stand in for GPUs (and a note saying so)."""
    prof = profile.get()
    if prof.name != "small" and os.environ.get("SMML_DIST_BACKEND") == "gloo":
        return profile.get("small"), f"profile {prof.name}, but gloo CPU ranks stand in for GPUs: small sizes"
    return prof, f"profile {prof.name}"


def parse_args(argv=None) -> argparse.Namespace:
    prof, _ = sizes()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=prof.train_model, help="labutils.models preset")
    ap.add_argument("--vocab", type=int, default=prof.train_vocab, help="token ids (embedding rows)")
    ap.add_argument("--layers", type=int, default=prof.train_layers, help="decoder layers")
    ap.add_argument("--seq", type=int, default=prof.train_seq, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=prof.train_batch, help="sequences per rank per step")
    ap.add_argument("--steps", type=int, default=prof.train_steps, help="optimizer steps in all")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    ap.add_argument("--seed", type=int, default=0, help="model init and data seed")
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                    help="DDP (replicated) or FSDP2 fully_shard (sharded)")
    ap.add_argument("--ckpt-dir", type=Path, default=None, help="checkpoint here and resume from here")
    ap.add_argument("--ckpt-every", type=int, default=prof.train_ckpt_every, help="steps between checkpoints")
    ap.add_argument("--crash-at-step", type=int, default=None, help="drill: a rank SIGKILLs itself here")
    ap.add_argument("--crash-rank", type=int, default=1, help="drill: which rank crashes")
    ap.add_argument("--hang-at-step", type=int, default=None, help="drill: a rank hangs here")
    ap.add_argument("--hang-rank", type=int, default=1, help="drill: which rank hangs")
    ap.add_argument("--exit-before-init", type=int, default=None, metavar="RANK",
                    help="drill: this rank exits (code 4) before joining the process group")
    ap.add_argument("--heartbeat-s", type=float, default=60.0,
                    help="every rank must reach each step within this many seconds of the others")
    ap.add_argument("--timeout", type=float, default=120.0, help="collective timeout in seconds")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON (rank 0, atomic)")
    a = ap.parse_args(argv)
    if min(a.steps, a.batch, a.seq, a.layers, a.ckpt_every) < 1 or a.vocab < 8:
        raise SystemExit("--steps, --batch, --seq, --layers, --ckpt-every must be >= 1 and --vocab >= 8")
    return a


def attempt() -> int:
    """Which start of this job this is: torchrun counts its restarts in TORCHELASTIC_RESTART_COUNT."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def build(args, ctx):
    """The model (same seeded init on every rank) wrapped for DDP or FSDP2, and its AdamW."""
    from transformers import MistralForCausalLM  # imported in main() already, before READY

    cfg = models.preset(args.model).config()
    cfg.vocab_size, cfg.num_hidden_layers = args.vocab, args.layers
    torch.manual_seed(args.seed)
    model = MistralForCausalLM(cfg).to(ctx.device)
    if args.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return model, torch.optim.AdamW(model.parameters(), lr=args.lr)


def batch(args, step: int, ctx) -> torch.Tensor:
    """This rank's slice of step ``step``'s global batch: a function of (seed, step) only.

    Each sequence counts up by its own stride (mod vocab) from a random start: learnable, so the loss falls.
    """
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    n = args.batch * ctx.world
    start = torch.randint(0, args.vocab, (n, 1), generator=g)
    stride = torch.randint(1, 5, (n, 1), generator=g)
    tokens = (start + stride * torch.arange(args.seq)) % args.vocab
    return tokens[ctx.rank * args.batch:(ctx.rank + 1) * args.batch].to(ctx.device)


def resume(args, model, opt, ctx) -> int:
    """Load the newest complete checkpoint, if any; the first step still to run."""
    ck = checkpoint.latest(args.ckpt_dir) if args.ckpt_dir else None
    if ck is None:
        return 0
    t0 = time.time()
    if ck.kind == "dcp":
        checkpoint.load_sharded(ck, model, opt)
    else:
        shared = checkpoint.load_shared(ck)
        (model.module if hasattr(model, "module") else model).load_state_dict(shared["model"])
        opt.load_state_dict(shared["optim"])
    dist.print0(f"RESUMED from step {ck.step} ({ck.kind} checkpoint {ck.path.name}, world {ck.world}) "
                f"load_s={time.time() - t0:.3f} t={time.time():.3f}")
    return ck.step


def save(args, step: int, model, opt, ctx) -> None:
    local = {"step": step, "rank": ctx.rank, "rng": torch.get_rng_state()}
    if args.parallel == "fsdp":
        checkpoint.save_sharded(args.ckpt_dir, step, model, opt, ctx, local=local)
    else:
        inner = model.module if hasattr(model, "module") else model
        shared = {"model": inner.state_dict(), "optim": opt.state_dict()} if ctx.rank == 0 else None
        checkpoint.save(args.ckpt_dir, step, ctx, shared=shared, local=local)


def drills(args, step: int, ctx) -> None:
    """Before step ``step`` (1-based, as the step lines count) runs."""
    if args.crash_at_step == step and args.crash_rank == ctx.rank and attempt() == 0:
        dist.say(f"CRASH rank={ctx.rank} step={step} attempt={attempt()} t={time.time():.3f}")
        os.kill(os.getpid(), signal.SIGKILL)
    if args.hang_at_step == step and args.hang_rank == ctx.rank:
        dist.say(f"HANG rank={ctx.rank} step={step} t={time.time():.3f}")
        while True:
            time.sleep(3600)


def heartbeat(group, args, step: int) -> None:
    """Every rank reaches the step: a hang becomes an error naming the missing rank(s) (gloo)."""
    if group is not None:
        tdist.monitored_barrier(group, timeout=_td(args.heartbeat_s), wait_all_ranks=True)


def _td(s: float):
    from datetime import timedelta

    return timedelta(seconds=s)


def train(args, ctx) -> dict:
    model, opt = build(args, ctx)
    first = resume(args, model, opt, ctx)
    hb = None if ctx.world == 1 else (tdist.group.WORLD if ctx.backend == "gloo" else tdist.new_group(backend="gloo"))
    losses, step_s = {}, []
    on_gpu = ctx.device.type == "cuda"  # bf16 autocast on GPUs (fp32 master weights), fp32 on CPUs
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()
    for step in range(first, args.steps):
        drills(args, step + 1, ctx)
        heartbeat(hb, args, step)
        t0 = time.perf_counter()
        x = batch(args, step, ctx)
        with amp:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().float().clone()
        if ctx.world > 1:
            tdist.all_reduce(mean)
        losses[step] = float(mean) / ctx.world
        step_s.append(time.perf_counter() - t0)
        dist.print0(f"step {step + 1}/{args.steps} loss={losses[step]!r} attempt={attempt()} "
                    f"dt={step_s[-1]:.3f} t={time.time():.3f}")
        if args.ckpt_dir and ((step + 1) % args.ckpt_every == 0 or step + 1 == args.steps):
            save(args, step + 1, model, opt, ctx)
    return {"losses": losses, "resumed_from": first or None, "step_s": step_s}


def check_world(ctx) -> dict:
    """Where each rank runs, and an exact all_reduce: sum over ranks of (rank + 1) = n (n + 1) / 2."""
    me = {"rank": ctx.rank, "node": int(os.environ.get("GROUP_RANK", 0)), "host": socket.gethostname(),
          "local_rank": ctx.local_rank, "pid": os.getpid()}
    everyone = [me] * ctx.world
    t = torch.tensor([ctx.rank + 1.0], device=ctx.device)
    if ctx.world > 1:
        tdist.all_gather_object(everyone, me)
        tdist.all_reduce(t)
    want = ctx.world * (ctx.world + 1) / 2
    return {"layout": everyone, "allreduce_sum": float(t), "allreduce_expected": want, "allreduce_ok": float(t) == want}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.exit_before_init is not None and int(os.environ.get("RANK", 0)) == args.exit_before_init:
        dist.say(f"rank {args.exit_before_init}: --exit-before-init, exiting with code 4")
        return 4
    import transformers.models.mistral.modeling_mistral  # noqa: F401 - here, so that READY's import_s counts it
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (before CUDA starts)
    torch.use_deterministic_algorithms(True, warn_only=True)  # so that a resumed run can match bit for bit
    ctx = dist.init(timeout_s=args.timeout)
    dist.say(f"READY rank={ctx.rank} world={ctx.world} node={os.environ.get('GROUP_RANK', 0)} "
             f"local_rank={ctx.local_rank} pid={os.getpid()} attempt={attempt()} backend={ctx.backend} "
             f"import_s={time.time() - T_START:.2f} t={time.time():.3f}")
    world = check_world(ctx)
    nodes = sorted({r["node"] for r in world["layout"]})
    dist.print0(f"{sizes()[1]}; model {args.model} with {args.layers} layers, vocab {args.vocab}; "
                f"{args.parallel}; batch {args.batch} x {args.seq} tokens per rank")
    dist.print0(f"world {ctx.world} ranks on {len(nodes)} node(s); all_reduce sum {world['allreduce_sum']:g} "
                f"(expected {world['allreduce_expected']:g}): {'ok' if world['allreduce_ok'] else 'WRONG'}")
    run = train(args, ctx)
    final = run["losses"].get(args.steps - 1)
    dist.print0(f"DONE final_loss={final!r} steps={args.steps} parallel={args.parallel} attempt={attempt()} "
                f"t={time.time():.3f}")
    if ctx.is_main and args.out:
        record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "world": ctx.world, "nodes": len(nodes), "backend": ctx.backend, "attempt": attempt(),
                  "final_loss": final, **world, **run}
        results.atomic_write_bytes(args.out, json.dumps(record, indent=1, default=str).encode())
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
