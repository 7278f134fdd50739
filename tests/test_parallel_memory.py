"""labutils.parallel.memory: the formulas against hand-computed cases, bad input, and the CPU read-back."""

from __future__ import annotations

import pytest
import torch

from labutils import models
from labutils.parallel import memory as M


def test_mixed_precision_adam_is_16_bytes_per_param_116_gb_for_7b():
    assert M.training_bytes_per_param()["total"] == 16
    s = M.shape("mistral-7b")
    assert s.n_params == sum(p.numel() for p in models.meta_model("mistral-7b").parameters())
    assert s.n_params * 16 / 1e9 == pytest.approx(115.8, abs=0.1)


@pytest.mark.parametrize("stage, params, grads, optim", [(0, 2000, 2000, 12000), (1, 2000, 2000, 3000),
                                                          (2, 2000, 500, 3000), (3, 500, 500, 3000)])
def test_zero_stages_by_hand(stage, params, grads, optim):
    r = M.per_rank_training_bytes(1000, 4, stage)
    assert (r["params"], r["grads"], r["optimizer"]) == (params, grads, optim)
    assert r["total"] == params + grads + optim


def test_zero_bad_stage_and_world():
    with pytest.raises(ValueError, match="stage must be one of"):
        M.per_rank_training_bytes(10, 4, 4)
    with pytest.raises(ValueError, match="world"):
        M.per_rank_training_bytes(10, 0, 1)


def test_kv_cache_and_activations_by_hand():
    s = M.shape("mistral-7b")
    assert M.kv_cache_bytes(s, 1) == 2 * 32 * 8 * 128 * 2  # 128 KiB per token in bf16
    assert M.kv_cache_bytes(s, 4096, batch=8, tp=4) == 2 * 32 * 8 * 128 * 2 * 4096 * 8 / 4
    assert M.activation_bytes(s, 10, 10, checkpoint=True) == 4096 * 2 * 32 * 10  # only each layer's input
    t = M.activation_terms(s, 100, flash=True)
    assert sum(t.values()) == 2 * (4 * 4096 + 4096 + 2 * 1024 + 4096 + 4 * 14336)
    assert M.activation_terms(s, 100, flash=False)["softmax probabilities"] == 32 * 100 * 2


def test_weights_per_rank_tp_pp_and_bad_sizes():
    s = M.shape("mistral-7b")
    ends = s.embed_params + s.head_params + s.hidden
    assert M.per_rank_weight_bytes(s) == pytest.approx(s.n_params * 2)
    assert M.per_rank_weight_bytes(s, tp=4) == pytest.approx((s.n_params - ends) / 4 * 2 + ends * 2)
    assert M.per_rank_weight_bytes(s, pp=4) == pytest.approx((8 * s.layer_params + s.head_params + s.hidden) * 2)
    with pytest.raises(ValueError, match="TP size 3 does not divide"):
        M.per_rank_weight_bytes(s, tp=3)
    with pytest.raises(ValueError, match="pp=5 does not divide"):
        M.per_rank_weight_bytes(s, pp=5)


def test_too_little_memory_says_what_to_change():
    s = M.shape("mistral-7b")
    need = M.per_rank_training_bytes(s.n_params, 1, 0)["total"]
    with pytest.raises(ValueError, match=r"needs 115.9 GB per device.*80.0 GB.*ZeRO-3"):
        M.require_fits(need, 80e9, "mistral-7b training on 1 GPU", "shard it: ZeRO-3 / FSDP over 2+ GPUs")
    M.require_fits(M.per_rank_training_bytes(s.n_params, 4, 3)["total"], 80e9, "ZeRO-3 x4", "-")
    assert M.max_batch(s, 80e9, 4096) == 0 and M.max_batch(s, 141e9, 4096, checkpoint=True) > 0


def test_saving_tracker_counts_what_autograd_keeps():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    with M.saving_tracker(exclude=list(lin.parameters())) as saved:
        lin(x).sum()
    assert M.tensor_bytes(saved) == 2 * 8 * 4  # the input, not the weight
    assert M.tensor_bytes([x, x[0], x.view(-1)]) == 64  # views of one storage count once


def test_measured_step_matches_the_formulas_on_cpu():
    r = M.measure_training_step("mistral-tiny-small", 1, 16, "cpu")
    n = M.shape("mistral-tiny-small").n_params
    assert (r["params"], r["grads"], r["optimizer"]) == (4 * n, 4 * n, 8 * n)  # fp32 Adam: 16 B/param
    assert r["activations_saved"] > 0 and r["peak"] == sum(r[k] for k in ("params", "grads", "optimizer",
                                                                          "activations_saved"))


def test_table_rows():
    rows = M.table(M.shape("mistral-7b"))
    assert rows[-1]["GB"] < rows[0]["GB"] and any("ZeRO-3" in r["what"] for r in rows)
