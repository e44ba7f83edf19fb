"""ZClip (Kumar et al. 2025): z-score spike detection on an EMA of the gradient norm."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _stats
from optaxclip._mechanics import (
    NONFINITE_POLICIES,
    clip_with_threshold,
    finite_ema,
    masked_mean_std,
    measure,
    ring_write,
)
from optaxclip._norms import AxisName, Sharded, safe_sqrt
from optaxclip._stats import ClipStats, as_float32, threshold_for_norm
from optaxclip._validation import (
    check_choice,
    check_range,
    check_static_bool,
    check_static_int,
    check_threshold,
    positive_at,
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
      var: the EMA of its variance (float32; 0 until the warm-up ends). It is computed
        without overflow for every finite norm; a variance beyond the float32 range
        (a standard deviation above ~1.8e19) is held at the largest float32.
      recorded: the number of norms the statistics have taken in (int32): the finite,
        non-zero ones. The warm-up counts these.
      stats: the :class:`ClipStats`.
    """

    buffer: jax.Array
    mean: jax.Array
    var: jax.Array
    recorded: jax.Array
    stats: ClipStats


def _saturating_square(s: jax.Array, t: jax.Array) -> jax.Array:
    """``(s * sqrt(t))**2`` for ``t`` in [0, 1], held at the largest float32."""
    std = s * safe_sqrt(t)
    return jnp.minimum(jnp.square(std), jnp.finfo(jnp.float32).max)


def _ema_var(var: jax.Array, d: jax.Array, decay: jax.Array) -> jax.Array:
    """``decay * var + (1 - decay) * d**2`` without overflow (saturating, see ZclipState).

    The plain formula runs; only where it overflowed (``d**2`` alone overflows above
    |d| ~ 1.8e19) is it recomputed scaled by ``s = max(sqrt(var), |d|)``.
    """
    fast = decay * var + (1 - decay) * jnp.square(d)
    s = jnp.maximum(safe_sqrt(var), jnp.abs(d))
    s = jnp.where(s > 0, s, 1)
    t = decay * jnp.square(safe_sqrt(var) / s) + (1 - decay) * jnp.square(d / s)
    return jnp.where(jnp.isfinite(fast), fast, _saturating_square(s, t))


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
    skip_update_on_spike: bool = False,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    sharded: Sharded = None,
) -> optax.GradientTransformationExtraArgs:
    """Clips gradient-norm spikes detected by a z-score on an EMA of the norm (ZClip).

    For the first ``warmup_steps`` finite, non-zero norms the update is clipped by ``max_norm``
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
    ``sigma^2 <- alpha sigma^2 + (1 - alpha) (x - mu)^2`` with the new ``mu``. With
    ``skip_update_on_spike=True`` a spike step leaves ``mu`` and ``sigma^2`` as they were
    (its update is still clipped at the same threshold).

    A NaN/inf norm is handled by ``nonfinite``; the buffer and the EMA are left as they
    were, and the warm-up counts finite norms only (such a step records ``max_norm``,
    or +inf without one, as its threshold). A norm of exactly zero says nothing about
    the scale of the gradients and is not taken in either: it is not buffered, not
    counted as a warm-up step and does not move the EMA, so a zero-gradient warm-up
    (a frozen or zero-initialised model) cannot lock the threshold at 0. Such a step
    passes unclipped, in the warm-up and after it, and records ``max_norm`` (+inf
    without one) as its threshold, which a zero norm never exceeds. ``warmup_steps=0``
    behaves as 1, as in the reference implementation: the statistics start from the
    first finite, non-zero norm.

    The statistics stay finite for every finite norm: the mean and the variance are
    computed without squaring a norm above ~1.8e19 (a plain float32 square of 1e20 is
    inf and would disable the spike test for good); where they fit in float32 they equal
    the reference rule to float32 rounding, and a variance beyond the float32 range is
    held at the largest float32.

    Args:
      alpha: EMA decay in (0, 1).
      z_thresh: the z-score above which a norm is a spike (positive).
      max_norm: cap on the threshold, also the warm-up clip: a non-negative scalar, an
        ``optax.Schedule`` evaluated at this transform's step count, or None for no
        cap.
      warmup_steps: number of finite, non-zero norms buffered before the EMA starts (a
        non-negative int; it sizes the state, so under ``optax.inject_hyperparams`` list
        it in ``static_args``).
      mode: ``"zscore"`` or ``"percentile"`` (see above).
      clip_option: with ``mode="zscore"``, ``"adaptive_scaling"`` or ``"mean"``.
      clip_factor: multiplier of the adaptive-scaling threshold (non-negative; below 1
        clips more aggressively).
      eps: added to ``sigma`` in the z-score (non-negative).
      skip_update_on_spike: a Python bool (default False). When True, a spike step
        does not update the EMA: ``mu`` and ``sigma^2`` keep their values and the next
        step is tested against the same statistics. The update itself is treated as
        without the option (clipped at ``min(tau, max_norm)``, recorded in
        ``ClipStats``). This is the option of the same name in the reference
        implementation, which skips "updating EMA statistics when a spike is
        detected" and still clips the gradients; it skips no optimizer update. To skip
        a spiking step altogether (zero updates, the inner optimizer's state left
        untouched; a zero update fed to Adam would still decay its moments and
        advance its count), wrap the optimizer in :func:`optaxclip.skip_spikes`.
        Caveat (as in the reference): the statistics follow only the steps that are
        not spikes, so a lasting rise of the norm past the spike threshold is never
        learned; every later step stays a spike, clipped at a ``tau`` computed from
        the frozen statistics. It picks the computation, so under
        ``optax.inject_hyperparams`` pass a Python bool (kept static) or list it in
        ``static_args``; an array raises a TypeError saying so.
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
    skip_on_spike = check_static_bool(
        "zclip", "skip_update_on_spike", skip_update_on_spike, ("warmup_steps",)
    )
    size = max(warmup_steps, 1)

    def init_fn(params):
        del params
        # A buffer per field: donated steps refuse one array passed twice.
        return ZclipState(
            buffer=jnp.zeros((size,), jnp.float32),
            mean=jnp.zeros((), jnp.float32),
            var=jnp.zeros((), jnp.float32),
            recorded=jnp.zeros((), jnp.int32),
            stats=_stats.init_stats(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        norm = measure(updates, axis_name, sharded)
        g = as_float32(norm)
        finite = jnp.isfinite(g)
        # An exactly-zero norm says nothing about scale: the statistics skip it.
        takes = finite & (g > 0)
        seen = state.recorded  # norms taken in before this step
        in_warmup = seen < size
        if max_norm is None:
            cap = jnp.full((), jnp.inf, jnp.float32)
        else:
            cap = threshold_at(max_norm, state.stats.count, "max_norm", norm.dtype)

        # Warm-up: buffer the norm; the step that fills the buffer starts the EMA.
        buffer = ring_write(state.buffer, seen, g, takes & in_warmup)
        start = takes & (seen == size - 1)
        start_mean, start_std = masked_mean_std(buffer, jnp.ones(buffer.shape, bool))
        start_var = _saturating_square(start_std, jnp.ones((), jnp.float32))

        # After warm-up: spike test against the EMA.
        a = jnp.asarray(alpha, jnp.float32)
        zt = positive_at("z_thresh", z_thresh, state.stats.count)
        mu, var = state.mean, state.var
        sigma = safe_sqrt(var)  # zero, not NaN, derivative at var = 0
        if mode == "percentile":
            tau = mu + zt * sigma
            spike = g > tau
        else:
            # With eps = 0 and sigma = 0 the z-score is +inf above the mean, else 0; the
            # division never sees a zero (its gradient would be NaN).
            den = sigma + jnp.asarray(eps, jnp.float32)
            positive = den > 0
            z = jnp.where(
                positive, (g - mu) / jnp.where(positive, den, 1), jnp.where(g > mu, jnp.inf, 0)
            )
            spike = z > zt
            if clip_option == "adaptive_scaling":
                eta = jnp.where(spike, z / zt, 1)  # grows with the outlier
                factor = positive_at("clip_factor", clip_factor, state.stats.count, allow_zero=True)
                tau = (mu + zt * sigma / eta) * factor
            else:
                tau = mu
        x = jnp.where(spike, tau, g)
        new_mu = finite_ema(mu, x, a)
        new_var = _ema_var(var, x - new_mu, a)

        # A NaN/inf or zero norm is outside the adaptive rule: its threshold is the cap.
        adapting = takes & ~in_warmup
        # skip_update_on_spike, as in the reference: a spike leaves the EMA as it was.
        moves = (adapting & ~spike) if skip_on_spike else adapting
        threshold = jnp.where(adapting, jnp.minimum(threshold_for_norm(x, norm), cap), cap)
        mean = jnp.where(start, start_mean, jnp.where(moves, new_mu, mu))
        var = jnp.where(start, start_var, jnp.where(moves, new_var, var))
        recorded = state.recorded + takes.astype(jnp.int32)

        updates, new_stats = clip_with_threshold(
            updates, norm, threshold, state.stats, nonfinite=nonfinite, who="zclip"
        )
        new_state = ZclipState(
            buffer=buffer, mean=mean, var=var, recorded=recorded, stats=new_stats
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
