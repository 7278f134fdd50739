"""Memory of a decoder model, predicted: weights, gradients, optimizer state, KV cache, activations, per rank.

Everything is a formula over a ``Shape`` (from a ``labutils.models`` preset) that other modules call:

- ``training_bytes_per_param``: mixed-precision Adam = 2 (bf16 weights) + 2 (bf16 grads) + 4 (fp32 master)
  + 8 (fp32 Adam m and v) = 16 bytes per parameter.
- ``per_rank_training_bytes(n_params, world, stage)``: DDP (stage 0) and ZeRO-1/2/3 (Rajbhandari et al.):
  which of params / grads / optimizer state is divided by the world size.
- ``per_rank_weight_bytes(shape, tp=, pp=)``: a model's weights on the busiest rank under TP and PP.
- ``kv_cache_bytes``, ``activation_terms`` (saved for backward, per token per layer, with and without
  activation checkpointing), ``require_fits`` (too little memory -> ValueError saying what to change).
- ``saved_bytes(fn)``: the bytes autograd actually saves while ``fn`` runs (the CPU read-back).

Used in lab2 §Why one device is not enough (and lab2 §Data parallelism for the ZeRO formulas).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from .. import models

GB = 1e9
STAGES = (0, 1, 2, 3)  # 0 = DDP (everything replicated), 1/2/3 = ZeRO stages


@dataclass(frozen=True)
class Shape:
    name: str
    n_params: int
    embed_params: int  # the input embedding table
    head_params: int  # the output projection (lm_head)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def layer_params(self) -> int:
        return (self.n_params - self.embed_params - self.head_params - self.hidden) // self.layers


def shape(name: str) -> Shape:
    """The sizes of preset ``name`` (parameter counts from ``models.estimate``)."""
    p, e = models.preset(name), models.estimate(name)
    return Shape(name, e.total_params, e.params["embeddings"], e.params["head"], p.num_hidden_layers,
                 p.hidden_size, p.num_attention_heads, p.num_key_value_heads, e.head_dim, p.intermediate_size,
                 p.vocab_size)


# ---------------------------------------------------------------- training state
def training_bytes_per_param(weight: int = 2, grad: int = 2, master: int = 4, adam: int = 8) -> dict:
    """Bytes per parameter of mixed-precision Adam training, by kind (the defaults sum to 16)."""
    return {"weights": weight, "grads": grad, "master": master, "adam_m_v": adam,
            "total": weight + grad + master + adam}


def per_rank_training_bytes(n_params: int, world: int, stage: int, *, weight: int = 2, grad: int = 2,
                            optim: int = 12) -> dict:
    """Bytes per rank of params, grads and optimizer state (``optim`` = fp32 master + Adam m, v).

    stage 0 (DDP): all replicated; ZeRO-1: optimizer state sharded; ZeRO-2: + gradients; ZeRO-3 (FSDP):
    + parameters. Transient buffers (all-gathered layers, communication buckets) are not counted.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} (0 = DDP, 1/2/3 = ZeRO), got {stage!r}")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    w, g, o = n_params * weight, n_params * grad, n_params * optim
    out = {"params": w / world if stage >= 3 else w, "grads": g / world if stage >= 2 else g,
           "optimizer": o / world if stage >= 1 else o}
    return out | {"total": sum(out.values()), "stage": stage, "world": world}


def per_rank_weight_bytes(s: Shape, tp: int = 1, pp: int = 1, dtype_bytes: float = 2,
                          vocab_parallel: bool = False) -> float:
    """Weight bytes on the busiest rank: decoder layers split by ``tp`` (Megatron columns/rows) and by
    ``pp`` (contiguous stages); embedding and head replicated over TP unless ``vocab_parallel``;
    under PP the first stage holds the embedding, the last the head (the larger of the two counts)."""
    check_divides(s, tp)
    if s.layers % pp:
        raise ValueError(f"pp={pp} does not divide {s.layers} layers: pick a PP size that divides it")
    vocab_div = tp if vocab_parallel else 1
    layers = s.layers // pp * s.layer_params / tp
    ends = (s.embed_params + s.head_params + s.hidden) if pp == 1 else max(s.embed_params, s.head_params + s.hidden)
    return (layers + ends / vocab_div) * dtype_bytes


def check_divides(s: Shape, tp: int) -> None:
    """TP shards whole heads: ``tp`` must divide the heads AND the KV heads (and the FFN width)."""
    for what, n in (("attention heads", s.heads), ("KV heads", s.kv_heads), ("intermediate size", s.ffn)):
        if tp < 1 or n % tp:
            ok = [d for d in range(1, s.heads + 1) if s.heads % d == 0 and s.kv_heads % d == 0 and s.ffn % d == 0]
            raise ValueError(f"TP size {tp} does not divide the {n} {what} of {s.name}: use one of {ok}")


# ---------------------------------------------------------------- inference state and activations
def kv_cache_bytes(s: Shape, tokens: int, batch: int = 1, dtype_bytes: float = 2, tp: int = 1) -> float:
    """K and V of every layer: 2 * layers * kv_heads * head_dim values per token, split over ``tp``."""
    return 2 * s.layers * s.kv_heads * s.head_dim * dtype_bytes * tokens * batch / tp


def activation_terms(s: Shape, seq: int, dtype_bytes: float = 2, flash: bool = True) -> dict:
    """Bytes one decoder layer saves for backward per token, by tensor (a Mistral layer as HF writes it).

    ``flash=False`` adds the softmax probabilities (heads x seq per token: what eager / math attention
    keeps; flash attention recomputes them). With activation checkpointing a layer keeps only its
    input (``hidden`` values per token) and recomputes the rest in backward."""
    h, kv, f, b = s.hidden, s.kv_heads * s.head_dim, s.ffn, dtype_bytes
    terms = {"norm inputs+outputs (2 norms)": 4 * h * b, "q, k, v (after RoPE)": (h + 2 * kv) * b,
             "attention output": h * b, "gate, up, silu(gate), product": 4 * f * b}
    if not flash:
        terms["softmax probabilities"] = s.heads * seq * b
    return terms


def activation_bytes(s: Shape, tokens: int, seq: int, dtype_bytes: float = 2, checkpoint: bool = False,
                     flash: bool = True) -> float:
    """Activations of all layers for ``tokens`` tokens (batch x seq) in training."""
    per = s.hidden * dtype_bytes if checkpoint else sum(activation_terms(s, seq, dtype_bytes, flash).values())
    return per * s.layers * tokens


def max_batch(s: Shape, capacity: float, seq: int, world: int = 1, stage: int = 0, dtype_bytes: float = 2,
              checkpoint: bool = False, flash: bool = True, reserve: float = 0.0) -> int:
    """The largest batch of ``seq``-token sequences whose training step is predicted to fit in ``capacity``."""
    static = per_rank_training_bytes(s.n_params, world, stage)["total"] + reserve
    per_seq = activation_bytes(s, seq, seq, dtype_bytes, checkpoint, flash) + seq * s.vocab * 4 * 2  # + fp32 logits, grad
    return max(int((capacity - static) // per_seq), 0)


def require_fits(needed: float, capacity: float, what: str, fix: str) -> None:
    """Raise ValueError when ``needed`` bytes exceed ``capacity``, saying by how much and what to change."""
    if needed > capacity:
        raise ValueError(f"{what} needs {needed / GB:.1f} GB per device, but a device has {capacity / GB:.1f} GB: "
                         f"{fix}")


def table(s: Shape, seq: int = 4096, batch: int = 1, world: int = 4) -> list[dict]:
    """The predicted memory of ``s`` as rows (what, GB): the table lab2 opens with."""
    tp = training_bytes_per_param()
    rows = [{"what": f"{k} ({v} B/param)", "GB": s.n_params * v / GB} for k, v in tp.items()]
    rows.append({"what": f"KV cache, 1 token (bf16)", "GB": kv_cache_bytes(s, 1) / GB})
    rows.append({"what": f"KV cache, batch {batch} x {seq} tokens", "GB": kv_cache_bytes(s, seq, batch) / GB})
    for ckpt in (False, True):
        rows.append({"what": f"activations, batch {batch} x {seq}, {'with' if ckpt else 'no'} checkpointing",
                     "GB": activation_bytes(s, batch * seq, seq, checkpoint=ckpt) / GB})
    for st in STAGES:
        rows.append({"what": f"training state per rank, {'DDP' if st == 0 else f'ZeRO-{st}'}, {world} ranks",
                     "GB": per_rank_training_bytes(s.n_params, world, st)["total"] / GB})
    rows.append({"what": f"bf16 weights per rank, TP={world}", "GB": per_rank_weight_bytes(s, tp=world) / GB})
    rows.append({"what": f"bf16 weights per rank, PP={world}", "GB": per_rank_weight_bytes(s, pp=world) / GB})
    return rows


# ---------------------------------------------------------------- read-back
def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (a view of a counted storage is not counted again)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


@contextmanager
def saving_tracker(exclude=()):
    """Inside the block, every tensor autograd saves for backward is recorded in ``found`` (a list);
    storages of ``exclude`` (the parameters) are left out: they are weights, not activations."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    found: list = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            found.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield found
