"""Every optaxclip transform, built the same way for the integration tests.

The one list of transforms is ``optaxclip._catalog`` (the benchmarks and the multi-device
and multi-process checks build the same entries); test_conformance.py, test_flax.py,
test_orbax.py, test_composition.py and test_state_types.py run each of its entries on
the small models and data below.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip._catalog import BY_NAME, NAMES  # noqa: F401 - re-exported to the tests

LEARNING_RATE = 1e-2


def adamw(learning_rate: float = LEARNING_RATE) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, weight_decay=1e-4)


# A small linear model whose parameters come in three dtype mixes, trained on batches
# with an occasional spike (every 9th batch is 30x larger), for the tests that run a
# transform for many compiled steps (test_orbax.py, test_state_types.py).
TREES = ("float32", "bfloat16", "mixed")
_TREE_DTYPES = {
    "float32": (jnp.float32, jnp.float32, jnp.float32),
    "bfloat16": (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
    "mixed": (jnp.float32, jnp.float32, jnp.bfloat16),
}


def linear_params(tree: str) -> dict[str, jax.Array]:
    """Parameters ``w`` (4, 3), ``b`` (3,) and ``e`` (4, 3) in the dtypes of ``tree``."""
    rng = np.random.RandomState(0)
    w_dtype, b_dtype, e_dtype = _TREE_DTYPES[tree]
    return {
        "w": jnp.asarray(rng.normal(size=(4, 3)) * 0.5, w_dtype),
        "b": jnp.asarray(rng.normal(size=(3,)) * 0.1, b_dtype),
        "e": jnp.asarray(rng.normal(size=(4, 3)) * 0.1, e_dtype),
    }


def linear_batches(steps: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """``steps`` batches ``(x, y)`` of a linear target, every 9th one a 30x spike."""
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(steps, 8, 4)).astype(np.float32)
    x[8::9] *= 30.0
    y = x @ rng.normal(size=(4, 3)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def _linear_loss(params, x, y):
    f32 = {k: v.astype(jnp.float32) for k, v in params.items()}
    pred = x @ (f32["w"] + f32["e"]) + f32["b"]
    return jnp.mean(jnp.square(pred - y))


TRACES: collections.Counter = collections.Counter()


@functools.cache
def train_step(name: str) -> tuple[optax.GradientTransformation, Callable]:
    """``(tx, step)`` for a case: ``step(params, state, x, y) -> (params, state)`` is
    jitted once and shared by the tests; ``TRACES[name]`` counts its traces."""
    tx = BY_NAME[name].optimizer()

    def step(params, state, x, y):
        TRACES[name] += 1
        grads = jax.grad(_linear_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return tx, jax.jit(step)

