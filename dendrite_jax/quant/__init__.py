"""Weight quantization: FP8 (MXFP8 and per-channel E4M3) projections the model multiplies by."""
