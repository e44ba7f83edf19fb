"""Clipping each element by value."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _stats
from optaxclip._mechanics import map_and_measure
from optaxclip._norm_engine import accumulation_dtype
from optaxclip._norms import AxisName, Sharded, sharded_flags
from optaxclip._stats import ClipStats
from optaxclip._validation import as_threshold, check_float_leaves, check_threshold, threshold_at

__all__ = ["ClipByValueState", "clip_by_value"]


class ClipByValueState(NamedTuple):
    """State of :func:`clip_by_value`: only its statistics, read as ``state.stats``.

    The field is named after the transform so that the name survives where the class
    does not (``nnx.state(optimizer)``, a checkpoint restored without a target), and
    :func:`optaxclip.stats` names these statistics the same way there.
    """

    clip_by_value: ClipStats

    @property
    def stats(self) -> ClipStats:
        return self.clip_by_value


def _clip_elements(x: jax.Array, limit: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(clipped x, where an element was over the limit)``, elementwise."""
    if jnp.iscomplexobj(x):
        # Cap the magnitude and keep the phase.
        real = jnp.finfo(x.dtype).dtype
        mag = jnp.abs(x)
        lim = as_threshold(limit, real)
        over = mag > lim
        # (x / |x|) * lim, each part divided apart: the factor lim / |x| flushes to 0 for
        # a limit of 1e-10 over |x| = 1e30 in complex64, though the result is not tiny.
        safe = jnp.where(over, mag, 1)
        phase = jax.lax.complex(jnp.real(x) / safe, jnp.imag(x) / safe)
        return jnp.where(over, phase * lim, x), over
    lim = as_threshold(limit, x.dtype)
    return jnp.clip(x, -lim, lim), jnp.abs(x) > lim


def clip_by_value(
    max_delta: Any, *, axis_name: AxisName = None, sharded: Sharded = None
) -> optax.GradientTransformationExtraArgs:
    """Clamps every element of the updates to ``[-max_delta, max_delta]``.

    Unlike norm clipping this bends the update's direction: large components are cut
    while small ones pass, so use it when individual coordinates, not the whole step,
    are the problem. Results equal ``optax.clip`` for real leaves. For complex leaves
    the magnitude is capped at ``max_delta`` and the phase kept. The limit is cast to
    each leaf's dtype, so a bf16 leaf is clamped at the bf16 value nearest
    ``max_delta``. NaN elements stay NaN, in their own leaf.

    Args:
      max_delta: the largest magnitude let through for each element: a non-negative
        scalar or an ``optax.Schedule`` evaluated at this transform's step count.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis over which the
        statistics (norms, whether anything was clamped) are combined, so that every
        device records the same values. The clamping itself is elementwise and needs
        no communication.
      sharded: which leaves are sharded along ``axis_name``; default all.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state carries a
      :class:`ClipStats` (``norm`` and ``clipped_norm`` are global norms before and
      after; ``clipped`` says whether any element was clamped).

    References:
      Mikolov, `Statistical Language Models Based on Neural Networks
      <https://www.fit.vut.cz/study/phd-thesis-file/283/283.pdf>`_, 2012 (value
      clipping); Pascanu et al., `On the difficulty of training recurrent neural
      networks <https://arxiv.org/abs/1211.5063>`_, 2013 (why norm clipping keeps the
      direction).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tx = optaxclip.clip_by_value(1.0)
      >>> grads = {"w": jnp.array([3.0, -0.5, -2.0])}
      >>> clipped, state = tx.update(grads, tx.init(grads))
      >>> print(clipped["w"], bool(state.stats.clipped))
      [ 1.  -0.5 -1. ] True
    """
    check_threshold("max_delta", max_delta)

    def init_fn(params):
        del params
        return ClipByValueState(_stats.init_stats())

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        check_float_leaves(updates)
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        limit = threshold_at(max_delta, state.stats.count, "max_delta", accumulation_dtype(leaves))
        flags = sharded_flags(updates, sharded)
        new_leaves, norm, clipped_norm, n_clipped = map_and_measure(
            leaves, lambda x: _clip_elements(x, limit), axis_name=axis_name, flags=flags
        )
        new_stats = _stats.record(
            state.stats,
            norm=norm,
            clipped_norm=clipped_norm,
            threshold=limit,
            clipped=n_clipped > 0,
        )
        return jax.tree_util.tree_unflatten(treedef, new_leaves), ClipByValueState(new_stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
