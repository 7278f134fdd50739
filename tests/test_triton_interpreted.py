"""The Triton kernels of labutils.kernels (lab4's GEMV and decode attention, lab1's fixed-tile GEMM) run by
Triton's interpreter on the CPU. TRITON_INTERPRET=1 must be set before triton is imported, so both files of
interpreted tests run in one fresh process (one start-up of torch and triton for both)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FILES = ("gemv_interpreted.py", "fixed_tile_interpreted.py")


def test_kernels_under_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(HERE.parent))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(str(HERE / f) for f in FILES)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parent)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert " passed" in p.stdout and "failed" not in p.stdout
