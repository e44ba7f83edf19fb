"""Every transform under Optax's wrappers: masked, partition, MultiSteps,
inject_hyperparams and apply_if_finite.

Each test runs the wrapped transform and an independent reference (the same transform
applied by hand to what the wrapper should hand it) over a short sequence of gradients
with a spike, with ``lax.scan`` (so the state is also a valid scan carry). Each scenario
is first traced and lowered under ``jit`` (which is where a traced hyperparameter, or a
state whose type changes inside ``lax.cond``, would fail), then run op by op: compiling
55 small programs would cost a minute of CI time, and compiled execution of every
transform is covered by test_state_types.py, test_orbax.py and test_flax.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _transforms import BY_NAME, NAMES

import optaxclip

STEPS = 6
# Step 5's gradient is a spike: by then every warm-up is over, so the adaptive
# transforms clip or skip it.
SCALES = np.array([1.0, 1.3, 0.8, 1.1, 9.0, 1.0], np.float32)

_rng = np.random.RandomState(0)
PARAMS = {
    "w": jnp.asarray(_rng.normal(size=(3, 2)), jnp.float32),
    "b": jnp.asarray(_rng.normal(size=(2,)), jnp.float32),
}
GRADS = {
    "w": jnp.asarray(_rng.normal(size=(STEPS, 3, 2)) * SCALES[:, None, None], jnp.float32),
    "b": jnp.asarray(_rng.normal(size=(STEPS, 2)) * SCALES[:, None], jnp.float32),
}


def _inner():
    # A stateful inner optimizer for skip_*: a skipped step must leave its momentum alone.
    return optax.sgd(0.1, momentum=0.9)


def _build(name, scale=1.0):
    return BY_NAME[name].build(scale, inner=_inner())


def _run(tx, grads, params):
    """``tx.update`` over the leading axis of ``grads``: (stacked updates, final state)."""

    def body(state, g):
        updates, state = tx.update(g, state, params)
        return state, updates

    state, updates = jax.lax.scan(body, tx.init(params), grads)
    return updates, state


def _jit_checked(fn):
    """``fn`` after checking that it traces and lowers under ``jit``; runs op by op."""

    def run():
        jax.jit(fn).lower()
        with jax.disable_jit():
            return fn()

    return run


def _close(got, want):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0), got, want)


@pytest.mark.parametrize("name", NAMES)
def test_masked_and_partition_hand_each_transform_only_its_own_leaves(name):
    # masked: no clipping for the bias; the weights are clipped as if they were alone.
    masked = optax.masked(_build(name), {"w": True, "b": False})
    # partition: a different threshold per group; each group's transform sees only its
    # own leaves, so a clip inside optax.partition is per group.
    labels = {"w": "weights", "b": "biases"}
    partition = optax.partition(
        {"weights": _build(name, 1.0), "biases": _build(name, 2.0)}, labels
    )
    ref_w, ref_b = _build(name, 1.0), _build(name, 2.0)

    @_jit_checked
    def run():
        return (
            _run(masked, GRADS, PARAMS),
            _run(partition, GRADS, PARAMS),
            _run(ref_w, {"w": GRADS["w"]}, {"w": PARAMS["w"]}),
            _run(ref_b, {"b": GRADS["b"]}, {"b": PARAMS["b"]}),
        )

    (masked_updates, masked_state), (updates, state), (want_w, _), (want_b, _) = run()
    np.testing.assert_array_equal(masked_updates["b"], GRADS["b"])  # untouched
    _close(masked_updates["w"], want_w["w"])
    s = optaxclip.stats(masked_state)
    assert int(s["count"]) == STEPS
    np.testing.assert_allclose(s["norm"], np.linalg.norm(np.asarray(GRADS["w"][-1])), rtol=1e-6)

    _close(updates, {"w": want_w["w"], "b": want_b["b"]})
    s = optaxclip.stats(state)
    for group, leaf in (("weights", "w"), ("biases", "b")):
        key = next(k for k in s if k.startswith(group + "/") and k.endswith("/norm"))
        np.testing.assert_allclose(s[key], np.linalg.norm(np.asarray(GRADS[leaf][-1])), rtol=1e-6)


def test_clip_inside_partition_is_per_group_not_global():
    # Documented semantics: norms are measured per group. Groups of norm 5 and 10 are
    # each brought to 1, where one global clip would scale both by 1 / sqrt(125).
    grads = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([6.0, 8.0])}
    labels = {"w": "a", "b": "b"}
    clip = optaxclip.clip_by_global_norm(1.0)
    per_group = optax.partition({"a": clip, "b": clip}, labels)
    # skip_nonfinite per group: a NaN in one group skips that group only.
    skip = optaxclip.skip_nonfinite(optax.sgd(1.0))
    skip_per_group = optax.partition({"a": skip, "b": skip}, labels)
    nan_grads = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([jnp.nan, 1.0])}

    @_jit_checked
    def run():
        return (
            per_group.update(grads, per_group.init(grads))[0],
            clip.update(grads, clip.init(grads))[0],
            skip_per_group.update(nan_grads, skip_per_group.init(grads), grads)[0],
        )

    grouped, whole, skipped = run()
    np.testing.assert_allclose(grouped["w"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(grouped["b"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(whole["w"], np.array([3.0, 4.0]) / np.sqrt(125.0), rtol=1e-6)
    np.testing.assert_array_equal(skipped["w"], [-1.0, -2.0])
    np.testing.assert_array_equal(skipped["b"], [0.0, 0.0])


def test_frozen_leaves_count_in_a_clip_before_partition_and_not_in_one_inside_it():
    # The README's advice for freezing part of a model: a clip before the partition
    # measures the frozen gradients too (jax.grad computes them; set_to_zero drops them
    # only afterwards), so the trainable update is shrunk by gradients that are never
    # applied. Inside the trainable group's chain it measures what is trained.
    grads = {"head": jnp.array([3.0, 4.0]), "backbone": jnp.array([30.0, 40.0])}
    labels = {"head": "train", "backbone": "frozen"}
    before = optax.chain(
        optaxclip.clip_by_global_norm(1.0),
        optax.partition({"train": optax.sgd(1.0), "frozen": optax.set_to_zero()}, labels),
    )
    inside = optax.partition(
        {
            "train": optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(1.0)),
            "frozen": optax.set_to_zero(),
        },
        labels,
    )
    counted, _ = before.update(grads, before.init(grads), grads)
    trained, _ = inside.update(grads, inside.init(grads), grads)
    np.testing.assert_allclose(counted["head"], -np.array([3.0, 4.0]) / np.sqrt(2525.0), rtol=1e-6)
    np.testing.assert_allclose(trained["head"], [-0.6, -0.8], rtol=1e-6)
    np.testing.assert_array_equal(trained["backbone"], [0.0, 0.0])


@pytest.mark.parametrize("name", NAMES)
def test_multisteps_clips_the_averaged_gradient_once_per_k_steps(name):
    k = 2
    tx = optax.MultiSteps(_build(name), every_k_schedule=k)
    ref = _build(name)
    # MultiSteps' running mean (Welford), written out: g1 + (g2 - g1) / 2.
    pairs = jax.tree.map(lambda g: g[0::2] + (g[1::2] - g[0::2]) / 2, GRADS)

    @_jit_checked
    def run():
        return _run(tx, GRADS, PARAMS), _run(ref, pairs, PARAMS)

    (updates, state), (ref_updates, _) = run()
    for leaf in ("w", "b"):
        np.testing.assert_array_equal(updates[leaf][0::2], 0.0)  # accumulating
        np.testing.assert_allclose(updates[leaf][1::2], ref_updates[leaf], rtol=1e-5, atol=1e-7)
    assert int(optaxclip.stats(state)["count"]) == STEPS // k


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_gives_the_same_updates_and_exposes_the_knob(name):
    case = BY_NAME[name]
    tx = case.injected(inner=_inner())
    ref = _build(name)

    @_jit_checked
    def run():
        return _run(tx, GRADS, PARAMS), _run(ref, GRADS, PARAMS)

    (updates, state), (ref_updates, ref_state) = run()
    _close(updates, ref_updates)
    if case.knob is not None:
        assert float(state.hyperparams[case.knob]) == pytest.approx(case.kwargs[case.knob])
    for key, value in optaxclip.stats(ref_state).items():
        np.testing.assert_allclose(optaxclip.stats(state)[key], value, rtol=1e-6)


def test_injected_threshold_can_be_changed_during_training():
    tx = optax.inject_hyperparams(optaxclip.clip_by_global_norm)(max_norm=1.0)
    grads = {"w": jnp.array([3.0, 4.0])}
    state = tx.init(grads)
    out, state = tx.update(grads, state)
    np.testing.assert_allclose(out["w"], [0.6, 0.8], rtol=1e-6)
    state.hyperparams["max_norm"] = jnp.asarray(2.5, jnp.float32)
    out, state = tx.update(grads, state)
    np.testing.assert_allclose(out["w"], [1.5, 2.0], rtol=1e-6)
    assert float(optaxclip.stats(state)["threshold"]) == 2.5


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_drops_the_nan_step_and_leaves_the_transform_untouched(name):
    bad = 2
    grads = {**GRADS, "w": GRADS["w"].at[bad, 0, 0].set(jnp.nan)}
    tx = optax.apply_if_finite(_build(name), max_consecutive_errors=3)

    @_jit_checked
    def run():
        def body(state, g):
            updates, new_state = tx.update(g, state, PARAMS)
            return new_state, (updates, state.inner_state, new_state.inner_state)

        return jax.lax.scan(body, tx.init(PARAMS), grads)

    state, (updates, before, after) = run()
    for leaf in ("w", "b"):
        np.testing.assert_array_equal(updates[leaf][bad], 0.0)
        assert np.all(np.isfinite(updates[leaf]))
    # The NaN step leaves the wrapped transform's state exactly as it was (so the run
    # goes on as if the step had never happened); every other step moves it.
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[bad], b[bad]), before, after)
    np.testing.assert_array_equal(optaxclip.stats(after)["count"], [1, 2, 2, 3, 4, 5])
    assert int(state.total_notfinite) == 1
    s = optaxclip.stats(state)
    assert int(s["count"]) == STEPS - 1
    assert int(s["nonfinite_count"]) == 0
