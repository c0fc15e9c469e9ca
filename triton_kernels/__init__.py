"""Triton kernels of fastseg, one module per op."""
