"""Clipping by global norm (Pascanu et al. 2013), and the mechanics shared with the
adaptive transforms that end in a global-norm clip (AutoClip, ZClip)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _stats
from optaxclip._norms import AxisName, Sharded, _flags_for, _leaf_and_global_norms
from optaxclip._stats import ClipStats
from optaxclip._validation import (
    check_choice,
    check_float_leaves,
    check_threshold,
    is_concrete,
    raise_at_runtime_if,
    threshold_at,
)

__all__ = ["ClipByGlobalNormState", "clip_by_global_norm", "clip_tree_by_global_norm"]

NONFINITE_POLICIES = ("propagate", "zero", "error")


def scale_leaf(x: jax.Array, scale: jax.Array, lo: jax.Array | None = None) -> jax.Array:
    """``x * scale`` (``x * scale * lo`` when ``lo`` is given) keeping x's dtype.

    Half-precision leaves multiply in float32: a float32 scalar never turns into inf or
    0 when cast to fp16 first, which is how Optax zeroes fp16 leaves whose tree has a
    norm above 65504. ``lo`` is a power of two that carries the part of a scale too
    small for one float (see :func:`scale_parts`); multiplying by 1 changes nothing.
    """
    info = jnp.finfo(x.dtype)
    wide = x if info.bits >= 32 else x.astype(jnp.float32)
    real = jnp.finfo(wide.dtype).dtype
    out = wide * scale.astype(real)
    if lo is not None:
        out = out * lo.astype(real)
    return out if info.bits >= 32 else out.astype(x.dtype)


@jax.custom_jvp
def _ratio(t: jax.Array, n: jax.Array) -> jax.Array:
    """``t / n``, whose derivative is taken as ``(dt - (t/n) dn) / n``.

    JAX differentiates a division through ``n**-2``, which flushes to 0 for n > ~1.8e19
    in float32: the clip's gradient would then miss its dependence on the norm.
    """
    return t / n


@_ratio.defjvp
def _ratio_jvp(primals, tangents):
    t, n = primals
    dt, dn = tangents
    r = t / n
    return r, (dt - r * dn) / n


def scale_for(norm: jax.Array, threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(scale, over)``: scale = min(1, threshold / norm), 1 for a NaN/inf or zero norm."""
    over = jnp.isfinite(norm) & (norm > threshold)
    safe_norm = jnp.where(over, norm, 1)
    ratio = _ratio(threshold.astype(norm.dtype), safe_norm)
    return jnp.where(over, ratio, 1).astype(norm.dtype), over


# A scale below the smallest normal float flushes to 0 (threshold 1e-10 over a norm of
# 1e30), though the clipped values it makes are representable: it is then applied as
# (scale * 2^64) * 2^-64.
_SCALE_SPLIT = {32: 2.0**64, 64: 2.0**512}


def scale_parts(
    norm: jax.Array, threshold: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(scale, over, hi, lo)`` for a clip of a tree of global norm ``norm``.

    ``scale`` and ``over`` are :func:`scale_for`'s. The leaves are multiplied by
    ``hi * lo`` (:func:`scale_leaf`), which equals ``scale`` except that

    - a scale too small for one float is carried by two factors (``lo`` a power of
      two), so the clipped values do not flush to zero;
    - a zero threshold gives 0 even where the norm is 0 (where the reported scale is 1):
      the clip is then identically 0, and so is its derivative.
    """
    scale, over = scale_for(norm, threshold)
    dtype = norm.dtype
    info = jnp.finfo(dtype)
    split = _SCALE_SPLIT[info.bits]
    t = threshold.astype(dtype)
    tiny = over & (scale < info.tiny)
    # Only where t / norm < tiny: then t < norm * tiny, so t * split cannot overflow.
    hi = jnp.where(tiny, _ratio(jnp.where(tiny, t, 0) * split, jnp.where(over, norm, 1)), scale)
    hi = jnp.where((t == 0) & jnp.isfinite(norm), 0, hi).astype(dtype)
    lo = jnp.where(tiny, 1 / split, 1).astype(dtype)
    return scale, over, hi, lo


def _nonfinite_error(who: str) -> Callable[..., Exception]:
    def make(step: Any, norm: Any) -> Exception:
        return FloatingPointError(
            f"optaxclip.{who}: the gradient's global norm is {float(norm)} at step "
            f"{int(step)} (count from 1). Use nonfinite='propagate' or 'zero', or wrap the "
            "optimizer in optaxclip.skip_nonfinite, to train through such steps."
        )

    return make


def check_finite_at_runtime(who: str, finite: jax.Array, step: jax.Array, norm: jax.Array):
    """Raises (from inside ``jit``) when ``finite`` is False; free when it is True."""
    raise_at_runtime_if(~finite, _nonfinite_error(who), step, norm)


def clip_with_threshold(
    updates: Any,
    norm: jax.Array,
    threshold: jax.Array,
    prev: ClipStats,
    *,
    nonfinite: str,
    who: str,
) -> tuple[Any, ClipStats]:
    """Scales ``updates`` (whose global norm is ``norm``) down to ``threshold``.

    Applies the ``nonfinite`` policy and records the step in a new ClipStats. The norm
    is taken as given: this function never reads the updates to measure them again.
    """
    finite = jnp.isfinite(norm)
    scale, over, hi, lo = scale_parts(norm, threshold)
    if nonfinite == "zero":
        updates = jax.tree.map(
            lambda x: jnp.where(finite, scale_leaf(x, hi, lo), jnp.zeros_like(x)), updates
        )
        clipped = over | ~finite
        clipped_norm = jnp.where(finite, norm * scale, 0)
    else:
        updates = jax.tree.map(lambda x: scale_leaf(x, hi, lo), updates)
        clipped = over
        clipped_norm = norm * scale
        if nonfinite == "error":
            check_finite_at_runtime(who, finite, prev.count + 1, norm)
    new_stats = _stats.record(
        prev, norm=norm, clipped_norm=clipped_norm, threshold=threshold, clipped=clipped
    )
    return updates, new_stats


def measure(tree: Any, axis_name: AxisName = None, sharded: Sharded = None) -> jax.Array:
    """Global norm of the updates after checking that every leaf is floating point."""
    check_float_leaves(tree)
    leaves = jax.tree_util.tree_leaves(tree)
    _, norm = _leaf_and_global_norms(leaves, axis_name=axis_name, flags=_flags_for(tree, sharded))
    return norm


class ClipByGlobalNormState(NamedTuple):
    """State of :func:`clip_by_global_norm`: only its statistics, read as ``state.stats``.

    The field is named after the transform so that the name survives where the class
    does not (``nnx.state(optimizer)``, a checkpoint restored without a target), and
    :func:`optaxclip.stats` names these statistics the same way there.
    """

    clip_by_global_norm: ClipStats

    @property
    def stats(self) -> ClipStats:
        return self.clip_by_global_norm


def clip_by_global_norm(
    max_norm: Any,
    *,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    sharded: Sharded = None,
) -> optax.GradientTransformationExtraArgs:
    """Rescales the updates so that their global L2 norm is at most ``max_norm``.

    The update ``g`` becomes ``g * min(1, max_norm / ||g||)``: the direction is kept
    and only its length shrinks. The norm is measured robustly (see
    :func:`optaxclip.global_norm`) and the scaling is one float32 multiply per element,
    so fp16 gradients above 256, float32 gradients above 1e19, bf16 trees with
    thousands of leaves and mixed-dtype trees are clipped correctly where
    ``optax.clip_by_global_norm`` returns zeros or a wrong scale. A zero norm gives
    scale 1 (never NaN), including with ``max_norm=0``. Each leaf keeps its dtype.

    Args:
      max_norm: the largest global norm let through: a non-negative scalar or an
        ``optax.Schedule`` evaluated at this transform's step count.
      nonfinite: what to do when the norm is NaN or inf. ``"propagate"`` returns the
        updates unchanged (the NaN/inf stays in its own leaf and no other leaf is
        touched); ``"zero"`` returns zeros; ``"error"`` raises from inside ``jit`` with a
        message naming the step. Every such step is counted in ``nonfinite_count``.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis over which the norm
        is summed (see :func:`optaxclip.global_norm`).
      sharded: which leaves are sharded along ``axis_name``; default all.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state carries a
      :class:`ClipStats`.

    References:
      Pascanu et al., `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, 2013.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tx = optaxclip.clip_by_global_norm(1.0)
      >>> grads = {"w": jnp.array([3.0, 4.0])}
      >>> clipped, state = tx.update(grads, tx.init(grads))
      >>> print(clipped["w"])
      [0.6 0.8]
      >>> half = [jnp.array([300.0, 1.0], jnp.float16)]  # Optax returns zeros here
      >>> print(tx.update(half, tx.init(half))[0][0])
      [1.       0.003334]
    """
    check_threshold("max_norm", max_norm)
    check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)

    def init_fn(params):
        del params
        return ClipByGlobalNormState(_stats.init_stats())

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        norm = measure(updates, axis_name, sharded)
        threshold = threshold_at(max_norm, state.stats.count, "max_norm")
        updates, new_stats = clip_with_threshold(
            updates, norm, threshold, state.stats, nonfinite=nonfinite, who="clip_by_global_norm"
        )
        return updates, ClipByGlobalNormState(new_stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_tree_by_global_norm(
    tree: Any, max_norm: Any, norm: jax.Array | None = None
) -> tuple[Any, jax.Array]:
    """Scales a pytree so that its global L2 norm is at most ``max_norm``.

    The functional form of :func:`clip_by_global_norm`, for code outside an Optax
    chain: per-example clipping under ``jax.vmap`` (DP-SGD), custom training loops.
    A NaN/inf norm gives scale 1 (the tree is returned unchanged).

    Args:
      tree: a pytree of floating point or complex arrays.
      max_norm: the largest global norm let through (non-negative scalar).
      norm: the tree's global norm if the caller already has it (saves a pass);
        computed with :func:`optaxclip.global_norm` when None.

    Returns:
      ``(clipped_tree, scale)`` where ``scale = min(1, max_norm / norm)`` is a scalar.

    References:
      Pascanu et al., `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, 2013; Abadi et al., `Deep Learning with
      Differential Privacy <https://arxiv.org/abs/1607.00133>`_, 2016 (per-example use).

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tree, scale = optaxclip.clip_tree_by_global_norm({"a": jnp.array([6.0, 8.0])}, 5.0)
      >>> print(tree["a"], scale)
      [3. 4.] 0.5
      >>> per_example = jnp.array([[3.0, 4.0], [0.3, 0.4]])
      >>> clipped, scales = jax.vmap(lambda g: optaxclip.clip_tree_by_global_norm(g, 1.0))(
      ...     per_example)
      >>> print(clipped)
      [[0.6 0.8]
       [0.3 0.4]]
    """
    if callable(max_norm) and not is_concrete(max_norm):
        raise TypeError(
            "clip_tree_by_global_norm: max_norm must be a number here, got a callable. A "
            "schedule needs a step count, which only the transform keeps: use "
            "optaxclip.clip_by_global_norm(schedule) in an optax chain, or pass "
            "schedule(step) yourself."
        )
    check_threshold("max_norm", max_norm)
    if norm is None:
        norm = measure(tree)
    else:
        check_float_leaves(tree)
        # A norm handed over in half precision or as an int is read as float32 (the
        # dtype the clip's arithmetic runs in); float64 stays float64.
        norm = jnp.asarray(norm)
        norm = norm.astype(jnp.promote_types(norm.dtype, jnp.float32))
    scale, _, hi, lo = scale_parts(norm, jnp.asarray(max_norm, jnp.float32))
    return jax.tree.map(lambda x: scale_leaf(x, hi, lo), tree), scale
