"""clip_by_global_norm and clip_tree_by_global_norm."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import clip64, norm64, np64, rel_err

import optaxclip
from optaxclip._mechanics import SHARED_SCALE_LEAVES


def _tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(8, 4)) * scale, jnp.float32),
        "b": jnp.asarray(rng.normal(size=(4,)) * scale, jnp.float32),
        "nested": [jnp.asarray(rng.normal(size=(3,)) * scale, jnp.float32), None],
    }


def _apply(tx, updates, params=None):
    return tx.update(updates, tx.init(params if params is not None else updates), params)


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 3.0, 100.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_optax_on_finite_float32_trees(max_norm, seed):
    tree = _tree(seed, scale=0.7)
    ours, _ = _apply(optaxclip.clip_by_global_norm(max_norm), tree)
    theirs, _ = _apply(optax.clip_by_global_norm(max_norm), tree)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert rel_err(a, b) <= 1e-6


def test_empty_tree_passes_through():
    out, state = _apply(optaxclip.clip_by_global_norm(1.0), {})
    assert out == {}
    assert float(state.stats.norm) == 0.0 and not bool(state.stats.clipped)


def test_fp16_gradient_above_256_is_scaled_not_zeroed():
    g = [jnp.array([300.0, 1.0], jnp.float16)]
    out, _ = _apply(optaxclip.clip_by_global_norm(1.0), g)
    expected, _ = clip64(g, 1.0)
    assert out[0].dtype == jnp.float16
    np.testing.assert_allclose(np64(out[0]), expected[0], rtol=1e-3)
    np.testing.assert_allclose(np64(out[0]), [0.99999, 0.00333], atol=1e-5)


def test_float32_gradient_above_1e19_is_scaled_not_zeroed():
    g = {"x": jnp.array([3e19, 4e19], jnp.float32)}
    out, state = _apply(optaxclip.clip_by_global_norm(1.0), g)
    np.testing.assert_allclose(out["x"], [0.6, 0.8], rtol=1e-6)
    assert float(state.stats.norm) == pytest.approx(5e19, rel=1e-6)
    assert float(state.stats.clipped_norm) == pytest.approx(1.0, rel=1e-6)


def test_mixed_tree_keeps_fp16_leaves_nonzero():
    rng = np.random.default_rng(5)
    big = rng.normal(size=100)
    big = big / np.linalg.norm(big) * 1e5
    g = {
        "big": jnp.asarray(big, jnp.float32),
        "half": jnp.asarray(rng.uniform(1, 100, size=10), jnp.float16),
    }
    out, _ = _apply(optaxclip.clip_by_global_norm(1.0), g)
    expected, _ = clip64(g, 1.0)
    assert out["half"].dtype == jnp.float16
    assert np.all(np64(out["half"]) != 0)
    np.testing.assert_allclose(np64(out["half"]), expected["half"], rtol=2e-3)
    np.testing.assert_allclose(np64(out["big"]), expected["big"], rtol=1e-6)


def test_complex_leaves_are_clipped_by_modulus():
    g = {"z": jnp.array([3 + 4j, 0 + 0j], jnp.complex64), "r": jnp.array([12.0])}
    out, state = _apply(optaxclip.clip_by_global_norm(1.0), g)
    expected, _ = clip64(g, 1.0)
    assert out["z"].dtype == jnp.complex64
    np.testing.assert_allclose(np64(out["z"]), expected["z"], rtol=1e-6)
    assert float(state.stats.norm) == pytest.approx(13.0)


def test_zero_threshold_with_zero_gradients_gives_zeros_not_nan():
    g = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2), jnp.bfloat16)}
    out, state = _apply(optaxclip.clip_by_global_norm(0.0), g)
    for leaf in jax.tree.leaves(out):
        assert not np.any(np.isnan(np64(leaf))) and not np.any(np64(leaf))
    assert not bool(state.stats.clipped)


def test_zero_threshold_zeroes_nonzero_gradients():
    out, _ = _apply(optaxclip.clip_by_global_norm(0.0), [jnp.array([1.0, -2.0])])
    assert np.array_equal(out[0], [0.0, 0.0])


def test_gradient_through_clip_is_finite_at_zero():
    tx = optaxclip.clip_by_global_norm(1.0)

    def loss(g):
        out, _ = tx.update({"g": g}, tx.init(None))
        return jnp.sum(out["g"] ** 2) + jnp.sum(out["g"])

    grad = jax.grad(loss)(jnp.zeros(4))
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, np.ones(4))  # scale is 1 below the threshold


def _clip_derivative64(g, d, c=1.0):
    """In float64, the derivative of c g / |g| at g in direction d (complex g and d too):
    c (d / |g| - g Re<g, d> / |g|^3). The Jacobian is symmetric, so with d = w it is also
    the gradient of <w, c g / |g|>."""
    n = np.linalg.norm(g)
    return c * (d / n - g * np.real(np.vdot(g, d)) / n**3)


def test_gradient_through_clip_matches_finite_differences_when_clipping():
    tx = optaxclip.clip_by_global_norm(1.0)
    w = np.array([0.3, -0.7, 0.2])

    def f(g):
        return jnp.dot(tx.update([g], tx.init(None))[0][0], jnp.asarray(w, jnp.float32))

    g0 = np.array([3.0, 4.0, 1.0])
    grad = np.asarray(jax.grad(f)(jnp.asarray(g0, jnp.float32)))
    expected = _clip_derivative64(g0, w)  # d/dg of <w, g/|g|>
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def _assert_clip_gradient_is_float64s(max_norm, scale, factory, extra):
    """jax.grad of <w, clip(g)> against d/dg of <w, c g/|g|> in float64, with ``extra``
    leaves of zeros beside g (they change the engine's layout, not the norm)."""
    tx = factory(max_norm)
    w = np.array([0.3, -0.7, 0.2])
    g0 = np.array([3.0, 4.0, 1.0]) * scale / 5.1
    zeros = [jnp.zeros(size, jnp.float32) for size in extra]

    def f(g):
        return jnp.dot(tx.update([g, *zeros], tx.init(None))[0][0], jnp.asarray(w, jnp.float32))

    grad = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(g0, jnp.float32)), np.float64)
    expected = _clip_derivative64(g0, w, max_norm)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=0)


# Every pair clips, and its gradient, about max_norm / norm, is a normal float32. The
# norm's part of it reaches the values as ct * g / |g| with ct about max_norm / norm:
# through the sum of squares, as ct / (2 |g|) times 2 g, it flushed to zero from
# c / n**2 < ~1e-38 (5e18 at c = 1; 1e16 at c = 1e-6) and past the square's overflow
# (1.8e19) d(t/n)/dn needs n**2. Near 1e38, 1 / n flushes: XLA divides by a broadcast
# scalar through its reciprocal.
_FAR_FROM_ONE = [
    (1.0, 1e18),
    (1.0, 5e18),
    (1.0, 1e19),
    (1.0, 1e20),
    (1.0, 1e30),
    (1.0, 1e35),
    (1e-6, 1e16),
    (1e-6, 1e30),
    (1e-20, 1e12),
    (1e-20, 1e16),
    (1e10, 1e38),
]


@pytest.mark.parametrize(
    "extra", [(), (5000,), (2, 5000)], ids=["alone", "beside-a-big-leaf", "mixed"]
)
@pytest.mark.parametrize(("max_norm", "scale"), _FAR_FROM_ONE)
@pytest.mark.parametrize(
    "factory",
    [optaxclip.clip_by_global_norm, optaxclip.clip_by_block_norm],
    ids=["global", "block"],
)
def test_gradient_through_a_clip_far_from_one_matches_float64(factory, max_norm, scale, extra):
    _assert_clip_gradient_is_float64s(max_norm, scale, factory, extra)


def _adagc_after_one_step():
    """AdaGC past warm-up with gamma = 1 (one step of norm 1): it clips a tensor to
    ratio * 1 = 1.04 (its norm plus eps, 1e-6, below that)."""
    tx = optaxclip.adagc(warmup_steps=0)
    state = tx.update([jnp.ones(3) / np.sqrt(3)], tx.init([jnp.ones(3)]))[1]
    return tx, state, 1.04


def _forward_cases():
    """(name, a function g -> clip(g), the clip's threshold c): each clips g to c g / |g|."""
    w = jnp.asarray([2.0, -1.0, 2.0], jnp.float32)  # norm 3
    global_tx = optaxclip.clip_by_global_norm(1.0)
    block_tx = optaxclip.clip_by_block_norm(1.0)
    agc_tx = optaxclip.adaptive_grad_clip(0.01)  # a vector is one unit: c = 0.01 * 3
    adagc_tx, adagc_state, adagc_c = _adagc_after_one_step()
    return [
        ("global", lambda g: global_tx.update([g], global_tx.init(None))[0][0], 1.0),
        ("block", lambda g: block_tx.update([g], block_tx.init([g]))[0][0], 1.0),
        ("agc", lambda g: agc_tx.update([g], agc_tx.init([w]), [w])[0][0], 0.03),
        ("adagc", lambda g: adagc_tx.update([g], adagc_state)[0][0], adagc_c),
    ]


@pytest.mark.parametrize("scale", [1e3, 1e17, 1e20, 1e30])
@pytest.mark.parametrize("case", range(4), ids=["global", "block", "agc", "adagc"])
def test_forward_mode_derivative_of_a_clip_matches_float64(case, scale):
    # The scale's own derivative, c dn / n**2, is below the smallest normal float32 from
    # a norm of ~1e18 on (1e-61 at 1e30): differentiated through the factors, jax.jvp
    # lost the norm's part (2% to 100% off). The clips are differentiated through the
    # threshold and norm their scale is made of (d(x s) = s dx + (x s)(dc/c - dn/n)).
    _, clip, c = _forward_cases()[case]
    g0 = np.array([3.0, 4.0, 1.0]) * scale / 5.1
    direction = np.array([1.0, 0.0, -2.0])
    _, jvp = jax.jit(lambda g, d: jax.jvp(clip, (g,), (d,)))(
        jnp.asarray(g0, jnp.float32), jnp.asarray(direction, jnp.float32)
    )
    expected = _clip_derivative64(g0, direction, c)
    np.testing.assert_allclose(np.asarray(jvp, np.float64), expected, rtol=2e-5, atol=0)


@pytest.mark.parametrize(
    ("value", "max_norm", "size"), [(3e37, 1e30, 1.0), (5e29, 1e6, 1e-9)], ids=["1e38", "1e-9"]
)
@pytest.mark.parametrize("name", ["global", "block", "tree"])
def test_forward_mode_keeps_a_tangent_far_smaller_than_the_norm(name, value, max_norm, size):
    # dn / n is below the smallest normal float32 here (a unit tangent at a norm of 6e37;
    # 1e-9 at 1e30), though (x s) dn / n is not: taken as one number, the norm's part of
    # the JVP was lost and the JVP was not linear in its tangent.
    if name == "tree":
        clip = lambda g: optaxclip.clip_tree_by_global_norm([g], max_norm)[0][0]  # noqa: E731
    else:
        tx = getattr(optaxclip, f"clip_by_{name}_norm")(max_norm)
        clip = lambda g: tx.update([g], tx.init([g]))[0][0]  # noqa: E731
    g = jnp.full(4, value, jnp.float32)
    direction = np.eye(4)[0] * size
    _, jvp = jax.jvp(clip, (g,), (jnp.asarray(direction, jnp.float32),))
    expected = _clip_derivative64(np64(g), np64(jnp.asarray(direction, jnp.float32)), max_norm)
    np.testing.assert_allclose(np64(jvp), expected, rtol=2e-5, atol=0)


def test_forward_mode_keeps_each_part_of_a_complex_leaf():
    # x s dn / n is formed in the order that keeps it, chosen element by element; for a
    # complex element the choice is made for each part (its real part, 3.5e-11 here,
    # is below the smallest normal float times the other).
    g = jnp.array([1e-9 + 1e30j, 1e30], jnp.complex64)
    d = jnp.array([0, 1e30], jnp.complex64)
    _, jvp = jax.jvp(lambda v: optaxclip.clip_tree_by_global_norm([v], 1e29)[0][0], (g,), (d,))
    expected = _clip_derivative64(np.asarray(g, np.complex128), np.asarray(d, np.complex128), 1e29)
    got = np.asarray(jvp, np.complex128)
    np.testing.assert_allclose(got.real, expected.real, rtol=1e-5, atol=0)
    np.testing.assert_allclose(got.imag, expected.imag, rtol=1e-5, atol=0)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_derivative_with_respect_to_a_zero_threshold_is_the_direction(mode):
    # clip(c) = c g / |g| for 0 <= c < |g|: at c = 0 its (one-sided) derivative is g / |g|,
    # as everywhere below |g|; it read 0 there.
    g = jnp.array([3.0, 4.0])

    def clip(c):
        return optaxclip.clip_tree_by_global_norm([g], c)[0][0]

    if mode == "forward":
        got = jax.jvp(clip, (jnp.float32(0.0),), (jnp.float32(1.0),))[1]
    else:
        got = jax.jacrev(clip)(jnp.float32(0.0))
    np.testing.assert_allclose(np64(got), [0.6, 0.8], rtol=1e-6)


def test_hessian_of_a_zero_threshold_clip_is_zero_at_a_tiny_norm():
    # The clip is identically 0 there. Its rule's term in dn / n, whose own derivative
    # is about 1 / n**2 (1e40 here), is kept out where the threshold is 0.
    tx = optaxclip.clip_by_global_norm(0.0)
    w = jnp.array([0.3, -1.2])
    hessian = jax.hessian(lambda g: jnp.dot(w, tx.update([g], tx.init([g]))[0][0]))(
        jnp.array([1e-20, 0.0], jnp.float32)
    )
    np.testing.assert_array_equal(np64(hessian), 0.0)


def test_zero_threshold_has_zero_gradient_at_zero_where_the_clip_is_identically_zero():
    tx = optaxclip.clip_by_global_norm(0.0)
    grad = jax.grad(lambda g: jnp.sum(tx.update([g], tx.init(None))[0][0]))(jnp.zeros(3))
    np.testing.assert_array_equal(grad, 0.0)


def test_zero_threshold_zeroes_tiny_gradients():
    out, _ = _apply(optaxclip.clip_by_global_norm(0.0), [jnp.array([1e-20])])
    assert np.array_equal(out[0], [0.0])


@pytest.mark.parametrize(
    "factory",
    [
        optaxclip.clip_by_global_norm,
        optaxclip.clip_by_block_norm,
        lambda t: optaxclip.adagc(warmup_steps=1, warmup_max_norm=t, eps=0.0),
        lambda t: lambda g: optaxclip.clip_tree_by_global_norm(g, t),
    ],
    ids=["global", "block", "adagc", "tree"],
)
def test_a_float32_leaf_beside_a_float64_one_gets_its_tiny_scale_split(factory):
    # Under x64 the norm, and so the scale 1e-10 / 1e30, is float64, where 1e-40 is a
    # normal number; the float32 leaf is scaled by it cast to float32, where it is not.
    # The split is decided for the dtype the leaf is scaled in (factor_bits).
    with jax.enable_x64(True):
        g = {"a": jnp.array([6e29, 8e29], jnp.float32), "b": jnp.zeros(2, jnp.float64)}
        tx = factory(1e-10)
        out = tx(g)[0] if not hasattr(tx, "update") else tx.update(g, tx.init(g))[0]
        assert out["a"].dtype == jnp.float32
        np.testing.assert_allclose(np64(out["a"]), [6e-11, 8e-11], rtol=1e-6)
        np.testing.assert_array_equal(np64(out["b"]), 0.0)


@pytest.mark.parametrize("factory", [optaxclip.clip_by_global_norm, optaxclip.clip_by_block_norm])
@pytest.mark.parametrize(("threshold", "tangent"), [(1e-10, 10.0), (1e-20, 100.0), (1e-30, 1e3)])
def test_derivative_of_the_clipped_norm_at_a_tiny_scale_is_one(factory, threshold, tangent):
    # The recorded clipped_norm is the threshold when clipped, so its derivative with
    # respect to the threshold is 1. The scale threshold / 1e30 is split in two factors
    # there: formed as (norm * hi) * lo, the forward tangent passed through
    # tangent * 2^126, inf above ~4.
    g = {"a": jnp.array([1e30, 0.0], jnp.float32)}

    def clipped_norm(t):
        tx = factory(t)
        return tx.update(g, tx.init(g))[1].stats.clipped_norm

    t = jnp.float32(threshold)
    _, forward = jax.jvp(clipped_norm, (t,), (jnp.float32(tangent),))
    np.testing.assert_allclose(float(forward), tangent, rtol=1e-5)
    np.testing.assert_allclose(float(jax.grad(clipped_norm)(t)), 1.0, rtol=1e-5)


@pytest.mark.parametrize("extra_leaves", [0, SHARED_SCALE_LEAVES], ids=["inline", "shared"])
@pytest.mark.parametrize(
    ("max_norm", "big"),
    [(1e-10, 1e30), (1e-30, 1e10), (1e-20, 1e25), (1e-30, 1e30), (1e-36, 3e38)],
)
def test_a_clip_whose_result_is_representable_does_not_underflow_to_zero(
    max_norm, big, extra_leaves
):
    # The scale max_norm / norm is below the smallest normal float here (1e-40 down to
    # 3.3e-75, below 2^-190 (~6e-58), the reach of a split by 2^64), but [max_norm, 0]
    # is representable. From SHARED_SCALE_LEAVES leaves up the scale's
    # two factors come out of a lax.cond instead of being computed inline.
    g = [jnp.array([big, 0.0], jnp.float32)] + [jnp.zeros(2, jnp.float32)] * extra_leaves
    out, _ = _apply(optaxclip.clip_by_global_norm(max_norm), g)
    np.testing.assert_allclose(np64(out[0]), [max_norm, 0.0], rtol=1e-6)
    tree, _ = optaxclip.clip_tree_by_global_norm(g, max_norm)
    np.testing.assert_allclose(np64(tree[0]), [max_norm, 0.0], rtol=1e-6)
    zero, _ = _apply(optaxclip.clip_by_global_norm(0.0), [x + 1e-20 for x in g])
    assert not any(np.any(np64(x)) for x in zero)


def test_a_shared_scale_clips_leaves_of_every_dtype_and_shape_as_float64_does():
    # From SHARED_SCALE_LEAVES leaves up the factors are broadcast once per shape and
    # dtype: half-precision leaves are scaled in float32, complex ones by their parts'.
    rng = np.random.default_rng(3)
    dtypes = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.complex64]
    shapes = [(3,), (2, 4), (3,), ()]
    g = []
    for i in range(SHARED_SCALE_LEAVES):
        dtype, shape = dtypes[i % 4], shapes[(i // 4) % 4]
        x = rng.standard_normal(shape) + (1j * rng.standard_normal(shape) if i % 4 == 3 else 0)
        g.append(jnp.asarray(x, dtype))
    wide = [np.asarray(x).astype(np.complex128) for x in g]
    norm = np.sqrt(sum(np.sum(np.abs(x) ** 2) for x in wide))
    max_norm = norm / 7
    for out in (
        _apply(optaxclip.clip_by_global_norm(max_norm), g)[0],
        optaxclip.clip_tree_by_global_norm(g, max_norm)[0],
    ):
        for x, y, w in zip(g, out, wide, strict=True):
            assert y.dtype == x.dtype and y.shape == x.shape
            tol = {"bfloat16": 1e-2, "float16": 2e-3}.get(x.dtype.name, 1e-5)
            np.testing.assert_allclose(np.asarray(y).astype(np.complex128), w / 7, rtol=tol)


def test_clip_tree_by_global_norm_refuses_a_schedule_and_says_what_to_do():
    with pytest.raises(TypeError, match="clip_by_global_norm\\(schedule\\)"):
        optaxclip.clip_tree_by_global_norm({"a": jnp.ones(2)}, lambda count: 1.0)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), np.float32(-0.5), jnp.array(-2.0)])
def test_negative_or_nan_threshold_is_rejected_at_construction(bad):
    with pytest.raises(ValueError, match="max_norm"):
        optaxclip.clip_by_global_norm(bad)


def test_non_scalar_threshold_is_rejected():
    with pytest.raises(ValueError, match="max_norm"):
        optaxclip.clip_by_global_norm(jnp.ones(2))


def test_bad_nonfinite_policy_is_rejected():
    with pytest.raises(ValueError, match="nonfinite"):
        optaxclip.clip_by_global_norm(1.0, nonfinite="skip")


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_and_bool_leaves_raise_type_error_naming_the_leaf(dtype):
    g = {"ok": jnp.ones(2), "layer": {"count": jnp.ones(2, dtype)}}
    tx = optaxclip.clip_by_global_norm(1.0)
    with pytest.raises(TypeError, match=r"\['layer'\]\['count'\]"):
        tx.update(g, tx.init(g))


def test_bf16_gradients_with_strongly_typed_threshold_stay_bf16():
    g = {"a": jnp.array([30.0, 40.0], jnp.bfloat16)}
    out, _ = jax.jit(optaxclip.clip_by_global_norm(jnp.float32(1.0)).update)(
        g, optaxclip.ClipByGlobalNormState(optaxclip._stats.init_stats())
    )
    assert out["a"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np64(out["a"]), [0.6, 0.8], rtol=1e-2)


def test_propagate_keeps_nan_in_its_own_leaf():
    g = {"bad": jnp.array([jnp.nan, 1.0]), "good": jnp.array([300.0, 400.0])}
    out, state = jax.jit(optaxclip.clip_by_global_norm(1.0).update)(
        g, optaxclip.clip_by_global_norm(1.0).init(g)
    )
    assert np.isnan(out["bad"][0]) and float(out["bad"][1]) == 1.0
    assert np.array_equal(out["good"], g["good"])  # not contaminated, not clipped
    assert int(state.stats.nonfinite_count) == 1 and not bool(state.stats.clipped)


def test_inf_gradient_under_propagate_is_not_turned_into_nan_or_zero():
    g = [jnp.array([jnp.inf, 2.0]), jnp.array([5.0])]
    out, _ = _apply(optaxclip.clip_by_global_norm(1.0), g)
    assert np.array_equal(out[0], [np.inf, 2.0]) and np.array_equal(out[1], [5.0])


def test_zero_policy_returns_zeros_on_nonfinite_steps_only():
    tx = optaxclip.clip_by_global_norm(1.0, nonfinite="zero")
    bad = {"a": jnp.array([jnp.nan, 1.0], jnp.bfloat16), "b": jnp.array([2.0])}
    out, state = jax.jit(tx.update)(bad, tx.init(bad))
    assert all(not np.any(np64(x)) for x in jax.tree.leaves(out))
    assert out["a"].dtype == jnp.bfloat16
    assert int(state.stats.nonfinite_count) == 1
    good = {"a": jnp.array([0.3, 0.4], jnp.bfloat16), "b": jnp.array([0.0])}
    out, _ = jax.jit(tx.update)(good, state)
    np.testing.assert_allclose(np64(out["a"]), [0.3, 0.4], rtol=1e-2)


def test_error_policy_raises_from_inside_jit_naming_the_step():
    tx = optaxclip.clip_by_global_norm(1.0, nonfinite="error")
    update = jax.jit(tx.update)
    g = [jnp.array([1.0, 2.0])]
    state = tx.init(g)
    for _ in range(2):
        out, state = update(g, state)
    jax.block_until_ready(out)
    with pytest.raises(Exception, match=r"non-finite|step 3"):
        out, state = update([jnp.array([jnp.nan, 2.0])], state)
        jax.block_until_ready(out)


def test_schedule_threshold_is_evaluated_at_the_transform_count():
    schedule = optax.linear_schedule(1.0, 3.0, transition_steps=2)
    tx = optaxclip.clip_by_global_norm(schedule)
    g = [jnp.array([30.0, 40.0])]
    state = tx.init(g)
    for expected in [1.0, 2.0, 3.0, 3.0]:
        out, state = tx.update(g, state)
        assert float(state.stats.threshold) == pytest.approx(expected)
        assert float(optaxclip.global_norm(out)) == pytest.approx(expected, rel=1e-6)


def test_inject_hyperparams_can_change_the_threshold():
    tx = optax.inject_hyperparams(optaxclip.clip_by_global_norm)(max_norm=1.0)
    g = {"a": jnp.array([3.0, 4.0])}
    state = tx.init(g)
    update = jax.jit(tx.update)
    out, state = update(g, state)
    np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-6)
    state.hyperparams["max_norm"] = jnp.asarray(2.5)
    out, state = update(g, state)
    np.testing.assert_allclose(out["a"], [1.5, 2.0], rtol=1e-6)
    with pytest.raises(ValueError, match="max_norm"):
        optax.inject_hyperparams(optaxclip.clip_by_global_norm)(max_norm=-1.0).init(g)


def test_composes_with_optax_wrappers():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    g = {"w": jnp.full((3, 2), 2.0), "b": jnp.array([3.0, 4.0])}
    # masked: only the weights are clipped.
    masked = optax.masked(optaxclip.clip_by_global_norm(1.0), {"w": True, "b": False})
    out, _ = _apply(masked, g, params)
    assert np.array_equal(out["b"], g["b"])
    np.testing.assert_allclose(float(optaxclip.global_norm(out["w"])), 1.0, rtol=1e-6)
    # partition: a clip inside partition is per group.
    part = optax.partition(
        {"tight": optaxclip.clip_by_global_norm(1.0), "loose": optaxclip.clip_by_global_norm(2.0)},
        {"w": "tight", "b": "loose"},
    )
    out, _ = _apply(part, g, params)
    assert float(optaxclip.global_norm(out["w"])) == pytest.approx(1.0, rel=1e-6)
    assert float(optaxclip.global_norm(out["b"])) == pytest.approx(2.0, rel=1e-6)
    # MultiSteps: the accumulated (mean) gradient is clipped once per real step.
    ms = optax.MultiSteps(optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(1.0)), 2)
    state = ms.init(params)
    upd1, state = ms.update(g, state, params)
    g2 = jax.tree.map(lambda x: -0.5 * x, g)
    upd2, state = ms.update(g2, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g, g2)
    expected, _ = clip64(mean, 1.0)
    assert all(not np.any(x) for x in jax.tree.leaves(upd1))
    for key in g:
        np.testing.assert_allclose(np64(upd2[key]), -expected[key], rtol=1e-6)


def test_state_is_a_type_stable_scan_carry():
    tx = optaxclip.clip_by_global_norm(1.0)
    gs = jnp.asarray(np.random.default_rng(0).normal(size=(50, 5)) * 3, jnp.float32)

    def step(state, g):
        out, state = tx.update({"g": g}, state)
        return state, out["g"]

    state, outs = jax.lax.scan(step, tx.init(None), gs)
    assert int(state.stats.count) == 50
    expected_clips = sum(np.linalg.norm(np64(g)) > 1.0 for g in gs)
    assert int(state.stats.clip_count) == expected_clips
    assert np.all(np.linalg.norm(np64(outs), axis=1) <= 1.0 + 1e-6)


def test_clip_tree_by_global_norm_matches_reference_and_accepts_a_known_norm():
    tree = _tree(7, scale=2.0)
    out, scale = optaxclip.clip_tree_by_global_norm(tree, 1.0)
    expected, expected_scale = clip64(tree, 1.0)
    assert float(scale) == pytest.approx(expected_scale, rel=1e-6)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
        assert rel_err(a, b) <= 1e-6
    out2, scale2 = optaxclip.clip_tree_by_global_norm(tree, 1.0, norm=norm64(tree) * 2)
    assert float(scale2) == pytest.approx(expected_scale / 2, rel=1e-6)
    with pytest.raises(ValueError, match="max_norm"):
        optaxclip.clip_tree_by_global_norm(tree, -1.0)


def test_clip_tree_by_global_norm_per_example_under_vmap():
    rng = np.random.default_rng(8)
    batch = {"w": jnp.asarray(rng.normal(size=(6, 4, 3)) * 2, jnp.float32)}
    out, scales = jax.vmap(lambda g: optaxclip.clip_tree_by_global_norm(g, 1.0))(batch)
    for i in range(6):
        expected, s = clip64({"w": batch["w"][i]}, 1.0)
        assert float(scales[i]) == pytest.approx(s, rel=1e-6)
        np.testing.assert_allclose(np64(out["w"][i]), expected["w"], rtol=1e-6)
    assert norm64({"w": out["w"][0]}) <= 1.0 + 1e-6


@pytest.mark.parametrize("norm", [jnp.bfloat16(5.0), jnp.float16(5.0), 5, np.float32(5.0)])
def test_clip_tree_by_global_norm_takes_a_norm_in_any_real_dtype(norm):
    # optax.global_norm of a bf16 tree is a bf16 scalar: a natural thing to hand over.
    tree, scale = optaxclip.clip_tree_by_global_norm({"a": jnp.array([3.0, 4.0])}, 1.0, norm=norm)
    np.testing.assert_allclose(tree["a"], [0.6, 0.8], rtol=1e-6)
    assert float(scale) == pytest.approx(0.2)
