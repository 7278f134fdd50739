"""lab2: the parallelisms, one module each (mesh, comms, gemm, tensor, memory; pipeline, data, scaling).

Used in lab2 and lab3.
"""
