"""Pipeline parallelism: a Mistral cut into stages of decoder layers, scheduled by torch.distributed.pipelining.

- ``bubble_fraction(p, m, v)``: the idle share of a step predicted for p stages and m micro-batches,
  (p - 1) / (m + p - 1); interleaving v chunks per rank makes it (p - 1) / (v m + p - 1).
- ``make_model``: a HF Mistral of a preset's shape (layers / vocabulary overridden), sdpa attention
  (causal without a mask), seeded; on the meta device it costs nothing and ``materialize`` fills it.
- ``Stage``: embeddings (first stage), a run of decoder layers, final norm + head (last stage). Each
  stage recomputes the rotary embeddings from the positions: nothing but the hidden states crosses a
  stage boundary (``torch.distributed.pipelining.pipeline()`` cannot trace the HF model, so stages are cut
  by hand and wrapped in ``PipelineStage``).
- ``schedule(kind, stages, m)``: GPipe, 1F1B or Interleaved1F1B from torch.distributed.pipelining.
- ``Recorder``: wraps each stage's ``forward_one_chunk`` / ``backward_one_chunk`` with timestamps on a
  clock shared by all ranks (zeroed right after a barrier; CUDA events on a GPU); ``bubble(events)``
  is idle / span per rank; ``gantt(events)`` draws the busy/idle timeline.
- ``naive_split``: the model spread over GPUs by accelerate's ``device_map`` (one GPU busy at a time).

Used in lab2 §Pipeline parallelism.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from .. import models

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def bubble_fraction(p: int, m: int, v: int = 1) -> float:
    """Predicted idle fraction of a pipelined step: (p-1) / (v*m + p-1) (v = 1: GPipe and 1F1B)."""
    if p < 1 or m < 1 or v < 1:
        raise ValueError(f"bubble_fraction needs p, m, v >= 1 (stages, micro-batches, chunks per rank); "
                         f"got p={p}, m={m}, v={v}")
    return (p - 1) / (v * m + p - 1)


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Consecutive, equal runs of decoder layers, one per stage."""
    if n_stages < 1 or n_layers < n_stages or n_layers % n_stages:
        raise ValueError(f"{n_layers} decoder layers do not split evenly into {n_stages} stages: use a layer "
                         f"count divisible by the stages (ranks x chunks per rank), e.g. {max(n_stages, 1) * 2}")
    k = n_layers // n_stages
    return [range(i * k, (i + 1) * k) for i in range(n_stages)]


def check_microbatches(batch: int, m: int) -> int:
    """Rows per micro-batch; the batch must split into ``m`` equal micro-batches."""
    if m < 1 or batch % m:
        raise ValueError(f"a batch of {batch} rows does not split into {m} equal micro-batches: "
                         f"make the batch a multiple of m (e.g. batch = {max(m, 1)} x rows per micro-batch)")
    return batch // m


def make_model(preset: str, layers: int | None = None, vocab: int | None = None, seed: int = 0,
               dtype=torch.float32, device="cpu"):
    """A seeded ``MistralForCausalLM`` of ``preset``'s shape with ``layers`` / ``vocab`` overridden."""
    from transformers import MistralForCausalLM

    cfg = models.preset(preset).config()
    cfg.num_hidden_layers = layers or cfg.num_hidden_layers
    cfg.vocab_size = vocab or cfg.vocab_size
    cfg._attn_implementation = "sdpa"  # causal with no mask: the stages pass none
    torch.manual_seed(seed)
    with torch.device(device):
        model = MistralForCausalLM(cfg).to(dtype)
    return model


def materialize(module: nn.Module, device, seed: int = 0) -> nn.Module:
    """Give a meta-device module real (random, N(0, 0.02); norms 1) weights on ``device``."""
    module.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():  # works on FSDP2's DTensor shards too
        for name, p in module.named_parameters():
            t = p.to_local() if hasattr(p, "to_local") else p  # a DTensor: fill this rank's shard
            t.fill_(1.0) if "norm" in name else t.normal_(0.0, 0.02)
    for m in module.modules():
        if hasattr(m, "inv_freq"):  # rotary buffers are computed, not stored: recompute them there
            with torch.device(device):
                fresh = type(m)(config=m.config)
            m.inv_freq, m.original_inv_freq = fresh.inv_freq, fresh.original_inv_freq
    return module


class Stage(nn.Module):
    """Decoder layers ``layer_ids`` of ``model`` (copied), plus embeddings / head at the ends."""

    def __init__(self, model, layer_ids: range, *, copy_weights: bool = True):
        super().__init__()
        n = model.config.num_hidden_layers
        src = copy.deepcopy(model) if copy_weights else model
        self.first, self.last, self.layer_ids = layer_ids.start == 0, layer_ids.stop == n, layer_ids
        self.embed = src.model.embed_tokens if self.first else None
        self.layers = nn.ModuleList(src.model.layers[i] for i in layer_ids)
        self.rotary = src.model.rotary_emb  # every stage recomputes cos/sin from the positions
        self.norm = src.model.norm if self.last else None
        self.head = src.lm_head if self.last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.first else x
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        cos_sin = self.rotary(h, pos)
        for layer in self.layers:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
        return self.head(self.norm(h)) if self.last else h

    def ref_name(self, name: str) -> str:
        """The name of this stage's parameter ``name`` in the unpipelined model."""
        head, _, rest = name.partition(".")
        if head == "layers":
            j, _, rest = rest.partition(".")
            return f"model.layers.{self.layer_ids[int(j)]}.{rest}"
        return {"embed": "model.embed_tokens", "norm": "model.norm", "head": "lm_head"}[head] + "." + rest


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch (targets already shifted)."""
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten())


def stage_indices(rank: int, world: int, chunks: int) -> list[int]:
    """Stages held by ``rank``: rank, rank + world, ... (the loop placement Interleaved1F1B expects)."""
    return [rank + c * world for c in range(chunks)]


def schedule(kind: str, stages: list, m: int):
    """A torch.distributed.pipelining schedule over this rank's ``stages`` (PipelineStage objects)."""
    from torch.distributed import pipelining as pp

    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}: one of {', '.join(SCHEDULES)}")
    if kind == "interleaved":
        if len(stages) < 2:
            raise ValueError("interleaved needs >= 2 stages per rank (chunks=2): the layers split into "
                             "ranks x chunks stages")
        return pp.ScheduleInterleaved1F1B(stages, m, loss_fn=loss_fn)
    if len(stages) != 1:
        raise ValueError(f"{kind} runs one stage per rank, got {len(stages)}: use chunks=1")
    cls = pp.ScheduleGPipe if kind == "gpipe" else pp.Schedule1F1B
    return cls(stages[0], m, loss_fn=loss_fn)


# ---------------------------------------------------------------- the timeline
class Clock:
    """Seconds since ``zero()`` (called right after a barrier on every rank): perf_counter or CUDA events."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.zero()

    def zero(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.ref = torch.cuda.Event(enable_timing=True)
            self.ref.record()
        else:
            self.ref = time.perf_counter()

    def now(self):
        if not self.cuda:
            return time.perf_counter() - self.ref
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def seconds(self, t) -> float:
        return self.ref.elapsed_time(t) / 1e3 if self.cuda else t


class Recorder:
    """Timestamps of every forward / backward of every micro-batch of the wrapped stages."""

    def __init__(self, stages: list, device):
        self.clock, self.raw = Clock(device), []
        for st in stages:
            for meth, kind in (("forward_one_chunk", "F"), ("backward_one_chunk", "B"),
                               ("backward_weight_one_chunk", "W")):
                if hasattr(st, meth):
                    setattr(st, meth, self._timed(getattr(st, meth), kind, st.stage_index))

    def _timed(self, fn, kind: str, stage_index: int):
        def timed(chunk, *a, **k):
            t0 = self.clock.now()
            out = fn(chunk, *a, **k)
            self.raw.append((kind, stage_index, int(chunk), t0, self.clock.now()))
            return out
        return timed

    def start(self):
        self.raw = []
        self.clock.zero()

    def events(self) -> list[dict]:
        if self.clock.cuda:
            torch.cuda.synchronize()
        return [{"kind": k, "stage": s, "mb": c, "t0": self.clock.seconds(a), "t1": self.clock.seconds(b)}
                for k, s, c, a, b in self.raw]


def bubble(events_by_rank: list[list[dict]]) -> list[float]:
    """Idle / span per rank; the span runs from the first start to the last end on any rank."""
    every = [e for evs in events_by_rank for e in evs]
    if not every:
        raise ValueError("bubble: no events recorded (was the Recorder started before the step?)")
    span = max(e["t1"] for e in every) - min(e["t0"] for e in every)
    return [1.0 - sum(e["t1"] - e["t0"] for e in evs) / span for evs in events_by_rank]


def gantt(events_by_rank: list[list[dict]], title: str):
    """Busy/idle timeline: one row per rank, forward blue, backward orange, micro-batch numbers on bars."""
    from .. import plots

    fig, ax = plots.figure(title, "time in the step (ms)", "rank", size=(8, 0.6 + 0.55 * len(events_by_rank)))
    t_min = min(e["t0"] for evs in events_by_rank for e in evs)
    colors = {"F": "tab:blue", "B": "tab:orange", "W": "tab:green"}
    for r, evs in enumerate(events_by_rank):
        for e in evs:
            x0, w = (e["t0"] - t_min) * 1e3, (e["t1"] - e["t0"]) * 1e3
            ax.barh(r, w, left=x0, color=colors[e["kind"]], edgecolor="white", height=0.8)
            ax.text(x0 + w / 2, r, str(e["mb"]), ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(len(events_by_rank)))
    ax.invert_yaxis()
    ax.legend(handles=[plt_patch(c, k) for k, c in colors.items() if k != "W"], loc="lower right", fontsize=7)
    return fig


def plt_patch(color, kind):
    from matplotlib.patches import Patch

    return Patch(color=color, label={"F": "forward", "B": "backward", "W": "weight grad"}[kind])


# ---------------------------------------------------------------- naive split (accelerate)
def naive_split(name: str, n_devices: int, dtype=torch.bfloat16) -> dict:
    """Load preset ``name`` spread over ``n_devices`` GPUs by accelerate (``device_map="auto"`` with an equal
    ``max_memory`` each); returns the model and how many modules each device got. On a CPU (or too few
    GPUs) nothing is loaded and ``why`` says what it would do."""
    gpus = torch.cuda.device_count()
    if gpus < 2 or gpus < n_devices:
        return {"ran": False, "why": f"accelerate's device_map splits a model over GPUs; this machine has {gpus} "
                f"(to it a CPU is one device, which cannot be split): on {n_devices} GPUs each would hold "
                f"1/{n_devices} of the layers and they would work one after another (speed-up 1x, memory "
                f"/{n_devices})."}
    from transformers import AutoModelForCausalLM

    found = models.find_weights(name, allow_hub=False)
    path = found[1] if found else str(models.random_weights_dir(name, dtype=dtype, device="cuda:0"))
    per = models.estimate(name).weight_bytes() / n_devices * 1.25 + 2**30  # weights + room for activations
    mem = {i: int(per) for i in range(n_devices)}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", max_memory=mem)
    where: dict[str, int] = {}
    for dev in model.hf_device_map.values():
        where[str(dev)] = where.get(str(dev), 0) + 1
    return {"ran": True, "model": model, "modules_per_device": where, "weights": "real" if found else "random"}
