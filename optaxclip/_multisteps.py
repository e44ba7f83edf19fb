"""A ``should_skip_update_fn`` for ``optax.MultiSteps`` built on the robust global norm."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optaxclip._mechanics import measure
from optaxclip._stats import as_float32
from optaxclip._validation import check_threshold, threshold_at

__all__ = ["skip_nonfinite_microbatch"]


def skip_nonfinite_microbatch(
    updates: Any, gradient_step: Any, params: Any, *, max_norm: Any = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Tells ``optax.MultiSteps`` to drop a micro-batch whose gradient holds a NaN or inf.

    Pass it as ``optax.MultiSteps(opt, k, should_skip_update_fn=...)`` (Optax's
    ``ShouldSkipUpdateFunction`` signature): a dropped micro-batch never enters the
    gradient accumulator and does not count towards the ``k``, so one NaN micro-batch
    does not poison the accumulated gradient of the other ``k - 1``. The decision reads
    the global norm of the micro-batch, measured as :func:`optaxclip.global_norm` does
    (one float32 pass, NaN/inf exactly when an element is NaN/inf), which it also
    reports for logging in ``state.skip_state["norm"]``.

    With ``max_norm`` it also drops a micro-batch whose norm exceeds it: the robust form
    of ``optax.skip_large_updates``, which squares in the leaf's dtype and so drops every
    fp16 micro-batch of norm above 256, and every float32 one above ~1.8e19, whatever
    the limit. ``optax.skip_not_finite`` (which counts the non-finite elements) drops the
    same micro-batches as this predicate without ``max_norm``; this one also reports the
    norm, and takes the limit.

    Args:
      updates: the micro-batch's gradients (floating point or complex leaves).
      gradient_step: ``MultiStepsState.gradient_step``, at which a ``max_norm``
        schedule is evaluated.
      params: unused (part of the signature ``optax.MultiSteps`` calls).
      max_norm: also drop a micro-batch whose global norm exceeds this (a non-negative
        scalar or an ``optax.Schedule`` of the gradient step); None (the default) drops
        only NaN/inf. Bind it with ``functools.partial``.

    Returns:
      ``(should_skip, aux)``: a bool scalar, and ``{"should_skip": ..., "norm": ...}``
      (the micro-batch's float32 global norm), which ``optax.MultiSteps`` keeps as
      ``state.skip_state``.

    References:
      Micikevicius et al., `Mixed Precision Training
      <https://arxiv.org/abs/1710.03740>`_, 2018 (skipping the steps whose gradients
      overflowed).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optaxclip
      >>> opt = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2,
      ...                        should_skip_update_fn=optaxclip.skip_nonfinite_microbatch)
      >>> params = {"w": jnp.zeros(2)}
      >>> state = opt.init(params)
      >>> for g in ([1.0, 2.0], [jnp.nan, 0.0], [3.0, 4.0]):
      ...     updates, state = opt.update({"w": jnp.array(g)}, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params["w"])  # minus the mean of the two finite micro-batches
      [-2. -3.]
      >>> print(float(state.skip_state["norm"]), bool(state.skip_state["should_skip"]))
      5.0 False
    """
    del params
    check_threshold("max_norm", max_norm, allow_none=True)
    norm = measure(updates)
    skip = ~jnp.isfinite(norm)
    if max_norm is not None:
        step = jnp.asarray(gradient_step, jnp.int32)
        skip = skip | (norm > threshold_at(max_norm, step, "max_norm", norm.dtype))
    return skip, {"should_skip": skip, "norm": as_float32(norm)}
