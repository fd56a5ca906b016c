"""Triton kernels of rlaif_fast (installed as ``rlaif_fast.kernels``).

Only ``@triton.jit`` functions and their plain launchers live here: no autograd, no input checks, no
policy. The public, checked, differentiable ops are in ``rlaif_fast.ops``. Importing this package
imports triton; ``rlaif_fast.ops`` only imports it when a Triton path is actually taken.
"""
