"""Robust norms: float32 accumulation, overflow-safe, complex-aware, multi-device.

Every norm of a whole leaf in optaxclip goes through
:func:`optaxclip._norm_engine.leaf_and_global_norms`. The common case
costs one read of each leaf: the float32 (float64 when a leaf is float64) sum of
squares. Only when that sum is not finite, or tiny (for per-leaf norms: when some
leaf's is), does a ``lax.cond`` branch run,
which sums the squares of each leaf times a fixed power of two, so that values beyond
~1.8e19 (whose squares overflow float32) and below ~1e-19 (whose squares flush to zero)
still give the right, finite norm, while a NaN or inf in the input still gives a NaN or
inf norm.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip._norm_engine import (
    AxisName,
    abs_sq,
    accumulation_dtype,
    divided,
    leaf_and_global_norms,
    safe_sqrt,
    unit_dot,
)
from optaxclip._validation import check_float_leaves, resolve_per_leaf

Sharded = Any  # None | bool | pytree of bool | Callable[[path, leaf], bool]

__all__ = ["global_norm", "block_norms", "unitwise_norm"]


def _divide_in(x: jax.Array, denom: jax.Array, acc: jnp.dtype) -> jax.Array:
    """x / denom computed in the accumulation precision (complex stays complex)."""
    if jnp.iscomplexobj(x):
        return x.astype(jnp.result_type(x, acc)) / denom
    return x.astype(acc) / denom


def vector_norm(v: jax.Array) -> jax.Array:
    """Overflow-safe L2 norm of a short vector of non-negative finite-or-not scalars."""
    if v.shape[0] == 0:
        return jnp.zeros((), v.dtype)
    big = jnp.max(v)
    ok = jnp.isfinite(big) & (big > 0)
    # The norm does not depend on the scale factor; without stop_gradient its
    # derivative would need big**2, which overflows exactly where this path runs.
    denom = jax.lax.stop_gradient(jnp.where(ok, big, 1))
    return jnp.where(ok, denom * safe_sqrt(jnp.sum(jnp.square(divided(v, denom)))), big)


def sharded_flags(tree: Any, sharded: Sharded) -> list[bool]:
    return [bool(f) for f in resolve_per_leaf(sharded, tree, "sharded", True)]


def global_norm(tree: Any, *, axis_name: AxisName = None, sharded: Sharded = None) -> jax.Array:
    """The L2 norm of all the leaves of a pytree together, computed robustly.

    Leaves are upcast to float32 (float64 when any leaf is float64) before squaring, so
    fp16 and bf16 gradients do not overflow or lose the small leaves. When the sum of
    squares overflows float32 but every value is finite, or is so small (below 2^-40)
    that squares under the smallest normal float may have flushed to zero, a rescaled
    second pass gives the correct finite norm; NaN or inf in the input gives a NaN or
    inf norm. The rare pass sits behind a ``lax.cond`` and costs nothing in the common
    case. The result is
    differentiable everywhere, with gradient 0 at an all-zero tree. Called outside
    ``jit`` it runs as one program, compiled on the first call for each tree structure
    (and each set of leaf shapes and dtypes).

    Args:
      tree: a pytree of floating point or complex arrays (None leaves are skipped).
      axis_name: inside ``shard_map``/``pmap``, the mapped axis (or tuple of axes) over
        which each device's partial sums of squares are ``psum``-ed.
      sharded: which leaves are sharded along ``axis_name`` (a pytree of bools or a
        callable ``(path, leaf) -> bool``); leaves marked False are replicated and are
        counted once. Default: every leaf is sharded.

    Returns:
      A float32 scalar (float64 when any leaf is float64).

    References:
      Pascanu et al., `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, 2013 (the global norm used for clipping);
      Blue, `A portable Fortran program to find the Euclidean norm of a vector
      <https://doi.org/10.1145/355769.355771>`_, 1978 (scaling to avoid overflow).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> print(optaxclip.global_norm({"a": jnp.array([3.0, 4.0]), "b": None}))
      5.0
      >>> print(optaxclip.global_norm([jnp.array([3e19, 4e19], jnp.float32)]))
      5e+19
      >>> print(optaxclip.global_norm([jnp.array([300.0, 400.0], jnp.float16)]))
      500.0
    """
    check_float_leaves(tree, "tree")
    leaves = jax.tree_util.tree_leaves(tree)
    _, norm = leaf_and_global_norms(
        leaves, axis_name=axis_name, flags=sharded_flags(tree, sharded), leaf_norms=False
    )
    return norm


def block_norms(tree: Any, *, axis_name: AxisName = None, sharded: Sharded = None) -> Any:
    """The L2 norm of each leaf, with the same robustness as :func:`global_norm`.

    Each leaf is exact on its own terms: a leaf whose values are all below ~1e-19 (its
    float32 squares flush to zero) gets its norm beside leaves of any size, also when
    another leaf's squares overflow. A leaf whose sum of squares is below 2^-70 (~1e-21),
    zeros included (a sum of 0 cannot tell them from flushed squares), sends the step
    down the rescaled pass, which reads the leaves of 4,096 elements or more again. (In
    a step where a leaf holds a NaN, such a leaf can read half its norm: see the
    decisions guide.)

    Called outside ``jit`` the norms are computed by one program, compiled on the first
    call for each tree structure (and each set of leaf shapes and dtypes).

    Args:
      tree: a pytree of floating point or complex arrays.
      axis_name: inside ``shard_map``/``pmap``, the axis over which sharded leaves'
        partial sums are ``psum``-ed, so each norm is that of the whole logical leaf.
      sharded: which leaves are sharded along ``axis_name`` (see :func:`global_norm`).

    Returns:
      A pytree of the same structure with one float32 scalar per leaf.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> norms = optaxclip.block_norms({"w": jnp.ones((2, 2)), "b": jnp.array([3.0, 4.0])})
      >>> print({k: float(v) for k, v in norms.items()})
      {'b': 5.0, 'w': 2.0}
      >>> tiny = optaxclip.block_norms({"a": jnp.ones(4), "b": jnp.array([3e-30, 4e-30])})
      >>> print(tiny["b"])
      5e-30
    """
    check_float_leaves(tree, "tree")
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaf_norms, _ = leaf_and_global_norms(
        leaves, axis_name=axis_name, flags=sharded_flags(tree, sharded)
    )
    return jax.tree_util.tree_unflatten(treedef, [leaf_norms[i] for i in range(len(leaves))])


def unit_axes(
    shape: tuple[int, ...], axis: Any, who: str, where: str = "", hint: str = ""
) -> tuple[int, ...]:
    """The axes of an array of ``shape`` that make up one unit (the one unit table).

    ``axis`` given: those axes, normalised (negative ones counted from the end).
    ``axis=None``: the convention of ``optax.unitwise_norm`` and of the NFNet reference
    code, read from the shape (not an array, so that AGC can apply it to one layer of a
    stack): a scalar or vector (at most one axis longer than 1) is one unit; rank 2 or
    3 (linear (in, out), multi-head linear) one unit per output: axis 0; rank 4 (conv
    HWIO) axes (0, 1, 2); rank 5 (conv3d DHWIO) axes (0, 1, 2, 3). ``who``, ``where``
    (the leaf's path) and ``hint`` (what else the caller can pass) go into the errors.
    """
    rank = len(shape)
    if axis is not None:
        axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
        out = []
        for a in axes:
            a = operator.index(a)
            if not -rank <= a < rank:
                raise ValueError(
                    f"{who}: axis {axis!r} is out of range for the array{where} of "
                    f"shape {shape}."
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
        f"{who}: no default unit for the array{where} of shape {shape}; pass `axis` "
        f"(the axes that make up one unit){hint}."
    )


# Each unit's sum of squares is accumulated three times from the same read of x: plain,
# times _DOWN (cannot overflow: used where the plain sum is inf) and times _UP (the
# squares of the smallest normal numbers stay normal: used where the plain sum is below
# _LOW, including 0, where squares flushed to zero may have been most of it). Multiplying
# by a power of two is exact. No lax.cond: one per leaf, or one for the tree with
# per-leaf outputs, made a model of 200 leaves compile several times slower. Per
# accumulation dtype's bits: (_DOWN, _UP, _LOW). Where the plain sum is at least _LOW,
# the squares it lost are below 2^-46 (2^-100) of it per element; below _LOW, the
# upscaled sum cannot overflow; the downscaled sum is read only above the largest float.
_UNIT_SCALES = {32: (2.0**-100, 2.0**100, 2.0**-80), 64: (2.0**-600, 2.0**600, 2.0**-900)}


def _unit_sums(x: jax.Array, axes: tuple[int, ...], tiny: bool) -> tuple[jax.Array, ...]:
    """The plain, downscaled and (when ``tiny``) upscaled per-unit sums of squares."""
    acc = accumulation_dtype([x])
    down, up, _ = _UNIT_SCALES[jnp.finfo(acc).bits]
    sums = [jnp.sum(abs_sq(x, acc), axis=axes, keepdims=True)]
    for scale in (down, up) if tiny else (down,):  # x / (1 / scale): a form XLA keeps
        scaled = _divide_in(x, jnp.asarray(1 / scale, acc), acc)
        sums.append(jnp.sum(abs_sq(scaled, acc), axis=axes, keepdims=True))
    return tuple(sums)


def _norms_from_sums(sums: tuple[jax.Array, ...]) -> jax.Array:
    """Per-unit norms from :func:`_unit_sums`; NaN/inf in x gives NaN/inf."""
    plain, downscaled = sums[0], sums[1]
    down, up, low = _UNIT_SCALES[jnp.finfo(plain.dtype).bits]
    # sqrt(downscaled) / down and sqrt(upscaled) / up (1 / down == up, exactly).
    huge = jnp.sqrt(downscaled) * jnp.asarray(up, plain.dtype)
    # No where-NaN trap: unit_norms has its own derivative, which reads none of these.
    normal = jax.lax.select(jnp.isfinite(plain), jnp.sqrt(plain), huge)  # NaN stays NaN
    if len(sums) == 2:
        return normal
    tiny = jnp.sqrt(sums[2]) * jnp.asarray(down, plain.dtype)
    return jax.lax.select(plain < low, tiny, normal)


def _psum_some(
    values: list[tuple[jax.Array, ...]], reduced: tuple[bool, ...], axis_name: AxisName
) -> list[tuple[jax.Array, ...]]:
    """``values`` with the arrays of those flagged in ``reduced`` psum-ed, all in one
    collective."""
    parts = [x for flag, group in zip(reduced, values, strict=True) if flag for x in group]
    if not parts:
        return values
    flat = jax.lax.psum(jnp.concatenate([x.ravel() for x in parts]), axis_name)
    out, offset = [], 0
    for flag, group in zip(reduced, values, strict=True):
        if flag:
            summed = []
            for x in group:
                summed.append(flat[offset : offset + x.size].reshape(x.shape))
                offset += x.size
            group = tuple(summed)
        out.append(group)
    return out


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def unit_norms(
    axes: tuple[tuple[int, ...], ...],
    axis_name: AxisName,
    reduced: tuple[bool, ...],
    tiny: tuple[bool, ...],
    xs: list[jax.Array],
) -> list[jax.Array]:
    """The per-unit L2 norms of each array of ``xs`` (unit axes kept as size 1).

    float32 accumulation (float64 for float64 leaves), right beyond the float32
    overflow point and down to the smallest normal number, NaN/inf where x holds one.
    The three sums of each unit (see ``_UNIT_SCALES``) are reductions of the same ``x``, with
    no ``lax.cond``. Where ``reduced[i]``, ``xs[i]`` is a part of each unit and its sums
    are ``psum``-ed over ``axis_name`` (one collective for all of them). Where not
    ``tiny[i]``, the caller has no use for the norms of units below ~1e-12 (float32):
    the upscaled sum is left out and those read as their plain sums (0 where flushed).

    Differentiable everywhere (its own JVP: ``d||u|| = <u / ||u||, du>``, 0 at a zero
    unit), so gradients neither pass through the unselected sums (the where-NaN trap)
    nor through the rescaled ones (whose chain rule overflows near 1e20).
    """
    sums = [_unit_sums(x, ax, t) for x, ax, t in zip(xs, axes, tiny, strict=True)]
    return [_norms_from_sums(s) for s in _psum_some(sums, reduced, axis_name)]


@unit_norms.defjvp
def _unit_norms_jvp(axes, axis_name, reduced, tiny, primals, tangents):
    (xs,), (dxs,) = primals, tangents
    norms = unit_norms(axes, axis_name, reduced, tiny, xs)
    parts = []
    for x, dx, norm, ax in zip(xs, dxs, norms, axes, strict=True):
        # A zero unit has x = 0: any positive denominator gives its tangent, 0.
        denom = jnp.where(norm > 0, norm, 1)
        parts.append((unit_dot(jnp.asarray(x), jnp.asarray(dx), denom, norm.dtype, ax),))
    return norms, [t for (t,) in _psum_some(parts, reduced, axis_name)]


def unitwise_norm(x: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """The L2 norm of each unit of ``x``, broadcast back to ``x.shape``.

    A unit is a slice of ``x`` over the axes in ``axis``. With ``axis=None`` the
    convention of Optax and of the NFNet reference code applies: a scalar or vector
    is one unit; a rank-2 or rank-3 kernel reduces over axis 0 (one unit per output
    unit); rank 4 (HWIO conv) over axes (0, 1, 2); rank 5 over axes (0, 1, 2, 3).
    Accumulates in float32 and is overflow-safe like :func:`global_norm`, and
    underflow-safe: units of values down to the smallest normal number get their norm,
    not 0: a unit whose plain sum of squares is inf or tiny (below 2^-80 in float32,
    which includes an all-zero unit) sends the call through the rescaled sums that AGC
    measures with, behind one ``lax.cond``. An empty array gives an empty array.

    Args:
      x: a floating point or complex array.
      axis: the axis or axes that make up one unit, or None for the convention above.

    Returns:
      A float32 (float64 for float64 input) array of ``x.shape``.

    References:
      Brock et al., `High-Performance Large-Scale Image Recognition Without
      Normalization <https://arxiv.org/abs/2102.06171>`_, 2021.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> print(optaxclip.unitwise_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]])))
      [[5. 1.]
       [5. 1.]]
    """
    x = jnp.asarray(x)
    check_float_leaves(x, "x")
    axes = unit_axes(x.shape, axis, "unitwise_norm")
    acc = accumulation_dtype([x])
    sums = jnp.sum(abs_sq(x, acc), axis=axes, keepdims=True)
    low = _UNIT_SCALES[jnp.finfo(acc).bits][2]
    # One array, one cond: the common case costs one read (the three sums of
    # unit_norms, which AGC takes without a cond to keep its compile time flat over
    # many leaves, cost about 3x here); inf or tiny sums go through unit_norms.
    plain_ok = jnp.all(jnp.isfinite(sums) & (sums >= low))
    norms = jax.lax.cond(
        plain_ok,
        lambda x: safe_sqrt(sums),
        lambda x: unit_norms((axes,), None, (False,), (True,), [x])[0],
        x,
    )
    return jnp.broadcast_to(norms, x.shape)
