"""Per-block clipping: each leaf (a weight matrix, a bias) is clipped on its own."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _stats
from optaxclip._mechanics import (
    factor_bits,
    measure_leaves,
    scale_blocks,
    scale_parts,
    scale_source,
    shares_scale,
)
from optaxclip._norms import AxisName, Sharded, sharded_flags
from optaxclip._stats import ClipStats
from optaxclip._validation import check_threshold, threshold_at

__all__ = [
    "ClipByBlockNormState",
    "ClipByBlockRmsState",
    "clip_by_block_norm",
    "clip_by_block_rms",
    "clip_blocks",
]


def clip_blocks(
    updates: Any,
    bounds_for: Any,
    prev: ClipStats,
    threshold: Any,
    name: str,
    *,
    axis_name: AxisName = None,
    sharded: Sharded = None,
) -> tuple[Any, ClipStats, jax.Array]:
    """Scales each leaf so that its L2 norm is at most its bound.

    Args:
      updates: the pytree of updates.
      bounds_for: ``(leaf_norms, leaves, limit) -> per-leaf bounds`` (a vector).
      prev: the statistics so far.
      threshold: the transform's threshold argument (a scalar or a schedule), read at
        this step as ``limit`` in the norms' dtype (float64 where a leaf is float64:
        under x64 a bound of 1e-40 or 1e39 is not rounded through float32) and
        recorded as ``ClipStats.threshold``.
      name: the argument's name, for the run-time check of a schedule's value.
      axis_name: mapped axis over which sharded leaves' norms are summed.
      sharded: which leaves are sharded along ``axis_name``.

    Returns:
      ``(clipped updates, new stats, per-leaf norms after clipping)``. A leaf whose norm
      is NaN/inf is left as it is.
    """
    leaves, treedef, leaf_norms, norm = measure_leaves(updates, axis_name, sharded)
    limit = threshold_at(threshold, prev.count, name, norm.dtype)
    if not leaves:
        new_stats = _stats.record(
            prev, norm=norm, clipped_norm=norm, threshold=limit, clipped=False
        )
        return updates, new_stats, leaf_norms
    bounds = jnp.asarray(bounds_for(leaf_norms, leaves, limit), leaf_norms.dtype)
    # The overflow- and underflow-safe scale of the global clip, one per leaf.
    _, over, hi, lo = scale_parts(
        leaf_norms,
        bounds,
        shared=shares_scale(leaves),
        leaf_bits=factor_bits(leaves, per_leaf=True),
    )
    new_leaves, out_norms, clipped_norm = scale_blocks(
        leaves, leaf_norms, hi, lo, scale_source(leaf_norms, bounds)
    )
    new_stats = _stats.record(
        prev,
        norm=norm,
        clipped_norm=clipped_norm,
        threshold=limit,
        clipped=jnp.any(over),
    )
    return jax.tree_util.tree_unflatten(treedef, new_leaves), new_stats, out_norms


class ClipByBlockNormState(NamedTuple):
    """State of :func:`clip_by_block_norm`: only its statistics, read as ``state.stats``.

    The field is named after the transform so that the name survives where the class
    does not (``nnx.state(optimizer)``, a checkpoint restored without a target), and
    :func:`optaxclip.stats` names these statistics the same way there.
    """

    clip_by_block_norm: ClipStats

    @property
    def stats(self) -> ClipStats:
        return self.clip_by_block_norm


def clip_by_block_norm(
    max_norm: Any, *, axis_name: AxisName = None, sharded: Sharded = None
) -> optax.GradientTransformationExtraArgs:
    """Caps the L2 norm of each leaf at ``max_norm`` (Keras ``clipnorm``).

    Each leaf ``g_i`` becomes ``g_i * min(1, max_norm / ||g_i||)``: a leaf whose
    gradient explodes is brought back without shrinking the others. Norms are
    measured as robustly as :func:`optaxclip.global_norm`; a leaf whose norm is
    NaN/inf is returned unchanged (and the step counted in ``nonfinite_count``).

    Args:
      max_norm: the largest L2 norm let through for each leaf: a non-negative scalar or
        an ``optax.Schedule`` evaluated at this transform's step count.
      axis_name: inside ``shard_map``/``pmap``, the axis over which sharded leaves are
        split, so each leaf's norm is that of the whole logical leaf.
      sharded: which leaves are sharded along ``axis_name``; default all.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state carries a
      :class:`ClipStats` (``threshold`` is ``max_norm``; ``clipped`` is True when any
      leaf was scaled).

    References:
      Pascanu et al., `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, 2013; Chollet et al., Keras optimizers'
      ``clipnorm`` argument, https://keras.io/api/optimizers/.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tx = optaxclip.clip_by_block_norm(1.0)
      >>> grads = {"big": jnp.array([3.0, 4.0]), "small": jnp.array([0.3, 0.4])}
      >>> clipped, _ = tx.update(grads, tx.init(grads))
      >>> print(clipped["big"], clipped["small"])
      [0.6 0.8] [0.3 0.4]
    """
    check_threshold("max_norm", max_norm)

    def init_fn(params):
        del params
        return ClipByBlockNormState(_stats.init_stats())

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        updates, new_stats, _ = clip_blocks(
            updates,
            lambda norms, leaves, limit: jnp.broadcast_to(limit, norms.shape),
            state.stats,
            max_norm,
            "max_norm",
            axis_name=axis_name,
            sharded=sharded,
        )
        return updates, ClipByBlockNormState(new_stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ClipByBlockRmsState(NamedTuple):
    """State of :func:`clip_by_block_rms`: only its statistics, read as ``state.stats``.

    The field is named after the transform so that the name survives where the class
    does not (``nnx.state(optimizer)``, a checkpoint restored without a target), and
    :func:`optaxclip.stats` names these statistics the same way there.
    """

    clip_by_block_rms: ClipStats

    @property
    def stats(self) -> ClipStats:
        return self.clip_by_block_rms


def clip_by_block_rms(
    threshold: Any, *, axis_name: AxisName = None, sharded: Sharded = None
) -> optax.GradientTransformationExtraArgs:
    """Caps the root-mean-square of each leaf at ``threshold``.

    Each leaf ``g_i`` with ``n_i`` elements becomes ``g_i / max(1, rms_i / threshold)``
    where ``rms_i = ||g_i|| / sqrt(n_i)``: the same results as
    ``optax.clip_by_block_rms``, but with robust norms, no NaN for a zero leaf with
    ``threshold=0``, and statistics. The RMS makes one bound fit leaves of any size.

    Args:
      threshold: the largest RMS let through for each leaf: a non-negative scalar or an
        ``optax.Schedule`` evaluated at this transform's step count.
      axis_name: inside ``shard_map``/``pmap``, the axis over which sharded leaves are
        split (the RMS is that of the whole logical leaf).
      sharded: which leaves are sharded along ``axis_name``; default all. With
        ``axis_name``, the element count of a sharded leaf is its local size times the
        axis size.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state carries a
      :class:`ClipStats` (``threshold`` is the RMS bound).

    References:
      Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
      <https://arxiv.org/abs/1804.04235>`_, 2018 (update clipping by block RMS).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tx = optaxclip.clip_by_block_rms(1.0)
      >>> grads = {"w": jnp.array([4.0, 4.0, 4.0, 4.0])}  # rms 4
      >>> clipped, _ = tx.update(grads, tx.init(grads))
      >>> print(clipped["w"])
      [1. 1. 1. 1.]
    """
    check_threshold("threshold", threshold)

    def init_fn(params):
        del params
        return ClipByBlockRmsState(_stats.init_stats())

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        flags = sharded_flags(updates, sharded)

        def bounds(norms, leaves, limit):
            sizes = []
            for x, flag in zip(leaves, flags, strict=True):
                n = jnp.asarray(x.size, norms.dtype)
                if axis_name is not None and flag:
                    n = n * jax.lax.psum(1, axis_name)
                sizes.append(n)
            return limit.astype(norms.dtype) * jnp.sqrt(jnp.stack(sizes))

        updates, new_stats, _ = clip_blocks(
            updates,
            bounds,
            state.stats,
            threshold,
            "threshold",
            axis_name=axis_name,
            sharded=sharded,
        )
        return updates, ClipByBlockRmsState(new_stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
