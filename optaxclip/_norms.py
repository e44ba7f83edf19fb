"""Robust norms: float32 accumulation, overflow-safe, complex-aware, multi-device.

Every norm in optaxclip goes through :func:`_leaf_and_global_norms`. The common case
costs one read of each leaf: the float32 (float64 when a leaf is float64) sum of
squares. Only when that sum is not finite does a ``lax.cond`` branch run, which
rescales each leaf by its largest magnitude so that values beyond ~1.8e19 (whose
squares overflow float32) still give the right, finite norm, while a NaN or inf in
the input still gives a NaN or inf norm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optaxclip._validation import resolve_per_leaf

AxisName = Any  # str | tuple[str, ...] | None
Sharded = Any  # None | bool | pytree of bool | Callable[[path, leaf], bool]

__all__ = ["global_norm", "block_norms", "unitwise_norm"]


def accumulation_dtype(leaves: Sequence[jax.Array]) -> jnp.dtype:
    """float64 when any leaf is float64/complex128, else float32."""
    for leaf in leaves:
        if jnp.finfo(jnp.result_type(leaf)).bits == 64:
            return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _abs_sq(x: jax.Array, acc: jnp.dtype) -> jax.Array:
    """|x|^2 elementwise in the accumulation dtype (upcast before squaring)."""
    if jnp.iscomplexobj(x):
        re, im = jnp.real(x).astype(acc), jnp.imag(x).astype(acc)
        return re * re + im * im
    y = x.astype(acc)
    return y * y


def _abs(x: jax.Array, acc: jnp.dtype) -> jax.Array:
    return jnp.abs(x).astype(acc)


def _divide(x: jax.Array, denom: jax.Array, acc: jnp.dtype) -> jax.Array:
    """x / denom computed in the accumulation precision (complex stays complex)."""
    if jnp.iscomplexobj(x):
        return x.astype(jnp.result_type(x, acc)) / denom
    return x.astype(acc) / denom


def safe_sqrt(s: jax.Array) -> jax.Array:
    """sqrt with a zero (not NaN) gradient at 0; NaN and inf pass through."""
    zero = s == 0
    return jnp.where(zero, jnp.zeros_like(s), jnp.sqrt(jnp.where(zero, 1, s)))


def _reduce_over_devices(
    values: Sequence[jax.Array], flags: Sequence[bool], axis_name: AxisName, op: Callable
) -> jax.Array:
    """Stacks per-leaf scalars, reducing across devices those whose leaf is sharded.

    Replicated leaves (flag False) already hold the whole value on every device and
    are counted once. All flagged entries travel in one collective. The replicated
    entries are kept out of it (not stacked with the sharded ones first), so that
    under ``shard_map(check_vma=True)`` the result is device-invariant and a
    replicated leaf scaled by it can still be returned with a replicated out_spec.
    """
    if axis_name is None or not any(flags):
        return jnp.stack(values)
    sharded_at = [i for i, flag in enumerate(flags) if flag]
    reduced = op(jnp.stack([values[i] for i in sharded_at]), axis_name)
    out = list(values)
    for j, i in enumerate(sharded_at):
        out[i] = reduced[j]
    return jnp.stack(out)


def _vector_norm(v: jax.Array) -> jax.Array:
    """Overflow-safe L2 norm of a short vector of non-negative finite-or-not scalars."""
    if v.shape[0] == 0:
        return jnp.zeros((), v.dtype)
    big = jnp.max(v)
    ok = jnp.isfinite(big) & (big > 0)
    # The norm does not depend on the scale factor; without stop_gradient its
    # derivative would need big**2, which overflows exactly where this path runs.
    denom = jax.lax.stop_gradient(jnp.where(ok, big, 1))
    return jnp.where(ok, denom * safe_sqrt(jnp.sum(jnp.square(v / denom))), big)


def _leaf_and_global_norms(
    leaves: Sequence[jax.Array], *, axis_name: AxisName = None, flags: Sequence[bool] = ()
) -> tuple[jax.Array, jax.Array]:
    """Per-leaf L2 norms (a vector) and the global L2 norm, computed in one pass.

    Args:
      leaves: the arrays (no None).
      axis_name: mapped axis over which sharded leaves' partial sums are ``psum``-ed.
      flags: one bool per leaf, True when that leaf is sharded along ``axis_name``.

    Returns:
      ``(leaf_norms, norm)`` in the accumulation dtype.
    """
    acc = accumulation_dtype(leaves)
    if not leaves:
        return jnp.zeros((0,), acc), jnp.zeros((), acc)
    flags = list(flags) or [True] * len(leaves)
    sums = [jnp.sum(_abs_sq(x, acc)) for x in leaves]
    sums = _reduce_over_devices(sums, flags, axis_name, jax.lax.psum)
    total = jnp.sum(sums)

    def common(operands):
        return safe_sqrt(sums), safe_sqrt(total)

    def overflowed(operands):
        # Rescale each leaf by its largest magnitude: (x / m)^2 <= 1 cannot overflow.
        xs = operands
        maxes = [jnp.max(_abs(x, acc)) for x in xs]
        maxes = _reduce_over_devices(maxes, flags, axis_name, jax.lax.pmax)
        usable = jnp.isfinite(maxes) & (maxes > 0)
        denoms = jax.lax.stop_gradient(jnp.where(usable, maxes, 1))  # see _vector_norm
        scaled = [
            jnp.sum(_abs_sq(_divide(x, d, acc), acc)) for x, d in zip(xs, denoms, strict=True)
        ]
        scaled = _reduce_over_devices(scaled, flags, axis_name, jax.lax.psum)
        # A NaN/inf leaf keeps its plain (NaN/inf) sum: no masking of bad input.
        leaf_norms = jnp.where(usable, denoms * safe_sqrt(scaled), safe_sqrt(sums))
        finite = jnp.all(jnp.isfinite(leaf_norms))
        return leaf_norms, jnp.where(finite, _vector_norm(leaf_norms), safe_sqrt(total))

    return jax.lax.cond(jnp.isfinite(total), common, overflowed, list(leaves))


def _flags_for(tree: Any, sharded: Sharded) -> list[bool]:
    return [bool(f) for f in resolve_per_leaf(sharded, tree, "sharded", True)]


def global_norm(tree: Any, *, axis_name: AxisName = None, sharded: Sharded = None) -> jax.Array:
    """The L2 norm of all the leaves of a pytree together, computed robustly.

    Leaves are upcast to float32 (float64 when any leaf is float64) before squaring, so
    fp16 and bf16 gradients do not overflow or lose the small leaves. When the sum of
    squares overflows float32 but every value is finite, a rescaled second pass gives
    the correct finite norm; NaN or inf in the input gives a NaN or inf norm. The rare
    pass sits behind a ``lax.cond`` and costs nothing in the common case. The result is
    differentiable everywhere, with gradient 0 at an all-zero tree.

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
    leaves = jax.tree_util.tree_leaves(tree)
    _, norm = _leaf_and_global_norms(
        leaves, axis_name=axis_name, flags=_flags_for(tree, sharded)
    )
    return norm


def block_norms(tree: Any, *, axis_name: AxisName = None, sharded: Sharded = None) -> Any:
    """The L2 norm of each leaf, with the same robustness as :func:`global_norm`.

    Args:
      tree: a pytree of floating point or complex arrays.
      axis_name: inside ``shard_map``/``pmap``, the axis over which sharded leaves'
        partial sums are ``psum``-ed, so each norm is that of the whole logical leaf.
      sharded: which leaves are sharded along ``axis_name`` (see :func:`global_norm`).

    Returns:
      A pytree of the same structure with one float32 scalar per leaf.

    References:
      Pascanu et al., `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, 2013.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> norms = optaxclip.block_norms({"w": jnp.ones((2, 2)), "b": jnp.array([3.0, 4.0])})
      >>> print({k: float(v) for k, v in norms.items()})
      {'b': 5.0, 'w': 2.0}
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaf_norms, _ = _leaf_and_global_norms(
        leaves, axis_name=axis_name, flags=_flags_for(tree, sharded)
    )
    return jax.tree_util.tree_unflatten(treedef, [leaf_norms[i] for i in range(len(leaves))])


def _default_unit_axes(x: jax.Array) -> tuple[int, ...] | None:
    """Optax's unit convention: None = the whole array is one unit."""
    if jnp.squeeze(x).ndim <= 1:
        return None
    if x.ndim in (2, 3):  # Linear (in, out) or multi-head linear.
        return (0,)
    if x.ndim == 4:  # Conv HWIO.
        return (0, 1, 2)
    if x.ndim == 5:  # Conv3D DHWIO.
        return (0, 1, 2, 3)
    raise ValueError(
        f"unitwise_norm: no default unit for an array of shape {x.shape}; pass `axis` "
        "(the axes that make up one unit)."
    )


def unitwise_norm(x: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """The L2 norm of each unit of ``x``, broadcast back to ``x.shape``.

    A unit is a slice of ``x`` over the axes in ``axis``. With ``axis=None`` the
    convention of Optax and of the NFNet reference code applies: a scalar or vector
    is one unit; a rank-2 or rank-3 kernel reduces over axis 0 (one unit per output
    unit); rank 4 (HWIO conv) over axes (0, 1, 2); rank 5 over axes (0, 1, 2, 3).
    Accumulates in float32 and is overflow-safe like :func:`global_norm`.

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
    if axis is None:
        axis = _default_unit_axes(x)
    acc = accumulation_dtype([x])
    sums = jnp.sum(_abs_sq(x, acc), axis=axis, keepdims=True)

    def common(_):
        return safe_sqrt(sums)

    def overflowed(x):
        maxes = jnp.max(_abs(x, acc), axis=axis, keepdims=True)
        usable = jnp.isfinite(maxes) & (maxes > 0)
        denoms = jax.lax.stop_gradient(jnp.where(usable, maxes, 1))  # see _vector_norm
        scaled = jnp.sum(_abs_sq(_divide(x, denoms, acc), acc), axis=axis, keepdims=True)
        return jnp.where(usable, denoms * safe_sqrt(scaled), safe_sqrt(sums))

    norms = jax.lax.cond(jnp.all(jnp.isfinite(sums)), common, overflowed, x)
    return jnp.broadcast_to(norms, x.shape)
