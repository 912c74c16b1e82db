"""A small random-weight preset whose heads (and separate output matrix's vocabulary) split
2, 4 and 8 ways."""

from __future__ import annotations

import pytest

RANDOM_MODEL = """\
[checkpoint]
format = "random"
seed = 3

[model]
vocab_size = 512
hidden_size = 128
intermediate_size = 256
num_layers = 2
num_heads = 16
num_kv_heads = 8
head_dim = 16
max_position_embeddings = 1024
tie_word_embeddings = false
"""


@pytest.fixture
def random_preset(tmp_path) -> str:
    """Path of the preset file."""
    path = tmp_path / "tp-random.toml"
    path.write_text(RANDOM_MODEL)
    return str(path)
