"""What the network costs a training or decode step, predicted from the alpha-beta fits.

- DDP: gradients all-reduced in buckets (``ddp_buckets`` reproduces DDP's split when the job does not
  report it); ``predict_ddp`` gives the communication time if nothing overlapped (sum over buckets of
  alpha + 2(n-1)/n * bytes * beta) and the least that must stay exposed (the last bucket, and
  whatever exceeds the backward pass it hides behind).
- TP x DP layouts of a Mistral model over nodes: ``layout_traffic`` counts the bytes each layout sends
  per decode step and per training step, in all and across the node boundary (TP: all-reduces of the
  activations in every layer; DP: one all-reduce of the gradients per step).
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


def layout_traffic(cfg, layout: dict, per_node: int, dtype_bytes: int, batch: int, seq: int,
                   bwd_allreduces_per_layer: int = 5) -> dict:
    """Bytes a layout sends per decode step (``batch`` tokens) and per training step (``batch`` x ``seq``).

    ``layout`` = {"tp": T, "dp": D}, TP innermost (a TP group is T neighbouring ranks; ``per_node`` ranks per
    node). transformers' Mistral TP plan: q/k/v/gate/up column-, o/down row-parallel, lm_head column-parallel
    with its logits gathered. Forward: 2 all-reduces of (tokens x hidden) per layer and one all-gather of the
    logits; backward: one all-reduce of the input gradient per column-parallel linear (q, k, v, gate, up: 5
    per layer, each has its own DTensor input; Megatron's fused layers need 2) plus lm_head's. DP: one
    all-reduce of each rank's gradient shard per step. Ring volumes: all-reduce 2(n-1)/n x S sent per rank,
    all-gather (n-1)/n x S. ``total_*``: every rank's sends (every link); ``inter_*``: what crosses between
    nodes, both directions added.
    """
    h, layers, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    tp, dp = layout.get("tp", 1), layout.get("dp", 1)
    ar, ag = busbw_factor("all_reduce", tp), busbw_factor("all_gather", tp)
    span = max(1, -(-tp // per_node))  # nodes one TP group spans
    out = {"layout": f"TP={tp} x DP={dp}"}
    for kind, tokens, fwd_only in (("decode", batch // dp, True), ("train", batch // dp * seq, False)):
        act, logits = tokens * h * dtype_bytes, tokens * v * dtype_bytes
        n_ar = 2 * layers + (0 if fwd_only else bwd_allreduces_per_layer * layers + 1)
        per_rank = n_ar * ar * act + ag * logits if tp > 1 else 0.0
        total = per_rank * tp * dp
        inter = per_rank * span * dp if span > 1 else 0.0  # a ring over k nodes has k node-crossing edges
        if not fwd_only and dp > 1:
            grad = _params(cfg) * dtype_bytes / tp  # each rank's shard
            dp_sent = busbw_factor("all_reduce", dp) * grad * tp * dp
            total += dp_sent
            inter += dp_sent if tp <= per_node else 0.0
        out |= {f"total_{kind}_bytes": total, f"inter_{kind}_bytes": inter, f"tp_allreduces_{kind}": n_ar}
    return out


def explain_ddp(row: dict) -> str:
    """One sentence on a ``ddp_overhead`` row: how much of the communication the backward pass hid."""
    exposed, comm = row["ddp_s"] - row["compute_s"], row["comm_s"]
    spread = (row["compute_p80_s"] - row["compute_p20_s"]) / row["compute_s"]
    head = f"{row['config']} ({row['ranks']} ranks): exposed {exposed * 1e3:.3g} ms vs comm alone {comm * 1e3:.3g} ms"
    if abs(exposed) < spread * row["compute_s"]:
        return head + f" - within the compute time's own spread ({spread:.0%}): not readable on this run"
    if exposed > comm:
        return head + " - overlap cost more than it hid: communication and backward slowed each other down"
    return head + f" - the backward pass hid {1 - exposed / comm:.0%} of the all-reduce"


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
