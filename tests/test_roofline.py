"""labutils.roofline and labutils.gemm_bench (and the gemm_search script's command line): the arithmetic
against hand-computed cases, the layer sums against models.estimate, and the measured helpers on a tiny GQA
model (CPU)."""

import json
import math
from pathlib import Path

import matplotlib
import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from labutils import gemm_bench, hardware, models, roofline, timing
from labutils.scripts import gemm_search

TF, TB = 1e12, 1e12


# ---------------------------------------------------------------- GEMM arithmetic by hand
def test_square_bf16_gemm_by_hand():
    c = roofline.gemm_cost(4096, 4096, 4096, 2)
    assert c.flops == 2 * 4096**3
    assert c.bytes == 3 * 4096**2 * 2
    assert c.ai == pytest.approx(4096 / 3)


def test_skinny_gemm_does_one_flop_per_byte_in_bf16_and_half_in_fp32():
    bf16 = roofline.gemm_cost(1, 14336, 4096, 2)
    assert bf16.flops == 2 * 14336 * 4096
    assert bf16.bytes == 2 * (4096 + 4096 * 14336 + 14336)
    assert bf16.ai == pytest.approx(1.0, rel=1e-3)
    assert roofline.gemm_cost(1, 14336, 4096, 4).ai == pytest.approx(0.5, rel=1e-3)
    # AI grows ~ M while weights dominate the bytes
    assert roofline.gemm_cost(64, 14336, 4096, 2).ai == pytest.approx(64, rel=0.03)


def test_fp8_gemm_writes_a_wider_output_and_linear_weights_are_marked():
    c = roofline.gemm_cost(16, 32, 64, 1, out_bytes=2)
    assert c.bytes == 16 * 64 + 64 * 32 + 2 * 16 * 32
    w = roofline.gemm_cost(16, 32, 64, 2, weight="b")
    assert w.weight_bytes == 64 * 32 * 2 and roofline.gemm_cost(16, 32, 64, 2).weight_bytes == 0


def test_ridge_attainable_and_percent_of_roof_on_a_made_up_machine():
    peak, bw = 100 * TF, 1 * TB
    assert roofline.ridge(peak, bw) == pytest.approx(100)
    assert roofline.attainable(10, peak, bw) == pytest.approx(10 * TF)  # memory slope
    assert roofline.attainable(1000, peak, bw) == pytest.approx(peak)  # flat roof
    assert roofline.pct_of_roof(5 * TF, 10, peak, bw) == pytest.approx(50)
    assert roofline.pct_of_roof(50 * TF, 1000, peak, bw) == pytest.approx(50)


def test_cost_time_is_the_binding_limit():
    c = roofline.Cost("k", flops=1e12, bytes=1e9)  # AI 1000
    assert c.time(100 * TF, 1 * TB) == pytest.approx(0.01) and c.bound(100 * TF, 1 * TB) == "compute"
    m = roofline.Cost("k", flops=1e9, bytes=1e9)  # AI 1
    assert m.time(100 * TF, 1 * TB) == pytest.approx(1e-3) and m.bound(100 * TF, 1 * TB) == "memory"
    assert (c + m).flops == c.flops + m.flops and c.times(3).bytes == 3e9


# ---------------------------------------------------------------- model layers vs models.estimate
@pytest.mark.parametrize("name", ["mistral-tiny", "mistral-7b", "mistral-7b-small"])
@pytest.mark.parametrize("batch,context", [(1, 0), (1, 128), (16, 511), (256, 128)])
def test_model_flops_match_estimate(name, batch, context):
    costs = roofline.model_costs(name, batch, context)
    per_token = models.estimate(name).flops_per_token(context + 1)  # the new token attends to itself too
    assert sum(c.flops for c in costs) == pytest.approx(batch * per_token, rel=1e-12)


@pytest.mark.parametrize("name", ["mistral-tiny", "mistral-7b"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("batch,context", [(1, 128), (64, 1000)])
def test_weight_and_kv_bytes_match_estimate(name, dtype, batch, context):
    costs = roofline.model_costs(name, batch, context, dtype=dtype)
    per_token = sum(c.weight_bytes + c.kv_bytes for c in costs) / batch
    assert per_token == pytest.approx(models.estimate(name).decode_bytes_per_token(batch, context + 1, dtype))


def test_layer_has_every_kernel_once_and_groups_add_up():
    layer = roofline.layer_costs("mistral-tiny", 4, 100)
    names = [c.name for c in layer]
    assert names.count("norm") == 2 and {"q_proj", "k_proj", "v_proj", "o_proj", "attention", "gate_proj",
                                         "up_proj", "down_proj"} <= set(names)
    costs = roofline.model_costs("mistral-tiny", 4, 100)
    groups = roofline.by_group(costs)
    assert set(groups) == {"norms", "attn proj", "attention core", "mlp", "lm_head"}
    assert sum(len(v) for v in groups.values()) == len(costs) == 12 * len(layer) + 2
    assert roofline.total(costs).bytes == pytest.approx(sum(c.bytes for c in costs))


def test_attention_implementations_cost_what_they_move():
    p = models.preset("mistral-tiny")  # 32 heads, 8 KV heads: GQA
    fused, masked, eager = (roofline.attention_cost(p, 8, 1, 512, 2, impl) for impl in ("sdpa", "sdpa-masked", "eager"))
    assert fused.flops == masked.flops == eager.flops == 4 * 8 * 512 * 1024
    assert fused.kv_bytes == 2 * 8 * 512 * 256 * 2  # K and V of 8 KV heads x 32 dims, read once
    assert masked.bytes - fused.bytes == pytest.approx(4 * 8 * 512 * 1024 * 2)  # expand K,V: write + read
    assert eager.bytes - masked.bytes == pytest.approx(6 * 8 * 32 * 512 * 4)  # the fp32 score passes
    with pytest.raises(ValueError, match="sdpa"):
        roofline.attention_cost(p, 1, 1, 1, 2, "flash9")


def test_predicted_decode_is_weight_bound_at_batch_1_and_batching_shares_the_weights():
    peak, bw = 750 * TF, 3 * TB
    one = roofline.model_costs("mistral-tiny", 1, 128)
    t1 = roofline.predict_time(one, peak, bw)
    assert t1 == pytest.approx(roofline.total(one).bytes / bw, rel=0.02)
    t64 = roofline.predict_time(roofline.model_costs("mistral-tiny", 64, 128), peak, bw)
    assert t1 < t64 < 64 * t1 / 10  # a step of 64 costs more, but far less than 64 steps of 1
    assert all(c.bound(peak, bw) == "memory" for c in one)


def test_static_cache_prediction_reads_every_slot():
    base = roofline.total(roofline.model_costs("mistral-tiny", 8, 128))
    static = roofline.total(roofline.model_costs("mistral-tiny", 8, 128, attn="sdpa-masked", kv_len=512))
    assert static.kv_bytes == pytest.approx(base.kv_bytes * 512 / 129)
    assert static.bytes > base.bytes


# ---------------------------------------------------------------- ceilings, points, figure
def _result(m, n, k, dtype, seconds):
    t = timing.Timing("x", "cpu", seconds, seconds, seconds, seconds, seconds, 5, seconds)
    return hardware.GemmResult(m, n, k, dtype, 2 * m * n * k / seconds, 0.0, t)


def test_gemm_point_and_percent_of_roof():
    ceil = roofline.Ceilings(1 * TB, {"bfloat16": 100 * TF, "float8_e4m3fn": 200 * TF})
    p = roofline.gemm_point(_result(4096, 4096, 4096, "bfloat16", 2 * 4096**3 / (50 * TF)), "sq")
    assert p.ai == pytest.approx(4096 / 3) and ceil.pct(p.flops_per_s, p.ai, "bfloat16") == pytest.approx(50)
    f8 = roofline.gemm_point(_result(64, 64, 64, "float8_e4m3fn", 1e-6), "f8")
    assert f8.ai == pytest.approx(2 * 64**3 / (2 * 64 * 64 + 2 * 64 * 64))
    assert ceil.ridge("float8_e4m3fn") == pytest.approx(200)


def test_roofline_figure_has_one_roof_per_dtype_and_labels_every_point():
    ceil = roofline.Ceilings(2 * TB, {"float32": 50 * TF, "bfloat16": 700 * TF}, 3 * TB,
                             {"float32": 67 * TF, "bfloat16": 989 * TF})
    pts = [roofline.Point(1.0, 1 * TF, "bfloat16", "skinny"), roofline.Point(1000, 600 * TF, "bfloat16", "sq"),
           roofline.Point(100, 40 * TF, "float32", "sq")]
    fig = roofline.roofline_figure(pts, ceil)
    assert isinstance(fig, matplotlib.figure.Figure)
    ax = fig.axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    solid = [ln for ln in ax.lines if ln.get_linestyle() == "-"]
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--" and len(ln.get_xdata())]
    assert len(solid) == 2 and len(dashed) == 2
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["50%", "86%", "80%"]  # 1/2, 600/700, 40/50


# ---------------------------------------------------------------- measured helpers on a tiny GQA model
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, sliding_window=None)
    return MistralForCausalLM(cfg).eval()


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decode_step_matches_a_full_forward_and_repeats_exactly(tiny, cache):
    ids = roofline.token_ids(3, 10, vocab=128)
    ref = roofline.last_logits(tiny, ids)
    run, logits = roofline.decode_step(tiny, ids, cache, max_len=16)
    assert timing.rel_err(logits, ref) < 1e-5
    again = run().logits[:, -1].float()
    assert timing.rel_err(again, ref) < 1e-5  # the cache was rolled back, not grown
    assert roofline.count_ops(run) > 10
    with pytest.raises(ValueError, match="dynamic"):
        roofline.decode_step(tiny, ids, "paged")


def test_rel_err_catches_nan():
    assert not timing.rel_err(torch.tensor([float("nan"), 1.0]), torch.ones(2)) < 1


def test_components_are_checked_against_float64_and_counted(tiny):
    parts = roofline.components(tiny, 2, 7)
    assert set(parts) == set(roofline.by_group(roofline.model_costs("mistral-tiny", 1, 1)))
    for _name, (fn, err, count) in parts.items():
        assert err < 1e-5 and count >= 1
        assert torch.isfinite(fn()).all()
    assert parts["norms"][2] == 2 * 2 + 1 and parts["lm_head"][2] == 1


# ---------------------------------------------------------------- gemm_bench
def test_waves_by_hand():
    assert gemm_bench.waves(256, 132 * 128, (256, 128), 132) == (132, 1, 1.0)
    tiles, w, eff = gemm_bench.waves(256, 133 * 128, (256, 128), 132)
    assert (tiles, w) == (133, 2) and eff == pytest.approx(133 / 264)
    assert gemm_bench.waves(2048, 4224, (256, 128), 132)[1:] == (2, 1.0)  # 8 rows x 33 columns = 264 tiles


def test_tile_is_read_from_kernel_names():
    assert gemm_bench.tile_of("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == (256, 128)
    assert gemm_bench.tile_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroup") == (128, 256)
    assert gemm_bench.tile_of("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_NNT") == (64, 8)
    assert gemm_bench.tile_of(None) is None and gemm_bench.tile_of("elementwise_kernel") is None


def test_rotation_covers_twice_the_cache():
    r = gemm_bench.rotation(1, 4096, 1024, "bfloat16", 50 * 2**20)
    assert r * roofline.gemm_cost(1, 4096, 1024, 2).bytes >= 2 * 50 * 2**20 or r == 16
    assert gemm_bench.rotation(8192, 8192, 8192, "bfloat16", 50 * 2**20) == 1


def test_search_remeasures_the_fastest_and_sweep_checks_every_product():
    s = gemm_bench.search((32, 48), "float32", device="cpu", reps=3, confirm=2, progress=False)
    assert s.n_total == 8 and len(s.results) == 8
    assert (40, 40, 40) not in [(r.m, r.n, r.k) for r in s.confirmed]
    assert len(s.confirmed) in (2, 3) and s.best is s.confirmed[0]
    assert s.as_dict()["best"]["m"] == s.best.m
    rs = gemm_bench.sweep([(8, 16, 32), (1, 64, 64)], "float32", device="cpu", reps=3, progress=False)
    assert [(r.m, r.n, r.k) for r in rs] == [(8, 16, 32), (1, 64, 64)] and all(r.rel_err < 1e-5 for r in rs)


def test_outliers_name_the_rule_that_fits():
    ceil = roofline.Ceilings(1 * TB, {"bfloat16": 100 * TF})
    rows = [{"dtype": "bfloat16", "AI": 1.0, "% of roof": 20.0, "time": 5e-6},  # roof allows 1 us
            {"dtype": "bfloat16", "AI": 100.0, "% of roof": 30.0, "time": 1e-3},  # at the ridge
            {"dtype": "bfloat16", "AI": 2000.0, "% of roof": 40.0, "time": 1e-3},
            {"dtype": "bfloat16", "AI": 2000.0, "% of roof": 130.0, "time": 1e-3},
            {"dtype": "bfloat16", "AI": 2000.0, "% of roof": 80.0, "time": 1e-3}]
    why = [r["why"].split(":")[0] for r in gemm_bench.outliers(rows, ceil)]
    assert why == ["fixed per-kernel cost", "near the ridge", "too few tiles to fill every SM, or the library's "
                   "kernel choice (section 5b)", "above the roof"]


def test_launch_overhead_and_graphs_on_this_device():
    lo = gemm_bench.launch_overhead(20, device="cpu", reps=3)
    assert lo.graph_s_per_op is None and math.isfinite(lo.eager_s_per_op)
    g = timing.graphed(lambda: torch.ones(3), device="cpu")
    assert not g.is_graph and "GPU" in g.note and torch.equal(g.check(), torch.ones(3))
    assert gemm_bench.kernel_names([(8, 8, 8)], device="cpu") == [None]


def test_gemm_search_command_line_writes_its_json(tmp_path, capsys):
    out = tmp_path / "search.json"
    assert gemm_search.main(["--dtype", "float32", "--values", "32", "48", "--budget", "30", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["search"]["n_total"] == 8 and rec["search"]["best"]["rel_err"] < 1e-3 and "fingerprint" in rec
    assert "best of" in capsys.readouterr().out


def _label_boxes(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    r = FigureCanvasAgg(fig).get_renderer()
    fig.draw(r)
    return [t.get_window_extent(r) for t in fig.axes[0].texts]


def test_roofline_labels_never_overlap_on_the_h100_square_sweep():
    # the committed H100 square sweep: fp16 and bf16 points coincide, fp8's sit between them (issue 13)
    doc = json.loads((Path(__file__).parents[1] / "results/h100-80gb-hbm3/lab1.json").read_text())["sections"]
    peaks = {d: r["flops_per_s"] for d, r in doc["ceilings"]["matmul"].items()}
    ceil = roofline.Ceilings(doc["ceilings"]["bandwidth"]["read_Bps"], peaks)
    pts = [roofline.gemm_point(hardware.GemmResult(r["m"], r["n"], r["k"], d, r["flops_per_s"], 0.0, None), d)
           for d, rs in doc["sweep_square"].items() for r in rs]
    boxes = _label_boxes(roofline.roofline_figure(pts, ceil))
    assert len(boxes) == len(pts)
    hits = [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert not hits, hits


@pytest.mark.parametrize("rate,text", [(743.2e12, "743 TFLOP/s"), (1.23e12, "1.23 TFLOP/s"), (4.6e10, "46 GFLOP/s"),
                                       (1.195e9, "1.2 GFLOP/s"), (999.96e9, "1000 GFLOP/s"), (3e3, "3 kFLOP/s")])
def test_fmt_flops_keeps_three_digits(rate, text):
    assert gemm_bench.fmt_flops(rate) == text


@pytest.mark.parametrize("rate", [10 ** (e / 7) for e in range(0, 7 * 16)])
def test_fmt_flops_never_prints_a_positive_rate_as_zero(rate):
    number = gemm_bench.fmt_flops(rate).split()[0]
    assert float(number) > 0 and "e" not in number


def test_cpu_outliers_never_blame_sms_or_tiles():
    ceil = roofline.Ceilings(1e10, {"bfloat16": 1e9})
    rows = [{"dtype": "bfloat16", "AI": a, "% of roof": p, "time": t}
            for a, p, t in [(1.0, 20.0, 5e-6), (100.0, 30.0, 1e-3), (200.0, 152.0, 1e-3), (200.0, 80.0, 1e-3)]]
    why = [r["why"] for r in gemm_bench.outliers(rows, ceil, kind="cpu")]
    assert len(why) == 3 and all(w.startswith("CPU:") and "SM" not in w and "tile" not in w for w in why)
    assert "above its roof" in why[2]


def test_search_says_how_many_shapes_it_timed_and_why():
    s = gemm_bench.search((16, 24), "float32", device="cpu", reps=2, confirm=1, progress=False)
    assert s.complete and s.coverage().startswith("searched all 8 shapes")
    cut = gemm_bench.search((16, 24), "float32", device="cpu", reps=2, confirm=1, budget_s=0.0, progress=False)
    assert len(cut.results) == 1 and "searched 1 of 8 shapes" in cut.coverage() and "budget of 0 s" in cut.coverage()


def test_device_label_names_the_gpu_or_the_cpu():
    gpu = hardware.DeviceInfo("cuda", "NVIDIA H200", 1, 0, 132, None, "9.0", "Intel Xeon", 16)
    assert hardware.device_label(gpu) == "NVIDIA H200"
    assert hardware.device_label(hardware.DeviceInfo(**{**gpu.as_dict(), "count": 4})) == "NVIDIA H200 x4"
    cpu = hardware.DeviceInfo("cpu", "AMD EPYC", 1, 0, None, None, None, "AMD EPYC", 2)
    assert hardware.device_label(cpu) == "CPU (2 cores, AMD EPYC)"
