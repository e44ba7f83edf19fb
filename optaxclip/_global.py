"""Clipping by global norm (Pascanu et al. 2013): the transform and its functional form."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _stats
from optaxclip._mechanics import (
    NONFINITE_POLICIES,
    clip_with_threshold,
    factor_bits,
    measure,
    scale_all,
    scale_parts,
    scale_source,
    shares_scale,
)
from optaxclip._norms import AxisName, Sharded
from optaxclip._stats import ClipStats
from optaxclip._validation import (
    check_choice,
    check_float_leaves,
    check_threshold,
    checked_bound,
    is_concrete,
    threshold_at,
)

__all__ = ["ClipByGlobalNormState", "clip_by_global_norm", "clip_tree_by_global_norm"]


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
        threshold = threshold_at(max_norm, state.stats.count, "max_norm", norm.dtype)
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
      max_norm: the largest global norm let through (non-negative scalar). A traced
        one (passed through ``jit`` or ``vmap``) is checked at run time: negative or
        NaN raises instead of flipping the tree's sign.
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
    if norm is None:
        norm = measure(tree)
    else:
        check_float_leaves(tree)
        # A norm handed over in half precision or as an int is read as float32 (the
        # dtype the clip's arithmetic runs in); float64 stays float64.
        norm = jnp.asarray(norm)
        norm = norm.astype(jnp.promote_types(norm.dtype, jnp.float32))
    leaves, treedef = jax.tree.flatten(tree)
    shared = shares_scale(leaves)
    threshold = checked_bound(
        "clip_tree_by_global_norm", "max_norm", max_norm, norm.dtype, "the tree keeps"
    )
    scale, _, hi, lo = scale_parts(norm, threshold, shared=shared, leaf_bits=factor_bits(leaves))
    clipped = scale_all(leaves, hi, lo, scale_source(norm, threshold), shared=shared)
    return jax.tree.unflatten(treedef, clipped), scale
