"""One new token's attention in one Triton kernel: RoPE, the KV-cache write and GQA attention over the cache
(lab4 §Rung d′; the lean model's ``attn="triton"``).

At batch 1 the attention of a decode step is tiny work -- 32 query heads of 128 over a few hundred cached
tokens -- but written in torch it is six or seven small kernels per layer (RoPE of q and of k, two cache
writes, scores, softmax, weighted sum of V), each a few microseconds of launch and ramp-up. Here one
program per (sequence, KV head) does all of it:

1. it reads the new k and v of its KV head from the q/k/v projection's output, rotates k (RoPE, the
   halves convention of HF Mistral) and writes both into the cache at position ``pos``;
2. it rotates its ``G`` query heads (GQA: the heads that share this KV head) and scales them;
3. it walks the cache slots before ``pos`` in blocks of ``BLOCK_S`` with an online softmax (flash
   attention's running max and sum), scores and weighted sum as ``tl.dot`` on the tensor cores (the G
   query rows padded to 16); the new token itself is counted from registers, so nothing reads a slot
   this program has just written.

Only ``pos + 1`` slots are read, not the whole preallocated cache. ``split`` > 1 spreads each head's slots
over that many programs (flash-decoding): each writes its running max, sum and weighted values, counts
itself in with one atomic, and the last of the head's programs to finish combines them (and resets the
count). On the H200 that only pays past a few hundred tokens -- a 32-layer sweep (``sweep``) timed
8.1 µs per call at position 383 with one program per head and 7.1 with 4, but 4.2 against 5.4 at
position 128, where the combine's extra round trip costs more than the shorter walk saves -- so the
default (``SPLIT``) is 1 at the lab's lengths; lab4's exercise 7 asks where the crossover lies.

Without Triton or a GPU, ``attend`` is the same maths in torch (``reference``). Tested against it on the
CPU through Triton's interpreter (tests/gemv_interpreted.py). Used in lab4 §Rung d′ and §Rung e.
"""

from __future__ import annotations

import torch

from .. import ops
from . import _triton
from ._triton import tl, triton  # the Triton modules themselves (None without Triton), for the kernel code

if triton is not None:

    @triton.jit
    def _attn_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, y_ptr, part_ptr, pml_ptr, lock_ptr, S, scale,
                     H: tl.constexpr, KV: tl.constexpr, G: tl.constexpr, HD: tl.constexpr, BLOCK_S: tl.constexpr,
                     SPLIT: tl.constexpr, PDL: tl.constexpr):
        b, h, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        _triton.pdl_wait(PDL)  # everything this kernel reads but the cache comes from the kernel before it
        p = tl.load(pos_ptr)
        d = tl.arange(0, HD)
        partner = (d + HD // 2) % HD  # rotate_half: (-x2, x1)
        sign = tl.where(d < HD // 2, -1.0, 1.0)
        cos, sin = tl.load(cos_ptr + p * HD + d).to(tl.float32), tl.load(sin_ptr + p * HD + d).to(tl.float32)
        row = qkv_ptr + b * (H + 2 * KV) * HD
        k_at, v_at = row + (H + h) * HD, row + (H + KV + h) * HD
        k = tl.load(k_at + d).to(tl.float32) * cos + sign * tl.load(k_at + partner).to(tl.float32) * sin
        v = tl.load(v_at + d)
        k = k.to(kc_ptr.dtype.element_ty)
        cache = (b * KV + h) * S * HD
        if sp == 0:  # one program per head writes the new k, v (no program reads slot p from the cache)
            tl.store(kc_ptr + cache + p * HD + d, k)
            tl.store(vc_ptr + cache + p * HD + d, v)
        g = tl.arange(0, 16)  # query rows: the first G are this KV head's query heads
        gm = g < G
        q_at = row + (h * G + g)[:, None] * HD
        q = tl.load(q_at + d[None, :], mask=gm[:, None], other=0).to(tl.float32) * cos[None, :] + sign[None, :] * \
            tl.load(q_at + partner[None, :], mask=gm[:, None], other=0).to(tl.float32) * sin[None, :]
        q = q.to(kc_ptr.dtype.element_ty)  # rounded like the cached k: the same q as the torch path
        # the new token's own score and value, from registers, in split 0's running sums (the others start empty)
        m_i = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1) * scale
        m_i = tl.where(sp == 0, m_i, float("-inf"))
        l_i = tl.where(sp == 0, 1.0, 0.0) + tl.zeros((16,), tl.float32)
        acc = tl.zeros((16, HD), tl.float32) + tl.where(sp == 0, v.to(tl.float32), 0.0)[None, :]
        chunk = tl.cdiv(tl.cdiv(p, SPLIT), 16) * 16  # this program's slots of the p cached ones: [lo, hi)
        lo = sp * chunk
        hi = tl.minimum(lo + chunk, p)
        for s0 in range(lo, hi, BLOCK_S):
            rs = s0 + tl.arange(0, BLOCK_S)
            sm = rs < hi
            kb = tl.load(kc_ptr + cache + rs[:, None] * HD + d[None, :], mask=sm[:, None], other=0)
            s = tl.where(sm[None, :], tl.dot(q, tl.trans(kb)) * scale, float("-inf"))  # (16, BLOCK_S)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha, pr = tl.exp(m_i - m_new), tl.exp(s - m_new[:, None])
            vb = tl.load(vc_ptr + cache + rs[:, None] * HD + d[None, :], mask=sm[:, None], other=0)
            acc = acc * alpha[:, None] + tl.dot(pr.to(vb.dtype), vb)
            l_i, m_i = l_i * alpha + tl.sum(pr, axis=1), m_new
        _triton.pdl_launch_next(PDL)
        out_at = y_ptr + b * H * HD + (h * G + g)[:, None] * HD + d[None, :]
        if SPLIT == 1:
            tl.store(out_at, (acc / l_i[:, None]).to(y_ptr.dtype.element_ty), mask=gm[:, None])
        else:  # flash-decoding: write this split's sums; the head's last program to finish combines them
            head = b * KV + h
            at = (head * SPLIT + sp) * 16
            tl.store(part_ptr + (at + g)[:, None] * HD + d[None, :], acc, mask=gm[:, None])  # the G real rows
            tl.store(pml_ptr + 2 * (at + g), m_i, mask=gm)
            tl.store(pml_ptr + 2 * (at + g) + 1, l_i, mask=gm)
            tl.debug_barrier()  # every thread's partial sums are written before the count below is taken
            if tl.atomic_add(lock_ptr + head, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:  # the last one
                tl.atomic_xchg(lock_ptr + head, 0)  # the head's count back to 0 for the next call (all have counted)
                m_all = tl.full((16,), float("-inf"), tl.float32)
                for j in range(SPLIT):
                    m_all = tl.maximum(m_all, tl.load(pml_ptr + 2 * (head * SPLIT * 16 + j * 16 + g), mask=gm,
                                                      other=0, cache_modifier=".cg"))  # from L2: other SMs wrote them
                num = tl.zeros((16, HD), tl.float32)
                den = tl.zeros((16,), tl.float32)
                for j in range(SPLIT):
                    at_j = head * SPLIT * 16 + j * 16
                    w = tl.exp(tl.load(pml_ptr + 2 * (at_j + g), mask=gm, other=0, cache_modifier=".cg") - m_all)
                    den += w * tl.load(pml_ptr + 2 * (at_j + g) + 1, mask=gm, other=1, cache_modifier=".cg")
                    num += w[:, None] * tl.load(part_ptr + (at_j + g)[:, None] * HD + d[None, :], mask=gm[:, None],
                                                other=0, cache_modifier=".cg")  # w = 0: a split with no slots
                tl.store(out_at, (num / den[:, None]).to(y_ptr.dtype.element_ty), mask=gm[:, None])

    @torch.library.custom_op("smml::decode_attn", mutates_args=("k_cache", "v_cache", "locks"))
    def _attn_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, locks: torch.Tensor, block_s: int,
                 split: int) -> torch.Tensor:
        B, KV, S, HD = k_cache.shape
        H = qkv.shape[-1] // HD - 2 * KV
        y, pdl = qkv.new_empty((B, H * HD)), _triton.pdl_ok(qkv)
        part = qkv.new_empty((B * KV * split * 16, HD), dtype=torch.float32) if split > 1 else y
        pml = qkv.new_empty((B * KV * split * 16, 2), dtype=torch.float32) if split > 1 else y
        _attn_kernel[(B, KV, split)](qkv, cos, sin, pos, k_cache, v_cache, y, part, pml, locks, S, HD ** -0.5,
                                     H=H, KV=KV, G=H // KV, HD=HD, BLOCK_S=block_s, SPLIT=split, PDL=pdl,
                                     num_warps=4, launch_pdl=pdl, enable_fp_fusion=True)
        return y

    @_attn_op.register_fake
    def _(qkv, cos, sin, pos, k_cache, v_cache, locks, block_s, split):
        B, KV, _, HD = k_cache.shape
        return qkv.new_empty((B, qkv.shape[-1] - 2 * KV * HD))


def reference(qkv, cos, sin, pos, k_cache, v_cache) -> torch.Tensor:
    """The kernel's maths in torch: writes k (rotated) and v at ``pos`` into the caches, returns (B, H * hd)."""
    B, KV, S, hd = k_cache.shape
    H = qkv.shape[-1] // hd - 2 * KV
    q, k, v = qkv.view(B, H + 2 * KV, hd).split([H, KV, KV], dim=1)
    cos, sin = cos[pos], sin[pos]
    k_cache[:, :, pos] = ops.rope(k, cos, sin).to(k_cache.dtype)[:, :, None]
    v_cache[:, :, pos] = v.to(v_cache.dtype)[:, :, None]
    q = ops.rope(q, cos, sin).to(k_cache.dtype).float().view(B, KV, H // KV, hd)
    n = int(pos) + 1
    s = (q @ k_cache[:, :, :n].float().transpose(-1, -2)) * hd ** -0.5
    return (torch.softmax(s, -1) @ v_cache[:, :, :n].float()).to(qkv.dtype).reshape(B, H * hd)


#: Programs per (sequence, KV head) at batch 1 (flash-decoding). Chosen on the H200 by ``sweep``
#: (results/h200/NOTES.md); ``split_for`` lowers it where the heads alone fill the GPU.
SPLIT = 1


def split_for(heads: int, sms: int | None, split: int = SPLIT) -> int:
    """How many programs to give each of ``heads`` (sequence, KV head) pairs on a GPU of ``sms`` SMs: ``split``,
    halved until the grid is at most 2 programs per SM (a batch of many sequences fills the GPU by itself);
    ``sms`` None (Triton's interpreter on a CPU): ``split`` as it is."""
    if not isinstance(split, int) or split < 1:
        raise ValueError(f"split is a number of programs per head (1, 2, 4, ...), not {split!r}")
    while sms is not None and split > 1 and heads * split > 2 * sms:
        split //= 2
    return split


def locks_for(k_cache: torch.Tensor) -> torch.Tensor:
    """The counters the split kernel needs, one int32 per (sequence, KV head), zero (it leaves them zero)."""
    return torch.zeros(k_cache.shape[0] * k_cache.shape[1], dtype=torch.int32, device=k_cache.device)


def attend(qkv, cos, sin, pos, k_cache, v_cache, locks=None, block_s: int = 64, split: int | None = None):
    """Attention of one new token per sequence: ``qkv`` (B, (H + 2 KV) * hd), the q/k/v projection's output;
    ``cos``, ``sin``: the RoPE tables (S, hd), read at row ``pos`` (a one-element tensor) inside the kernel
    (indexing them in torch cost a gather kernel per layer); caches (B, KV, S, hd), written at ``pos``;
    ``locks``: ``locks_for(k_cache)``, kept by the caller (made here if None); ``split``: programs per head
    (default ``split_for`` of ``SPLIT``). -> (B, H * hd). The kernel on a GPU (launched with PDL where
    ``_triton.pdl_ok``), else ``reference``."""
    if not _triton.available(qkv):
        return reference(qkv, cos, sin, pos, k_cache, v_cache)
    sms = torch.cuda.get_device_properties(qkv.device).multi_processor_count if qkv.is_cuda else None
    split = split_for(k_cache.shape[0] * k_cache.shape[1], sms, SPLIT if split is None else split)
    return torch.ops.smml.decode_attn(qkv.contiguous(), cos.contiguous(), sin.contiguous(), pos, k_cache, v_cache,
                                      locks_for(k_cache) if locks is None else locks, block_s, split)


def sweep(positions=(128, 256, 383), splits=(1, 2, 4, 8, 16), block_s=(64, 128), layers: int = 32, batch: int = 1,
          heads: int = 32, kv_heads: int = 8, head_dim: int = 128, max_len: int = 512, device=None) -> list[dict]:
    """Time the kernel for each (position, split, block_s) at a model's shape (default Mistral-7B's), each
    first checked against ``reference``. Timing: ``labutils.timing`` over a CUDA graph of one call per layer,
    each layer with its own cache (as in the model, where each comes from HBM). -> rows (pos, split,
    block_s, us per call, rel err). Needs a GPU with triton (the sweep of results/h200/NOTES.md)."""
    from .. import timing

    dev = torch.device(device or "cuda")
    if _triton.triton is None or dev.type != "cuda":
        raise RuntimeError("decode_attn.sweep needs a CUDA GPU and triton")
    g = torch.Generator(dev).manual_seed(0)
    dt, B, KV, HD = torch.bfloat16, batch, kv_heads, head_dim
    qkv = torch.randn(B, (heads + 2 * KV) * HD, device=dev, generator=g).to(dt)
    ang = torch.rand(max_len, HD // 2, device=dev, generator=g) * 6
    cos, sin = torch.cat((ang, ang), -1).cos().to(dt), torch.cat((ang, ang), -1).sin().to(dt)
    caches = [(torch.randn(B, KV, max_len, HD, device=dev, generator=g).to(dt),
               torch.randn(B, KV, max_len, HD, device=dev, generator=g).to(dt)) for _ in range(layers)]
    locks = locks_for(caches[0][0])
    rows = []
    for pos in positions:
        p = torch.tensor([pos], device=dev)
        want = reference(qkv, cos, sin, p, caches[0][0].clone(), caches[0][1].clone())
        for split in splits:
            for bs in block_s:
                row = {"pos": pos, "split": split, "block_s": bs}
                try:
                    row["rel err"] = err = timing.rel_err(
                        attend(qkv, cos, sin, p, caches[0][0].clone(), caches[0][1].clone(), locks, bs, split), want)
                    if not err < 1e-2:
                        raise RuntimeError(f"wrong result: rel err {err:.2e}")
                    run = timing.graphed(lambda p=p, s=split, b=bs: [attend(qkv, cos, sin, p, kc, vc, locks, b, s)
                                                                     for kc, vc in caches], dev)
                    t = timing.benchmark(run.run, device=dev, warmup=2, reps=20, max_time_s=0.2)
                    row |= {"us": 1e6 * t.median_s / layers, "spread": t.spread}
                except Exception as e:  # noqa: BLE001 - reported in its row, not chosen
                    row["error"] = f"{type(e).__name__}: {str(e)[:100]}"
                rows.append(row)
    return rows
