"""lab2's parallelisms (and lab3's 8-rank layouts), one module each; the mesh is always passed in.

- ``mesh``: ``ParallelDims`` (dp × tp × pp must equal the world size) and the DeviceMesh it builds.
- ``comms``: the autograd functions around each tensor-parallel collective (apart from the layers).
- ``gemm``: one GEMM over 4 ranks in every placement, by hand and with DTensor.
- ``tensor``: Megatron column/row-parallel layers, ``parallelize_module``, transformers' own TP.
- ``pipeline``: stages of decoder layers, GPipe / 1F1B / interleaved schedules, the bubble.
- ``data``: naive → bucketed → DDP → FSDP2 behind one interface.
- ``memory`` and ``scaling``: the memory model (ZeRO stages included) and the scaling laws.

Used in lab2 and lab3 §mistral-7b over 8 ranks.
"""
