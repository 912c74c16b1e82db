"""Attention and matmul kernels, each with a pure-JAX reference that is its oracle, and the
formats they decode (`codecs`). Imports nothing of `dendrite_jax`, which builds on it."""
