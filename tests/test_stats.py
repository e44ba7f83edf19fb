"""ClipStats and optaxclip.stats()."""

import jax
import jax.numpy as jnp
import optax
import pytest
from _reference import norm64

import optaxclip

G = {"w": jnp.array([[3.0, 0.0], [0.0, 4.0]]), "b": jnp.array([12.0, 0.0])}
P = jax.tree.map(jnp.zeros_like, G)


def test_single_clip_stats_has_field_names_and_clip_rate():
    tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.adam(1e-3))
    state = tx.init(P)
    update = jax.jit(tx.update)
    small = jax.tree.map(lambda x: x / 100, G)
    for g in (G, small, G):
        _, state = update(g, state, P)
    s = optaxclip.stats(state)
    assert set(s) == set(optaxclip.ClipStats._fields) | {"clip_rate"}
    assert int(s["count"]) == 3 and int(s["clip_count"]) == 2
    assert float(s["clip_rate"]) == pytest.approx(2 / 3)
    assert float(s["norm"]) == pytest.approx(norm64(G), rel=1e-6)
    assert float(s["clipped_norm"]) == pytest.approx(1.0, rel=1e-6)
    assert float(optax.tree.get(state, "norm")) == pytest.approx(norm64(G), rel=1e-6)


def test_chain_of_two_clips_gives_prefixed_names_and_right_values():
    tx = optax.chain(optaxclip.clip_by_value(5.0), optaxclip.clip_by_global_norm(2.0))
    _, state = tx.update(G, tx.init(P), P)
    s = optaxclip.stats(state)
    value_clipped = jax.tree.map(lambda x: jnp.clip(x, -5.0, 5.0), G)
    assert float(s["0/clip_by_value/norm"]) == pytest.approx(norm64(G), rel=1e-6)
    assert float(s["0/clip_by_value/clipped_norm"]) == pytest.approx(
        norm64(value_clipped), rel=1e-6
    )
    assert float(s["1/clip_by_global_norm/norm"]) == pytest.approx(
        norm64(value_clipped), rel=1e-6
    )
    assert float(s["1/clip_by_global_norm/clipped_norm"]) == pytest.approx(2.0, rel=1e-6)
    assert float(s["1/clip_by_global_norm/clip_rate"]) == 1.0


def test_stats_inside_inject_hyperparams_and_multisteps():
    tx = optax.inject_hyperparams(optaxclip.clip_by_global_norm)(max_norm=3.0)
    _, state = tx.update(G, tx.init(P))
    s = optaxclip.stats(state)
    assert float(s["threshold"]) == 3.0 and float(s["norm"]) == pytest.approx(norm64(G))

    ms = optax.MultiSteps(optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(0.1)), 2)
    state = ms.init(P)
    g2 = jax.tree.map(lambda x: x * 3, G)
    _, state = ms.update(G, state, P)
    assert int(optaxclip.stats(state)["count"]) == 0  # nothing applied yet
    _, state = ms.update(g2, state, P)
    s = optaxclip.stats(state)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, G, g2)
    assert int(s["count"]) == 1
    assert float(s["norm"]) == pytest.approx(norm64(mean), rel=1e-6)


def test_stats_names_inside_partition_use_the_group_labels():
    tx = optax.partition(
        {"a": optaxclip.clip_by_global_norm(1.0), "b": optaxclip.clip_by_block_norm(1.0)},
        {"w": "a", "b": "b"},
    )
    _, state = tx.update(G, tx.init(P), P)
    s = optaxclip.stats(state)
    assert float(s["a/clip_by_global_norm/norm"]) == pytest.approx(5.0)
    assert float(s["b/clip_by_block_norm/norm"]) == pytest.approx(12.0)


def test_stats_is_jit_safe_and_empty_without_clip_stats():
    tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(0.1))

    @jax.jit
    def step(state):
        _, state = tx.update(G, state, P)
        return optaxclip.stats(state)

    s = step(tx.init(P))
    assert float(s["norm"]) == pytest.approx(norm64(G), rel=1e-6)
    assert optaxclip.stats(optax.adam(1e-3).init(P)) == {}


def test_nonfinite_steps_are_counted():
    tx = optaxclip.clip_by_global_norm(1.0)
    state = tx.init(P)
    for g in (G, {"w": G["w"], "b": jnp.array([jnp.inf, 0.0])}, G):
        _, state = tx.update(g, state)
    s = optaxclip.stats(state)
    assert int(s["nonfinite_count"]) == 1 and int(s["count"]) == 3
    assert int(s["clip_count"]) == 2  # the inf step is not a clip


def test_clip_stats_dtypes_are_fixed():
    tx = optaxclip.clip_by_global_norm(1.0)
    state = tx.init(P)
    init_types = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    _, state = tx.update(jax.tree.map(lambda x: x.astype(jnp.bfloat16), G), state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == init_types


def test_partition_labels_that_look_like_plumbing_still_name_their_group():
    # "value" (an actor-critic's value head) and "stats" are labels a user picks; only
    # the attribute names of wrappers' inner states are left out of the keys.
    labels = {"v": "value", "s": "stats", "p": "policy"}
    clip = optaxclip.clip_by_global_norm(1.0)
    tx = optax.partition({"value": clip, "stats": clip, "policy": clip}, labels)
    grads = {"v": jnp.ones(2), "s": jnp.ones(3), "p": jnp.ones(4)}
    _, state = tx.update(grads, tx.init(grads))
    s = optaxclip.stats(state)
    for label, size in (("value", 2), ("stats", 3), ("policy", 4)):
        assert float(s[f"{label}/clip_by_global_norm/norm"]) == pytest.approx(size**0.5)


# Every transform whose state records a norm, as a user would build it (the catalog's
# defaults), on one float64 leaf whose norm (1e200) no float32 holds.
@pytest.mark.parametrize(
    "name",
    [
        "clip_by_global_norm",
        "clip_by_block_norm",
        "zclip",
        "autoclip_window",
        "adagc",
        "skip_spikes",
        "monitor_per_leaf",
    ],
)
def test_float64_norms_beyond_float32_are_held_at_its_largest_not_counted_nonfinite(name):
    from optaxclip._catalog import ENTRIES

    entry = next(e for e in ENTRIES if e.name == name)
    big = float(jnp.finfo(jnp.float32).max)
    with jax.enable_x64(True):
        g = {"w": jnp.array([6e199, 8e199], jnp.float64)}
        tx = entry.optimizer(inner=optax.sgd(1.0), defaults=True)
        state = tx.init(g)
        for _ in range(3):
            _, state = tx.update(g, state, g)
        s = optaxclip.stats(state)
    norms = {k: float(v) for k, v in s.items() if k.endswith("norm") and "clipped" not in k}
    assert norms and all(v == big for v in norms.values()), norms
    assert all(int(v) == 0 for k, v in s.items() if k.endswith("nonfinite_count")), s


def test_as_float32_saturates_only_finite_wide_values():
    from optaxclip._stats import as_float32

    big = float(jnp.finfo(jnp.float32).max)
    with jax.enable_x64(True):
        got = as_float32(jnp.array([1e200, -1e300, jnp.inf, jnp.nan, 2.5], jnp.float64))
    assert got.dtype == jnp.float32
    assert got[0] == big and got[1] == -big and got[2] == jnp.inf and jnp.isnan(got[3])
    assert got[4] == 2.5
    assert as_float32(jnp.array(jnp.inf, jnp.float32)) == jnp.inf
