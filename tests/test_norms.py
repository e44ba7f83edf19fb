"""global_norm, block_norms and unitwise_norm against float64 NumPy and Optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import norm64, np64

import optaxclip


def _mixed_tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "f32": jnp.asarray(rng.normal(size=(17, 5)), jnp.float32),
        "bf16": jnp.asarray(rng.normal(size=(64,)) * 30, jnp.bfloat16),
        "f16": jnp.asarray(rng.normal(size=(3, 4, 5)) * 100, jnp.float16),
        "c64": jnp.asarray(rng.normal(size=7) + 1j * rng.normal(size=7), jnp.complex64),
        "none": None,
    }


def test_global_norm_matches_float64_on_mixed_dtypes():
    tree = _mixed_tree()
    assert float(optaxclip.global_norm(tree)) == pytest.approx(norm64(tree), rel=1e-6)


def test_global_norm_is_float32_whatever_the_leaf_dtype():
    tree = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(2, jnp.float16)}
    assert optaxclip.global_norm(tree).dtype == jnp.float32


def test_fp16_values_whose_squares_overflow_fp16_give_the_right_norm():
    x = [jnp.array([300.0, 400.0], jnp.float16)]
    assert float(optaxclip.global_norm(x)) == pytest.approx(500.0, rel=1e-6)


@pytest.mark.parametrize("split", [False, True])
def test_float32_values_whose_squares_overflow_float32_give_the_right_norm(split):
    tree = [jnp.array([3e19]), jnp.array([4e19])] if split else [jnp.array([3e19, 4e19])]
    tree.append(jnp.array([1.0, -2.0]))
    assert float(optaxclip.global_norm(tree)) == pytest.approx(norm64(tree), rel=1e-5)


def test_bf16_tree_of_2000_leaves_keeps_float64_accuracy():
    rng = np.random.default_rng(1)
    tree = [jnp.asarray(rng.normal(size=1000), jnp.bfloat16) for _ in range(2000)]
    norm = float(jax.jit(optaxclip.global_norm)(tree))
    assert norm == pytest.approx(norm64(tree), rel=1e-3)


@pytest.mark.parametrize(
    "bad, expected",
    [(jnp.nan, "nan"), (jnp.inf, "inf"), (-jnp.inf, "inf")],
)
@pytest.mark.parametrize("big", [False, True])
def test_nonfinite_input_gives_nonfinite_norm(bad, expected, big):
    leaf = jnp.array([3e19 if big else 3.0, bad])
    norm = float(optaxclip.global_norm([leaf, jnp.ones(2)]))
    assert np.isnan(norm) if expected == "nan" else norm == np.inf


def test_empty_and_none_trees_have_zero_norm():
    assert float(optaxclip.global_norm({})) == 0.0
    assert float(optaxclip.global_norm({"a": None})) == 0.0
    assert float(optaxclip.global_norm({"a": None, "b": jnp.array([3.0, 4.0])})) == 5.0


def test_gradient_of_norm_is_zero_at_zero_and_exact_when_overflowing():
    assert np.array_equal(jax.grad(optaxclip.global_norm)(jnp.zeros(3)), np.zeros(3))
    x = jnp.array([3e19, 4e19])
    np.testing.assert_allclose(jax.grad(optaxclip.global_norm)(x), [0.6, 0.8], rtol=1e-6)
    y = jnp.array([3.0, 4.0])
    np.testing.assert_allclose(jax.grad(optaxclip.global_norm)(y), [0.6, 0.8], rtol=1e-6)


def test_gradient_of_a_norm_near_the_float32_maximum_is_its_direction():
    # 1 / 1e38 flushes to zero, and XLA divides by a broadcast scalar through its
    # reciprocal: x / ||x|| read 0 for every unit of norm 1e38.
    x = jnp.array([[6e37, 8e37], [3.0, 4.0]], jnp.float32)
    direction = np.array([[0.6, 0.8], [0.6, 0.8]])
    grad = jax.grad(lambda x: jnp.sum(optaxclip.unitwise_norm(x, axis=1)[:, 0]))(x)
    np.testing.assert_allclose(grad, direction, rtol=1e-6)
    norm = np.linalg.norm(np.asarray(x, np.float64))
    np.testing.assert_allclose(
        jax.grad(optaxclip.global_norm)(x), np.asarray(x, np.float64) / norm, rtol=1e-6, atol=0
    )
    grad = jax.grad(lambda x: optaxclip.block_norms({"a": x[0], "b": x[1]})["a"])(x)
    np.testing.assert_allclose(grad, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)


def test_global_norm_of_float64_leaves_accumulates_in_float64():
    with jax.enable_x64(True):
        x = jnp.array([1.0, 1e-9], jnp.float64)
        norm = optaxclip.global_norm([x, jnp.ones(1, jnp.float32)])
        assert norm.dtype == jnp.float64
        assert float(norm) == pytest.approx(np.sqrt(2.0 + 1e-18), rel=1e-15, abs=0)


def test_block_norms_match_float64_per_leaf():
    tree = _mixed_tree(2)
    tree["huge"] = jnp.array([3e19, 4e19])
    got = optaxclip.block_norms(tree)
    assert set(got) == {"f32", "bf16", "f16", "c64", "huge", "none"}
    assert got["none"] is None
    del got["none"]
    for key, value in got.items():
        assert value.dtype == jnp.float32
        expected = float(np.sqrt(np.sum(np.abs(np64(tree[key])) ** 2)))
        assert float(value) == pytest.approx(expected, rel=1e-6 if key != "huge" else 1e-5)


def test_block_norms_keep_a_nan_in_its_own_leaf():
    got = optaxclip.block_norms([jnp.array([jnp.nan]), jnp.array([3.0, 4.0])])
    assert np.isnan(got[0]) and float(got[1]) == 5.0


@pytest.mark.parametrize(
    "shape", [(5,), (1, 5), (4, 3), (2, 4, 3), (3, 3, 2, 4), (2, 2, 2, 3, 4)]
)
def test_unitwise_norm_matches_optax_on_its_shapes(shape):
    x = jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)
    expected = optax.transforms.unitwise_norm(x)
    np.testing.assert_allclose(optaxclip.unitwise_norm(x), expected, rtol=1e-6)


def test_unitwise_norm_with_axis_matches_optax():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 4, 5, 6, 2)), jnp.float32)
    axis = (0, 2, 4)
    expected = optax.transforms.unitwise_norm(x, axis=axis)
    np.testing.assert_allclose(optaxclip.unitwise_norm(x, axis=axis), expected, rtol=1e-6)


def test_unitwise_norm_overflow_safe_and_float32_for_half_inputs():
    x = jnp.array([[3e19, 1.0], [4e19, 1.0]], jnp.float32)
    np.testing.assert_allclose(optaxclip.unitwise_norm(x)[0], [5e19, np.sqrt(2)], rtol=1e-5)
    h = jnp.array([[300.0], [400.0]], jnp.float16)
    out = optaxclip.unitwise_norm(h)
    assert out.dtype == jnp.float32 and out.shape == h.shape
    np.testing.assert_allclose(out, [[500.0], [500.0]], rtol=1e-6)


def test_unitwise_norm_rank6_without_axis_raises_helpfully():
    with pytest.raises(ValueError, match="axis"):
        optaxclip.unitwise_norm(jnp.ones((1, 2, 2, 2, 2, 2)))


def test_sharded_argument_shapes_are_checked():
    tree = {"a": jnp.ones(2), "b": jnp.ones(3)}
    # Without axis_name the flags change nothing.
    assert float(optaxclip.global_norm(tree, sharded={"a": True, "b": False})) == pytest.approx(
        np.sqrt(5)
    )
    assert float(
        optaxclip.global_norm(tree, sharded=lambda path, leaf: leaf.size > 2)
    ) == pytest.approx(np.sqrt(5))
    with pytest.raises(ValueError, match="sharded"):
        optaxclip.global_norm(tree, sharded={"a": True})


@pytest.mark.parametrize("scale", [1e-19, 1e-20, 1e-25, 1e-30, 1e-36])
def test_tiny_gradients_are_measured_exactly_not_flushed_to_zero(scale):
    # Squares below ~1.2e-38 flush to zero in float32: N(0, 1) * 1e-19 used to read 13% low.
    rng = np.random.default_rng(0)
    tree = {
        "w": jnp.asarray(rng.standard_normal((64, 32)) * scale, jnp.float32),
        "b": jnp.asarray(rng.standard_normal(7) * scale, jnp.bfloat16),
        "c": jnp.asarray((rng.standard_normal(5) + 1j * rng.standard_normal(5)) * scale,
                         jnp.complex64),
    }
    assert float(optaxclip.global_norm(tree)) == pytest.approx(norm64(tree), rel=1e-5, abs=0)
    for key, got in optaxclip.block_norms(tree).items():
        assert float(got) == pytest.approx(norm64(tree[key]), rel=1e-5, abs=0), key


@pytest.mark.parametrize("beside", [1.0, 1e30])
def test_a_tiny_leaf_beside_normal_or_huge_leaves_reads_its_norm(beside):
    tree = {"a": jnp.full((3,), beside, jnp.float32), "b": jnp.full((3,), 1e-30, jnp.float32)}
    got = optaxclip.block_norms(tree)
    assert float(got["a"]) == pytest.approx(norm64(tree["a"]), rel=1e-5)
    assert float(got["b"]) == pytest.approx(norm64(tree["b"]), rel=1e-5, abs=0)


def test_smallest_normal_values_give_their_norm():
    tiny = float(jnp.finfo(jnp.float32).tiny)
    x = jnp.array([tiny, 2 * tiny, 0.0], jnp.float32)
    assert float(optaxclip.global_norm(x)) == pytest.approx(norm64(x), rel=1e-5, abs=0)
    assert float(optaxclip.global_norm([jnp.array([1e-20, 1e-20])])) == pytest.approx(
        np.sqrt(2) * 1e-20, rel=1e-6, abs=0
    )


def test_tiny_float64_gradients_are_measured_exactly():
    with jax.enable_x64(True):
        x = jnp.array([3e-200, 4e-200], jnp.float64)
        assert float(optaxclip.global_norm(x)) == pytest.approx(5e-200, rel=1e-12, abs=0)


def test_gradient_of_the_norm_of_a_tiny_tree_is_its_direction():
    g = jax.grad(optaxclip.global_norm)(jnp.array([3e-20, 4e-20]))
    np.testing.assert_allclose(g, [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(jax.grad(optaxclip.global_norm)(jnp.zeros(3)), 0.0)


@pytest.mark.parametrize("fn", [optaxclip.global_norm, optaxclip.block_norms])
@pytest.mark.parametrize(
    ("leaf", "match"),
    [
        (jnp.ones(2, jnp.int32), r"tree leaf \['a'\] has dtype int32"),
        ("abc", r"tree leaf \['a'\] is a str"),
        (1.0, r"tree leaf \['a'\] is a float .*jnp.asarray"),
    ],
)
def test_leaves_that_are_not_float_arrays_are_rejected_naming_the_leaf(fn, leaf, match):
    with pytest.raises(TypeError, match=match):
        fn({"a": leaf})


def _programs_compiled(fn) -> int:
    """How many programs XLA compiled while ``fn()`` ran."""
    compiled = []

    def listen(event, duration_s, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(duration_s)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        jax.block_until_ready(fn())
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return len(compiled)


@pytest.mark.parametrize("fn", [optaxclip.global_norm, optaxclip.block_norms])
def test_an_eager_norm_is_one_compiled_program_per_tree_structure(fn):
    # Leaf sizes no other test uses: op by op, the engine compiled each of its
    # operations for each new shape here (97 programs for global_norm, 15 for
    # block_norms). block_norms also indexes the per-leaf vector: up to 3 programs.
    rng = np.random.default_rng(5)
    sizes = [1237 + 7 * i for i in range(40)] + [5003, 70001]
    tree = [jnp.asarray(rng.normal(size=n), jnp.float32) for n in sizes]
    tree.append(jnp.asarray(rng.normal(size=4099), jnp.bfloat16))
    first = _programs_compiled(lambda: fn(tree))
    assert 1 <= first <= (1 if fn is optaxclip.global_norm else 3)
    overflowed = [x * 1e30 if i == 3 else x for i, x in enumerate(tree)]
    assert _programs_compiled(lambda: fn(overflowed)) == 0  # same structure: no compile
    want = norm64(overflowed) if fn is optaxclip.global_norm else [norm64(x) for x in overflowed]
    np.testing.assert_allclose(np.asarray(fn(overflowed), np.float64), want, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 1e-25, 1e25, 1e30])
def test_second_derivative_of_the_norm_matches_float64(scale):
    # H v = (v - u <u, v>) / n with u = x / n. JAX's own derivative of a division goes
    # through n**-2, which overflows below ~5e-20 and flushes above ~2e19 in float32.
    rng = np.random.default_rng(12)
    x = [rng.standard_normal(5000) * scale, rng.standard_normal(30) * scale]
    v = [rng.standard_normal(5000), rng.standard_normal(30)]
    tree = [jnp.asarray(a, jnp.float32) for a in x]
    direction = [jnp.asarray(a, jnp.float32) for a in v]
    grad = jax.grad(optaxclip.global_norm)
    _, hv = jax.jit(lambda t, d: jax.jvp(grad, (t,), (d,)))(tree, direction)
    x64 = np.concatenate([np64(a) for a in tree])
    v64 = np.concatenate([np64(a) for a in direction])
    n = np.linalg.norm(x64)
    u = x64 / n
    want = (v64 - u * (u @ v64)) / n
    got = np.concatenate([np64(a) for a in hv])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
