"""Property-based tests: the invariants an adversarial pass once broke, held over random
trees whose values span 1e-30 to 1e30 in every floating dtype, and over bad arguments.

Example counts are modest by default (conftest.py); set OPTAXCLIP_HYPOTHESIS_EXAMPLES
to run more. Shapes come from a short list so that compiled programs are reused.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import norm64, np64
from hypothesis import given
from hypothesis import strategies as st

import optaxclip
from optaxclip._catalog import BY_NAME, ENTRIES

SHAPES = [(), (1,), (3,), (2, 3), (4, 4)]
# The widest decade range each dtype represents without overflow or subnormals.
DECADES = {
    jnp.float32: (-30, 30),
    jnp.bfloat16: (-30, 30),
    jnp.float16: (-4, 4),
    jnp.complex64: (-30, 30),
}


@st.composite
def leaves(draw, dtype=None):
    dtype = dtype or draw(st.sampled_from(list(DECADES)))
    shape = draw(st.sampled_from(SHAPES))
    low, high = DECADES[dtype]
    decade = draw(st.integers(low, high))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 10.0**decade
    if dtype == jnp.complex64:
        x = x + 1j * rng.standard_normal(shape) * 10.0**decade
    return jnp.asarray(x, dtype)


@st.composite
def trees(draw, dtype=None):
    n = draw(st.integers(1, 4))
    return {f"leaf{i}": draw(leaves(dtype)) for i in range(n)}


def _finite_nonzero(tree) -> bool:
    values = [np64(x) for x in jax.tree.leaves(tree)]
    return all(np.all(np.isfinite(v)) for v in values) and any(np.any(v != 0) for v in values)


@given(trees())
def test_global_norm_equals_float64_over_sixty_decades(tree):
    want = norm64(tree)
    got = float(optaxclip.global_norm(tree))
    assert got == pytest.approx(want, rel=1e-5, abs=0)


@given(trees(), st.booleans())
def test_block_norms_equal_float64_leaf_by_leaf_over_sixty_decades(tree, with_zero_leaf):
    # Each leaf at its own scale: a leaf of values ~1e-25 beside one of ~1e20 (its squares
    # flush to zero while the tree's total overflows) or beside a zero leaf.
    if with_zero_leaf:
        tree = {**tree, "zero": jnp.zeros((3,), jnp.float32)}
    got = optaxclip.block_norms(tree)
    for key, leaf in tree.items():
        assert float(got[key]) == pytest.approx(norm64(leaf), rel=1e-5, abs=0), key


@given(trees(), st.floats(1e-20, 1e20))
def test_clip_by_global_norm_keeps_the_direction_and_caps_the_norm(tree, max_norm):
    tx = optaxclip.clip_by_global_norm(max_norm)
    out, state = tx.update(tree, tx.init(tree))
    norm = norm64(tree)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    for key, x in tree.items():
        assert out[key].dtype == x.dtype
        want = np64(x) * scale
        got = np64(out[key])
        # Half precision rounds each clipped value to its own dtype.
        rtol = 1e-5 if x.dtype in (jnp.float32, jnp.complex64) else 1e-2
        tiny = float(jnp.finfo(x.dtype).tiny)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=tiny / rtol)
    assert float(state.stats.norm) == pytest.approx(norm, rel=1e-5, abs=0)


@given(trees())
def test_the_gradient_of_a_clip_is_finite_wherever_it_is_differentiable(tree):
    tx = optaxclip.clip_by_global_norm(1.0)
    f32 = {k: v for k, v in tree.items() if v.dtype == jnp.float32}
    if not f32:
        return

    def loss(t):
        out = tx.update(t, tx.init(t))[0]
        return sum(jnp.sum(o * jnp.linspace(-1.0, 1.0, o.size).reshape(o.shape))
                   for o in jax.tree.leaves(out))

    grads = jax.grad(loss)(f32)
    assert all(np.all(np.isfinite(np64(g))) for g in jax.tree.leaves(grads))


@st.composite
def fixed_trees(draw):
    """A tree of one structure (so one compiled step serves every example) whose
    values span 1e-30 to 1e30."""
    seed = draw(st.integers(0, 2**31 - 1))
    decade = draw(st.integers(-30, 30))
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal((4, 4)) * 10.0**decade, jnp.float32),
        "b": jnp.asarray(rng.standard_normal(3) * 10.0**decade, jnp.float32),
    }


@functools.cache
def _five_steps(name: str):
    """Five jitted steps of a catalog entry over gradients rescaled by ``factors``."""
    tx = BY_NAME[name].build()

    def run(tree, factors):
        params = jax.tree.map(lambda x: x * 10.0 + 1.0, tree)

        def step(state, factor):
            g = jax.tree.map(lambda x: x * factor, tree)
            out, state = tx.update(g, state, params)
            return state, out

        state, outs = jax.lax.scan(step, tx.init(params), factors)
        return outs, optaxclip.stats(state)

    return jax.jit(run)


@pytest.mark.parametrize("name", [e.name for e in ENTRIES if not e.wraps])
@given(fixed_trees(), st.lists(st.floats(0.5, 2.0), min_size=5, max_size=5))
def test_finite_inputs_never_give_nan_or_an_all_zero_update(name, tree, factors):
    # Five steps over gradients of one scale: warm-ups end, histories fill, and no step
    # may return NaN or zero out the update.
    if name == "adagc" and float(optaxclip.global_norm(tree)) < 1e-3:
        # AdaGC's eps (1e-6, the reference's) sits in its clip's denominator: a tensor
        # whose norm is within a few orders of it is shrunk toward zero when clipped.
        return
    outs, s = _five_steps(name)(tree, jnp.asarray(factors, jnp.float32))
    for t in range(5):
        assert _finite_nonzero(jax.tree.map(lambda x, t=t: x[t], outs)), (name, t)
    assert all(np.isfinite(float(s[k])) for k in ("norm", "clipped_norm")), s


@given(
    st.one_of(
        st.tuples(st.floats(0, 10), st.floats(0, 10)),
        st.lists(st.floats(0, 10), min_size=1, max_size=3),
        st.text(max_size=4),
        st.complex_numbers(max_magnitude=10, allow_nan=False),
        st.dictionaries(st.text(max_size=2), st.floats(0, 1), min_size=1, max_size=2),
    )
)
def test_thresholds_that_are_not_real_scalars_are_always_rejected(bad):
    for build, name in (
        (optaxclip.clip_by_global_norm, "max_norm"),
        (optaxclip.clip_by_value, "max_delta"),
        (optaxclip.clip_by_block_rms, "threshold"),
        (optaxclip.adaptive_grad_clip, "clipping"),
    ):
        with pytest.raises(TypeError, match=name):
            build(bad)


@given(st.floats(allow_nan=True, allow_infinity=False).filter(lambda x: math.isnan(x) or x < 0))
def test_negative_or_nan_thresholds_are_rejected_when_built(bad):
    with pytest.raises(ValueError, match="max_norm"):
        optaxclip.clip_by_global_norm(bad)


@given(trees(jnp.float32))
def test_skip_nonfinite_leaves_the_inner_state_bitwise_on_a_poisoned_step(tree):
    tx = optaxclip.skip_nonfinite(optax.adam(0.1))
    state = tx.init(tree)
    key = next(iter(tree))
    poisoned = {**tree, key: tree[key].at[(0,) * tree[key].ndim].set(jnp.nan)}
    out, new = tx.update(poisoned, state, tree)
    assert all(np.all(np64(x) == 0) for x in jax.tree.leaves(out))
    for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(new.inner_state),
                    strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
