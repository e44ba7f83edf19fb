"""adaptive_grad_clip and unitwise_norm at the edges: gradients through AGC, units of
values near the float32/float64 underflow and overflow points, empty leaves, argument
errors, and AGC under shard_map/pmap when a device holds a size-1 slice of a leaf.

References are independent of optaxclip: ``agc64`` (AGC in float64 NumPy), its
derivative written out by hand (``agc_grad64``), and ``optax.adaptive_grad_clip``
where Optax is right.
"""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _devices import run_json_script
from _reference import norm64, np64, rel_err
from test_agc import agc64

import optaxclip

# ---------------------------------------------------------------------------------------
# Gradients through AGC


def agc_grad64(g, w, c, clipping, eps, axes):
    """d/dg and d/dw of sum(c * AGC(g, w)) in float64: per unit u with ||g_u|| > bound,
    out_u = bound * g_u / ||g_u|| with bound = clipping * max(||w_u||, eps)."""
    g, w, c = np64(g), np64(w), np64(c)
    n = np.sqrt(np.sum(g**2, axis=axes, keepdims=True))
    w_norm = np.sqrt(np.sum(w**2, axis=axes, keepdims=True))
    bound = clipping * np.maximum(w_norm, eps)
    dot = np.sum(c * g, axis=axes, keepdims=True)
    over = n > bound
    safe_n = np.where(over, n, 1)
    d_g = np.where(over, bound * (c / safe_n - dot * g / safe_n**3), c)
    # d bound / dw = clipping * w / ||w|| where ||w|| > eps; out_u depends on it as dot / n.
    d_bound = np.where(w_norm > eps, clipping * w / np.where(w_norm > 0, w_norm, 1), 0)
    d_w = np.where(over, d_bound * dot / safe_n, 0)
    return d_g, d_w


def _loss(tx, c):
    def loss(g, w):
        out = tx.update({"w": g}, tx.init({"w": w}), {"w": w})[0]["w"]
        return jnp.sum(out * c)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _dense(seed, scale=1.0, shape=(16, 8)):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    # Per-unit magnitudes over four decades: some units clip, some do not.
    g = rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 1, size=shape[-1:]) * scale
    c = rng.normal(size=shape).astype(np.float32)
    return jnp.asarray(g, jnp.float32), jnp.asarray(w), jnp.asarray(c)


@pytest.mark.parametrize("shape, axes", [((16, 8), (0,)), ((3, 3, 2, 8), (0, 1, 2)), ((8,), None)])
def test_gradient_matches_optax_and_the_float64_derivative(shape, axes):
    # Before: NaN everywhere (a sqrt of the underflowed rescaled sum in an untaken
    # jnp.where branch).
    g, w, c = _dense(0, shape=shape)
    ours = _loss(optaxclip.adaptive_grad_clip(0.05), c)(g, w)
    theirs = _loss(optax.adaptive_grad_clip(0.05), c)(g, w)
    d_g, d_w = agc_grad64(g, w, c, 0.05, 1e-3, axes)
    assert np.isfinite(np.asarray(ours[0])).all() and np.isfinite(np.asarray(ours[1])).all()
    for got, want, ref in zip(ours, theirs, (d_g, d_w), strict=True):
        scale = np.max(np.abs(ref))
        assert np.max(np.abs(np64(got) - np64(want))) <= 1e-5 * scale
        assert np.max(np.abs(np64(got) - ref)) <= 1e-5 * scale
    # The example of the report: the gradient of sum(out ** 2) with respect to g.
    tx, otx = optaxclip.adaptive_grad_clip(0.05), optax.adaptive_grad_clip(0.05)
    squares = [
        jax.jit(
            jax.grad(
                lambda g, t=t: jnp.sum(t.update({"w": g}, t.init({"w": w}), {"w": w})[0]["w"] ** 2)
            )
        )(g)
        for t in (tx, otx)
    ]
    # Clipped units have out ** 2 summing to bound ** 2: a gradient of rounding noise,
    # next to 2 g for the units that pass.
    atol = 1e-6 * float(np.max(np.abs(2 * np64(g))))
    np.testing.assert_allclose(squares[0], squares[1], rtol=1e-5, atol=atol)


def test_gradient_at_all_zero_updates_and_params_is_finite():
    tx = optaxclip.adaptive_grad_clip(0.05)
    _, _, c = _dense(1)
    zeros = jnp.zeros((16, 8), jnp.float32)
    d_g, d_w = _loss(tx, c)(zeros, zeros)
    # Nothing is clipped at g = 0: out = g, so d/dg = c and the params do not matter.
    np.testing.assert_array_equal(d_g, c)
    np.testing.assert_array_equal(d_w, np.zeros((16, 8)))
    d_g, _ = _loss(tx, c)(zeros, _dense(1)[1])
    np.testing.assert_array_equal(d_g, c)


def test_gradient_beyond_the_float32_overflow_point_is_finite_and_right():
    # |g| ~ 1e17..1e21: the squares overflow float32, every unit is clipped, and the
    # derivative of bound / ||g|| needs ||g||**-2, which flushes to zero above 1.8e19.
    g, w, c = _dense(2, scale=1e20)
    d_g, d_w = _loss(optaxclip.adaptive_grad_clip(0.05), c)(g, w)
    ref_g, ref_w = agc_grad64(g, w, c, 0.05, 1e-3, (0,))
    assert np.isfinite(np.asarray(d_g)).all() and np.isfinite(np.asarray(d_w)).all()
    assert np.max(np.abs(np64(d_g) - ref_g)) <= 1e-5 * np.max(np.abs(ref_g))
    assert np.max(np.abs(np64(d_w) - ref_w)) <= 1e-5 * np.max(np.abs(ref_w))


# ---------------------------------------------------------------------------------------
# Underflow and float64 overflow


def agc_hypot(g, w, clipping, eps):
    """AGC on the columns of a rank-2 float64 leaf, with each norm from math.hypot (no
    overflow or underflow in float64, whose squares do both here)."""
    g, w = np64(g), np64(w)
    out = g.copy()
    for j in range(g.shape[1]):
        n = math.hypot(*g[:, j])
        bound = clipping * max(math.hypot(*w[:, j]), eps)
        if n > bound:
            out[:, j] = g[:, j] * (bound / n)
    return out


def _agc_step(clipping, eps):
    tx = optaxclip.adaptive_grad_clip(clipping, eps)

    def step(g, w):
        out, state = tx.update(g, tx.init(w), w)
        return out, state.stats

    return jax.jit(step)


def test_units_of_values_down_to_the_smallest_normal_float32_get_their_norm():
    # Squares below ~1.2e-38 flush to zero, so a plain sum of squares reads 0 for every
    # unit here. Each column is a unit; with eps = 0 the weights set every bound.
    rng = np.random.default_rng(3)
    g_mags = np.array([1e-20, 1e-25, 1e-30, 3e-37])
    w_mags = np.array([1e-22, 1e-30, 4e-38, 2.4e-38])  # times 0.5..1: all normal
    g = jnp.asarray(rng.uniform(0.5, 1, size=(6, 4)) * g_mags, jnp.float32)
    w = jnp.asarray(rng.uniform(0.5, 1, size=(6, 4)) * w_mags, jnp.float32)
    out, stats = _agc_step(10.0, 0.0)({"w": g}, {"w": w})
    expected = agc64(g, w, 10.0, 0.0, (0,))
    assert rel_err(expected, g) > 0.5  # units are clipped
    assert rel_err(out["w"], expected) <= 1e-5
    assert float(stats.norm) == pytest.approx(norm64(g), rel=1e-5, abs=0)
    assert float(stats.clipped_norm) == pytest.approx(norm64(expected), rel=1e-5, abs=0)
    assert bool(stats.clipped)


def test_float64_leaves_beyond_2_to_the_100_squared_and_below_float64_underflow():
    # The float32 rescale 2**-100 still overflows float64 above ~1.7e184; float64
    # squares flush below ~1.5e-154.
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        g_mags = np.array([1e200, 1e250, 1e-170, 1e-300, 1.0])
        w_mags = np.array([1e195, 1e240, 1e-175, 1e-302, 1.0])
        g = jnp.asarray(rng.uniform(0.5, 1, size=(5, 5)) * g_mags, jnp.float64)
        w = jnp.asarray(rng.uniform(0.5, 1, size=(5, 5)) * w_mags, jnp.float64)
        out, _ = _agc_step(0.5, 0.0)({"w": g}, {"w": w})
        assert out["w"].dtype == jnp.float64
        expected = agc_hypot(g, w, 0.5, 0.0)
        assert rel_err(expected[:, :4], g[:, :4]) > 0.5  # the extreme units are clipped
        assert rel_err(out["w"], expected) <= 1e-12


def test_unitwise_norm_reads_tiny_units_and_stays_differentiable():
    x = jnp.asarray([[1e-20, 3e-38, 2.0], [2e-20, 4e-38, 0.0]], jnp.float32)
    expected = np.sqrt(np.sum(np64(x) ** 2, axis=0, keepdims=True)) * np.ones((2, 1))
    assert rel_err(optaxclip.unitwise_norm(x), expected) <= 1e-5
    grad = jax.grad(lambda x: jnp.sum(optaxclip.unitwise_norm(x)))(x)
    np.testing.assert_allclose(grad, 2 * np64(x) / expected, rtol=1e-5)
    with jax.enable_x64(True):
        x64 = jnp.asarray([[1e-200, 1.0], [2e-200, 0.0]], jnp.float64)
        want = np.array([np.sqrt(5) * 1e-200, 1.0])
        np.testing.assert_allclose(optaxclip.unitwise_norm(x64)[0], want, rtol=1e-12)


# ---------------------------------------------------------------------------------------
# Empty leaves


@pytest.mark.parametrize("shape, axis", [((0, 3), None), ((0,), None), ((3, 0), None), ((0, 3), 1)])
def test_unitwise_norm_of_an_empty_array_is_an_empty_array(shape, axis):
    x = jnp.zeros(shape, jnp.float32)
    for fn in (optaxclip.unitwise_norm, jax.jit(optaxclip.unitwise_norm, static_argnums=1)):
        out = fn(x, axis)
        assert out.shape == shape and out.dtype == jnp.float32


def test_agc_passes_an_empty_leaf_through():
    g, w, _ = _dense(5)
    grads = {"empty": jnp.zeros((0, 3), jnp.float32), "w": g, "v": jnp.zeros((0,))}
    params = {"empty": jnp.zeros((0, 3), jnp.float32), "w": w, "v": jnp.zeros((0,))}
    out, stats = _agc_step(0.05, 1e-3)(grads, params)
    assert out["empty"].shape == (0, 3) and out["v"].shape == (0,)
    assert rel_err(out["w"], agc64(g, w, 0.05, 1e-3, (0,))) <= 1e-6
    assert float(stats.norm) == pytest.approx(norm64(g), rel=1e-5)


# ---------------------------------------------------------------------------------------
# Errors that say what to do


@pytest.mark.parametrize("axis", [1.5, (0, 1.5), "0", True, (0, None)])
def test_a_non_integer_axis_is_rejected_when_built_naming_axis(axis):
    with pytest.raises(TypeError, match=r"axis must be an int or a tuple of ints.*got axis="):
        optaxclip.adaptive_grad_clip(0.1, axis=axis)


def test_a_none_params_leaf_is_named_and_says_params_must_match_the_updates():
    tx = optaxclip.adaptive_grad_clip(0.1)
    g = {"a": {"w": jnp.ones((2, 3))}}
    with pytest.raises(ValueError, match=r"params leaf \['a'\]\['w'\] is None.*must match"):
        tx.update(g, tx.init(g), {"a": {"w": None}})


# ---------------------------------------------------------------------------------------
# shard_map / pmap on 8 simulated devices (in a subprocess: JAX fixes its device count)

SCRIPT = pathlib.Path(__file__).with_name("agc_sharded_checks.py")


def test_agc_on_8_devices_matches_float64_and_one_device():
    # Size-1 local slices (an (8, 16) kernel's rows over 8 devices, axis 1 of a stacked
    # (4, 8, 16) leaf, a tuple axis_name, pmap), statistics of updates near 1e20, and
    # jax.grad through the mapped transform; agc_sharded_checks.py documents each.
    report = run_json_script([str(SCRIPT)], devices=8, timeout=300, cheap_codegen=False)
    expected = {
        "size_one_shards/rows_of_a_kernel",
        "size_one_shards/stack_axis_1_of_a_scanned_stack",
        "size_one_shards/tuple_axis_name",
        "pmap/rows_of_a_kernel",
        "overflow_statistics/columns_split",
        "overflow_statistics/rows_split",
        "gradient/normal",
        "gradient/near_1e20",
    }
    assert set(report) == expected, sorted(report)
    failures = {k: v["detail"] for k, v in report.items() if not v["ok"]}
    assert not failures, json.dumps(failures, indent=1)


def test_a_unit_scale_below_the_smallest_normal_float_does_not_flush_the_unit():
    # ||W|| = 2e-4 is below eps = 1e-3: bound = 1e-3 * 1e-3 = 1e-6, and a unit of norm
    # 2e37 needs a scale of 5e-44, below float32's smallest normal number.
    tx = optaxclip.adaptive_grad_clip(1e-3)
    params = {"w": jnp.full((4,), 1e-4)}
    for size in (1e30, 1e33, 1e37):
        out, state = tx.update({"w": jnp.full((4,), size)}, tx.init(params), params)
        np.testing.assert_allclose(np.asarray(out["w"], np.float64), [5e-7] * 4, rtol=1e-5)
        np.testing.assert_allclose(float(state.stats.clipped_norm), 1e-6, rtol=1e-5)


@pytest.mark.parametrize(("weight", "update"), [(1e-10, 1e30), (1e-30, 1e30), (1e-36, 3e38)])
def test_a_unit_scale_far_below_the_smallest_normal_float_does_not_flush(weight, update):
    # The bound (clipping 1 times the weight norm, eps 0) over the update norm is 1e-40
    # down to 3.3e-75 (below 2^-190, ~6e-58, the reach of a split by 2^64), while the
    # clipped unit (the weight's norm along the update's direction) is representable.
    # The kernel's second unit is not clipped and passes as it is.
    w = jnp.array([[0.6 * weight, 1.0], [0.8 * weight, 0.0]], jnp.float32)
    g = jnp.array([[0.6 * update, 0.5], [0.8 * update, 0.0]], jnp.float32)
    tx = optaxclip.adaptive_grad_clip(1.0, eps=0.0)
    out, _ = tx.update({"w": g}, tx.init({"w": w}), {"w": w})
    want = np.array([[0.6 * weight, 0.5], [0.8 * weight, 0.0]])
    np.testing.assert_allclose(np.asarray(out["w"], np.float64), want, rtol=1e-5)


def test_second_derivative_at_a_tiny_unit_scale_matches_float64():
    # Forward over forward through AGC with respect to the weights, where the unit's
    # scale (bound 1e-10 over an update norm of 1e30) is split in two factors: the
    # first factor's tangent is dt / (n / 2^126), never dt * 2^126 (inf above |dt| ~4,
    # which made this NaN). The clipped unit is |w| g/|g| (clipping 1, eps 0), so its
    # second derivative along u and v is g/|g| (u.v/|w| - (w.v)(w.u)/|w|^3).
    w = jnp.array([[0.6e-10, 1.0], [0.8e-10, 0.0]], jnp.float32)
    g = jnp.array([[0.6e30, 0.5], [0.8e30, 0.0]], jnp.float32)
    tx = optaxclip.adaptive_grad_clip(1.0, eps=0.0)

    def clipped(w):
        return tx.update({"w": g}, tx.init({"w": w}), {"w": w})[0]["w"]

    v = jnp.array([[6.0, 0.0], [-8.0, 0.0]], jnp.float32)
    u = jnp.array([[8.0, 0.0], [6.0, 0.0]], jnp.float32)
    second = jax.jvp(lambda w: jax.jvp(clipped, (w,), (v,))[1], (w,), (u,))[1]
    w0, v0, u0 = (np.asarray(a, np.float64)[:, 0] for a in (w, v, u))
    g0 = np.asarray(g, np.float64)[:, 0]
    nw = np.linalg.norm(w0)
    want = g0 / np.linalg.norm(g0) * ((u0 @ v0) / nw - (w0 @ v0) * (w0 @ u0) / nw**3)
    np.testing.assert_allclose(np.asarray(second, np.float64)[:, 0], want, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(second)[:, 1], 0.0)
