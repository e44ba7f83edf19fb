"""Arithmetic shared by the adaptive transforms' running statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def finite_ema(old: jax.Array, new: jax.Array, decay: jax.Array) -> jax.Array:
    """``decay * old + (1 - decay) * new``, finite whenever ``old`` and ``new`` are.

    Near the float32 maximum the two rounded products can sum past it; the rare
    fallback ``old + (1 - decay) * (new - old)`` stays between ``old`` and ``new``.
    """
    fast = decay * old + (1 - decay) * new
    return jnp.where(jnp.isfinite(fast), fast, old + (1 - decay) * (new - old))
