"""Property-based tests of the invariants every clip must keep.

Trees mix float32, bfloat16 and float16 leaves with magnitudes from 1e-3 up to values
whose squares overflow float32, and thresholds from 0 upwards.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _reference import norm64, np64
from hypothesis import given
from hypothesis import strategies as st

import optaxclip

SHAPES = [(3,), (2, 3), (4,)]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MAX_EXP = {"float32": 30, "bfloat16": 30, "float16": 4}


@st.composite
def trees(draw, dtypes=tuple(DTYPES)):
    n = draw(st.integers(1, 3))
    leaves = {}
    for i in range(n):
        name = draw(st.sampled_from(dtypes))
        shape = SHAPES[i]  # fixed per slot: fewer distinct trees, fewer compiles
        exp = draw(st.integers(-3, MAX_EXP[name]))
        seed = draw(st.integers(0, 2**16))
        values = np.random.default_rng(seed).normal(size=shape) * 10.0**exp
        leaves[f"leaf{i}"] = jnp.asarray(values, DTYPES[name])
    return leaves


thresholds = st.one_of(st.just(0.0), st.floats(1e-3, 1e3))


def _eps(tree):
    return max(float(jnp.finfo(x.dtype).eps) for x in jax.tree.leaves(tree))


def _assert_same_structure_and_dtypes(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape


@functools.cache
def _jitted(factory):
    # hyperparam_dtype: Optax cannot infer one from a tree mixing bf16 and fp16.
    tx = optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(1.0)
    return tx, jax.jit(tx.update)


def _apply(factory, g, threshold):
    """Runs one step; the threshold is injected so each tree structure compiles once."""
    tx, update = _jitted(factory)
    state = tx.init(g)
    (name,) = state.hyperparams
    state.hyperparams[name] = jnp.asarray(threshold, jnp.float32)
    out, state = update(g, state)
    return out, state.inner_state


@given(trees())
def test_global_norm_matches_float64(tree):
    expected = norm64(tree)
    got = float(optaxclip.global_norm(tree))
    assert np.isfinite(got)
    assert abs(got - expected) <= 1e-5 * expected


@given(trees(), thresholds)
def test_clip_by_global_norm_invariants(tree, max_norm):
    out, state = _apply(optaxclip.clip_by_global_norm, tree, max_norm)
    _assert_same_structure_and_dtypes(out, tree)
    assert all(np.all(np.isfinite(np64(x))) for x in jax.tree.leaves(out))
    assert norm64(out) <= max_norm * (1 + 8 * _eps(tree)) or norm64(out) <= norm64(tree)
    assert norm64(out) <= max(max_norm, norm64(tree)) * (1 + 8 * _eps(tree))
    if norm64(tree) <= max_norm:
        assert all(np.array_equal(np64(a), np64(b)) for a, b in zip(
            jax.tree.leaves(out), jax.tree.leaves(tree), strict=True))
    assert bool(state.stats.clipped) == (float(state.stats.norm) > max_norm)


@given(trees(dtypes=("float32",)), st.floats(1e-3, 1e3))
def test_clip_by_global_norm_keeps_the_direction_in_float32(tree, max_norm):
    out, _ = _apply(optaxclip.clip_by_global_norm, tree, max_norm)
    a = np.concatenate([np64(x).ravel() for x in jax.tree.leaves(tree)])
    b = np.concatenate([np64(x).ravel() for x in jax.tree.leaves(out)])
    if np.any(b):
        cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cosine >= 1 - 1e-5


@given(trees(), thresholds)
def test_clip_by_block_norm_invariants(tree, max_norm):
    out, _ = _apply(optaxclip.clip_by_block_norm, tree, max_norm)
    _assert_same_structure_and_dtypes(out, tree)
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(out), strict=True):
        eps = float(jnp.finfo(x.dtype).eps)
        assert np.all(np.isfinite(np64(y)))
        assert norm64(y) <= max(max_norm, 0.0) * (1 + 8 * eps) or norm64(y) <= norm64(x)
        assert norm64(y) <= max(max_norm, norm64(x)) * (1 + 8 * eps)


@given(trees(), thresholds)
def test_clip_by_block_rms_invariants(tree, threshold):
    out, _ = _apply(optaxclip.clip_by_block_rms, tree, threshold)
    _assert_same_structure_and_dtypes(out, tree)
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(out), strict=True):
        eps = float(jnp.finfo(x.dtype).eps)
        rms_out = norm64(y) / np.sqrt(y.size)
        assert np.all(np.isfinite(np64(y)))
        assert rms_out <= max(threshold, norm64(x) / np.sqrt(x.size)) * (1 + 8 * eps)
        assert rms_out <= threshold * (1 + 8 * eps) or rms_out <= norm64(x) / np.sqrt(x.size)


@given(trees(), thresholds)
def test_clip_by_value_invariants(tree, max_delta):
    out, _ = _apply(optaxclip.clip_by_value, tree, max_delta)
    _assert_same_structure_and_dtypes(out, tree)
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(out), strict=True):
        eps = float(jnp.finfo(x.dtype).eps)
        assert np.all(np.isfinite(np64(y)))
        assert np.all(np.abs(np64(y)) <= max_delta * (1 + eps))
        assert np.all(np.sign(np64(y)) * np.sign(np64(x)) >= 0)  # no sign flips
