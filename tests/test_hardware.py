import math
import time

import pytest
import torch

from labutils import hardware, timing


@pytest.mark.parametrize("name,slug", [
    ("NVIDIA H100 80GB HBM3", "h100-80gb-hbm3"),
    ("NVIDIA A100-SXM4-40GB", "a100-sxm4-40gb"),
    ("cpu", "cpu"),
])
def test_gpu_slug(name, slug):
    assert hardware.gpu_slug(name) == slug


@pytest.mark.parametrize("name,bw_tb,bf16_tf", [
    ("NVIDIA H100 80GB HBM3", 3.35, 989.4),
    ("NVIDIA H100 PCIe", 2.0, 756),
    ("NVIDIA H100 NVL", 3.9, 835.5),
    ("NVIDIA H200", 4.8, 989.4),
    ("NVIDIA A100-SXM4-40GB", 1.555, 312),
    ("NVIDIA A100-SXM4-80GB", 2.039, 312),
    ("NVIDIA L4", 0.3, 121),
    ("NVIDIA L40S", 0.864, 362),
    ("NVIDIA A10G", 0.6, 125),
    ("NVIDIA B200", 8.0, 2250),
])
def test_datasheet_lookup_picks_the_specific_part(name, bw_tb, bf16_tf):
    p = hardware.datasheet(name)
    assert p.mem_bw == pytest.approx(bw_tb * 1e12)
    assert p.flops("bfloat16") == pytest.approx(bf16_tf * 1e12)
    assert p.flops("tf32") < p.flops("bfloat16")


def test_datasheet_unknown_gpu_is_none():
    assert hardware.datasheet("Some Future Accelerator") is None


def test_describe_this_machine():
    info = hardware.describe()
    assert info.cpu_cores >= 1 and info.count >= 1
    assert info.kind == ("cuda" if torch.cuda.is_available() else "cpu")


def test_measured_bandwidth_is_finite_and_checked():
    bw = hardware.measure_bandwidth(8 * 2**20, device="cpu", reps=5)
    assert bw.read_Bps > 0 and bw.copy_Bps > 0 and math.isfinite(bw.read_Bps)
    assert bw.nbytes == 8 * 2**20


def test_gemm_checks_then_times():
    r = hardware.gemm(64, 96, 128, "float32", device="cpu", reps=5)
    assert r.rel_err < 1e-5
    assert r.flops_per_s == pytest.approx(2 * 64 * 96 * 128 / r.timing.median_s)


def test_gemm_settles_only_on_a_gpu_unless_asked():
    assert hardware.gemm(32, 32, 32, "float32", device="cpu", reps=5).timing.settle_s == 0.0
    assert hardware.gemm(32, 32, 32, "float32", device="cpu", reps=5, settle_s=0.02).timing.settle_s == 0.02
    assert hardware.matmul_peak("float32", size=32, device="cpu", reps=5, settle_s=0.01).timing.settle_s == 0.01
    assert hardware.SETTLE_S > 0


@pytest.mark.parametrize("settle_s", [0.0, 0.05])
def test_settle_runs_back_to_back_for_its_time_before_the_timed_reps(settle_s):
    stamps = []
    t = timing.benchmark(lambda: stamps.append(time.perf_counter()), device="cpu", warmup=2, reps=5,
                         settle_s=settle_s)
    untimed = len(stamps) - 1 - 2 - t.n  # calls that were neither first, warm-up nor timed
    assert t.settle_s == settle_s and t.n == 5
    if settle_s == 0:
        assert untimed == 0
    else:  # the settle loop cannot stop before its time is up: a lower bound, not a timing assert
        assert untimed > 0 and stamps[-t.n] - stamps[2] >= settle_s  # [2]: the last warm-up


def test_settle_counts_its_calls():
    seen = []
    n = timing.settle(seen.append, 0.01, device="cpu", per_call=1e-3)
    assert n == len(seen) >= 10 and n % 10 == 0 and seen[:3] == [0, 1, 2]  # chunks of 10 ms / per_call


def test_gemm_bad_dtype_and_missing_fp8_say_what_to_do():
    with pytest.raises(ValueError, match="unknown dtype"):
        hardware.gemm(8, 8, 8, "float7", device="cpu")
    with pytest.raises(ValueError, match="capability"):
        hardware.gemm(16, 16, 16, "float8_e4m3fn", device="cpu")


def test_fingerprint_carries_the_environment():
    fp = hardware.fingerprint()
    for key in ("torch", "python", "transformers", "device", "gpu_slug", "time_utc", "profile"):
        assert key in fp
    assert fp["torch"] == torch.__version__


@pytest.mark.parametrize("raw,name", [(" FULL ", "full"), ("small", "small")])
def test_fingerprint_stores_the_profile_in_use_not_the_raw_variable(monkeypatch, raw, name):
    monkeypatch.setenv("SMML_PROFILE", raw)
    assert hardware.fingerprint()["profile"] == name


def test_fingerprint_refuses_an_unknown_profile(monkeypatch):
    monkeypatch.setenv("SMML_PROFILE", "huge")
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        hardware.fingerprint()
