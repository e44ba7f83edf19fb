"""Adaptive gradient clipping (Brock et al. 2021): each unit's update is capped
relative to the norm of the weights it updates."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _stats
from optaxclip._agc_sharded import check_sharded_axis, clip_units_across_devices, split_axes
from optaxclip._global import scale_leaf
from optaxclip._norms import (
    AxisName,
    _abs_sq,
    _divide,
    _vector_norm,
    accumulation_dtype,
)
from optaxclip._stats import ClipStats
from optaxclip._validation import (
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


def _layer_unit_axes(shape: tuple[int, ...], axis: Axis, where: str) -> tuple[int, ...]:
    """The axes of one layer (shape without its stacked axes) that make up a unit.

    Mirrors ``optax.unitwise_norm``'s convention (and optaxclip's ``unitwise_norm``),
    on shapes rather than arrays so that it can be applied to a slice of a stack.
    """
    rank = len(shape)
    if axis is not None:
        axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
        out = []
        for a in axes:
            a = operator.index(a)
            if not -rank <= a < rank:
                raise ValueError(
                    f"adaptive_grad_clip: axis {axis!r} is out of range for the leaf{where} "
                    f"whose unstacked shape is {shape}."
                )
            out.append(a % rank)
        return tuple(sorted(set(out)))
    if sum(d != 1 for d in shape) <= 1:  # scalars and vectors: one unit
        return tuple(range(rank))
    if rank in (2, 3):  # linear (in, out) or multi-head linear: one unit per output
        return (0,)
    if rank == 4:  # conv HWIO
        return (0, 1, 2)
    if rank == 5:  # conv3d DHWIO
        return (0, 1, 2, 3)
    raise ValueError(
        f"adaptive_grad_clip: no default unit for the leaf{where} of (unstacked) shape "
        f"{shape}; pass `axis` (the axes that make up one unit) or `stacked_axes`."
    )


# Each unit's sum of squares is also accumulated on x / 2**100, which cannot overflow;
# it is used where the plain sum overflowed. The entries that underflow in it (below
# ~1e11) are too small to matter beside a unit whose norm is above 1.8e19.
_RESCALE = 2.0**100


def _unit_norm(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Per-unit L2 norms of ``x`` (unit axes kept as size 1), overflow-safe.

    The numerics of :func:`optaxclip.unitwise_norm` (float32 accumulation, correct
    beyond 1.8e19, NaN/inf stays NaN/inf) without its ``lax.cond``: the plain and the
    rescaled sums of squares are two accumulators of the same fused read of ``x``, so
    no extra pass runs and each leaf adds only a handful of ops to the program. A
    ``lax.cond`` per leaf, or one for the tree with per-leaf outputs, made a model of
    200 leaves compile several times slower than ``optax.adaptive_grad_clip``.
    """
    acc = accumulation_dtype([x])
    plain = jnp.sum(_abs_sq(x, acc), axis=axes, keepdims=True)
    small = jnp.sum(
        _abs_sq(_divide(x, jnp.asarray(_RESCALE, acc), acc), acc), axis=axes, keepdims=True
    )
    return jnp.where(
        jnp.isfinite(plain), jax.lax.sqrt(plain), jnp.asarray(_RESCALE, acc) * jax.lax.sqrt(small)
    )


def _flat(vectors: list[jax.Array]) -> jax.Array:
    """All the per-unit values of the tree as one vector, for the statistics.

    The barrier keeps XLA from fusing every leaf's producer into one giant concatenate
    fusion, whose compile time grows much faster than the number of leaves.
    """
    return jax.lax.optimization_barrier(jnp.concatenate([v.ravel() for v in vectors]))


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
    in float32 (overflow-safe) and one float32 multiply per element, so bf16/fp16
    leaves keep their dtype without losing precision. A unit whose update norm is
    NaN/inf is returned unchanged (the NaN stays in that unit, nothing else is
    touched) and the step is counted in ``nonfinite_count``.

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
        The params must be split like the updates. A unit cut by the split (the split
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
    if isinstance(axis, (jax.Array, jax.core.Tracer)):
        raise TypeError(static_hint("adaptive_grad_clip", "axis", _STATIC) + f" Got {axis!r}.")
    if not callable(stacked_axes):
        for value in jax.tree_util.tree_leaves(stacked_axes):
            _stack_depth(value, "", None)
    check_sharded_axis(axis_name, sharded_axis)

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
        limit = threshold_at(clipping, state.stats.count)
        floor = jnp.asarray(eps, jnp.float32)

        present, axes = [], []
        i = 0
        for g, w in zip(all_leaves, all_params, strict=True):
            if g is None:
                continue
            where = " " + (jax.tree_util.keystr(paths[i]) or "<root>")
            k = _stack_depth(depths[i], where, g.ndim)
            i += 1
            w = jnp.asarray(w)
            if w.shape != g.shape:
                raise ValueError(
                    f"adaptive_grad_clip: the params leaf{where} has shape {w.shape} but its "
                    f"update has shape {g.shape}."
                )
            present.append((g, w))
            axes.append(tuple(k + a for a in _layer_unit_axes(g.shape[k:], axis, where)))
        if not present:
            new_stats = _stats.record(
                state.stats, norm=0.0, clipped_norm=0.0, threshold=limit, clipped=False
            )
            return updates, AdaptiveGradClipState(new_stats)

        if axis_name is not None:  # shard_map / pmap: leaves split across devices
            clipped_leaves, norm, clipped_norm, clipped = clip_units_across_devices(
                present, axes, split_axes(sharded_axis, updates), axis_name, limit, floor
            )
            it = iter(clipped_leaves)
            out = [None if g is None else next(it) for g in all_leaves]
            new_stats = _stats.record(
                state.stats, norm=norm, clipped_norm=clipped_norm, threshold=limit, clipped=clipped
            )
            return jax.tree_util.tree_unflatten(treedef, out), AdaptiveGradClipState(new_stats)

        clipped_leaves, before, after = [], [], []
        for (g, w), ax in zip(present, axes, strict=True):
            g_norm = _unit_norm(g, ax)
            dtype = g_norm.dtype
            bound = limit.astype(dtype) * jnp.maximum(
                _unit_norm(w, ax).astype(dtype), floor.astype(dtype)
            )
            # A NaN/inf unit is left as it is (NaN > bound is False; inf is excluded).
            over = (g_norm > bound) & (g_norm < jnp.inf)
            clipped_leaves.append(scale_leaf(g, jnp.where(over, bound / g_norm, 1)))
            before.append(g_norm)
            after.append(jnp.where(over, bound, g_norm))
        before, after = _flat(before), _flat(after)
        norm = _vector_norm(before)
        clipped_norm = _vector_norm(after)
        clipped = jnp.any(after < before)  # exactly the units scaled down
        it = iter(clipped_leaves)
        out = [None if g is None else next(it) for g in all_leaves]
        new_stats = _stats.record(
            state.stats, norm=norm, clipped_norm=clipped_norm, threshold=limit, clipped=clipped
        )
        return jax.tree_util.tree_unflatten(treedef, out), AdaptiveGradClipState(new_stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
