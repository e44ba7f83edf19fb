"""AGC's clip of units, on one device or inside ``shard_map``/``pmap``, where a leaf
may be split across devices along one of its axes.

The per-unit norms come from :func:`optaxclip._norms.unit_norms` (the routine
``unitwise_norm`` uses), the rule is :func:`scale_units`, and :func:`clip_units` is
the one loop over the leaves, for both cases. A unit (a slice over the unit axes, see
:func:`optaxclip.unitwise_norm`) either lies whole on one device or is cut by the split:

- a leaf split along one of its unit axes (a kernel's input axis: FSDP, row-parallel)
  holds on each device a part of every unit: the per-unit sums of squares are
  ``psum``-ed (one collective for all such leaves, of up to six floats per unit: the
  plain and the rescaled sums, see ``_norms._UNIT_SCALES``, of the update and of the
  weight);
- a leaf split along another axis (a kernel's output axis: column-parallel; a stacked
  layer axis) holds whole units, different ones on each device: the clip needs no
  communication, only the statistics (global norms, "anything clipped") are combined;
- a leaf that is not split (replicated, or no ``axis_name``) is clipped as on one
  device.

The statistics of units held whole by different devices are combined across devices
apart from the others, so that under ``shard_map(check_vma=True)`` a replicated leaf
comes out replicated and the statistics are the same on every device.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip._mechanics import scale_parts, scale_per_unit, scale_source
from optaxclip._norms import AxisName, safe_sqrt, unit_norms, vector_norm
from optaxclip._validation import as_threshold, resolve_per_leaf


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


def scale_units(
    gs: list[jax.Array],
    g_norms: list[jax.Array],
    w_norms: list[jax.Array],
    limit: jax.Array,
    floor: jax.Array,
) -> tuple[list[jax.Array], list[jax.Array], list[jax.Array]]:
    """AGC's rule on each leaf: ``(clipped gs, the units' norms after, which were
    scaled)``, one list entry per leaf.

    A NaN/inf unit is left as it is (NaN > bound is False; inf is excluded).
    """
    his, los, sources, afters, overs = [], [], [], [], []
    for g_norm, w_norm in zip(g_norms, w_norms, strict=True):
        dtype = g_norm.dtype
        bound = as_threshold(limit, dtype) * jnp.maximum(
            w_norm.astype(dtype), as_threshold(floor, dtype)
        )
        # The global clip's scale, per unit: split where it is below the smallest normal
        # float, and differentiated by its source (scale_per_unit), not through g_norm**-2.
        _, over, hi, lo = scale_parts(g_norm, bound)
        his.append(hi)
        los.append(lo)
        sources.append(scale_source(g_norm, bound))
        afters.append(jax.lax.select(over, bound, g_norm))
        overs.append(over)
    return scale_per_unit(gs, his, los, sources), afters, overs


def _norm_across(local: jax.Array, axis_name: AxisName) -> jax.Array:
    """sqrt(sum over devices of ``local[i]``^2) for each entry of a vector of local
    norms, overflow- and underflow-safe: each entry has its own scale (one shared by a
    norm of 1e20 and a clipped norm of 1 would flush the latter's squares to zero)."""
    big = jax.lax.pmax(local, axis_name)
    ok = jnp.isfinite(big) & (big > 0)
    unit = jax.lax.stop_gradient(jnp.where(ok, big, 1))
    total = jax.lax.psum(jnp.concatenate([jnp.square(local / unit), local]), axis_name)
    n = local.shape[0]
    # A NaN/inf norm anywhere: the plain sum says which (NaN wins over inf).
    return jnp.where(ok, unit * safe_sqrt(total[:n]), total[n:])


def _flat(vectors: list[jax.Array]) -> jax.Array:
    """All the per-unit values of the tree as one vector, for the statistics.

    The barrier keeps XLA from fusing every leaf's producer into one giant concatenate
    fusion, whose compile time grows much faster than the number of leaves.
    """
    return jax.lax.optimization_barrier(jnp.concatenate([v.ravel() for v in vectors]))


def clip_units(
    pairs: list[tuple[jax.Array, jax.Array]],
    axes: list[tuple[int, ...]],
    splits: list[int | None],
    axis_name: AxisName,
    limit: jax.Array,
    floor: jax.Array,
    tiny_weights: bool = True,
    tiny_updates: bool = True,
) -> tuple[list[jax.Array], jax.Array, jax.Array, jax.Array]:
    """AGC on (update, weight) pairs, which may be split across devices.

    Args:
      pairs: the (update, weight) leaves as each device holds them.
      axes: each leaf's unit axes.
      splits: each leaf's axis split along ``axis_name`` (None: not split).
      axis_name: the mapped axis (None: not inside shard_map / pmap).
      limit: the clipping ratio in force.
      floor: the smallest weight norm used (``eps``).
      tiny_weights: False when ``eps`` is known to exceed any weight norm whose plain
        sum of squares is tiny (see :func:`unit_norms`).
      tiny_updates: False when ``clipping * eps`` is known to exceed any update norm
        whose plain sum of squares is tiny: such a unit is never clipped.

    Returns:
      ``(clipped updates, global norm, global clipped norm, clipped anywhere)``; the
      three statistics are the same on every device.
    """
    # One collective for the partial sums of every unit cut by the split.
    spanning = tuple(s is not None and s in ax for s, ax in zip(splits, axes, strict=True))
    xs = [x for pair in pairs for x in pair]
    all_norms = unit_norms(
        tuple(ax for ax in axes for _ in range(2)),
        axis_name,
        tuple(flag for flag in spanning for _ in range(2)),
        (tiny_updates, tiny_weights) * len(pairs),
        xs,
    )
    clipped, afters, overs = scale_units(
        [g for g, _ in pairs], all_norms[0::2], all_norms[1::2], limit, floor
    )
    stats = {True: ([], [], []), False: ([], [], [])}
    for i, (split, ax) in enumerate(zip(splits, axes, strict=True)):
        # Units held whole by one device, different ones on each: their statistics must
        # be combined across devices. The others are the same on every device.
        local = split is not None and split not in ax
        stats[local][0].append(all_norms[2 * i].ravel())
        stats[local][1].append(afters[i].ravel())
        stats[local][2].append(jnp.any(overs[i]))
    norms, clipped_norms, any_over = [], [], []
    for local, (before, after, overs) in stats.items():
        if not before:
            continue
        norm = vector_norm(_flat(before))
        clipped_norm = vector_norm(_flat(after))
        over = jnp.any(jnp.stack(overs))
        if local:
            norm, clipped_norm = _norm_across(jnp.stack([norm, clipped_norm]), axis_name)
            over = jax.lax.psum(over.astype(jnp.int32), axis_name) > 0
        norms.append(norm)
        clipped_norms.append(clipped_norm)
        any_over.append(over)
    return (
        clipped,
        vector_norm(jnp.stack(norms)),
        vector_norm(jnp.stack(clipped_norms)),
        jnp.any(jnp.stack(any_over)),
    )
