"""Thresholds are real scalars or schedules, checked when built and, where they can
change during a run (a schedule, a value injected with ``optax.inject_hyperparams``),
at run time: a negative or NaN threshold raises, naming the argument and the step. It
never flips the sign of an update or turns clipping off."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip

G = {"w": jnp.array([3.0, 4.0])}

# Every transform that takes a schedule: (name, factory, other arguments, threshold).
SCHEDULED = [
    ("clip_by_global_norm", optaxclip.clip_by_global_norm, {}, "max_norm"),
    ("clip_by_value", optaxclip.clip_by_value, {}, "max_delta"),
    ("clip_by_block_norm", optaxclip.clip_by_block_norm, {}, "max_norm"),
    ("clip_by_block_rms", optaxclip.clip_by_block_rms, {}, "threshold"),
    ("adaptive_grad_clip", optaxclip.adaptive_grad_clip, {}, "clipping"),
    ("autoclip", optaxclip.autoclip, {"percentile": 50.0}, "max_norm"),
    ("zclip", optaxclip.zclip, {"warmup_steps": 2}, "max_norm"),
    ("adagc", optaxclip.adagc, {"warmup_steps": 10}, "warmup_max_norm"),
]
IDS = [case[0] for case in SCHEDULED]


def _run(tx, steps):
    state, update = tx.init(G), jax.jit(tx.update)
    for _ in range(steps):
        out, state = update(G, state, G)
        jax.block_until_ready(out)
    return out


@pytest.mark.parametrize(("name", "factory", "kwargs", "arg"), SCHEDULED, ids=IDS)
def test_a_schedule_that_goes_negative_raises_naming_the_argument_and_the_step(
    name, factory, kwargs, arg
):
    # 1 - 0.5 c: 1, 0.5, 0, then -0.5 at step 4, which used to flip the update's sign.
    tx = factory(**kwargs, **{arg: lambda count: 1.0 - 0.5 * count})
    _run(tx, 3)
    with pytest.raises(Exception, match=rf"{arg} is -0.5 at step 4 \(count from 1\)"):
        _run(tx, 4)


@pytest.mark.parametrize(("name", "factory", "kwargs", "arg"), SCHEDULED, ids=IDS)
def test_a_nan_schedule_raises_instead_of_turning_clipping_off(name, factory, kwargs, arg):
    tx = factory(**kwargs, **{arg: lambda count: jnp.where(count < 1, 1.0, jnp.nan)})
    with pytest.raises(Exception, match=rf"{arg} is nan at step 2"):
        _run(tx, 2)


@pytest.mark.parametrize(("name", "factory", "kwargs", "arg"), SCHEDULED, ids=IDS)
def test_an_injected_negative_threshold_raises_under_jit(name, factory, kwargs, arg):
    static = {
        "adaptive_grad_clip": ("axis", "stacked_axes"),
        "autoclip": ("history", "warmup_steps"),
        "zclip": ("warmup_steps",),
        "adagc": ("warmup_steps",),
    }.get(name, ())
    tx = optax.inject_hyperparams(factory, static_args=static)(**kwargs, **{arg: 1.0})
    state = tx.init(G)
    state.hyperparams[arg] = jnp.asarray(-1.0, jnp.float32)
    with pytest.raises(Exception, match=rf"{arg} is -1.0 at step 1"):
        jax.block_until_ready(jax.jit(tx.update)(G, state, G))


@pytest.mark.parametrize("bad", [(1.0, 2.0), [1.0], "1.0", 1 + 2j, {"a": 1.0}, object()])
@pytest.mark.parametrize(("name", "factory", "kwargs", "arg"), SCHEDULED, ids=IDS)
def test_thresholds_that_are_not_real_scalars_are_rejected_when_built(
    name, factory, kwargs, arg, bad
):
    with pytest.raises(TypeError, match=rf"{arg} must be a non-negative real scalar"):
        factory(**kwargs, **{arg: bad})


@pytest.mark.parametrize(
    ("build", "arg"),
    [
        (lambda v: optaxclip.autoclip(percentile=v), "percentile"),
        (lambda v: optaxclip.zclip(alpha=v), "alpha"),
        (lambda v: optaxclip.zclip(z_thresh=v), "z_thresh"),
        (lambda v: optaxclip.adagc(ratio=v), "ratio"),
        (lambda v: optaxclip.skip_spikes(optax.sgd(1.0), num_sigmas=v), "num_sigmas"),
    ],
)
@pytest.mark.parametrize("bad", [None, [10.0], "10", 1 + 0j])
def test_other_numeric_arguments_must_be_real_scalars(build, arg, bad):
    with pytest.raises(TypeError, match=rf"{arg} must be a real scalar"):
        build(bad)


def test_a_valid_schedule_still_clips_at_its_value_each_step():
    tx = optaxclip.clip_by_global_norm(lambda count: 1.0 / (1.0 + count))
    state = tx.init(G)
    for want in (1.0, 0.5, 1.0 / 3.0):
        out, state = jax.jit(tx.update)(G, state)
        np.testing.assert_allclose(out["w"], np.array([0.6, 0.8]) * want, rtol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optaxclip.clip_by_global_norm(1.0, nonfinite="error"),
        lambda: optaxclip.zclip(warmup_steps=1, nonfinite="error"),
        lambda: optaxclip.adagc(warmup_steps=1, nonfinite="error"),
        lambda: optaxclip.autoclip(nonfinite="error"),
    ],
    ids=["clip_by_global_norm", "zclip", "adagc", "autoclip"],
)
def test_nonfinite_error_under_vmap_raises_only_for_a_bad_example(make):
    # Per-example clipping: under vmap the lax.cond guarding the error becomes a
    # select, and the error used to fire on finite gradients.
    tx = make()
    per_example = jnp.arange(12.0).reshape(4, 3) + 1.0
    state = tx.init(per_example[0])
    step = jax.jit(jax.vmap(lambda g: tx.update(g, state)[0]))
    out = jax.block_until_ready(step(per_example))
    assert np.all(np.isfinite(out))
    with pytest.raises(Exception, match="global norm is nan at step 1"):
        jax.block_until_ready(step(per_example.at[2, 1].set(jnp.nan)))


@pytest.mark.parametrize(
    ("factory", "kwargs", "static", "arg", "bad"),
    [
        (optaxclip.adagc, {"warmup_steps": 1}, ("warmup_steps",), "ratio", -1.0),
        (optaxclip.zclip, {"warmup_steps": 1}, ("warmup_steps",), "clip_factor", -1.0),
        (optaxclip.zclip, {"warmup_steps": 1}, ("warmup_steps",), "z_thresh", 0.0),
    ],
    ids=["adagc-ratio", "zclip-clip_factor", "zclip-z_thresh"],
)
def test_injected_multipliers_that_would_flip_or_disable_a_clip_raise(
    factory, kwargs, static, arg, bad
):
    # A negative AdaGC ratio or ZClip clip_factor turned [30, 40] into a negative update.
    tx = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    big = {"w": jnp.array([30.0, 40.0])}
    state = tx.init(big)
    _, state = jax.jit(tx.update)(G, state, G)  # the warm-up step
    state.hyperparams[arg] = jnp.asarray(bad, jnp.float32)
    with pytest.raises(Exception, match=rf"{arg} is {bad} at step 2"):
        jax.block_until_ready(jax.jit(tx.update)(big, state, big))


def test_an_injected_negative_num_sigmas_raises_instead_of_skipping_every_step():
    inject = optax.inject_hyperparams(
        optaxclip.skip_spikes, static_args=("window", "min_history", "max_consecutive_skips")
    )
    tx = inject(optax.sgd(1.0), window=4, min_history=1)
    state = tx.init(G)
    state.hyperparams["num_sigmas"] = jnp.asarray(-5.0, jnp.float32)
    with pytest.raises(Exception, match="num_sigmas is -5.0 at step 1"):
        jax.block_until_ready(jax.jit(tx.update)(G, state, G))
