"""labutils.parallel.tensor / mesh / comms: bad input errors here. TP and PP decode on 4 ranks run in lab2 §3
(labutils.scripts.lab2_decode, which checks itself against TP=1: tests/test_script_checks.py)."""

from __future__ import annotations

import pytest
import torch

from labutils import launch, models
from labutils.parallel import comms, mesh, tensor


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_small_presets_have_gqa_divisible_by_every_tp(tp):
    for name in ("mistral-tiny-small", "mistral-7b-small"):
        p = models.preset(name)
        assert p.num_key_value_heads < p.num_attention_heads  # grouped-query attention, like the real ones
        tensor.check_tp_size(p, tp)


def test_tp_size_not_dividing_heads_is_refused_before_loading():
    msg = r"TP size 3 does not divide .* 32 attention heads and 8 KV heads.*\[1, 2, 4, 8\]"
    with pytest.raises(ValueError, match=msg):
        tensor.check_tp_size(models.preset("mistral-7b"), 3)
    with pytest.raises(ValueError, match="TP size 8 does not divide"):
        tensor.check_tp_size(models.preset("mistral-7b-small"), 8)  # 8 heads, but only 4 KV heads


def test_mesh_product_must_equal_world():
    with pytest.raises(ValueError, match=r"dp\*tp\*pp = 1\*3\*1 = 3 but the job has 4 ranks"):
        mesh.ParallelDims(tp=3).check(4)
    with pytest.raises(ValueError, match="tp must be an integer >= 1"):
        mesh.ParallelDims(tp=0)
    mesh.ParallelDims(dp=2, tp=2).check(4)


def test_more_ranks_than_gpus_with_nccl():
    gpus = torch.cuda.device_count()
    with pytest.raises(ValueError, match="one GPU per rank"):
        launch.plan(gpus + 1, backend="nccl")


def test_megatron_mlp_at_world_one_is_the_dense_mlp(world_of_one):
    torch.manual_seed(0)
    dense = tensor.DenseMLP(16, 32)
    tp = tensor.MegatronMLP.from_dense(dense, None)
    x = torch.randn(3, 16)
    assert torch.allclose(tp(x), dense(x))
    assert comms.same_on_all_ranks(x)
