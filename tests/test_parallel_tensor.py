"""labutils.parallel.tensor / mesh / comms: bad input errors here; TP and PP under torchrun/gloo in one launch
(transformers' TP at 2 and 4, the same-input check, the lean decode at TP=1/2/4 and PP=4, logits vs TP=1)."""

from __future__ import annotations

import json

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


def test_tp_and_pp_decode_match_one_device_on_4_gloo_ranks(tmp_path):
    out = tmp_path / "decode.json"
    args = ["--batch", "1", "2", "--prompt", "8", "--new-tokens", "3", "--out", out]
    launch.run("labutils.scripts.lab2_decode", args, nproc=4, env=launch.plan(4, "gloo").env, timeout=900,
               stream=False)
    rec = json.loads(out.read_text())
    hf = rec["hf_tp"]
    assert hf["same_input_ok"] and hf["different_input_caught"]
    assert "differ between ranks" in hf["different_input_error"]
    assert [r["tp"] for r in hf["tp"]] == [2, 4] and all(r["rel_err"] < 1e-4 for r in hf["tp"])
    assert hf["tp"][-1]["different_inputs_rel_err"] > 0.1  # different inputs: silently wrong logits
    layouts = {r["layout"]: r for r in rec["decode"]}
    assert set(layouts) == {"TP=1", "TP=2", "TP=4", "PP=4"}
    for r in layouts.values():
        assert r["rel_err"] < 1e-4 and [x["batch"] for x in r["runs"]] == [1, 2]
        assert all(x["tok_s"] > 0 for x in r["runs"])
    # a quarter of the layers per stage; TP splits the layers, but the embedding and head stay replicated
    assert layouts["PP=4"]["max_bytes_per_device"] < layouts["TP=4"]["max_bytes_per_device"] \
        < layouts["TP=1"]["max_bytes_per_device"]
