"""labutils.parallel.data: ZeRO memory formulas, the DP wrappers at a world of one, bad input, and (4 gloo ranks
through labutils.launch) naive / bucketed / DDP / FSDP2 against one rank, memory, the big step, scaling."""

from __future__ import annotations

import json
import types

import pytest
import torch

from labutils import launch, timing
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


def test_four_gloo_ranks_dp_kinds_match_one_rank_and_fsdp_shards_memory(tmp_path):
    out = tmp_path / "dp.json"
    # the correctness and memory parts only: lab2 §5 runs the timed parts (overlap, scaling) of the same script
    launch.run("labutils.scripts.lab2_data", ["--parts", "check", "memory", "big", "--steps", "2", "--reps", "1",
                                              "--out", out], nproc=4,
               env={"SMML_DIST_BACKEND": "gloo"}, timeout=900, stream=False)
    doc = json.loads(out.read_text())
    assert [c["kind"] for c in doc["checks"]] == ["naive", "bucket", "ddp", "fsdp"]
    for c in doc["checks"]:
        assert c["ok"] and c["loss_rel_err"] < 1e-4 and len(c["losses"]) == 2, c
    mem = doc["memory"]
    ddp, fsdp = mem["ddp"]["measured"], mem["fsdp"]["measured"]
    assert ddp["params"] == mem["ddp"]["predicted"]["params"] == 4 * mem["ddp"]["n_params"]
    assert ddp["optimizer"] == 2 * ddp["params"]
    for part in ("params", "grads", "optimizer"):  # a quarter each, up to FSDP2's padding of each shard
        assert fsdp[part] == pytest.approx(ddp[part] / 4, rel=0.02), part
    assert "overlap" not in doc and "scaling" not in doc  # --parts was followed
    big = doc["big"]
    assert big["tokens_per_s"] > 0 and big["world"] == 4
    assert big["measured"]["params"] == pytest.approx(big["n_params"] * 4 / 4, rel=0.02)
