"""Search over token sequences: beam search with beams sharing KV pages copy-on-write."""

from dendrite_jax.search.beam import BeamSearchOutput, BeamSearchParams, BeamSequence, beam_search

__all__ = ["BeamSearchOutput", "BeamSearchParams", "BeamSequence", "beam_search"]
