"""Per-example clipping (DP-SGD): per_example_global_norm_clip and
per_example_layer_norm_clip against Optax (on finite, normal-range inputs, where Optax is
right), against the rule written out in float64 NumPy (everywhere, including where
Optax's float32/fp16 norms overflow or underflow), and against jax.vmap of
optaxclip.clip_tree_by_global_norm."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import np64

import optaxclip

B = 8  # examples


def _batch(seed, dtype=jnp.float32, scale=1.0, shapes=((), (3,), (4, 5))):
    """Per-example gradients: leaves of shape (B, *shape), example i scaled by 2**(i-3)."""
    rng = np.random.default_rng(seed)
    spread = 2.0 ** (np.arange(B) - 3)
    return {
        f"l{k}": jnp.asarray(
            rng.normal(size=(B, *shape)) * spread.reshape((B,) + (1,) * len(shape)) * scale,
            dtype,
        )
        for k, shape in enumerate(shapes)
    }


# ---------------------------------------------------------------------------------------
# The rules in float64 NumPy, written from the papers / Optax's docstrings, not our code.


def _example_norms64(leaves):
    n = leaves[0].shape[0]
    return np.sqrt(sum(np.sum(np.abs(x.reshape(n, -1)) ** 2, axis=1) for x in leaves))


def _scales64(norms, bound, eps=0.0):
    """min(1, bound / norm), with a clipped norm landing at bound / (1 + eps)."""
    over = norms > bound
    return np.where(over, bound / np.where(over, norms * (1 + eps), 1.0), 1.0), over


def global_clip64(grads, c):
    """(sums, count, magnitudes): sum_i min(1, c / n_i) g_i in float64."""
    leaves = [np64(x) for x in jax.tree.leaves(grads)]
    scales, over = _scales64(_example_norms64(leaves), c)
    sums = [np.tensordot(scales, x, axes=1) for x in leaves]
    mags = [np.tensordot(scales, np.abs(x), axes=1) for x in leaves]
    return sums, int(over.sum()), mags


def layer_clip64(grads, c, uniform=True, eps=0.0):
    leaves = [np64(x) for x in jax.tree.leaves(grads)]
    sizes = np.array([x[0].size for x in leaves], np.float64)
    fractions = np.full(len(leaves), 1 / len(leaves)) if uniform else sizes / sizes.sum()
    sums, counts, mags = [], [], []
    for x, f in zip(leaves, fractions, strict=True):
        scales, over = _scales64(_example_norms64([x]), c * np.sqrt(f), eps)
        sums.append(np.tensordot(scales, x, axes=1))
        mags.append(np.tensordot(scales, np.abs(x), axes=1))
        counts.append(int(over.sum()))
    return sums, counts, mags


def _assert_sums_close(got, want, mags, rtol):
    """Each element within rtol of the sum of the magnitudes of its terms."""
    got = [np64(x) for x in jax.tree.leaves(got)]
    assert len(got) == len(want)
    for g, w, m in zip(got, want, mags, strict=True):
        assert g.shape == w.shape
        assert np.all(np.isfinite(g))
        np.testing.assert_array_less(np.abs(g - w), rtol * m + 1e-300)


# ---------------------------------------------------------------------------------------
# Against Optax where Optax is right.


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_clip_matches_optax_on_finite_normal_range_inputs(seed):
    grads = _batch(seed)
    c = float(np.median(_example_norms64([np64(x) for x in jax.tree.leaves(grads)])))
    got, count = jax.jit(optaxclip.per_example_global_norm_clip)(grads, c)
    want, want_count = optax.per_example_global_norm_clip(grads, c)
    assert int(count) == int(want_count) == B // 2
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6), got, want)
    assert jax.tree.map(lambda x: x.dtype, got) == jax.tree.map(lambda x: x.dtype, want)


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_layer_clip_matches_optax_on_finite_normal_range_inputs(uniform, eps):
    grads = _batch(3)
    got, counts = optaxclip.per_example_layer_norm_clip(grads, 2.0, uniform=uniform, eps=eps)
    want, want_counts = optax.per_example_layer_norm_clip(grads, 2.0, uniform=uniform)
    assert jax.tree.map(int, counts) == jax.tree.map(int, want_counts)
    assert 0 < sum(jax.tree.leaves(jax.tree.map(int, counts))) < B * len(grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6), got, want)


def test_optax_docstring_examples_give_optaxs_answers():
    grads = [jnp.array([[0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]], jnp.float32)]
    for c, want_sum, want_count in ((jnp.inf, 7.0, 0), (0.0, 0.0, 3), (1.25, 1.75, 3)):
        got, count = optaxclip.per_example_global_norm_clip(grads, c)
        np.testing.assert_allclose(got[0], [want_sum] * 3, rtol=1e-6)
        assert int(count) == want_count
        got, counts = optaxclip.per_example_layer_norm_clip(grads, c, eps=0.0)
        np.testing.assert_allclose(got[0], [want_sum] * 3, rtol=1e-6)
        assert [int(n) for n in counts] == [want_count]


# ---------------------------------------------------------------------------------------
# Against float64, including where Optax is wrong.


@pytest.mark.parametrize("decade", [-30, -20, -10, 0, 10, 19, 20, 30])
def test_global_clip_matches_float64_from_1e_minus_30_to_1e30(decade):
    grads = _batch(4, scale=10.0**decade)
    c = 4.0 * 10.0**decade  # some examples clipped, some not, at every scale
    got, count = jax.jit(optaxclip.per_example_global_norm_clip)(grads, c)
    want, want_count, mags = global_clip64(grads, c)
    assert int(count) == want_count and 0 < want_count < B
    _assert_sums_close(got, want, mags, rtol=2e-6)


@pytest.mark.parametrize("decade", [-30, -20, 0, 20, 30])
@pytest.mark.parametrize("uniform", [True, False])
def test_layer_clip_matches_float64_from_1e_minus_30_to_1e30(decade, uniform):
    grads = _batch(5, scale=10.0**decade)
    c = 2.0 * 10.0**decade
    got, counts = jax.jit(
        lambda g: optaxclip.per_example_layer_norm_clip(g, c, uniform=uniform, eps=0.0)
    )(grads)
    want, want_counts, mags = layer_clip64(grads, c, uniform=uniform)
    assert [int(n) for n in jax.tree.leaves(counts)] == want_counts
    _assert_sums_close(got, want, mags, rtol=2e-6)


def test_an_example_of_norm_above_1e19_in_float32_is_clipped_where_optax_drops_it():
    grads = {"w": jnp.array([[3e19, 4e19], [0.3, 0.4]], jnp.float32)}
    got, count = optaxclip.per_example_global_norm_clip(grads, 1.0)
    want, want_count, mags = global_clip64(grads, 1.0)
    _assert_sums_close(got, want, mags, rtol=2e-6)
    assert int(count) == want_count == 1
    optax_sum, _ = optax.per_example_global_norm_clip(grads, 1.0)
    np.testing.assert_allclose(optax_sum["w"], [0.3, 0.4])  # the big example is lost
    np.testing.assert_allclose(want[0], [0.9, 1.2])


def test_fp16_examples_above_256_are_clipped_where_optax_drops_them():
    grads = {
        "w": jnp.array([[300.0, 400.0], [0.3, 0.4], [3.0, 0.0]], jnp.float16),
        "b": jnp.array([[100.0], [0.1], [4.0]], jnp.float16),
    }
    got, count = optaxclip.per_example_global_norm_clip(grads, 1.0)
    want, want_count, mags = global_clip64(grads, 1.0)
    assert jax.tree.map(lambda x: x.dtype, got) == {"w": jnp.float16, "b": jnp.float16}
    _assert_sums_close(got, want, mags, rtol=1e-3)  # one fp16 rounding of the result
    assert int(count) == want_count == 2
    optax_sum, _ = optax.per_example_global_norm_clip(grads, 1.0)
    # Optax's fp16 norm of example 0 overflows: it contributes nothing (0.59 is missing).
    want_w = want[sorted(grads).index("w")]
    assert abs(float(optax_sum["w"][0]) - want_w[0]) > 0.5, (optax_sum, want)

    got, counts = optaxclip.per_example_layer_norm_clip(grads, 1.0)
    want, want_counts, mags = layer_clip64(grads, 1.0, eps=1e-8)
    _assert_sums_close(got, want, mags, rtol=1e-3)
    assert [int(n) for n in jax.tree.leaves(counts)] == want_counts


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_batches_match_float64_and_keep_their_dtype(dtype):
    grads = _batch(6, dtype=dtype, scale=50.0)
    got, count = jax.jit(optaxclip.per_example_global_norm_clip)(grads, 20.0)
    want, want_count, mags = global_clip64(grads, 20.0)
    assert int(count) == want_count
    assert all(x.dtype == dtype for x in jax.tree.leaves(got))
    _assert_sums_close(got, want, mags, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-3)


def test_values_below_1e_minus_19_get_their_true_norm_against_a_tiny_bound():
    # Their squares flush to zero in float32: Optax reads a norm of 0 and keeps them.
    grads = {"w": jnp.array([[3e-25, 4e-25], [3e-27, 4e-27]], jnp.float32)}
    got, count = optaxclip.per_example_global_norm_clip(grads, 1e-26)
    want, want_count, mags = global_clip64(grads, 1e-26)
    assert int(count) == want_count == 1
    _assert_sums_close(got, want, mags, rtol=2e-6)
    optax_sum, optax_count = optax.per_example_global_norm_clip(grads, 1e-26)
    assert int(optax_count) == 0 and float(optax_sum["w"][0]) > 2e-25

    got, counts = optaxclip.per_example_layer_norm_clip(grads, 1e-26, eps=0.0)
    want, want_counts, mags = layer_clip64(grads, 1e-26)
    assert [int(n) for n in jax.tree.leaves(counts)] == want_counts == [1]
    _assert_sums_close(got, want, mags, rtol=2e-6)


def test_a_clip_whose_scale_underflows_still_returns_the_clipped_values():
    # 1e-10 / 5e30 = 2e-41 is below float32's smallest normal number.
    grads = {"w": jnp.array([[3e30, 4e30]], jnp.float32)}
    got, _ = optaxclip.per_example_global_norm_clip(grads, 1e-10)
    np.testing.assert_allclose(got["w"], [6e-11, 8e-11], rtol=1e-6)


def test_mixed_dtype_and_complex_trees_match_float64():
    rng = np.random.default_rng(7)
    grads = {
        "f32": jnp.asarray(rng.normal(size=(B, 6)) * 1e20, jnp.float32),
        "bf16": jnp.asarray(rng.normal(size=(B, 3)), jnp.bfloat16),
        "c64": jnp.asarray(rng.normal(size=(B, 2)) + 1j * rng.normal(size=(B, 2)), jnp.complex64),
    }
    got, count = optaxclip.per_example_global_norm_clip(grads, 1e19)
    want, want_count, mags = global_clip64(grads, 1e19)
    assert int(count) == want_count == B
    # The bf16 leaf's values after a scale of ~1e-20 are ~1e-20: one bf16 rounding.
    for key, rtol in (("bf16", 1e-2), ("c64", 2e-6), ("f32", 2e-6)):
        i = sorted(grads).index(key)
        _assert_sums_close({key: got[key]}, [want[i]], [mags[i]], rtol=rtol)


def test_finite_inputs_never_give_nan_or_zeros():
    for decade in range(-30, 31, 5):
        grads = _batch(8, scale=10.0**decade)
        for c in (10.0**decade, 10.0 ** (decade - 6)):
            got, _ = optaxclip.per_example_global_norm_clip(grads, c)
            layered, _ = optaxclip.per_example_layer_norm_clip(grads, c)
            for x in jax.tree.leaves((got, layered)):
                assert np.all(np.isfinite(np64(x))) and np.any(np64(x) != 0), (decade, c)


# ---------------------------------------------------------------------------------------
# Against jax.vmap of the functional clip.


@pytest.mark.parametrize("decade", [0, 20, -25])
def test_global_clip_equals_the_vmapped_functional_clip_summed(decade):
    grads = _batch(9, scale=10.0**decade)
    c = 0.5 * 10.0**decade
    got, count = optaxclip.per_example_global_norm_clip(grads, c)
    clipped, scales = jax.vmap(lambda g: optaxclip.clip_tree_by_global_norm(g, c))(grads)
    assert int(count) == int(np.sum(np64(scales) < 1))
    _, _, mags = global_clip64(grads, c)
    want = [np64(x).sum(axis=0) for x in jax.tree.leaves(clipped)]
    _assert_sums_close(got, want, mags, rtol=2e-6)


# ---------------------------------------------------------------------------------------
# Edges: zeros, inf bounds, NaN examples, empty trees.


def test_zero_examples_and_a_zero_bound_give_zeros_not_nan():
    grads = {"w": jnp.array([[0.0, 0.0], [3.0, 4.0]])}
    got, count = optaxclip.per_example_global_norm_clip(grads, 0.0)
    np.testing.assert_array_equal(got["w"], [0.0, 0.0])
    assert int(count) == 1  # the zero example is not "clipped"
    got, count = optaxclip.per_example_global_norm_clip(grads, jnp.inf)
    np.testing.assert_array_equal(got["w"], [3.0, 4.0])
    assert int(count) == 0


def test_padding_examples_of_zeros_leave_the_sum_alone():
    grads = _batch(10)
    padded = jax.tree.map(lambda x: jnp.concatenate([x, jnp.zeros_like(x[:3])]), grads)
    got, count = optaxclip.per_example_global_norm_clip(grads, 1.0)
    got_padded, count_padded = optaxclip.per_example_global_norm_clip(padded, 1.0)
    assert int(count) == int(count_padded)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, got_padded)


def test_a_nan_example_reaches_the_sum_where_its_nan_is_and_is_not_counted():
    grads = _batch(11)
    grads["l2"] = grads["l2"].at[2, 1, 1].set(jnp.nan)
    got, count = optaxclip.per_example_global_norm_clip(grads, 0.5)
    want, want_count = optax.per_example_global_norm_clip(grads, 0.5)
    assert int(count) == int(want_count)
    nan_at = np.isnan(np.asarray(got["l2"]))
    assert nan_at.sum() == 1 and nan_at[1, 1]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6), got, want)


def test_empty_trees_pass_through():
    got, count = optaxclip.per_example_global_norm_clip({}, 1.0)
    assert got == {} and int(count) == 0
    got, counts = optaxclip.per_example_layer_norm_clip({}, 1.0)
    assert got == {} and counts == {}


def test_layer_clip_counts_come_in_the_structure_of_grads():
    grads = _batch(12)
    _, counts = optaxclip.per_example_layer_norm_clip(grads, 1.0)
    assert jax.tree.structure(counts) == jax.tree.structure(grads)
    assert all(c.dtype == jnp.int32 and c.shape == () for c in jax.tree.leaves(counts))


# ---------------------------------------------------------------------------------------
# Bad input: errors that name the argument or the leaf.


def test_integer_leaves_are_rejected_naming_the_leaf():
    grads = {"w": jnp.ones((2, 3)), "steps": jnp.array([1, 2])}
    for fn in (optaxclip.per_example_global_norm_clip, optaxclip.per_example_layer_norm_clip):
        with pytest.raises(TypeError, match=r"grads leaf \['steps'\] has dtype int32"):
            fn(grads, 1.0)


def test_leaves_with_different_numbers_of_examples_are_rejected_naming_both():
    grads = {"a": jnp.ones((4, 3)), "b": jnp.ones((5,))}
    with pytest.raises(ValueError, match=r"\['b'\] has shape \(5,\).*\['a'\] has shape \(4, 3\)"):
        optaxclip.per_example_global_norm_clip(grads, 1.0)
    with pytest.raises(ValueError, match=r"grads leaf \['s'\] is a scalar"):
        optaxclip.per_example_layer_norm_clip({"s": jnp.float32(1.0)}, 1.0)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "1.0", (1.0,), jnp.ones(2), True])
def test_bad_bounds_are_rejected_naming_the_argument(bad):
    grads = _batch(13)
    with pytest.raises((ValueError, TypeError), match="l2_norm_clip"):
        optaxclip.per_example_global_norm_clip(grads, bad)
    with pytest.raises((ValueError, TypeError), match="global_l2_norm_clip"):
        optaxclip.per_example_layer_norm_clip(grads, bad)


def test_a_traced_negative_bound_raises_at_run_time():
    grads = _batch(14)
    clip = jax.jit(optaxclip.per_example_global_norm_clip)
    assert int(clip(grads, 1.0)[1]) >= 0
    with pytest.raises(Exception, match="l2_norm_clip is -1.0"):
        jax.block_until_ready(clip(grads, -1.0))


def test_layer_clip_options_are_checked():
    grads = _batch(15)
    with pytest.raises(TypeError, match="uniform"):
        optaxclip.per_example_layer_norm_clip(grads, 1.0, uniform="yes")
    with pytest.raises(ValueError, match="eps"):
        optaxclip.per_example_layer_norm_clip(grads, 1.0, eps=-1e-8)


@pytest.mark.parametrize("layer", [False, True], ids=["global", "layer"])
def test_a_batch_of_no_examples_sums_to_zeros_like_optax(layer):
    grads = [jnp.zeros((0, 3)), jnp.zeros((0, 2, 2), jnp.bfloat16)]
    name = "per_example_layer_norm_clip" if layer else "per_example_global_norm_clip"
    ours, theirs = getattr(optaxclip, name), getattr(optax, name)
    (got, got_count), (want, want_count) = ours(grads, 1.0), theirs(grads, 1.0)
    for g, w, x in zip(got, want, grads, strict=True):
        assert g.shape == w.shape and g.dtype == x.dtype  # ours keeps the leaf dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    np.testing.assert_array_equal(np.asarray(got_count), np.asarray(want_count))


def test_rescue_keeps_no_leaf_sized_temporary():
    """The rescue's per-example factor is one leaf's own value: shared by the leaves of a
    group, XLA:CPU wrote out one (examples, elements) broadcast of it, as big as the
    largest leaf's per-example gradients (24 MiB for 64 x 100,000 floats), every step."""
    grads = {f"w{i}": jax.ShapeDtypeStruct((16, 100_000), jnp.float32) for i in range(4)}
    bound = jax.ShapeDtypeStruct((), jnp.float32)
    leaf_bytes = 16 * 100_000 * 4
    for fn in (optaxclip.per_example_global_norm_clip, optaxclip.per_example_layer_norm_clip):
        compiled = jax.jit(fn).lower(grads, bound).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < leaf_bytes / 4, (fn.__name__, temp / 2**20)


def _clipped_sum_derivatives64(x, d, w, bound):
    """Float64 forward (direction d) and reverse (of <w, sum>) derivatives of
    sum_i min(1, bound / n_i) x_i, one example per row of x."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    over = n > bound
    safe = np.where(over, n, 1.0)
    # d(b x / n) = b (dx / n - x <x, dx> / n^3) where clipped, dx elsewhere.
    rows = np.where(over, bound * (d / safe - x * np.sum(x * d, 1, keepdims=True) / safe**3), d)
    grad = np.where(over, bound * (w / safe - x * (x @ w)[:, None] / safe**3), w)
    return rows.sum(0), grad


@pytest.mark.parametrize("layer", [False, True], ids=["global", "layer"])
@pytest.mark.parametrize("scale", [1.0, 1e18, 1e20, 1e30])
def test_derivatives_of_the_clipped_sum_match_float64_far_from_one(scale, layer):
    # Through the sums of squares the norm's cotangent flushed to zero for examples of
    # norm ~1e18 (2% off); through the clip's factors the scale's own derivative,
    # c dn / n^2, did from ~1e19 on (19% off in forward mode). Each has a rule of its own.
    rng = np.random.default_rng(21)
    x = rng.standard_normal((4, 5)) * scale
    d, w = rng.standard_normal((4, 5)), rng.standard_normal(5)
    clip = (
        (lambda g: optaxclip.per_example_layer_norm_clip([g], 1.0, eps=0.0)[0][0])
        if layer
        else (lambda g: optaxclip.per_example_global_norm_clip([g], 1.0)[0][0])
    )
    g = jnp.asarray(x, jnp.float32)
    _, forward = jax.jit(lambda g, d: jax.jvp(clip, (g,), (d,)))(g, jnp.asarray(d, jnp.float32))
    reverse = jax.jit(jax.grad(lambda g: jnp.dot(clip(g), jnp.asarray(w, jnp.float32))))(g)
    d32, w32 = (np64(jnp.asarray(v, jnp.float32)) for v in (d, w))
    want_forward, want_reverse = _clipped_sum_derivatives64(np64(g), d32, w32, 1.0)
    for got, want in ((forward, want_forward), (reverse, want_reverse)):
        np.testing.assert_allclose(np64(got), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("layer", [False, True], ids=["global", "layer"])
@pytest.mark.parametrize(
    ("value", "bound"), [(3.0, 1.0), (1e20, 1e-20), (1e30, 1e-9), (1e35, 1e-4)]
)
def test_derivative_with_respect_to_the_bound_matches_float64(value, bound, layer):
    # d/dC of C x / |x| is x / |x|. Where C / |x| is below the smallest normal float the
    # scale is applied as two factors; a rule forming x dC / C overflowed there (forward
    # mode gave inf) and one forming s dC / C flushed (reverse mode gave 0).
    x = jnp.array([[value, value], [0.1, 0.2]], jnp.float32)

    def clip(c):
        if layer:
            return optaxclip.per_example_layer_norm_clip([x], c, eps=0.0)[0][0]
        return optaxclip.per_example_global_norm_clip([x], c)[0][0]

    x64 = np64(x)
    n = np.linalg.norm(x64, axis=1, keepdims=True)
    want = np.sum(np.where(n > bound, x64 / n, 0.0), axis=0)  # kept examples: 0
    _, forward = jax.jvp(clip, (jnp.float32(bound),), (jnp.float32(1.0),))
    np.testing.assert_allclose(np64(forward), want, rtol=1e-6)
    np.testing.assert_allclose(np64(jax.jacrev(clip)(jnp.float32(bound))), want, rtol=1e-6)
