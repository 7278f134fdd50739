"""The Triton import and what every kernel of ``labutils.kernels`` shares: can a kernel run here
(``available``), may it use programmatic dependent launch (``pdl_ok``, switched off for A/B runs with
``PDL = False``), and the two PDL intrinsics called inside the kernels (``pdl_wait``, ``pdl_launch_next``).

Without Triton (a CPU build of torch) ``triton`` and ``tl`` are None, nothing here is compiled, and every
layer takes its plain-torch path. Used in lab4 §Rung d′ (through ``kernels.gemv`` and
``kernels.decode_attn``).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU build of torch without triton: the layers take the plain path
    triton = tl = None

PDL = True  # False: no kernel here is launched with PDL (for A/B runs; set before tuning)


def available(x: torch.Tensor) -> bool:
    """The Triton kernels can run on ``x``'s device (a CUDA GPU with triton installed)."""
    return triton is not None and x.is_cuda


def pdl_ok(t: torch.Tensor) -> bool:
    """Kernels on ``t``'s device may use programmatic dependent launch: Triton, and a Hopper or newer GPU,
    where a kernel can begin (read its weights) while the one before it finishes, and waits on the
    instruction ``griddepcontrol.wait`` before it reads what that kernel wrote."""
    return PDL and triton is not None and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9 and \
        hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")


if triton is not None:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """With PDL: wait until the kernel before this one has finished and its writes are visible. Call it
        before any read of an activation and before any write; the weights may be asked for before it."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def pdl_launch_next(PDL: tl.constexpr):
        """With PDL: once every program has called this (or ended), the next kernel may launch. Called after
        the main loop, in the tail: the next kernel's programs take the SMs this one's last programs free
        (calling it at the start let a chain of kernels crowd in, each holding SMs while it waited: the
        int8 rung lost 4 %)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
