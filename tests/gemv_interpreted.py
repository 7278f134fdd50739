"""The Triton kernels of labutils.kernels run by Triton's interpreter on the CPU (TRITON_INTERPRET=1 must be
set before triton is imported, so tests/test_triton_interpreted.py runs this file in a fresh process). Not collected on
its own: its name does not start with test_."""

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run by tests/test_triton_interpreted.py"

from labutils import decode, lean, ops, quant, timing  # noqa: E402
from labutils.kernels import _triton, decode_attn, gemv, gemv_tune  # noqa: E402

TOL16 = 1e-2  # bf16 outputs: rounding of the last cast only (~4e-3)


def problem(n, k, m=1, int8=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g)
    if not int8:
        w = w.to(torch.bfloat16)
        return x, w, None, x.double() @ w.double().T
    q, s = ops.quantize_per_channel(w)
    q[0, :4] = torch.tensor([-128, 127, 0, -1], dtype=torch.int8)  # the extremes of the byte
    s = s.to(torch.bfloat16)
    return x, q, s, x.double() @ (q.double() * s.double()[:, None]).T


@pytest.mark.parametrize("int8", [True, False])
@pytest.mark.parametrize("bits,acc2d", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("n,k,bn,bk,m", [(64, 256, 4, 128, 1), (70, 200, 8, 64, 2), (32, 512, 16, 512, 1)])
def test_kernel_matches_float64(int8, bits, acc2d, n, k, bn, bk, m):
    x, w, s, ref = problem(n, k, m, int8)
    err = gemv_tune.rel_err_of(gemv.Config(bn, bk, 4, 1, bits, acc2d), x, w, s, ref)  # output poisoned with NaN first
    assert err < TOL16  # NaN (an element not written) fails too


def test_fused_norm_and_residual_match_reference():
    x, w, s, _ = problem(48, 320, int8=True, seed=1)
    g = torch.randn(320, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    r = torch.randn(1, 48, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ref = gemv.reference(x.double(), w.double(), s.double(), g.double(), 1e-5, r.double())
    for cfg in (gemv.Config(8, 128, 4, 1, True), gemv.Config(16, 64, 4, 1, False)):  # ragged K: masked loads
        assert gemv_tune.rel_err_of(cfg, x, w, s, ref, norm=g, eps=1e-5, residual=r) < TOL16
    wrong = gemv.reference(x.double(), w.double(), s.double(), None, 0.0, r.double())  # norm left out
    assert gemv_tune.rel_err_of(gemv.DEFAULT, x, w, s, wrong, norm=g, eps=1e-5, residual=r) > 0.1


@pytest.mark.parametrize("opt", [{"pdl": True}, {"prmt": True}])
def test_gpu_only_options_are_refused_here(opt):
    # PDL and PRMT are inline PTX for a GPU: on a CPU tensor the launch says so instead of failing inside
    x, w, s, ref = problem(64, 256, 1, True)
    with pytest.raises(ValueError, match=next(iter(opt))):
        gemv_tune.rel_err_of(gemv.Config(8, 128, 4, 1, True, **opt), x, w, s, ref)


@pytest.mark.parametrize("fused", [None, "norm", "residual", "norm+glu"])
@pytest.mark.parametrize("acc2d", [False, True])
def test_the_tuners_problem_and_check(fused, acc2d):
    # what gemv_tune.tune checks every candidate config against before timing it (tune itself needs a GPU)
    x, w, s, kw, ref = gemv_tune._problem(48, 256, torch.int8, torch.bfloat16, torch.device("cpu"), fused)
    assert set(kw) == {None: set(), "norm": {"norm", "eps"}, "residual": {"residual"},
                       "norm+glu": {"norm", "eps", "glu"}}[fused]
    cfg = gemv.Config(8, 128, 4, 1, True, acc2d)
    assert gemv_tune.rel_err_of(cfg, x, w, s, ref, **kw) < TOL16
    if kw and "glu" not in kw:  # the same launch without the fused part computes something else
        assert gemv_tune.rel_err_of(cfg, x, w, s, ref) > 0.05
    if "glu" in kw:
        assert ref.shape == (1, 24)  # gate and up rows in, silu(gate) * up out


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    monkeypatch.setattr(_triton, "available", lambda x: True)  # the interpreter runs it on CPU tensors


def tiny_lean():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, sliding_window=None,
                        tie_word_embeddings=False)
    return lean.LeanMistral.from_hf(MistralForCausalLM(cfg).eval())


@pytest.mark.parametrize("impl", ["triton", "triton_plain"])
def test_lean_int8_through_the_kernel_matches_plain_int8(kernel_on_cpu, impl):
    lm = tiny_lean()
    prompt, forced = torch.randint(3, 256, (1, 3)), torch.randint(3, 256, (1, 2))  # 2 interpreted steps
    plain = decode.teacher_forced(decode.LeanStepper(quant.quantize_int8(lm, "dequant"), 1, 16), prompt, forced)
    q = quant.quantize_int8(lm, impl)
    assert q.layers[0].w13.fuse == (impl == "triton")
    got = decode.teacher_forced(decode.LeanStepper(q, 1, 16), prompt, forced)  # decode steps: M = 1, kernel
    assert timing.rel_err(got, plain) < 1e-5  # float32 activations: the same numbers up to summation order


def test_compiled_step_calls_the_ops(kernel_on_cpu):
    # torch.compile traces both custom ops (fake tensors give the shapes; the attention op's writes into the
    # KV cache are declared) and runs the kernels in the graph: the same logits, the same cache
    q = quant.use_gemv(tiny_lean())
    q.attn = "triton"
    st = decode.LeanStepper(q, 1, 16)
    tok, pos = torch.tensor([[7]]), torch.tensor([3])
    st.prefill(torch.randint(3, 256, (1, 3)))
    eager, k_eager = q(tok, pos), q.layers[1].k_cache.clone()
    q.layers[1].k_cache[:, :, 3] = float("nan")  # must be written again by the compiled step
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)(tok, pos)
    assert timing.rel_err(compiled, eager) < 1e-6 and timing.rel_err(q.layers[1].k_cache, k_eager) < 1e-6


@pytest.mark.parametrize("pos,block_s,split", [(0, 16, 1), (5, 16, 1), (70, 16, 1), (70, 64, 1), (0, 16, 4),
                                               (5, 16, 4), (70, 16, 2), (70, 16, 3), (70, 16, 8), (40, 64, 4)])
def test_decode_attention_kernel_matches_reference(kernel_on_cpu, pos, block_s, split):
    # split > 1: each head's slots in `split` programs (some with none at small pos), combined by the last one

    # float16, not bfloat16: Triton's interpreter (numpy) gets tl.dot on bfloat16 wrong; the GPU does not
    B, H, KV, hd, S, dt = 2, 8, 2, 32, 96, torch.float16
    g = torch.Generator().manual_seed(pos)
    qkv = torch.randn(B, (H + 2 * KV) * hd, generator=g).to(dt)
    ang = torch.rand(S, hd // 2, generator=g) * 6  # RoPE tables (S, hd): the kernel reads row pos
    cos, sin = torch.cat((ang, ang), -1).cos().to(dt), torch.cat((ang, ang), -1).sin().to(dt)
    kc = torch.randn(B, KV, S, hd, generator=g).to(dt)  # slots past pos hold junk: never read
    vc = torch.randn(B, KV, S, hd, generator=g).to(dt)
    kc2, vc2 = kc.clone(), vc.clone()
    p = torch.tensor([pos])
    want = decode_attn.reference(qkv, cos, sin, p, kc2, vc2)
    locks = decode_attn.locks_for(kc)
    got = decode_attn._attn_op(qkv, cos, sin, p, kc, vc, locks, block_s, split)  # the kernel (the op's CPU call)
    assert timing.rel_err(got, want) < 1e-2
    assert not locks.any()  # the counters are left at zero for the next call
    assert timing.rel_err(kc[:, :, pos], kc2[:, :, pos]) < 1e-2 and torch.equal(vc, vc2)  # cache written at pos
    assert torch.equal(kc[:, :, pos + 1:], kc2[:, :, pos + 1:])  # and nowhere else


def test_lean_with_both_kernels_matches_plain_lean(kernel_on_cpu):
    lm = tiny_lean()
    prompt, forced = torch.randint(3, 256, (1, 3)), torch.randint(3, 256, (1, 2))  # 2 interpreted steps
    ref = decode.teacher_forced(decode.LeanStepper(lm, 1, 16), prompt, forced)
    fast = quant.use_gemv(lm)
    fast.attn = "triton"
    got = decode.teacher_forced(decode.LeanStepper(fast, 1, 16), prompt, forced)
    assert timing.rel_err(got, ref) < 1e-5
