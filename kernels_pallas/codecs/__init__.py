"""The formats the kernels decode, with their reference encode and decode (pure JAX): KV-cache
codes (`kv`: the compressor interface and factory; `turboquant`, `polarquant`, `qjl`; their
grids in `codebooks`, their bit packing in `bitpack`) and FP8 weights (`fp8`). A leaf: it
imports no other package of the project."""
