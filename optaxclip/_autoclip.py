"""AutoClip (Seetharaman et al. 2020): clip at a percentile of the history of norms.

Two ways to keep the history, both of fixed size:

- ``history=N``: an exact ring buffer of the last N recorded norms. The percentile is
  read by sorting the buffer (empty slots hold +inf and sort last) and interpolating
  linearly at rank ``(n - 1) * p / 100`` over the ``n`` valid entries, as
  ``numpy.percentile(..., method="linear")`` does.
- ``history=None``: the whole history in a streaming log-bucket sketch (DDSketch,
  Masson et al. 2019). A finite norm ``x > 0`` is counted in bucket
  ``ceil(log(x) / log(gamma))`` with ``gamma = (1 + a) / (1 - a)`` and ``a = 0.5%``;
  the bucket's representative ``2 gamma^i / (gamma + 1)`` is within ``a`` of every value
  in it. Slot 0, the zero bucket, stays empty (zero norms are not recorded). The
  running minimum and maximum are kept exactly, and a query reads the two order
  statistics around the rank from the cumulative
  counts and interpolates between them like NumPy, so the answer is within ``a`` of
  ``numpy.percentile`` (a convex combination of values each within ``a``) and exact
  for one or two norms and at the 0th/100th percentiles. Each step is one index
  computation and one scatter-add; a query is one cumulative sum over the fixed
  bucket vector (done in two levels: per-block totals, then one block). Nothing
grows with the step count.

Only finite, non-zero norms are recorded: a NaN/inf norm or a norm of exactly zero (a
frozen model, a zero-initialised layer) says nothing about the scale of the gradients,
and a history full of zeros would make the percentile 0 and zero every later update.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _stats
from optaxclip._mechanics import NONFINITE_POLICIES, clip_with_threshold, measure, ring_write
from optaxclip._norms import AxisName, Sharded
from optaxclip._stats import ClipStats, as_float32, threshold_for_norm
from optaxclip._validation import (
    check_choice,
    check_range,
    check_static_int,
    check_threshold,
    threshold_at,
)

__all__ = ["AutoclipState", "autoclip"]

# The sketch: 0.5% relative accuracy (half of the 1% promised, leaving room for
# float32 rounding) over norms from 1e-30 to 1e30. Norms outside that range are counted
# in the end buckets. 13,824 int32 counts (108 blocks of 128): 54 KiB.
SKETCH_ACCURACY = 0.005
_GAMMA = (1 + SKETCH_ACCURACY) / (1 - SKETCH_ACCURACY)
_LOG_GAMMA = math.log(_GAMMA)
SKETCH_RANGE = (1e-30, 1e30)
_FIRST_INDEX = math.ceil(math.log(SKETCH_RANGE[0]) / _LOG_GAMMA)
_LAST_INDEX = math.ceil(math.log(SKETCH_RANGE[1]) / _LOG_GAMMA)
# Slot 0 counts zeros; slot j >= 1 is the bucket of index j - 1 + _FIRST_INDEX. The
# counts are stored as (blocks, slots in a block) and searched in two levels, per-block
# totals then one block: one prefix sum over all slots costs ~200 us per step on CPU.
_BLOCK = 128
_BLOCKS = -(-(_LAST_INDEX - _FIRST_INDEX + 2) // _BLOCK)
SKETCH_SLOTS = _BLOCKS * _BLOCK


class AutoclipState(NamedTuple):
    """State of :func:`autoclip`.

    Attributes:
      history: the last ``history`` recorded norms (float32 ring buffer, +inf where
        not yet filled) or, with ``history=None``, the sketch's bucket counts (int32,
        shape (108, 128): 13,824 buckets in blocks of 128; bucket 0 stays empty).
      lowest: the smallest recorded norm (+inf before any).
      highest: the largest recorded norm (0 before any).
      recorded: the number of norms recorded (int32): the finite, non-zero ones. The
        warm-up counts these.
      stats: the :class:`ClipStats`.
    """

    history: jax.Array
    lowest: jax.Array
    highest: jax.Array
    recorded: jax.Array
    stats: ClipStats


def _lerp(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
    """``a + t (b - a)`` written as NumPy's percentile writes it (exact at both ends)."""
    diff = b - a
    return jnp.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


def _percentile(value_at, n: jax.Array, percentile: jax.Array) -> jax.Array:
    """Linear-interpolation percentile of ``n`` sorted values, ``value_at(k)`` the k-th."""
    rank = jnp.maximum(n - 1, 0).astype(jnp.float32) * (percentile / 100)
    low = jnp.floor(rank)
    low_k = low.astype(jnp.int32)
    high_k = jnp.minimum(low_k + 1, jnp.maximum(n - 1, 0))
    return _lerp(value_at(low_k), value_at(high_k), rank - low)


def _sketch_slot(norm: jax.Array) -> jax.Array:
    """The slot of a finite norm: its clamped log bucket (0 for zero, never recorded)."""
    positive = norm > 0
    index = jnp.ceil(jnp.log(jnp.where(positive, norm, 1)) / _LOG_GAMMA) - _FIRST_INDEX + 1
    slot = jnp.clip(index, 1, SKETCH_SLOTS - 1).astype(jnp.int32)
    return jnp.where(positive, slot, 0)


def _sketch_order_statistic(counts, lowest, highest, n):
    """``value_at(k)``: the sketch's estimate of the k-th smallest recorded norm."""
    block_counts = counts.sum(axis=1)
    block_cumulative = jnp.cumsum(block_counts)

    def slot_of(k):
        # The first slot whose cumulative count exceeds k.
        block = jnp.minimum(jnp.sum(block_cumulative <= k), _BLOCKS - 1).astype(jnp.int32)
        before = block_cumulative[block] - block_counts[block]
        within = counts[block]
        return block * _BLOCK + jnp.sum(before + jnp.cumsum(within) <= k).astype(jnp.int32)

    def value_at(k):
        slot = slot_of(k)
        index = (slot - 1 + _FIRST_INDEX).astype(jnp.float32)
        middle = jnp.exp(index * _LOG_GAMMA) * (2 / (_GAMMA + 1))
        value = jnp.clip(jnp.where(slot == 0, 0.0, middle), lowest, highest)
        # The extremes are known exactly.
        return jnp.where(k <= 0, lowest, jnp.where(k >= n - 1, highest, value))

    return value_at


def autoclip(
    percentile: Any = 10.0,
    *,
    history: int | None = None,
    warmup_steps: int = 0,
    max_norm: Any = None,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    sharded: Sharded = None,
) -> optax.GradientTransformationExtraArgs:
    """Clips by global norm at a percentile of the norms seen so far (AutoClip).

    At each step the global norm ``g_t`` joins the history ``H``, the threshold is
    ``tau_t = percentile_p(H)`` (linear interpolation, as
    ``numpy.percentile(H, p, method="linear")``; the current step is included, so the
    first step never clips) and the update becomes ``u * min(1, tau_t / g_t)``. With
    ``max_norm`` the threshold is ``min(tau_t, max_norm)``. For the first
    ``warmup_steps`` recorded norms the percentile is not applied: the norm is recorded
    and the threshold in force (and in ``ClipStats.threshold``) is ``max_norm``, or +inf
    without one.

    ``history=N`` keeps the last N finite norms exactly (a ring buffer; the percentile
    is read by sorting it, O(N log N) per step). ``history=None`` keeps the whole
    history in constant memory (54 KiB) in a log-bucket quantile sketch (DDSketch) whose
    answer is within 0.5% (relative) of the exact percentile for norms between 1e-30
    and 1e30, exact at the 0th and 100th percentiles and for one or two norms; each
    step is O(1) in the number of steps. The paper uses the whole history.

    A NaN/inf norm is handled by ``nonfinite`` and is not recorded: the history, the
    sketch and the warm-up are as they were. A norm of exactly zero is not recorded
    either (it says nothing about scale, and a history of zeros would clip every later
    update to zero): it leaves the history, the sketch, ``lowest``/``highest`` and the
    warm-up as they were, and passes unclipped (its threshold is the percentile of the
    history recorded so far, +inf while that is empty). The warm-up counts the recorded
    norms: the finite, non-zero ones.

    Args:
      percentile: the percentile ``p`` in [0, 100] of the history used as threshold.
        The paper finds 10 a good default for audio source separation.
      history: None for the whole history (sketch), or a positive int N for an exact
        window of the last N recorded (finite, non-zero) norms. An int shapes the state: under
        ``optax.inject_hyperparams`` list it in ``static_args``.
      warmup_steps: number of norms recorded before the percentile is applied
        (a non-negative int; under ``optax.inject_hyperparams`` list it in
        ``static_args``).
      max_norm: optional cap on the threshold: a non-negative scalar or an
        ``optax.Schedule`` evaluated at this transform's step count.
      nonfinite: ``"propagate"`` (updates unchanged), ``"zero"`` (zeros) or ``"error"``
        (raise from inside ``jit``) when the norm is NaN/inf, as in
        :func:`optaxclip.clip_by_global_norm`.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis over which the norm
        is summed (see :func:`optaxclip.global_norm`).
      sharded: which leaves are sharded along ``axis_name``; default all.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      :class:`AutoclipState` (``ClipStats.threshold`` is the threshold in force).

    References:
      Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source Separation
      Networks <https://arxiv.org/abs/2007.14469>`_, 2020; Masson et al., `DDSketch: A
      Fast and Fully-Mergeable Quantile Sketch with Relative-Error Guarantees
      <https://arxiv.org/abs/1908.10693>`_, 2019.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tx = optaxclip.autoclip(50.0, history=3)
      >>> state = tx.init(None)
      >>> for g in [1.0, 3.0, 2.0, 10.0]:
      ...     out, state = tx.update([jnp.array([g])], state)
      ...     print(float(state.stats.threshold), float(out[0][0]))
      1.0 1.0
      2.0 2.0
      2.0 2.0
      3.0 3.0
    """
    check_range("percentile", percentile, 0.0, 100.0)
    static = ("history", "warmup_steps")
    check_static_int("autoclip", "history", history, static, allow_none=True)
    check_static_int("autoclip", "warmup_steps", warmup_steps, static, allow_zero=True)
    check_threshold("max_norm", max_norm, allow_none=True)
    check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)

    def init_fn(params):
        del params
        if history is None:
            buffer = jnp.zeros((_BLOCKS, _BLOCK), jnp.int32)
        else:
            buffer = jnp.full((history,), jnp.inf, jnp.float32)
        return AutoclipState(
            history=buffer,
            lowest=jnp.full((), jnp.inf, jnp.float32),
            highest=jnp.zeros((), jnp.float32),
            recorded=jnp.zeros((), jnp.int32),
            stats=_stats.init_stats(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        norm = measure(updates, axis_name, sharded)
        g = as_float32(norm)
        # Only finite, non-zero norms are recorded (see the docstring).
        takes = jnp.isfinite(g) & (g > 0)
        recorded = state.recorded  # norms recorded before this step
        total = recorded + takes.astype(jnp.int32)
        lowest = jnp.where(takes, jnp.minimum(state.lowest, g), state.lowest)
        highest = jnp.where(takes, jnp.maximum(state.highest, g), state.highest)
        p = jnp.asarray(percentile, jnp.float32)

        if history is None:
            slot = _sketch_slot(g)
            buffer = state.history.at[slot // _BLOCK, slot % _BLOCK].add(takes.astype(jnp.int32))
            n = total
            value_at = _sketch_order_statistic(buffer, lowest, highest, n)
        else:
            buffer = ring_write(state.history, recorded, g, takes)
            n = jnp.minimum(total, history)
            ordered = jnp.sort(buffer)  # +inf in empty slots sorts last
            value_at = lambda k: ordered[k]

        adaptive = _percentile(value_at, n, p)
        in_warmup = recorded < warmup_steps
        adaptive = jnp.where(in_warmup | (n == 0), jnp.inf, adaptive)
        adaptive = threshold_for_norm(adaptive, norm)
        if max_norm is None:
            threshold = adaptive
        else:
            cap = threshold_at(max_norm, state.stats.count, "max_norm", norm.dtype)
            threshold = jnp.minimum(adaptive, cap)

        updates, new_stats = clip_with_threshold(
            updates, norm, threshold, state.stats, nonfinite=nonfinite, who="autoclip"
        )
        new_state = AutoclipState(
            history=buffer, lowest=lowest, highest=highest, recorded=total, stats=new_stats
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
