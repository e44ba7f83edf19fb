"""The engine behind every norm: per-leaf and global sums of squares in one pass.

What it is for: :func:`leaf_and_global_norms` returns the L2 norm of each leaf and of
the whole tree, in float32 (float64 for float64 leaves), right where squares overflow
(above ~1.8e19) or flush to zero (below ~1e-19), NaN/inf where the input holds one.
Every public norm (``_norms.py``) and every transform measures through it.

Why it is more than ``sum(x**2)`` per leaf: on XLA:CPU, compile time grows with the
number of kernels, and a reduction per leaf is a kernel (three below 4096 elements), so
small leaves are copied into a few shared buckets whose row sums are the per-leaf sums
(see :func:`_layout`). The rare overflow/underflow rescue sits behind one ``lax.cond``.
The TPU compiler takes as long or longer over the buckets' copies than over a reduction
per leaf, and keeps them in temp memory, so there every leaf is summed on its own, as
Optax's clips do, and only the rescue copies the small leaves: one concatenation for a
global norm (:func:`_rescaled_total`), one bucket per dtype and row width for per-leaf
norms. XLA:GPU runs a rescue conditional as a select, on every step, so for a GPU every
leaf is summed at three scales in its one read, with no rescue branch
(:func:`_norms_at_three_scales`). Whatever the layout, the norms are differentiated by
a rule of their own, ``d||x|| = <x / ||x||, dx>`` (:func:`_norms_jvp`), never through
their sums of squares, their rescue or the branches not taken.

What guards it: ``tests/test_norms_compile.py`` (kernel counts, compile-time ratios)
and the ``clip`` section of ``python -m benchmarks`` (compile time and temp memory at
10, 100 and 2,000 leaves against Optax); ``tests/test_norms.py`` for the numerics.
Change the layout only with both in hand.

Names used below: a leaf "reduced on its own" (``solo``) keeps its own reduction; a
"bucketed" leaf is a row of a shared bucket; the "rescued" sums are those of the
leaves times a power of two (``_RESCALE`` down for overflow, ``_UPSCALE`` up for
underflow); a "witness" is a value that only one reduction reads (:func:`own_scale`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

AxisName = Any  # str | tuple[str, ...] | None

def accumulation_dtype(leaves: Sequence[jax.Array]) -> jnp.dtype:
    """float64 when any leaf is float64/complex128, else float32."""
    for leaf in leaves:
        if jnp.finfo(jnp.result_type(leaf)).bits == 64:
            return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def abs_sq(x: jax.Array, acc: jnp.dtype, scale: Any = None, bound: Any = None) -> jax.Array:
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


def safe_sqrt(s: jax.Array) -> jax.Array:
    """sqrt with a zero (not NaN) gradient at 0; NaN and inf pass through."""
    zero = s == 0
    return jnp.where(zero, jnp.zeros_like(s), jnp.sqrt(jnp.where(zero, 1, s)))


# XLA turns a division by a broadcast scalar into a multiplication by its reciprocal,
# which flushes to zero for divisors above ~8.5e37 in float32 (~4.5e307 in float64):
# x / n would be 0 for a norm of 1e38. divided() moves such a divisor (and a tiny one,
# whose reciprocal overflows) into range by a power of two, applied to both sides.
_DIVISOR_RANGE = {32: (2.0**-100, 2.0**100, 2.0**64), 64: (2.0**-900, 2.0**900, 2.0**512)}


@jax.custom_jvp
def divided(x: jax.Array, d: jax.Array) -> jax.Array:
    """``x / d`` for a positive ``d`` broadcast against ``x``, right at any size of ``d``
    (see ``_DIVISOR_RANGE``). Where ``d`` is outside it, values of ``x`` below its
    rounding are lost: for a unit vector ``x / ||x||``, those below 2^-64 of 1.

    Its derivative is ``(dx - (x / d) dd) / d``: JAX differentiates a division through
    ``d**-2``, which overflows for ``d`` below ~5e-20 in float32 and flushes above ~2e19
    (a second derivative of a norm passes through it).
    """
    low, high, shift = _DIVISOR_RANGE[jnp.finfo(d.dtype).bits]
    pre = jnp.where(d > high, 1 / shift, jnp.where(d < low, shift, 1)).astype(d.dtype)
    return (x * pre) / (d * pre)


@divided.defjvp
def _divided_jvp(primals, tangents):
    x, d = primals
    dx, dd = tangents
    ratio = divided(x, d)
    return ratio, divided(dx - ratio * dd, d)


# Compile time grows with the number of kernels, and a reduction per leaf is one
# kernel per leaf (three on XLA:CPU below 4096 elements, with the squares written out
# to memory). So leaves with fewer than SMALL_LEAF elements are copied, as they are, into
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
SMALL_LEAF = 4096
_BUCKETS = 32
_BUCKET_MIN = 1 << 14  # elements
_SHARED_LENGTH = 8  # this many small leaves of one size get rows of exactly that size
_STACK = 64  # the sums of the leaves reduced on their own are stacked this many at a time
_RESCUE_RUNS = 8  # per-leaf rescue: runs of leaves of about equal size, each behind a cond
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
# A leaf's own sum, for its own norm, needs rescuing only far lower: the squares it lost
# are each below the smallest normal number (2^-126; 2^-1022), so a leaf of up to 2^30
# (2^40) elements whose sum is at least _TINY_LEAF lost less than float32's (float64's)
# rounding of it. So leaves of ordinary small gradients (1e-7) stay on the common path.
_TINY_LEAF = {32: 2.0**-70, 64: 2.0**-920}


def bucket_elements(total: int, buckets: int = _BUCKETS) -> int:
    """How many elements a bucket holds, for a tree (or part of one) of ``total``."""
    return max(_BUCKET_MIN, total // buckets)


def is_tiny(sums: jax.Array) -> jax.Array:
    """Where a sum of squares is finite but small enough to have lost flushed squares."""
    return jnp.isfinite(sums) & (sums < _TINY_TOTAL[jnp.finfo(sums.dtype).bits])


def rescaling(acc: Any) -> tuple[float, float]:
    """``(down, up)`` for the accumulation dtype: the powers of two a sum that
    overflowed (``_RESCALE``) or is tiny (``_UPSCALE``) is summed again with."""
    bits = jnp.finfo(acc).bits
    return _RESCALE[bits], _UPSCALE[bits]


def three_squares(
    y: jax.Array, acc: jnp.dtype, down: jax.Array, up: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``|y|^2``, ``|down y|^2`` and ``|up y|^2`` elementwise, to be summed in one read
    (a sum at three scales: plain, for a total that overflows, for a tiny one), ``down``
    and ``up`` being :func:`rescaling`'s tied to a run-time value (:func:`own_scale`).
    The up-scaled one clamps ``y`` to ``_UP_BOUND`` first: it is read only where every
    value lies inside it, and elsewhere its square (and derivative) stays finite."""
    bound = _UP_BOUND[jnp.finfo(acc).bits]
    return abs_sq(y, acc), abs_sq(y, acc, down), abs_sq(y, acc, up, bound=bound)


def norm_at_its_scale(
    plain: jax.Array, scaled_down: jax.Array, scaled_up: jax.Array, tiny: jax.Array,
    down: jax.Array, up: jax.Array,
) -> jax.Array:
    """The norm from sums of squares at three scales (:func:`three_squares`): the
    up-scaled sum's where ``tiny`` (the plain sum may have lost squares flushed to zero),
    the plain sum's where it is finite, else the down-scaled sum's (it overflowed; NaN
    and inf stay NaN and inf there). ``down`` and ``up`` are the factors the sums were
    scaled with."""
    return jnp.where(
        tiny,
        safe_sqrt(scaled_up) / up,
        jnp.where(jnp.isfinite(plain), safe_sqrt(plain), safe_sqrt(scaled_down) / down),
    )


def rescue_factor(sums: jax.Array, tiny: dict[int, float] = _TINY_TOTAL) -> jax.Array:
    """The power of two to multiply values by before squaring them again, per sum.

    ``_RESCALE`` where a sum of squares is not finite (it overflowed; a NaN or inf input
    stays NaN or inf rescaled), ``_UPSCALE`` where it is below ``tiny`` (by the dtype's
    bits: ``_TINY_TOTAL`` as :func:`is_tiny` for totals, ``_TINY_LEAF`` for a leaf's
    own norm), 1 elsewhere. A rescued norm is ``sqrt(sum |factor x|^2) / factor``. The
    factor is a value computed at run time on purpose: XLA would fold a constant's
    square, which is 0 in float32.
    """
    bits = jnp.finfo(sums.dtype).bits
    down = jnp.asarray(_RESCALE[bits], sums.dtype)
    up = jnp.asarray(_UPSCALE[bits], sums.dtype)
    below = jnp.asarray(tiny[bits], sums.dtype)
    # NaN and inf fail both comparisons: scaled down. (The shortest form: the TPU rescue
    # computes one per leaf.)
    return jnp.where(sums < below, up, jnp.where(jnp.isfinite(sums), 1, down)).astype(sums.dtype)


def _runs(sizes: Sequence[int], count: int) -> list[list[int]]:
    """Positions ``0..len(sizes)-1`` cut, in order, into at most ``count`` runs of about
    equal total size (a big enough one alone in its run)."""
    runs: list[list[int]] = []
    run: list[int] = []
    run_size, left, runs_left = 0, sum(sizes), count
    for k, size in enumerate(sizes):
        run.append(k)
        run_size += size
        if runs_left > 1 and run_size * runs_left >= left:
            runs.append(run)
            left, runs_left = left - run_size, runs_left - 1
            run, run_size = [], 0
    return runs + [run] if run else runs


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


def _abstract_meshes(leaves: Sequence[jax.Array]):
    """Each leaf's abstract mesh, from its type (leaves whose type names none are left out).

    Under ``jit`` with sharded inputs and under ``shard_map`` the mesh is that of the
    devices being compiled for, also when lowering ahead of time for a TPU topology on a
    CPU host, where ``jax.default_backend()`` and ``jax.device_count()`` describe the host.
    """
    for x in leaves:
        try:
            yield jax.typeof(x).sharding.mesh
        except Exception:  # noqa: BLE001 - a JAX or an array without this information
            continue


def target_platform(leaves: Sequence[jax.Array]) -> str:
    """The platform the leaves are being compiled for ("cpu", "tpu", "cuda"...), read at
    trace time from what is being compiled (DESIGN §9). Without a mesh in the leaves'
    types (a single-device ``jit`` of uncommitted arrays, eager arrays) the program runs
    on the default backend."""
    for mesh in _abstract_meshes(leaves):
        device = getattr(mesh, "abstract_device", None)
        if device is not None:
            return device.platform
    return jax.default_backend()


# What target_platform reads for the GPUs JAX compiles for (CUDA and ROCm devices say "gpu").
GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def _compiled_device_count(leaves: Sequence[jax.Array]) -> int:
    """How many devices the leaves are compiled for: their abstract mesh's size when
    their type names one, else the host's ``jax.device_count()``."""
    for mesh in _abstract_meshes(leaves):
        if not mesh.empty:
            return mesh.size
    return jax.device_count()


def concatenable(leaves: Sequence[jax.Array], axis_name: AxisName) -> list[bool]:
    """Which leaves may be copied into a shared bucket without any data movement.

    Inside ``shard_map``/``pmap`` (``axis_name`` given) and on a single device every
    leaf is local. Under plain ``jit`` with several devices GSPMD may have sharded a
    leaf, and concatenating it would make XLA all-gather it, so there only leaves
    whose type says they are replicated are bucketed; the others keep their own
    reduction, which partitions into local sums and an all-reduce of scalars. The
    devices are those compiled for, not the host's (DESIGN §9).
    """
    if axis_name is not None or _compiled_device_count(leaves) == 1:
        return [True] * len(leaves)
    return [_is_known_unsharded(x) for x in leaves]


def _layout(
    xs: Sequence[jax.Array],
    sizes: list[int],
    concatenable: Sequence[bool],
    copy_big: bool,
    whole_groups: bool = False,
) -> tuple[list[int], list[tuple[int, list[int]]]]:
    """(arrays reduced on their own, buckets as (row width, rows)).

    ``whole_groups``: one bucket per row width and dtype, however large (the TPU
    rescue, see :func:`leaf_and_global_norms`). Empty arrays are in neither list.
    """
    if whole_groups:
        bucket_size = max(sum(sizes), 1)
    else:
        # The rescue copies big leaves too, in bigger buckets: fewer kernels.
        bucket_size = bucket_elements(sum(sizes), _BUCKETS // 2 if copy_big else _BUCKETS)
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
        elif size < SMALL_LEAF:
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


def own_scale(witness: jax.Array, scale: Any, acc: jnp.dtype) -> jax.Array:
    """``scale`` as a value that XLA cannot see through, tied to ``witness``.

    ``scale`` is a number or a run-time value (shaped like ``witness``). A constant
    would not do: XLA rewrites (c x)^2 as x^2 c^2, and c^2 is 0 in float32.
    A scalar shared by several reductions would not do either: XLA:CPU writes its
    broadcast out in full. So each reduction gets its own, halved where the witness
    (a value only that reduction reads) is NaN (see :class:`_Sums` for why reading
    every rescaled sum as if it used ``scale`` is right).
    """
    bad = jnp.isnan(witness)
    return jax.lax.select(bad, jnp.asarray(scale / 2, acc), jnp.asarray(scale, acc))


def _leaf_scale(scale: jax.Array, i: int, witness: jax.Array, from_witness: bool) -> Any:
    """The factor of array ``i`` reduced on its own, from ``scale``, a vector of one per
    array: :func:`rescue_factor` of the array's own sum (its ``witness``) when
    ``from_witness`` (that sum is the whole array's: no ``psum`` to come, so it is the
    vector's entry, computed again), else the vector's entry.

    Read from the witness, not out of the vector, because the TPU compiler kept 0.2 MiB
    more temp memory for the read at 100 leaves of 200,000 (sgd); gathered into a
    vector, for rows of a bucket, because per-row scalars took it 77 s instead of 55 s
    to compile at 2,000 leaves of 1,000 and kept 89 MiB instead of 19.
    """
    if from_witness:
        return rescue_factor(witness, _TINY_LEAF)
    return scale[i]


class _Sums(NamedTuple):
    """Per-array sums of squares, in the order of the arrays.

    ``plain``: sum |x|^2. ``scaled``: two rows, sum |c x|^2 with c = _RESCALE (row 0,
    for overflow) and c = _UPSCALE (row 1, for underflow) for bucketed arrays (0 for the
    others, whose rescue runs apart), None when nothing is bucketed and in the rescue
    pass. ``solo``: the plain sums of the arrays reduced on their own, by index.

    Every rescaled sum is read as if c were _RESCALE (_UPSCALE). :func:`own_scale` halves c only
    in a reduction whose witness is NaN: a leaf reduced on its own whose sum is NaN
    anyway, or a bucket whose first leaf holds a NaN (the total is then NaN, and
    another leaf of that bucket whose plain sum overflowed, or is below ``_TINY_LEAF``,
    reads a norm half its size in that NaN step: a known limit, documented in the
    decisions guide; a witness per row would cost the common pass a strided read).
    """

    plain: jax.Array | None
    scaled: jax.Array | None
    solo: dict[int, jax.Array]
    bucket_totals: tuple[jax.Array, ...] = ()

    def scalar_parts(self) -> list[jax.Array]:
        """The sums whose total is the tree's: each solo sum and each bucket's total
        (as :func:`_square_sums` gives them: not ``psum``-ed)."""
        return [self.solo[i] for i in sorted(self.solo)] + list(self.bucket_totals)


def _square_sums(
    xs: Sequence[jax.Array],
    acc: jnp.dtype,
    concatenable: Sequence[bool],
    *,
    scale: Any = None,
    copy_big: bool = False,
    witnesses: dict[int, jax.Array] | None = None,
    factor_from_witness: bool = False,
    per_leaf: bool = True,
    whole_groups: bool = False,
) -> _Sums:
    """The sums of squares of each array (``scale * x`` when ``scale`` is given).

    Without ``scale`` (the common pass) the buckets also give their rescaled sums. With
    it (the rescue of the arrays reduced on their own), ``witnesses`` holds their plain
    sums, which tie each reduction to a scale of its own (see :func:`own_scale`).
    ``scale`` is one factor for every array, or a vector of one per array (see
    :func:`_leaf_scale` for ``factor_from_witness``).
    ``per_leaf=False``: the caller reads only :meth:`_Sums.scalar_parts`, so the plain
    sums are not gathered into a vector (``plain`` is None).
    """
    sizes = [math.prod(np.shape(x)) for x in xs]
    direct, buckets = _layout(xs, sizes, concatenable, copy_big, whole_groups)
    rescale, upscale = rescaling(acc)
    n = len(xs)
    plain_parts: list[jax.Array] = []
    scaled_parts: list[jax.Array] = []
    owners: list[int] = []  # the array of each entry of concatenate(parts); -1: none
    solo: dict[int, jax.Array] = {}
    per_array = scale is not None and jnp.ndim(scale) == 1
    for i in direct:
        c = None
        if scale is not None:
            factor = scale
            if per_array:
                factor = _leaf_scale(scale, i, witnesses[i], factor_from_witness)
            c = own_scale(witnesses[i], factor, acc)
        solo[i] = jnp.sum(abs_sq(xs[i], acc, c))
    for k in range(0, len(direct), _STACK):
        # A concatenation of thousands of scalars compiles superlinearly slowly, so
        # they are stacked a few dozen at a time; the max (a no-op on sums of squares
        # that keeps NaN) stops XLA from merging the stacks back into one.
        group = direct[k : k + _STACK]
        if per_leaf:
            stacked = jnp.stack([solo[i] for i in group])
            plain_parts.append(jnp.maximum(stacked, 0) if len(direct) > 4 * _STACK else stacked)
        scaled_parts.append(jnp.zeros((2, len(group)), acc))
        owners.extend(group)
    link = None
    bucket_totals: list[jax.Array] = []
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
            down = own_scale(flat[0], rescale, acc)  # local by construction
            up = own_scale(flat[0], upscale, acc)
            # One reduction with three outputs: one kernel reads the bucket once.
            sums, sums_down, sums_up = _sum_rows(*three_squares(y, acc, down, up))
            scaled_parts.append(jnp.stack([sums_down, sums_up]))
        elif per_array:
            # A factor per row, gathered at once; the link row (dropped) takes the first's.
            owner = rows + [rows[0]] * (y.shape[0] - len(rows))
            row_scale = own_scale(flat[0], scale[np.array(owner)][:, None], acc)
            sums = jnp.sum(abs_sq(y, acc, row_scale), axis=1)
        else:
            sums = jnp.sum(abs_sq(y, acc, own_scale(flat[0], scale, acc)), axis=1)
        link = jax.lax.stop_gradient(sums[0])
        bucket_totals.append(jnp.sum(sums[: len(rows)]))  # not the link row
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

    plain = arrange(plain_parts, 0) if per_leaf else None
    if scale is not None or not buckets:  # rescaled sums in plain; nothing bucketed
        return _Sums(plain, None, solo, tuple(bucket_totals))
    return _Sums(plain, arrange(scaled_parts, 0), solo, tuple(bucket_totals))


def _added(values: list[jax.Array], acc: jnp.dtype) -> jax.Array:
    """The sum of scalars as a balanced tree of additions (0 for none).

    Under ``jit`` over several devices GSPMD ends the sum of squares of each sharded
    leaf in an all-reduce of its own. XLA turns a sum of all-reduced values into one
    all-reduce of their sum (as for Optax's clip, which adds its leaves' sums), while
    the sum of a vector of them keeps one operand per leaf, and the TPU compiler
    combines at most 256 operands into one collective: 8 all-reduces at 2,000 leaves.
    Pairwise rather than one by one, so that float32 rounding grows with the logarithm
    of the count; compiled for a TPU the total is added in order instead
    (:func:`_added_in_order`).
    """
    if not values:
        return jnp.zeros((), acc)
    while len(values) > 1:
        pairs = range(0, len(values) - 1, 2)
        values = [values[k] + values[k + 1] for k in pairs] + values[len(values) // 2 * 2 :]
    return values[0]


def _added_in_order(values: list[jax.Array], acc: jnp.dtype) -> jax.Array:
    """The sum of scalars added one after another, first to last (0 for none).

    The TPU layout's global total, on one chip and under ``jit`` over a mesh of them.
    The TPU compiler schedules a donated step best over this chain, the sum Optax's
    clips make (measured with adamw and sgd, one chip): a
    vector of the sums (``jnp.sum`` of their stack) made it read 641 of 2,000 gradient
    leaves of 1,000 from HBM for their reductions and again for the update (25.3 MiB of
    HBM traffic against Optax's 22.9 with sgd, 9.3 MiB of temp memory); a balanced
    tree (:func:`_added`) made it stage ``monitor``'s 10 leaves of 2M through on-chip
    memory (5.9 MiB of temp memory against 2.7, twice the cost model's bytes). This
    chain gives Optax's 22.9 MiB and no temp memory at 2,000 leaves, and on one chip the
    vector's figures at 10 and 100 leaves, to the byte. On 4 chips, where the sums were
    added pairwise, the collectives are the same; temp memory rose for most global
    transforms (0 -> 6.0 MiB at 100 leaves with adamw) and fell for ``monitor`` (24.5 ->
    6.2), all below Optax's clip (9.2). Its float32 rounding grows with the count (4e-7
    of the total over 2,000 sums of a normal gradient, 1.3e-6 over 20,000; pairwise
    6e-8): Optax's.
    """
    total = jnp.zeros((), acc)
    for value in values:
        total = total + value
    return total


def _rescaled_total(
    xs: Sequence[jax.Array],
    acc: jnp.dtype,
    may_copy: Sequence[bool],
    factor: jax.Array,
    witness: jax.Array,
) -> jax.Array:
    """The sum of ``|factor x|^2`` over every array: the TPU rescue of a global norm.

    The small arrays (< ``SMALL_LEAF`` elements) that may be copied (:func:`concatenable`)
    are summed as one concatenation per dtype, the others each on their own; ``witness``
    (the plain total) ties the factor to a value XLA cannot fold (see :func:`own_scale`).
    The concatenation is a copy of the small leaves, made only on the rare step.
    """
    scale = own_scale(witness, factor, acc)
    parts: list[jax.Array] = []
    small: dict[str, list[jax.Array]] = {}
    for x, ok in zip(xs, may_copy, strict=True):
        size = math.prod(np.shape(x))
        if size == 0:
            continue
        if ok and size < SMALL_LEAF:
            small.setdefault(jnp.dtype(x.dtype).name, []).append(x.reshape(-1))
        else:
            parts.append(jnp.sum(abs_sq(x, acc, scale)))
    for flats in small.values():
        flat = jnp.concatenate(flats) if len(flats) > 1 else flats[0]
        parts.append(jnp.sum(abs_sq(flat, acc, scale)))
    return _added(parts, acc)


def _sums_over_devices(
    xs: Sequence[jax.Array],
    acc: jnp.dtype,
    flags: Sequence[bool],
    axis_name: AxisName,
    concatenable: Sequence[bool],
    **options: Any,
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
        sums = _square_sums(xs, acc, concatenable, **options)
        return reduce(sums) if axis_name is not None and all(flags) else sums
    groups = [[i for i, f in enumerate(flags) if f], [i for i, f in enumerate(flags) if not f]]
    witnesses = options.pop("witnesses", None)
    scale = options.pop("scale", None)
    per_array = scale is not None and jnp.ndim(scale) == 1  # one factor per array
    parts, solo = [], {}
    for k, g in enumerate(groups):
        local = witnesses and {j: witnesses[i] for j, i in enumerate(g) if i in witnesses}
        local_scale = scale[np.array(g)] if per_array else scale
        sums = _square_sums(
            [xs[i] for i in g],
            acc,
            [concatenable[i] for i in g],
            witnesses=local,
            scale=local_scale,
            **options,
        )
        parts.append(reduce(sums) if k == 0 else sums)
        solo.update({g[j]: v for j, v in sums.solo.items()})
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
        join(parts[0].plain, parts[1].plain, 0), join(parts[0].scaled, parts[1].scaled, 0), solo
    )


def reduce_over_devices(
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


def leaf_and_global_norms(
    leaves: Sequence[jax.Array],
    *,
    axis_name: AxisName = None,
    flags: Sequence[bool] = (),
    leaf_norms: bool = True,
) -> tuple[jax.Array | None, jax.Array]:
    """Per-leaf L2 norms (a vector) and the global L2 norm, computed in one pass.

    Called eagerly (no leaf is a tracer: outside ``jit``, ``grad`` and ``vmap``) the
    engine runs as one compiled program per tree structure (:func:`_compiled_norms`);
    traced, it is traced into the caller's program.

    The float32 (float64) sums of squares come first; only when their total is not
    finite or is tiny (squares may have flushed to zero, :func:`is_tiny`), or, when
    per-leaf norms are asked for, some non-empty leaf's sum is below ``_TINY_LEAF`` (0
    included: a sum of 0 cannot tell flushed squares from zeros), does a second pass run
    (behind a ``lax.cond``), multiplying the values by a power of two before squaring,
    so that a leaf whose sum overflowed or underflowed gets its right, finite norm while
    a NaN/inf input still gives NaN/inf. For per-leaf norms the power of two is each
    leaf's own (:func:`rescue_factor` of its plain sum), whatever the total, and the
    leaves reduced on their own are read again in runs (``_RESCUE_RUNS``), each behind a
    ``lax.cond`` of its own that skips a run whose leaves all keep their plain sums. The
    second pass reads the leaves reduced on their own again; bucketed small leaves got
    their rescaled sums in the first pass. Compiled for a TPU there are no buckets:
    every leaf is reduced on its own and the second pass reads them all, the small ones
    copied once (one concatenation per dtype for a global norm asked for alone,
    :func:`_rescaled_total`; one bucket per dtype and row width, in each run, for
    per-leaf norms). Compiled for a GPU there is no second pass: every leaf is summed
    at three scales in its one read (:func:`_norms_at_three_scales`).

    Args:
      leaves: the arrays (no None).
      axis_name: mapped axis over which sharded leaves' partial sums are ``psum``-ed.
      flags: one bool per leaf, True when that leaf is sharded along ``axis_name``.
      leaf_norms: False when the caller reads only the global norm. Under ``jit`` over
        several devices the common path then all-reduces one scalar, as Optax's clip
        does (three, the sums at three scales, compiled for a GPU), instead of one per
        sharded leaf.

    Returns:
      ``(leaf_norms, norm)`` in the accumulation dtype; ``leaf_norms`` is None when not
      asked for.
    """
    flags = tuple(flags) or (True,) * len(leaves)
    if axis_name is None and leaves and not any(isinstance(x, jax.core.Tracer) for x in leaves):
        return _compiled_norms(list(leaves), flags, leaf_norms, target_platform(leaves))
    return _differentiable_norms(list(leaves), axis_name, flags, leaf_norms)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _differentiable_norms(
    leaves: list[jax.Array], axis_name: AxisName, flags: tuple[bool, ...], leaf_norms: bool
) -> tuple[jax.Array | None, jax.Array]:
    """:func:`_traced_norms`, differentiated by its own rule (:func:`_norms_jvp`)."""
    return _traced_norms(leaves, axis_name=axis_name, flags=flags, leaf_norms=leaf_norms)


@_differentiable_norms.defjvp
def _norms_jvp(axis_name, flags, leaf_norms, primals, tangents):
    """``d||x|| = <x / ||x||, dx>`` for each leaf's norm and for the global one (0 at a
    zero norm, where the norm is not differentiable and ``safe_sqrt`` says 0).

    Differentiated through its sums of squares, the norm's cotangent ``ct`` reaches the
    values as ``2 x * (ct / (2 ||x||))``: the middle factor flushes to zero when ``ct``
    is small and the norm big (a clip to 1 of a gradient of norm 5e18: ``ct`` is about
    ``1 / ||x||``), and the gradient through a clip lost the norm's part. ``x / ||x||``
    is at most 1 and ``ct * x / ||x||`` keeps it. The rule also keeps derivatives out of
    the rescue's sums and the branches not taken (the where-NaN trap).

    The global norm's tangent is read from the leaves' when they are asked for,
    ``sum (||x_i|| / ||x||) d||x_i||``, so that each leaf is read once.
    """
    (leaves,), (dleaves,) = primals, tangents
    per_leaf, norm = _differentiable_norms(leaves, axis_name, flags, leaf_norms)
    acc = norm.dtype
    if leaf_norms:
        denoms = jnp.where(per_leaf > 0, per_leaf, 1)
        dots = [
            unit_dot(x, dx, denoms[i], acc)
            for i, (x, dx) in enumerate(zip(leaves, dleaves, strict=True))
        ]
    else:
        denom = jnp.where(norm > 0, norm, 1)
        dots = [unit_dot(x, dx, denom, acc) for x, dx in zip(leaves, dleaves, strict=True)]
    if not dots:
        return (per_leaf, norm), (per_leaf, jnp.zeros_like(norm))
    d_leaves = reduce_over_devices(dots, flags, axis_name, jax.lax.psum)
    if not leaf_norms:
        return (None, norm), (None, jnp.sum(d_leaves))
    shares = divided(per_leaf, jnp.where(norm > 0, norm, 1))
    return (per_leaf, norm), (d_leaves, jnp.sum(shares * d_leaves))


def unit_dot(
    x: jax.Array, dx: jax.Array, norm: jax.Array, acc: jnp.dtype, axis: Any = None
) -> jax.Array:
    """``<x / norm, dx>`` (its real part, for complex ``x``) summed over ``axis`` (all
    axes when None; kept as size 1 otherwise) in the accumulation dtype: the tangent of
    the norm ``norm`` of ``x``, with ``norm`` positive and broadcast against the sum's
    result. ``x / norm`` is at most 1: nothing overflows at any scale."""
    if jnp.iscomplexobj(x):
        parts = [(jnp.real(x), jnp.real(dx)), (jnp.imag(x), jnp.imag(dx))]
    else:
        parts = [(x, dx)]
    keep = axis is not None
    return sum(
        jnp.sum(divided(p.astype(acc), norm) * dp.astype(acc), axis=axis, keepdims=keep)
        for p, dp in parts
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _compiled_norms(
    leaves: list[jax.Array], flags: tuple[bool, ...], leaf_norms: bool, platform: str
) -> tuple[jax.Array | None, jax.Array]:
    """:func:`leaf_and_global_norms` of concrete leaves, compiled once per tree structure.

    Run op by op, the engine dispatches (and compiles, for every new shape) each of its
    operations on its own: ``optaxclip.global_norm`` of 2,000 leaves took 7 s on its
    first eager call and 3 s on every later one on XLA:CPU (Optax's: 1 s). ``platform``
    keys the cache on the platform the layout was chosen for (:func:`target_platform`).
    """
    del platform  # a cache key only: the trace reads the same target_platform
    return _traced_norms(leaves, axis_name=None, flags=flags, leaf_norms=leaf_norms)


def _traced_norms(
    leaves: Sequence[jax.Array],
    *,
    axis_name: AxisName,
    flags: Sequence[bool],
    leaf_norms: bool,
) -> tuple[jax.Array | None, jax.Array]:
    """:func:`leaf_and_global_norms`, traced into the program being built."""
    acc = accumulation_dtype(leaves)
    n = len(leaves)
    if not n:
        return (jnp.zeros((0,), acc) if leaf_norms else None), jnp.zeros((), acc)
    flags = list(flags)
    sizes = [math.prod(np.shape(x)) for x in leaves]
    may_copy = concatenable(leaves, axis_name)
    platform = target_platform(leaves)
    if platform in GPU_PLATFORMS:  # no rescue branch: see _norms_at_three_scales
        return _norms_at_three_scales(leaves, acc, sizes, axis_name, flags, may_copy, leaf_norms)
    # The TPU layout: every leaf reduced on its own, as Optax's clips, and a rescue that
    # copies the small leaves once: a global norm asked for alone sums them as one
    # concatenation per dtype (_rescaled_total), per-leaf norms as one bucket per dtype
    # and row width (whole_groups). With 2,000 leaves of 1,000 and sgd (one chip) the TPU
    # compiler took 72-73 s over the buckets (whose concatenations it fuses into their
    # reductions) for clip_by_global_norm, 71 s over a rescue reducing each leaf again,
    # 61-63 s this way (Optax: 45-49 s in the same hour); the common path reads the
    # leaves in place (22.9 MiB of HBM traffic since its total is added in order, as
    # Optax's 22.9; the buckets 25.7). For clip_by_block_norm: 102-109 s against the
    # buckets' 106-120 s in turns (Optax's clip_by_block_rms 45-60 s), 18.5 MiB of temp
    # memory against 78.7 (Optax 61.6); a rescue reducing each leaf again took 143-158 s
    # and kept 149 MiB. XLA:CPU compiles a reduction per leaf far slower than the
    # buckets (see _layout): it keeps them.
    tpu_layout = axis_name is None and platform == "tpu"
    # When nobody reads the per-leaf sums, under jit over several devices (leaves GSPMD
    # may shard) and for a TPU, the total is added from them (see _added) and the
    # rescue takes it as every reduction's witness (NaN only where the norm is NaN
    # anyway). Over devices, the common path then all-reduces one scalar (per-leaf
    # witnesses would keep each leaf's all-reduce alive). For a TPU, the sums are added
    # one by one in the leaves' order, as Optax's clips add them (_added_in_order).
    one_collective = axis_name is None and not leaf_norms and (not all(may_copy) or tpu_layout)
    first = _sums_over_devices(
        leaves,
        acc,
        flags,
        axis_name,
        [False] * n if tpu_layout else may_copy,
        per_leaf=not one_collective,
    )
    pending = sorted(first.solo)  # the leaves reduced on their own
    if one_collective:
        add = _added_in_order if tpu_layout else _added
        total = add(first.scalar_parts(), acc)
    else:
        total = jnp.sum(first.plain)

    # Both branches give (a, g): where a leaf is rescued (below), its norm is
    # sqrt(a) / its factor; g is the norm. The norm reaches the caller only through the
    # cond: XLA then cannot copy the sum over all leaves into every kernel that reads it
    # (on thousands of leaves that made compile time grow with the square of their
    # number).
    bucketed = first.scaled is not None
    # A tree whose plain total is tiny may have lost squares below the smallest normal
    # number; one whose total is inf overflowed. Both are rescued by one branch, which
    # scales by _UPSCALE or _RESCALE (a value it reads at run time: one set of kernels).
    tiny = is_tiny(total)
    factor = rescue_factor(total)
    if leaf_norms:
        # Per-leaf norms are rescued leaf by leaf: a leaf whose plain sum is below
        # _TINY_LEAF (its squares may all have flushed to zero: 0 cannot tell them from
        # a zero gradient) is summed again times _UPSCALE, one whose sum overflowed times
        # _RESCALE, the others times 1, whatever the total. So a leaf of zeros (or of
        # values below ~1e-11 in float32) sends the step down the rescue too; empty
        # leaves do not.
        nonempty = np.array([size > 0 for size in sizes])
        up = (first.plain < _TINY_LEAF[jnp.finfo(acc).bits]) & nonempty
        down = ~jnp.isfinite(first.plain)
        factors = jnp.where(nonempty, rescue_factor(first.plain, _TINY_LEAF), 1).astype(acc)
        common_path = jnp.isfinite(total) & ~tiny & ~jnp.any(up)
    else:  # only the total is read: the whole tree is scaled alike, by factor
        common_path = jnp.isfinite(total) & ~tiny

    def common(operands):
        sums = (first.scaled[0] if bucketed else first.plain) if leaf_norms else None
        return sums, safe_sqrt(total)

    def rescued(operands):
        if tpu_layout and not leaf_norms:
            return None, safe_sqrt(_rescaled_total(operands, acc, may_copy, factor, total)) / factor
        # Nothing bucketed: zeros stand for the leaves that are neither reduced on their
        # own nor bucketed (the empty ones, whose plain sum is 0 and finite).
        if bucketed and leaf_norms:
            rescued_sums = jnp.where(
                up, first.scaled[1], jnp.where(down, first.scaled[0], first.plain)
            )
        elif bucketed:
            rescued_sums = jnp.where(tiny, first.scaled[1], first.scaled[0])
        else:
            rescued_sums = jnp.zeros((n,), acc)
        if pending:

            def rescan(run: list[int], xs: list[jax.Array]) -> _Sums:
                """The rescaled sums of the leaves ``run`` (of ``pending``), values ``xs``."""
                options = dict(
                    scale=factors[np.array(run)] if leaf_norms else factor,
                    factor_from_witness=axis_name is None,
                    # Buckets of big leaves save XLA:CPU kernels; the TPU compiler takes
                    # longer over their concatenations than over a reduction per leaf.
                    copy_big=platform == "cpu",
                    whole_groups=tpu_layout,
                    per_leaf=not one_collective,
                    witnesses={
                        k: total if one_collective else first.solo[i] for k, i in enumerate(run)
                    },
                )
                run_flags, run_ok = [flags[i] for i in run], [may_copy[i] for i in run]
                return _sums_over_devices(xs, acc, run_flags, axis_name, run_ok, **options)

            if not leaf_norms:
                again_sums = rescan(pending, [operands[i] for i in pending])
                if one_collective:  # rescued_sums holds the bucketed leaves' rescaled sums
                    parts = [*again_sums.scalar_parts(), jnp.sum(rescued_sums)]
                    return None, safe_sqrt(_added(parts, acc)) / factor
                again = again_sums.plain
            else:
                # Per-leaf factors: a run of leaves whose factors are all 1 keeps its
                # plain sums, so that a leaf of zeros (which takes this branch on every
                # step) costs a second read of its run, not of every big leaf.
                parts = []
                for run in _runs([sizes[i] for i in pending], _RESCUE_RUNS):
                    run = [pending[k] for k in run]
                    cols = np.array(run)
                    parts.append(
                        jax.lax.cond(
                            jnp.any(factors[cols] != 1),
                            lambda xs, run=run: rescan(run, xs).plain,
                            lambda xs, cols=cols: first.plain[cols],
                            [operands[i] for i in run],
                        )
                    )
                again = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
            if len(pending) == n:
                rescued_sums = again
            else:
                index = np.arange(n)
                index[pending] = n + np.arange(len(pending))
                rescued_sums = jnp.concatenate([rescued_sums, again])[index]
        # The rescaled total is accurate: where the plain one overflowed, the squares
        # that scaling down flushes to zero are negligible next to it; where it was
        # tiny, scaling up overflows nothing. Leaves summed with a factor of their own
        # are brought to the tree's by a power of two, applied twice (its square may
        # not be representable) and exact: (a * r) * r with r = factor / their factor.
        if leaf_norms:
            ratio = factor / factors
            norm = safe_sqrt(jnp.sum(rescued_sums * ratio * ratio)) / factor
        else:
            norm = safe_sqrt(jnp.sum(rescued_sums)) / factor
        return (rescued_sums if leaf_norms else None), norm

    rescued_sums, norm = jax.lax.cond(common_path, common, rescued, list(leaves))
    if not leaf_norms:
        return None, norm
    # Which leaves read their norm from the rescaled sums.
    per_leaf = jnp.where(up | down, safe_sqrt(rescued_sums) / factors, safe_sqrt(first.plain))
    return per_leaf, norm


def _sums_at_three_scales(
    x: jax.Array, acc: jnp.dtype, down: jax.Array, up: jax.Array
) -> list[jax.Array]:
    """``[sum |x|^2, sum |down x|^2, sum |up x|^2]`` in the accumulation dtype: three
    reductions of one operand, for the CUDA compiler to fuse into one read.

    The up-scaled sum is read only where every ``|x|`` lies below ``_UP_BOUND``;
    elsewhere it may overflow, harmlessly. It is not clamped as :func:`three_squares`
    clamps it: on the CUDA compiler a clamp in one of a leaf's three sums kept it out of
    the kernel of the other two (at 300 leaves of 10,000, adamw, it wrote the clamped
    squares out and read them back: 114.5 MiB of HBM traffic against Optax's 91.6;
    unclamped, 91.6). No derivative passes through it: the norms have their own rule
    (:func:`_norms_jvp`).
    """
    parts = [jnp.real(x), jnp.imag(x)] if jnp.iscomplexobj(x) else [x]
    parts = [part.astype(acc) for part in parts]
    plain = sum(p * p for p in parts)
    scaled_down = sum((p * down) * (p * down) for p in parts)
    scaled_up = sum((p * up) * (p * up) for p in parts)
    return [jnp.sum(plain), jnp.sum(scaled_down), jnp.sum(scaled_up)]


def _norms_at_three_scales(
    leaves: Sequence[jax.Array],
    acc: jnp.dtype,
    sizes: list[int],
    axis_name: AxisName,
    flags: Sequence[bool],
    may_copy: Sequence[bool],
    leaf_norms: bool,
) -> tuple[jax.Array | None, jax.Array]:
    """:func:`leaf_and_global_norms` in the GPU layout: every sum of squares taken at three
    scales in the one read of its values (plain, scaled down for a sum that overflows,
    scaled up for a tiny one: :func:`_sums_at_three_scales`), with no rescue branch;
    :func:`norm_at_its_scale` picks each norm's sum. Leaves of ``SMALL_LEAF`` elements
    or more (and those that may not be copied, :func:`concatenable`) are reduced on their
    own, as in Optax's clips; smaller ones are copied into the CPU layout's buckets
    (:func:`_square_sums`), whose one reduction already gives all three.

    Why not the other layouts' rescue: XLA:GPU's conditional simplifier compiles a
    ``lax.cond`` whose branches hold only reductions and elementwise operations as a
    select of both branches, so the rescue read the gradient a second time on every
    step (chain with adamw, 10 leaves of 2M on an H100 target: 686.8 MiB of HBM traffic
    against Optax's clip's 610.4; this layout 610.6) and, under FSDP, all-reduced a
    second scalar. A big leaf's three sums are three reductions of one operand, which
    XLA:GPU fuses into one kernel, and which under ``jit`` over devices end in one
    all-reduce of three scalars; one variadic reduction instead made GSPMD all-gather
    its partial sums. Their scales are constants behind an optimization barrier: XLA
    would fold a visible constant's square, which is 0 in float32. The buckets keep the
    compile time of thousands of small leaves down: at 2,000 leaves of 1,000 with sgd
    a reduction per leaf took the CUDA compiler 30.6 s (Optax: 15.3-15.8 s).

    The per-leaf norm takes its up-scaled sum below ``_TINY_LEAF``, the total below
    ``_TINY_TOTAL`` (:func:`is_tiny`), as the other layouts' rescues do; the clamp of
    the buckets' up-scaled values (:func:`three_squares`) binds only where the up-scaled
    sum is not read. Under
    ``shard_map``/``pmap`` the sharded leaves' sums are ``psum``-ed (the big leaves' in
    one ``psum``, the buckets' in another: XLA combines the two), the replicated leaves'
    kept out of it (device-invariant under ``check_vma``). Empty leaves are not reduced:
    their sums are 0.
    """
    bits = jnp.finfo(acc).bits
    small = [i for i, size in enumerate(sizes) if may_copy[i] and 0 < size < SMALL_LEAF]
    bucketed_at = set(small)
    solo = [i for i, size in enumerate(sizes) if size > 0 and i not in bucketed_at]
    down, up = jax.lax.optimization_barrier(
        (jnp.asarray(_RESCALE[bits], acc), jnp.asarray(_UPSCALE[bits], acc))
    )
    sums = {i: _sums_at_three_scales(leaves[i], acc, down, up) for i in solo}
    sharded = [i for i in solo if flags[i]]
    if axis_name is not None and sharded:
        reduced = jax.lax.psum(jnp.stack([jnp.stack(sums[i]) for i in sharded]), axis_name)
        for j, i in enumerate(sharded):
            sums[i] = list(reduced[j])
    solo_sums = [[sums[i][k] for i in solo] for k in range(3)]  # plain, down, up
    parts = [list(column) for column in solo_sums]
    small_sums = []
    if small:
        bucketed = _sums_over_devices(
            [leaves[i] for i in small],
            acc,
            [flags[i] for i in small],
            axis_name,
            [may_copy[i] for i in small],
        )
        small_sums = [bucketed.plain, *bucketed.scaled]
        for k in range(3):
            parts[k].append(jnp.sum(small_sums[k]))
    plain, scaled_down, scaled_up = (_added(p, acc) for p in parts)
    norm = norm_at_its_scale(plain, scaled_down, scaled_up, is_tiny(plain), down, up)
    if not leaf_norms:
        return None, norm
    columns = [
        ([jnp.stack(solo_sums[k])] if solo else []) + ([small_sums[k]] if small else [])
        for k in range(3)
    ]
    # Entry k of each column is leaf order[k]'s; the empty leaves read a trailing 0.
    order = solo + small
    position = {i: k for k, i in enumerate(order)}
    index = np.array([position.get(i, len(order)) for i in range(len(leaves))], np.int32)
    zero = jnp.zeros((1,), acc)
    plains, downs, ups = (jnp.concatenate([*column, zero])[index] for column in columns)
    return norm_at_its_scale(plains, downs, ups, plains < _TINY_LEAF[bits], down, up), norm
