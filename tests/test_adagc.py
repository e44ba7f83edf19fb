"""AdaGC: per-tensor clipping against an EMA of each tensor's norm, checked step by step."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import jit_run, np64

import optaxclip
from optaxclip._mechanics import SHARED_SCALE_LEAVES

SHAPES = [(3, 4), (4,), (2, 2, 2), (5,), (1,)]
RNG = np.random.default_rng(0)
# One fixed unit-norm direction per leaf: leaf i at step t is DIRECTIONS[i] * norms[t, i].
DIRECTIONS = []
for _shape in SHAPES:
    _d = RNG.normal(size=_shape)
    DIRECTIONS.append(jnp.asarray(_d / np.linalg.norm(_d), jnp.float32))


def norms64(tree):
    """Each leaf's L2 norm in float64 NumPy (eager optaxclip norms would compile op by op)."""
    return [
        float(np.linalg.norm(np.asarray(x, np.complex128).ravel())) for x in jax.tree.leaves(tree)
    ]


def leaves_with_norms(norms):
    """A list of leaves whose L2 norms are ``norms`` (one per leaf)."""
    return [d * norms[i] for i, d in enumerate(DIRECTIONS)]


def spiky_leaf_norms(steps: int, seed: int) -> np.ndarray:
    """Independent per-leaf norms: log-normal with drift, per-leaf spikes, NaN/inf steps."""
    rng = np.random.default_rng(seed)
    leaves = len(SHAPES)
    norms = rng.lognormal(0.0, 0.3, (steps, leaves)) * rng.uniform(0.2, 2.0, leaves)
    norms *= np.linspace(1.0, 1.5, steps)[:, None]
    spikes = rng.choice(steps * leaves, steps * leaves // 20, replace=False)
    norms.flat[spikes] *= rng.uniform(3, 50, spikes.size)
    norms[[3, steps // 3, steps // 2], 2] = np.nan
    norms[[11, 3 * steps // 4], 0] = np.inf
    return norms.astype(np.float32)


def adagc_reference(leaf_norms, *, ratio, beta, warmup_steps, warmup_max_norm, eps):
    """AdaGC (Wang et al. 2025, Algorithm 1) written out in float64, as DESIGN section 4
    states the reference implementation (lishuai-97/AdaGC): the EMA is fed
    min(||g_i||, ratio * gamma_i). Zero norms never enter gamma (DESIGN: they say nothing
    about scale). Returns per step (threshold, per-leaf scales, clipped) and the final
    gamma.
    """
    gamma = np.full(leaf_norms.shape[1], np.inf)
    seen = 0
    thresholds, scales, clipped = [], [], []
    for n in leaf_norms.astype(np.float64):
        g = math.sqrt(float(np.sum(n**2)))
        h = np.ones_like(n)
        if seen < warmup_steps:
            t = warmup_max_norm
        else:
            t = float(np.max(ratio * gamma))
        if not math.isfinite(g):
            over = False
        elif seen < warmup_steps:
            over = g > warmup_max_norm
            if over:
                h[:] = warmup_max_norm / g
            after = h * n
            gamma = np.where(after > 0, np.minimum(gamma, after), gamma)
        else:
            unset = np.isinf(gamma) | (gamma <= 0)
            with np.errstate(invalid="ignore"):
                h = np.minimum(1.0, ratio * gamma / (n + eps))
            h = np.where((h < 1) & (n > 0) & ~unset, h, 1.0)
            over = bool(np.any(h < 1))
            with np.errstate(invalid="ignore"):
                ema = beta * gamma + (1 - beta) * np.minimum(n, ratio * gamma)
            gamma = np.where(n > 0, np.where(unset, n, ema), gamma)
        seen += math.isfinite(g)
        thresholds.append(t)
        scales.append(h)
        clipped.append(over)
    return np.array(thresholds), np.array(scales), np.array(clipped), gamma


def scan_steps(tx, leaf_norms):
    """Feeds leaves_with_norms(leaf_norms[t]) through ``tx`` in a lax.scan (trace under jit)."""

    def step(state, norms):
        grads = leaves_with_norms(norms)
        out, state = tx.update(grads, state, DIRECTIONS)
        st = optaxclip.stats(state)
        in_norms = jnp.stack(optaxclip.block_norms(grads))
        out_norms = jnp.stack(optaxclip.block_norms(out))
        return state, (in_norms, out_norms, st["norm"], st["threshold"], st["clipped"])

    return jax.lax.scan(step, tx.init(DIRECTIONS), leaf_norms)


def run_scan(tx, leaf_norms):
    final, per_step = jax.jit(functools.partial(scan_steps, tx))(leaf_norms)
    return final, [np.asarray(x) for x in per_step]


CONFIGS = [
    dict(ratio=1.04, beta=0.99, warmup_steps=20, warmup_max_norm=2.0, eps=1e-6),
    dict(ratio=1.5, beta=0.9, warmup_steps=0, warmup_max_norm=1.0, eps=1e-6),
    dict(ratio=1.1, beta=0.95, warmup_steps=60, warmup_max_norm=3.0, eps=1e-3),
]
LEAF_NORMS = spiky_leaf_norms(320, seed=1)


@functools.cache
def acceptance_runs():
    """Every configuration over LEAF_NORMS, compiled as one program."""
    txs = [optaxclip.adagc(**config) for config in CONFIGS]
    runs = jax.jit(lambda xs: [scan_steps(tx, xs) for tx in txs])(LEAF_NORMS)
    return [(final, [np.asarray(x) for x in per_step]) for final, per_step in runs]


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=lambda i: str(CONFIGS[i]))
def test_matches_reference_algorithm_every_step(index):
    final, (in_norms, out_norms, norm, threshold, clipped) = acceptance_runs()[index]
    finite_leaf = np.isfinite(LEAF_NORMS)
    np.testing.assert_allclose(in_norms[finite_leaf], LEAF_NORMS[finite_leaf], rtol=1e-6)
    step_finite = np.isfinite(norm)
    np.testing.assert_array_equal(step_finite, finite_leaf.all(axis=1))
    ref_t, ref_h, ref_clipped, ref_gamma = adagc_reference(in_norms, **CONFIGS[index])
    np.testing.assert_allclose(threshold, ref_t, rtol=1e-5)
    scales = out_norms[step_finite] / in_norms[step_finite]
    np.testing.assert_allclose(scales, ref_h[step_finite], rtol=1e-5)
    np.testing.assert_array_equal(clipped, ref_clipped)
    np.testing.assert_allclose(final.gamma, ref_gamma, rtol=1e-5)
    # Propagate: on a NaN/inf step every leaf comes out as it went in.
    np.testing.assert_array_equal(out_norms[~step_finite], in_norms[~step_finite])
    # Per-leaf clipping happened on some leaves and steps, not on all.
    assert 0 < (ref_h < 1).sum() < ref_h.size


def test_spike_in_one_tensor_leaves_the_others_alone():
    tx = optaxclip.adagc(warmup_steps=1, warmup_max_norm=100.0, ratio=1.0, beta=0.5, eps=0.0)
    update = jax.jit(tx.update)
    _, state = update(leaves_with_norms([1.0, 2.0, 3.0, 4.0, 5.0]), tx.init(DIRECTIONS))
    out, state = update(leaves_with_norms([1.0, 20.0, 3.0, 4.0, 5.0]), state)
    np.testing.assert_allclose(norms64(out), [1.0, 2.0, 3.0, 4.0, 5.0], rtol=1e-6)
    np.testing.assert_allclose(state.gamma, [1.0, 2.0, 3.0, 4.0, 5.0], rtol=1e-6)
    assert float(state.stats.threshold) == 5.0  # the largest per-leaf bound, ratio * gamma


def test_zero_norm_leaf_in_warmup_does_not_freeze_it():
    # Step 1: leaf "b" has an exactly zero gradient (a zero-initialized layer upstream).
    # A gamma of 0 would clip it to zero forever; instead its first non-zero norm
    # starts its EMA.
    tx = optaxclip.adagc(warmup_steps=1, warmup_max_norm=100.0, ratio=1.0, beta=0.5)
    update = jax.jit(tx.update)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    _, state = update({"a": jnp.array([3.0, 4.0]), "b": jnp.zeros(2)}, tx.init(params))
    assert math.isinf(float(state.gamma[1]))
    out, state = update({"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.6, 0.8])}, state)
    np.testing.assert_allclose(out["b"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(state.gamma, [5.0, 1.0], rtol=1e-6)


def test_zero_norms_after_warmup_leave_gamma_as_it_was():
    # A tensor whose gradient is exactly zero for a while (a frozen or unused layer)
    # keeps its scale: 200 zero steps (0.5**200 underflows) must not pull gamma to 0,
    # after which its next gradient, however large, would pass unclipped.
    config = dict(ratio=1.04, beta=0.5, warmup_steps=0, warmup_max_norm=1.0, eps=1e-6)
    tx = optaxclip.adagc(**config)
    update = jax.jit(tx.update)
    state = tx.init([jnp.zeros(1), jnp.zeros(1)])
    leaf_norms = np.array([[1.0, 2.0]] + [[0.0, 2.0]] * 200 + [[3.0, 2.0]], np.float32)
    scales = []
    for a, b in leaf_norms:
        out, after = update([jnp.array([a]), jnp.array([b])], state)
        scales.append([float(out[0][0]) / a if a else 1.0, float(out[1][0]) / b])
        if a == 0:
            np.testing.assert_array_equal(out[0], [0.0])
            assert float(after.gamma[0]) == 1.0
        state = after
    _, ref_scales, ref_clipped, ref_gamma = adagc_reference(leaf_norms, **config)
    np.testing.assert_allclose(scales, ref_scales, rtol=1e-6)
    np.testing.assert_allclose(state.gamma, ref_gamma, rtol=1e-6)
    assert ref_clipped[-1] and scales[-1][0] < 0.35  # 3.0 is clipped to ~1.04


def test_gamma_of_zero_in_a_restored_state_restarts_instead_of_freezing_the_tensor():
    # Zero norms never make gamma 0, but a state built or edited by hand can hold one.
    tx = optaxclip.adagc(warmup_steps=0)
    state = tx.init([jnp.zeros(1)])
    state = state._replace(gamma=jnp.zeros(1, jnp.float32))
    out, state = jax.jit(tx.update)([jnp.array([3.0])], state)
    np.testing.assert_array_equal(out[0], [3.0])
    assert float(state.gamma[0]) == 3.0


W = [jnp.asarray(np.random.default_rng(5).normal(size=2), jnp.float32) for _ in range(2)]


def _vjp_of_scaled(g, w, bound, eps=0.0):
    """Gradient of sum(w * g * bound / (|g| + eps)) in g, in float64 (bound a constant)."""
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    n = np.linalg.norm(g)
    return bound / (n + eps) * w - bound * (w @ g) / (n * (n + eps) ** 2) * g


# (name, warm-up steps, first step's leaves or None, leaves differentiated at, expected).
_W64 = [np.asarray(w, np.float64) for w in W]
_G = [np.array([30.0, 40.0]), np.array([0.3, 0.4])]
_GLOBAL = _vjp_of_scaled(np.concatenate(_G), np.concatenate(_W64), 1.0)
GRADIENT_CASES = [
    # Step 1, in the warm-up (gamma unset, +inf): global norm 50 clipped to 1.
    ("warmup-clipped", 1, None, _G, [_GLOBAL[:2], _GLOBAL[2:]]),
    ("warmup-unclipped", 1, None, [_G[0] / 100, _G[1] / 100], _W64),
    # After one warm-up step (cap 100, no clip) with leaf norms 5 and 0.5: gamma = [5, 0.5].
    ("after-warmup", 1, [[3.0, 4.0], [0.3, 0.4]], [[3.0, 4.0], [0.3, 0.4]], _W64),
    (
        "clipped-tensor",
        1,
        [[3.0, 4.0], [0.3, 0.4]],
        [[30.0, 40.0], [0.3, 0.4]],
        [_vjp_of_scaled([30.0, 40.0], _W64[0], 1.04 * 5.0, 1e-6), _W64[1]],
    ),
    # Leaf 1 had only zeros in the warm-up: its gamma is still unset (+inf).
    ("unset-leaf", 1, [[3.0, 4.0], [0.0, 0.0]], [[3.0, 4.0], [30.0, 40.0]], _W64),
    ("zero-leaf", 1, [[3.0, 4.0], [0.3, 0.4]], [[3.0, 4.0], [0.0, 0.0]], _W64),
]


@pytest.mark.parametrize(
    "name, warmup, first, at, want", GRADIENT_CASES, ids=[case[0] for case in GRADIENT_CASES]
)
def test_gradient_through_adagc_is_finite_and_right(name, warmup, first, at, want):
    del name
    tx = optaxclip.adagc(warmup_steps=warmup, warmup_max_norm=1.0 if first is None else 100.0)
    params = [jnp.zeros(2), jnp.zeros(2)]
    state = tx.init(params)
    if first is not None:
        _, state = tx.update([jnp.array(x, jnp.float32) for x in first], state)
        assert int(state.stats.count) == warmup  # the next step is past the warm-up

    def f(grads, state):
        out, _ = tx.update(grads, state)
        return sum(jnp.sum(w * o) for w, o in zip(W, out, strict=True))

    grad = jax.jit(jax.grad(f))([jnp.array(x, jnp.float32) for x in at], state)
    for got, expected in zip(grad, want, strict=True):
        assert np.all(np.isfinite(np.asarray(got)))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_tensor_norms_up_to_3e38_keep_gamma_finite_and_match_the_reference():
    # Tensors whose norms live near 1e38 and 1e20 (squares that overflow float32) beside
    # ordinary ones, spikes of 1e20 and 1e25 against gammas of ~1 and ~1e20, and a zero.
    rng = np.random.default_rng(4)
    leaf_norms = rng.lognormal(0.0, 0.3, (40, len(SHAPES)))
    leaf_norms[:, 3] *= 1e38
    leaf_norms[:, 4] *= 1e20
    leaf_norms[0, 1] = 1e20  # in the warm-up
    leaf_norms[10, 4] = 1e25
    leaf_norms[20, 0] = 1e20
    leaf_norms[30, 2] = 0.0
    leaf_norms = leaf_norms.astype(np.float32)
    config = dict(ratio=1.04, beta=0.9, warmup_steps=3, warmup_max_norm=1e38, eps=1e-6)
    final, (in_norms, out_norms, norm, threshold, clipped) = run_scan(
        optaxclip.adagc(**config), leaf_norms
    )
    np.testing.assert_allclose(in_norms, leaf_norms, rtol=1e-6)
    assert np.all(np.isfinite(norm)) and np.all(np.isfinite(threshold[3:]))
    assert np.all(np.isfinite(final.gamma))
    ref_t, ref_h, ref_clipped, ref_gamma = adagc_reference(in_norms, **config)
    np.testing.assert_allclose(threshold, ref_t, rtol=1e-5)
    moved = in_norms > 0
    np.testing.assert_allclose(out_norms[moved] / in_norms[moved], ref_h[moved], rtol=1e-5)
    np.testing.assert_array_equal(clipped, ref_clipped)
    np.testing.assert_allclose(final.gamma, ref_gamma, rtol=1e-5)
    assert ref_h[10, 4] < 1e-4 and ref_h[20, 0] < 1e-19  # the spikes were clipped
    assert ref_gamma[3] > 1e37 and ref_gamma[4] > 1e19


def test_jitted_update_compiles_once_and_follows_the_rule():
    leaf_norms = spiky_leaf_norms(50, seed=2)
    config = dict(ratio=1.04, beta=0.9, warmup_steps=5, warmup_max_norm=2.0, eps=1e-6)
    tx = optaxclip.adagc(**config)
    grads_seq = [leaves_with_norms(norms) for norms in leaf_norms]
    traces, thresholds, _, state = jit_run(tx, grads_seq)
    measured = [[np.linalg.norm(np.asarray(x, np.float64)) for x in g] for g in grads_seq]
    assert traces == 1  # the state is type-stable: no retrace on step 2
    want, _, _, gamma = adagc_reference(np.array(measured), **config)
    np.testing.assert_allclose(thresholds, want, rtol=1e-5)
    np.testing.assert_allclose(state.gamma, gamma, rtol=1e-5)


def test_inject_hyperparams_matches_the_rule_and_can_be_changed():
    config = dict(ratio=1.2, beta=0.9, warmup_steps=5, warmup_max_norm=2.0, eps=1e-6)
    injected = optax.inject_hyperparams(optaxclip.adagc, static_args=("warmup_steps",))(**config)
    leaf_norms = spiky_leaf_norms(40, seed=3)
    state, (in_norms, _, _, threshold, _) = run_scan(injected, leaf_norms)
    assert set(state.hyperparams) == {"ratio", "beta", "warmup_max_norm", "eps"}
    want, _, _, gamma = adagc_reference(in_norms, **config)
    np.testing.assert_allclose(threshold, want, rtol=1e-5)
    np.testing.assert_allclose(state.inner_state.gamma, gamma, rtol=1e-5)
    # A huge ratio: no tensor is clipped any more.
    state = state._replace(hyperparams={**state.hyperparams, "ratio": jnp.float32(1e9)})
    out, state = jax.jit(injected.update)(leaves_with_norms([1e3] * 5), state, DIRECTIONS)
    assert not state.inner_state.stats.clipped
    np.testing.assert_allclose(norms64(out), [1e3] * 5, rtol=1e-6)


def test_bf16_in_bf16_out_and_complex_leaves():
    tx = optaxclip.adagc(warmup_steps=1, warmup_max_norm=100.0, ratio=1.0, eps=0.0)
    update = jax.jit(tx.update)
    grads = {"h": jnp.full((4,), 1.0, jnp.bfloat16), "z": jnp.array([3 + 4j], jnp.complex64)}
    _, state = update(grads, tx.init(grads))
    np.testing.assert_allclose(state.gamma, [2.0, 5.0], rtol=1e-6)
    out, state = update(jax.tree.map(lambda x: x * 4, grads), state)
    assert out["h"].dtype == jnp.bfloat16 and out["z"].dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(out["z"]), [3 + 4j], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["h"], np.float32), 1.0, rtol=1e-2)


def test_none_leaves_and_empty_tree_pass_through():
    tx = optaxclip.adagc()
    grads = {"a": jnp.array([3.0, 4.0]), "b": None}
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    assert out["b"] is None and state.gamma.shape == (1,)
    np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-6)
    out, state = jax.jit(tx.update)({}, tx.init({}))
    assert out == {} and int(state.stats.count) == 1


def test_updates_that_do_not_match_the_init_tree_are_rejected():
    tx = optaxclip.adagc()
    state = tx.init({"a": jnp.zeros(2)})
    with pytest.raises(ValueError, match="init"):
        tx.update({"a": jnp.zeros(2), "b": jnp.zeros(2)}, state)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": -1.0}, "ratio"),
        ({"beta": 0.0}, "beta"),
        ({"beta": 1.0}, "beta"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_max_norm": -1.0}, "warmup_max_norm"),
        ({"warmup_max_norm": float("nan")}, "warmup_max_norm"),
        ({"eps": -1.0}, "eps"),
        ({"nonfinite": "skip"}, "nonfinite"),
    ],
)
def test_invalid_arguments_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        optaxclip.adagc(**kwargs)


def test_integer_leaf_is_a_type_error():
    tx = optaxclip.adagc()
    with pytest.raises(TypeError, match="'i'"):
        tx.update({"i": jnp.array([1, 2])}, tx.init({"i": jnp.array([1, 2])}))


@pytest.mark.parametrize("nonfinite", ["propagate", "zero"])
def test_nonfinite_steps_leave_gamma_untouched_and_do_not_count_as_warmup(nonfinite):
    tx = optaxclip.adagc(warmup_steps=2, warmup_max_norm=100.0, nonfinite=nonfinite)
    update = jax.jit(tx.update)
    params = [jnp.zeros(1), jnp.zeros(1)]
    state = tx.init(params)
    # Steps 1 and 3 are the two warm-up steps; step 4 is past the warm-up.
    steps = [(2.0, 3.0, 100.0), (jnp.nan, 1.0, 100.0), (1.0, 5.0, 100.0), (1.0, jnp.inf, 3.12)]
    for a, b, threshold in steps:
        out, after = update([jnp.array([a]), jnp.array([b])], state)
        np.testing.assert_allclose(after.stats.threshold, threshold, rtol=1e-6)
        if not (math.isfinite(a) and math.isfinite(b)):
            np.testing.assert_array_equal(after.gamma, state.gamma)
            want = [[a], [b]] if nonfinite == "propagate" else [[0.0], [0.0]]
            np.testing.assert_array_equal(np.asarray(out), want)
            assert int(after.stats.nonfinite_count) == int(state.stats.nonfinite_count) + 1
        state = after
    # Both finite steps were warm-up steps: gamma is the per-leaf minimum of them.
    np.testing.assert_array_equal(state.gamma, [1.0, 3.0])


def test_nonfinite_error_policy_raises_naming_the_step():
    tx = optaxclip.adagc(nonfinite="error")
    update = jax.jit(tx.update)
    _, state = update([jnp.array([1.0])], tx.init([jnp.zeros(1)]))
    with pytest.raises(Exception, match="step 2"):
        jax.block_until_ready(update([jnp.array([jnp.nan])], state))


def test_gamma_follows_the_reference_feeding_the_bound_not_the_clipped_norm():
    # The reference (lishuai-97/AdaGC) feeds gamma the bound ratio * gamma on a clipped
    # step. Norms 1e-5, 2e-5, 2e-5 with beta 0.5 and ratio 1.04 (warm-up of 1 step):
    # gamma 1e-5, then 0.5 * 1e-5 + 0.5 * 1.04e-5 = 1.02e-5, then 1.0404e-5. Feeding
    # the clipped norm ratio * gamma * |g| / (|g| + eps) ratchets it down instead
    # (1e-5, 9.95e-6, 9.905e-6) and is 90% off after a few hundred such steps.
    tx = optaxclip.adagc(ratio=1.04, beta=0.5, warmup_steps=1, warmup_max_norm=1.0)
    state = tx.init([jnp.zeros(1)])
    gammas = []
    for g in (1e-5, 2e-5, 2e-5):
        _, state = tx.update([jnp.array([g], jnp.float32)], state)
        gammas.append(float(state.gamma[0]))
    np.testing.assert_allclose(gammas, [1e-5, 1.02e-5, 1.0404e-5], rtol=1e-5)


@pytest.mark.parametrize("extra_leaves", [0, SHARED_SCALE_LEAVES], ids=["inline", "shared"])
def test_a_per_tensor_scale_below_the_smallest_normal_float_does_not_flush_the_tensor(
    extra_leaves,
):
    # gamma settles at 1e-10 in the warm-up; then a tensor of norm 1e30 is clipped to
    # ratio * gamma = 1.04e-10 (the reference's bound with eps = 0): a scale of 1e-40,
    # below float32's smallest normal number, applied without flushing to zero. From
    # SHARED_SCALE_LEAVES leaves up the factors come out of a lax.cond.
    tx = optaxclip.adagc(warmup_steps=1, warmup_max_norm=1.0, eps=0.0)
    zeros = [jnp.zeros(2, jnp.float32)] * extra_leaves
    grads = [jnp.array([6e-11, 8e-11], jnp.float32)] + zeros
    _, state = tx.update(grads, tx.init(grads))
    out, _ = tx.update([jnp.array([6e29, 8e29], jnp.float32)] + zeros, state)
    np.testing.assert_allclose(np64(out[0]), np.array([0.6, 0.8]) * 1.04e-10, rtol=1e-5)
