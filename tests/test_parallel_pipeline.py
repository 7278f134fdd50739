"""labutils.parallel.pipeline: the bubble formula, stage cutting, the timeline maths. GPipe / 1F1B /
Interleaved1F1B on 4 ranks run in lab2 §4 (labutils.scripts.lab2_pipeline, which checks itself against the
unpipelined model: tests/test_script_checks.py)."""

from __future__ import annotations

import pytest
import torch

from labutils import timing
from labutils.parallel import pipeline as pl


@pytest.mark.parametrize("p, m, v, expected", [(4, 4, 1, 3 / 7), (4, 8, 1, 3 / 11), (4, 16, 1, 3 / 19),
                                               (1, 8, 1, 0.0), (4, 8, 2, 3 / 19), (2, 1, 1, 0.5)])
def test_bubble_formula_hand_computed(p, m, v, expected):
    assert pl.bubble_fraction(p, m, v) == pytest.approx(expected)


def test_bubble_formula_rejects_nonsense():
    with pytest.raises(ValueError, match="p, m, v >= 1"):
        pl.bubble_fraction(4, 0)


def test_split_layers_and_microbatches():
    assert pl.split_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    with pytest.raises(ValueError, match="do not split evenly into 3 stages"):
        pl.split_layers(8, 3)
    with pytest.raises(ValueError, match="do not split evenly"):
        pl.split_layers(2, 4)
    assert pl.check_microbatches(8, 4) == 2
    with pytest.raises(ValueError, match="does not split into 3 equal micro-batches"):
        pl.check_microbatches(8, 3)
    assert pl.stage_indices(1, 4, 2) == [1, 5]


def test_measured_bubble_from_hand_made_timeline():
    """Two ranks, a 10 s span: rank 0 busy 0-4 s, rank 1 busy 2-6 and 8-10 s."""
    ev = [[{"t0": 0.0, "t1": 4.0}], [{"t0": 2.0, "t1": 6.0}, {"t0": 8.0, "t1": 10.0}]]
    assert pl.bubble(ev) == pytest.approx([0.6, 0.4])
    with pytest.raises(ValueError, match="no events"):
        pl.bubble([[], []])


def test_stages_in_a_row_equal_the_hf_model():
    """Two stages run one after the other (each recomputing RoPE) give the HF model's logits and grads."""
    ref = pl.make_model("mistral-tiny-small", layers=4, vocab=128, seed=0)
    x = torch.randint(128, (2, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    loss_ref = pl.loss_fn(ref(input_ids=x).logits, y)
    loss_ref.backward()
    stages = [pl.Stage(ref, r) for r in pl.split_layers(4, 2)]
    assert stages[0].first and not stages[0].last and stages[1].last and stages[1].embed is None
    loss = pl.loss_fn(stages[1](stages[0](x)), y)
    loss.backward()
    assert timing.rel_err(loss, loss_ref) < 1e-6
    refp = dict(ref.named_parameters())
    for st in stages:
        for name, p in st.named_parameters():
            assert timing.rel_err(p.grad, refp[st.ref_name(name)].grad) < 1e-5, name


def test_schedule_rejects_wrong_stage_counts():
    with pytest.raises(ValueError, match="unknown schedule"):
        pl.schedule("zb", [object()], 4)
    with pytest.raises(ValueError, match=">= 2 stages per rank"):
        pl.schedule("interleaved", [object()], 4)
    with pytest.raises(ValueError, match="one stage per rank"):
        pl.schedule("1f1b", [object(), object()], 4)


def test_meta_model_materialises_with_rotary_recomputed():
    meta = pl.make_model("mistral-tiny-small", layers=2, vocab=64, device="meta")
    st = pl.materialize(pl.Stage(meta, range(0, 2), copy_weights=False), "cpu")
    assert not any(p.is_meta for p in st.parameters())
    real = pl.make_model("mistral-tiny-small", layers=2, vocab=64)
    assert torch.equal(st.rotary.inv_freq, real.model.rotary_emb.inv_freq)
    assert bool(torch.isfinite(st(torch.zeros(1, 8, dtype=torch.long))).all())


def test_gantt_returns_a_figure():
    ev = [[{"kind": "F", "mb": 0, "t0": 0.0, "t1": 1.0}], [{"kind": "B", "mb": 0, "t0": 1.0, "t1": 3.0}]]
    fig = pl.gantt(ev, "test on cpu")
    assert fig.axes[0].get_title() == "test on cpu"


def test_naive_split_says_why_without_gpus():
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs: the split itself runs in the notebook")
    r = pl.naive_split("mistral-7b", 4)
    assert r["ran"] is False and "GPUs" in r["why"]
