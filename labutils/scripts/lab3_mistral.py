"""mistral-7b over two nodes: TP inside a node x DP across nodes, vs TP across both; decode and training.

For every layout (``--layouts``, e.g. ``tp4xdp2 tp8`` on 8 ranks, ``tp2xdp2 tp4`` on 4):
1. the model is loaded with transformers' own tensor parallelism through lab2's
   ``labutils.parallel.tensor.load_hf_tp`` (``DistributedConfig(tp_size=T)`` on a (dp, tp) DeviceMesh, tp
   innermost, so that a TP group is one node's ranks when T = ranks per node); TP must divide the heads
   and the KV heads (``check_tp_size``, first, with the sizes that would work);
2. check: the last-position logits of every DP replica against TP = 1 (rank 0 alone, same weights,
   same input), by relative error, before anything is timed;
3. decode: greedy ``generate`` of ``--new-tokens`` tokens per sequence (prefill timed apart), tokens/s
   over the global batch; training: forward + backward + SGD step on the replica's batch, the DP
   replicas' gradient shards all-reduced across nodes; tokens/s;
4. the bytes each layout sends over the host's network interfaces per decode step and per training step
   (``/proc/net/dev`` tx counters, host-wide) beside the prediction of ``labutils.netcost.layout_traffic``.

Run from the repository root:

  CPU, 2 nodes x 2 gloo ranks (the lab's CPU run; small model, TP=2 x DP=2 vs TP=4):
      SMML_DIST_BACKEND=gloo python -m labutils.launch --nodes 2 --nproc 2 labutils.scripts.lab3_mistral \\
          -- --layouts tp2xdp2 tp4 --out /tmp/mistral.json
  CPU, 4 gloo ranks on one node:
      OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 4 \\
          -m labutils.scripts.lab3_mistral --layouts tp2xdp2 tp4
  4 GPUs (one node): python -m torch.distributed.run --standalone --nproc-per-node 4 \\
          -m labutils.scripts.lab3_mistral --layouts tp2xdp2 tp4
  8 GPUs as 2 simulated nodes x 4 (NCCL_HOSTID per node: NET between GPUs 0-3 and 4-7):
      SMML_SPLIT_HOSTS=1 python -m labutils.launch --nodes 2 --nproc 4 labutils.scripts.lab3_mistral \\
          -- --layouts tp4xdp2 tp8 --out /tmp/mistral.json
  2 real nodes x 4 GPUs, on each node (HEAD = the first node's hostname):
      python -m torch.distributed.run --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
          --rdzv-endpoint HEAD:29500 --rdzv-id m7b -m labutils.scripts.lab3_mistral --layouts tp4xdp2 tp8

Used in lab3 §mistral-7b over 8 ranks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as tdist

from labutils import dist, models, netcost, profile, timing, topology
from labutils.parallel.tensor import check_tp_size, load_hf_tp

TOL = {"float32": 1e-3, "bfloat16": 5e-2}  # logits rel err a correct TP layout stays under


def parse_args(argv=None) -> argparse.Namespace:
    prof = profile.get()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=prof.tp_model, help="labutils.models preset")
    ap.add_argument("--layers", type=int, default=prof.tp_layers, help="decoder layers (0: the preset's)")
    ap.add_argument("--vocab", type=int, default=prof.tp_vocab, help="vocabulary size (0: the preset's)")
    ap.add_argument("--layouts", nargs="+", default=None, metavar="tpTxdpD",
                    help="layouts to run, e.g. tp4xdp2 tp8 (default: TP = ranks per node x DP = nodes, and TP = all)")
    ap.add_argument("--batch", type=int, default=prof.tp_batch, help="global batch (sequences), split over DP")
    ap.add_argument("--seq", type=int, default=prof.tp_seq, help="prompt / training sequence length")
    ap.add_argument("--new-tokens", type=int, default=prof.tp_new_tokens, help="greedy tokens decoded per sequence")
    ap.add_argument("--steps", type=int, default=2, help="timed repetitions of decode and of the training step")
    ap.add_argument("--dtype", default=prof.dtype, choices=["float32", "bfloat16"], help="weights and activations")
    ap.add_argument("--timeout", type=float, default=900.0, help="collective timeout in seconds")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON (rank 0, atomic)")
    return ap.parse_args(argv)


def parse_layout(text: str, world: int) -> dict:
    m = re.fullmatch(r"tp(\d+)(?:xdp(\d+))?", text)
    if not m:
        raise ValueError(f"layout {text!r}: write tpT or tpTxdpD, e.g. tp4xdp2 or tp8")
    tp, dp = int(m.group(1)), int(m.group(2) or 1)
    if tp * dp != world:
        raise ValueError(f"layout {text!r} needs tp*dp = {tp * dp} ranks, the job has {world}: "
                         f"use e.g. tp{world} or tp{world // 2}xdp2")
    return {"name": text, "tp": tp, "dp": dp}


def save_weights(args, ctx, p) -> Path:
    """Rank 0 builds seeded random weights (on its device) and saves them; every rank loads them back
    through from_pretrained. The preset's own shape is the cached ``models.random_weights_dir``."""
    from transformers import MistralForCausalLM

    dtype = getattr(torch, args.dtype)
    shape = f"h{p.hidden_size}-L{p.num_hidden_layers}-H{p.num_attention_heads}-kv{p.num_key_value_heads}"
    root = Path(tempfile.gettempdir()) / f"smml-lab3-{p.name}-{shape}-v{p.vocab_size}-{args.dtype}"
    if p == models.preset(p.name):
        root = models.random_weights_dir(p.name, 0, dtype, ctx.device) if ctx.is_main else None
    elif ctx.is_main and not (root / "config.json").exists():
        torch.manual_seed(0)
        with torch.device(ctx.device):
            model = MistralForCausalLM(p.config()).to(dtype)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
        model.save_pretrained(tmp)
        tmp.rename(root)
    where = [str(root)]
    tdist.broadcast_object_list(where, src=0)
    return Path(where[0])


def replica_batch(d: int, args, layout, vocab: int, device) -> torch.Tensor:
    per = args.batch // layout["dp"]
    g = torch.Generator().manual_seed(7)  # the global batch, the same on every rank; replica d takes its rows
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    return ids[d * per:(d + 1) * per].to(device)


def reference_logits(path, args, ctx, vocab) -> torch.Tensor:
    """TP = 1 on rank 0: last-position logits of the whole global batch, broadcast to every rank."""
    out = torch.empty(args.batch, vocab, dtype=torch.float32, device=ctx.device)
    if ctx.is_main:
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(ctx.device).eval()
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(ctx.device)
        with torch.no_grad():
            out.copy_(m(input_ids=ids).logits[:, -1].float())
        del m
    tdist.broadcast(out, src=0)
    return out


def load_layout(path, layout, args, ctx):
    """The model under transformers' TP (lab2's ``load_hf_tp``: a (dp, tp) mesh, tp innermost) and this
    rank's DP group (the ranks holding the same TP shard in the other replicas), or None at DP = 1."""
    tp, dp = layout["tp"], layout["dp"]
    model = load_hf_tp(str(path), tp, dtype=getattr(torch, args.dtype))
    groups = [tdist.new_group([i + tp * d for d in range(dp)]) for i in range(tp)] if dp > 1 else [None] * tp
    return model, ctx.rank // tp, groups[ctx.rank % tp]


def tx_bytes() -> int:
    """Bytes sent by every network interface of this host so far (loopback included)."""
    total = 0
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        total += int(line.split(":", 1)[1].split()[8])
    return total


def timed(fn, args, ctx) -> tuple[timing.Timing, float]:
    """benchmark(fn) and the bytes the host sent per call meanwhile (fixed reps: ranks must agree)."""
    tdist.barrier()
    b0 = tx_bytes()
    t = timing.benchmark(fn, device=ctx.device, warmup=0, reps=args.steps, min_reps=args.steps,
                         max_time_s=float("inf"))
    tdist.barrier()
    return t, (tx_bytes() - b0) / (args.steps + 1)  # benchmark's first call is one more


def slowest(x: float, ctx) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=ctx.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t.item())


def train_step(model, ids, dp: int, dp_group):
    """forward + backward + SGD; with DP > 1 each rank's local gradient shard is averaged over its replicas
    (one flat all-reduce across the nodes), as DDP would."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        if dp > 1:
            grads = [(q.grad.to_local() if hasattr(q.grad, "to_local") else q.grad) for q in model.parameters()]
            flat = torch.cat([g.flatten() for g in grads])
            tdist.all_reduce(flat, group=dp_group)
            for g, part in zip(grads, flat.div_(dp).split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
        opt.step()

    return step


def run_layout(layout, path, ref, args, ctx, p, per_node: int) -> dict:
    model, d, dp_group = load_layout(path, layout, args, ctx)
    ids = replica_batch(d, args, layout, p.vocab_size, ctx.device)
    per = ids.shape[0]
    with torch.no_grad():
        got = model(input_ids=ids).logits[:, -1].float()
    err = slowest(timing.rel_err(got, ref[d * per:(d + 1) * per]), ctx)
    if err > TOL[args.dtype]:
        raise RuntimeError(f"{layout['name']}: logits differ from TP=1 by rel err {err:.2e} > {TOL[args.dtype]}")
    model.eval()
    gen = {"do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        prefill, one_bytes = timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen), args, ctx)
        full, dec_bytes = timed(lambda: model.generate(ids, max_new_tokens=args.new_tokens,
                                                       min_new_tokens=args.new_tokens, **gen), args, ctx)
    model.train()
    step = train_step(model, ids, layout["dp"], dp_group)
    train, train_bytes = timed(step, args, ctx)
    t_dec = slowest(max(full.median_s - prefill.median_s, 1e-9), ctx)
    t_train = slowest(train.median_s, ctx)
    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    pred = netcost.layout_traffic(p.config(), layout, per_node, elem, args.batch, args.seq)
    return layout | {"logits_rel_err": err, "prefill_s": slowest(prefill.median_s, ctx), "decode_s": t_dec,
                     "decode_tok_s": args.batch * (args.new_tokens - 1) / t_dec,
                     "train_step_s": t_train, "train_tok_s": args.batch * args.seq / t_train,
                     "measured_decode_step_bytes": (dec_bytes - one_bytes) / max(args.new_tokens - 1, 1),
                     "measured_train_step_bytes": train_bytes, "predicted": pred}


def verify(rows: list, names, per_node: int) -> list[str]:
    """What is wrong with the rows (empty: nothing; the logits were checked against TP=1 before any timing):
    every layout ran and was timed, and the prediction sends decode traffic between nodes exactly when TP spans
    more than one node."""
    bad = []
    if [r["name"] for r in rows] != list(names):
        bad.append(f"ran {[r['name'] for r in rows]}, asked {list(names)}")
    for r in rows:
        if not (r["decode_tok_s"] > 0 and r["train_tok_s"] > 0):
            bad.append(f"{r['name']}: decode {r['decode_tok_s']} tok/s, training {r['train_tok_s']} tok/s")
        crosses = r["predicted"]["inter_decode_bytes"] > 0
        if crosses != (r["tp"] > per_node):
            bad.append(f"{r['name']}: predicted {r['predicted']['inter_decode_bytes']:,.0f} decode bytes between "
                       f"nodes with TP={r['tp']} and {per_node} ranks per node")
    return bad


def main(argv=None) -> int:
    args = parse_args(argv)
    hostid = topology.split_hosts_from_env()
    ctx = dist.init(timeout_s=args.timeout)
    try:
        ranks = topology.layout(ctx)
        per_node = sum(r["node"] == 0 for r in ranks)
        names = args.layouts or ([f"tp{per_node}xdp{ctx.world // per_node}"] if per_node < ctx.world else []) \
            + [f"tp{ctx.world}"]
        p = netcost.shrunk(args.model, args.layers, args.vocab)
        layouts = [parse_layout(n, ctx.world) for n in names]
        for lay in layouts:
            check_tp_size(p, lay["tp"])
        dist.print0(f"lab3_mistral: world={ctx.world} ({per_node} per node) backend={ctx.backend} {p.name} "
                    f"({p.num_hidden_layers} layers, vocab {p.vocab_size}, {args.dtype}); layouts {names}; "
                    f"NCCL_HOSTID={hostid or 'unset'}")
        path = save_weights(args, ctx, p)
        ref = reference_logits(path, args, ctx, p.vocab_size)
        rows = []
        for lay in layouts:
            r = run_layout(lay, path, ref, args, ctx, p, per_node)
            rows.append(r)
            dist.print0(f"  {r['name']:>8}: logits vs TP=1 rel err {r['logits_rel_err']:.1e}; decode "
                        f"{r['decode_tok_s']:.3g} tok/s, training {r['train_tok_s']:.3g} tok/s")
        if ctx.is_main and args.out:
            from labutils import hardware, results

            doc = {"context": ctx.as_dict(), "ranks": ranks, "rows": rows, "model": dataclasses.asdict(p),
                   "args": vars(args), "fingerprint": hardware.fingerprint()}
            results.atomic_write_bytes(args.out, json.dumps(doc, indent=1, default=str).encode())
            dist.print0(f"wrote {args.out}")
        status = dist.report("lab3_mistral", verify(rows, names, per_node))
        dist.print0("lab3_mistral: OK" if not status else "lab3_mistral: FAILED")
        return status
    finally:
        dist.destroy()


if __name__ == "__main__":
    sys.exit(main())
