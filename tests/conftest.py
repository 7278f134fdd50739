"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
import torch

from labutils import dist


@pytest.fixture
def world_of_one(monkeypatch):
    """A world of one process without torchrun (gloo), torn down afterwards: the tests' common start."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SMML_DIST_BACKEND"):
        monkeypatch.delenv(k, raising=False)
    ctx = dist.init(timeout_s=30)
    yield ctx
    dist.destroy()
    assert not torch.distributed.is_initialized()

