"""optaxclip inside Flax training code: NNX (nnx.Optimizer) and Linen (TrainState)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _transforms import BY_NAME, NAMES, adamw
from flax import nnx
from flax.training import train_state

import optaxclip

STEPS = 30
SPIKE = 20
CLIP_STATS_KEYS = (*optaxclip.ClipStats._fields, "clip_rate")


def _regression_data(seed, shape):
    """Inputs of ``shape`` (..., 2) and a smooth target of the last-step/only features."""
    rng = np.random.RandomState(seed)
    x = rng.uniform(-2.0, 2.0, size=shape).astype(np.float32)
    last = x[:, -1] if x.ndim == 3 else x
    y = (np.sin(last[:, :1]) + 0.5 * last[:, 1:] ** 2).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(2, 16, rngs=rngs)
        self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


class LSTMRegressor(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        # The fused-gate LSTM cell: 3 parameter leaves instead of 12 (compiles faster).
        self.rnn = nnx.RNN(nnx.OptimizedLSTMCell(2, 8, rngs=rngs))
        self.out = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(self.rnn(x)[:, -1])


def _mse(model, x, y):
    return jnp.mean(jnp.square(model(x) - y))


TRACES = []


@nnx.jit
def _nnx_step(model, optimizer, x, y):
    TRACES.append(type(model).__name__)
    loss, grads = nnx.value_and_grad(_mse)(model, x, y)
    optimizer.update(model, grads)
    return loss, optaxclip.stats(optimizer.opt_state)


@pytest.mark.parametrize("name", NAMES)
def test_nnx_optimizer_trains_an_mlp_and_stats_read_its_state(name):
    case = BY_NAME[name]
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, case.optimizer(), wrt=nnx.Param)
    x, y = _regression_data(1, (32, 2))

    traces = len(TRACES)
    losses, inside = [], []
    for t in range(STEPS):
        # One bad batch (shifted targets): a gradient spike for the adaptive ones to catch.
        loss, s = _nnx_step(model, optimizer, x, y + 20.0 * (t == SPIKE))
        losses.append(float(loss))
        inside.append(s)
    assert len(TRACES) == traces + 1  # float32 params: the state is type-stable
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses

    # stats() reads the NNX state outside jit, through nnx.State too, and agrees with
    # what it returned inside the jitted step.
    s = optaxclip.stats(optimizer.opt_state)
    extra_keys = ("consecutive_skips",) if case.wraps else ()
    if name == "spike_aware_clip":  # the fraction of coordinates clipped
        extra_keys = ("clipped_fraction",)
    if name == "monitor_per_leaf":  # each parameter's norm, keyed by its path
        extra_keys = tuple(
            f"leaf_norm/{layer}/{p}" for layer in ("hidden", "out") for p in ("bias", "kernel")
        )
    assert set(s) == {*CLIP_STATS_KEYS, *extra_keys}
    assert int(s["count"]) == STEPS
    assert int(s["nonfinite_count"]) == 0
    # One key scheme whichever way the state is handed over.
    from_nnx_state = optaxclip.stats(nnx.state(optimizer))
    from_optimizer = optaxclip.stats(optimizer)
    assert set(from_nnx_state) == set(from_optimizer) == set(s)
    for key, value in s.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(inside[-1][key]))
        np.testing.assert_array_equal(np.asarray(value), np.asarray(from_nnx_state[key]))
        np.testing.assert_array_equal(np.asarray(value), np.asarray(from_optimizer[key]))
    # Values, not live views of the optimizer: an earlier step's stats stay put.
    assert int(inside[0]["count"]) == 1
    if name != "skip_nonfinite" and case.clips:
        # Tight thresholds, and a spike: every transform clipped (or skipped) some step.
        assert int(s["clip_count"]) > 0


def test_nnx_optimizer_trains_an_lstm_with_the_adaptive_transforms():
    # Every transform whose state depends on the model (AGC reads the params; AdaGC keeps
    # one EMA per tensor) or on the history of norms, chained, inside both skip wrappers.
    adaptive = ["adaptive_grad_clip", "autoclip_sketch", "zclip", "adagc"]
    inner = optax.chain(*[BY_NAME[name].build() for name in adaptive], adamw())
    tx = BY_NAME["skip_nonfinite"].build(inner=BY_NAME["skip_spikes"].build(inner=inner))
    model = LSTMRegressor(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = _regression_data(1, (16, 5, 2))
    losses = [float(_nnx_step(model, optimizer, x, y)[0]) for _ in range(STEPS)]
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses

    s = optaxclip.stats(optimizer.opt_state)
    skipped = int(s["skip_nonfinite/skip_spikes/clip_count"])
    assert int(s["skip_nonfinite/count"]) == int(s["skip_nonfinite/skip_spikes/count"]) == STEPS
    for i, name in enumerate(adaptive):
        transform = name.removesuffix("_sketch")
        key = f"skip_nonfinite/skip_spikes/{i}/{transform}/count"
        assert int(s[key]) == STEPS - skipped, key  # a skipped step never reaches them
    # Each ClipStats, plus each skip wrapper's run of consecutive skips.
    assert len(s) == len(CLIP_STATS_KEYS) * (len(adaptive) + 2) + 2
    # AdaGC keeps one reference norm per LSTM and head parameter.
    gamma = optimizer.opt_state.inner_state.inner_state[3].gamma
    assert gamma.shape == (len(jax.tree.leaves(nnx.state(model, nnx.Param))),)


@nnx.jit
def _nnx_grads_and_updates(model, optimizer, x, y):
    grads = nnx.grad(_mse)(model, x, y)
    return grads, optimizer.update(model, grads)


def test_nnx_optimizer_gives_agc_the_params_it_needs():
    # nnx.Optimizer.update passes the model's params to tx.update: the update equals
    # optax's own AGC computed on the same params and gradients.
    model = MLP(nnx.Rngs(0))
    params = nnx.to_pure_dict(jax.tree.map(np.array, nnx.state(model, nnx.Param)))
    tx = optax.chain(optaxclip.adaptive_grad_clip(0.01), optax.sgd(1.0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads, updates = _nnx_grads_and_updates(model, optimizer, *_regression_data(2, (32, 2)))

    grads = nnx.to_pure_dict(nnx.state(grads, nnx.Param))
    ref = optax.chain(optax.adaptive_grad_clip(0.01), optax.sgd(1.0))
    want, _ = jax.jit(ref.update)(grads, ref.init(params), params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        nnx.to_pure_dict(updates), want,
    )
    s = optaxclip.stats(optimizer.opt_state)
    assert bool(s["clipped"]) and float(s["threshold"]) == pytest.approx(0.01)


def test_nan_batch_is_skipped_and_loses_no_step():
    # An NNX training loop fed one batch whose gradients are NaN, with skip_nonfinite:
    # that step changes neither the parameters nor the optimizer state, training goes
    # on, and the run ends exactly where a run that never saw the bad batch ends.
    rng = np.random.RandomState(3)
    batches = [_regression_data(seed, (16, 2)) for seed in rng.randint(0, 2**31, size=8)]
    x_bad = batches[3][0].at[0, 0].set(jnp.nan)
    poisoned = [*batches[:3], (x_bad, batches[3][1]), *batches[3:]]

    tx = optaxclip.skip_nonfinite(optax.chain(optaxclip.clip_by_global_norm(0.5), adamw()))

    def run(data, check_bad_step=False):
        model = MLP(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        losses = []
        for i, (x, y) in enumerate(data):
            model_before, opt_before = jax.tree.map(
                np.array, (nnx.state(model), optimizer.opt_state)
            )
            loss, _ = _nnx_step(model, optimizer, x, y)
            losses.append(float(loss))
            if check_bad_step and i == 3:
                assert np.isnan(losses[-1])
                # Nothing moved but the skip counter.
                model_after, opt_after = jax.tree.map(
                    np.array, (nnx.state(model), optimizer.opt_state)
                )
                jax.tree.map(np.testing.assert_array_equal, model_before, model_after)
                jax.tree.map(
                    np.testing.assert_array_equal, opt_before.inner_state, opt_after.inner_state
                )
        return model, optimizer, losses

    model, optimizer, losses = run(poisoned, check_bad_step=True)
    clean_model, clean_optimizer, clean_losses = run(batches)

    finite = [v for v in losses if np.isfinite(v)]
    assert finite == clean_losses  # every good step was taken, in order
    jax.tree.map(
        np.testing.assert_array_equal, nnx.state(model, nnx.Param),
        nnx.state(clean_model, nnx.Param),
    )
    jax.tree.map(
        np.testing.assert_array_equal, optimizer.opt_state.inner_state,
        clean_optimizer.opt_state.inner_state,
    )

    s = optaxclip.stats(optimizer.opt_state)
    assert int(s["skip_nonfinite/clip_count"]) == 1  # skipped steps
    assert int(s["skip_nonfinite/nonfinite_count"]) == 1
    assert int(s["skip_nonfinite/count"]) == len(poisoned)
    # The clip inside never saw the bad step.
    assert int(s["skip_nonfinite/0/clip_by_global_norm/count"]) == len(batches)
    assert int(s["skip_nonfinite/0/clip_by_global_norm/nonfinite_count"]) == 0
    # nnx.state() turns the NamedTuples into dicts; the keys stay the same.
    s = optaxclip.stats(nnx.state(optimizer))
    assert int(s["skip_nonfinite/clip_count"]) == 1
    assert int(s["skip_nonfinite/consecutive_skips"]) == 0  # the steps after it were taken
    assert int(s["skip_nonfinite/0/clip_by_global_norm/count"]) == len(batches)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(jnp.tanh(nn.Dense(16)(x)))


@jax.jit
def _linen_step(state, x, y):
    def loss_fn(params):
        return jnp.mean(jnp.square(state.apply_fn({"params": params}, x) - y))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def test_linen_train_state_trains_with_a_chain_of_clips():
    # TrainState.apply_gradients passes the params (AGC needs them) and keeps the state.
    x, y = _regression_data(4, (32, 2))
    module = LinenMLP()
    params = module.init(jax.random.PRNGKey(0), x)["params"]
    tx = optaxclip.skip_nonfinite(
        optax.chain(
            optaxclip.adaptive_grad_clip(0.02),
            optaxclip.autoclip(25.0, warmup_steps=2),
            optaxclip.clip_by_global_norm(0.5),
            adamw(),
        )
    )
    state = train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx)
    losses = []
    for t in range(STEPS):
        state, loss = _linen_step(state, x, y + 20.0 * (t == SPIKE))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    s = optaxclip.stats(state.opt_state)
    assert int(s["skip_nonfinite/count"]) == STEPS == int(state.step)
    for i, name in enumerate(["adaptive_grad_clip", "autoclip", "clip_by_global_norm"]):
        assert int(s[f"skip_nonfinite/{i}/{name}/count"]) == STEPS
    assert int(s["skip_nonfinite/0/adaptive_grad_clip/clip_count"]) > 0
    assert int(s["skip_nonfinite/1/autoclip/clip_count"]) > 0  # at least the spike
