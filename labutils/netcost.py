"""What the network costs a training or decode step, predicted from the alpha-beta fits.

- DDP: gradients all-reduced in buckets (``ddp_buckets`` reproduces DDP's split when the job does not
  report it); ``predict_ddp`` gives the communication time if nothing overlapped (sum over buckets of
  alpha + 2(n-1)/n * bytes * beta) and the least that must stay exposed (the last bucket, and
  whatever exceeds the backward pass it hides behind).
- TP / DP / PP layouts of a Mistral model over two nodes: ``layout_traffic`` counts the bytes each
  layout puts on the inter-node link per decoded token and per training step (Megatron TP: two
  all-reduces of the activations per layer forward, two more backward; DP: one all-reduce of the
  gradients per step; PP: the activations at a stage boundary, forward and backward).
- ``plot_ddp``: compute and exposed communication per layout, stacked, with the prediction.

Used in lab3 §Networking overhead of training, §mistral-7b over 8 ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

from .collectives import AlphaBeta, busbw_factor


def ddp_buckets(param_bytes: Sequence[int], cap_bytes: int, first_bytes: int = 2**20) -> list[int]:
    """DDP's bucket sizes: parameters in reverse order, the first bucket capped at ``first_bytes``."""
    buckets, cur, cap = [], 0, first_bytes
    for b in reversed(list(param_bytes)):
        cur += b
        if cur >= cap:
            buckets.append(cur)
            cur, cap = 0, cap_bytes
    return buckets + ([cur] if cur else [])


def predict_ddp(bucket_bytes: Sequence[int], fit: AlphaBeta, backward_s: float | None = None) -> dict:
    """Communication of one DDP step on the group ``fit`` was measured on (all_reduce fit)."""
    per = [float(fit.predict(b)) for b in bucket_bytes]
    comm = sum(per)
    exposed = max(per[-1], comm - backward_s) if backward_s is not None else per[-1]
    return {"buckets": len(per), "grad_bytes": int(sum(bucket_bytes)), "comm_s": comm,
            "exposed_min_s": exposed, "alpha_part_s": len(per) * fit.alpha_s, "group_world": fit.world}


def _allreduce_bytes(nbytes: float, ranks: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``nbytes``: 2(n-1)/n x nbytes."""
    return busbw_factor("all_reduce", ranks) * nbytes if ranks > 1 else 0.0


def layout_traffic(cfg, layout: dict, tokens: int, dtype_bytes: int, per_node: int) -> dict:
    """Bytes per node that cross the inter-node link for ``tokens`` tokens (decode: 1 per sequence).

    ``layout``: {"tp": T, "dp": D, "pp": P}. TP groups that span nodes (T > per_node) all-reduce the
    hidden state (tokens x hidden) twice per layer forward; a ring over two nodes crosses the link in
    both directions, so each node sends 2(n-1)/n x bytes x (its share of the ring's crossings) -- with
    rings of ranks 0..T-1 the crossing carries the whole ring's per-rank volume. DP across nodes
    all-reduces the gradients once per step; PP across nodes sends tokens x hidden per boundary.
    """
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    tp, dp, pp = layout.get("tp", 1), layout.get("dp", 1), layout.get("pp", 1)
    act = tokens * h * dtype_bytes
    out = {"layout": f"TP={tp} x DP={dp} x PP={pp}", "decode_fwd_bytes": 0.0, "train_step_bytes": 0.0}
    if tp > per_node:  # the TP ring crosses the link: every all-reduce's per-rank volume goes over it
        fwd = 2 * layers * _allreduce_bytes(act, tp)
        out["decode_fwd_bytes"] += fwd
        out["train_step_bytes"] += 2 * fwd  # forward and backward
    if dp > 1 and tp * pp <= per_node:  # replicas on different nodes: gradients cross once per step
        params = _params(cfg) / (tp * pp)
        out["train_step_bytes"] += _allreduce_bytes(params * dtype_bytes, dp)
    if pp > 1 and tp <= per_node:  # one stage per node: the boundary's activations cross
        out["decode_fwd_bytes"] += act
        out["train_step_bytes"] += 2 * act
    return out


def _params(cfg) -> float:
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return cfg.num_hidden_layers * per_layer + 2 * cfg.vocab_size * h + h


def shrunk(name: str, layers: int = 0, vocab: int = 0):
    """The models preset ``name`` with fewer layers / a smaller vocabulary (0 keeps the preset's)."""
    import dataclasses

    from . import models

    p = models.preset(name)
    return dataclasses.replace(p, num_hidden_layers=layers or p.num_hidden_layers, vocab_size=vocab or p.vocab_size)


def param_bytes(cfg, dtype_bytes: int) -> list[int]:
    """Bytes of every parameter of a Mistral with config ``cfg``, in registration order (built on meta)."""
    import torch
    from transformers import MistralForCausalLM

    with torch.device("meta"):
        model = MistralForCausalLM(cfg)
    return [p.numel() * dtype_bytes for p in model.parameters()]


def plot_ddp(rows: Sequence[dict], *, device: str):
    """Stacked bars: compute and exposed communication per configuration; the predicted exposed minimum
    and the no-overlap communication as markers."""
    from . import plots

    fig, ax = plots.figure(f"DDP step: compute vs exposed communication ({device})", "", "seconds per step")
    xs = range(len(rows))
    comp = [r["compute_s"] for r in rows]
    exposed = [max(r["ddp_s"] - r["compute_s"], 0.0) for r in rows]
    ax.bar(xs, comp, color="tab:blue", label="compute (no_sync)")
    ax.bar(xs, exposed, bottom=comp, color="tab:orange", label="exposed communication")
    for x, r in zip(xs, rows):
        if r.get("pred_comm_s") is not None:
            ax.plot([x], [r["compute_s"] + r["pred_comm_s"]], "k_", ms=30, mew=2,
                    label="predicted: no overlap" if x == 0 else None)
            ax.plot([x], [r["compute_s"] + r["pred_exposed_min_s"]], "r_", ms=30, mew=2,
                    label="predicted: best overlap" if x == 0 else None)
    ax.set_xticks(list(xs), [r["config"] for r in rows])
    ax.legend(fontsize=8)
    return fig
