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


@pytest.mark.parametrize(
    ("dtype", "limit", "size"),
    [(jnp.complex64, 1e-10, 1e30), (jnp.complex64, 1e-30, 3e37), (jnp.complex128, 3e-300, 1e300)],
)
def test_a_complex_value_far_above_a_tiny_limit_keeps_its_phase_at_the_limit(dtype, limit, size):
    # The factor limit / |z| (1e-40 and below) flushed to 0: the clip returned zeros,
    # though limit * z / |z| is a normal number. Each part is now divided by |z| first.
    with jax.enable_x64(dtype == jnp.complex128):
        z = np.array([3 + 4j, -5j, 1e-3 * limit]) * np.array([size, size, 1.0])
        out, _ = _apply(optaxclip.clip_by_value(limit), [jnp.asarray(z, dtype)])
        want = np.where(np.abs(z) > limit, z / np.abs(z) * limit, z)
        np.testing.assert_allclose(np.asarray(out[0]), want, rtol=1e-6)


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


def _clip64(x, limit):
    x = np64(x)
    if np.iscomplexobj(x):
        mag = np.abs(x)
        return np.where(mag > limit, x * (limit / np.where(mag > 0, mag, 1)), x)
    return np.clip(x, -limit, limit)


@pytest.mark.parametrize(
    "scale, limit",
    [(1.0, 0.5), (1e25, 3e24), (1e-25, 4e-26), (1e30, 1e37), (1.0, 1e-30), (1e-30, 1.0)],
)
@pytest.mark.parametrize("jit", [False, True])
def test_statistics_match_float64_at_every_scale(scale, limit, jit):
    rng = np.random.default_rng(1)
    g = {
        "w": jnp.asarray(rng.normal(size=(6, 7)) * scale, jnp.float32),
        "b": jnp.asarray(rng.normal(size=(7,)) * scale, jnp.float32),
        "z": jnp.asarray((rng.normal(size=3) + 1j * rng.normal(size=3)) * scale, jnp.complex64),
        "empty": jnp.zeros((0, 3), jnp.float32),
    }
    tx = optaxclip.clip_by_value(limit)
    update = jax.jit(tx.update) if jit else tx.update
    _assert_clipped_as_in_float64(g, *update(g, tx.init(g)), limit)


def _assert_clipped_as_in_float64(g, out, state, limit):
    """``out`` and ``state.stats`` against the float64 clip of ``g`` at float32(limit)."""
    lim32 = float(np.float32(limit))
    expected = {k: _clip64(v, lim32) for k, v in g.items()}
    for k in g:
        np.testing.assert_allclose(np64(out[k]), expected[k], rtol=2e-6, atol=0)
    assert float(state.stats.norm) == pytest.approx(norm64(g), rel=1e-5, abs=0)
    assert float(state.stats.clipped_norm) == pytest.approx(norm64(expected), rel=1e-5, abs=0)
    assert bool(state.stats.clipped) == any(
        np.any(np.abs(np64(v)) > lim32) for v in g.values()
    )


def test_nan_reaches_the_norm_and_counts_as_clipped():
    g = [jnp.array([jnp.nan, 5.0]), jnp.array([2.0])]
    out, state = _apply(optaxclip.clip_by_value(1.0), g)
    assert np.isnan(out[0][0]) and float(out[0][1]) == 1.0 and float(out[1][0]) == 1.0
    assert np.isnan(float(state.stats.norm)) and int(state.stats.nonfinite_count) == 1
    assert bool(state.stats.clipped)


def test_zero_gradient_and_no_leaves():
    g = {"w": jnp.zeros((4,), jnp.bfloat16)}
    out, state = _apply(optaxclip.clip_by_value(1.0), g)
    assert float(state.stats.norm) == 0.0 and float(state.stats.clipped_norm) == 0.0
    assert not bool(state.stats.clipped) and out["w"].dtype == jnp.bfloat16
    out, state = _apply(optaxclip.clip_by_value(1.0), {})
    assert out == {} and float(state.stats.norm) == 0.0 and not bool(state.stats.clipped)


def test_each_unit_is_read_by_one_reduction():
    """Norm, clipped norm and whether anything was clipped from one read per big leaf
    (a reduction along rows, then one over the row sums) and one per bucket of small
    leaves (three reductions apart are three reads on XLA:CPU and on the TPU compiler;
    a reduction per small leaf, thousands of kernels)."""
    from optaxclip._norm_engine import SMALL_LEAF

    g = {"a": jnp.ones((64,)), "b": jnp.ones((8, 8)), "big": jnp.ones((SMALL_LEAF,))}
    tx = optaxclip.clip_by_value(0.5)
    # The equations outside the rare branch (the lax.cond's branches are sub-jaxprs).
    eqns = jax.make_jaxpr(tx.update)(g, tx.init(g)).jaxpr.eqns
    top = [e.primitive.name for e in eqns]
    inner = [
        sub
        for e in eqns
        if e.primitive.name == "custom_jvp_call"
        for sub in e.params["call_jaxpr"].jaxpr.eqns
        if sub.primitive.name == "reduce"
    ]
    # The big leaf along rows and over its rows (one reduction along it would add its
    # elements one after another on XLA:CPU), the bucket.
    assert [len(sub.outvars) for sub in inner] == [3, 3, 3]
    common = top[: top.index("cond")]
    assert common.count("concatenate") == 1  # a and b, copied into one bucket
    assert not {"reduce_or", "reduce_and", "reduce_max"} & set(common)
    # The bucket's three sums of its row sums, and the three totals of the units' sums.
    assert common.count("reduce_sum") == 6
    assert top.count("cond") == 1


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
@pytest.mark.parametrize("scale, limit", [(1.0, 0.5), (1e25, 3e24), (1e-25, 4e-26)])
def test_small_leaves_in_buckets_clip_and_measure_as_in_float64(
    monkeypatch, platform, scale, limit
):
    """Many small leaves of two dtypes (and a big one) measured in buckets: the same
    clip and statistics as float64, also where the sums overflow or underflow and the
    rare branch reads the buckets again."""
    from optaxclip import _mechanics
    from optaxclip._norm_engine import SMALL_LEAF

    monkeypatch.setattr(_mechanics, "target_platform", lambda leaves: platform)
    rng = np.random.default_rng(5)
    sizes = [1, 3, 17, 100, 1000, SMALL_LEAF - 1] * 6
    g = {
        f"w{i:02d}": jnp.asarray(rng.normal(size=(n,)) * scale, jnp.float32)
        for i, n in enumerate(sizes)
    }
    g["big"] = jnp.asarray(rng.normal(size=(SMALL_LEAF, 2)) * scale, jnp.float32)
    units, _ = _mechanics._measured_units(
        jax.tree_util.tree_leaves(g), (), [True] * len(g), None
    )
    assert sum(len(u) > 1 for u in units) >= 2  # two buckets or more, and the big leaf
    tx = optaxclip.clip_by_value(limit)
    _assert_clipped_as_in_float64(g, *jax.jit(tx.update)(g, tx.init(g)), limit)
    mixed = {**g, "h0": g["w00"].astype(jnp.bfloat16), "h1": g["w01"].astype(jnp.bfloat16)}
    out, state = jax.jit(tx.update)(mixed, tx.init(mixed))
    assert out["h0"].dtype == jnp.bfloat16
    assert float(state.stats.norm) == pytest.approx(norm64(mixed), rel=1e-5, abs=0)


def test_the_statistics_of_a_leaf_of_a_million_elements_are_float64s():
    # XLA:CPU adds a reduction with several outputs one element after another: summed
    # so, the norm of 2M normal values was 6.3e-4 off. Summed by rows (and a short
    # last row), it is float64's to float32's rounding.
    x = np.random.default_rng(11).standard_normal(1_000_003).astype(np.float32)
    tx = optaxclip.clip_by_value(1.0)
    _, state = jax.jit(tx.update)({"w": jnp.asarray(x)}, tx.init({"w": x}))
    assert float(state.stats.norm) == pytest.approx(norm64(x), rel=1e-6, abs=0)
    want = norm64(np.clip(x.astype(np.float64), -1.0, 1.0))
    assert float(state.stats.clipped_norm) == pytest.approx(want, rel=1e-6, abs=0)


def test_gradient_matches_the_formula():
    tx = optaxclip.clip_by_value(0.5)

    def f(x):
        out, state = tx.update({"a": x}, tx.init({"a": x}))
        return jnp.sum(out["a"] ** 2) + state.stats.norm + state.stats.clipped_norm

    x = np.array([1.0, 0.2, -3.0, 0.0])
    c = np.clip(x, -0.5, 0.5)
    inside = np.abs(x) < 0.5
    expected = 2 * c * inside + x / np.linalg.norm(x) + c * inside / np.linalg.norm(c)
    got = jax.grad(f)(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np64(got), expected, rtol=1e-6)
    got = jax.jit(jax.grad(f))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np64(got), expected, rtol=1e-6)


@pytest.mark.parametrize("scale, limit", [(1.0, 0.5), (1e25, 3e24), (1e-25, 4e-26)])
def test_on_tpu_big_leaves_are_summed_apart_with_the_same_results(monkeypatch, scale, limit):
    """The TPU compiler fuses separate sums of a big leaf into the kernel that writes it
    (the one three-output reduction it reads apart), so there big leaves get three plain
    sums; small ones keep the one reduction. Chosen by the platform compiled for."""
    from optaxclip import _mechanics
    from optaxclip._norm_engine import SMALL_LEAF

    monkeypatch.setattr(_mechanics, "target_platform", lambda leaves: "tpu")
    rng = np.random.default_rng(2)
    g = {
        "big": jnp.asarray(rng.normal(size=(SMALL_LEAF + 3,)) * scale, jnp.float32),
        "big2": jnp.asarray(rng.normal(size=(64, SMALL_LEAF // 64)) * scale, jnp.float32),
        "small": jnp.asarray(rng.normal(size=(7,)) * scale, jnp.float32),
    }
    tx = optaxclip.clip_by_value(limit)
    eqns = jax.make_jaxpr(tx.update)(g, tx.init(g)).jaxpr.eqns
    together = [e for e in eqns if e.primitive.name == "custom_jvp_call"]
    assert len(together) == 1  # the small leaf's, before the rare branch
    _assert_clipped_as_in_float64(g, *jax.jit(tx.update)(g, tx.init(g)), limit)
