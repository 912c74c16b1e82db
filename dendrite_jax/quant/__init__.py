"""Weight quantization: the model's projections converted to FP8 (MXFP8 and per-channel E4M3),
the format being `kernels_pallas.codecs.fp8`'s."""
