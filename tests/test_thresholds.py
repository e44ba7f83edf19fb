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


# Under x64 a float64 tree is clipped in float64: a threshold outside float32's normal
# range, or one float32 rounds (0.1), is not rounded to float32 on its way to the norm.
# (transform at the threshold t, the float64 rule it applies to g with params w.)
def _norm64(x):
    big = np.max(np.abs(x))  # scaled first: the squares of 1e300 overflow float64
    return big * np.sqrt(np.sum((x / big) ** 2))


def _norm_clip(g, bound):
    n = _norm64(g)  # (g / n) * bound: the scale 3e-39 / 5e300 is below float64's range
    return g if n <= bound else (g / n) * bound


FLOAT64_RULES = [
    ("clip_by_global_norm", optaxclip.clip_by_global_norm, lambda g, w, t: _norm_clip(g, t)),
    ("clip_by_value", optaxclip.clip_by_value, lambda g, w, t: np.clip(g, -t, t)),
    ("clip_by_block_norm", optaxclip.clip_by_block_norm, lambda g, w, t: _norm_clip(g, t)),
    (
        "clip_by_block_rms",
        optaxclip.clip_by_block_rms,
        lambda g, w, t: _norm_clip(g, t * np.sqrt(g.size)),
    ),
    (
        "adaptive_grad_clip",
        optaxclip.adaptive_grad_clip,
        lambda g, w, t: _norm_clip(g, t * max(_norm64(w), 1e-3)),
    ),
    (  # the cap of the first step, whose percentile is its own norm; its history is
        # float32, where a norm beyond float32's range is held at float32's largest value
        "autoclip",
        lambda t: optaxclip.autoclip(50.0, max_norm=t),
        lambda g, w, t: _norm_clip(g, min(t, float(np.finfo(np.float32).max))),
    ),
    ("zclip", lambda t: optaxclip.zclip(max_norm=t), lambda g, w, t: _norm_clip(g, t)),
    ("adagc", lambda t: optaxclip.adagc(warmup_max_norm=t), lambda g, w, t: _norm_clip(g, t)),
]


@pytest.mark.parametrize(
    ("name", "factory", "rule"), FLOAT64_RULES, ids=[r[0] for r in FLOAT64_RULES]
)
@pytest.mark.parametrize(
    ("threshold", "size"),
    [(1e-40, 1.0), (1e39, 1e41), (0.1, 1.0), (3e-39, 1e300)],
    ids=["below-float32-normals", "above-float32-max", "rounded-by-float32", "tiny-scale"],
)
def test_a_float64_tree_is_clipped_at_its_threshold_in_float64(
    name, factory, rule, threshold, size
):
    # Before, every threshold was float32: 1e-40 flushed to 0 (the update was zeroed),
    # 1e39 became inf (nothing was clipped), 0.1 was 1.5e-9 off.
    with jax.enable_x64(True):
        g = np.array([3.0, -4.0]) * size
        w = np.array([3.0, 4.0])
        tx = factory(threshold)
        tree = {"w": jnp.asarray(g, jnp.float64)}
        out, _ = jax.jit(tx.update)(tree, tx.init(tree), {"w": jnp.asarray(w, jnp.float64)})
        assert out["w"].dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(out["w"]), rule(g, w, threshold), rtol=1e-14)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: optaxclip.zclip(warmup_steps=3, z_thresh=1e6, max_norm=None),
        lambda: optaxclip.autoclip(100.0, history=4),
        lambda: optaxclip.autoclip(100.0),
    ],
    ids=["zclip", "autoclip-window", "autoclip-sketch"],
)
def test_an_adaptive_threshold_never_clips_a_float64_step_by_its_own_rounding(factory):
    # ZClip's threshold on a step that is no spike, and AutoClip's at the 100th
    # percentile of a rising norm, is the step's own norm, recorded in float32: under
    # x64 the record rounds below a float64 norm about half the time, and the step was
    # clipped by ~6e-8 and counted as clipped (10 of 40 steps with the window).
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        tx = factory()
        tree = {"w": jnp.ones(5, jnp.float64)}
        state, update = tx.init(tree), jax.jit(tx.update)
        for step in range(40):
            tree = {"w": jnp.asarray(rng.normal(size=5) * (1 + 0.5 * step))}
            out, state = update(tree, state)
            np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(tree["w"]))
        assert int(optaxclip.stats(state)["clip_count"]) == 0


def test_a_float64_micro_batch_is_skipped_at_its_max_norm_in_float64():
    # The predicate compared a float64 norm with max_norm in float32, where 1e-40 is 0:
    # every micro-batch was dropped.
    with jax.enable_x64(True):
        step = jnp.zeros((), jnp.int32)
        for g, skipped in (([3e-41, 4e-41], False), ([3e-40, 4e-40], True)):
            tree = {"w": jnp.asarray(g, jnp.float64)}
            skip, _ = optaxclip.skip_nonfinite_microbatch(tree, step, tree, max_norm=1e-40)
            assert bool(skip) is skipped


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("threshold", [1e39, np.float64(1e300)])
def test_a_threshold_beyond_float32s_range_clips_nothing_and_warns_nothing(threshold):
    # NumPy warned "overflow encountered in cast" when the threshold was made float32.
    tx = optaxclip.clip_by_global_norm(threshold)
    out, state = tx.update(G, tx.init(G))
    np.testing.assert_array_equal(out["w"], G["w"])
    assert not bool(optaxclip.stats(state)["clipped"])


@pytest.mark.parametrize(
    "factory",
    [
        lambda: optaxclip.autoclip(50.0, history=4),
        lambda: optaxclip.zclip(warmup_steps=3, max_norm=None),
    ],
    ids=["autoclip", "zclip"],
)
def test_an_adaptive_clip_still_clips_a_float64_norm_beyond_float32(factory):
    # Such a norm is recorded as float32's largest value, which is no rounding: a step
    # of 1e300 after norms of 1e39-3e39 is clipped there (threshold_for_norm let it
    # through while its record equalled the threshold).
    with jax.enable_x64(True):
        tx = factory()
        state, update = tx.init(None), jax.jit(tx.update)
        for norm in (1e39, 2e39, 3e39, 1e300):
            out, state = update({"w": jnp.asarray([norm])}, state)
        big = float(np.finfo(np.float32).max)
        np.testing.assert_allclose(float(out["w"][0]), big, rtol=1e-7)
        assert bool(state.stats.clipped)


def _jitted_update(tx, g):
    return jax.jit(tx.update)(g, tx.init(g), g)[0]


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(
    "clip",
    [
        lambda g: _jitted_update(optaxclip.clip_by_value(1e39), g),
        lambda g: _jitted_update(optaxclip.adaptive_grad_clip(1e39), g),
        lambda g: optaxclip.per_example_global_norm_clip(g, 1e39)[0],
        lambda g: optaxclip.per_example_layer_norm_clip(g, 1e39)[0],
    ],
    ids=["clip_by_value", "adaptive_grad_clip", "per_example_global", "per_example_layer"],
)
@pytest.mark.parametrize("wide", [False, True], ids=["float32", "float32-and-float64"])
def test_a_threshold_beyond_float32_reaches_float32_leaves_quietly(clip, wide):
    # Made float32 for the per-example functions, or cast to a float32 leaf's dtype
    # inside jit beside a float64 leaf, 1e39 was folded by NumPy, which warned
    # "overflow encountered in cast" (the values were right: inf clips nothing).
    with jax.enable_x64(True):
        g = [jnp.full((2, 2), 1e30, jnp.float32), jnp.full((2, 2), 1.0, jnp.float32)]
        if wide:
            g[1] = g[1].astype(jnp.float64)
        out = clip(g)
        # Nothing is clipped (the per-example functions sum their two examples).
        for x, clipped in zip(g, out, strict=True):
            want = x if clipped.shape == x.shape else x.sum(axis=0)
            assert clipped.dtype == x.dtype
            np.testing.assert_array_equal(np.asarray(clipped), np.asarray(want))


def test_clip_tree_by_global_norm_refuses_a_negative_bound_passed_through_jit():
    # Only a concrete max_norm was checked: a traced -1 flipped the tree's sign.
    clip = jax.jit(lambda tree, bound: optaxclip.clip_tree_by_global_norm(tree, bound)[0])
    np.testing.assert_allclose(clip(G, 1.0)["w"], [0.6, 0.8], rtol=1e-6)
    with pytest.raises(Exception, match="max_norm is -1.0; it must be non-negative"):
        jax.block_until_ready(clip(G, -1.0))
