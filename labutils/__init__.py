"""labutils: the small package every lab imports, one module per concept (the README's "Layout" section
shows the tree; the rule: dependencies point one way, foundation <- maths/model <- experiments <- scripts and
notebooks, with no cycles and no module importing ``labutils.scripts`` -- tests/test_imports.py holds it).

- foundation: ``hardware`` (devices, datasheet peaks, measured ceilings, fingerprint), ``profile`` (the small
  and full sizes), ``timing`` (the one benchmark harness; ``rel_err``), ``results`` (atomic JSON under
  results/<gpu>/), ``plots``;
- shared maths: ``ops`` (RMSNorm, RoPE, SiLU-GLU, per-channel int8: a leaf), ``roofline`` (FLOPs, bytes,
  intensity, the roofline plot), ``gemm_bench`` (lab1's GEMM sweeps, shape search, waves, launch overhead);
- models: ``models`` (presets, loading or random weights, tokenizer, estimates), ``lean`` (a compact Mistral
  for decode), ``quant`` (int8 weight-only copies), ``decode`` (lab4's ladder and its benchmarks),
  ``kernels/`` (lab4's Triton kernels: ``gemv``, ``gemv_tune``, ``decode_attn``; never import model code);
- serving and jobs: ``serving`` (``transformers serve`` and a load client), ``launch`` (torchrun jobs from a
  notebook, simulated nodes), ``dist`` (init and rank-0 printing for scripts);
- distributed labs: ``parallel/`` (lab2's sharded GEMMs, tensor, pipeline and data parallelism, memory and
  scaling models), ``collectives`` (lab3's collective checks, busbw, alpha-beta), ``checkpoint`` (atomic,
  resumable per-rank state), ``fault`` (lab3's fault drills);
- ``scripts/``: torchrun and command-line entry points (``python -m labutils.scripts.NAME``).

Call every function by the module that defines it (``timing.rel_err``, ``lean.LeanMistral``): nothing is
re-exported.
"""

__version__ = "0.1.0"
