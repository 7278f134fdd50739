"""labutils: the small package every lab imports, one module per concept.

hardware, profile, timing, models, serving, results, launch, dist, plots, roofline,
decode, parallel: see DESIGN.md for what each owns. lab4's fast path: lean (a compact
Mistral), quant (int8 weight-only), gemv and decode_attn (hand-written Triton kernels).
"""

__version__ = "0.1.0"
