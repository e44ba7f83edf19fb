"""Wrappers that skip a bad step altogether: zero updates and the wrapped optimizer's
state left exactly as it was (a clip would still advance momentum and step counts)."""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _stats
from optaxclip._mechanics import masked_mean_std, measure, ring_write
from optaxclip._norm_engine import target_platform
from optaxclip._norms import AxisName, Sharded
from optaxclip._stats import ClipStats, as_float32
from optaxclip._validation import (
    check_range,
    check_static_bool,
    check_static_int,
    positive_at,
    raise_at_runtime_if,
)

__all__ = ["SkipNonfiniteState", "SkipSpikesState", "skip_nonfinite", "skip_spikes"]

_STD_FLOOR = 1e-6


def _step_or_skip(
    skip: jax.Array,
    inner: optax.GradientTransformationExtraArgs,
    updates: Any,
    inner_state: Any,
    params: Any,
    extra_args: dict[str, Any],
) -> tuple[Any, Any]:
    """``inner.update``'s result, or zeros and the untouched state where ``skip``.

    The inner update is computed on every step and a skipped one selects the old state
    and zero updates (a select returns the old state bit for bit, whatever the inner
    update made of a NaN). A ``lax.cond`` would not compute the inner update on a
    skipped step, but it walls the update off from the code around it: XLA could no
    longer fuse the optimizer's arithmetic with the parameter update that follows,
    which cost a write and a read of the updates (~10% of an AdamW step) on every
    step to save work on the rare skipped one.
    """
    out_updates, out_state = inner.update(updates, inner_state, params, **extra_args)

    def zero(u: jax.Array) -> jax.Array:
        return jnp.where(skip, jnp.zeros((), u.dtype), u)

    def keep(old: Any, new: Any) -> Any:
        # Same dtype in and out for any type-stable inner state, so the cast is a no-op
        # that only settles weak types; it never changes a value.
        return jnp.where(skip, jnp.asarray(old, jnp.result_type(new)), new)

    return jax.tree.map(zero, out_updates), jax.tree.map(keep, inner_state, out_state)


def _measure_apart(updates: Any, axis_name: AxisName, sharded: Sharded) -> jax.Array:
    """The global norm of ``updates``, with squares of its own.

    The inner optimizer sees these very updates, and AdamW squares them too: XLA would
    compute the squares once for both and write them out in full (an extra write and
    read of the gradient, ~15% of an AdamW step). The barriers are free (no copy) and
    keep the norm's squares inside its own reductions; there is one per leaf so that
    under ``shard_map`` each leaf keeps its own device-variance.
    """
    if target_platform(jax.tree_util.tree_leaves(updates)) != "cpu":
        # The TPU compiler keeps the norm's squares in its own reductions without them;
        # there the barriers cost 7% of the step's bytes (adamw, 10 leaves of 2M).
        return measure(updates, axis_name, sharded)
    apart = jax.tree.map(jax.lax.optimization_barrier, updates)
    return measure(apart, axis_name, sharded)


def _check_inner(who: str, inner: Any) -> None:
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(
            f"{who} wraps an optimizer: its first argument must be an "
            f"optax.GradientTransformation (such as optax.adamw(1e-3)), got {inner!r}."
        )


def _count_consecutive(
    who: str,
    skip: jax.Array,
    consecutive_skips: jax.Array,
    step: jax.Array,
    max_consecutive_skips: int | None,
) -> jax.Array:
    """The run of skipped steps ending at this one (0 when this step is taken).

    Raises at run time when it exceeds ``max_consecutive_skips``: a run that skips every
    step trains nothing, and without the check it would do so silently.
    """
    run = jnp.where(skip, consecutive_skips + 1, 0).astype(jnp.int32)
    if max_consecutive_skips is not None:
        raise_at_runtime_if(
            run > max_consecutive_skips, _stalled_error(who, max_consecutive_skips), step, run
        )
    return run


def _stalled_error(who: str, limit: int):
    def make(step: Any, run: Any) -> Exception:
        return FloatingPointError(
            f"optaxclip.{who}: step {int(step)} (count from 1) makes {int(run)} skipped "
            f"steps in a row, more than max_consecutive_skips={limit}: training has "
            "stalled. Look for the cause (NaN/inf gradients from a learning rate, loss "
            "scale or batch gone bad; a spike threshold too tight for this run), or raise "
            "max_consecutive_skips."
        )

    return make


class SkipNonfiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`.

    Attributes:
      inner_state: the wrapped optimizer's state.
      stats: the skip statistics (``clipped`` marks a skipped step).
      consecutive_skips: how many steps in a row, ending with the last one, were
        skipped (int32; 0 after a step that was taken).
    """

    inner_state: Any
    stats: ClipStats
    consecutive_skips: jax.Array


def skip_nonfinite(
    inner: optax.GradientTransformation,
    *,
    max_consecutive_skips: int | None = None,
    axis_name: AxisName = None,
    sharded: Sharded = None,
) -> optax.GradientTransformationExtraArgs:
    """Skips steps whose gradient contains NaN or inf, leaving ``inner`` untouched.

    When the global norm of the incoming updates is NaN or inf, the step emits zero
    updates and ``inner``'s state is returned exactly as it was (bit for bit: no step
    count, momentum or second moment advances), so training continues as if the bad
    batch had never been seen. Otherwise ``inner.update`` runs as usual, with ``params``
    and any extra arguments passed through. The decision is a select on a scalar that
    XLA fuses into the optimizer's own kernels, so the wrapper costs no extra pass over
    the parameters (a skipped step computes the inner update and discards it, so an
    inner clip with ``nonfinite="error"`` still raises on a step this wrapper skips:
    inside it, leave the clip's ``nonfinite`` at ``"propagate"``).

    With the optimizer state donated (``jax.jit(step, donate_argnums=...)``) XLA copies
    ``inner``'s state on every step: the old state must outlive the kernels that
    compute the new one, which would otherwise overwrite it in place. That costs a
    read and a write of the state and a temporary of its size (the benchmarks' "Donated
    parameters and state" table measures it; ``optax.apply_if_finite`` pays the same).
    Where that matters, do not donate the optimizer state, or skip in the training
    step itself: a ``lax.cond`` around both ``tx.update`` and ``optax.apply_updates``
    is compiled with no copy.

    Statistics: ``clipped`` is True on a skipped step and ``clip_count`` counts skips
    (equal to ``nonfinite_count`` here); ``norm`` is the incoming global norm;
    ``clipped_norm`` is the norm of what was let through to ``inner`` (``norm``, or 0
    on a skipped step), not of ``inner``'s output, which would cost another pass;
    ``threshold`` is ``inf`` (every finite norm passes). ``state.consecutive_skips`` (and
    ``stats()``'s ``consecutive_skips``) counts the skipped steps in a row.

    Args:
      inner: the optimizer (or any gradient transformation) to protect.
      max_consecutive_skips: when set (a positive int), a step that makes the run of
        consecutive skips longer than this raises from inside ``jit``, naming the step
        and the count: training that skips every step is a failure to surface, not to
        train through. None (the default) never raises.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis over which the norm is
        summed, so every device takes the same decision.
      sharded: which leaves are sharded along ``axis_name``; default all.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`SkipNonfiniteState` ``(inner_state, stats)``.

    References:
      Micikevicius et al., `Mixed Precision Training
      <https://arxiv.org/abs/1710.03740>`_, 2018 (skipping steps whose gradients
      overflowed, as dynamic loss scaling does).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optaxclip
      >>> tx = optaxclip.skip_nonfinite(optax.adam(0.1))
      >>> params = {"w": jnp.array([1.0, 2.0])}
      >>> state = tx.init(params)
      >>> u, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state, params)
      >>> print(u["w"], int(state.inner_state[0].count), int(state.stats.clip_count))
      [0. 0.] 0 1
      >>> u, state = tx.update({"w": jnp.array([1.0, 1.0])}, state, params)
      >>> print(u["w"], int(state.inner_state[0].count))
      [-0.1 -0.1] 1
    """
    _check_inner("skip_nonfinite", inner)
    check_static_int(
        "skip_nonfinite",
        "max_consecutive_skips",
        max_consecutive_skips,
        ("max_consecutive_skips",),
        allow_none=True,
    )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipNonfiniteState(
            inner_state=inner.init(params),
            stats=_stats.init_stats(),
            consecutive_skips=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        norm = _measure_apart(updates, axis_name, sharded)
        skip = ~jnp.isfinite(norm)
        out, inner_state = _step_or_skip(
            skip, inner, updates, state.inner_state, params, extra_args
        )
        new_stats = _stats.record(
            state.stats,
            norm=norm,
            clipped_norm=jnp.where(skip, 0, norm),
            threshold=jnp.inf,
            clipped=skip,
        )
        consecutive = _count_consecutive(
            "skip_nonfinite", skip, state.consecutive_skips, new_stats.count, max_consecutive_skips
        )
        return out, SkipNonfiniteState(
            inner_state=inner_state, stats=new_stats, consecutive_skips=consecutive
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _counted(skipped_history: jax.Array, size: jax.Array, count_skipped: bool) -> jax.Array:
    """Which entries of the history the spike statistics are taken over.

    All valid entries with ``count_skipped`` (the references' rule). Otherwise the
    entries of steps that were taken, so that a skipped spike cannot raise the threshold
    and let the next spike of a cluster through; but when skipped entries make up more
    than half the window the level has shifted, and all entries count, so that the new
    level becomes the baseline within ``window`` steps instead of being skipped forever.
    """
    valid = jnp.arange(skipped_history.shape[0]) < size
    if count_skipped:
        return valid
    skipped = valid & skipped_history
    shifted = 2 * jnp.sum(skipped) > jnp.sum(valid)
    return jnp.where(shifted, valid, valid & ~skipped_history)


def _spike_threshold(
    history: jax.Array, counted: jax.Array, size: jax.Array, num_sigmas: Any, min_history: int
) -> jax.Array:
    """mean + num_sigmas * max(std, 1e-6) of the ``counted`` entries, inf if too few.

    Too few: fewer than ``min_history`` entries in the history (counted or not).
    """
    mean, std = masked_mean_std(history, counted)
    std = jnp.maximum(std, _STD_FLOOR)
    threshold = mean + jnp.asarray(num_sigmas, jnp.float32) * std
    return jnp.where(size >= min_history, threshold, jnp.inf).astype(jnp.float32)


class SkipSpikesState(NamedTuple):
    """State of :func:`skip_spikes`.

    Attributes:
      inner_state: the wrapped optimizer's state.
      stats: the skip statistics (``threshold`` is the norm threshold).
      norm_history: ring buffer of the last ``window`` finite global norms (float32).
      loss_history: ring buffer of the matching losses (float32; a single unused slot
        unless ``use_loss=True``).
      loss_threshold: the loss threshold in force this step (inf before
        ``min_history`` entries, and always inf without ``use_loss``).
      skipped_history: which entries of the buffers come from skipped steps (bool).
      size: how many entries of the buffers are filled (at most ``window``).
      head: where the next entry goes.
      consecutive_skips: how many steps in a row, ending with the last one, were
        skipped (int32; 0 after a step that was taken).
    """

    inner_state: Any
    stats: ClipStats
    norm_history: jax.Array
    loss_history: jax.Array
    loss_threshold: jax.Array
    skipped_history: jax.Array
    size: jax.Array
    head: jax.Array
    consecutive_skips: jax.Array


def skip_spikes(
    inner: optax.GradientTransformation,
    *,
    window: int = 128,
    num_sigmas: Any = 6.0,
    min_history: int = 64,
    use_loss: bool = False,
    count_skipped: bool = False,
    max_consecutive_skips: int | None = None,
    axis_name: AxisName = None,
    sharded: Sharded = None,
) -> optax.GradientTransformationExtraArgs:
    """Skips steps whose gradient norm (or loss) spikes far above its recent history.

    Keeps the last ``window`` finite global norms in a ring buffer, each marked with
    whether its step was skipped. Once ``min_history`` entries exist, a step with norm
    ``g > mean(h) + num_sigmas * max(std(h), 1e-6)`` (population std) is skipped: zero
    updates and ``inner``'s state left exactly as it was. A NaN/inf norm is always
    skipped and is not appended.

    ``h`` is the entries of the steps that were taken: bad batches come in clusters,
    and a skipped 10x spike that entered the statistics would raise the threshold so
    far that a 5x spike a few steps later went through. When skipped entries make up
    more than half the window, the level has shifted rather than spiked: then ``h`` is
    every entry, so a lasting change of scale becomes the new baseline within
    ``window`` steps instead of freezing training. The rule suits thresholds ordinary
    steps rarely cross (``num_sigmas`` of 3 or more): at 1 or 2 sigmas leaving skipped
    values out narrows the statistics and skips far more than the tail; use
    ``count_skipped=True`` there. ``count_skipped=True`` makes ``h`` every entry always, the rule of
    OLMo-core, levanter and MaxText (they also use the sample std with no floor).

    With ``use_loss=True`` the ``loss=`` extra argument of ``update`` is watched too,
    with its own buffer and the same rule: a step is skipped when its norm **or** its
    loss spikes (either signals a bad batch, and the norm check is free). A NaN/inf
    loss is skipped as well, and a step with a non-finite norm or loss appends to
    neither buffer (they stay in step). Under ``shard_map`` pass a loss that is
    already averaged over devices, so every device takes the same decision.

    Its cost is that of :func:`skip_nonfinite` (including the copy of ``inner``'s state
    when that state is donated).

    Statistics: ``clipped`` is True on a skipped step and ``clip_count`` counts skips;
    ``threshold`` is the norm threshold in force (inf before ``min_history`` entries);
    the loss threshold is ``state.loss_threshold``; ``clipped_norm`` is the norm let
    through to ``inner`` (0 on a skipped step); ``nonfinite_count`` counts non-finite
    gradient norms only.

    Args:
      inner: the optimizer (or any gradient transformation) to protect.
      window: how many recent values the mean and std are taken over (a positive
        Python int).
      num_sigmas: how many standard deviations above the mean count as a spike
        (positive; a scalar, so it can be injected with ``optax.inject_hyperparams``).
      min_history: how many values must be buffered before spikes are detected
        (a Python int in ``[1, window]``); before that only NaN/inf steps are skipped.
      use_loss: also watch the ``loss`` passed as ``tx.update(..., loss=loss)``.
      count_skipped: let the values of skipped steps into the statistics at once (the
        references' rule) instead of only once they outnumber the taken ones.
      max_consecutive_skips: when set (a positive int), a step that makes the run of
        consecutive skips longer than this raises from inside ``jit``, naming the step
        and the count (see :func:`skip_nonfinite`). None never raises.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis over which the norm is
        summed, so every device takes the same decision.
      sharded: which leaves are sharded along ``axis_name``; default all.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`SkipSpikesState`.

    References:
      Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
      <https://arxiv.org/abs/2204.02311>`_, 2022 (skipping batches around loss
      spikes); Molybog et al., `A Theory on Adam Instability in Large-Scale Machine
      Learning <https://arxiv.org/abs/2304.09871>`_, 2023 (skipping on gradient-norm
      spikes).

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optaxclip
      >>> tx = optaxclip.skip_spikes(optax.sgd(1.0), window=4, min_history=4, num_sigmas=3.0)
      >>> params = {"w": jnp.zeros(1)}
      >>> state, update = tx.init(params), jax.jit(tx.update)
      >>> for g in [1.0, 1.1, 0.9, 1.0, 50.0, 1.05, 20.0]:
      ...     u, state = update({"w": jnp.array([g])}, state, params)
      ...     print(g, bool(state.stats.clipped), round(float(state.stats.threshold), 3))
      1.0 False inf
      1.1 False inf
      0.9 False inf
      1.0 False inf
      50.0 True 1.212
      1.05 False 1.245
      20.0 True 1.17
    """
    static = ("window", "min_history", "max_consecutive_skips")
    check_static_int("skip_spikes", "window", window, static)
    check_static_int("skip_spikes", "min_history", min_history, static)
    check_static_int(
        "skip_spikes", "max_consecutive_skips", max_consecutive_skips, static, allow_none=True
    )
    if min_history > window:
        raise ValueError(
            f"min_history must lie in [1, window], got min_history={min_history} with "
            f"window={window}; lower min_history or raise window."
        )
    check_range("num_sigmas", num_sigmas, 0.0, math.inf, low_open=True)
    use_loss = check_static_bool("skip_spikes", "use_loss", use_loss, static)
    count_skipped = check_static_bool("skip_spikes", "count_skipped", count_skipped, static)
    _check_inner("skip_spikes", inner)
    inner = optax.with_extra_args_support(inner)
    # One unused slot rather than none without use_loss: Orbax refuses to save
    # zero-size arrays, and the state must checkpoint.
    loss_len = window if use_loss else 1

    def init_fn(params):
        return SkipSpikesState(
            inner_state=inner.init(params),
            stats=_stats.init_stats(),
            norm_history=jnp.zeros((window,), jnp.float32),
            loss_history=jnp.zeros((loss_len,), jnp.float32),
            loss_threshold=jnp.asarray(jnp.inf, jnp.float32),
            skipped_history=jnp.zeros((window,), jnp.bool_),
            size=jnp.zeros((), jnp.int32),
            head=jnp.zeros((), jnp.int32),
            consecutive_skips=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if not use_loss and extra_args.get("loss") is not None:
            # Not an error: optax.chain hands every extra argument to every transform.
            warnings.warn(
                "skip_spikes was handed loss= but watches only the gradient norm; build it "
                "with use_loss=True to skip loss spikes too.",
                UserWarning,
                stacklevel=2,
            )
        if use_loss:
            if extra_args.get("loss") is None:
                raise ValueError(
                    "skip_spikes(use_loss=True) needs the loss: call "
                    "tx.update(updates, state, params, loss=loss)."
                )
            loss = jnp.asarray(extra_args["loss"])
            if loss.ndim != 0:
                raise ValueError(
                    f"skip_spikes: loss must be a scalar, got an array of shape {loss.shape}."
                )
            loss = loss.astype(jnp.float32)
        norm = _measure_apart(updates, axis_name, sharded)
        value = as_float32(norm)
        counted = _counted(state.skipped_history, state.size, count_skipped)
        sigmas = positive_at("num_sigmas", num_sigmas, state.stats.count)
        norm_threshold = _spike_threshold(
            state.norm_history, counted, state.size, sigmas, min_history
        )
        finite = jnp.isfinite(value)
        spike = value > norm_threshold
        if use_loss:
            loss_threshold = _spike_threshold(
                state.loss_history, counted, state.size, sigmas, min_history
            )
            finite = finite & jnp.isfinite(loss)
            spike = spike | (loss > loss_threshold)
        else:
            loss_threshold = state.loss_threshold
        skip = ~finite | spike

        out, inner_state = _step_or_skip(
            skip, inner, updates, state.inner_state, params, extra_args
        )

        # Only finite values enter the history; spikes do (a lasting shift becomes the
        # new baseline).
        def append(buffer, x):
            return ring_write(buffer, state.head, x, finite)

        norm_history = append(state.norm_history, value)
        skipped_history = append(state.skipped_history, skip)
        loss_history = append(state.loss_history, loss) if use_loss else state.loss_history
        head = jnp.where(finite, (state.head + 1) % window, state.head).astype(jnp.int32)
        size = jnp.where(finite, jnp.minimum(state.size + 1, window), state.size)
        new_stats = _stats.record(
            state.stats,
            norm=norm,
            clipped_norm=jnp.where(skip, 0, norm),
            threshold=norm_threshold,
            clipped=skip,
        )
        return out, SkipSpikesState(
            inner_state=inner_state,
            stats=new_stats,
            norm_history=norm_history,
            loss_history=loss_history,
            loss_threshold=jnp.asarray(loss_threshold, jnp.float32),
            skipped_history=skipped_history,
            size=size.astype(jnp.int32),
            head=head,
            consecutive_skips=_count_consecutive(
                "skip_spikes", skip, state.consecutive_skips, new_stats.count, max_consecutive_skips
            ),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
