"""labutils.kernels.gemv: the plain-torch path on the CPU here, the Triton kernel itself through Triton's
interpreter in a fresh process (tests/gemv_interpreted.py, run by tests/test_triton_interpreted.py)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from labutils import decode, lean, ops, quant, timing
from labutils.kernels import gemv, gemv_tune

HERE = Path(__file__).parent


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (requirements-dev.txt installs it on Linux x86-64)")
def test_reference_is_norm_then_product_then_residual():
    g = torch.Generator().manual_seed(0)
    x, w, s = torch.randn(3, 64, generator=g), torch.randn(32, 64, generator=g), torch.rand(32, generator=g)
    norm, res = torch.randn(64, generator=g), torch.randn(3, 32, generator=g)
    want = res + (ops.rms_norm(x, norm, 1e-6) @ w.T) * s
    assert torch.allclose(gemv.reference(x, w, s, norm, 1e-6, res), want, atol=1e-5)
    assert torch.allclose(gemv.reference(x, w), x @ w.T, atol=1e-5)


def test_kernel_layers_on_cpu_are_the_plain_model():
    # without a GPU a kernel layer runs gemv.reference: the lean model gives the same logits, fused or not
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, sliding_window=None, tie_word_embeddings=False)
    base = lean.LeanMistral.from_hf(MistralForCausalLM(cfg).eval())
    prompt, forced = torch.randint(3, 128, (2, 5)), torch.randint(3, 128, (2, 3))
    ref = decode.teacher_forced(decode.LeanStepper(base, 2, 16), prompt, forced)
    for fuse in (True, False):
        m = quant.use_gemv(base, fuse)
        assert isinstance(m.layers[0].wo, gemv.Linear) and m.layers[0].wo.weight is base.layers[0].wo.weight
        assert timing.rel_err(decode.teacher_forced(decode.LeanStepper(m, 2, 16), prompt, forced), ref) < 1e-6
    q8 = decode.teacher_forced(decode.LeanStepper(quant.quantize_int8(base, "dequant"), 2, 16), prompt, forced)
    got = decode.teacher_forced(decode.LeanStepper(quant.quantize_int8(base, "triton"), 2, 16), prompt, forced)
    assert timing.rel_err(got, q8) < 1e-6
    assert gemv_tune.tune_model(quant.quantize_int8(base, "triton")) == []  # nothing on a GPU: nothing to tune


def test_tune_needs_a_gpu():
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        gemv_tune.tune(64, 64, device="cpu")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("prmt,acc2d,glu,pdl", [(True, False, True, True), (True, False, False, False),
                                                (False, True, True, False), (False, False, False, True)])
def test_gemv_kernel_compiles_for_hopper(prmt, acc2d, glu, pdl):
    # no GPU needed: Triton compiles to sm_90 machine code with the ptxas it ships (the PRMT and PDL variants'
    # inline assembly is only ever run on a GPU, where gemv_tune.tune checks the result against float64 first)
    import triton
    from triton.backends.compiler import GPUTarget

    sig = {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*bf16", "g_ptr": "*bf16", "r_ptr": "*bf16", "y_ptr": "*bf16",
           "N": "i32", "K": "i32", "eps": "fp32"}
    consts = {"HAS_SCALE": True, "RMS": glu, "RES": not glu, "GLU": glu, "BITS": True, "ACC2D": acc2d, "PRMT": prmt,
              "BLOCK_N": 8, "BLOCK_K": 1024, "EVEN": True, "PDL": pdl}
    src = triton.compiler.ASTSource(fn=gemv._gemv_kernel, signature=sig | dict.fromkeys(consts, "constexpr"),
                                    constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "launch_pdl": pdl,
                                                                        "enable_fp_fusion": True})
    ptx = k.asm["ptx"]
    assert ("prmt.b32" in ptx) == prmt and "cvt.rn.f32.s8" not in ptx  # no int-to-float conversion per weight
    assert "fma.rn.f32" in ptx  # each weight's multiply and add are one instruction (as gemv._launch asks)
    # PDL: the wait comes before the first load (x is the previous kernel's output), the next kernel's launch
    # is allowed after the main loop
    assert ("griddepcontrol.wait" in ptx) == pdl and ("griddepcontrol.launch_dependents" in ptx) == pdl
    if pdl:
        assert ptx.index("griddepcontrol.wait") < ptx.index("ld.global")
        assert ptx.index("griddepcontrol.wait") < ptx.index("griddepcontrol.launch_dependents")
    assert len(k.asm["cubin"]) > 1000


def test_core_loop_is_the_kernels_own_source():
    # lab4 prints this: it must be the loop that runs (read from the file), whole, from its `for` to its pointer step
    src = gemv.core_loop()
    assert src.startswith("for k0 in range(0, K") and src.rstrip().endswith("w_ptrs += BLOCK_K")
    assert "tl.load(w_ptrs" in src and "ss += x * x" in src and "acc += tl.sum(p, axis=1)" in src


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("split", [1, 8])
def test_decode_attention_kernel_compiles_for_hopper(split):
    # the split kernel's counting (one atomic per program, acquire-release at GPU scope) and its reads of the other
    # programs' sums from L2 compile for sm_90 here; the interpreter (tests/gemv_interpreted.py) checks the numbers
    import triton
    from triton.backends.compiler import GPUTarget

    from labutils.kernels import decode_attn

    ptrs = ("qkv_ptr", "cos_ptr", "sin_ptr", "kc_ptr", "vc_ptr", "y_ptr")
    sig = dict.fromkeys(ptrs, "*bf16") | {"pos_ptr": "*i64", "part_ptr": "*fp32", "pml_ptr": "*fp32",
                                          "lock_ptr": "*i32", "S": "i32", "scale": "fp32"}
    consts = {"H": 32, "KV": 8, "G": 4, "HD": 128, "BLOCK_S": 64, "SPLIT": split, "PDL": True}
    src = triton.compiler.ASTSource(fn=decode_attn._attn_kernel, signature=sig | dict.fromkeys(consts, "constexpr"),
                                    constexprs=consts)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "launch_pdl": True}).asm["ptx"]
    assert ("atom.global.gpu.acq_rel.add" in ptx) == (split > 1)
    assert ("ld.global.cg" in ptx) == (split > 1)


def test_attention_split_is_lowered_when_the_heads_fill_the_gpu():
    from labutils.kernels import decode_attn

    assert decode_attn.split_for(8, 132, 8) == 8  # batch 1, 8 KV heads: 64 programs on 132 SMs
    assert decode_attn.split_for(64 * 8, 132, 8) == 1  # batch 64: the heads alone are 512 programs
    assert decode_attn.split_for(64, 132, 16) == 4  # halved until at most 2 programs per SM (256 <= 264)
    assert decode_attn.split_for(64, None, 16) == 16  # the interpreter: as asked
    assert decode_attn.split_for(8, 132, 3) == 3  # the combine counts arrivals: any count works
    with pytest.raises(ValueError, match="programs per head"):
        decode_attn.split_for(8, 132, 0)
