"""What machine is this, what does its datasheet promise, and what does it deliver?

- ``describe()``: the device the labs will use (GPU name, count, memory, SMs, L2; or the CPU);
  ``device_label()`` names it in plot titles.
- ``datasheet()``: dense peak FLOP/s per dtype and memory bandwidth, from one table keyed
  by device name (never a magic constant in a lab).
- ``measure_bandwidth()`` / ``gemm()`` / ``matmul_peak()``: the ceilings *measured* here,
  each checked for a correct result before it is timed; on a GPU every GEMM is timed after
  ``SETTLE_S`` seconds of the same product back-to-back, i.e. at the clock it sustains.
- ``fingerprint()``: the hardware/software environment saved with every result.

Used in lab0 §Environment, lab1 §Ceilings, lab4 §Roofline.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from functools import lru_cache

import torch

from . import profile as _profile
from . import timing

TB = 1e12


@dataclass(frozen=True)
class Peak:
    """Dense (no sparsity) datasheet peaks: FLOP/s per dtype, bytes/s of memory."""

    fp32: float
    tf32: float
    fp16: float
    bf16: float
    fp8: float | None
    mem_bw: float
    source: str

    def flops(self, dtype: str) -> float | None:
        key = {"float32": "fp32", "tf32": "tf32", "float16": "fp16", "bfloat16": "bf16",
               "float8_e4m3fn": "fp8", "fp8": "fp8"}.get(dtype, dtype)
        return getattr(self, key, None)


def _p(fp32, tf32, fp16, fp8, bw, src) -> Peak:
    return Peak(fp32 * TB, tf32 * TB, fp16 * TB, fp16 * TB, fp8 * TB if fp8 else None, bw * TB, src)


# Key: a lower-case substring of torch.cuda.get_device_name(); first match wins,
# so the more specific names come first. Figures: NVIDIA datasheets, dense.
DATASHEET: dict[str, Peak] = {
    "h200": _p(67, 494.7, 989.4, 1978.9, 4.8, "NVIDIA H200 SXM datasheet"),
    "h100 nvl": _p(60, 417.5, 835.5, 1670.5, 3.9, "NVIDIA H100 NVL datasheet"),
    "h100 pcie": _p(51, 378, 756, 1513, 2.0, "NVIDIA H100 PCIe datasheet"),
    "h100": _p(67, 494.7, 989.4, 1978.9, 3.35, "NVIDIA H100 SXM datasheet"),
    "b200": _p(75, 1100, 2250, 4500, 8.0, "NVIDIA HGX B200 datasheet, per GPU"),
    "a100-sxm4-40gb": _p(19.5, 156, 312, None, 1.555, "NVIDIA A100 40GB SXM datasheet"),
    "a100-pcie-40gb": _p(19.5, 156, 312, None, 1.555, "NVIDIA A100 40GB PCIe datasheet"),
    "a100 80gb pcie": _p(19.5, 156, 312, None, 1.935, "NVIDIA A100 80GB PCIe datasheet"),
    "a100": _p(19.5, 156, 312, None, 2.039, "NVIDIA A100 80GB SXM datasheet"),
    "l40s": _p(91.6, 183, 362, 733, 0.864, "NVIDIA L40S datasheet"),
    "l4": _p(30.3, 60, 121, 242.5, 0.300, "NVIDIA L4 datasheet"),
    "a10g": _p(31.2, 62.5, 125, None, 0.600, "NVIDIA A10 datasheet (A10G: AWS variant, same class)"),
    "a10": _p(31.2, 62.5, 125, None, 0.600, "NVIDIA A10 datasheet"),
}
#: The CPU has no single datasheet figure: its ceilings are only measured.
CPU_PEAK = None


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" or "cpu"
    name: str
    count: int
    memory_bytes: int
    sm_count: int | None
    l2_bytes: int | None
    capability: str | None
    cpu: str
    cpu_cores: int

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@lru_cache(maxsize=1)
def describe() -> DeviceInfo:
    """The device the labs use: GPU 0 if CUDA is available, else the CPU."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return DeviceInfo("cuda", p.name, torch.cuda.device_count(), p.total_memory, p.multi_processor_count,
                          getattr(p, "L2_cache_size", None), f"{p.major}.{p.minor}", cpu_name(), cores)
    return DeviceInfo("cpu", cpu_name(), 1, _cpu_memory(), None, None, None, cpu_name(), cores)


def device_label(info: DeviceInfo | None = None) -> str:
    """The device for a plot title: ``"NVIDIA H200"`` (``" x4"`` with several GPUs), or
    ``"CPU (2 cores, AMD EPYC 7B13)"`` — so that two machines' PNGs can be told apart."""
    info = info or describe()
    if info.kind == "cuda":
        return info.name + (f" x{info.count}" if info.count > 1 else "")
    return f"CPU ({info.cpu_cores} core{'s' if info.cpu_cores != 1 else ''}, {info.cpu or 'unknown model'})"


def default_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def gpu_slug(name: str | None = None) -> str:
    """Folder name for results: 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'; no GPU -> 'cpu'."""
    if name is None:
        info = describe()
        name = info.name if info.kind == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return slug or "cpu"


def datasheet(name: str | None = None) -> Peak | None:
    """Datasheet peaks for a GPU name (default: this machine's), None for a CPU or unknown GPU."""
    if name is None:
        info = describe()
        if info.kind != "cuda":
            return CPU_PEAK
        name = info.name
    low = name.lower()
    for key, peak in DATASHEET.items():
        if key in low:
            return peak
    return None


# ---------------------------------------------------------------- measured ceilings
@dataclass(frozen=True)
class Bandwidth:
    read_Bps: float  # bytes/s of a read-only pass (a sum)
    copy_Bps: float  # bytes/s of a copy, counting bytes read + bytes written
    nbytes: int
    read: timing.Timing
    copy: timing.Timing

    def as_dict(self) -> dict:
        return {"read_Bps": self.read_Bps, "copy_Bps": self.copy_Bps, "nbytes": self.nbytes,
                "read": self.read.as_dict(), "copy": self.copy.as_dict()}


def measure_bandwidth(nbytes: int, device=None, reps: int = 20) -> Bandwidth:
    """Measured memory bandwidth with a buffer of ``nbytes`` (make it >> cache)."""
    dev = torch.device(device) if device is not None else default_device()
    n = nbytes // 4
    src = torch.randn(n, device=dev)
    dst = torch.full_like(src, float("nan"))  # poisoned: a copy that skips elements shows
    dst.copy_(src)
    if not torch.equal(dst, src):
        raise RuntimeError("copy produced wrong values; bandwidth would be meaningless")
    ref = src.double().sum().item()
    got = src.sum().item()
    if abs(got - ref) > 1e-3 * max(1.0, abs(ref)) + 1e-2 * n**0.5:
        raise RuntimeError(f"sum wrong: {got} vs {ref}")
    read = timing.benchmark(lambda: src.sum(), device=dev, reps=reps, label="read (sum)")
    copy = timing.benchmark(lambda: dst.copy_(src), device=dev, reps=reps, label="copy")
    return Bandwidth(read.rate(4 * n), copy.rate(8 * n), 4 * n, read, copy)


_DTYPES = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "float8_e4m3fn": getattr(torch, "float8_e4m3fn", None)}


def has_fp8(device=None) -> bool:
    dev = torch.device(device) if device is not None else default_device()
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9)


@dataclass(frozen=True)
class GemmResult:
    m: int
    n: int
    k: int
    dtype: str
    flops_per_s: float
    rel_err: float
    timing: timing.Timing

    def as_dict(self) -> dict:
        return {"m": self.m, "n": self.n, "k": self.k, "dtype": self.dtype, "flops_per_s": self.flops_per_s,
                "rel_err": self.rel_err, "timing": self.timing.as_dict()}


# relative error a correct product lands under, per dtype (METHOD: fp32 far under 1e-3, bf16 < 1e-2)
GEMM_TOL = {"float32": 1e-4, "tf32": 5e-3, "float16": 1e-2, "bfloat16": 2e-2, "float8_e4m3fn": 1e-1}


def _operands(m, n, k, dtype: str, dev):
    if dtype not in _DTYPES or _DTYPES[dtype] is None:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(GEMM_TOL)}")
    if dtype == "float8_e4m3fn":
        if not has_fp8(dev):
            raise ValueError("fp8 GEMMs need a GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell)")
        a = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device=dev).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        one = torch.ones((), device=dev)
        return a, b, lambda x, y: torch._scaled_mm(x, y, one, one, out_dtype=torch.bfloat16)
    t = _DTYPES[dtype]
    a = torch.randn(m, k, device=dev, dtype=t)
    b = torch.randn(k, n, device=dev, dtype=t)
    return a, b, torch.matmul


#: seconds a GPU GEMM runs back-to-back before it is timed. An H100 at its power limit holds the boost
#: clock for a few tens of ms of full load, then settles lower: without this, a short timing measures
#: the burst and a long one the sustained clock, and shapes compare by timing length, not by speed.
#: 0.25 s is about the shortest settle after which a 50-call 8192^3 bf16 timing on an H100 keeps a
#: steady clock (p20-p80 under 1 %; fp16 once needed 0.5 s); the slower drift as the chip warms remains.
SETTLE_S = 0.25


def gemm(m: int, n: int, k: int, dtype: str = "bfloat16", device=None, reps: int = 30,
         rotate: int = 1, max_time_s: float = 2.0, graph: bool = False,
         settle_s: float | None = None) -> GemmResult:
    """Check then time one (m,k)@(k,n) product; FLOP/s = 2mnk / median time.

    ``rotate`` > 1 cycles through that many operand pairs (use it when they fit in cache).
    ``graph=True`` (GPU) times the products replayed from one CUDA graph, so a product shorter
    than a kernel launch is timed by the GPU's clock, not by Python's launch rate (``timing.graphed``).
    ``settle_s``: seconds of untimed back-to-back products after the check, before the timed reps
    (default ``SETTLE_S`` on a GPU, 0 on a CPU), so every GEMM is timed at the sustained clock.
    Raises if the product's relative error against float64 exceeds ``GEMM_TOL[dtype]``.
    """
    dev = torch.device(device) if device is not None else default_device()
    settle_s = (SETTLE_S if dev.type == "cuda" else 0.0) if settle_s is None else settle_s
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        pairs = [_operands(m, n, k, dtype, dev) for _ in range(max(1, rotate))]
        a, b, mm = pairs[0]
        out = mm(a, b)
        ref = a.double() @ b.double()
        err = timing.rel_err(out, ref)
        if not err <= GEMM_TOL[dtype]:  # also catches NaN
            raise RuntimeError(f"{dtype} GEMM {m}x{n}x{k}: relative error {err:.2e} > {GEMM_TOL[dtype]:.0e}")
        if graph and dev.type == "cuda":
            t = _graph_timing(mm, pairs, out, dtype, dev, f"gemm {m}x{n}x{k} {dtype}",
                              reps=reps, max_time_s=max_time_s, settle_s=settle_s)
        else:
            t = timing.benchmark(mm, inputs=[(x, y) for x, y, _ in pairs], device=dev, reps=reps,
                                 max_time_s=max_time_s, settle_s=settle_s, label=f"gemm {m}x{n}x{k} {dtype}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return GemmResult(m, n, k, dtype, t.rate(2 * m * n * k), err, t)


def _graph_timing(mm, pairs, ref_out, dtype, dev, label, **kw) -> timing.Timing:
    calls = max(len(pairs), 4)
    g = timing.graphed(lambda: [mm(*pairs[i % len(pairs)][:2]) for i in range(calls)], device=dev)
    out = g.check()[0]
    err = timing.rel_err(out, ref_out)
    if not err <= GEMM_TOL[dtype]:
        raise RuntimeError(f"{label}: the CUDA-graph replay differs from the eager product (rel err {err:.1e})")
    t = timing.benchmark(g.run, device=dev, label=f"{label}, {g.note}", **kw)
    per = {f: getattr(t, f) / calls for f in ("median_s", "p20_s", "p80_s", "p99_s", "min_s")}
    return replace(t, **per)


def matmul_peak(dtype: str = "bfloat16", size: int | None = None, device=None, reps: int = 30,
                settle_s: float | None = None) -> GemmResult:
    """Measured matmul ceiling: a large square product (8192 on a GPU; on a CPU 1024, and 512 for 16-bit types,
    which a CPU without native support emulates at ~1 GFLOP/s: 1024 would be ~25 s a dtype for the same figure),
    timed like every other GEMM (after ``settle_s``, default ``SETTLE_S`` on a GPU): the clock it sustains."""
    dev = torch.device(device) if device is not None else default_device()
    size = size or (8192 if dev.type == "cuda" else 512 if dtype in ("bfloat16", "float16") else 1024)
    return gemm(size, size, size, dtype, dev, reps=reps, settle_s=settle_s)


# ---------------------------------------------------------------- fingerprint
def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001 - any import failure just means "not there"
        return None


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    return _run(["git", "-C", here, "rev-parse", "--short", "HEAD"])


def fingerprint() -> dict:
    """Everything a reader needs to reproduce or distrust a number."""
    info = describe()
    cuda = torch.cuda.is_available()
    nccl = None
    if cuda and hasattr(torch.cuda, "nccl"):
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:  # noqa: BLE001
            nccl = None
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if cuda else None
    return {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": nccl,
        "driver": driver.splitlines()[0] if driver else None,
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "device": info.as_dict(),
        "gpu_slug": gpu_slug(),
        "profile": _profile.get().name,  # the profile in use (validated), not the raw $SMML_PROFILE
        # a copy of the tree without .git (a GPU box) can pass the commit in SMML_GIT_COMMIT
        "git_commit": os.environ.get("SMML_GIT_COMMIT") or _git_commit(),
        "argv": sys.argv,
    }
