"""Robust norms: float32 accumulation, overflow-safe, complex-aware, multi-device.

Every norm in optaxclip goes through :func:`_leaf_and_global_norms`. The common case
costs one read of each leaf: the float32 (float64 when a leaf is float64) sum of
squares. Only when that sum is not finite, or tiny, does a ``lax.cond`` branch run,
which sums the squares of each leaf times a fixed power of two, so that values beyond
~1.8e19 (whose squares overflow float32) and below ~1e-19 (whose squares flush to zero)
still give the right, finite norm, while a NaN or inf in the input still gives a NaN or
inf norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip._validation import check_float_leaves, resolve_per_leaf

AxisName = Any  # str | tuple[str, ...] | None
Sharded = Any  # None | bool | pytree of bool | Callable[[path, leaf], bool]

__all__ = ["global_norm", "block_norms", "unitwise_norm"]


def accumulation_dtype(leaves: Sequence[jax.Array]) -> jnp.dtype:
    """float64 when any leaf is float64/complex128, else float32."""
    for leaf in leaves:
        if jnp.finfo(jnp.result_type(leaf)).bits == 64:
            return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _abs_sq(x: jax.Array, acc: jnp.dtype, scale: Any = None, bound: Any = None) -> jax.Array:
    """|scale * x|^2 elementwise in the accumulation dtype (upcast before scaling).

    ``bound`` first clamps each real component to [-bound, bound]: a sum scaled up for
    underflow is read only when every value lies inside it, and elsewhere the clamp
    keeps it (and its derivative) finite, so that it cannot turn a gradient into NaN.
    """
    parts = [jnp.real(x), jnp.imag(x)] if jnp.iscomplexobj(x) else [x]
    out = None
    for part in parts:
        y = part.astype(acc)
        if bound is not None:
            y = jnp.clip(y, -bound, bound)
        if scale is not None:
            y = y * scale
        out = y * y if out is None else out + y * y
    return out


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
# read, nothing copied). A bucket holds at most about 1/_BUCKETS of the tree's
# elements and the buckets run one after another, so the extra memory stays a few
# percent of the tree.
#
# The overflow rescue of a bucket is computed with its plain sums, from the same
# buffer while it is in cache: a second (rescaled) reduction of a few dozen small
# buckets costs little time and, unlike a rare branch that copies the buckets again,
# almost no compile time. The leaves reduced on their own are rescued behind a
# lax.cond that runs only when the plain total is not finite (a second read of a big
# leaf would cost a pass); when there are many of them it buckets those that share a
# size, so that it adds a few dozen kernels instead of one per leaf.
_SMALL = 4096
_BUCKETS = 32
_BUCKET_MIN = 1 << 14  # elements
_SHARED_LENGTH = 8  # this many small leaves of one size get rows of exactly that size
_STACK = 64  # the sums of the leaves reduced on their own are stacked this many at a time
# Multiplying by a power of two is exact, after it no finite float32 (float64) value
# overflows when squared and summed, and a sum that overflowed unscaled stays far
# above the smallest normal number.
_RESCALE = {32: 2.0**-96, 64: 2.0**-768}
# Squares below the smallest normal number flush to zero (|x| < ~1.1e-19 in float32), so
# a total sum of squares below _TINY_TOTAL may have lost terms that matter; such a tree
# is summed again times _UPSCALE. Below _TINY_TOTAL every |x| < sqrt(_TINY_TOTAL), whose
# upscaled squares cannot overflow, and the smallest normal value's upscaled square is
# still normal. Above it, the lost squares are < 2^-80 (2^-600) of the total.
_TINY_TOTAL = {32: 2.0**-40, 64: 2.0**-400}
_UPSCALE = {32: 2.0**64, 64: 2.0**540}
_UP_BOUND = {bits: math.sqrt(total) for bits, total in _TINY_TOTAL.items()}


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


def _layout(
    xs: Sequence[jax.Array], sizes: list[int], concatenable: Sequence[bool], copy_big: bool
) -> tuple[list[int], list[tuple[int, list[int]]]]:
    """(arrays reduced on their own, buckets as (row width, rows)).

    Empty arrays are in neither list.
    """
    # The rescue copies big leaves too, in bigger buckets: fewer kernels.
    bucket_size = max(_BUCKET_MIN, sum(sizes) // (_BUCKETS // 2 if copy_big else _BUCKETS))
    counts: dict[tuple[str, int], int] = {}
    for x, size in zip(xs, sizes, strict=True):
        key = (jnp.dtype(x.dtype).name, size)
        counts[key] = counts.get(key, 0) + 1
    direct: list[int] = []
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (x, size) in enumerate(zip(xs, sizes, strict=True)):
        key = (jnp.dtype(x.dtype).name, size)
        if size == 0:
            continue
        if not concatenable[i]:
            direct.append(i)
        elif size < _SMALL:
            width = size if counts[key] >= _SHARED_LENGTH else _padded_width(size)
            groups.setdefault((key[0], width), []).append(i)
        elif copy_big and size <= bucket_size and counts[key] > 1:
            groups.setdefault(key, []).append(i)
        else:
            direct.append(i)
    buckets = []
    for (_, width), members in sorted(groups.items()):
        per_bucket = max(1, bucket_size // width)
        for k in range(0, len(members), per_bucket):
            buckets.append((width, members[k : k + per_bucket]))
    return direct, buckets


def _sum_rows(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """The row sums of each of several same-shaped 2-D arrays, as one variadic reduction."""
    zero = tuple(jnp.zeros((), a.dtype) for a in arrays)
    return tuple(
        jax.lax.reduce(
            arrays, zero, lambda x, y: tuple(a + b for a, b in zip(x, y, strict=True)), (1,)
        )
    )


def _own_scale(witness: jax.Array, scale: float, acc: jnp.dtype) -> jax.Array:
    """``scale`` as a scalar that XLA cannot see through, tied to ``witness``.

    A constant would not do: XLA rewrites (c x)^2 as x^2 c^2, and c^2 is 0 in float32.
    A scalar shared by several reductions would not do either: XLA:CPU writes its
    broadcast out in full. So each reduction gets its own, halved where the witness
    (a value only that reduction reads) is NaN (see :class:`_Sums` for why reading
    every rescaled sum as if it used ``scale`` is right).
    """
    bad = jnp.isnan(witness)
    return jax.lax.select(bad, jnp.asarray(scale / 2, acc), jnp.asarray(scale, acc))


class _Sums(NamedTuple):
    """Per-array sums of squares, in the order of the arrays.

    ``plain``: sum |x|^2. ``scaled``: two rows, sum |c x|^2 with c = _RESCALE (row 0,
    for overflow) and c = _UPSCALE (row 1, for underflow) for bucketed arrays (0 for the
    others, whose rescue runs apart), None when nothing is bucketed and in the rescue
    pass. ``own``: the plain sums of the arrays reduced on their own, by index.

    Every rescaled sum is read as if c were _RESCALE (_UPSCALE). :func:`_own_scale` halves c only
    in a reduction whose witness is NaN: a leaf reduced on its own whose sum is NaN
    anyway, or a bucket whose first leaf holds a NaN (the total is then NaN, and
    another leaf of that bucket whose plain sum overflowed would read a norm half its
    size in that NaN step).
    """

    plain: jax.Array
    scaled: jax.Array | None
    own: dict[int, jax.Array]


def _square_sums(
    xs: Sequence[jax.Array],
    acc: jnp.dtype,
    concatenable: Sequence[bool],
    *,
    scale: float | None = None,
    copy_big: bool = False,
    witnesses: dict[int, jax.Array] | None = None,
) -> _Sums:
    """The sums of squares of each array (``scale * x`` when ``scale`` is given).

    Without ``scale`` (the common pass) the buckets also give their rescaled sums. With
    it (the rescue of the arrays reduced on their own), ``witnesses`` holds their plain
    sums, which tie each reduction to a scale of its own (see :func:`_own_scale`).
    """
    sizes = [math.prod(np.shape(x)) for x in xs]
    direct, buckets = _layout(xs, sizes, concatenable, copy_big)
    rescale = _RESCALE[jnp.finfo(acc).bits]
    upscale = _UPSCALE[jnp.finfo(acc).bits]
    n = len(xs)
    plain_parts: list[jax.Array] = []
    scaled_parts: list[jax.Array] = []
    owners: list[int] = []  # the array of each entry of concatenate(parts); -1: none
    own: dict[int, jax.Array] = {}
    for i in direct:
        c = None if scale is None else _own_scale(witnesses[i], scale, acc)
        own[i] = jnp.sum(_abs_sq(xs[i], acc, c))
    for k in range(0, len(direct), _STACK):
        # A concatenation of thousands of scalars compiles superlinearly slowly, so
        # they are stacked a few dozen at a time; the max (a no-op on sums of squares
        # that keeps NaN) stops XLA from merging the stacks back into one.
        group = direct[k : k + _STACK]
        stacked = jnp.stack([own[i] for i in group])
        plain_parts.append(jnp.maximum(stacked, 0) if len(direct) > 4 * _STACK else stacked)
        scaled_parts.append(jnp.zeros((2, len(group)), acc))
        owners.extend(group)
    link = None
    for width, rows in buckets:
        dtype = xs[rows[0]].dtype
        block = []
        for i in rows:
            block.append(xs[i].reshape(-1))
            if sizes[i] < width:
                block.append(np.zeros((width - sizes[i],), dtype))
        if link is not None:
            # An extra row, dropped, that depends on the previous bucket's result: the
            # buckets then run one after another, sharing one buffer.
            block.append(jnp.broadcast_to(link.astype(dtype), (width,)))
        flat = jnp.concatenate(block) if len(block) > 1 else block[0]
        y = flat.reshape(-1, width)
        if scale is None:
            down = _own_scale(flat[0], rescale, acc)  # local by construction
            up = _own_scale(flat[0], upscale, acc)
            bound = _UP_BOUND[jnp.finfo(acc).bits]
            # One reduction with three outputs: one kernel reads the bucket once.
            sums, sums_down, sums_up = _sum_rows(
                _abs_sq(y, acc), _abs_sq(y, acc, down), _abs_sq(y, acc, up, bound=bound)
            )
            scaled_parts.append(jnp.stack([sums_down, sums_up]))
        else:
            sums = jnp.sum(_abs_sq(y, acc, _own_scale(flat[0], scale, acc)), axis=1)
        link = jax.lax.stop_gradient(sums[0])
        plain_parts.append(sums)
        owners.extend(rows + [-1] * (y.shape[0] - len(rows)))

    def arrange(parts: list[jax.Array], empty: float) -> jax.Array:
        """The entries of ``parts`` (along their last axis) in the order of the arrays."""
        lead = parts[0].shape[:-1] if parts else ()
        if not parts:
            return jnp.full((*lead, n), empty, acc)
        values = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        if owners == list(range(n)):
            return values
        position = {i: k for k, i in enumerate(owners) if i >= 0}
        if len(position) < n:  # empty arrays read this entry
            values = jnp.concatenate([values, jnp.full((*lead, 1), empty, acc)], axis=-1)
        index = [position.get(i, values.shape[-1] - 1) for i in range(n)]
        return values[..., np.array(index, np.int32)]

    if scale is not None or not buckets:  # rescaled sums in plain; nothing bucketed
        return _Sums(arrange(plain_parts, 0), None, own)
    return _Sums(arrange(plain_parts, 0), arrange(scaled_parts, 0), own)


def _sums_over_devices(
    xs: Sequence[jax.Array],
    acc: jnp.dtype,
    flags: Sequence[bool],
    axis_name: AxisName,
    concatenable: Sequence[bool],
    **how: Any,
) -> _Sums:
    """:func:`_square_sums`, ``psum``-ed over ``axis_name`` for the sharded arrays.

    Sharded and replicated arrays are summed in separate buckets and only the
    sharded ones enter the (single) collective, so that under
    ``shard_map(check_vma=True)`` a replicated leaf's sum stays device-invariant.
    """

    def reduce(sums: _Sums) -> _Sums:
        if sums.scaled is None:
            return sums._replace(plain=jax.lax.psum(sums.plain, axis_name))
        all3 = jax.lax.psum(jnp.concatenate([sums.plain[None], sums.scaled]), axis_name)
        return sums._replace(plain=all3[0], scaled=all3[1:])

    if axis_name is None or all(flags) or not any(flags):
        sums = _square_sums(xs, acc, concatenable, **how)
        return reduce(sums) if axis_name is not None and all(flags) else sums
    groups = [[i for i, f in enumerate(flags) if f], [i for i, f in enumerate(flags) if not f]]
    witnesses = how.pop("witnesses", None)
    parts, own = [], {}
    for k, g in enumerate(groups):
        local = witnesses and {j: witnesses[i] for j, i in enumerate(g) if i in witnesses}
        sums = _square_sums(
            [xs[i] for i in g], acc, [concatenable[i] for i in g], witnesses=local, **how
        )
        parts.append(reduce(sums) if k == 0 else sums)
        own.update({g[j]: v for j, v in sums.own.items()})
    index = np.empty(len(xs), np.int32)
    index[groups[0] + groups[1]] = np.arange(len(xs))

    def join(a: jax.Array | None, b: jax.Array | None, fill: float) -> jax.Array | None:
        if a is None and b is None:
            return None
        lead = (a if a is not None else b).shape[:-1]
        a = jnp.full((*lead, len(groups[0])), fill, acc) if a is None else a
        b = jnp.full((*lead, len(groups[1])), fill, acc) if b is None else b
        return jnp.concatenate([a, b], axis=-1)[..., index]

    return _Sums(
        join(parts[0].plain, parts[1].plain, 0), join(parts[0].scaled, parts[1].scaled, 0), own
    )


def _leaf_and_global_norms(
    leaves: Sequence[jax.Array], *, axis_name: AxisName = None, flags: Sequence[bool] = ()
) -> tuple[jax.Array, jax.Array]:
    """Per-leaf L2 norms (a vector) and the global L2 norm, computed in one pass.

    The float32 (float64) sums of squares come first; only when their total is not
    finite does a second pass run over the leaves reduced on their own (behind a
    ``lax.cond``), multiplying them by a fixed power of two before squaring (the
    bucketed small leaves got that rescaled sum in the first pass), so that a leaf
    whose sum overflowed gets its right, finite norm while a NaN/inf input still gives
    NaN/inf.

    Args:
      leaves: the arrays (no None).
      axis_name: mapped axis over which sharded leaves' partial sums are ``psum``-ed.
      flags: one bool per leaf, True when that leaf is sharded along ``axis_name``.

    Returns:
      ``(leaf_norms, norm)`` in the accumulation dtype.
    """
    acc = accumulation_dtype(leaves)
    n = len(leaves)
    if not n:
        return jnp.zeros((0,), acc), jnp.zeros((), acc)
    flags = list(flags) or [True] * n
    concatenable = _concatenable(leaves, axis_name)
    first = _sums_over_devices(leaves, acc, flags, axis_name, concatenable)
    total = jnp.sum(first.plain)
    rescale = _RESCALE[jnp.finfo(acc).bits]
    pending = sorted(first.own)  # the leaves reduced on their own

    # Both branches give (a, g): where a leaf's plain sum is not finite (or the total is
    # tiny), its norm is sqrt(a) / factor; g is the norm. The norm reaches the caller
    # only through the cond: XLA then cannot copy the sum over all leaves into every
    # kernel that reads it (on thousands of leaves that made compile time grow with the
    # square of their number).
    bucketed = first.scaled is not None
    upscale = _UPSCALE[jnp.finfo(acc).bits]
    # A tree whose plain total is tiny may have lost squares below the smallest normal
    # number; one whose total is inf overflowed. Both are rescued by one branch, which
    # scales by _UPSCALE or _RESCALE (a value it reads at run time: one set of kernels).
    tiny = jnp.isfinite(total) & (total < _TINY_TOTAL[jnp.finfo(acc).bits])
    factor = jnp.where(tiny, jnp.asarray(upscale, acc), jnp.asarray(rescale, acc))

    def common(operands):
        return (first.scaled[0] if bucketed else first.plain), safe_sqrt(total)

    def rescued(operands):
        # Nothing bucketed: zeros stand for the leaves that are neither reduced on their
        # own nor bucketed (the empty ones, whose plain sum is 0 and finite).
        if bucketed:
            alt = jnp.where(tiny, first.scaled[1], first.scaled[0])
        else:
            alt = jnp.zeros((n,), acc)
        if pending:
            how = dict(
                scale=factor,
                copy_big=True,
                witnesses={k: first.own[i] for k, i in enumerate(pending)},
            )
            sub = [operands[i] for i in pending]
            sub_flags, sub_ok = [flags[i] for i in pending], [concatenable[i] for i in pending]
            again = _sums_over_devices(sub, acc, sub_flags, axis_name, sub_ok, **how).plain
            if len(pending) == n:
                alt = again
            else:
                index = np.arange(n)
                index[pending] = n + np.arange(len(pending))
                alt = jnp.concatenate([alt, again])[index]
        # The rescaled total is accurate: where the plain one overflowed, the squares
        # that scaling down flushes to zero are negligible next to it; where it was
        # tiny, scaling up overflows nothing.
        return alt, safe_sqrt(jnp.sum(alt)) / factor

    alt, norm = jax.lax.cond(jnp.isfinite(total) & ~tiny, common, rescued, list(leaves))
    # Which leaves read their norm from the rescaled sums.
    use_alt = jnp.where(tiny, True, ~jnp.isfinite(first.plain))
    leaf_norms = jnp.where(use_alt, safe_sqrt(alt) / factor, safe_sqrt(first.plain))
    return leaf_norms, norm


def _flags_for(tree: Any, sharded: Sharded) -> list[bool]:
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
    check_float_leaves(tree, "tree")
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
    check_float_leaves(tree, "tree")
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


# unitwise_norm rescales (by each unit's max-abs) when a unit's plain sum of squares is
# inf or below this: there the squares lost to underflow, each below the smallest normal
# number, could matter (above it they are below 2^-46 (2^-100) of the sum per element).
_UNIT_SUM_TINY = {32: 2.0**-80, 64: 2.0**-900}


def unitwise_norm(x: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """The L2 norm of each unit of ``x``, broadcast back to ``x.shape``.

    A unit is a slice of ``x`` over the axes in ``axis``. With ``axis=None`` the
    convention of Optax and of the NFNet reference code applies: a scalar or vector
    is one unit; a rank-2 or rank-3 kernel reduces over axis 0 (one unit per output
    unit); rank 4 (HWIO conv) over axes (0, 1, 2); rank 5 over axes (0, 1, 2, 3).
    Accumulates in float32 and is overflow-safe like :func:`global_norm`, and
    underflow-safe: units of values down to the smallest normal number get their norm,
    not 0. A unit whose plain sum of squares is inf or tiny (below 2^-80 in float32,
    which includes an all-zero unit) sends the call through a rescaled second pass. An
    empty array gives an empty array.

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
    if x.size == 0:  # no element: nothing to rescale (a max over no element raises)
        return jnp.broadcast_to(sums, x.shape)

    def common(_):
        return safe_sqrt(sums)

    def rescaled(x):
        maxes = jnp.max(_abs(x, acc), axis=axis, keepdims=True)
        usable = jnp.isfinite(maxes) & (maxes > 0)
        denoms = jax.lax.stop_gradient(jnp.where(usable, maxes, 1))  # see _vector_norm
        scaled = jnp.sum(_abs_sq(_divide(x, denoms, acc), acc), axis=axis, keepdims=True)
        return jnp.where(usable, denoms * safe_sqrt(scaled), safe_sqrt(sums))

    # The plain sums are right when finite and not tiny: below _UNIT_SUM_TINY, squares
    # flushed to zero (|x| < ~1.1e-19 in float32) may be most of a unit's sum.
    plain_ok = jnp.isfinite(sums) & (sums >= _UNIT_SUM_TINY[jnp.finfo(acc).bits])
    norms = jax.lax.cond(jnp.all(plain_ok), common, rescaled, x)
    return jnp.broadcast_to(norms, x.shape)
