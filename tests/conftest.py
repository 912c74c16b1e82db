"""Shared fixtures: the default model in our engine and in Hugging Face transformers."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M-Instruct in float32 through dendrite_jax (one instance per test session;
    scanned layers: `tests.helpers.SMOLLM`)."""
    from dendrite_jax import LLM
    from tests.helpers import SMOLLM

    return LLM(**SMOLLM)


@pytest.fixture(scope="session")
def hf_smollm():
    """(model, tokenizer) of the same GGUF loaded by transformers in float32: the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tests.helpers import SMOLLM_FILE, smollm_dir

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(smollm_dir(), gguf_file=SMOLLM_FILE,
                                                 dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir(), gguf_file=SMOLLM_FILE)
    return model, tokenizer


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each compiled CPU program holds hundreds of memory mappings until JAX's caches drop it;
    release them between test modules so the whole suite stays under vm.max_map_count."""
    yield
    import gc

    import jax

    gc.collect()
    jax.clear_caches()
