"""clip_by_block_norm and clip_by_block_rms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import norm64, np64, rel_err

import optaxclip
from optaxclip._mechanics import SHARED_SCALE_LEAVES


def _tree(seed, scale):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(6, 5)) * scale, jnp.float32),
        "b": jnp.asarray(rng.normal(size=(5,)) * scale / 10, jnp.float32),
        "s": jnp.asarray(rng.normal(size=()) * scale, jnp.float32),
        "none": None,
    }


def _apply(tx, g):
    return tx.update(g, tx.init(g))


@pytest.mark.parametrize("threshold", [0.0, 0.1, 1.0, 50.0])
def test_block_rms_matches_optax(threshold):
    g = _tree(0, 3.0)
    ours, _ = _apply(optaxclip.clip_by_block_rms(threshold), g)
    theirs, _ = _apply(optax.clip_by_block_rms(threshold), g)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        if threshold == 0.0:
            assert not np.any(a) and not np.any(np.isnan(a))
        else:
            assert rel_err(a, b) <= 1e-6


def test_block_rms_with_zero_threshold_and_zero_leaf_gives_zeros_not_nan():
    # Optax divides 0 by 0 here and returns NaN.
    out, _ = _apply(optaxclip.clip_by_block_rms(0.0), [jnp.zeros(3)])
    assert np.array_equal(out[0], np.zeros(3))


@pytest.mark.parametrize("max_norm", [0.2, 1.0, 100.0])
def test_block_norm_caps_each_leaf_at_max_norm(max_norm):
    g = _tree(1, 2.0)
    out, state = _apply(optaxclip.clip_by_block_norm(max_norm), g)
    for key in ("w", "b", "s"):
        n = norm64(g[key])
        expected = np64(g[key]) * min(1.0, max_norm / n)
        np.testing.assert_allclose(np64(out[key]), expected, rtol=1e-6)
    assert out["none"] is None
    clipped_norm = np.sqrt(sum(min(norm64(g[k]), max_norm) ** 2 for k in ("w", "b", "s")))
    assert float(state.stats.clipped_norm) == pytest.approx(clipped_norm, rel=1e-6)
    assert float(state.stats.norm) == pytest.approx(norm64(g), rel=1e-6)
    assert bool(state.stats.clipped) == any(norm64(g[k]) > max_norm for k in ("w", "b", "s"))


def test_block_norm_is_robust_for_half_precision_and_overflow():
    g = {"h": jnp.array([300.0, 400.0], jnp.float16), "x": jnp.array([3e19, 4e19])}
    out, state = _apply(optaxclip.clip_by_block_norm(1.0), g)
    assert out["h"].dtype == jnp.float16
    np.testing.assert_allclose(np64(out["h"]), [0.6, 0.8], rtol=1e-3)
    np.testing.assert_allclose(out["x"], [0.6, 0.8], rtol=1e-6)
    assert float(state.stats.clipped_norm) == pytest.approx(np.sqrt(2), rel=1e-5)


def test_block_norm_leaves_a_nan_leaf_alone_and_clips_the_others():
    g = {"bad": jnp.array([jnp.nan, 1.0]), "good": jnp.array([3.0, 4.0])}
    out, state = _apply(optaxclip.clip_by_block_norm(1.0), g)
    assert np.isnan(out["bad"][0]) and float(out["bad"][1]) == 1.0
    np.testing.assert_allclose(out["good"], [0.6, 0.8], rtol=1e-6)
    assert int(state.stats.nonfinite_count) == 1


def test_complex_leaves_for_block_transforms():
    g = {"z": jnp.array([3 + 4j, 0j], jnp.complex64)}
    out, _ = _apply(optaxclip.clip_by_block_norm(1.0), g)
    np.testing.assert_allclose(np64(out["z"]), [0.6 + 0.8j, 0], rtol=1e-6)
    out, _ = _apply(optaxclip.clip_by_block_rms(1.0), g)  # rms = 5 / sqrt(2)
    np.testing.assert_allclose(np64(out["z"]), np64(g["z"]) * np.sqrt(2) / 5, rtol=1e-6)


@pytest.mark.parametrize("factory", [optaxclip.clip_by_block_norm, optaxclip.clip_by_block_rms])
def test_validation_and_empty_tree(factory):
    with pytest.raises(ValueError):
        factory(-1.0)
    with pytest.raises(ValueError):
        factory(float("nan"))
    out, state = _apply(factory(1.0), {})
    assert out == {} and int(state.stats.count) == 1
    tx = factory(1.0)
    with pytest.raises(TypeError, match=r"\['i'\]"):
        tx.update({"i": jnp.ones(2, jnp.int32)}, tx.init(None))


@pytest.mark.parametrize("factory", [optaxclip.clip_by_block_norm, optaxclip.clip_by_block_rms])
def test_block_transforms_under_inject_hyperparams_and_scan(factory):
    tx = optax.inject_hyperparams(factory)(1.0)
    g = {"a": jnp.array([3.0, 4.0])}

    def step(state, _):
        out, state = tx.update(g, state)
        return state, out["a"]

    state, outs = jax.lax.scan(step, tx.init(g), length=5)
    assert int(optaxclip.stats(state)["count"]) == 5
    assert np.all(np.linalg.norm(np64(outs), axis=1) <= np.linalg.norm([3.0, 4.0]))
    assert bool(state.inner_state.stats.clipped)


@pytest.mark.parametrize("extra_leaves", [0, SHARED_SCALE_LEAVES], ids=["inline", "shared"])
@pytest.mark.parametrize("factory", [optaxclip.clip_by_block_norm, optaxclip.clip_by_block_rms])
@pytest.mark.parametrize(("threshold", "big"), [(1e-10, 1e30), (1e-30, 1e30), (1e-36, 3e38)])
def test_a_scale_below_the_smallest_normal_float_does_not_flush_the_leaf_to_zero(
    factory, threshold, big, extra_leaves
):
    # 1e-10 / 1e30 = 1e-40 is below float32's smallest normal number (1e-30 / 1e30 and
    # 1e-36 / 3e38 below 2^-190 too, the reach of a split by 2^64); the clipped values
    # themselves (the threshold, or the threshold * sqrt(2) for the rms bound) are
    # representable. From SHARED_SCALE_LEAVES leaves up the scales come out of a
    # lax.cond.
    tx = factory(threshold)
    grads = {"a": jnp.array([big, 0.0]), "b": jnp.array([3.0, 4.0])}
    grads.update({f"zero{i:03d}": jnp.zeros(2) for i in range(extra_leaves)})
    out, _ = tx.update(grads, tx.init(grads))
    bound = threshold * (np.sqrt(2) if factory is optaxclip.clip_by_block_rms else 1)
    np.testing.assert_allclose(np64(out["a"]), [bound, 0.0], rtol=1e-6)
    np.testing.assert_allclose(np64(out["b"]), np.array([3.0, 4.0]) / 5 * bound, rtol=1e-6)


def test_block_clip_gradient_beyond_the_float32_square_overflow_matches_float64():
    # d(x / ||x||)/dx needs ||x||^2, which overflows float32 above ~1.8e19.
    def first(x):
        tx = optaxclip.clip_by_block_norm(1.0)
        return tx.update({"a": x}, tx.init({"a": x}))[0]["a"][0]

    x = np.array([2e20, 4e20])
    n = np.linalg.norm(x)
    want = [1 / n - x[0] ** 2 / n**3, -x[0] * x[1] / n**3]
    got = jax.grad(first)(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np64(got), want, rtol=1e-5)


@pytest.mark.parametrize(
    "factory", [optaxclip.clip_by_global_norm, optaxclip.clip_by_block_norm]
)
def test_clipped_norm_statistic_survives_a_scale_below_the_smallest_normal(factory):
    # 1e-6 / 2e35 is below float32's smallest normal number: norm * scale would read 0.
    tx = factory(1e-6)
    grads = {"w": jnp.full((4,), 1e35)}
    out, state = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(np64(out["w"]), [5e-7] * 4, rtol=1e-6)
    np.testing.assert_allclose(float(state.stats.clipped_norm), 1e-6, rtol=1e-6)


@pytest.mark.parametrize("run", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_clipped_norm_statistic_of_norms_near_the_float32_maximum(run):
    # The norms are added as (norm / largest)^2; XLA divides by a broadcast scalar
    # through its reciprocal, 1 / 1e38 flushed to zero and the statistic read 0 eagerly.
    tx = optaxclip.clip_by_block_norm(3e38)
    grads = {"a": jnp.array([1e38], jnp.float32), "b": jnp.array([6e37, 8e37], jnp.float32)}
    _, state = run(tx.update)(grads, tx.init(grads))
    np.testing.assert_allclose(float(state.stats.clipped_norm), np.sqrt(2) * 1e38, rtol=1e-6)
