"""The fast-compiling norm: buckets of small leaves, a rescue pass behind lax.cond.

``leaf_and_global_norms`` copies leaves of fewer than 4096 elements into a few shared
buckets (so that thousands of leaves compile to a few dozen kernels) and rescues
overflowed sums with a rescaled pass. These tests pin that this changes nothing a
user can see: per-leaf and global norms equal a float64 NumPy reference on trees of
1 to 3000 leaves of mixed sizes and dtypes, with overflow and NaN/inf; gradients are
right; and on 8 devices under plain ``jit`` the program gathers no gradient and
all-reduces only scalars or short vectors.
"""

from __future__ import annotations

import collections
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _devices import run_json_script
from _reference import norm64, norms64, np64

import optaxclip
from optaxclip import _mechanics, _norm_engine
from optaxclip._mechanics import SHARED_SCALE_LEAVES
from optaxclip._norm_engine import SMALL_LEAF, leaf_and_global_norms

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.complex64)
# Sizes below and above the bucketing limit (4096), repeated ones (rows of exactly
# that size) and scattered ones (zero-padded rows), empty and scalar leaves.
SIZES = (1, 2, 3, 7, 64, 100, 500, 1000, 4095, 5000, 20000)


def _tree(n_leaves: int, seed: int) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    leaves = []
    for i in range(n_leaves):
        size = int(SIZES[i % len(SIZES)] if n_leaves < 100 else rng.choice(SIZES[:-2]))
        dtype = DTYPES[i % len(DTYPES)]
        shape = (size,) if i % 3 else (1, size)
        values = rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 30.0])
        if dtype == jnp.complex64:
            values = values + 1j * rng.standard_normal(shape)
        leaves.append(jnp.asarray(values, dtype))
    if n_leaves >= 10:
        leaves[3] = jnp.zeros((0,), jnp.float32)
        leaves[5] = jnp.asarray(rng.standard_normal(()), jnp.float32)
    return leaves


def _reference(leaves: list[jax.Array]) -> tuple[np.ndarray, float]:
    return np.array(norms64(leaves)), norm64(leaves)


def _set(leaves: list[jax.Array], index: int, values: list[float]) -> list[jax.Array]:
    """A copy of ``leaves`` whose leaf ``index`` starts with ``values``."""
    out = list(leaves)
    flat = np64(out[index]).reshape(-1)
    flat[: len(values)] = values
    out[index] = jnp.asarray(flat.reshape(out[index].shape), out[index].dtype)
    return out


def _scaled(leaves: list[jax.Array], scales: dict[int, float]) -> list[jax.Array]:
    """A copy of ``leaves`` whose leaf ``i`` is multiplied by ``scales[i]`` (in float64)."""
    out = list(leaves)
    for i, scale in scales.items():
        out[i] = jnp.asarray(np64(out[i]) * scale, out[i].dtype)
    return out


def _tiny_leaf_cases(leaves: list[jax.Array], small: int, big: int) -> dict[str, list]:
    """One leaf whose squares all flush to zero in float32 (values ~1e-25) beside normal
    leaves, beside an overflowing one, beside a zero leaf: the tree's total is normal or
    inf, so only the leaf's own sum says it needs rescuing."""
    return {
        "a tiny small leaf": _scaled(leaves, {small: 1e-25}),
        "a tiny big leaf": _scaled(leaves, {big: 1e-25}),
        "a tiny leaf beside an overflow": _set(_scaled(leaves, {small: 1e-25}), big, [3e19]),
        "a tiny leaf beside a zero leaf": _scaled(leaves, {small: 1e-25, big: 0.0}),
    }


def _small_f32_leaf(leaves: list[jax.Array]) -> int:
    return next(
        i
        for i, x in enumerate(leaves)
        if x.dtype == jnp.float32 and 2 <= x.size < SMALL_LEAF and i != 5
    )


norms = jax.jit(lambda leaves: leaf_and_global_norms(leaves))


@pytest.mark.parametrize("n_leaves", [1, 10, 300, 3000])
def test_bucketed_norms_match_float64_on_mixed_trees(n_leaves):
    leaves = _tree(n_leaves, seed=n_leaves)
    cases = {"plain": leaves}
    if n_leaves > 1:
        small = _small_f32_leaf(leaves)
        cases["overflow in a small leaf"] = _set(leaves, small, [3e19, 4e19])
        cases["nan"] = _set(leaves, small, [np.nan])
        cases["inf"] = _set(leaves, small, [np.inf])
    big = [i for i, x in enumerate(leaves) if x.size >= SMALL_LEAF and x.dtype == jnp.float32]
    if big:
        cases["overflow in a big leaf"] = _set(leaves, big[0], [3e19, 4e19])
    if n_leaves > 1:  # with a big float32 leaf (reduced on its own) at the end
        with_big = [*leaves, jnp.asarray(np.linspace(-2, 3, 2 * SMALL_LEAF), jnp.float32)]
        cases.update(_tiny_leaf_cases(with_big, _small_f32_leaf(leaves), len(leaves)))
    for name, tree in cases.items():
        got_leaves, got = norms(tree)
        got_leaves = np.asarray(got_leaves, np.float64)
        want_leaves, want = _reference(tree)
        assert got_leaves.dtype == np.float64 and got_leaves.shape == (len(tree),)
        if name in ("nan", "inf"):
            assert np.isnan(float(got)) if name == "nan" else float(got) == np.inf, name
            np.testing.assert_array_equal(np.isnan(got_leaves), np.isnan(want_leaves))
            np.testing.assert_array_equal(np.isinf(got_leaves), np.isinf(want_leaves))
            ok = np.isfinite(want_leaves)
            np.testing.assert_allclose(got_leaves[ok], want_leaves[ok], rtol=1e-5)
        else:
            np.testing.assert_allclose(got_leaves, want_leaves, rtol=1e-5, err_msg=name)
            assert float(got) == pytest.approx(want, rel=1e-5, abs=0), name


@pytest.mark.parametrize(
    "sizes",
    [(0,), (0, 5000), (0, 5000, 6000), (0, 50), (0, 0, 5000, 50)],
    ids=["empty", "empty+big", "empty+two big", "empty+small", "empties+big+small"],
)
@pytest.mark.parametrize("overflow", [False, True])
def test_empty_leaves_beside_any_mix_of_big_and_small_leaves(sizes, overflow):
    rng = np.random.default_rng(len(sizes))
    tree = [jnp.asarray(rng.standard_normal(size), jnp.float32) for size in sizes]
    if overflow and max(sizes) > 0:
        tree = _set(tree, int(np.argmax(sizes)), [3e19, -4e19])
    got_leaves, got = norms(tree)
    want_leaves, want = _reference(tree)
    np.testing.assert_allclose(np.asarray(got_leaves, np.float64), want_leaves, rtol=1e-5)
    assert float(got) == pytest.approx(want, rel=1e-5, abs=0)


def _assert_norms_match_float64(got_leaves, got, tree, name: str) -> np.ndarray:
    """Per-leaf and global norms equal float64's (rtol 1e-5); NaN exactly where it is,
    the global norm NaN in the case named "nan". Returns float64's per-leaf norms."""
    want_leaves, want = _reference(tree)
    got_leaves = np.asarray(got_leaves, np.float64)
    np.testing.assert_array_equal(np.isnan(got_leaves), np.isnan(want_leaves), name)
    ok = ~np.isnan(want_leaves)
    np.testing.assert_allclose(got_leaves[ok], want_leaves[ok], rtol=1e-5, err_msg=name)
    if name == "nan":
        assert np.isnan(float(got))
    else:
        assert float(got) == pytest.approx(want, rel=1e-5, abs=0), name
    return want_leaves


def test_hundreds_of_big_leaves_keep_nan_inf_and_overflow():
    # Over 256 leaves reduced on their own: their sums are stacked in groups.
    rng = np.random.default_rng(7)
    tree = [jnp.asarray(rng.standard_normal(SMALL_LEAF + 8 * i), jnp.float32) for i in range(300)]
    for name, values in {"plain": None, "overflow": [3e19, 4e19], "nan": [np.nan]}.items():
        case = tree if values is None else _set(tree, 271, values)
        _assert_norms_match_float64(*norms(case), case, name)


def test_gradient_through_buckets_and_rescue_is_x_over_norm():
    leaves = [x for x in _tree(200, seed=3) if x.dtype == jnp.float32 and x.size]
    grad = jax.jit(jax.grad(lambda t: leaf_and_global_norms(t)[1]))
    for tree in (leaves, _set(leaves, _small_f32_leaf(leaves), [3e19, 4e19])):
        _, norm = _reference(tree)
        for g, x in zip(grad(tree), tree, strict=True):
            np.testing.assert_allclose(g, np64(x) / norm, rtol=1e-5, atol=1e-30)
    zero = grad([jnp.zeros_like(x) for x in leaves])
    assert not any(np.any(g) for g in zero)


@pytest.fixture
def tpu_layout(monkeypatch):
    """The norm engine's layout for a TPU target (DESIGN §9), traced on this CPU."""
    monkeypatch.setattr(_norm_engine, "target_platform", lambda leaves: "tpu")


def _global_only(leaves):
    return leaf_and_global_norms(leaves, leaf_norms=False)[1]


def _elements_concatenated(jaxpr) -> int:
    """How many elements the concatenations of ``jaxpr`` write (in the functions it calls
    too), outside its conditionals."""
    total = 0
    for e in jaxpr.eqns:
        if e.primitive.name == "cond":
            continue
        if e.primitive.name == "concatenate":
            total += e.outvars[0].aval.size
        for value in e.params.values():
            inner = getattr(value, "jaxpr", value)  # a ClosedJaxpr's Jaxpr, or a Jaxpr
            if hasattr(inner, "eqns"):
                total += _elements_concatenated(inner)
    return total


def _concatenations(jaxpr) -> list:
    """Every concatenation of ``jaxpr``, in the functions and conditionals it calls too."""
    return [e for e in _equations(jaxpr) if e.primitive.name == "concatenate"]


def _equations(jaxpr) -> list:
    """Every equation of ``jaxpr``, in the functions and conditionals it calls too."""
    found = list(jaxpr.eqns)
    for e in jaxpr.eqns:
        for value in e.params.values():
            for inner in value if isinstance(value, tuple) else (value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    found += _equations(inner)
    return found


def _outside_conditionals(jaxpr) -> list:
    """The equations of ``jaxpr`` and of the functions it calls (the norms' derivative
    rule wraps the engine in one), the conditionals themselves but not their branches."""
    found = list(jaxpr.eqns)
    for e in jaxpr.eqns:
        if e.primitive.name == "cond":
            continue
        for value in e.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found += _outside_conditionals(inner)
    return found


def _longest_addition_chain(jaxpr) -> int:
    """The most scalar additions of ``jaxpr`` (or of a function it calls, outside its
    conditionals) that each add to the one before: n for n values added one by one, about
    log2(n) for a balanced tree."""
    longest, depth = 0, {}
    for e in jaxpr.eqns:
        if e.primitive.name == "cond":
            continue
        if e.primitive.name == "add" and e.outvars[0].aval.shape == ():
            d = 1 + max((depth.get(v, 0) for v in e.invars if not hasattr(v, "val")), default=0)
            depth[e.outvars[0]] = d
            longest = max(longest, d)
        for value in e.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                longest = max(longest, _longest_addition_chain(inner))
    return longest


def _tpu_cases(n_leaves: int) -> tuple[list[jax.Array], dict[str, list[jax.Array]]]:
    """A tree of mixed sizes and dtypes plus a big leaf, and its variants: overflow in a
    small and in a big leaf, the whole tree tiny, a NaN, an inf."""
    big_leaf = np.random.default_rng(0).standard_normal((8, SMALL_LEAF // 4))
    leaves = [*_tree(n_leaves, seed=n_leaves), jnp.asarray(big_leaf, jnp.float32)]
    small, big = _small_f32_leaf(leaves), len(leaves) - 1
    return leaves, {
        "plain": leaves,
        "overflow in a small leaf": _set(leaves, small, [3e19, 4e19]),
        "overflow in a big leaf": _set(leaves, big, [3e19, -4e19]),
        "tiny": [jnp.asarray(np64(x) * 1e-25, x.dtype) for x in leaves],
        "nan": _set(leaves, small, [np.nan]),
        "inf": _set(leaves, big, [np.inf]),
        **_tiny_leaf_cases(leaves, small, big),
    }


@pytest.mark.parametrize("n_leaves", [10, 300])
def test_tpu_global_norm_sums_each_leaf_and_rescues_in_one_concatenation(tpu_layout, n_leaves):
    """For a TPU the global norm reduces every leaf on its own (no bucket copies) and its
    rescue sums the small leaves as one concatenation per dtype: the same norms as float64,
    also where a small or big leaf overflows, the whole tree is tiny, or a NaN/inf is in."""
    leaves, cases = _tpu_cases(n_leaves)
    jaxpr = jax.make_jaxpr(_global_only)(leaves).jaxpr
    # Outside the conditional nothing is copied, where the CPU layout's buckets copy the
    # small leaves: not even the per-leaf sums, which are added one by one (a stack of
    # them made the TPU compiler read 641 of 2,000 leaves from HBM twice). Inside its
    # rare branch the small leaves of each dtype are one concatenation.
    assert _elements_concatenated(jaxpr) == 0
    # Added one after another, as Optax's clip adds them: a balanced tree of additions
    # made the TPU compiler stage monitor's 10 leaves of 2M through on-chip memory.
    assert _longest_addition_chain(jaxpr) >= sum(x.size > 0 for x in leaves)
    with pytest.MonkeyPatch.context() as cpu:
        cpu.setattr(_norm_engine, "target_platform", lambda leaves: "cpu")
        # A new function: JAX caches the trace of the one traced above for the TPU.
        buckets = jax.make_jaxpr(lambda t: _global_only(t))(leaves).jaxpr
    assert _elements_concatenated(buckets) > sum(x.size for x in leaves if x.size < SMALL_LEAF)
    (cond,) = [e for e in _outside_conditionals(jaxpr) if e.primitive.name == "cond"]
    rare = max(cond.params["branches"], key=lambda b: len(b.jaxpr.eqns)).jaxpr
    small_dtypes = collections.Counter(x.dtype for x in leaves if 0 < x.size < SMALL_LEAF)
    shared = sum(count > 1 for count in small_dtypes.values())  # a lone leaf is not copied
    assert [e.primitive.name for e in rare.eqns].count("concatenate") == shared > 0
    norm = jax.jit(_global_only)
    for name, tree in cases.items():
        want = norm64(tree)
        got = float(norm(tree))
        if name == "nan":
            assert np.isnan(got)
        else:
            assert got == pytest.approx(want, rel=1e-5, abs=0), name
            assert want == 0 or got > 0, name


def test_tpu_global_norm_gradient_and_vmap(tpu_layout):
    _check_global_norm_gradient_and_vmap(seed=4)


def _check_global_norm_gradient_and_vmap(seed: int) -> None:
    """d||x|| / dx = x / ||x|| on a plain tree, one with an overflowing small or big
    leaf and a tiny one; 0 at zero; per-example rows (plain, scaled by 1e25 and by
    1e-25) under vmap."""
    leaves = [x for x in _tree(40, seed=seed) if x.dtype == jnp.float32 and x.size]
    big = next(i for i, x in enumerate(leaves) if x.size >= SMALL_LEAF)
    grad = jax.jit(jax.grad(_global_only))
    for tree in (
        leaves,
        _set(leaves, _small_f32_leaf(leaves), [3e19, 4e19]),
        _set(leaves, big, [3e19, -4e19]),
        [jnp.asarray(np64(x) * 1e-25, x.dtype) for x in leaves],
    ):
        norm = norm64(tree)
        for g, x in zip(grad(tree), tree, strict=True):
            np.testing.assert_allclose(g, np64(x) / norm, rtol=1e-5, atol=1e-30)
    assert not any(np.any(g) for g in grad([jnp.zeros_like(x) for x in leaves]))
    # Per example (the conditional becomes a select under vmap): rows scaled apart.
    rows = [jnp.stack([x, x * 1e25, x * 1e-25]) for x in leaves]
    got = jax.jit(jax.vmap(_global_only))(rows)
    want = [norm64([r[k] for r in rows]) for k in range(3)]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5)


@pytest.mark.parametrize("n_leaves", [10, 300])
def test_tpu_leaf_norms_sum_each_leaf_and_rescue_one_copy_per_row_width(tpu_layout, n_leaves):
    """For a TPU per-leaf norms too reduce every leaf on its own (no bucket copies on the
    common path); the rescue copies the small leaves once, in each of its runs of leaves
    one concatenation per dtype and row width (not per bucket): per-leaf and global norms
    equal float64's in every case."""
    leaves, cases = _tpu_cases(n_leaves)
    jaxpr = jax.make_jaxpr(leaf_and_global_norms)(leaves).jaxpr
    assert _elements_concatenated(jaxpr) <= 2 * len(leaves) + 1
    (cond,) = [e for e in _outside_conditionals(jaxpr) if e.primitive.name == "cond"]
    rare = max(cond.params["branches"], key=lambda b: len(b.jaxpr.eqns)).jaxpr
    small_kinds = {(x.dtype, x.size) for x in leaves if 0 < x.size < SMALL_LEAF}
    copies = _concatenations(rare)
    copied = sum(e.outvars[0].aval.size for e in copies)
    # In each run, one per dtype and row width and one that puts the sums in the leaves'
    # order; one that joins the runs' sums, two that order the whole.
    runs = _norm_engine._RESCUE_RUNS
    assert 0 < len(copies) <= runs * (len(small_kinds) + 1) + 3
    assert copied >= sum(x.size for x in leaves if x.size < SMALL_LEAF)
    norms = jax.jit(leaf_and_global_norms)
    for name, tree in cases.items():
        got_leaves, got = norms(tree)
        want_leaves = _assert_norms_match_float64(got_leaves, got, tree, name)
        ok = ~np.isnan(want_leaves)
        assert np.all((np.asarray(got_leaves)[ok] > 0) | (want_leaves[ok] == 0)), name


def _check_leaf_norms_gradient_and_vmap(seed: int) -> None:
    """d||x_i|| / dx_i = x_i / ||x_i|| on a plain tree, one with an overflowing leaf and
    ones with a tiny small or big leaf (each rescued alone); 0 at zero; per-example rows
    under vmap."""
    leaves = [x for x in _tree(40, seed=seed) if x.dtype == jnp.float32 and x.size]
    grad = jax.jit(jax.grad(lambda t: jnp.sum(leaf_and_global_norms(t)[0])))
    small = _small_f32_leaf(leaves)
    big = next(i for i, x in enumerate(leaves) if x.size >= SMALL_LEAF)
    for tree in (
        leaves,
        _set(leaves, small, [3e19, 4e19]),
        _scaled(leaves, {small: 1e-25}),
        _scaled(leaves, {big: 1e-25}),
    ):
        want_leaves, _ = _reference(tree)
        for g, x, n in zip(grad(tree), tree, want_leaves, strict=True):
            np.testing.assert_allclose(g, np64(x) / n, rtol=1e-5, atol=1e-30)
    assert not any(np.any(g) for g in grad([jnp.zeros_like(x) for x in leaves]))
    rows = [jnp.stack([x, x * 1e25, x * 1e-25]) for x in leaves]
    got = jax.jit(jax.vmap(lambda t: leaf_and_global_norms(t)[0]))(rows)
    want = [norms64([r[k] for r in rows]) for k in range(3)]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5)


def test_leaf_norms_gradient_and_vmap():
    _check_leaf_norms_gradient_and_vmap(seed=6)


def test_tpu_leaf_norms_gradient_and_vmap(tpu_layout):
    _check_leaf_norms_gradient_and_vmap(seed=5)


@pytest.fixture
def gpu_layout(monkeypatch):
    """The layouts a GPU target gets (DESIGN §9), the norm engine's and the per-leaf
    scaling's, traced on this CPU."""
    for module in (_norm_engine, _mechanics):
        monkeypatch.setattr(module, "target_platform", lambda leaves: "gpu")


@pytest.mark.parametrize("n_leaves", [10, 300])
@pytest.mark.parametrize("leaf_norms", [False, True], ids=["global", "per_leaf"])
def test_gpu_norms_sum_at_three_scales_with_no_rescue_branch(gpu_layout, n_leaves, leaf_norms):
    """For a GPU (whose compiler runs a rescue conditional as a select, on every step)
    every sum of squares is taken at three scales in its one read and nothing is
    conditional: each big leaf by three reductions of its own, never copied, the small
    ones in the CPU layout's buckets. Per-leaf and global norms equal float64's where a
    small or a big leaf overflows, the tree or one leaf is tiny, or a NaN/inf is in."""
    leaves, cases = _tpu_cases(n_leaves)
    cases.update(_tiny_leaf_cases(leaves, _small_f32_leaf(leaves), len(leaves) - 1))

    def measure(tree):
        return leaf_and_global_norms(tree, leaf_norms=leaf_norms)

    eqns = _equations(jax.make_jaxpr(measure)(leaves).jaxpr)
    names = collections.Counter(e.primitive.name for e in eqns)
    assert names["cond"] == 0
    big = sum(x.size >= SMALL_LEAF for x in leaves)
    reads = [e for e in eqns if e.primitive.name == "reduce_sum"]
    assert sum(e.invars[0].aval.size >= SMALL_LEAF for e in reads) == 3 * big > 0
    copies = [e for e in eqns if e.primitive.name == "concatenate"]
    big_sizes = {x.size for x in leaves if x.size >= SMALL_LEAF}
    assert not any(v.aval.size in big_sizes for e in copies for v in e.invars)
    small = sum(x.size for x in leaves if 0 < x.size < SMALL_LEAF)
    assert sum(e.outvars[0].aval.size for e in copies) >= small  # the buckets
    measured = jax.jit(measure)
    for name, tree in cases.items():
        got_leaves, got = measured(tree)
        if leaf_norms:
            _assert_norms_match_float64(got_leaves, got, tree, name)
        elif name == "nan":
            assert np.isnan(float(got))
        else:
            assert float(got) == pytest.approx(norm64(tree), rel=1e-5, abs=0), name


@pytest.mark.parametrize("clip", ["clip_by_block_norm", "adagc"])
def test_gpu_per_leaf_clips_read_their_factors_as_scalars_behind_a_barrier(gpu_layout, clip):
    """For a GPU each leaf's factors come out of the per-leaf vectors behind one
    optimization barrier (its kernel then reads scalars of its own: 15.9 s of CUDA
    compile at 2,000 leaves instead of 61-66 s), and the clipped leaves are the CPU
    layout's, also where a leaf overflows or is tiny."""
    leaves, cases = _tpu_cases(10)
    tree = [x for x in cases["overflow in a big leaf"] if x.dtype == jnp.float32]
    tree[0] = tree[0] * 1e-25
    tx = {
        "clip_by_block_norm": lambda: optaxclip.clip_by_block_norm(0.5),
        "adagc": lambda: optaxclip.adagc(warmup_steps=100),
    }[clip]()

    def step(grads):
        return tx.update(grads, tx.init(grads), grads)[0]

    barriers = [
        e for e in _equations(jax.make_jaxpr(step)(tree).jaxpr)
        if e.primitive.name == "optimization_barrier"
    ]
    factors = [v for e in barriers for v in e.invars if v.aval.shape == ()]
    assert len(factors) >= 2 * sum(x.size > 0 for x in tree)
    got = jax.jit(step)(tree)
    with pytest.MonkeyPatch.context() as cpu:
        for module in (_norm_engine, _mechanics):
            cpu.setattr(module, "target_platform", lambda leaves: "cpu")
        want = jax.jit(lambda g: step(g))(tree)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np64(g), np64(w), rtol=1e-6, atol=0)
    assert any(np.any(np64(g) != np64(x)) for g, x in zip(got, tree, strict=True))


@pytest.mark.parametrize("scale", [1.0, 1e-25], ids=["ordinary", "tiny"])
def test_gpu_norm_second_derivative_is_finite_and_exact(gpu_layout, scale):
    """The Hessian-vector product of the global norm, H v = v / n - x (x . v) / n^3, on
    a big leaf holding zeros (its values below the up-scaled sum's clamp), ordinary and
    tiny: the second derivative must not form up * up (2^128) nor n**-2."""
    x = np.random.default_rng(3).standard_normal(5000) * scale
    x[:100] = 0
    v = np.random.default_rng(4).standard_normal(5000)
    tree = [jnp.asarray(x, jnp.float32)]
    grad = jax.grad(_global_only)
    _, hv = jax.jit(lambda t, u: jax.jvp(grad, (t,), (u,)))(tree, [jnp.asarray(v, jnp.float32)])
    x64, v64 = np64(tree[0]), np64(jnp.asarray(v, jnp.float32))
    n = np.linalg.norm(x64)
    want = v64 / n - x64 * (x64 @ v64) / n**3
    np.testing.assert_allclose(np64(hv[0]), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_gpu_norms_gradient_and_vmap(gpu_layout):
    _check_global_norm_gradient_and_vmap(seed=8)
    _check_leaf_norms_gradient_and_vmap(seed=9)


def test_thousands_of_small_leaves_compile_to_few_kernels():
    leaves = [jnp.ones((500,), jnp.float32) for _ in range(2000)]
    text = jax.jit(optaxclip.global_norm).lower(leaves).compile().as_text()
    kernels = len(re.findall(r"=\s*\S+\s+(?:fusion|reduce|concatenate)\(", text))
    # One concatenation and one reduction per bucket, not one reduction per leaf.
    assert kernels < 400, kernels
    assert float(jax.jit(optaxclip.global_norm)(leaves)) == pytest.approx(1000.0)


def _fused_bodies(text: str) -> dict[str, list[str]]:
    """The instructions of each computation in a compiled module's text, by name."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        start = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if start:
            current = bodies.setdefault(start.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return bodies


@pytest.mark.parametrize("clip", ["clip_by_global_norm", "clip_by_block_rms", "adagc"])
def test_each_leaf_kernel_reads_its_scale_and_computes_no_scalars(clip):
    # On XLA:CPU the scale (hi, lo) leaves a lax.cond: computed inline, its compares and
    # selects are copied into every leaf's kernel, which at 2,000 leaves costs ~0.7 s of
    # compile.
    import optax

    n = SHARED_SCALE_LEAVES  # from here up; below it a conditional costs more than the copies
    params = {f"w{i:03d}": jnp.ones((1000,), jnp.float32) for i in range(n)}
    makers = {
        "clip_by_global_norm": lambda: optaxclip.clip_by_global_norm(1.0),
        "clip_by_block_rms": lambda: optaxclip.clip_by_block_rms(1.0),
        "adagc": lambda: optaxclip.adagc(warmup_steps=100),
    }
    tx = optax.chain(makers[clip](), optax.sgd(0.1))

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    text = jax.jit(step).lower(params, tx.init(params), params).compile().as_text()
    bodies = _fused_bodies(text)
    leaf_kernels = [
        re.search(r"calls=%?([\w.\-]+)", line).group(1)
        for line in text.splitlines()
        if re.search(r"= f32\[1000\]\S* fusion\([^)]*%params", line)  # the new params
    ]
    assert len(leaf_kernels) == n, len(leaf_kernels)
    moves = "parameter|constant|bitcast|slice|reshape"  # no arithmetic
    scalar_op = re.compile(rf"= (?:f32|pred|s32)\[\] (?!{moves})[\w-]+\(")
    for name in leaf_kernels:
        scalars = [line.strip() for line in bodies[name] if scalar_op.search(line)]
        assert not scalars, (name, scalars)


def test_a_shared_scale_is_broadcast_once_per_leaf_shape():
    # XLA:CPU's compile time grows with the number of operations: a broadcast of each
    # factor per leaf cost ~0.2 s at 2,000 leaves, one per shape costs nothing.
    import optax

    n = SHARED_SCALE_LEAVES
    params = {f"w{i:03d}": jnp.ones((1000,) if i % 2 else (10, 100)) for i in range(n)}

    def broadcasts(fn, *args) -> int:
        return jax.jit(fn).lower(*args).as_text().count("stablehlo.broadcast_in_dim")

    def step_with(tx):
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return step

    sgd = optax.sgd(0.1)
    clipped = optax.chain(optaxclip.clip_by_global_norm(1.0), sgd)
    extra = broadcasts(step_with(clipped), params, clipped.init(params), params) - broadcasts(
        step_with(sgd), params, sgd.init(params), params
    )
    # The norm's buckets take a few dozen; two per leaf would be 2 * n.
    assert extra < n // 2, extra
    tree_clip = broadcasts(lambda p: optaxclip.clip_tree_by_global_norm(p, 1.0), params)
    assert tree_clip < n // 2, tree_clip


@pytest.mark.parametrize("clip", ["clip_by_value", "spike_aware_clip"])
def test_an_elementwise_clip_measures_in_one_read_with_one_flat_rescue(clip):
    # map_and_measure: one reduction per leaf for both trees in the common path, one
    # more in the overflow/underflow rescue, and no conditional nested in it. Two calls
    # of the norm engine there (each with its buckets and its own rescue) made the TPU
    # compiler take 1.7x as long over chain(clip_by_value, sgd) at 10 leaves / 20M, and
    # cost spike_aware_clip 49 MiB of TPU temp memory instead of 12 (with sgd) and 1.28x
    # the bytes (with adamw).
    g = {f"w{i}": jnp.ones((5000,)) for i in range(4)} | {"s": jnp.ones((7,))}
    tx = {
        "clip_by_value": lambda: optaxclip.clip_by_value(1.0),
        "spike_aware_clip": lambda: optaxclip.spike_aware_clip(),
    }[clip]()
    text = jax.jit(tx.update).lower(g, tx.init(g)).as_text()
    # (On XLA:CPU; spike_aware_clip's TPU and GPU layouts are pinned in its own tests.)
    assert text.count("stablehlo.case") == 1
    # Per leaf two reductions in the common path (along rows, then over the rows: one
    # reduction along 5,000 elements adds them one after another on XLA:CPU) and two in
    # the rescue; a few of vectors.
    assert text.count("stablehlo.reduce") <= 4 * len(g) + 6, text.count("stablehlo.reduce")


@pytest.mark.parametrize("clip", ["clip_by_value", "spike_aware_clip"])
def test_an_elementwise_clip_measures_small_leaves_in_buckets(clip):
    # A reduction per small leaf was a kernel per leaf: at 2,000 leaves of 1,000 with
    # sgd, XLA:CPU took 57 s to compile chain(clip_by_value, sgd) (5-6 s in buckets;
    # optax.clip 3 s) and the TPU compiler kept 492 MiB of temp memory (189 MiB).
    n = 150
    g = {f"w{i:03d}": jnp.ones((1 + (i * 37) % 400,)) for i in range(n)}
    tx = {
        "clip_by_value": lambda: optaxclip.clip_by_value(1.0),
        "spike_aware_clip": lambda: optaxclip.spike_aware_clip(),
    }[clip]()
    text = jax.jit(tx.update).lower(g, tx.init(g)).as_text()
    # Two buckets, each with a reduction in the common path and one in the rescue (and
    # the sums of their row sums), and a few of vectors; one per leaf would be 2 * n.
    assert text.count("stablehlo.reduce") < n // 5, text.count("stablehlo.reduce")


# ---------------------------------------------------------------------------------------
# 8 simulated devices (in a subprocess: this process already has one).

_SHARDED_CHECK = textwrap.dedent(
    """
    import json, re
    import numpy as np
    import jax, jax.numpy as jnp
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
    import optaxclip

    rng = np.random.default_rng(0)
    shapes, specs = {}, {}
    for layer in range(12):  # FSDP over data, tensor-parallel over model
        shapes[f"l{layer}/w_in"], specs[f"l{layer}/w_in"] = (16, 64), P("data", "model")
        shapes[f"l{layer}/w_out"], specs[f"l{layer}/w_out"] = (64, 16), P("model", "data")
        shapes[f"l{layer}/bias"], specs[f"l{layer}/bias"] = (64,), P("model")
        shapes[f"l{layer}/scale"], specs[f"l{layer}/scale"] = (16,), P()
    shapes["embed"], specs["embed"] = (5000, 8), P(("data", "model"))
    shapes["temperature"], specs["temperature"] = (), P()
    tree = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    tree["l3/w_in"][0, :2] = [3e19, 4e19]  # the rescue pass must stay sharded too
    tree["l5/bias"] *= 1e-25  # sharded leaves whose squares all flush to zero,
    tree["l7/w_out"] *= 1e-25  # rescued one by one beside the overflow,
    tree["l2/scale"] *= 1e-25  # and a replicated one
    leaves64 = {k: v.astype(np.float64) for k, v in tree.items()}
    want = float(np.sqrt(sum(np.sum(v**2) for v in leaves64.values())))
    want_blocks = {k: float(np.sqrt(np.sum(v**2))) for k, v in leaves64.items()}
    collective = re.compile(
        r"=\\s*(.+?)\\s+(all-reduce|all-gather|all-to-all|collective-permute|"
        r"reduce-scatter)(?:-start)?\\("
    )
    report = {}
    for kind in ("Auto", "Explicit"):
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"),
                    axis_types=(getattr(AxisType, kind),) * 2)
        shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
        grads = jax.device_put(tree, shardings)
        tx = optaxclip.clip_by_global_norm(1.0)
        programs = {
            "global_norm": (jax.jit(optaxclip.global_norm), (grads,)),
            "block_norms": (jax.jit(optaxclip.block_norms), (grads,)),
            "clip_by_global_norm": (jax.jit(tx.update), (grads, tx.init(grads))),
        }
        for name, (fn, args) in programs.items():
            text = fn.lower(*args).compile().as_text()
            found = collective.findall(text)
            sizes = [
                int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                for shape, op in found if op == "all-reduce"
                for dims in re.findall(r"\\[([\\d,]*)\\]", shape)
            ]
            report[f"{kind}/{name}"] = {
                "other": [f"{op} of {shape}" for shape, op in found if op != "all-reduce"],
                "all_reduces": sum(op == "all-reduce" for _, op in found),
                "largest_all_reduce": max(sizes, default=0),
            }
        got = float(jax.jit(optaxclip.global_norm)(grads))
        blocks = jax.jit(optaxclip.block_norms)(grads)
        report[f"{kind}/values"] = {
            "norm_rel_err": abs(got - want) / want,
            "block_rel_err": max(abs(float(blocks[k]) - v) / v for k, v in want_blocks.items()),
        }
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def sharded_report():
    return run_json_script(["-c", _SHARDED_CHECK], devices=8, timeout=600, cheap_codegen=False)


@pytest.mark.xdist_group("norms_compile_sharded")  # one worker runs sharded_report once
@pytest.mark.parametrize("mesh_kind", ["Auto", "Explicit"])
@pytest.mark.parametrize("program", ["global_norm", "block_norms", "clip_by_global_norm"])
def test_sharded_norm_gathers_nothing_and_all_reduces_scalars(sharded_report, mesh_kind, program):
    entry = sharded_report[f"{mesh_kind}/{program}"]
    assert entry["other"] == [], entry["other"]
    assert entry["all_reduces"] > 0, "the program is not sharded"
    # A partial sum per leaf at most (50 leaves), never a gradient-sized buffer.
    assert entry["largest_all_reduce"] <= 50, entry


@pytest.mark.xdist_group("norms_compile_sharded")
@pytest.mark.parametrize("mesh_kind", ["Auto", "Explicit"])
def test_sharded_norms_equal_float64(sharded_report, mesh_kind):
    values = sharded_report[f"{mesh_kind}/values"]
    assert values["norm_rel_err"] < 1e-5 and values["block_rel_err"] < 1e-5, values
