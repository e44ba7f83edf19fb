"""Every optaxclip transform, built the same way for the integration tests.

The tests in test_flax.py, test_orbax.py, test_composition.py and test_state_types.py
run each case below. Warm-ups and windows are short so that a few dozen steps exercise
the adaptive parts (ring buffers wrap, EMAs start, spikes get detected).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip

LEARNING_RATE = 1e-2


def adamw(learning_rate: float = LEARNING_RATE) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, weight_decay=1e-4)


@dataclasses.dataclass(frozen=True)
class Case:
    """One transform: its factory, its arguments, and how to vary its threshold."""

    name: str
    factory: Callable[..., optax.GradientTransformationExtraArgs]
    kwargs: dict[str, Any]
    knob: str | None = None  # the threshold-like argument `scale` multiplies
    static: tuple[str, ...] = ()  # int arguments that shape the state (inject_hyperparams)
    wraps: bool = False  # skip_*: wraps the optimizer instead of preceding it

    def build(self, scale: float = 1.0, inner: Any = None) -> optax.GradientTransformation:
        """The transform alone (for skip_*: wrapped around ``inner``, default AdamW)."""
        kwargs = dict(self.kwargs)
        if self.knob is not None:
            kwargs[self.knob] = kwargs[self.knob] * scale
        if self.wraps:
            return self.factory(adamw() if inner is None else inner, **kwargs)
        return self.factory(**kwargs)

    def optimizer(self, scale: float = 1.0, inner: Any = None) -> optax.GradientTransformation:
        """A full optimizer: ``chain(transform, inner)`` or ``transform(inner)``."""
        inner = adamw() if inner is None else inner
        if self.wraps:
            return self.build(scale, inner)
        return optax.chain(self.build(scale), inner)

    def injected(self, inner: Any = None) -> optax.GradientTransformation:
        """The transform built through ``optax.inject_hyperparams``."""
        factory = optax.inject_hyperparams(self.factory, static_args=self.static)
        if self.wraps:
            return factory(adamw() if inner is None else inner, **self.kwargs)
        return factory(**self.kwargs)


CASES = [
    Case("clip_by_global_norm", optaxclip.clip_by_global_norm, {"max_norm": 0.5}, "max_norm"),
    Case("clip_by_value", optaxclip.clip_by_value, {"max_delta": 0.05}, "max_delta"),
    Case("clip_by_block_norm", optaxclip.clip_by_block_norm, {"max_norm": 0.3}, "max_norm"),
    Case("clip_by_block_rms", optaxclip.clip_by_block_rms, {"threshold": 0.05}, "threshold"),
    Case(
        "adaptive_grad_clip",
        optaxclip.adaptive_grad_clip,
        {"clipping": 0.02, "eps": 1e-3},
        "clipping",
        static=("axis", "stacked_axes"),
    ),
    Case(
        "autoclip_window",
        optaxclip.autoclip,
        {"percentile": 25.0, "history": 6, "warmup_steps": 2},
        "percentile",
        static=("history", "warmup_steps"),
    ),
    Case(
        "autoclip_sketch",
        optaxclip.autoclip,
        {"percentile": 25.0, "warmup_steps": 2},
        "percentile",
        static=("history", "warmup_steps"),
    ),
    Case(
        "zclip",
        optaxclip.zclip,
        {"alpha": 0.9, "z_thresh": 1.0, "max_norm": 10.0, "warmup_steps": 3},
        "z_thresh",
        static=("warmup_steps",),
    ),
    Case(
        "adagc",
        optaxclip.adagc,
        {"ratio": 1.01, "beta": 0.9, "warmup_steps": 3, "warmup_max_norm": 1.0},
        "ratio",
        static=("warmup_steps",),
    ),
    Case("skip_nonfinite", optaxclip.skip_nonfinite, {}, wraps=True),
    Case(
        "skip_spikes",
        optaxclip.skip_spikes,
        {"window": 6, "min_history": 3, "num_sigmas": 1.5},
        "num_sigmas",
        static=("window", "min_history"),
        wraps=True,
    ),
]

BY_NAME = {case.name: case for case in CASES}
NAMES = [case.name for case in CASES]


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

