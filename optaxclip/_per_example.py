"""Per-example clipping (DP-SGD): each example's gradient clipped, then the batch summed.

Optax's ``per_example_global_norm_clip`` and ``per_example_layer_norm_clip``, with their
signatures and results on finite inputs, measured the optaxclip way: squares summed in
float32 (float64 for float64 leaves) whatever the leaf dtype, and a rare rescaled pass
where a sum of squares overflows or underflows, so that an example of norm 1e20 in
float32, or of norm 300 in fp16, is clipped to the bound instead of dropped (Optax's
norm is inf there, and its multiplier 0).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip._mechanics import ScaleSource, scale_change, scale_parts, scale_source
from optaxclip._norm_engine import (
    abs_sq,
    accumulation_dtype,
    is_tiny,
    own_scale,
    rescue_factor,
    safe_sqrt,
    unit_dot,
)
from optaxclip._validation import (
    as_threshold,
    check_float_leaves,
    check_range,
    checked_bound,
    is_concrete,
)

__all__ = ["per_example_global_norm_clip", "per_example_layer_norm_clip"]

# A group of values whose plain sum of squares is tiny (_norm_engine.is_tiny: below
# 2^-40 in float32, 2^-400 in float64) has a norm below sqrt(2) times the square root of
# that even counting the squares that flushed to zero: it cannot exceed a bound at
# least this large, so reading its norm low changes nothing.
_TINY_NORM = {32: 2.0**-19, 64: 2.0**-199}

# The examples' scales are summed as one dot product that takes every weight over the
# smallest lo (see _clip_and_sum), so a tiny scale is split by 2^64, not by the
# transforms' 2^126 (_mechanics._SCALE_SPLIT): an unclipped example's weight then grows
# by at most 2^64, and the batch's sum cannot overflow. Scales below ~2^-190 (2^-1534
# in float64) flush to 0 here.
_SUM_SPLIT = {32: 2.0**64, 64: 2.0**512}


def _examples(grads: Any, who: str) -> tuple[list[jax.Array], Any]:
    """The leaves of ``grads`` and its treedef, after checking the examples' axis."""
    check_float_leaves(grads, "grads")
    with_path, treedef = jax.tree_util.tree_flatten_with_path(grads)
    leaves = [x for _, x in with_path]
    if not leaves:
        return leaves, treedef
    first_path, first = with_path[0]
    for path, x in with_path:
        where = jax.tree_util.keystr(path) or "<root>"
        if np.ndim(x) == 0:
            raise ValueError(
                f"{who}: grads leaf {where} is a scalar; per-example gradients carry the "
                "examples on axis 0 of every leaf (jax.vmap(jax.grad(loss)) makes them)."
            )
        if np.shape(x)[0] != np.shape(first)[0]:
            raise ValueError(
                f"{who}: grads leaf {where} has shape {np.shape(x)}, so "
                f"{np.shape(x)[0]} examples on axis 0, but grads leaf "
                f"{jax.tree_util.keystr(first_path) or '<root>'} has shape {np.shape(first)}, "
                f"so {np.shape(first)[0]}: every leaf needs the same examples on axis 0."
            )
    return leaves, treedef


def _example_sums(x: jax.Array, acc: jnp.dtype, factor: jax.Array | None = None) -> jax.Array:
    """(examples,): the sum of |x|^2 over each example's slice, times ``factor`` first."""
    scale = None if factor is None else factor.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sum(abs_sq(x, acc, scale), axis=tuple(range(1, x.ndim)))


def _group_sums(parts: list[jax.Array]) -> jax.Array:
    return parts[0] if len(parts) == 1 else jnp.sum(jnp.stack(parts), axis=0)


def _group_norms(
    leaves: list[jax.Array], groups: list[list[int]], bounds: list[jax.Array], acc: jnp.dtype
) -> list[jax.Array]:
    """For each group of leaves, the L2 norm of each example's slice of it (examples,),
    differentiated by the norm's own rule (:func:`_group_norms_jvp`)."""
    frozen = tuple(tuple(members) for members in groups)
    return _differentiable_group_norms(frozen, jnp.dtype(acc), leaves, bounds)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _differentiable_group_norms(
    groups: tuple[tuple[int, ...], ...],
    acc: jnp.dtype,
    leaves: list[jax.Array],
    bounds: list[jax.Array],
) -> list[jax.Array]:
    return _measured_group_norms(leaves, [list(g) for g in groups], bounds, acc)


@_differentiable_group_norms.defjvp
def _group_norms_jvp(groups, acc, primals, tangents):
    """``d n_e = <x_e / n_e, dx_e>`` over each example's slice of a group (0 where
    ``n_e`` is 0), as the norm engine's rule: through the sums of squares the norm's
    cotangent, over 2 ``n_e``, flushed to zero where ``n_e`` is big and the cotangent
    small (a clip to 1 of an example of norm 1e18)."""
    leaves, bounds = primals
    dleaves, _ = tangents  # a bound only chooses when to rescue
    norms = _differentiable_group_norms(groups, acc, leaves, bounds)
    d_norms = []
    for members, norm in zip(groups, norms, strict=True):
        denom = jnp.where(norm > 0, norm, 1)
        parts = []
        for i in members:
            x, dx = leaves[i], dleaves[i]
            axes = tuple(range(1, x.ndim))
            per_example = denom.reshape((-1,) + (1,) * (x.ndim - 1))
            parts.append(unit_dot(x, dx, per_example, acc, axes).reshape(-1))
        d_norms.append(_group_sums(parts))
    return norms, d_norms


def _measured_group_norms(
    leaves: list[jax.Array], groups: list[list[int]], bounds: list[jax.Array], acc: jnp.dtype
) -> list[jax.Array]:
    """:func:`_group_norms`, differentiated as it is computed.

    One read of the leaves when every sum of squares is finite and every tiny one
    (:func:`~optaxclip._norm_engine.is_tiny`: squares may have flushed to zero) faces a bound too
    large for it to matter. Otherwise a ``lax.cond`` branch sums each rescued group's
    squares again, times a power of two (down where the plain sum overflowed, up where
    it is tiny), which a NaN or inf input still turns into a NaN or inf norm. The groups
    stay apart (a list, not one stacked array): per-leaf chains that meet only in the
    cond's predicate compile half as slowly as slices of a shared array.
    """
    bits = jnp.finfo(acc).bits
    leaf_sums = [_example_sums(x, acc) for x in leaves]
    totals = [_group_sums([leaf_sums[i] for i in members]) for members in groups]
    stacked = jnp.stack(totals)
    tiny_bound = jnp.stack(bounds)[:, None] < _TINY_NORM[bits]
    unsafe = ~jnp.isfinite(stacked) | (is_tiny(stacked) & tiny_bound)

    def common(_):
        return [safe_sqrt(t) for t in totals]

    def rescued(operands):
        out = []
        for members, t in zip(groups, totals, strict=True):
            factor = rescue_factor(t)
            parts = [
                _example_sums(operands[i], acc, own_scale(leaf_sums[i], factor, acc))
                for i in members
            ]
            again = _group_sums(parts)
            out.append(jnp.where(factor != 1, safe_sqrt(again) / factor, safe_sqrt(t)))
        return out

    return jax.lax.cond(jnp.any(unsafe), rescued, common, list(leaves))


def _clip_and_sum(
    leaves: list[jax.Array],
    groups: list[list[int]],
    bounds: list[jax.Array],
    eps: Any,
    acc: jnp.dtype,
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Each group's per-example slices scaled to its bound, summed over the examples.

    Returns:
      ``(summed leaves in their dtypes, clipped examples per group as int32 scalars)``.
    """
    norms = _group_norms(leaves, groups, bounds, acc)
    sums: list[Any] = [None] * len(leaves)
    counts = []
    for members, norm, bound in zip(groups, norms, bounds, strict=True):
        limit = jnp.broadcast_to(bound, norm.shape)
        # A clipped slice ends at limit / (1 + eps): just inside its bound at every scale.
        cap = limit / (1 + jnp.asarray(eps, acc))
        _, _, hi, lo = scale_parts(norm, cap, split=_SUM_SPLIT)
        source = scale_source(norm, cap)
        over = jnp.isfinite(norm) & (norm > limit)
        if not (is_concrete(eps) and float(eps) == 0):
            # A norm between limit / (1 + eps) and limit is not clipped: no scale there.
            keep = ~over & (limit != 0)
            hi, lo = jnp.where(keep, 1, hi), jnp.where(keep, 1, lo)
            source = source._replace(scales=source.scales & ~keep)
        # sum_i hi_i lo_i x_i as one dot product per leaf (a multiply and a sum over
        # axis 0 runs ~10x slower on XLA:CPU), at full precision (TPUs default to
        # bfloat16 passes). lo is 1 except where a scale is too small for one float
        # (then a power of two): the dot takes hi_i lo_i / lo_min and its result is
        # multiplied by lo_min. That cannot overflow: every term is at most the bound
        # over lo_min, and lo_min < 1 only where bound / norm is below the smallest
        # normal float, so the bound is below ~4 sqrt(size).
        lo_min = jnp.min(lo, initial=1.0)  # 1 for a batch of no examples
        weights = jnp.where(lo != 1, hi, hi / lo_min)
        for i in members:
            x = leaves[i]
            # Half precision is summed in float32 and rounded once; float32 beside
            # float64 leaves in float64, whose scale may not fit a float32.
            wide = x.astype(jnp.promote_types(x.dtype, acc))
            real = jnp.finfo(wide.dtype).dtype
            total = _scaled_sum(wide, weights.astype(real), lo_min.astype(real), source)
            sums[i] = total.astype(x.dtype)
        counts.append(jnp.sum(over).astype(jnp.int32))
    return sums, counts


def _dot(weights: jax.Array, x: jax.Array) -> jax.Array:
    """sum_i weights[i] * x[i] over axis 0, at full precision."""
    return jnp.tensordot(weights, x, axes=1, precision=jax.lax.Precision.HIGHEST)


@jax.custom_jvp
def _scaled_sum(
    x: jax.Array, weights: jax.Array, lo_min: jax.Array, source: ScaleSource
) -> jax.Array:
    """``sum_i weights[i] lo_min x[i]`` over the examples (axis 0), differentiated as
    ``sum_i s_i dx_i + (x_i / n_i) dt_i - (s_i x_i) dn_i / n_i`` (:func:`scale_change`),
    ``s_i = weights[i] lo_min`` being example ``i``'s scale, ``t_i / n_i`` from its
    threshold and norm in ``source`` where that clips it (elsewhere the last two terms
    are 0); the tangents of the factors are not read.

    Through the factors, ``d s_i = s_i (dt / t - dn_i / n_i)`` falls below the smallest
    normal float32 for an example of norm ~1e18 or more, and forward mode lost the
    norm's part (19% off at 1e20). See ``_scaled`` in ``_mechanics.py``, the same rule
    for the transforms."""
    del source
    return _dot(weights, x) * lo_min


@_scaled_sum.defjvp
def _scaled_sum_jvp(primals, tangents):
    x, weights, lo_min, source = primals
    dx, _, _, dsource = tangents
    # Each example's clipped values s_i x_i, written out (a derivative's program only),
    # then changed with its threshold and norm (scale_change).
    along = (-1,) + (1,) * (x.ndim - 1)
    clipped = (x * weights.reshape(along).astype(x.dtype)) * lo_min.astype(x.dtype)
    each = ScaleSource(*(jnp.reshape(v, along) for v in source))
    d_each = ScaleSource(
        jnp.reshape(dsource.threshold, along), jnp.reshape(dsource.norm, along), None
    )
    moved = jnp.sum(scale_change(x, clipped, each, d_each), axis=0)
    return _scaled_sum(x, weights, lo_min, source), _dot(weights, dx) * lo_min + moved


def per_example_global_norm_clip(grads: Any, l2_norm_clip: Any) -> tuple[Any, jax.Array]:
    """Clips each example's gradient to global L2 norm ``l2_norm_clip``, then sums them.

    The clipping step of DP-SGD: ``grads`` holds one gradient per example on axis 0 of
    every leaf (``jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)``). Example
    ``i``, whose global norm over all leaves is ``n_i``, is scaled by
    ``min(1, l2_norm_clip / n_i)`` (1 at ``n_i = 0``), and the scaled examples are summed
    leaf by leaf, as ``optax.per_example_global_norm_clip`` does and with its results on
    finite inputs (to float32 rounding). The norms accumulate in float32 (float64 for
    float64 leaves) and survive what Optax's do not: an example whose norm is above ~1e19
    in float32, or above 256 in fp16, is clipped to the bound where Optax drops it (its
    norm overflows to inf and its multiplier to 0), and one with values below ~1e-19 gets
    its true norm. The sum is accumulated in float32 (the leaf's dtype if wider) and
    returned in the leaf's dtype. A NaN/inf example is left unscaled, so the NaN/inf
    reaches the sum, and is not counted as clipped.

    Args:
      grads: a pytree of floating point (or complex) arrays, each with the examples on
        axis 0 (the same number in every leaf).
      l2_norm_clip: the largest global L2 norm an example keeps (a non-negative scalar;
        ``inf`` clips nothing).

    Returns:
      ``(summed_clipped_grads, num_clipped)``: a tree of ``grads``' structure whose leaves
      drop axis 0, and the number of examples that were scaled down (int32 scalar).

    References:
      Abadi et al., `Deep Learning with Differential Privacy
      <https://arxiv.org/abs/1607.00133>`_, 2016.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> grads = [jnp.array([[0.0, 0.0, 0.0], [0.0, 3.0, 4.0], [4.0, 0.0, 3.0],
      ...                     [3.0, 4.0, 0.0]])]
      >>> summed, num_clipped = optaxclip.per_example_global_norm_clip(grads, 1.25)
      >>> print(summed[0], num_clipped)
      [1.75 1.75 1.75] 3
      >>> big = [jnp.array([[3e19, 4e19], [0.3, 0.4]])]  # Optax's sum: [0.3 0.4]
      >>> print(optaxclip.per_example_global_norm_clip(big, 1.0)[0][0])
      [0.90000004 1.2       ]
    """
    who = "per_example_global_norm_clip"
    leaves, treedef = _examples(grads, who)
    acc = accumulation_dtype(leaves)
    bound = checked_bound(who, "l2_norm_clip", l2_norm_clip, acc, "an example keeps")
    if not leaves:
        return grads, jnp.zeros((), jnp.int32)
    sums, clipped = _clip_and_sum(leaves, [list(range(len(leaves)))], [bound], 0, acc)
    return jax.tree_util.tree_unflatten(treedef, sums), clipped[0]


def per_example_layer_norm_clip(
    grads: Any, global_l2_norm_clip: Any, uniform: bool = True, eps: Any = 1e-8
) -> tuple[Any, Any]:
    """Clips each example's gradient layer by layer (one bound per leaf), then sums them.

    Per-layer DP clipping: leaf ``k`` of example ``i`` is clipped to its own bound
    ``C_k``, where ``C = global_l2_norm_clip`` and, for ``K`` leaves,
    ``C_k = C / sqrt(K)`` (``uniform=True``) or ``C_k = C * sqrt(D_k / D)`` with ``D_k``
    the number of values of one example in leaf ``k`` and ``D`` their total
    (``uniform=False``), so that a clipped example's global norm is at most ``C``
    either way. A slice whose norm ``n_ik`` exceeds ``C_k`` is scaled by
    ``C_k / (n_ik (1 + eps))``; the others are kept. The slices are summed over the
    examples leaf by leaf. With one leaf (and ``eps=0``) this is
    :func:`per_example_global_norm_clip`. These are the rules and the results of
    ``optax.per_example_layer_norm_clip`` on finite inputs (Optax has no ``eps``; the
    default 1e-8 moves a clipped slice by 1e-8 relative, below float32's resolution),
    with the robust float32 accumulation of :func:`per_example_global_norm_clip`.

    Args:
      grads: a pytree of floating point (or complex) arrays, each with the examples on
        axis 0 (the same number in every leaf).
      global_l2_norm_clip: the bound ``C`` on an example's whole gradient
        (a non-negative scalar).
      uniform: split ``C`` equally among the leaves (True) or in proportion to the
        square root of their sizes (False).
      eps: a relative margin: a clipped slice ends at norm ``C_k / (1 + eps)``, just
        inside its bound, whatever its scale (non-negative; 0 gives Optax's rule
        exactly). Relative, not Opacus's absolute ``C / (n + eps)``, which shrinks slices
        whose norm is far below ``eps`` toward zero.

    Returns:
      ``(sum_clipped_grads, num_clipped_per_layer)``: a tree of ``grads``' structure whose
      leaves drop axis 0, and a tree of the same structure holding, per leaf, the number
      of examples whose slice was scaled down (int32 scalars).

    References:
      Abadi et al., `Deep Learning with Differential Privacy
      <https://arxiv.org/abs/1607.00133>`_, 2016; McMahan et al., `Learning
      Differentially Private Recurrent Language Models
      <https://arxiv.org/abs/1710.06963>`_, 2018 (per-layer clipping).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> grads = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]]), "b": jnp.array([[0.5], [0.1]])}
      >>> summed, num_clipped = optaxclip.per_example_layer_norm_clip(grads, 2.0 ** 0.5)
      >>> print(summed["w"], summed["b"])
      [0.90000004 1.2       ] [0.6]
      >>> print(int(num_clipped["w"]), int(num_clipped["b"]))
      1 0
    """
    who = "per_example_layer_norm_clip"
    leaves, treedef = _examples(grads, who)
    if not isinstance(uniform, (bool, np.bool_)):
        raise TypeError(f"{who}: uniform must be a bool (True or False), got {uniform!r}.")
    check_range("eps", eps, 0.0, math.inf)
    acc = accumulation_dtype(leaves)
    bound = checked_bound(
        who, "global_l2_norm_clip", global_l2_norm_clip, acc, "an example keeps"
    )
    if not leaves:
        return grads, grads
    sizes = np.array([math.prod(np.shape(x)[1:]) for x in leaves], np.float64)
    if uniform or sizes.sum() == 0:
        fractions = np.full(len(leaves), 1.0 / len(leaves))
    else:
        fractions = sizes / sizes.sum()
    if is_concrete(global_l2_norm_clip):  # in float64 first, as Optax's Python floats are
        bounds = [as_threshold(float(global_l2_norm_clip) * f, acc) for f in np.sqrt(fractions)]
    else:
        bounds = [bound * jnp.asarray(f, acc) for f in np.sqrt(fractions)]
    groups = [[i] for i in range(len(leaves))]
    sums, counts = _clip_and_sum(leaves, groups, bounds, eps, acc)
    return (
        jax.tree_util.tree_unflatten(treedef, sums),
        jax.tree_util.tree_unflatten(treedef, counts),
    )
