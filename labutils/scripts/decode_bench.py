"""The lab4 decode ladder as one script: every rung checked against the HF model's logits, then timed.

Rungs: a = HF ``generate`` eager (dynamic cache); b = ``generate`` with a static cache, not
compiled; c = HF forward compiled (reduce-overhead: CUDA graphs) in a static-cache loop; d = the
lean model (labutils.lean.LeanMistral), compiled with coordinate-descent tuning; d0 = the same
without it; e = the lean model with int8 weights (``--int8``: an Int8Linear implementation, default
the Triton kernel of labutils.kernels.gemv, or "auto": the fastest in a one-matrix kernel test, whose table is
printed). A lean rung may name its attention and its linear kernel: ``d:sdpa``, ``d:reduce:triton``
(bf16 weights through the Triton kernel, norms and residuals fused in; ``triton_plain``: not fused),
``e:reduce:dequant`` (see labutils.lean.ATTN, quant.IMPLS). Library rungs (quant.LIBRARY) are int8 rungs
whose kernel is a library's: ``e:reduce:int8pack`` (PyTorch's ``torch._weight_int8pack_mm``) and
``e:reduce:torchao`` (torchao's ``quantize_`` with ``Int8WeightOnlyConfig``; if torchao cannot be imported the
rung records why and runs ``e:reduce:dequant``, the same maths in plain torch). Every rung's label names
what ran: "compiled" or "eager", and "plain torch" where a Triton kernel was asked for but cannot run.
A fourth field ``nopdl`` runs the rung with
no kernel launched by programmatic dependent launch (``e:triton:triton:nopdl``, for an A/B of PDL).
Layers run by the Triton kernel are tuned per weight shape first (printed; the time is reported apart).
``--profile`` lists rungs to profile kernel by kernel after timing them. Prints one table (tok/s,
MBU, ms/token p50/p99, warm-up, first use = compile) and writes everything as JSON.

    python -m labutils.scripts.decode_bench                          # CPU: mistral-7b-small, eager rungs
    python -m labutils.scripts.decode_bench --model mistral-7b       # 1 GPU: the 7B, random weights
    python -m labutils.scripts.decode_bench --rungs d,e --sweep 1,8,64 --out decode.json
    python -m labutils.scripts.decode_bench --rungs d:sdpa,d:reduce --profile d:sdpa,d:reduce --sweep ''
    python -m labutils.scripts.decode_bench --model mistral-7b \
        --rungs d:triton:triton,e:triton,e:reduce:int8pack,e:reduce:torchao --sweep ''   # library rungs beside

Multi-GPU or multi-node runs do not apply: batch-1 decode is a one-device problem here.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import torch

from labutils import decode, hardware, lean, models, plots, quant, results, roofline, timing
from labutils import profile as _profile
from labutils.kernels import _triton, gemv_tune

RUNGS = ("a", "b", "c", "d", "e", "d0")
NAMES = {"a": "a: HF generate, dynamic cache", "b": "b: HF generate, static cache", "c": "c: HF forward, own loop",
         "d": "d: lean", "e": "e: lean int8", "d0": "d0: lean, no coord. descent"}



def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    prof = _profile.get()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=prof.big_model, help="labutils.models preset (default: %(default)s)")
    ap.add_argument("--prompt", type=int, default=prof.prompt_tokens, help="prompt tokens (default: %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=prof.new_tokens, help="new tokens (default: %(default)s)")
    ap.add_argument("--slow-tokens", type=int, default=32, help="new tokens for rungs a, b (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=3, help="timed generations per rung (default: %(default)s)")
    ap.add_argument("--rungs", default="a,b,c,d,e,e:reduce:int8pack,e:reduce:torchao",
                    help="comma list (default: %(default)s; the last two are the library rungs)")
    ap.add_argument("--sweep", default=",".join(map(str, prof.batch_sweep)), help="batch sizes ('' = none)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on a GPU only")
    ap.add_argument("--int8", choices=("auto", *quant.IMPLS), default="triton",
                    help="Int8Linear implementation; auto: the fastest in a one-matrix test (default: %(default)s)")
    ap.add_argument("--tol", type=float, nargs=2, default=(decode.LOGIT_TOL["bfloat16"], decode.INT8_TOL),
                    metavar=("BF16", "INT8"),
                    help="relative logit error allowed (default: %(default)s)")
    ap.add_argument("--profile", default="", help="comma list of rungs to profile kernel by kernel")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip the stages left after this many seconds")
    ap.add_argument("--out", default="", help="write the JSON here (default: results dir via labutils.results)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    dev = hardware.default_device()
    comp = args.compile == "on" or (args.compile == "auto" and dev.type == "cuda")
    rec: dict = {"args": vars(args), "device": hardware.describe().name, "stages_s": {}, "runs": {}, "checks": {}}

    def save():
        if args.out:
            results.atomic_write_bytes(__import__("pathlib").Path(args.out), json.dumps(
                results._jsonable(rec | {"fingerprint": hardware.fingerprint()}), indent=1).encode())
        else:
            results.save("lab4", "decode_bench", rec)

    def stage(name):
        rec["stages_s"][name] = time.perf_counter() - t_start
        log(f"{name} (t={rec['stages_s'][name]:.0f} s)")

    with timing.stopwatch(dev) as t:
        loaded = models.load(args.model, device=dev)
    hf = loaded.model
    rec["load_s"] = t.seconds
    log(f"loaded {args.model} in {t.seconds:.1f} s: {loaded.note[:90]}")
    bw = hardware.measure_bandwidth(prof.bandwidth_bytes, dev).read_Bps
    peak = hardware.matmul_peak("bfloat16" if dev.type == "cuda" else "float32", device=dev).flops_per_s
    rec |= {"read_Bps": bw, "peak_flops": peak}
    B, P, N = 1, args.prompt, args.new_tokens
    max_len = -(-(P + N) // 64) * 64
    prompt = roofline.token_ids(B, P).to(dev)
    forced = roofline.token_ids(B, 8, seed=1).to(dev)
    ref = decode.reference_logits(hf, prompt, forced)
    wb = quant.weight_bytes(hf)
    cost16 = decode.step_cost(args.model, B, max_len, wb)
    floor = cost16.time(peak, bw)
    log(f"read {bw / 1e12:.3f} TB/s, matmul {peak / 1e12:.0f} TFLOP/s; {wb / 1e9:.2f} GB weights/step "
        f"-> roofline {1e3 * floor:.2f} ms/token, {1 / floor:.0f} tok/s")

    st = decode.HFStepper(hf, B, max_len, static=False)
    p = decode.profile_decode(st, prompt, steps=4)
    rec["profile_eager"] = p
    log(f"eager profile: wall {1e3 * p['wall_s_per_token']:.1f} ms/token, busy {100 * p['busy_fraction']:.0f}%, "
        f"{p['launches_per_token']:.0f} launches/token")

    shared: dict = {}
    if args.int8 == "auto":
        kb = quant.kernel_bench(28672, 4096, hf.dtype, dev, compile=comp) if dev.type == "cuda" else \
            quant.kernel_bench(3584, 512, hf.dtype, dev)
        rec["int8_kernels"] = kb
        print(plots.table(kb, floatfmt=".4g"))
        best = max([r for r in kb if "GB/s" in r and "int8" in r["variant"]], key=lambda r: r["GB/s"])
        args.int8 = best["variant"].split()[1]
        log(f"int8 kernel test done: rung e uses {args.int8!r}")
    for r in [x for x in args.rungs.split(",") if x]:
        if time.perf_counter() - t_start > args.budget_s:
            log(f"budget spent: skipping rung {r}")
            continue
        try:
            run_rung(r, rec, hf, prompt, forced, ref, max_len, N, args, comp, bw, peak, cost16, shared)
        except Exception as e:  # noqa: BLE001 - report and go on with the next rung
            rec["runs"][r] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            log(f"rung {r} FAILED: {type(e).__name__}: {str(e)[:400]}")
        stage(f"rung {r}")
        save()
    shared.pop("lean", None)
    rec["gemv_tables"] = {f"{k[0]}x{k[1]} {k[2]} fused={k[5]}{'' if k[6] else ' no PDL'}": v
                          for k, v in gemv_tune._TUNED.items()}
    sweep = [int(b) for b in args.sweep.split(",") if b]
    if sweep and time.perf_counter() - t_start < args.budget_s:
        base = lean.LeanMistral.from_hf(hf)
        rec["sweep"] = decode.batch_sweep(base, args.model, sweep, P, bw, peak)
        stage("sweep")
        print(plots.table(rec["sweep"], floatfmt=".3g"))
    save()
    rows = [{k2: v2 for k2, v2 in v.items() if k2 != "detail"} for v in rec["runs"].values() if "tok/s" in v]
    for r, pr in shared.get("profiles", []):
        for how, p in pr.items():
            print(f"\nprofile {r} ({how}): wall {1e3 * p['wall_s_per_token']:.3f} ms/token, kernels busy (union) "
                  f"{1e3 * p['busy_s_per_token']:.3f} ms = {100 * p['busy_fraction']:.0f}% of the profiled wall, "
                  f"{p['launches_per_token']:.0f} kernels/token")
            print(plots.table(p["top"][:28], floatfmt=".4g"))
    print(plots.table(rows, floatfmt=".4g"))
    log(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0


def run_rung(r, rec, hf, prompt, forced, ref, max_len, N, args, comp, bw, peak, cost16, shared):
    tol16, tol8 = args.tol
    n, warm = N, 1
    kind, *var = r.split(":")
    if r == "a":
        chk = decode.check(decode.HFStepper(hf, 1, max_len, static=False), prompt, forced, ref, tol16)
        gen, n, cost, warm = functools.partial(decode.hf_generate, hf), args.slow_tokens, cost16, 0
    elif r == "b":
        chk = decode.check(decode.HFStepper(hf, 1, max_len, static=True), prompt, forced, ref, tol16)
        gen, n, cost, warm = functools.partial(decode.hf_generate, hf, static=True), args.slow_tokens, cost16, 0
    elif r == "c":
        st = decode.HFStepper(hf, 1, max_len, static=True, compile=comp)
        chk = decode.check(st, prompt, forced, ref, tol16)
        gen, cost = functools.partial(decode.loop_generate, st), cost16
    else:
        if var[2:] not in ([], ["nopdl"]):
            raise ValueError(f"rung {r}: the fourth field may only be 'nopdl'")
        pdl, _triton.PDL = _triton.PDL, var[2:] != ["nopdl"]
        try:
            return run_lean(r, kind, var, rec, hf, prompt, forced, ref, max_len, N, args, comp, bw, peak, shared)
        finally:
            _triton.PDL = pdl
    name = NAMES[kind] + (", compiled" if kind == "c" and comp else ", eager")
    run = decode.measure(name, gen, prompt, n, cost, bw, peak, reps=args.reps, warmup=warm)
    record(r, rec, run, chk, cost)


def record(r, rec, run, chk, cost):
    rec["checks"][r] = chk
    rec["runs"][r] = run.row() | {"first_use_s": chk["first_use_s"], "rel_err": chk["rel_err"],
                                  "GB/step": cost.bytes / 1e9, "detail": run.as_dict()}
    log(f"{run.rung}: {run.tok_s:.1f} tok/s, MBU {100 * run.mbu:.1f}%, ITL p99 {1e3 * run.itl_p99_s:.2f} ms, "
        f"first use {chk['first_use_s']:.1f} s, rel err {chk['rel_err']:.2e}")


def run_lean(r, kind, var, rec, hf, prompt, forced, ref, max_len, N, args, comp, bw, peak, shared):
    """A lean rung (d, d0, e): the lean model, its kernels tuned, compiled, checked, timed."""
    tol16, tol8 = args.tol
    torch._dynamo.reset()  # each lean variant compiles afresh (no cache-size limit, no dynamic shapes)
    if "lean" not in shared:
        with timing.stopwatch(prompt.device) as t:
            shared["lean"] = lean.LeanMistral.from_hf(hf)
        rec["lean_build_s"] = t.seconds
    attn, impl = (var + [""])[0] or "reduce", (var + ["", ""])[1] or (args.int8 if kind == "e" else "")
    model = quant.copy_structure(shared["lean"])
    model.attn = attn
    asked = impl
    if kind == "e" and impl in quant.LIBRARY:
        model, impl, why = quant.library_int8(model, impl)
        if why:
            rec["runs"][r] = {"note": why}
            log(f"rung {r}: {why}")
    elif kind == "e":
        model = quant.quantize_int8(model, impl)
    elif impl in ("triton", "triton_plain"):
        model = quant.use_gemv(model, fuse=impl == "triton")
    elif impl:
        raise ValueError(f"rung {r}: a bf16 rung takes no int8 kernel ({impl!r}); use 'triton', "
                         "'triton_plain' or nothing")
    with timing.stopwatch(prompt.device) as t:
        tuned = gemv_tune.tune_model(model)  # no rows without a GPU or without kernel-run layers
    if tuned:
        rec.setdefault("gemv_tuning", {})[r] = {"rows": tuned, "seconds": t.seconds}
        log(f"rung {r}: Triton kernel tuned for {len(tuned)} weight shapes in {t.seconds:.1f} s")
        print(plots.table(tuned, floatfmt=".4g"))
    st = decode.LeanStepper(model, 1, max_len, compile=comp,
                            options={"triton.cudagraphs": True} if kind == "d0" else None)
    chk = decode.check(st, prompt, forced, ref, tol16 if kind in ("d", "d0") else tol8)
    cost = decode.step_cost(args.model, 1, max_len, quant.weight_bytes(model))
    gen = functools.partial(decode.loop_generate, st)
    name = decode.rung_label(NAMES[kind], attn, impl, comp, _triton.triton is not None and prompt.is_cuda, _triton.PDL,
                             instead_of=asked if asked != impl else "")
    run = decode.measure(name, gen, prompt, N, cost, bw, peak, reps=args.reps, warmup=1)
    note = rec["runs"].get(r, {}).get("note")
    record(r, rec, run, chk, cost)
    if note:
        rec["runs"][r]["note"] = note
    rec["runs"][r]["graphs"] = dict(torch._dynamo.utils.counters["stats"]).get("unique_graphs", 0)
    if r in args.profile.split(",") and kind in ("d", "e"):
        rec.setdefault("profiles", {})[r] = prof = kernel_profile(st, model, prompt, max_len, comp)
        shared["profiles"] = shared.get("profiles", []) + [(r, prof)]


def kernel_profile(st, model, prompt, max_len, comp) -> dict:
    """Kernels per token of a compiled lean stepper; if the CUDA graph's kernels are not traced one by one,
    the same model compiled without CUDA graphs (same kernels, launched from Python)."""
    out = {"graph": decode.profile_decode(st, prompt, steps=5, top=200)}
    if comp and out["graph"]["launches_per_token"] < 100:
        opts = {k: v for k, v in decode.FAST_OPTIONS.items() if k != "triton.cudagraphs"}
        nog = decode.LeanStepper(model, 1, max_len, compile=True, options=opts)
        out["no_graph"] = decode.profile_decode(nog, prompt, steps=5, top=200)
    return out


if __name__ == "__main__":
    sys.exit(main())
