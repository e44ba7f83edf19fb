"""Robust norms: float32 accumulation, overflow-safe, complex-aware, multi-device.

Every norm in optaxclip goes through :func:`_leaf_and_global_norms`. The common case
costs one read of each leaf: the float32 (float64 when a leaf is float64) sum of
squares. Only when that sum is not finite does a ``lax.cond`` branch run, which
rescales each leaf by its largest magnitude so that values beyond ~1.8e19 (whose
squares overflow float32) still give the right, finite norm, while a NaN or inf in
the input still gives a NaN or inf norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def _abs_sq(x: jax.Array, acc: jnp.dtype, scale: Any = None) -> jax.Array:
    """|scale * x|^2 elementwise in the accumulation dtype (upcast before scaling)."""
    if jnp.iscomplexobj(x):
        re, im = jnp.real(x).astype(acc), jnp.imag(x).astype(acc)
        if scale is not None:
            re, im = re * scale, im * scale
        return re * re + im * im
    y = x.astype(acc)
    if scale is not None:
        y = y * scale
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


# Compile time grows with the number of kernels, and a reduction per leaf is one
# kernel per leaf (three on XLA:CPU below 4096 elements, with the squares written out
# to memory). So leaves with fewer than _SMALL elements are copied, as they are, into
# a few shared [rows, width] buckets (one zero-padded row per leaf) whose row sums of
# squares are the per-leaf sums, while bigger leaves keep a reduction each (one fused
# read, nothing copied). The rescaled pass, which runs only when the plain sums
# overflowed, also buckets the big leaves that share a size, so that it adds a few
# dozen kernels instead of one per leaf. A bucket holds at most about 1/_BUCKETS of
# the tree's elements and the buckets run one after another, so the extra memory
# stays a few percent of the tree.
_SMALL = 4096
_BUCKETS = 32
_BUCKET_MIN = 1 << 14  # elements
_SHARED_LENGTH = 8  # this many small leaves of one size get rows of exactly that size


def _padded_width(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, ... (2^k or 3 * 2^k) that is >= n."""
    k = max(0, (n - 1).bit_length())
    if k >= 2 and 3 << (k - 2) >= n:
        return 3 << (k - 2)
    return 1 << k


def _is_known_unsharded(x: jax.Array) -> bool:
    """True when x's type says it is whole on every device (explicit or manual axes)."""
    typeof = getattr(jax, "typeof", None)
    axis_type = getattr(jax.sharding, "AxisType", None)
    if typeof is None or axis_type is None:
        return False
    try:
        sharding = typeof(x).sharding
        mesh = sharding.mesh
        if mesh.empty:
            return False
        if all(t in (axis_type.Explicit, axis_type.Manual) for t in mesh.axis_types):
            return all(p is None for p in sharding.spec)
    except Exception:  # noqa: BLE001 - a JAX without this information
        return False
    return False


def _concatenable(leaves: Sequence[jax.Array], axis_name: AxisName) -> list[bool]:
    """Which leaves may be copied into a shared bucket without any data movement.

    Inside ``shard_map``/``pmap`` (``axis_name`` given) and on a single device every
    leaf is local. Under plain ``jit`` with several devices GSPMD may have sharded a
    leaf, and concatenating it would make XLA all-gather it, so there only leaves
    whose type says they are replicated are bucketed; the others keep their own
    reduction, which partitions into local sums and an all-reduce of scalars.
    """
    if axis_name is not None or jax.device_count() == 1:
        return [True] * len(leaves)
    return [_is_known_unsharded(x) for x in leaves]


def _sums_of_squares(
    xs: Sequence[jax.Array],
    acc: jnp.dtype,
    concatenable: Sequence[bool],
    *,
    scale: float | None = None,
    bucket_big: bool = False,
    plain: dict[int, jax.Array] | None = None,
) -> tuple[jax.Array, dict[int, jax.Array]]:
    """The sum of |scale * x|^2 of each array, a vector in the order of ``xs``.

    Also returns the sums of the arrays reduced on their own (by index): the rescaled
    pass gets those of the plain pass as ``plain`` (see ``own`` below).
    """
    sizes = [math.prod(np.shape(x)) for x in xs]
    # The rescaled pass copies (nearly) everything, in bigger buckets: fewer kernels.
    bucket_size = max(_BUCKET_MIN, sum(sizes) // (_BUCKETS // 2 if bucket_big else _BUCKETS))
    counts: dict[tuple[str, int], int] = {}
    for x, size in zip(xs, sizes, strict=True):
        key = (jnp.dtype(x.dtype).name, size)
        counts[key] = counts.get(key, 0) + 1
    direct: list[int] = []
    buckets: dict[tuple[str, int], list[int]] = {}
    for i, (x, size) in enumerate(zip(xs, sizes, strict=True)):
        if size == 0:
            continue
        key = (jnp.dtype(x.dtype).name, size)
        if not concatenable[i]:
            direct.append(i)
        elif size < _SMALL:
            width = size if counts[key] >= _SHARED_LENGTH else _padded_width(size)
            buckets.setdefault((key[0], width), []).append(i)
        elif bucket_big and size <= bucket_size and counts[key] > 1:
            buckets.setdefault(key, []).append(i)
        else:
            direct.append(i)

    def own(witness: jax.Array) -> jax.Array | None:
        # XLA:CPU writes out in full a scalar broadcast that several reductions share,
        # so each reduction gets a scale of its own, tied to a scalar it alone reads
        # (and halved where that is NaN, when its sum is NaN anyway). The witness is
        # the plain sum for a leaf reduced on its own (indexing a sharded leaf would
        # gather it) and the first element for a bucket (local by construction).
        if scale is None:
            return None
        bad = jnp.isnan(witness)
        return jax.lax.select(bad, jnp.asarray(scale / 2, acc), jnp.asarray(scale, acc))

    parts: list[jax.Array] = []
    owners: list[int] = []  # the leaf of each entry of concatenate(parts)
    own_sums: dict[int, jax.Array] = {}
    for i in direct:
        witness = None if plain is None else plain[i]
        own_sums[i] = jnp.sum(_abs_sq(xs[i], acc, own(witness) if scale else None))
    if direct:
        parts.append(jnp.stack([own_sums[i] for i in direct]))
        owners.extend(direct)
    previous = None
    for (_, width), members in sorted(buckets.items()):
        rows_per_bucket = max(1, bucket_size // width)
        for start in range(0, len(members), rows_per_bucket):
            rows = members[start : start + rows_per_bucket]
            dtype = xs[rows[0]].dtype
            block = []
            for i in rows:
                block.append(xs[i].reshape(-1))
                if sizes[i] < width:
                    block.append(np.zeros((width - sizes[i],), dtype))
            if previous is not None:
                # The previous bucket's first sum rides along as an extra row that is
                # dropped: the buckets then run one after another, sharing one buffer.
                link = jax.lax.stop_gradient(previous[0]).astype(dtype)
                block.append(jnp.broadcast_to(link, (width,)))
            flat = jnp.concatenate(block) if len(block) > 1 else block[0]
            sums = jnp.sum(_abs_sq(flat.reshape(-1, width), acc, own(flat[0])), axis=1)
            previous = sums
            parts.append(sums)
            owners.extend(rows + [-1] * (sums.shape[0] - len(rows)))  # -1: the link row

    n = len(xs)
    if not parts:
        return jnp.zeros((n,), acc), own_sums
    values = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
    if owners == list(range(n)):
        return values, own_sums
    position = {i: k for k, i in enumerate(owners) if i >= 0}
    if len(position) < n:  # empty leaves read a zero
        values = jnp.concatenate([values, jnp.zeros((1,), acc)])
    index = [position.get(i, values.shape[0] - 1) for i in range(n)]
    return values[np.array(index, np.int32)], own_sums


def _sums_over_devices(
    xs: Sequence[jax.Array],
    acc: jnp.dtype,
    flags: Sequence[bool],
    axis_name: AxisName,
    concatenable: Sequence[bool],
    **how: Any,
) -> tuple[jax.Array, dict[int, jax.Array]]:
    """Per-leaf sums of squares, ``psum``-ed over ``axis_name`` for the sharded leaves.

    Sharded and replicated leaves are summed in separate buckets and only the
    sharded ones enter the (single) collective, so that under
    ``shard_map(check_vma=True)`` a replicated leaf's sum stays device-invariant.
    """
    if axis_name is None or all(flags) or not any(flags):
        sums, own = _sums_of_squares(xs, acc, concatenable, **how)
        if axis_name is not None and all(flags):
            sums = jax.lax.psum(sums, axis_name)
        return sums, own
    groups = [[i for i, f in enumerate(flags) if f], [i for i, f in enumerate(flags) if not f]]
    plain = how.pop("plain", None)
    results, own = [], {}
    for g in groups:
        local_plain = plain and {k: plain[i] for k, i in enumerate(g) if i in plain}
        sums, local = _sums_of_squares(
            [xs[i] for i in g], acc, [concatenable[i] for i in g], plain=local_plain, **how
        )
        results.append(sums)
        own.update({g[k]: v for k, v in local.items()})
    values = jnp.concatenate([jax.lax.psum(results[0], axis_name), results[1]])
    index = np.empty(len(xs), np.int32)
    index[groups[0] + groups[1]] = np.arange(len(xs))
    return values[index], own


# Multiplying by a power of two is exact, after it no finite float32 (float64) value
# overflows when squared and summed, and a sum that overflowed unscaled stays far
# above the smallest normal number.
_RESCALE = {32: 2.0**-96, 64: 2.0**-768}


def _leaf_and_global_norms(
    leaves: Sequence[jax.Array], *, axis_name: AxisName = None, flags: Sequence[bool] = ()
) -> tuple[jax.Array, jax.Array]:
    """Per-leaf L2 norms (a vector) and the global L2 norm, computed in one pass.

    The float32 (float64) sums of squares come first; only when their total is not
    finite does a second pass run (behind a ``lax.cond``), multiplying each leaf by a
    fixed power of two before squaring, so that a leaf whose sum overflowed gets its
    right, finite norm while a NaN/inf input still gives NaN/inf.

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
    concatenable = _concatenable(leaves, axis_name)
    sums, plain = _sums_over_devices(leaves, acc, flags, axis_name, concatenable)
    total = jnp.sum(sums)
    rescale = _RESCALE[jnp.finfo(acc).bits]

    # Both branches return (sums, total, factor) with norm = sqrt(sum) * factor: the
    # common one passes its inputs through, so it compiles to nothing, and the
    # square roots below are shared (each distinct scalar kernel costs compile time).
    def common(operands):
        return sums, total, jnp.ones((), acc)

    def overflowed(operands):
        how = dict(scale=rescale, bucket_big=True, plain=plain)
        scaled, _ = _sums_over_devices(operands, acc, flags, axis_name, concatenable, **how)
        return scaled, jnp.sum(scaled), jnp.asarray(1 / rescale, acc)

    sums2, total2, factor = jax.lax.cond(jnp.isfinite(total), common, overflowed, list(leaves))
    # Leaves whose plain sum is finite keep it (rescaling flushes their smallest squares
    # to zero). The rescaled total is accurate: it is only used when the plain one
    # overflowed, next to which the flushed squares are negligible. NaN/inf inputs
    # give NaN/inf either way.
    leaf_norms = jnp.where(jnp.isfinite(sums), safe_sqrt(sums), safe_sqrt(sums2) * factor)
    return leaf_norms, safe_sqrt(total2) * factor


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
