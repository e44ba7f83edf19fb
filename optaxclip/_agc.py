"""Adaptive gradient clipping (Brock et al. 2021): each unit's update is capped
relative to the norm of the weights it updates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _stats
from optaxclip._agc_units import check_sharded_axis, clip_units, split_axes
from optaxclip._norm_engine import accumulation_dtype
from optaxclip._norms import AxisName, unit_axes
from optaxclip._stats import ClipStats
from optaxclip._validation import (
    as_threshold,
    check_float_leaves,
    check_threshold,
    resolve_per_leaf,
    static_hint,
    threshold_at,
)

__all__ = ["AdaptiveGradClipState", "adaptive_grad_clip"]

Axis = int | Sequence[int] | None

_STATIC = ("axis", "stacked_axes")


def _stack_depth(value: Any, where: str, ndim: int | None) -> int:
    """The validated number of leading stacked axes of one leaf (or of every leaf)."""
    if isinstance(value, (jax.Array, jax.core.Tracer)):
        raise TypeError(
            static_hint("adaptive_grad_clip", "stacked_axes", _STATIC) + f" Got {value!r}."
        )
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"stacked_axes{where} must be an integer, got {value!r}.")
    value = int(value)
    if value < 0:
        raise ValueError(f"stacked_axes{where} must be non-negative, got {value}.")
    if ndim is not None and value > 0 and value >= ndim:
        raise ValueError(
            f"stacked_axes{where} is {value} but the leaf has only {ndim} axes: at least one "
            "axis must be left for the layer itself."
        )
    return value


def _check_axis(axis: Any) -> None:
    """Build-time check of ``axis``: None, an int or a tuple/list of ints."""
    if isinstance(axis, (jax.Array, jax.core.Tracer)):
        raise TypeError(static_hint("adaptive_grad_clip", "axis", _STATIC) + f" Got {axis!r}.")
    values = axis if isinstance(axis, (tuple, list)) else (axis,)
    if axis is None or all(
        isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_)) for a in values
    ):
        return
    raise TypeError(
        "adaptive_grad_clip: axis must be an int or a tuple of ints (the axes of one layer "
        "that make up a unit, e.g. axis=0 or axis=(0, 1, 2)), or None for the default unit "
        f"convention; got axis={axis!r}."
    )


def _params_leaf(w: Any, g: jax.Array, where: str) -> jax.Array:
    """The params leaf that goes with the update ``g``, as an array of g's shape."""
    if w is None:
        raise ValueError(
            f"adaptive_grad_clip: the params leaf{where} is None but its update is an array "
            f"of shape {g.shape}: params must match the updates leaf for leaf (pass the "
            "parameters these updates are for, or make the update None too)."
        )
    try:
        w = jnp.asarray(w)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"adaptive_grad_clip: the params leaf{where} is {type(w).__name__}, not an array: "
            f"params must match the updates leaf for leaf ({err})."
        ) from err
    if w.shape != g.shape:
        raise ValueError(
            f"adaptive_grad_clip: the params leaf{where} has shape {w.shape} but its "
            f"update has shape {g.shape}: params must match the updates leaf for leaf."
        )
    return w


def _tiny_weights_matter(eps: Any) -> bool:
    """Whether a weight unit too small for its plain sum of squares (norm below ~2^-40)
    can set a bound: not when ``eps`` is known to be larger, as it then takes its place
    in max(||W||, eps) whatever that norm is, and one reduction per weight leaf is saved.
    """
    if isinstance(eps, jax.core.Tracer):
        return True
    try:
        return not float(eps) >= 2.0**-39
    except (TypeError, ValueError):
        return True


def _tiny_updates_matter(clipping: Any, eps: Any) -> bool:
    """Whether an update unit too small for its plain sum of squares (norm below ~2^-40)
    can be clipped: not when ``clipping * eps`` is known to be larger, since every bound
    is at least that. Its norm then only enters the recorded ``norm``, where the units
    that matter dwarf it, and one reduction per update leaf is saved (a pass on CPU).
    """
    try:
        return not float(clipping) * float(eps) >= 2.0**-39
    except (TypeError, ValueError):  # a schedule, or a traced value
        return True


def _devices_along(axis_name: AxisName) -> int:
    """How many devices share a leaf split along ``axis_name`` (a Python int)."""
    try:
        return int(jax.lax.axis_size(axis_name))
    except NameError as err:
        raise ValueError(
            f"adaptive_grad_clip: axis_name={axis_name!r} is not bound here: call update "
            "inside the shard_map or pmap that maps that axis (or build the transform "
            f"without axis_name). {err}"
        ) from err


class AdaptiveGradClipState(NamedTuple):
    """State of :func:`adaptive_grad_clip`: only its statistics, read as ``state.stats``.

    The field is named after the transform so that the name survives where the class
    does not (``nnx.state(optimizer)``, a checkpoint restored without a target), and
    :func:`optaxclip.stats` names these statistics the same way there.
    """

    adaptive_grad_clip: ClipStats

    @property
    def stats(self) -> ClipStats:
        return self.adaptive_grad_clip


def adaptive_grad_clip(
    clipping: Any,
    eps: Any = 1e-3,
    *,
    axis: Axis = None,
    stacked_axes: Any = 0,
    axis_name: AxisName = None,
    sharded_axis: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Clips each unit's update to at most ``clipping`` times its weights' norm (AGC).

    For every unit ``u`` (an output neuron's fan-in, a conv filter; see
    :func:`optaxclip.unitwise_norm`), with update ``G_u`` and parameters ``W_u``:
    ``G_u <- G_u * min(1, clipping * max(||W_u||, eps) / ||G_u||)``. Units whose update
    is small relative to their weights pass unchanged. Results equal
    ``optax.adaptive_grad_clip`` for the shapes Optax handles, with norms accumulated
    in float32 (float64 for float64 leaves), right beyond the point where squares
    overflow (~1.8e19 in float32) and for units of values down to the smallest normal
    number, and one float32 multiply per element, so bf16/fp16 leaves keep their dtype
    without losing precision. A unit whose update norm is NaN/inf is returned unchanged
    (the NaN stays in that unit, nothing else is touched) and the step is counted in
    ``nonfinite_count``. Gradients through the transform (with respect to the updates
    and to the params) are finite wherever it is differentiable, also at an all-zero
    unit and for norms beyond the overflow point.

    ``stacked_axes=k`` treats the first ``k`` axes of a leaf as independent stacked
    layers (``nn.scan`` / scan-over-layers parameters of shape ``(layers, in, out)``):
    each layer is clipped on its own, with the unit rule above applied to the shape
    that remains (``axis`` then refers to that remaining shape too). It is the same as
    ``jax.vmap``-ing the rule over the leading ``k`` axes. Without it, Optax's rank-3
    rule would pool all the layers of a stack into one unit per (in, out) slice.

    Statistics: ``norm`` and ``clipped_norm`` are the global norms of the updates
    before and after (``clipped_norm`` is derived from the per-unit norms times their
    scales, not from a second pass over the updates); ``threshold`` is ``clipping``,
    which is a ratio to the weight norms, not an update norm; ``clipped`` is True when
    any unit was scaled.

    Args:
      clipping: the largest allowed ratio of a unit's update norm to its weight norm:
        a non-negative scalar or an ``optax.Schedule`` evaluated at this transform's
        step count.
      eps: the smallest weight norm used, so that zero-initialised units (biases) can
        still move: a non-negative scalar.
      axis: the axis or axes that make up one unit (of the layer shape, after
        ``stacked_axes``); None uses the convention of :func:`optaxclip.unitwise_norm`.
      stacked_axes: how many leading axes of a leaf index stacked layers: an int for
        every leaf, a pytree of ints (a prefix of the updates' structure), or a
        callable ``(path, leaf) -> int``. Must be a Python int (use ``static_args``
        under ``optax.inject_hyperparams``) and less than the leaf's rank.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis along which leaves are
        split (give ``sharded_axis`` with it). Not needed under ``jax.jit`` with
        ``NamedSharding``, where XLA adds the reductions itself.
      sharded_axis: which axis of each leaf is split along ``axis_name``: an int, or
        None/False for a leaf that is replicated; one value for every leaf, a pytree
        (a prefix of the updates' structure) or a callable ``(path, leaf) -> value``.
        The params must be split like the updates. Units are those of the whole
        (logical) leaf, whose shape is the local one with the split axis times the
        number of devices along ``axis_name``. A unit cut by the split (the split
        axis is one of its unit axes, e.g. FSDP on a kernel's input axis) has its sums
        of squares ``psum``-ed, a few floats per unit; a unit held whole by one device
        (e.g. a kernel split along its output axis, or along ``stacked_axes``) needs
        no communication. The statistics are global and the same on every device.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``
      and whose state carries a :class:`ClipStats`.

    References:
      Brock et al., `High-Performance Large-Scale Image Recognition Without
      Normalization <https://arxiv.org/abs/2102.06171>`_, 2021.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tx = optaxclip.adaptive_grad_clip(0.1)
      >>> params = {"w": jnp.array([[3.0, 1.0], [4.0, 0.0]])}  # unit norms 5 and 1
      >>> grads = {"w": jnp.array([[0.0, 0.3], [1.0, 0.4]])}  # unit norms 1 and 0.5
      >>> clipped, state = jax.jit(tx.update)(grads, tx.init(params), params)
      >>> print(clipped["w"].round(4))  # capped at 0.1 * 5 = 0.5 and 0.1 * 1 = 0.1
      [[0.   0.06]
       [0.5  0.08]]
      >>> print(bool(state.stats.clipped), float(state.stats.threshold))
      True 0.1
      >>> stack = {"w": jnp.stack([params["w"], 10 * params["w"]])}  # two scanned layers
      >>> tx = optaxclip.adaptive_grad_clip(0.1, stacked_axes=1)
      >>> out, _ = jax.jit(tx.update)({"w": jnp.stack([grads["w"]] * 2)}, tx.init(stack), stack)
      >>> print(out["w"][1])  # the second layer's weights are 10x larger: no clip
      [[0.  0.3]
       [1.  0.4]]
    """
    check_threshold("clipping", clipping)
    check_threshold("eps", eps)
    _check_axis(axis)
    if not callable(stacked_axes):
        for value in jax.tree_util.tree_leaves(stacked_axes):
            _stack_depth(value, "", None)
    check_sharded_axis(axis_name, sharded_axis)
    tiny_weights = _tiny_weights_matter(eps)
    tiny_updates = _tiny_updates_matter(clipping, eps)

    def init_fn(params):
        del params
        return AdaptiveGradClipState(_stats.init_stats())

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "adaptive_grad_clip needs params: AGC clips each update relative to the "
                "norm of its weights, so pass params to update: "
                "tx.update(updates, state, params)."
            )
        check_float_leaves(updates)
        is_none = lambda x: x is None
        all_leaves, treedef = jax.tree_util.tree_flatten(updates, is_leaf=is_none)
        try:
            all_params = treedef.flatten_up_to(params)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"adaptive_grad_clip: params must have the same structure as the updates: {err}"
            ) from err
        paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(updates)[0]]
        depths = resolve_per_leaf(stacked_axes, updates, "stacked_axes", 0)
        splits = None if axis_name is None else split_axes(sharded_axis, updates)
        # The units' dtype: float32 unless an update is float64 (under x64).
        acc = accumulation_dtype([g for g in all_leaves if g is not None])
        limit = threshold_at(clipping, state.stats.count, "clipping", acc)
        floor = as_threshold(eps, acc)

        present, axes = [], []
        i = 0
        for g, w in zip(all_leaves, all_params, strict=True):
            if g is None:
                continue
            where = " " + (jax.tree_util.keystr(paths[i]) or "<root>")
            k = _stack_depth(depths[i], where, g.ndim)
            w = _params_leaf(w, g, where)
            # The unit rule reads the logical (whole) leaf's shape, not this device's
            # part of it: a split axis of size 1 here is not a vector's axis of size 1.
            shape = g.shape
            if splits is not None and splits[i] is not None:
                a = splits[i]
                shape = (*shape[:a], shape[a] * _devices_along(axis_name), *shape[a + 1 :])
            i += 1
            present.append((g, w))
            axes.append(tuple(k + a for a in unit_axes(
                shape[k:], axis, "adaptive_grad_clip", where, " or `stacked_axes`"
            )))
        if not present:
            new_stats = _stats.record(
                state.stats, norm=0.0, clipped_norm=0.0, threshold=limit, clipped=False
            )
            return updates, AdaptiveGradClipState(new_stats)

        # Under shard_map / pmap (axis_name given) leaves may be split across devices.
        clipped_leaves, norm, clipped_norm, clipped = clip_units(
            present,
            axes,
            splits or [None] * len(present),
            axis_name,
            limit,
            floor,
            tiny_weights,
            tiny_updates,
        )
        it = iter(clipped_leaves)
        out = [None if g is None else next(it) for g in all_leaves]
        new_stats = _stats.record(
            state.stats, norm=norm, clipped_norm=clipped_norm, threshold=limit, clipped=clipped
        )
        return jax.tree_util.tree_unflatten(treedef, out), AdaptiveGradClipState(new_stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
