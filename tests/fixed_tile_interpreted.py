"""labutils.kernels.fixed_tile_gemm's Triton kernel run by Triton's interpreter on the CPU. TRITON_INTERPRET=1 must
be set before triton is imported, so tests/test_triton_interpreted.py runs this file in a fresh process. Not
collected on its own: its name does not start with test_."""

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run by tests/test_triton_interpreted.py"

from labutils import timing  # noqa: E402
from labutils.kernels import fixed_tile_gemm as ftg  # noqa: E402


# float16 and float32 only: the interpreter (numpy) gets tl.dot on bfloat16 wrong; the GPU does not
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,block", [(130, 260, 70, ftg.BLOCK), (37, 50, 45, (16, 32, 16)),
                                         (64, 64, 32, (32, 32, 16))])
def test_kernel_matches_torch_matmul(dtype, m, n, k, block):
    g = torch.Generator().manual_seed(m + n + k)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    got = ftg.launch(a, b, block)  # output starts as NaN: a tile left unwritten fails
    assert timing.rel_err(got, a.double() @ b.double()) < 1e-2


def test_kernel_reads_strided_operands():
    a, b = torch.randn(40, 24), torch.randn(48, 24)  # B passed transposed: strides (1, 24)
    assert timing.rel_err(ftg.launch(a, b.T, (16, 16, 16)), a.double() @ b.double().T) < 1e-2


def test_sweep_checks_then_times_each_shape():
    # lab1 §5b′'s GPU path end to end, on CPU tensors (its timings mean nothing here)
    rows = ftg.sweep([(8, 300, 16)], torch.float16, device="cpu", reps=1, calls=1, progress=False)
    assert [(r["m"], r["n"], r["k"]) for r in rows] == [(8, 300, 16)]
    assert all(r["rel_err"] < 1e-2 and r["s"] > 0 and r["flops_per_s"] > 0 for r in rows)


def test_the_occupancy_probe_launches_with_the_kernels_signature():
    # programs_per_sm's one-tile launch (on a GPU it then reads registers and shared memory of what compiled)
    ftg._probe(torch.device("cpu"), torch.float16)
    assert ftg.programs_per_sm("cpu") == ftg.per_sm() == 1
