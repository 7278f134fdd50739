"""lab2: mistral-7b on one device vs TP vs PP - logits checked against TP=1 first, then decode timed.

One launch, in this order (every check printed before anything is timed):
1. the same input on every rank, checked (a checksum all-reduced), and the check shown catching
   deliberately different inputs - whose TP logits come out silently wrong (the error is measured);
2. transformers' own TP (``DistributedConfig(tp_size=...)``) at each ``--hf-tp`` size: logits vs TP=1;
3. decode with ONE path for every layout: ``labutils.lean.LeanMistral`` stepped by ``decode.LeanStepper``
   (compiled with CUDA graphs on GPUs, eager on CPUs) - TP=1 on rank 0, TP=k cut by
   ``parallel.tensor.shard_lean`` over ranks 0..k-1, PP=world with the layers split into stages and the
   hidden state sent rank to rank every token (a naive decode pipeline: one token is in flight, so
   every stage waits for the others: no speed-up at batch 1, only less memory per device).
   For each: teacher-forced logits vs the HF model, then prefill time, tokens/s and per-token latency at
   each ``--batch``, and memory per device.

  CPU, 4 gloo ranks:  python -m labutils.launch --nproc 4 labutils.scripts.lab2_decode -- --out /tmp/decode.json
  4 GPUs, nccl:       python -m labutils.launch --nproc 4 labutils.scripts.lab2_decode -- --out decode.json
                      (full profile: mistral-7b in bf16, batch 1 and 64, compiled steps)
  2 nodes x 4 GPUs, on each node (HEAD = the first node's hostname):
                      python -m torch.distributed.run --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
                          --rdzv-endpoint HEAD:29500 --rdzv-id decode -m labutils.scripts.lab2_decode \\
                          --tp 1 4 8 --out decode.json

Used in lab2 §Tensor parallelism and §mistral-7b across 4 devices.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from labutils import decode, dist, hardware, lean, models, profile, results, timing
from labutils.parallel import comms, memory, tensor
from labutils.timing import rel_err


def _profile():
    """The profile's sizes - but gloo CPU ranks standing in for GPUs always run the small ones."""
    if os.environ.get("SMML_DIST_BACKEND") == "gloo" or not torch.cuda.is_available():
        return profile.get("small")
    return profile.get()


def parse_args(argv=None):
    prof = _profile()
    small = prof.name == "small"
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=prof.big_model, help="labutils.models preset")
    ap.add_argument("--dtype", default="float32" if small else "bfloat16")
    ap.add_argument("--tp", type=int, nargs="+", default=None, help="TP sizes to decode with (default 1 2 world)")
    ap.add_argument("--hf-tp", type=int, nargs="*", default=None,
                    help="transformers TP sizes to check (default 2 world)")
    ap.add_argument("--no-pp", action="store_true", help="skip the PP=world decode")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8] if small else [1, 64], help="decode batch sizes")
    ap.add_argument("--prompt", type=int, default=prof.prompt_tokens, help="prompt length (tokens)")
    ap.add_argument("--new-tokens", type=int, default=prof.new_tokens, help="tokens decoded per timing")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on GPUs only")
    ap.add_argument("--tol", type=float, default=None, help="logits rel_err tolerance (default by dtype)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return ap.parse_args(argv)


def weights_dir(name: str, dtype, ctx) -> str:
    """Real weights if found, else a random build - made on rank 0 alone, then read by all."""
    found = models.find_weights(name, allow_hub=False)
    if found:
        return found[1]
    if ctx.is_main:  # one writer (concurrent builds of the same folder race)
        models.random_weights_dir(name, dtype=dtype, device=ctx.device)
    tdist.barrier()
    return str(models.random_weights_dir(name, dtype=dtype))


def prompt_ids(batch: int, length: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 32000, (batch, length), generator=g).to(device)


# ---------------------------------------------------------------- 1-2: same input, transformers' TP
def hf_tp_checks(path, sizes, ids, ref_logits, dtype, ctx) -> dict:
    out = {"same_input_ok": comms.same_on_all_ranks(ids)}
    bad = prompt_ids(ids.shape[0], ids.shape[1], ctx.device, seed=ctx.rank)  # a different prompt per rank
    out["different_input_caught"] = not comms.same_on_all_ranks(bad)
    try:
        comms.require_same_input(bad)
    except ValueError as e:
        out["different_input_error"] = str(e)
    out["tp"] = []
    for tp in sizes:
        m = tensor.load_hf_tp(path, tp, dtype)
        with torch.no_grad():
            got = m(ids.to(ctx.device)).logits.float()
            wrong = m(bad).logits.float() if tp == sizes[-1] else None
        row = {"tp": tp, "rel_err": rel_err(got, ref_logits)}
        if wrong is not None:
            row["different_inputs_rel_err"] = rel_err(wrong, ref_logits) if ctx.rank == 0 else None
            row["different_inputs_max_abs"] = float((wrong - ref_logits).abs().max()) if ctx.rank == 0 else None
        out["tp"].append(row)
        dist.print0(f"transformers TP={tp}: logits rel_err vs TP=1 {row['rel_err']:.1e}")
        del m
    return out


# ---------------------------------------------------------------- 3: the lean decode path, TP and PP
def pp_stage(model: lean.LeanMistral, rank: int, n: int) -> lean.LeanMistral:
    """Keep this stage's contiguous block of layers (and the embedding on stage 0, the head on the last)."""
    L = len(model.layers)
    if L % n:
        raise ValueError(f"PP={n} does not divide the {L} layers: pick a PP size that divides {L}")
    model.layers = torch.nn.ModuleList(list(model.layers)[rank * L // n:(rank + 1) * L // n])
    if rank != 0:
        model.tok_emb = None
    if rank != n - 1:
        model.output = None
    return model


class PPStepper(decode.LeanStepper):
    """Decode through a pipeline of ``n`` stages: stage 0 embeds, every stage runs its layers and sends
    the hidden state on; the last stage's logits go back to stage 0 (which needs the next token)."""

    def __init__(self, model, batch, max_len, rank, n, compile=False):
        super().__init__(model, batch, max_len, compile=False)
        self.rank, self.n, self.m = rank, n, model

    @torch.no_grad()
    def _run(self, ids, pos):
        m, c = self.m, self.m.c
        B, T = ids.shape
        if self.rank == 0:
            x = m.tok_emb(ids)
        else:
            x = torch.empty(B, T, c.dim, dtype=m.norm.dtype, device=ids.device)
            tdist.recv(x, self.rank - 1)
        cos, sin, mask = m.cos[pos], m.sin[pos], m.mask(pos, x.dtype)
        for b in m.layers:
            x = b(x, cos, sin, mask, pos, m.attn, (m.cos, m.sin))
        logits = torch.empty(B, c.vocab, dtype=x.dtype, device=ids.device)
        if self.rank < self.n - 1:
            tdist.send(x.contiguous(), self.rank + 1)
        else:
            logits = lean.apply(m.output, x, m.norm, c.eps)[:, -1].contiguous()
        if self.rank == self.n - 1 and self.n > 1:
            tdist.send(logits, 0)
        elif self.rank == 0 and self.n > 1:
            tdist.recv(logits, self.n - 1)
        return logits

    def prefill(self, ids):
        return self._run(ids, torch.arange(ids.shape[1], device=ids.device))

    def step(self, tok, pos):
        return self._run(tok, pos)


def live_bytes(model, device) -> dict:
    if device.type == "cuda":
        return {"bytes": torch.cuda.max_memory_allocated(device), "how": "torch.cuda.max_memory_allocated"}
    ts = list(model.parameters()) + [b for b in model.buffers() if b is not None]
    return {"bytes": memory.tensor_bytes(ts), "how": "bytes of the live parameter and buffer tensors (CPU)"}


def lean_model(path, dtype, device) -> lean.LeanMistral:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device))
    return lean.LeanMistral.from_hf(hf)  # q/k/v and gate/up fused; the HF model is dropped


def timed_decode(stepper, ids, new_tokens, device) -> dict:
    """Greedy decode twice (the first holds compilation), the second timed per token."""
    with timing.stopwatch(device) as first:  # compiled: the whole length (graphs per shape); eager: 2 tokens
        decode.loop_generate(stepper, ids, new_tokens if getattr(stepper, "compiled", False) else 2)
    clock = timing.TokenClock(device)
    decode.loop_generate(stepper, ids, new_tokens, clock)
    marks = clock.seconds()
    itl = timing.stats([b - a for a, b in zip(marks, marks[1:])])
    B = ids.shape[0]
    return {"batch": B, "prefill_s": marks[0], "itl_p50_s": itl.p50, "itl_p20_s": itl.p20, "itl_p80_s": itl.p80,
            "tok_s": B * (len(marks) - 1) / (marks[-1] - marks[0]), "first_run_s": first.seconds}


def run_layout(kind, k, a, path, dt, ctx, check) -> dict | None:
    """One layout (``kind`` "tp" or "pp" over ``k`` ranks): build, check the logits, time each batch."""
    group = tdist.new_group(list(range(k))) if k > 1 else None  # every rank takes part in new_group
    result = None
    if ctx.rank < k:
        m = lean_model(path, dt, ctx.device)
        if kind == "tp" and k > 1:
            tensor.shard_lean(m, group)
        if kind == "pp":
            pp_stage(m, ctx.rank, k)
        if ctx.device.type == "cuda":  # the peak from here on: this rank's share, its caches, the decode
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(ctx.device)
        compiled = a.compile == "on" or (a.compile == "auto" and ctx.device.type == "cuda")
        make = (lambda B: PPStepper(m, B, a.prompt + a.new_tokens, ctx.rank, k)) if kind == "pp" else \
            (lambda B: decode.LeanStepper(m, B, a.prompt + a.new_tokens, compile=compiled))
        prompt, forced, ref, tol = check
        logits = decode.teacher_forced(make(prompt.shape[0]), prompt, forced)
        err = rel_err(logits, ref) if ctx.rank == 0 else 0.0
        if not err <= tol:
            raise RuntimeError(f"{kind.upper()}={k}: logits differ from TP=1 by {err:.2e} > tolerance {tol:.0e}")
        runs = [timed_decode(make(B), prompt_ids(B, a.prompt, ctx.device), a.new_tokens, ctx.device) for B in a.batch]
        mem = torch.tensor([float(live_bytes(m, ctx.device)["bytes"])], dtype=torch.float64, device=ctx.device)
        if group is not None:
            tdist.all_reduce(mem, op=tdist.ReduceOp.MAX, group=group)
        result = {"layout": f"{kind.upper()}={k}", "kind": kind, "ranks": k, "rel_err": err, "tol": tol,
                  "compiled": compiled and kind == "tp", "runs": runs, "max_bytes_per_device": float(mem.item()),
                  "memory_how": live_bytes(m, ctx.device)["how"]}
        dist.print0(f"{result['layout']}: logits rel_err vs HF TP=1 {err:.1e} (tol {tol:.0e}); "
                    + "; ".join(f"batch {r['batch']}: {r['tok_s']:.1f} tok/s" for r in runs))
        del m
    tdist.barrier()
    return result


def verify(rec: dict, tol: float, hf_sizes, layouts) -> list[str]:
    """What is wrong with rank 0's record (empty: nothing): the same-input check passes and catches different
    inputs (whose logits come out silently wrong), transformers' TP and every lean layout match TP=1, every
    batch was timed, and a device holds less under PP than under TP, and less under TP than alone."""
    hf, bad = rec["hf_tp"], []
    if not (hf["same_input_ok"] and hf["different_input_caught"]
            and "differ between ranks" in hf.get("different_input_error", "")):
        bad.append(f"the same-input check: same {hf['same_input_ok']}, different caught "
                   f"{hf['different_input_caught']} ({hf.get('different_input_error')!r})")
    if [r["tp"] for r in hf["tp"]] != list(hf_sizes):
        bad.append(f"transformers TP ran {[r['tp'] for r in hf['tp']]}, asked {list(hf_sizes)}")
    for r in hf["tp"]:
        if not r["rel_err"] <= tol:
            bad.append(f"transformers TP={r['tp']}: logits rel err {r['rel_err']:.2e} > {tol:g} against TP=1")
    if hf["tp"] and not (hf["tp"][-1].get("different_inputs_rel_err") or 0) > 0.1:
        bad.append("different inputs per rank did not change the logits: the demonstration shows nothing")
    rows = {r["layout"]: r for r in rec["decode"]}
    if sorted(rows) != sorted(f"{k.upper()}={n}" for k, n in layouts):
        bad.append(f"layouts run {sorted(rows)}, asked {sorted(f'{k.upper()}={n}' for k, n in layouts)}")
    for name, r in rows.items():
        if [x["batch"] for x in r["runs"]] != list(rec["batches"]) or not all(x["tok_s"] > 0 for x in r["runs"]):
            bad.append(f"{name}: batches {[(x['batch'], x['tok_s']) for x in r['runs']]}, asked {rec['batches']}")
    w = rec["world"]
    mem = [rows[k]["max_bytes_per_device"] for k in (f"PP={w}", f"TP={w}", "TP=1") if k in rows]
    if len(mem) == 3 and not mem[0] < mem[1] < mem[2]:
        bad.append(f"bytes per device PP={w} {mem[0]:.3g}, TP={w} {mem[1]:.3g}, TP=1 {mem[2]:.3g}: expected "
                   "PP < TP < one device (TP keeps the embedding and head whole)")
    return bad


def main(argv=None):
    a = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    ctx = dist.init(timeout_s=1800.0)  # idle ranks wait while rank 0 loads and compiles alone (TP=1)
    if ctx.backend == "gloo" and profile.get().name == "full":
        dist.print0("gloo CPU ranks stand in for GPUs here: running the small profile's sizes")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    dt, world = getattr(torch, a.dtype), ctx.world
    tp_sizes = a.tp or sorted({1, min(2, world), world})
    hf_sizes = [t for t in (a.hf_tp if a.hf_tp is not None else sorted({2, world})) if 1 < t <= world]
    tol = a.tol or decode.LOGIT_TOL[a.dtype]  # lab4's tolerances: bf16 reorders sums (5e-2 on random weights)
    path = weights_dir(a.model, dt, ctx)
    from transformers import AutoConfig, AutoModelForCausalLM

    for t in tp_sizes + hf_sizes:
        tensor.check_tp_size(AutoConfig.from_pretrained(path), t)  # before anything is loaded
    ids = prompt_ids(1, a.prompt, ctx.device)
    forced = prompt_ids(1, 4, ctx.device, seed=123)
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, device_map=str(ctx.device)).eval()
    with torch.no_grad():
        ref_logits = ref_model(ids).logits.float()
    ref_forced = decode.reference_logits(ref_model, ids, forced)
    del ref_model
    rec = {"world": world, "backend": ctx.backend, "device": str(ctx.device), "model": a.model, "dtype": a.dtype,
           "prompt": a.prompt, "new_tokens": a.new_tokens, "batches": a.batch}
    rec["hf_tp"] = hf_tp_checks(path, hf_sizes, ids, ref_logits, dt, ctx)
    layouts = [("tp", k) for k in tp_sizes] + ([] if a.no_pp or world == 1 else [("pp", world)])
    rec["decode"] = [r for r in (run_layout(kind, k, a, path, dt, ctx, (ids, forced, ref_forced, tol))
                                 for kind, k in layouts) if r is not None or ctx.rank != 0]
    rec["problems"] = verify(rec, tol, hf_sizes, layouts) if ctx.is_main else []
    dist.report("lab2_decode", rec["problems"])
    if ctx.is_main and a.out:
        rec["fingerprint"] = hardware.fingerprint()
        results.atomic_write_bytes(a.out, json.dumps(rec, indent=1).encode())
    dist.destroy()
    dist.print0("lab2_decode: OK" if not rec["problems"] else "lab2_decode: FAILED")
    return rec


if __name__ == "__main__":
    sys.exit(1 if main()["problems"] else 0)
