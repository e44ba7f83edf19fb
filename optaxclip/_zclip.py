"""ZClip (Kumar et al. 2025): z-score spike detection on an EMA of the gradient norm."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _stats
from optaxclip._global import NONFINITE_POLICIES, clip_with_threshold, measure
from optaxclip._norms import AxisName, Sharded
from optaxclip._stats import ClipStats
from optaxclip._validation import (
    check_choice,
    check_range,
    check_static_int,
    check_threshold,
    threshold_at,
)

__all__ = ["ZclipState", "zclip"]

MODES = ("zscore", "percentile")
CLIP_OPTIONS = ("adaptive_scaling", "mean")


class ZclipState(NamedTuple):
    """State of :func:`zclip`.

    Attributes:
      buffer: the raw norms of the warm-up steps (float32, length
        ``max(warmup_steps, 1)``).
      mean: the EMA of the norm (float32; 0 until the warm-up ends).
      var: the EMA of its variance (float32; 0 until the warm-up ends).
      stats: the :class:`ClipStats`. ``stats.count - stats.nonfinite_count`` is the
        number of finite norms seen, which is what the warm-up counts.
    """

    buffer: jax.Array
    mean: jax.Array
    var: jax.Array
    stats: ClipStats


def zclip(
    *,
    alpha: Any = 0.97,
    z_thresh: Any = 2.5,
    max_norm: Any = 1.0,
    warmup_steps: int = 25,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: Any = 1.0,
    eps: Any = 1e-6,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    sharded: Sharded = None,
) -> optax.GradientTransformationExtraArgs:
    """Clips gradient-norm spikes detected by a z-score on an EMA of the norm (ZClip).

    For the first ``warmup_steps`` finite norms the update is clipped by ``max_norm``
    (not at all when ``max_norm`` is None) and the raw norms are buffered; when the
    warm-up ends, ``mu`` is their mean and ``sigma^2`` their population variance. After
    that, with ``g`` the global norm and ``z = (g - mu) / (sigma + eps)``:

    - ``mode="zscore"``: a spike is ``z > z_thresh``; its threshold is
      ``tau = clip_factor * (mu + z_thresh * sigma / (z / z_thresh))`` with
      ``clip_option="adaptive_scaling"`` (larger outliers are pulled back harder) or
      ``tau = mu`` with ``clip_option="mean"``.
    - ``mode="percentile"``: a spike is ``g > mu + z_thresh * sigma`` and
      ``tau = mu + z_thresh * sigma``.

    The threshold applied (and recorded in ``ClipStats.threshold``) is
    ``min(tau if spike else g, max_norm)`` and the update is clipped by global norm at
    it. The EMA is then fed ``x = tau`` on a spike, else ``g``, both before the
    ``max_norm`` cap (as the reference implementation does, so the cap never drags the
    statistics down): ``mu <- alpha mu + (1 - alpha) x``, then
    ``sigma^2 <- alpha sigma^2 + (1 - alpha) (x - mu)^2`` with the new ``mu``.

    A NaN/inf norm is handled by ``nonfinite``; the buffer and the EMA are left as they
    were, and the warm-up counts finite norms only (such a step records ``max_norm``,
    or +inf without one, as its threshold). ``warmup_steps=0`` behaves as 1, as in the
    reference implementation: the statistics start from the first finite norm.

    Args:
      alpha: EMA decay in (0, 1).
      z_thresh: the z-score above which a norm is a spike (positive).
      max_norm: cap on the threshold, also the warm-up clip: a non-negative scalar, an
        ``optax.Schedule`` evaluated at this transform's step count, or None for no
        cap.
      warmup_steps: number of finite norms buffered before the EMA starts (a
        non-negative int; it sizes the state, so under ``optax.inject_hyperparams`` list
        it in ``static_args``).
      mode: ``"zscore"`` or ``"percentile"`` (see above).
      clip_option: with ``mode="zscore"``, ``"adaptive_scaling"`` or ``"mean"``.
      clip_factor: multiplier of the adaptive-scaling threshold (non-negative; below 1
        clips more aggressively).
      eps: added to ``sigma`` in the z-score (non-negative).
      nonfinite: ``"propagate"`` (updates unchanged), ``"zero"`` (zeros) or ``"error"``
        (raise from inside ``jit``) when the norm is NaN/inf.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis over which the norm
        is summed (see :func:`optaxclip.global_norm`).
      sharded: which leaves are sharded along ``axis_name``; default all.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`ZclipState`.

    References:
      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025; reference implementation
      https://github.com/bluorion-com/ZClip.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tx = optaxclip.zclip(warmup_steps=4, max_norm=None, clip_option="mean")
      >>> state = tx.init(None)
      >>> for g in [1.0, 1.2, 0.8, 1.0, 1.1, 9.0]:
      ...     out, state = tx.update([jnp.array([g])], state)
      ...     print(float(state.stats.threshold), round(float(out[0][0]), 4))
      inf 1.0
      inf 1.2
      inf 0.8
      inf 1.0
      1.1 1.1
      1.003 1.003
    """
    check_range("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
    check_range("z_thresh", z_thresh, 0.0, float("inf"), low_open=True)
    check_threshold("max_norm", max_norm, allow_none=True)
    check_static_int("zclip", "warmup_steps", warmup_steps, ("warmup_steps",), allow_zero=True)
    check_choice("mode", mode, MODES)
    check_choice("clip_option", clip_option, CLIP_OPTIONS)
    check_threshold("clip_factor", clip_factor)
    check_threshold("eps", eps)
    check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    size = max(warmup_steps, 1)

    def init_fn(params):
        del params
        # A buffer per field: donated steps refuse one array passed twice.
        return ZclipState(
            buffer=jnp.zeros((size,), jnp.float32),
            mean=jnp.zeros((), jnp.float32),
            var=jnp.zeros((), jnp.float32),
            stats=_stats.init_stats(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        norm = measure(updates, axis_name, sharded)
        g = norm.astype(jnp.float32)
        finite = jnp.isfinite(g)
        seen = state.stats.count - state.stats.nonfinite_count  # finite norms before this
        in_warmup = seen < size
        if max_norm is None:
            cap = jnp.full((), jnp.inf, jnp.float32)
        else:
            cap = threshold_at(max_norm, state.stats.count)

        # Warm-up: buffer the norm; the step that fills the buffer starts the EMA.
        buffered = state.buffer.at[jnp.minimum(seen, size - 1)].set(g)
        buffer = jnp.where(finite & in_warmup, buffered, state.buffer)
        start = finite & (seen == size - 1)
        start_mean = jnp.mean(buffer)
        start_var = jnp.mean(jnp.square(buffer - start_mean))

        # After warm-up: spike test against the EMA.
        a = jnp.asarray(alpha, jnp.float32)
        zt = jnp.asarray(z_thresh, jnp.float32)
        mu, var = state.mean, state.var
        sigma = jnp.sqrt(var)
        if mode == "percentile":
            tau = mu + zt * sigma
            spike = g > tau
        else:
            z = (g - mu) / (sigma + jnp.asarray(eps, jnp.float32))
            spike = z > zt
            if clip_option == "adaptive_scaling":
                eta = jnp.where(spike, z / zt, 1)  # grows with the outlier
                tau = (mu + zt * sigma / eta) * jnp.asarray(clip_factor, jnp.float32)
            else:
                tau = mu
        x = jnp.where(spike, tau, g)
        new_mu = a * mu + (1 - a) * x
        new_var = a * var + (1 - a) * jnp.square(x - new_mu)

        adapting = finite & ~in_warmup
        threshold = jnp.where(adapting, jnp.minimum(x, cap), cap)
        mean = jnp.where(start, start_mean, jnp.where(adapting, new_mu, mu))
        var = jnp.where(start, start_var, jnp.where(adapting, new_var, var))

        updates, new_stats = clip_with_threshold(
            updates, norm, threshold, state.stats, nonfinite=nonfinite, who="zclip"
        )
        return updates, ZclipState(buffer=buffer, mean=mean, var=var, stats=new_stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
