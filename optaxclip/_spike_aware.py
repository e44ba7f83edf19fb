"""Spike-aware clipping (SPAM, Huang et al. 2025): each coordinate against an EMA of its g²."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _stats
from optaxclip._mechanics import (
    NONFINITE_POLICIES,
    apply_nonfinite_policy,
    map_and_measure,
    map_and_measure_mapped,
)
from optaxclip._norm_engine import (
    GPU_PLATFORMS,
    accumulation_dtype,
    leaf_and_global_norms,
    safe_sqrt,
    target_platform,
)
from optaxclip._norms import AxisName, Sharded, sharded_flags
from optaxclip._stats import ClipStats
from optaxclip._validation import (
    as_threshold,
    check_choice,
    check_float_leaves,
    check_range,
    check_threshold,
    is_concrete,
    raise_at_runtime_if,
    threshold_at,
)

__all__ = ["SpikeAwareClipState", "spike_aware_clip"]


class SpikeAwareClipState(NamedTuple):
    """State of :func:`spike_aware_clip`.

    Attributes:
      rms: per coordinate, ``sqrt(v)``, the root of the EMA of the squared (clipped)
        gradient: a pytree shaped like the parameters, float32 (float64 for float64
        leaves), one float per parameter. ``rms**2`` is the reference's ``v``. It is
        kept as a root so that it stays finite, and non-zero, for every finite
        gradient: ``v`` itself overflows float32 for gradients above ~1.8e19 and
        flushes to 0 below ~1e-19.
      recorded: the number of steps taken into ``rms`` (int32): the finite ones. The
        warm-up counts these.
      clipped_fraction: the fraction of the coordinates clipped this step (float32).
      stats: the :class:`ClipStats`.
    """

    rms: Any
    recorded: jax.Array
    clipped_fraction: jax.Array
    stats: ClipStats


def _real_dtype(dtype: Any) -> jnp.dtype:
    """float64 for float64/complex128 leaves, float32 for every other one."""
    return jnp.dtype(jnp.float64 if jnp.finfo(dtype).bits == 64 else jnp.float32)


def _working_dtype(x: jax.Array, r: jax.Array) -> jnp.dtype:
    """The precision a leaf is clipped and its EMA updated in: that of the leaf's real
    dtype and of its ``rms``, whichever is wider (at least float32)."""
    return jnp.promote_types(_real_dtype(x.dtype), r.dtype)


def _init_rms(x: Any) -> jax.Array:
    dtype = jnp.result_type(x)
    real = _real_dtype(dtype) if jnp.issubdtype(dtype, jnp.inexact) else jnp.dtype(jnp.float32)
    if isinstance(x, jax.Array):
        # Like the parameter: its sharding, and inside shard_map its varying axes
        # (a scan carry must keep its type).
        return jnp.zeros_like(x, dtype=real)
    return jnp.zeros(jnp.shape(x), real)  # a buffer per leaf either way


def _ema_rms(r: jax.Array, c: jax.Array, beta: jax.Array, rest: jax.Array) -> jax.Array:
    """``sqrt(beta * r**2 + rest * |c|**2)`` (``rest = 1 - beta``), finite and exact for
    every finite c.

    Computed scaled by ``s = max(r, |c|)``, so that no square overflows (|c| above
    ~1.8e19 in float32) or flushes to zero (below ~1e-19). The result does not depend
    on ``s``: it is held out of the derivative, which is then finite everywhere.
    """
    a = jnp.abs(c)
    s = jax.lax.stop_gradient(jnp.maximum(r, a))
    s = jnp.where(s > 0, s, 1)
    if jnp.iscomplexobj(c):
        c_sq = jnp.square(c.real / s) + jnp.square(c.imag / s)
    else:
        c_sq = jnp.square(c / s)
    return s * safe_sqrt(beta * jnp.square(r / s) + rest * c_sq)


def _clip_coordinates(
    x: jax.Array, r: jax.Array, active: jax.Array, hyper: Callable[[Any], tuple]
) -> tuple[jax.Array, jax.Array]:
    """``(clipped x, where a coordinate was clipped)`` for one leaf, the clipped values
    in the leaf's working precision (that of x and its ``rms``, at least float32).

    ``active`` is the scalar "this step may clip": past the warm-up, threshold
    positive. ``hyper(dtype)`` gives ``(sqrt(threshold), beta, 1 - beta)`` in the
    working precision. A coordinate whose ``rms`` is 0 has no scale to be judged
    against and passes (its first non-zero gradient enters ``rms``).
    """
    work = _working_dtype(x, r)
    xc = x.astype(jnp.promote_types(x.dtype, work))
    rc = r.astype(work)
    root_threshold, _, _ = hyper(work)
    has_scale = rc > 0
    # Where rms is 0, or the threshold inf, no bound: inf * 0 would make a NaN.
    bound = jnp.where(has_scale, root_threshold * rc, jnp.inf)
    over = active & (jnp.abs(xc) > bound)
    safe_bound = jnp.where(over, bound, 0)  # finite in the branch not taken (gradients)
    if jnp.iscomplexobj(xc):
        z = jnp.where(over, xc, 1)
        return jnp.where(over, z * (safe_bound / jnp.abs(z)), xc), over
    return jnp.where(over, jnp.sign(xc) * safe_bound, xc), over


def _new_rms(clipped: jax.Array, r: jax.Array, hyper: Callable[[Any], tuple]) -> jax.Array:
    """The coordinates' ``rms`` after this step's (working-precision) clipped values."""
    work = _working_dtype(clipped, r)
    _, beta, rest = hyper(work)
    return _ema_rms(r.astype(work), clipped, beta, rest).astype(r.dtype)


_ClipLeaf = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]  # (x, rms)
_Measured = tuple[list[jax.Array], jax.Array, jax.Array, jax.Array]


def _measure_first(
    leaves: list[jax.Array],
    rms: list[jax.Array],
    clip_leaf: _ClipLeaf,
    *,
    axis_name: AxisName,
    flags: list[bool],
) -> _Measured:
    """``(updates out, norm, clipped norm, clipped count)``, the updates out being the
    clipped ones where the step is finite and the updates as they came where it is not:
    the layout XLA:CPU runs best. One read of each leaf and its rms measures both trees
    (:func:`map_and_measure`); the clipped leaf (and the new rms) are written in a second,
    once the step is known to be finite.
    """
    clipped, norm, clipped_norm, n_clipped = map_and_measure(
        leaves, clip_leaf, axis_name=axis_name, flags=flags, aligned=(rms,)
    )
    finite = jnp.isfinite(norm)
    out = [jnp.where(finite, c, x) for c, x in zip(clipped, leaves, strict=True)]
    return out, norm, clipped_norm, n_clipped


def _norm_first(
    leaves: list[jax.Array],
    rms: list[jax.Array],
    clip_leaf: _ClipLeaf,
    *,
    axis_name: AxisName,
    flags: list[bool],
) -> _Measured:
    """What :func:`_measure_first` returns, in the layout the TPU and CUDA compilers run
    best: the global norm first, in a read of the updates alone (the norm engine's);
    then one read of each leaf and its rms writes the clipped leaf (and the new rms) and
    measures the clipped values at three scales, with no rescue branch
    (:func:`map_and_measure_mapped`: the branch, which clipped every leaf again, was
    half the step's TPU compile time).

    On the TPU compiler (chain with adamw, 10 leaves of 2M, one chip) the measuring
    first read of :func:`_measure_first` reads every rms twice: its step moves 1.11x
    the HBM bytes of this one, which are ``optax.clip``'s plus the rms read and
    written. On XLA:CPU this layout took 1.1x the step time and 1.2x the compile time
    (100 leaves of 200,000). Counting the NaN/inf elements first instead of the norm
    (no rescue there; the norm measured in the second read) made the second read's
    rescue keep a copy of every rms: 79 MiB of TPU temp memory against 14.

    On the CUDA compiler (H100, adamw, 2026-12-04) this layout moves 763.8 MiB of HBM
    traffic at 10 leaves of 2M where :func:`_measure_first` moves 992.6 (sgd: 458.7
    against 687.4), and 764.5 against 1145.2 at 100 leaves (with the EMA reading the
    returned leaf, see ``update_fn``), where the other kept a gradient-sized temp buffer
    (0.2 MiB of temp memory against 76.5; under FSDP 0.09 against 19.2 at 10 leaves).
    """
    _, norm = leaf_and_global_norms(leaves, axis_name=axis_name, flags=flags, leaf_norms=False)
    finite = jnp.isfinite(norm)

    def clip_if_finite(x: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array]:
        clipped, over = clip_leaf(x, r)
        return jnp.where(finite, clipped, x), over & finite

    out, clipped_norm, n_clipped = map_and_measure_mapped(
        leaves, clip_if_finite, after=norm, axis_name=axis_name, flags=flags, aligned=(rms,)
    )
    return out, norm, clipped_norm, n_clipped


def _check_warmup(value: Any) -> None:
    """A non-negative integer (an int or an integer array); traced values pass."""
    if isinstance(value, jax.core.Tracer):
        return
    arr = np.asarray(value) if is_concrete(value) else None
    if isinstance(value, (bool, np.bool_)) or arr is None or arr.dtype.kind not in "iu":
        raise TypeError(f"warmup_steps must be an integer, got {value!r}.")
    if arr.ndim != 0:
        raise ValueError(f"warmup_steps must be a scalar, got an array of shape {arr.shape}.")
    if int(arr) < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {value!r}.")


def _hyperparameters(
    threshold: Any, beta: Any, count: jax.Array, dtype: Any
) -> tuple[jax.Array, Any, Callable[[Any], tuple]]:
    """The threshold in force, in ``dtype`` (the widest working dtype of the leaves:
    under x64 an injected 1e-40 or 1e39 reaches a float64 leaf as it is), whether it is
    above 0, and a function giving ``(sqrt(threshold), beta, 1 - beta)`` in a leaf's
    working dtype.

    Constants are rounded once, from their exact values, to each working dtype (a
    float64 leaf gets float64 ones), and ``1 - beta`` too: ``1 - float32(0.999)`` is
    1.3e-5 off 0.001, an error that would scale ``v`` for good. A schedule's or an
    injected threshold is cast to ``dtype``, an injected ``beta`` to float32 (both
    checked at run time: a traced ``beta`` outside (0, 1) raises, naming the step).
    """
    t = threshold_at(threshold, count, "threshold", dtype)
    exact_t = float(np.asarray(threshold)) if is_concrete(threshold) else None
    # From the exact value: 1e-46 is 0 in float32, but its root 1e-23 is not.
    positive = t > 0 if exact_t is None else exact_t > 0
    if is_concrete(beta):
        exact_b = float(np.asarray(beta))
        b = rest = None
    else:
        exact_b = None
        b = _checked_beta(beta, count)
        rest = 1 - b

    def in_dtype(dtype: Any) -> tuple:
        root = jnp.sqrt(t.astype(dtype)) if exact_t is None else as_threshold(exact_t**0.5, dtype)
        if exact_b is None:
            return root, b.astype(dtype), rest.astype(dtype)
        return root, jnp.asarray(exact_b, dtype), jnp.asarray(1.0 - exact_b, dtype)

    return t, positive, in_dtype


def _checked_beta(beta: Any, count: jax.Array) -> jax.Array:
    """A traced ``beta`` as float32; outside (0, 1) it raises at run time."""
    b = jnp.asarray(beta, jnp.float32)

    def make(step: Any, value: Any) -> Exception:
        return ValueError(
            f"beta is {float(value)} at step {int(step)} (count from 1): it must lie in "
            "(0, 1). Check the value injected with optax.inject_hyperparams."
        )

    raise_at_runtime_if(~((b > 0) & (b < 1)), make, count + 1, b)
    return b


def spike_aware_clip(
    threshold: Any = 5000.0,
    *,
    beta: Any = 0.999,
    warmup_steps: Any = 19,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    sharded: Sharded = None,
) -> optax.GradientTransformationExtraArgs:
    """Clips each coordinate whose square exceeds ``threshold`` times its EMA (SPAM).

    Spike-aware clipping from SPAM (Huang et al. 2025). Per coordinate, with ``v`` an
    EMA of the squared gradient (decay ``beta``) kept in this transform's state: where
    ``g**2 > threshold * v``, ``g`` becomes ``sign(g) * sqrt(threshold * v)``; every
    other coordinate passes unchanged. A spike in a few coordinates is cut back to a
    multiple of their own typical size, which a global-norm clip, diluted over millions
    of coordinates, hardly notices. ``v`` starts at zero and, as in the reference
    implementation, is compared before this step's update, without bias correction,
    and then takes in the *clipped* gradient: ``v <- beta * v + (1 - beta) * g_clipped**2``.
    The first ``warmup_steps`` steps only feed ``v``. With the defaults (those of the
    paper), ``v`` after 19 steps is about 2% of the mean ``g**2``, so the clip then bites
    at ~10 times a coordinate's RMS, and at ``sqrt(5000)`` ~ 71 times it once ``v`` has
    settled (after a few thousand steps).

    Differences from the reference (``TianjinYellow/SPAM-Optimizer``, ``SPAM.py``),
    where the clip lives inside its Adam step:

    - ``v`` is this transform's own buffer (one float per parameter); the reference
      reuses Adam's ``exp_avg_sq``. Chained before ``optax.adam(b2=beta)``, the two
      hold the same values; the memory is paid twice.
    - SPAM's momentum reset every ``DeltaT`` steps, and the learning-rate warm-up after
      it, belong to the optimizer and are not part of this transform: ``v`` is never
      reset. The reference clips from step 20 (its ``grad_accu_steps=20``, counted from
      1, hence ``warmup_steps=19``) and, after each reset, again from 20 steps later.
    - ``threshold=0`` turns the clip off, as in the reference (``if self.thres != 0``).
    - A coordinate whose ``v`` is exactly 0 (its gradient was 0 on every step so far:
      a gate or a zero-initialised branch that has not opened yet) is not clipped. The
      reference compares it with ``threshold * 0`` and zeroes its first non-zero
      gradient, which keeps ``v`` at 0, so that coordinate never trains again.
    - A step with a NaN/inf gradient anywhere is handled by ``nonfinite`` and leaves
      ``v`` and the warm-up count as they were; the reference clips an inf coordinate
      to the bound and lets a NaN into ``v`` (and Adam's state) for good.
    - Arithmetic is float32 (float64 for float64 leaves) whatever the leaf dtype, and
      ``v`` is kept as ``sqrt(v)`` (see :class:`SpikeAwareClipState`); the reference
      keeps ``v`` in the parameters' dtype (bfloat16 in its LLaMA runs), and the
      comparison is made as ``|g| > sqrt(threshold) * sqrt(v)``.
    - Complex leaves: ``|g|**2`` enters ``v`` and a clipped coordinate keeps its phase.

    Statistics (:class:`ClipStats`): ``norm`` and ``clipped_norm`` are the global L2
    norms of the updates received and returned; ``threshold`` is the ratio
    ``threshold`` in force (not a norm: the bound differs per coordinate); ``clipped``
    is whether any coordinate was clipped this step, so ``clip_count`` counts steps
    with at least one clipped coordinate. The state's ``clipped_fraction`` holds the
    fraction of coordinates clipped this step.

    Args:
      threshold: the ratio ``g**2 / v`` above which a coordinate is clipped: a
        non-negative scalar or an ``optax.Schedule`` evaluated at this transform's
        step count. 0 turns the clip off (as in the reference); inf too.
      beta: the EMA decay of ``v``, in (0, 1) (the reference uses Adam's ``beta2``).
      warmup_steps: the number of finite steps that only feed ``v`` before the clip
        starts (a non-negative int; 19 reproduces the reference's first clip at step
        20). It may be a traced hyperparameter.
      nonfinite: when the gradient holds a NaN or inf: ``"propagate"`` returns the
        updates unchanged, ``"zero"`` returns zeros, ``"error"`` raises from inside
        ``jit`` naming the step. Either way ``v`` is left as it was and the step is
        counted in ``nonfinite_count``.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis over which the
        statistics (norms, clipped coordinates, the NaN/inf decision) are combined.
        The clip itself is per coordinate and needs no communication.
      sharded: which leaves are sharded along ``axis_name``; default all.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`SpikeAwareClipState`. Its ``init`` needs the parameters (or anything of
      their shapes), as Adam's does.

    References:
      Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
      Training <https://arxiv.org/abs/2501.06842>`_, 2025; reference implementation
      https://github.com/TianjinYellow/SPAM-Optimizer.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tx = optaxclip.spike_aware_clip(threshold=4.0, beta=0.5, warmup_steps=1)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for g in [[1.0, -1.0], [1.0, -1.0], [1.0, -30.0]]:
      ...     out, state = tx.update({"w": jnp.array(g)}, state)
      ...     print(out["w"], float(state.clipped_fraction))
      [ 1. -1.] 0.0
      [ 1. -1.] 0.0
      [ 1.        -1.7320508] 0.5
    """
    check_threshold("threshold", threshold)
    check_range("beta", beta, 0.0, 1.0, low_open=True, high_open=True)
    _check_warmup(warmup_steps)
    check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)

    def init_fn(params):
        return SpikeAwareClipState(
            rms=jax.tree.map(_init_rms, params),
            recorded=jnp.zeros((), jnp.int32),
            clipped_fraction=jnp.zeros((), jnp.float32),
            stats=_stats.init_stats(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        check_float_leaves(updates)
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        rms_leaves, rms_def = jax.tree_util.tree_flatten(state.rms)
        if rms_def != treedef:
            raise ValueError(
                "spike_aware_clip keeps one value per coordinate, so its state must be "
                f"built from a tree shaped like the updates: the updates are {treedef}, "
                f"the state was built for {rms_def}. Call tx.init(params) with the "
                "parameters being trained."
            )
        flags = sharded_flags(updates, sharded)
        count = state.stats.count
        t, positive, hyper = _hyperparameters(
            threshold, beta, count, accumulation_dtype([*leaves, *rms_leaves])
        )
        may_clip = (state.recorded >= warmup_steps) & positive

        def clip_leaf(x: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array]:
            # Measured as returned (a bf16 leaf's clipped norm is that of bf16 values).
            clipped, over = _clip_coordinates(x, r, may_clip, hyper)
            return clipped.astype(x.dtype), over

        # Whether the step is finite is known only once the leaves are summed; a NaN/inf
        # step returns the updates as they came (for the policy) and leaves rms and the
        # warm-up count as they were.
        platform = target_platform(leaves)
        layout = _norm_first if platform in ("tpu", *GPU_PLATFORMS) else _measure_first
        out, norm, clipped_norm, n_clipped = layout(
            leaves, rms_leaves, clip_leaf, axis_name=axis_name, flags=flags
        )
        finite = jnp.isfinite(norm)
        # The EMA takes the working-precision clipped values: the operations of
        # clip_leaf again, which XLA computes once. On GPU, a leaf kept in its working
        # precision (float32, float64) is returned as those very values on a finite
        # step, and the EMA reads the returned leaf instead: XLA:GPU then clips in the
        # update's kernel at every leaf size (given the clip again, at 100 leaves of
        # 200,000 it wrote each clipped leaf out and read it back: 1069.6 MiB of HBM
        # traffic against 764.5, chain with adamw). The TPU compiler reads the gradient
        # once more that way (770.6 MiB against 694.3 at 10 leaves), so it is GPU's only.
        def ema_input(x: jax.Array, r: jax.Array, returned: jax.Array) -> jax.Array:
            if platform in GPU_PLATFORMS and returned.dtype == _working_dtype(x, r):
                return returned
            return _clip_coordinates(x, r, may_clip, hyper)[0]

        new_rms = [
            jnp.where(finite, _new_rms(ema_input(x, r, o), r, hyper), r)
            for x, r, o in zip(leaves, rms_leaves, out, strict=True)
        ]
        n_clipped = jnp.where(finite, n_clipped, 0).astype(jnp.float32)
        clipped_norm = jnp.where(finite, clipped_norm, norm)
        sizes = [float(x.size) for x in leaves]
        if axis_name is not None and leaves:
            devices = jax.lax.psum(1, axis_name)
            sizes = [n * devices if flag else n for n, flag in zip(sizes, flags, strict=True)]
        fraction = n_clipped / jnp.maximum(sum(sizes), 1.0).astype(jnp.float32)

        out, clipped_norm, clipped = apply_nonfinite_policy(
            out,
            finite,
            clipped_norm,
            n_clipped > 0,
            nonfinite=nonfinite,
            who="spike_aware_clip",
            step=count + 1,
            norm=norm,
        )
        new_stats = _stats.record(
            state.stats, norm=norm, clipped_norm=clipped_norm, threshold=t, clipped=clipped
        )
        new_state = SpikeAwareClipState(
            rms=jax.tree_util.tree_unflatten(rms_def, new_rms),
            recorded=state.recorded + finite.astype(jnp.int32),
            clipped_fraction=jnp.asarray(fraction, jnp.float32),
            stats=new_stats,
        )
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
