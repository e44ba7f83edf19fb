"""monitor: records the norm of the updates at its place in a chain and changes nothing.

References are float64 NumPy norms (tests/_reference.py); the catalog entries
``monitor`` and ``monitor_per_leaf`` also run through the conformance matrix.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import norm64, norms64, np64

import optaxclip

RNG = np.random.default_rng(0)
GRADS = {
    "params": {
        "dense": {
            "kernel": jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32),
            "bias": jnp.asarray(RNG.normal(size=(3,)), jnp.float32),
        },
        "embed": [jnp.asarray(RNG.normal(size=(5, 2)), jnp.bfloat16)],
    }
}
PARAMS = jax.tree.map(jnp.zeros_like, GRADS)
PATHS = ["params/dense/bias", "params/dense/kernel", "params/embed/0"]  # leaf order


def _bitwise_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


@pytest.mark.parametrize("per_leaf", [False, True])
def test_updates_pass_through_bit_for_bit_and_the_norm_is_recorded(per_leaf):
    tx = optaxclip.monitor(per_leaf=per_leaf)
    out, state = jax.jit(tx.update)(GRADS, tx.init(PARAMS), PARAMS)
    _bitwise_equal(out, GRADS)
    s = optaxclip.stats(state)
    np.testing.assert_allclose(s["norm"], norm64(GRADS), rtol=1e-6)
    np.testing.assert_allclose(s["clipped_norm"], norm64(GRADS), rtol=1e-6)
    assert float(s["threshold"]) == np.inf
    assert not bool(s["clipped"])
    assert int(s["count"]) == 1 and int(s["clip_count"]) == 0 and float(s["clip_rate"]) == 0.0


def test_per_leaf_norms_are_keyed_by_leaf_path_and_match_float64():
    tx = optaxclip.monitor(per_leaf=True)
    _, state = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    s = optaxclip.stats(state)
    leaf_keys = sorted(k for k in s if k.startswith("leaf_norm/"))
    assert leaf_keys == [f"leaf_norm/{p}" for p in PATHS]
    for path, want in zip(PATHS, norms64(GRADS), strict=True):
        np.testing.assert_allclose(s[f"leaf_norm/{path}"], want, rtol=1e-6)
    assert state.stats is state.monitor  # the ClipStats, named after the transform


def test_per_leaf_norms_are_right_where_squares_overflow_or_flush_to_zero():
    grads = {
        "huge": jnp.array([3e20, 4e20], jnp.float32),  # squares overflow float32
        "half": jnp.array([300.0, 400.0], jnp.float16),  # squares overflow fp16
        "tiny": jnp.array([3e-25, 4e-25], jnp.float32),  # squares flush to zero
    }
    tx = optaxclip.monitor(per_leaf=True)
    _, state = jax.jit(tx.update)(grads, tx.init(grads))
    s = optaxclip.stats(state)
    np.testing.assert_allclose(s["norm"], norm64(grads), rtol=1e-6)
    np.testing.assert_allclose(s["leaf_norm/huge"], 5e20, rtol=1e-6)
    np.testing.assert_allclose(s["leaf_norm/half"], 500.0, rtol=1e-6)
    # A tiny leaf beside huge ones reads low (its squares are lost next to theirs, as
    # in block_norms); alone, it reads its norm.
    alone = {"tiny": grads["tiny"]}
    _, state = tx.update(alone, tx.init(alone))
    np.testing.assert_allclose(optaxclip.stats(state)["leaf_norm/tiny"], 5e-25, rtol=1e-6)


def test_per_leaf_norms_equal_block_norms():
    tx = optaxclip.monitor(per_leaf=True)
    _, state = tx.update(GRADS, tx.init(PARAMS))
    block = optaxclip.block_norms(GRADS)
    s = optaxclip.stats(state)
    for path, want in zip(PATHS, jax.tree.leaves(block), strict=True):
        assert float(s[f"leaf_norm/{path}"]) == float(want)


def test_before_and_after_a_clip_in_one_chain_each_monitor_has_its_own_name():
    tx = optax.chain(
        optaxclip.monitor(per_leaf=True),
        optaxclip.clip_by_global_norm(1.0),
        optaxclip.monitor(),
        optax.sgd(0.1),
    )
    _, state = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    s = optaxclip.stats(state)
    np.testing.assert_allclose(s["0/monitor/norm"], norm64(GRADS), rtol=1e-6)
    clip = optaxclip.clip_by_global_norm(1.0)
    clipped, _ = clip.update(GRADS, clip.init(PARAMS))  # 1.0 up to the bf16 leaf's rounding
    np.testing.assert_allclose(s["2/monitor/norm"], norm64(clipped), rtol=1e-6)
    np.testing.assert_allclose(s["1/clip_by_global_norm/norm"], s["0/monitor/norm"], rtol=0)
    np.testing.assert_allclose(
        s["0/monitor/leaf_norm/params/dense/kernel"], norms64(GRADS)[1], rtol=1e-6
    )
    assert not any(k.startswith("2/monitor/leaf_norm") for k in s)


def test_a_nonfinite_step_is_counted_and_passed_on_unchanged():
    grads = {**GRADS, "params": {**GRADS["params"], "extra": jnp.array([jnp.nan, 1.0])}}
    tx = optaxclip.monitor(per_leaf=True)
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    _bitwise_equal(out, grads)
    s = optaxclip.stats(state)
    assert int(s["nonfinite_count"]) == 1 and np.isnan(float(s["norm"]))
    assert np.isnan(float(s["leaf_norm/params/extra"]))
    np.testing.assert_allclose(s["leaf_norm/params/dense/kernel"], norms64(GRADS)[1], rtol=1e-6)


def test_per_leaf_norms_take_no_extra_pass_over_the_updates():
    # The per-leaf norms come out of the same reductions as the global norm: the
    # compiled step reads the updates with as many reductions either way. (Not counted:
    # the boolean reduction over the per-leaf sums that asks whether a leaf needs the
    # rescue; it reads one value per leaf, not the updates.)
    def reductions(per_leaf):
        tx = optaxclip.monitor(per_leaf=per_leaf)
        hlo = jax.jit(tx.update).lower(GRADS, tx.init(PARAMS)).compile().as_text()
        return len(re.findall(r"= (?!pred)\S+ reduce\(", hlo))

    assert reductions(True) == reductions(False) > 0


def test_state_is_type_stable_and_has_a_buffer_per_field():
    tx = optaxclip.monitor(per_leaf=True)
    state = tx.init(PARAMS)
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
    assert len(set(pointers)) == len(pointers)
    avals = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    half = jax.tree.map(lambda x: x.astype(jnp.float16), GRADS)
    _, state = tx.update(half, state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == avals
    assert all(x.size > 0 for x in jax.tree.leaves(state))


def test_inside_multisteps_it_sees_the_averaged_gradient():
    grads = GRADS["params"]["dense"]  # float32: MultiSteps averages in float32
    params = jax.tree.map(jnp.zeros_like, grads)
    g2 = jax.tree.map(lambda x: x * 3, grads)
    tx = optax.MultiSteps(optax.chain(optaxclip.monitor(per_leaf=True), optax.sgd(0.1)), 2)
    state = tx.init(params)
    for g in (grads, g2):
        _, state = jax.jit(tx.update)(g, state, params)
    s = optaxclip.stats(state)
    mean = jax.tree.map(lambda a, b: (np64(a) + np64(b)) / 2, grads, g2)
    assert int(s["count"]) == 1
    np.testing.assert_allclose(s["norm"], norm64(mean), rtol=1e-6)
    np.testing.assert_allclose(s["leaf_norm/bias"], norms64(mean)[0], rtol=1e-6)
    np.testing.assert_allclose(s["leaf_norm/kernel"], norms64(mean)[1], rtol=1e-6)


def test_updates_whose_leaves_differ_from_inits_tree_name_the_difference():
    tx = optaxclip.monitor(per_leaf=True)
    state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"not in the updates \['b'\], not in init's tree \['c'\]"):
        tx.update({"a": jnp.ones(2), "c": jnp.ones(2)}, state)


def test_per_leaf_must_be_a_python_bool():
    with pytest.raises(TypeError, match="per_leaf"):
        optaxclip.monitor(per_leaf="yes")
    with pytest.raises(TypeError, match="per_leaf"):
        optaxclip.monitor(per_leaf=jnp.array(True))


def test_integer_leaves_are_rejected_naming_the_leaf():
    tx = optaxclip.monitor()
    with pytest.raises(TypeError, match=r"\['steps'\]"):
        tx.update({"steps": jnp.array([1, 2])}, tx.init(None))


def test_empty_tree_and_a_single_array():
    tx = optaxclip.monitor(per_leaf=True)
    out, state = tx.update({}, tx.init({}))
    assert out == {} and float(optaxclip.stats(state)["norm"]) == 0.0
    x = jnp.array([3.0, 4.0])
    _, state = tx.update(x, tx.init(x))
    assert float(optaxclip.stats(state)["leaf_norm/<root>"]) == 5.0


def test_under_inject_hyperparams_per_leaf_stays_static():
    tx = optax.inject_hyperparams(optaxclip.monitor)(per_leaf=True)
    _, state = jax.jit(tx.update)(GRADS, tx.init(PARAMS))
    s = optaxclip.stats(state)
    np.testing.assert_allclose(s["leaf_norm/params/embed/0"], norms64(GRADS)[2], rtol=1e-6)
