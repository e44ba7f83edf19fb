"""AdaGC (Wang et al. 2025): per-tensor clipping against an EMA of each tensor's norm."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _stats
from optaxclip._mechanics import (
    NONFINITE_POLICIES,
    ScaleSource,
    apply_nonfinite_policy,
    factor_bits,
    finite_ema,
    measure_leaves,
    scale_blocks,
    scale_parts,
    scale_source,
    shares_scale,
)
from optaxclip._norms import AxisName, Sharded
from optaxclip._stats import ClipStats, as_float32
from optaxclip._validation import (
    check_choice,
    check_range,
    check_static_int,
    check_threshold,
    positive_at,
    threshold_at,
)

__all__ = ["AdagcState", "adagc"]


class AdagcState(NamedTuple):
    """State of :func:`adagc`.

    Attributes:
      gamma: one float32 reference norm per leaf of the params tree given to ``init``
        (+inf while a leaf has not yet had a non-zero norm).
      stats: the :class:`ClipStats`. ``stats.count - stats.nonfinite_count`` is the
        number of finite steps seen, which is what the warm-up counts.
    """

    gamma: jax.Array
    stats: ClipStats


def adagc(
    *,
    ratio: Any = 1.04,
    beta: Any = 0.99,
    warmup_steps: int = 100,
    warmup_max_norm: Any = 1.0,
    eps: Any = 1e-6,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    sharded: Sharded = None,
) -> optax.GradientTransformationExtraArgs:
    """Clips each tensor against an EMA of its own clipped norm (AdaGC).

    Every leaf ``i`` (a tensor) keeps a reference norm ``gamma_i``. For the first
    ``warmup_steps`` finite steps the updates are clipped by global norm at
    ``warmup_max_norm`` and ``gamma_i`` becomes the smallest norm of leaf ``i`` seen
    after that clip. Afterwards each leaf is clipped on its own:
    ``h_i = min(1, ratio * gamma_i / (||g_i|| + eps))``, ``g_i <- h_i g_i``, and, as
    in the reference implementation (lishuai-97/AdaGC),
    ``gamma_i <- beta gamma_i + (1 - beta) min(||g_i||, ratio * gamma_i)``: a clipped
    tensor feeds its bound, not its eps-shrunk clipped norm (which would ratchet
    ``gamma_i`` down for tensors whose norms are within a few orders of ``eps``). A
    tensor whose gradient explodes is brought back to a little above its own recent
    scale, whatever the other tensors do.

    A norm of exactly zero says nothing about a tensor's scale and never enters
    ``gamma_i``, in the warm-up or after it: it neither sets it (with ``gamma_i = 0`` the
    tensor could never move again, which is what a zero-initialized layer upstream of
    the warm-up would otherwise get) nor pulls its EMA toward 0. A leaf with no
    non-zero norm yet passes unclipped and its next non-zero norm starts its EMA, so
    ``warmup_steps=0`` starts every EMA from the first step. The EMA stays finite for
    every finite norm.

    The transform is differentiable: the gradient of a function of its output with
    respect to its input is finite wherever that function is differentiable, also
    while ``gamma_i`` is unset (+inf).

    ``ClipStats.threshold`` records ``warmup_max_norm`` during warm-up and the largest
    per-leaf bound ``max_i ratio * gamma_i`` after it; ``clipped`` is True when any
    leaf was scaled. A NaN/inf global norm is handled by ``nonfinite`` and leaves
    ``gamma`` as it was (and does not count toward the warm-up).

    Args:
      ratio: the relative bound ``lambda_rel`` on a tensor's norm against its EMA
        (positive).
      beta: EMA decay in (0, 1).
      warmup_steps: finite steps of global clipping before per-tensor clipping starts
        (a non-negative int; under ``optax.inject_hyperparams`` list it in
        ``static_args``).
      warmup_max_norm: the global-norm threshold during warm-up: a non-negative scalar
        or an ``optax.Schedule`` evaluated at this transform's step count.
      eps: added to each tensor's norm in the denominator (non-negative).
      nonfinite: ``"propagate"`` (updates unchanged), ``"zero"`` (zeros) or ``"error"``
        (raise from inside ``jit``) when the global norm is NaN/inf.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis over which the
        tensors are split: each tensor's norm (and the global norm) is that of the
        whole logical tensor, so ``gamma`` and every decision are the same on all
        devices (see :func:`optaxclip.global_norm`).
      sharded: which leaves are sharded along ``axis_name``; default all.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      :class:`AdagcState`. ``init`` needs the params (or any tree with the updates'
      structure) to size ``gamma``.

    References:
      Wang et al., `AdaGC: Improving Training Stability for Large Language Model
      Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tx = optaxclip.adagc(warmup_steps=1, warmup_max_norm=10.0, ratio=1.0, beta=0.5)
      >>> params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
      >>> state = tx.init(params)
      >>> for a, b in [(2.0, 1.0), (8.0, 1.0), (2.0, 1.0)]:
      ...     out, state = tx.update({"a": jnp.array([a]), "b": jnp.array([b])}, state)
      ...     print(round(float(out["a"][0]), 4), round(float(out["b"][0]), 4))
      2.0 1.0
      2.0 1.0
      2.0 1.0
      >>> print(state.gamma)
      [2. 1.]
    """
    check_range("ratio", ratio, 0.0, float("inf"), low_open=True)
    check_range("beta", beta, 0.0, 1.0, low_open=True, high_open=True)
    check_static_int("adagc", "warmup_steps", warmup_steps, ("warmup_steps",), allow_zero=True)
    check_threshold("warmup_max_norm", warmup_max_norm)
    check_threshold("eps", eps)
    check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)

    def init_fn(params):
        size = len(jax.tree_util.tree_leaves(params))
        return AdagcState(gamma=jnp.full((size,), jnp.inf, jnp.float32), stats=_stats.init_stats())

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        leaves, treedef, leaf_norms, norm = measure_leaves(updates, axis_name, sharded)
        if len(leaves) != state.gamma.shape[0]:
            raise ValueError(
                f"adagc: the updates have {len(leaves)} leaves but the state was built for "
                f"{state.gamma.shape[0]}; call init with the params tree the updates match."
            )
        finite = jnp.isfinite(norm)
        cap = threshold_at(warmup_max_norm, state.stats.count, "warmup_max_norm", norm.dtype)
        if not leaves:
            new_stats = _stats.record(
                state.stats, norm=norm, clipped_norm=norm, threshold=cap, clipped=False
            )
            return updates, AdagcState(gamma=state.gamma, stats=new_stats)

        gamma = state.gamma.astype(leaf_norms.dtype)
        in_warmup = state.stats.count - state.stats.nonfinite_count < warmup_steps

        # Warm-up: one global clip; gamma tracks the smallest non-zero leaf norm after it.
        bits = factor_bits(leaves, per_leaf=True)
        global_scale, global_over, global_hi, global_lo = scale_parts(
            norm, cap, leaf_bits=bits.min()
        )
        warm_norms = leaf_norms * global_scale
        warm_gamma = jnp.where(warm_norms > 0, jnp.minimum(gamma, warm_norms), gamma)

        # After warm-up: each leaf against ratio * its own EMA.
        r = positive_at("ratio", ratio, state.stats.count).astype(leaf_norms.dtype)
        b = jnp.asarray(beta, leaf_norms.dtype)
        # +inf: no non-zero norm seen yet (0 only from a state built by hand). Either way
        # the leaf passes and its next non-zero norm starts gamma.
        unset = jnp.isinf(gamma) | (gamma <= 0)
        positive = leaf_norms > 0
        bound = r * jnp.where(unset, 1, gamma)
        denom = leaf_norms + jnp.asarray(eps, leaf_norms.dtype)
        # Clipped when ||g_i|| > ratio * gamma_i, as the reference decides; eps only
        # enters the scale (a test on ||g_i|| + eps would clip every tensor whose norm is
        # within a few orders of eps, to nearly zero).
        candidate = ~unset & positive & jnp.isfinite(bound) & (leaf_norms > bound)
        # bound / (||g_i|| + eps) by the global clip's safe scale (finite derivative, split
        # below the smallest normal float); a non-candidate gets threshold = denom: 1.
        leaf_threshold = jnp.where(candidate, bound, denom)
        h, _, h_hi, h_lo = scale_parts(denom, leaf_threshold, leaf_bits=bits)
        leaf_over = candidate & (h < 1)
        # The EMA is fed min(||g_i||, ratio * gamma_i), never the eps-shrunk clipped norm;
        # an exactly-zero norm leaves gamma_i as it was.
        fed = jnp.where(leaf_over, bound, leaf_norms)
        ema_gamma = jnp.where(unset, leaf_norms, finite_ema(gamma, fed, b))
        ema_gamma = jnp.where(positive, ema_gamma, gamma)

        def factors(_):
            # A NaN/inf step: the policy decides the updates (factors of 1).
            hi = jnp.where(in_warmup, global_hi, jnp.where(leaf_over, h_hi, 1))
            lo = jnp.where(in_warmup, global_lo, jnp.where(leaf_over, h_lo, 1))
            return jnp.where(finite, hi, 1), jnp.where(finite, lo, 1)

        if not shares_scale(leaves):
            hi, lo = factors(None)
        else:
            # Each leaf's kernel then reads its two factors from the conditional's
            # outputs instead of compiling these selects again (see scale_parts).
            hi, lo = jax.lax.cond(in_warmup, factors, factors, None)
        over = jnp.where(in_warmup, global_over, jnp.any(leaf_over))
        threshold = jnp.where(in_warmup, cap, jnp.max(r * gamma))
        new_gamma = jnp.where(in_warmup, warm_gamma, ema_gamma)
        # A NaN/inf step leaves gamma as it was.
        new_gamma = jnp.where(finite, new_gamma, gamma)
        # What the clip is differentiated by (see scale_leaves): the scale chosen above,
        # the global one in warm-up, each tensor's own after it (factors of 1 elsewhere).
        warm, own = scale_source(norm, cap), scale_source(denom, leaf_threshold)
        source = ScaleSource(
            jnp.where(in_warmup, warm.threshold, own.threshold),
            jnp.where(in_warmup, warm.norm, own.norm),
            finite & jnp.where(in_warmup, warm.scales, leaf_over & own.scales),
        )
        scaled, _, scaled_norm = scale_blocks(leaves, leaf_norms, hi, lo, source)
        new_leaves, clipped_norm, over = apply_nonfinite_policy(
            scaled,
            finite,
            jnp.where(finite, scaled_norm, norm),
            finite & over,
            nonfinite=nonfinite,
            who="adagc",
            step=state.stats.count + 1,
            norm=norm,
        )
        new_stats = _stats.record(
            state.stats, norm=norm, clipped_norm=clipped_norm, threshold=threshold, clipped=over
        )
        new_state = AdagcState(gamma=as_float32(new_gamma), stats=new_stats)
        return jax.tree_util.tree_unflatten(treedef, new_leaves), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
