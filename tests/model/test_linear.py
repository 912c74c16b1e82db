"""Matmul precision: float32 weights must not run in a GPU's TF32-class default."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from dendrite_jax.model.linear import linear


def _dot_precisions(fn, *args) -> list:
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [eqn.params["precision"] for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general"]


@pytest.mark.parametrize("dtype, highest", [(jnp.float32, True), (jnp.bfloat16, False)])
def test_linear_precision_follows_the_weights(dtype, highest):
    x, w = jnp.ones((3, 8), dtype), jnp.ones((8, 4), dtype)
    (precision,) = _dot_precisions(linear, x, w)
    is_highest = precision is not None and all(
        p == jax.lax.Precision.HIGHEST for p in precision)
    assert is_highest == highest, precision
