"""adaptive_grad_clip against optax.adaptive_grad_clip and a float64 NumPy AGC rule.

Compiles dominate this file's runtime, so most tests share one tree of shapes and one
compiled update per configuration.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import norm64, np64, rel_err

import optaxclip

# Optax's default unit axes for each rank (its unitwise_norm convention).
_OPTAX_AXES = {1: None, 2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}


def agc64(g, w, clipping, eps, axes):
    """AGC written out in float64 NumPy: each unit (a slice over ``axes``; None = the
    whole array) is scaled to at most clipping * max(||w_unit||, eps)."""
    g, w = np64(g), np64(w)
    g_norm = np.sqrt(np.sum(np.abs(g) ** 2, axis=axes, keepdims=True))
    w_norm = np.sqrt(np.sum(np.abs(w) ** 2, axis=axes, keepdims=True))
    bound = clipping * np.maximum(w_norm, eps)
    scale = np.where(g_norm > bound, bound / np.where(g_norm > 0, g_norm, 1), 1.0)
    return g * scale


def agc64_stacked(g, w, clipping, eps, depth):
    """agc64 applied to each of the layers indexed by the first ``depth`` axes."""
    g, w = np64(g), np64(w)
    layer_shape = g.shape[depth:]
    flat_g, flat_w = g.reshape((-1, *layer_shape)), w.reshape((-1, *layer_shape))
    rank = len(layer_shape) if np.squeeze(flat_g[0]).ndim > 1 else 1
    layers = [
        agc64(a, b, clipping, eps, _OPTAX_AXES[rank]) for a, b in zip(flat_g, flat_w, strict=True)
    ]
    return np.stack(layers).reshape(g.shape)


def _tree(seed, shapes, grad_scale=1.0):
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    # Per-unit grad magnitudes spread over four decades so that some units clip and
    # some do not.
    grads = {
        k: jnp.asarray(
            rng.normal(size=s) * grad_scale * 10.0 ** rng.uniform(-3, 1, size=s[-1:]),
            jnp.float32,
        )
        for k, s in shapes.items()
    }
    return grads, params


SHAPES = {
    "bias": (8,),
    "dense": (6, 8),
    "heads": (4, 3, 8),
    "conv": (3, 3, 2, 8),
    "conv3d": (2, 2, 2, 2, 8),
    "row": (1, 8),
}


def _build(clipping=0.05, eps=1e-3, axis=None, stacked_axes=0):
    """A compiled single step: (grads, params) -> (updates, stats)."""
    tx = optaxclip.adaptive_grad_clip(clipping, eps, axis=axis, stacked_axes=stacked_axes)

    def step(grads, params):
        out, state = tx.update(grads, tx.init(params), params)
        return out, state.stats

    return jax.jit(step)


_ours = functools.cache(_build)  # one compile per configuration, shared by the tests


@functools.cache
def _optax_update(axis):
    def step(grads, params, clipping, eps):
        tx = optax.adaptive_grad_clip(clipping, eps, axis=axis)
        return tx.update(grads, tx.init(params), params)[0]

    return jax.jit(step)


def _optax(grads, params, clipping=0.05, eps=1e-3, axis=None):
    return _optax_update(axis)(grads, params, clipping, eps)


def test_matches_optax_on_ranks_1_to_5():
    grads, params = _tree(0, SHAPES)
    out, stats = _ours()(grads, params)
    expected = _optax(grads, params)
    for k in SHAPES:
        assert rel_err(out[k], expected[k]) <= 1e-6, k
    assert bool(stats.clipped)
    # Some units of the dense leaf pass unchanged, others are scaled: both branches run.
    same_cols = np.all(np.asarray(out["dense"]) == np.asarray(grads["dense"]), axis=0)
    assert 0 < same_cols.sum() < same_cols.size


@pytest.mark.parametrize("axis", [1, (0, -1)])
def test_axis_argument_matches_optax(axis):
    shapes = {"dense": (6, 8), "heads": (4, 3, 8)}
    grads, params = _tree(1, shapes)
    out, _ = _ours(axis=axis)(grads, params)
    expected = _optax(grads, params, axis=axis)
    for k in shapes:
        assert rel_err(out[k], expected[k]) <= 1e-6, k


def test_stats_report_global_norms_before_and_after_and_the_relative_threshold():
    grads, params = _tree(2, SHAPES)
    out, stats = _ours()(grads, params)
    assert float(stats.norm) == pytest.approx(norm64(grads), rel=1e-5)
    assert float(stats.clipped_norm) == pytest.approx(norm64(out), rel=1e-5)
    assert float(stats.threshold) == pytest.approx(0.05)
    assert bool(stats.clipped) and int(stats.clip_count) == 1 and int(stats.count) == 1
    assert int(stats.nonfinite_count) == 0


def test_small_updates_pass_bit_for_bit_and_are_not_counted_as_clipped():
    grads, params = _tree(3, SHAPES, grad_scale=1e-4)
    out, stats = _ours()(grads, params)
    for k in SHAPES:
        np.testing.assert_array_equal(out[k], grads[k])
    assert not bool(stats.clipped)
    assert float(stats.clipped_norm) == float(stats.norm)


def test_a_nan_unit_stays_nan_without_touching_other_units_or_leaves():
    grads, params = _tree(4, SHAPES)
    bad = dict(grads, dense=grads["dense"].at[2, 3].set(jnp.nan))
    out, stats = _ours()(bad, params)
    good = _optax(grads, params)
    dense = np.asarray(out["dense"])
    assert np.isnan(dense[2, 3]) and not np.isnan(np.delete(dense[:, 3], 2)).any()
    assert rel_err(np.delete(dense, 3, axis=1), np.delete(good["dense"], 3, axis=1)) <= 1e-6
    for k in SHAPES:
        if k != "dense":
            assert rel_err(out[k], good[k]) <= 1e-6, k
    assert int(stats.nonfinite_count) == 1 and np.isnan(float(stats.norm))


def test_float32_updates_whose_squares_overflow_are_clipped_correctly():
    grads, params = _tree(5, SHAPES)
    huge = dict(grads, dense=grads["dense"].at[:, 1].set(jnp.arange(6.0) * 1e19 + 1e19))
    out, stats = _ours()(huge, params)
    for k in SHAPES:
        expected = agc64(huge[k], params[k], 0.05, 1e-3, _OPTAX_AXES[len(SHAPES[k])])
        if k == "row":  # shape (1, 8) squeezes to a vector: one unit
            expected = agc64(huge[k], params[k], 0.05, 1e-3, None)
        assert rel_err(out[k], expected) <= 1e-5, k
    assert float(stats.norm) == pytest.approx(norm64(huge), rel=1e-5)
    assert float(stats.clipped_norm) == pytest.approx(norm64(out), rel=1e-5)


def _two_layer_stack(seed):
    rng = np.random.default_rng(seed)
    # Layer 1's weights are 100x layer 0's: pooled over layers (Optax's rank-3 rule),
    # layer 0's units would be measured against layer 1's weights.
    w = np.stack([rng.normal(size=(6, 8)) * 0.01, rng.normal(size=(6, 8))])
    g = rng.normal(size=(2, 6, 8)) * 0.01
    return jnp.asarray(g, jnp.float32), jnp.asarray(w, jnp.float32)


def test_stacked_axes_clips_each_scanned_layer_on_its_own():
    g, w = _two_layer_stack(6)
    out, _ = _ours(clipping=0.1, stacked_axes=1)({"w": g}, {"w": w})
    for i in range(2):  # the same as clipping each layer (a rank-2 leaf) by itself
        assert rel_err(out["w"][i], agc64(g[i], w[i], 0.1, 1e-3, axes=(0,))) <= 1e-6
    pooled = _optax({"w": g}, {"w": w}, clipping=0.1)["w"]
    assert rel_err(pooled, out["w"]) > 0.1  # Optax's answer on the stack is different
    # `axis` then names axes of one layer: here each row of a layer is a unit.
    out, _ = _ours(clipping=0.1, stacked_axes=1, axis=-1)({"w": g}, {"w": w})
    for i in range(2):
        assert rel_err(out["w"][i], agc64(g[i], w[i], 0.1, 1e-3, axes=(1,))) <= 1e-6


_DEPTH = {"blocks": 1, "conv": 2, "embed": 0}


def _depth_of(path, leaf):
    return _DEPTH[path[0].key]


@pytest.mark.parametrize("option", [_DEPTH, _depth_of], ids=["pytree", "callable"])
def test_per_leaf_stacked_axes_from_a_pytree_or_a_callable(option):
    rng = np.random.default_rng(7)
    params = {
        "blocks": {"w": rng.normal(size=(2, 6, 8)), "b": rng.normal(size=(2, 8))},
        "conv": rng.normal(size=(2, 3, 3, 3, 2, 4)),
        "embed": rng.normal(size=(5, 8)),
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    grads = jax.tree.map(lambda w: w * jnp.asarray(rng.uniform(0, 0.3, w.shape), w.dtype), params)
    out, stats = _build(clipping=0.1, stacked_axes=option)(grads, params)
    for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
        g, w = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (grads, params))
        g_leaf = dict(g)[path]
        expected = agc64_stacked(g_leaf, dict(w)[path], 0.1, 1e-3, _DEPTH[path[0].key])
        assert rel_err(leaf, expected) <= 1e-6, path
    assert bool(stats.clipped)


def test_missing_params_raise_a_value_error_that_says_so():
    tx = optaxclip.adaptive_grad_clip(0.1)
    g = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="needs params.*pass params to update"):
        tx.update(g, tx.init(g))


def test_bf16_and_complex_leaves_keep_their_dtype_and_match_the_float64_rule():
    rng = np.random.default_rng(8)
    cols = np.array([0.001, 0.01, 1, 100])
    params = {
        "bf16": jnp.asarray(rng.normal(size=(16, 4)), jnp.bfloat16),
        "c64": jnp.asarray(rng.normal(size=(5, 4)) + 1j * rng.normal(size=(5, 4)), jnp.complex64),
    }
    grads = {
        "bf16": jnp.asarray(rng.normal(size=(16, 4)) * cols, jnp.bfloat16),
        "c64": jnp.asarray(
            (rng.normal(size=(5, 4)) + 1j * rng.normal(size=(5, 4))) * cols, jnp.complex64
        ),
    }
    out, stats = _ours()(grads, params)
    assert out["bf16"].dtype == jnp.bfloat16 and out["c64"].dtype == jnp.complex64
    # bf16: one rounding of the result (the scale itself is computed in float32).
    assert rel_err(out["bf16"], agc64(grads["bf16"], params["bf16"], 0.05, 1e-3, (0,))) <= 2**-8
    # complex: the modulus sets the scale, the phase is kept.
    assert rel_err(out["c64"], agc64(grads["c64"], params["c64"], 0.05, 1e-3, (0,))) <= 1e-6
    assert bool(stats.clipped)


@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    log_g=st.floats(-6, 6),
    log_w=st.floats(-6, 3),
)
def test_property_each_unit_is_capped_and_keeps_its_direction(seed, log_g, log_w):
    rng = np.random.default_rng(seed)
    shapes = {"vec": (7,), "dense": (5, 3), "conv": (2, 2, 2, 3)}
    # Units of different sizes within a tree: magnitudes vary per unit by 1e+-2.
    params = {k: (rng.normal(size=s) * 10.0**log_w).astype(np.float32) for k, s in shapes.items()}
    grads = {
        k: (rng.normal(size=s) * 10.0 ** (log_g + rng.uniform(-2, 2, size=s[-1:]))).astype(
            np.float32
        )
        for k, s in shapes.items()
    }
    out, _ = _ours(clipping=0.1)(grads, params)
    for k, s in shapes.items():
        axes = _OPTAX_AXES[len(s)]
        g, w, o = np64(grads[k]), np64(params[k]), np64(out[k])
        g_norm = np.sqrt(np.sum(g**2, axis=axes, keepdims=True))
        bound = 0.1 * np.maximum(np.sqrt(np.sum(w**2, axis=axes, keepdims=True)), 1e-3)
        o_norm = np.sqrt(np.sum(o**2, axis=axes, keepdims=True))
        assert np.all(o_norm <= bound * (1 + 1e-5))
        assert np.all(np.where(g_norm <= bound, o == g, True))  # small units untouched
        # Same direction: o = c * g per unit, with c in (0, 1].
        c = o_norm / np.where(g_norm > 0, g_norm, 1)
        assert np.all((c > 0) & (c <= 1 + 1e-6))
        np.testing.assert_allclose(o, c * g, rtol=1e-5, atol=0)


def test_works_inside_jit_and_a_50_step_scan_with_a_schedule():
    grads, params = _tree(9, {"dense": (6, 8), "bias": (8,)})
    schedule = optax.linear_schedule(0.01, 0.2, 50)
    tx = optaxclip.adaptive_grad_clip(schedule)
    factors = jnp.linspace(0.5, 2.0, 50)

    def body(state, f):
        out, state = tx.update(jax.tree.map(lambda g: g * f, grads), state, params)
        return state, out

    state, outs = jax.jit(lambda s: jax.lax.scan(body, s, factors))(tx.init(params))
    assert int(state.stats.count) == 50
    for i in (0, 17, 49):
        g_i = {k: g * factors[i] for k, g in grads.items()}
        expected = _optax(g_i, params, clipping=float(schedule(i)))
        for k in grads:
            assert rel_err(outs[k][i], expected[k]) <= 1e-5, (i, k)


def test_clipping_and_eps_can_be_injected_hyperparameters():
    grads, params = _tree(9, {"dense": (6, 8), "bias": (8,)})
    tx = optax.inject_hyperparams(optaxclip.adaptive_grad_clip, static_args=("stacked_axes",))(
        clipping=0.05, eps=1e-3
    )
    update = jax.jit(tx.update)
    state = tx.init(params)
    for clipping, eps in [(0.05, 1e-3), (0.2, 0.5)]:
        state.hyperparams["clipping"] = jnp.asarray(clipping)
        state.hyperparams["eps"] = jnp.asarray(eps)
        out, state = update(grads, state, params)
        expected = _optax(grads, params, clipping=clipping, eps=eps)
        for k in grads:
            assert rel_err(out[k], expected[k]) <= 1e-6
    assert float(optaxclip.stats(state)["threshold"]) == pytest.approx(0.2)


def test_stacked_axes_injected_as_an_array_asks_for_static_args():
    with pytest.raises(TypeError, match="static_args"):
        optax.inject_hyperparams(optaxclip.adaptive_grad_clip)(clipping=0.1).init(
            {"w": jnp.ones(2)}
        )


def test_none_leaves_and_empty_trees_pass_through():
    step = _ours(clipping=0.1)
    g = {"a": None, "b": jnp.array([3.0, 4.0])}
    p = {"a": jnp.ones(3), "b": jnp.array([1.0, 0.0])}
    out, _ = step(g, p)
    assert out["a"] is None
    np.testing.assert_allclose(out["b"], [0.06, 0.08], rtol=1e-6)
    out, _ = step({"s": jnp.array(3.0)}, {"s": jnp.array(-2.0)})  # a scalar is one unit
    assert float(out["s"]) == pytest.approx(0.2)
    out, stats = step({}, {})
    assert out == {} and float(stats.norm) == 0 and not bool(stats.clipped)
    assert int(stats.count) == 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"clipping": -0.1}, ValueError, "clipping"),
        ({"clipping": float("nan")}, ValueError, "clipping"),
        ({"clipping": 0.1, "eps": -1.0}, ValueError, "eps"),
        ({"clipping": 0.1, "stacked_axes": -1}, ValueError, "stacked_axes"),
        ({"clipping": 0.1, "stacked_axes": {"w": -2}}, ValueError, "stacked_axes"),
        ({"clipping": 0.1, "stacked_axes": True}, TypeError, "stacked_axes"),
        ({"clipping": 0.1, "stacked_axes": 1.5}, TypeError, "stacked_axes"),
    ],
)
def test_invalid_arguments_are_rejected_when_built(kwargs, error, match):
    with pytest.raises(error, match=match):
        optaxclip.adaptive_grad_clip(**kwargs)


@pytest.mark.parametrize(
    "stacked_axes, tree, error, match",
    [
        (2, {"w": jnp.ones((2, 3))}, ValueError, r"stacked_axes \['w'\].*only 2 axes"),
        (lambda p, x: -1, {"w": jnp.ones((2, 3))}, ValueError, r"stacked_axes \['w'\]"),
        (0, {"w": jnp.ones((2,) * 6)}, ValueError, r"\['w'\].*pass `axis`"),
        (0, {"w": jnp.ones(3, jnp.int32)}, TypeError, r"\['w'\]"),
    ],
)
def test_invalid_leaves_are_rejected_naming_the_leaf(stacked_axes, tree, error, match):
    tx = optaxclip.adaptive_grad_clip(0.1, stacked_axes=stacked_axes)
    with pytest.raises(error, match=match):
        tx.update(tree, tx.init(tree), tree)


def test_params_of_another_shape_are_rejected():
    tx = optaxclip.adaptive_grad_clip(0.1)
    with pytest.raises(ValueError, match="shape"):
        tx.update({"w": jnp.ones(3)}, tx.init({"w": jnp.ones(3)}), {"w": jnp.ones(4)})
