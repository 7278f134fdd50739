"""labutils.decode and labutils.quant on the CPU: the lean model against HF's logits, int8 error
bounds, and the decode benchmark's bookkeeping."""

import functools

import pytest
import torch

from labutils import decode, lean, ops, quant, timing

TOL_F32 = 1e-4  # float32 everywhere: different op order only


@pytest.fixture(scope="module")
def hf():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    # GQA (8 query heads share 2 KV heads) so the folded-SDPA path is exercised
    cfg = MistralConfig(hidden_size=128, intermediate_size=448, num_hidden_layers=2, num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rope_theta=10000.0,
                        sliding_window=None, tie_word_embeddings=False)
    return MistralForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 512, (2, 11), generator=g), torch.randint(3, 512, (2, 6), generator=g)


def test_lean_matches_hf_prefill_and_cached_decode(hf, data):
    prompt, forced = data
    ref = decode.reference_logits(hf, prompt, forced)  # one pass, no cache
    assert ref.shape == (6, 2, 512)
    lm = lean.LeanMistral.from_hf(hf)
    got = decode.teacher_forced(decode.LeanStepper(lm, 2, 32), prompt, forced)  # prefill + 5 cached steps
    assert timing.rel_err(got, ref) < TOL_F32
    # the weights are HF's own tensors (fused ones concatenated), not copies of a different init
    assert lm.output.weight.data_ptr() == hf.lm_head.weight.data_ptr()
    assert torch.equal(lm.layers[1].w13.weight[:448], hf.model.layers[1].mlp.gate_proj.weight)


@pytest.mark.parametrize("attn", [a for a in lean.ATTN if a != "reduce"])
def test_every_attention_form_matches_hf(hf, data, attn):
    prompt, forced = data
    ref = decode.reference_logits(hf, prompt, forced)
    m = lean.LeanMistral.from_hf(hf, attn=attn)
    assert timing.rel_err(decode.teacher_forced(decode.LeanStepper(m, 2, 32), prompt, forced), ref) < TOL_F32
    m.attn = "nonsense"
    with pytest.raises(ValueError, match="attention"):
        m(prompt, torch.arange(prompt.shape[1]))


def test_attend_one_compiled_form_matches_eager():
    # the multiply-and-sum form that torch.compile sees, against the eager matmul form and a plain reference
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 4 if i == 0 else 16, 8, generator=g) for i in range(3))
    keep = torch.arange(16) < 11  # 11 filled cache slots of 16
    eager = lean.attend_one(q, k, v, keep)
    compiled = torch.compile(lean.attend_one, backend="aot_eager", fullgraph=True)(q, k, v, keep)
    w = torch.softmax((q @ k[:, :, :11].transpose(-1, -2)) / 8 ** 0.5, -1)
    assert timing.rel_err(eager, w @ v[:, :, :11]) < 1e-6 and timing.rel_err(compiled, eager) < 1e-6


def test_hf_steppers_match_reference(hf, data):
    prompt, forced = data
    ref = decode.reference_logits(hf, prompt, forced)
    for static in (False, True):
        r = decode.check(decode.HFStepper(hf, 2, 32, static=static), prompt, forced, ref, TOL_F32)
        assert r["rel_err"] < TOL_F32 and r["steps"] == 6


def test_check_raises_on_wrong_logits(hf, data):
    prompt, forced = data
    ref = decode.reference_logits(hf, prompt, forced)
    with pytest.raises(RuntimeError, match="tolerance"):
        decode.check(decode.HFStepper(hf, 2, 32), prompt, forced, ref + 0.1 * ref.std(), TOL_F32)
    with pytest.raises(RuntimeError):
        decode.check(decode.HFStepper(hf, 2, 32), prompt, forced, torch.full_like(ref, float("nan")), TOL_F32)


def test_quantization_error_within_half_a_step():
    w = torch.randn(64, 96) * torch.logspace(-2, 1, 64)[:, None]  # rows of very different scale
    q, s = ops.quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (ops.dequantize(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6 * s[:, None]).all()  # per-channel scales: each row its own step
    assert q.abs().amax(1).eq(127).all()  # the largest weight of each row uses the full range
    assert timing.rel_err(ops.dequantize(q, s), w) < 1e-2


@pytest.mark.parametrize("impl", quant.IMPLS)
def test_int8_linear_matches_dequantized_reference(impl):
    torch.manual_seed(2)
    lin = torch.nn.Linear(96, 64, bias=False)
    q8 = quant.Int8Linear.from_linear(lin, impl)
    x = torch.randn(3, 5, 96)
    ref = x @ ops.dequantize(q8.weight, q8.scales).T
    assert timing.rel_err(q8(x), ref) < 1e-5
    assert timing.rel_err(q8(x), lin(x)) < 2e-2  # and close to the float layer it came from


def test_quantized_copy_shares_the_rest_and_stays_close(hf, data):
    prompt, forced = data
    lm = lean.LeanMistral.from_hf(hf)
    q = quant.quantize_int8(lm)
    assert isinstance(q.layers[0].wqkv, quant.Int8Linear) and isinstance(lm.layers[0].wqkv, torch.nn.Linear)
    assert q.tok_emb.weight is lm.tok_emb.weight and q.layers[0].attn_norm is lm.layers[0].attn_norm
    assert quant.weight_bytes(q) < 0.3 * quant.weight_bytes(lm)  # float32 -> int8 (+ scales)
    ref = decode.reference_logits(hf, prompt, forced)
    err = timing.rel_err(decode.teacher_forced(decode.LeanStepper(q, 2, 32), prompt, forced), ref)
    assert 1e-5 < err < 0.05  # quantization shows, but stays small


def test_measure_counts_tokens_and_times_consistently(hf, data):
    prompt, _ = data
    lm = lean.LeanMistral.from_hf(hf)
    cost = decode.step_cost("mistral-7b-small", 2, 32, quant.weight_bytes(lm))
    for gen in (functools.partial(decode.loop_generate, decode.LeanStepper(lm, 2, 32)),
                functools.partial(decode.hf_generate, hf)):
        r = decode.measure("t", gen, prompt, 5, cost, read_Bps=1e10, peak_flops=1e11, reps=2)
        assert r.tokens == 2 * 5 and r.batch == 2 and r.new_tokens == 5
        assert 0 < r.ttft_s <= r.e2e_s and 0 < r.tpot_s <= r.e2e_s
        assert r.itl_p50_s <= r.itl_p99_s
        assert r.tok_s == pytest.approx(2 / r.tpot_s)
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 4)


def test_greedy_loops_agree(hf, data):
    prompt, _ = data
    lm = lean.LeanMistral.from_hf(hf)
    a = decode.loop_generate(decode.LeanStepper(lm, 2, 32), prompt, 6)
    b = decode.hf_generate(hf, prompt, 6)
    assert a.shape == b.shape == (2, 6)
    # float32, no near-ties at this size: the same greedy tokens, up to where ours emits EOS (generate is
    # told to make exactly 6 new tokens, so it masks EOS out: min_new_tokens)
    for row_a, row_b in zip(a.tolist(), b.tolist()):
        n = row_a.index(hf.config.eos_token_id) if hf.config.eos_token_id in row_a else 6
        assert row_a[:n] == row_b[:n]


def test_mbu_and_cost_formulas():
    # made-up numbers: 14 GB per step in 7 ms on a 2.8 TB/s memory is 14e9 / 7e-3 / 2.8e12 = 71.4%
    assert decode.mbu(14e9, 7e-3, 2.8e12) == pytest.approx(14 / 7 / 2.8)
    c = decode.step_cost("mistral-7b", batch=4, context=100, weight_bytes=14e9)
    kv_per_token = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads of 128, bf16
    assert c.bytes == pytest.approx(14e9 + 4 * 100 * kv_per_token)
    assert c.time(1e15, 2.8e12) == pytest.approx(c.bytes / 2.8e12)  # batch 4: memory-bound
    assert decode.usd_per_million_tokens(100.0, 3.6) == pytest.approx(10.0)  # 360k tokens per $3.6-hour


def test_batch_sweep_leaves_model_untouched(hf):
    lm = lean.LeanMistral.from_hf(hf).setup_cache(1, 16)
    cache = lm.layers[0].k_cache
    rows = decode.batch_sweep(lm, "mistral-7b-small", [1, 3], 8, 1e10, 1e11, max_time_s=0.05)
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["tok_s"] > 0 and r["rel_err_graph_vs_eager"] < 1e-6 for r in rows)
    assert lm.layers[0].k_cache is cache


def test_profile_reports_busy_and_top(hf, data):
    prompt, _ = data
    p = decode.profile_decode(decode.HFStepper(hf, 2, 32, static=False), prompt, steps=2, top=3)
    assert 0 < p["busy_fraction"] <= 1.0 + 1e-6 and p["launches_per_token"] > 10
    assert len(p["top"]) == 3 and p["top"][0]["us/token"] >= p["top"][-1]["us/token"]
    # busy is the union of op intervals inside the profiled wall time: never more than that wall (the old
    # sum of op totals against the unprofiled wall printed "wall 102 ms, inside kernels 129 ms (92 % busy)")
    assert p["busy_s_per_token"] <= p["wall_profiled_s_per_token"] * (1 + 1e-6)
    assert abs(p["busy_fraction"] - p["busy_s_per_token"] / p["wall_profiled_s_per_token"]) < 1e-9


def test_union_counts_overlapping_kernels_once():
    from labutils import profiling

    assert profiling.union_s([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17  # sum would be 23
    assert profiling.union_s([]) == 0


def test_quiet_fds_drops_profiler_lines_and_keeps_the_rest(capfd):
    import os

    from labutils import profiling

    with profiling.quiet_fds():
        os.write(1, b"STAGE:2026 ActivityProfilerController.cpp USDT profiler_start\n")
        os.write(2, b"a real warning\n")
    out, err = capfd.readouterr()
    assert "USDT" not in out + err and "a real warning" in err


@pytest.mark.parametrize("impl", list(quant.LIBRARY))
def test_library_rungs_match_the_baseline(hf, data, impl):
    # the library int8 rungs (PyTorch's int8 kernel, torchao) on the lean model, checked like every rung
    prompt, forced = data
    ref = decode.reference_logits(hf, prompt, forced)
    lm = lean.LeanMistral.from_hf(hf)
    w_before = lm.layers[0].w13.weight.clone()
    if impl == "torchao":
        pytest.importorskip("torchao", reason="torchao is optional (requirements.txt); its fallback is tested below")
    model, ran, why = quant.library_int8(lm, impl)
    assert (ran, why) == (impl, "")  # both run on this CPU's torch (torchao 0.18.0 when installed)
    chk = decode.check(decode.LeanStepper(model, 2, 32), prompt, forced, ref, decode.INT8_TOL)
    assert 1e-4 < chk["rel_err"] < 0.05  # int8 weights: about 1 % per matrix, never bit-equal to float32
    assert torch.equal(lm.layers[0].w13.weight, w_before)  # the original keeps its float weights
    assert type(lm.layers[0].w13.weight) is torch.nn.Parameter
    # int8 + one scale per row: about a quarter of the float32 bytes (the embedding is not counted)
    assert 0.24 < quant.weight_bytes(model) / quant.weight_bytes(lm) < 0.30


def test_torchao_missing_falls_back_to_its_maths_and_says_why(hf, data, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError, installed or not
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    prompt, forced = data
    model, ran, why = quant.library_int8(lean.LeanMistral.from_hf(hf), "torchao")
    assert ran == "dequant" and "torchao cannot run here" in why and "pip install torchao==0.18.0" in why
    ref = decode.reference_logits(hf, prompt, forced)  # the fallback is checked like every rung
    assert decode.check(decode.LeanStepper(model, 2, 32), prompt, forced, ref, 0.05)["rel_err"] > 1e-4
    assert all(m.impl == "dequant" for m in model.modules() if isinstance(m, quant.Int8Linear))
    with pytest.raises(ValueError, match="use one of"):
        quant.library_int8(model, "triton")


def test_rung_labels_name_what_ran():
    cpu = decode.rung_label("d': hand kernels", "triton", "triton", compiled=False, kernels=False)
    assert "eager" in cpu and "plain torch" in cpu and "compiled" not in cpu
    gpu = decode.rung_label("d': hand kernels", "triton", "triton", compiled=True, kernels=True)
    assert "compiled" in gpu and "plain torch" not in gpu
    lib = decode.rung_label("e: lean int8", "reduce", "torchao", compiled=True, kernels=True)
    assert "(library)" in lib.split(" [")[0] and "torchao" in lib.split(" [")[0]  # the tick (no brackets) says it
    assert "(library)" not in decode.rung_label("e: lean int8", "reduce", "dequant", True, True)
    stand_in = decode.rung_label("e: lean int8", "reduce", "dequant", False, False, instead_of="torchao")
    assert "torchao's maths in plain torch" in stand_in.split(" [")[0] and "(library)" not in stand_in
    assert "plain torch" in cpu.split(" [")[0]  # on a CPU the tick itself says the kernels did not run


def test_int8pack_decode_steps_run_the_library_kernel(monkeypatch):
    # the library rung must really call torch._weight_int8pack_mm at a decode step (B sequences x 1 token), and a
    # prefill (many tokens) takes the dequant maths
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a[0].shape) or real(*a))
    lin = quant.Int8Linear.from_linear(torch.nn.Linear(64, 32, bias=False), "int8pack")
    ref = ops.dequantize(lin.weight, lin.scales)
    for shape in ((2, 1, 64), (1, 64), (2, 5, 64)):
        x = torch.randn(*shape)
        assert timing.rel_err(lin(x), x @ ref.T) < 1e-5
    assert calls == [(2, 64), (1, 64)]
