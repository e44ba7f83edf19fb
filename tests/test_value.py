"""clip_by_value."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import norm64, np64

import optaxclip


def _apply(tx, g):
    return tx.update(g, tx.init(g))


def test_matches_optax_clip_on_float32_trees_with_none_leaves():
    rng = np.random.default_rng(0)
    g = {"a": jnp.asarray(rng.normal(size=(5, 3)) * 2, jnp.float32), "n": None, "e": {}}
    ours, _ = _apply(optaxclip.clip_by_value(1.0), g)
    theirs, _ = optax.clip(1.0).update(g, optax.clip(1.0).init(g))
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    assert np.array_equal(ours["a"], theirs["a"])


def test_statistics_report_norms_before_and_after():
    g = [jnp.array([3.0, -0.5, -2.0])]
    out, state = _apply(optaxclip.clip_by_value(1.0), g)
    assert float(state.stats.norm) == pytest.approx(norm64(g), rel=1e-6)
    assert float(state.stats.clipped_norm) == pytest.approx(norm64(out), rel=1e-6)
    assert bool(state.stats.clipped) and float(state.stats.threshold) == 1.0
    _, state = _apply(optaxclip.clip_by_value(5.0), g)
    assert not bool(state.stats.clipped)


def test_value_clipping_bends_the_direction():
    g = [jnp.array([10.0, 1.0])]
    out, _ = _apply(optaxclip.clip_by_value(1.0), g)
    a, b = np64(g[0]), np64(out[0])
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cosine < 0.8  # [1, 1] against [10, 1]


def test_complex_magnitude_is_capped_and_phase_kept():
    z = jnp.array([3 + 4j, 0.3 + 0.4j, 0j], jnp.complex64)
    out, _ = _apply(optaxclip.clip_by_value(1.0), [z])
    got = np64(out[0])
    np.testing.assert_allclose(np.abs(got), [1.0, 0.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(np.angle(got[:2]), np.angle(np64(z)[:2]), rtol=1e-6)
    assert out[0].dtype == jnp.complex64


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_stays_half_and_is_clamped(dtype):
    g = [jnp.array([300.0, -2.0, 0.25], dtype)]
    out, _ = _apply(optaxclip.clip_by_value(jnp.float32(1.0)), g)
    assert out[0].dtype == dtype
    np.testing.assert_array_equal(np64(out[0]), [1.0, -1.0, 0.25])


def test_nan_stays_in_its_element_and_is_counted():
    g = [jnp.array([jnp.nan, 5.0]), jnp.array([2.0])]
    out, state = _apply(optaxclip.clip_by_value(1.0), g)
    assert np.isnan(out[0][0]) and float(out[0][1]) == 1.0 and float(out[1][0]) == 1.0
    assert int(state.stats.nonfinite_count) == 1


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_negative_or_nan_limit_is_rejected(bad):
    with pytest.raises(ValueError, match="max_delta"):
        optaxclip.clip_by_value(bad)


def test_integer_leaf_raises_type_error():
    tx = optaxclip.clip_by_value(1.0)
    with pytest.raises(TypeError, match=r"\['steps'\]"):
        tx.update({"steps": jnp.arange(3)}, tx.init(None))


def test_schedule_and_inject_hyperparams():
    tx = optaxclip.clip_by_value(optax.constant_schedule(0.5))
    out, _ = _apply(tx, [jnp.array([2.0])])
    assert float(out[0][0]) == 0.5
    tx = optax.inject_hyperparams(optaxclip.clip_by_value)(max_delta=0.25)
    out, state = jax.jit(tx.update)([jnp.array([2.0])], tx.init(None))
    assert float(out[0][0]) == 0.25
