"""labutils.parallel.data: ZeRO memory formulas, the DP wrappers at a world of one, bad input. Naive / bucketed /
DDP / FSDP2 on 4 ranks run in lab2 §5 (labutils.scripts.lab2_data, which checks itself against one rank and
its shards' bytes: tests/test_script_checks.py)."""

from __future__ import annotations

import types

import pytest
import torch

from labutils import timing
from labutils.parallel import data as dp
from labutils.parallel import pipeline as pl


def test_rank_bytes_counts_params_grads_and_adam_state():
    m = torch.nn.Linear(10, 5)  # 55 parameters
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(3, 10)).sum().backward()
    opt.step()
    assert dp.rank_bytes(m, opt) == {"params": 220, "grads": 220, "optimizer": 440}


def test_wrap_rejects_unknown_kind_and_mesh_mismatch(world_of_one):
    m = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="unknown data-parallel kind 'zero'"):
        dp.wrap(m, "zero")
    fake = types.SimpleNamespace(size=lambda: 2, ndim=1)
    with pytest.raises(ValueError, match="mesh has 2 ranks but the group has 1"):
        dp.wrap(m, "fsdp", torch.distributed.group.WORLD, mesh=fake)
    with pytest.raises(ValueError, match="bucket_bytes must be > 0"):
        dp.BucketDP(m, bucket_bytes=0)


@pytest.mark.parametrize("kind", ["naive", "bucket", "bucket-late"])
def test_wrappers_at_world_of_one_keep_the_local_gradients(world_of_one, kind):
    ref = pl.make_model("mistral-tiny-small", layers=1, vocab=64, seed=0)
    x = torch.randint(64, (2, 8), generator=torch.Generator().manual_seed(0))
    pl.loss_fn(ref(input_ids=x).logits, x).backward()
    w = dp.wrap(pl.make_model("mistral-tiny-small", layers=1, vocab=64, seed=0), kind, bucket_bytes=2**18)
    pl.loss_fn(w(input_ids=x).logits, x).backward()
    w.sync()
    for p, r in zip(w.module.parameters(), ref.parameters()):
        assert timing.rel_err(p.grad, r.grad) < 1e-6
    if kind != "naive":
        assert len(w.buckets) > 1 and sum(len(b) for b in w.buckets) == len(list(ref.parameters()))
