"""Attention and matmul kernels, each with a pure-JAX reference that is its oracle."""
