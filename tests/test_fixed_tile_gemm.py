"""lab1 §5b's fixed-tile GEMM: its tile arithmetic and plain-torch path here, its Triton kernel under Triton's
interpreter in a fresh process (tests/fixed_tile_interpreted.py, run by tests/test_triton_interpreted.py)."""

from pathlib import Path

import pytest
import torch

from labutils import timing
from labutils.kernels import fixed_tile_gemm as ftg

HERE = Path(__file__).parent


@pytest.mark.parametrize("m,n,k,block", [(70, 90, 50, (32, 64, 16)), (8, 8, 8, ftg.BLOCK)])
def test_plain_tiles_match_matmul(m, n, k, block):
    a, b = torch.randn(m, k), torch.randn(k, n)
    assert timing.rel_err(ftg.matmul(a, b, block), a @ b) < 1e-5  # a CPU tensor takes the plain path


def test_prediction_is_a_sawtooth_at_multiples_of_the_sms():
    # H200: 132 SMs; M = 2048 is 16 tile rows of 128, so 8 tile columns (N = 2048) = 128 tiles = one wave,
    # 9 columns (N = 2304) = 144 tiles = two waves, the second nearly empty
    assert ftg.predict(2048, 2048, 132) == (128, 1, 128 / 132)
    t, w, e = ftg.predict(2048, 2304, 132)
    assert (t, w) == (144, 2) and abs(e - 144 / 264) < 1e-12
    ns = list(range(128, 6913, 128))
    assert ftg.drops(ns, 2048, 132) == [2176, 4224, 6272]  # tiles pass 132, 264, 396: 9, 17, 25 columns
    assert ftg.per_sm() == 1  # 144 KiB of shared memory per program: one per SM


def test_bad_operands_say_what_to_change():
    with pytest.raises(ValueError, match="transpose or cast"):
        ftg.matmul(torch.randn(4, 5), torch.randn(4, 5))
