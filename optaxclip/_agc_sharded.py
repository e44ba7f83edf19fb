"""Adaptive gradient clipping inside ``shard_map``/``pmap``, where a leaf may be split
across devices along one of its axes.

A unit (a slice over the unit axes, see :func:`optaxclip.unitwise_norm`) either lies
whole on one device or is cut by the split:

- a leaf split along one of its unit axes (a kernel's input axis: FSDP, row-parallel)
  holds on each device a part of every unit: the per-unit sums of squares are
  ``psum``-ed (one collective for all such leaves, of four floats per unit: the plain
  and the overflow-safe rescaled sums, of the update and of the weight);
- a leaf split along another axis (a kernel's output axis: column-parallel; a stacked
  layer axis) holds whole units, different ones on each device: the clip needs no
  communication, only the statistics (global norms, "anything clipped") are combined;
- a leaf that is not split (replicated) is clipped as on one device.

The statistics of units held whole by different devices are combined across devices
apart from the others, so that under ``shard_map(check_vma=True)`` a replicated leaf
comes out replicated and the statistics are the same on every device.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip._global import scale_leaf
from optaxclip._norms import AxisName, _abs_sq, _divide, _vector_norm, accumulation_dtype
from optaxclip._validation import resolve_per_leaf


def _split_value(value: Any, where: str, ndim: int | None) -> int | None:
    """One leaf's validated ``sharded_axis``: an axis index, or None when not split."""
    if value is None or value is False or value is np.False_:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"sharded_axis{where} must be the index of the axis split along axis_name (an "
            f"int), or None/False for a leaf that is not split; got {value!r}."
        )
    value = int(value)
    if ndim is not None and not -ndim <= value < ndim:
        raise ValueError(f"sharded_axis{where} is {value} but the leaf has only {ndim} axes.")
    return value if ndim is None else value % ndim


def check_sharded_axis(axis_name: AxisName, sharded_axis: Any) -> None:
    """Build-time checks of ``axis_name``/``sharded_axis`` (they come together)."""
    if (axis_name is None) != (sharded_axis is None):
        raise ValueError(
            "adaptive_grad_clip: axis_name and sharded_axis go together: with axis_name, "
            "sharded_axis says which axis of each leaf is split along it (None/False for "
            f"a replicated leaf); got axis_name={axis_name!r}, sharded_axis={sharded_axis!r}."
        )
    if sharded_axis is not None and not callable(sharded_axis):
        for value in jax.tree_util.tree_leaves(sharded_axis):
            _split_value(value, "", None)


def split_axes(sharded_axis: Any, updates: Any) -> list[int | None]:
    """The split axis of each (non-None) leaf of ``updates``, validated."""
    with_path = jax.tree_util.tree_flatten_with_path(updates)[0]
    if not callable(sharded_axis):  # None inside a pytree means "not split", not "no leaf"
        sharded_axis = jax.tree.map(
            lambda v: False if v is None else v, sharded_axis, is_leaf=lambda v: v is None
        )
    values = resolve_per_leaf(sharded_axis, updates, "sharded_axis", None)
    return [
        _split_value(v, " " + (jax.tree_util.keystr(path) or "<root>"), jnp.ndim(leaf))
        for v, (path, leaf) in zip(values, with_path, strict=True)
    ]


# Sums of squares are also accumulated for x / 2**100, so that a unit whose plain sum
# overflows float32 (values beyond ~1.8e19) still gets its finite norm, from the same
# read of x and without a lax.cond (the numerics of optaxclip.unitwise_norm).
_RESCALE = 2.0**100


def _unit_sums(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """The plain and the rescaled per-unit sums of squares, stacked on a new axis 0."""
    acc = accumulation_dtype([x])
    plain = jnp.sum(_abs_sq(x, acc), axis=axes, keepdims=True)
    small = jnp.sum(
        _abs_sq(_divide(x, jnp.asarray(_RESCALE, acc), acc), acc), axis=axes, keepdims=True
    )
    return jnp.stack([plain, small])


def _unit_norms_from(sums: jax.Array) -> jax.Array:
    plain, small = sums[0], sums[1]
    rescale = jnp.asarray(_RESCALE, plain.dtype)
    return jnp.where(jnp.isfinite(plain), jnp.sqrt(plain), rescale * jnp.sqrt(small))


def _norm_across(local: jax.Array, axis_name: AxisName) -> jax.Array:
    """sqrt(sum over devices of ``local``^2) for a vector of local norms, overflow-safe."""
    big = jax.lax.pmax(jnp.max(local), axis_name)
    ok = jnp.isfinite(big) & (big > 0)
    unit = jnp.where(ok, big, 1)
    total = jax.lax.psum(jnp.concatenate([jnp.square(local / unit), local]), axis_name)
    n = local.shape[0]
    # A NaN/inf norm anywhere: the plain sum says which (NaN wins over inf).
    return jnp.where(ok, unit * jnp.sqrt(total[:n]), total[n:])


def clip_units_across_devices(
    pairs: list[tuple[jax.Array, jax.Array]],
    axes: list[tuple[int, ...]],
    splits: list[int | None],
    axis_name: AxisName,
    limit: jax.Array,
    floor: jax.Array,
) -> tuple[list[jax.Array], jax.Array, jax.Array, jax.Array]:
    """AGC on (update, weight) pairs that may be split across devices.

    Args:
      pairs: the (update, weight) leaves as each device holds them.
      axes: each leaf's unit axes.
      splits: each leaf's axis split along ``axis_name`` (None: not split).
      axis_name: the mapped axis.
      limit: the clipping ratio in force.
      floor: the smallest weight norm used (``eps``).

    Returns:
      ``(clipped updates, global norm, global clipped norm, clipped anywhere)``; the
      three statistics are the same on every device.
    """
    sums = [(_unit_sums(g, ax), _unit_sums(w, ax)) for (g, w), ax in zip(pairs, axes, strict=True)]
    spanning = [i for i, (s, ax) in enumerate(zip(splits, axes, strict=True)) if s in ax]
    if spanning:  # one collective for the partial sums of every unit cut by the split
        parts = [x for i in spanning for x in sums[i]]
        flat = jax.lax.psum(jnp.concatenate([x.ravel() for x in parts]), axis_name)
        reduced, offset = [], 0
        for x in parts:
            reduced.append(flat[offset : offset + x.size].reshape(x.shape))
            offset += x.size
        for j, i in enumerate(spanning):
            sums[i] = (reduced[2 * j], reduced[2 * j + 1])

    out, stats = [], {True: ([], [], []), False: ([], [], [])}
    for (g, _), (g_sums, w_sums), split, ax in zip(pairs, sums, splits, axes, strict=True):
        g_norm = _unit_norms_from(g_sums)
        dtype = g_norm.dtype
        w_norm = _unit_norms_from(w_sums).astype(dtype)
        bound = limit.astype(dtype) * jnp.maximum(w_norm, floor.astype(dtype))
        over = (g_norm > bound) & (g_norm < jnp.inf)  # a NaN/inf unit is left as it is
        out.append(scale_leaf(g, jnp.where(over, bound / g_norm, 1)))
        # Units held whole by one device, different ones on each: their statistics must
        # be combined across devices. The others are the same on every device.
        local = split is not None and split not in ax
        stats[local][0].append(g_norm.ravel())
        stats[local][1].append(jnp.where(over, bound, g_norm).ravel())
        stats[local][2].append(jnp.any(over))
    norms, clipped_norms, any_over = [], [], []
    for local, (before, after, overs) in stats.items():
        if not before:
            continue
        norm = _vector_norm(jnp.concatenate(before))
        clipped_norm = _vector_norm(jnp.concatenate(after))
        over = jnp.any(jnp.stack(overs))
        if local:
            norm, clipped_norm = _norm_across(jnp.stack([norm, clipped_norm]), axis_name)
            over = jax.lax.psum(over.astype(jnp.int32), axis_name) > 0
        norms.append(norm)
        clipped_norms.append(clipped_norm)
        any_over.append(over)
    return (
        out,
        _vector_norm(jnp.stack(norms)),
        _vector_norm(jnp.stack(clipped_norms)),
        jnp.any(jnp.stack(any_over)),
    )
