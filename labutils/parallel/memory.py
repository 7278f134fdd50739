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


def logits_bytes(s: Shape, tokens: int, dtype_bytes: float = 4) -> float:
    """The fp32 logits the loss keeps for backward (tokens x vocab): at a short sequence, more than a layer."""
    return tokens * s.vocab * dtype_bytes


def max_batch(s: Shape, capacity: float, seq: int, world: int = 1, stage: int = 0, dtype_bytes: float = 2,
              checkpoint: bool = False, flash: bool = True, reserve: float = 0.0) -> int:
    """The largest batch of ``seq``-token sequences whose training step is predicted to fit in ``capacity``."""
    static = per_rank_training_bytes(s.n_params, world, stage)["total"] + reserve
    per_seq = activation_bytes(s, seq, seq, dtype_bytes, checkpoint, flash) + 2 * logits_bytes(s, seq)  # + their grad
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
    rows.append({"what": "KV cache, 1 token (bf16)", "GB": kv_cache_bytes(s, 1) / GB})
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


# ---------------------------------------------------------------- one training step, measured
def measure_training_step(name: str, batch: int, seq: int, device, dtype=torch.float32) -> dict:
    """One AdamW step of preset ``name`` (random weights) on ``batch`` x ``seq`` tokens: what it held.

    GPU: ``torch.cuda.max_memory_allocated`` over the step. CPU: the bytes of the live tensors -
    parameters, gradients, optimizer state - plus the activations autograd saved (``saving_tracker``)."""
    from transformers import MistralForCausalLM

    dev = torch.device(device)
    torch.manual_seed(0)
    with torch.device(dev):
        model = MistralForCausalLM(models.preset(name).config()).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    params = list(model.parameters())
    with saving_tracker(exclude=params) as saved:
        loss = model(input_ids=ids, labels=ids).loss
    act = tensor_bytes(saved)
    saved.clear()
    loss.backward()
    opt.step()
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    out = {"params": tensor_bytes(params), "grads": tensor_bytes(p.grad for p in params),
           "optimizer": tensor_bytes(state), "activations_saved": act, "batch": batch, "seq": seq,
           "device": str(dev), "dtype": str(dtype).removeprefix("torch.")}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return out | {"peak": torch.cuda.max_memory_allocated(dev), "how": "torch.cuda.max_memory_allocated"}
    return out | {"peak": out["params"] + out["grads"] + out["optimizer"] + act,
                  "how": "bytes of live tensors: params + grads + Adam state + saved activations (CPU)"}


def oom_boundary(name: str, seq: int, device, dtype=torch.bfloat16, start: int = 1, limit: int = 4096) -> dict:
    """The largest batch whose training step fits on one GPU: doubling, then bisection, catching OOM."""
    def fits(b: int) -> bool:
        try:
            measure_training_step(name, b, seq, device, dtype)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    if not fits(start):
        return {"largest_batch": 0, "seq": seq, "tried": [start]}
    lo, hi = start, start * 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"largest_batch": lo, "seq": seq}


def predict_step(name: str, batch: int, seq: int, dtype_bytes: int, flash: bool) -> dict:
    """What ``measure_training_step`` should find: plain AdamW keeps 2 moments in the parameters' dtype."""
    s = shape(name)
    act = activation_bytes(s, batch * seq, seq, dtype_bytes, flash=flash) + logits_bytes(s, batch * seq)
    out = {"params": s.n_params * dtype_bytes, "grads": s.n_params * dtype_bytes,
           "optimizer": 2 * s.n_params * dtype_bytes, "activations_saved": act}
    return out | {"peak": sum(out.values())}


def compare_rows(pred: dict, measured: dict) -> list[dict]:
    """Predicted beside measured, in MB, one row per kind of memory."""
    return [{"what": k if k != "peak" else f"peak ({measured['how']})", "predicted MB": v / 1e6,
             "measured MB": measured[k] / 1e6, "measured / predicted": measured[k] / v} for k, v in pred.items()]
