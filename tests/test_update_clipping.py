"""The update-clipping recipes of docs/guides/update_clipping.md, against their rules in
float64 NumPy.

- Adafactor (Shazeer & Stern 2018, Algorithm 4): the update ``U = G / sqrt(V)`` is
  divided by ``max(1, RMS(U) / d)`` per tensor before the learning rate.
- The same clip on Adam's update, and after a whole ``optax.adamw`` (whose update then
  comes back clipped per tensor, exactly).
- StableAdamW (Wortsman et al. 2023): the learning rate divided per tensor by
  ``max(1, sqrt(mean(g**2 / max(v, eps**2))) / d)``, written out as Wortsman's released
  ``StableAdamWUnfused`` step, checked against the guide's own ``stable_adamw`` (executed
  from the page), and the honest statement that the clip recipe equals it only with
  ``b1 = 0`` and ``eps = 0``.

The references below use NumPy only; Optax's optimizers appear only as the thing under
test or, for ``optax.adafactor``, as a second witness.
"""

from __future__ import annotations

import contextlib
import functools
import io
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides" / "update_clipping.md"
STEPS = 40
SPIKE = 30  # 0-based: the step whose gradient is 100x larger in "w"


def _grads(seed=0, steps=STEPS, shapes=(("w", (6, 5)), ("b", (5,)))):
    rng = np.random.default_rng(seed)
    grads = {k: rng.normal(size=(steps, *s)) for k, s in shapes}
    grads["w"][SPIKE] *= 100.0
    return {k: v.astype(np.float32) for k, v in grads.items()}


def _rms(x):
    return np.sqrt(np.mean(np.square(x)))


def _clip_rms64(u, d):
    """Adafactor's update clipping: ``u / max(1, RMS(u) / d)``; also returns the divisor."""
    divisor = max(1.0, _rms(u) / d)
    return u / divisor, divisor


def _run(tx, grads, params):
    """``tx`` over the stacked gradients with the parameters updated: (updates, params)."""

    def step(carry, g):
        params, state = carry
        updates, state = tx.update(g, state, params)
        return (optax.apply_updates(params, updates), state), updates

    def run(grads, params):
        (params, _), updates = jax.lax.scan(step, (params, tx.init(params)), grads)
        return updates, params

    updates, params = jax.jit(run)(jax.tree.map(jnp.asarray, grads), params)
    return jax.tree.map(lambda x: np.asarray(x, np.float64), updates), params


def _close(got, want, rtol):
    """Equal to ``rtol``, and to ``rtol`` of each leaf's largest value where the decay
    term nearly cancels the step (float32 rounding of the terms, not of the result)."""
    for key in want:
        atol = rtol * float(np.max(np.abs(want[key])))
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol, err_msg=key)


# ---------------------------------------------------------------------------------------
# Adafactor


def adafactor64(grads, *, lr, d=1.0, decay=0.8, eps1=1e-30, min_dim=4):
    """Adafactor's update (no momentum, no relative step), per tensor, in float64.

    Matrices whose two dimensions are both at least ``min_dim`` keep the factored second
    moment: row and column means ``R``, ``C`` of ``G**2 + eps1`` and
    ``V = outer(R, C) / mean(R)``; other tensors keep the full ``V``. The decay at step t
    (from 1) is ``1 - t**-decay``. Returns the updates ``-lr * U / max(1, RMS(U) / d)``
    per step and the divisors.
    """
    out = {k: [] for k in grads}
    divisors = {k: [] for k in grads}
    for key, seq in grads.items():
        seq = seq.astype(np.float64)
        factored = seq.ndim == 3 and min(seq.shape[1:]) >= min_dim
        r = c = v = 0.0
        for t, g in enumerate(seq, start=1):
            beta = 1.0 - t**-decay
            g2 = g**2 + eps1
            if factored:
                r = beta * r + (1 - beta) * g2.mean(axis=1)
                c = beta * c + (1 - beta) * g2.mean(axis=0)
                v_hat = np.outer(r, c) / r.mean()
            else:
                v = beta * v + (1 - beta) * g2
                v_hat = v
            u, divisor = _clip_rms64(g / np.sqrt(v_hat), d)
            out[key].append(-lr * u)
            divisors[key].append(divisor)
    return {k: np.stack(x) for k, x in out.items()}, divisors


def test_adafactor_recipe_is_the_papers_update_clipping_and_optax_adafactor():
    lr = 1e-2
    grads = _grads()
    params = {"w": jnp.zeros((6, 5)), "b": jnp.zeros(5)}
    recipe = optax.chain(
        optax.scale_by_factored_rms(min_dim_size_to_factor=4),
        optaxclip.clip_by_block_rms(1.0),
        optax.scale_by_learning_rate(lr),
    )
    witness = optax.adafactor(lr, min_dim_size_to_factor=4, multiply_by_parameter_scale=False)
    got, _ = _run(recipe, grads, params)
    want, divisors = adafactor64(grads, lr=lr)
    _close(got, want, rtol=1e-5)
    _close(got, _run(witness, grads, params)[0], rtol=1e-6)
    assert divisors["w"][SPIKE] > 2  # the spike was clipped, by the rule
    assert sum(x > 1 for x in divisors["b"]) > 0


# ---------------------------------------------------------------------------------------
# Adam's update, clipped before weight decay and the learning rate; and after adamw.


def adam64(grads, params, *, lr, b1, b2, eps, wd, clip_before=None, clip_after=None):
    """AdamW (optax's rule: bias-corrected moments, ``eps`` outside the root, decoupled
    decay added before the learning rate) in float64, the parameters updated each step.

    ``clip_before=d`` clips Adam's update per tensor to RMS ``d`` before the decay;
    ``clip_after=c`` clips the final update ``-lr * (u + wd * theta)`` to RMS ``c``.
    Returns the updates per step and the divisors of the clip.
    """
    theta = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: 0.0 for k in grads}
    v = {k: 0.0 for k in grads}
    out = {k: [] for k in grads}
    divisors = {k: [] for k in grads}
    for t in range(1, len(next(iter(grads.values()))) + 1):
        for key in grads:
            g = grads[key][t - 1].astype(np.float64)
            m[key] = b1 * m[key] + (1 - b1) * g
            v[key] = b2 * v[key] + (1 - b2) * g**2
            u = (m[key] / (1 - b1**t)) / (np.sqrt(v[key] / (1 - b2**t)) + eps)
            divisor = 1.0
            if clip_before is not None:
                u, divisor = _clip_rms64(u, clip_before)
            update = -lr * (u + wd * theta[key])
            if clip_after is not None:
                update, divisor = _clip_rms64(update, clip_after)
            theta[key] = theta[key] + update
            out[key].append(update)
            divisors[key].append(divisor)
    return {k: np.stack(x) for k, x in out.items()}, divisors


ADAM = dict(b1=0.9, b2=0.999, eps=1e-8)


def test_adam_recipe_clips_adams_update_per_tensor_before_decay_and_learning_rate():
    lr, wd, d = 1e-2, 1e-2, 0.5
    grads = _grads(seed=1)
    params = {"w": jnp.ones((6, 5)), "b": jnp.zeros(5)}
    recipe = optax.chain(
        optax.scale_by_adam(**ADAM),
        optaxclip.clip_by_block_rms(d),
        optax.add_decayed_weights(wd),
        optax.scale_by_learning_rate(lr),
    )
    got, _ = _run(recipe, grads, params)
    want, divisors = adam64(grads, params, lr=lr, wd=wd, clip_before=d, **ADAM)
    _close(got, want, rtol=2e-5)
    assert divisors["w"][SPIKE] > 1 and sum(x > 1 for x in divisors["b"]) > 0


def test_the_chain_with_the_clip_after_adamw_returns_adamws_update_clipped_per_tensor():
    lr, wd, c = 1e-2, 1e-2, 5e-3
    grads = _grads(seed=2)
    params = {"w": jnp.ones((6, 5)), "b": jnp.zeros(5)}
    adamw = optax.adamw(lr, weight_decay=wd, **ADAM)
    chain = optax.chain(adamw, optaxclip.clip_by_block_rms(c))
    got, _ = _run(chain, grads, params)
    want, divisors = adam64(grads, params, lr=lr, wd=wd, clip_after=c, **ADAM)
    _close(got, want, rtol=2e-5)
    assert divisors["w"][SPIKE] > 1 and sum(x > 1 for x in divisors["b"]) > 0

    # Step by step: the chain's update is what adamw alone returns from the same state
    # and parameters, clipped per tensor in NumPy.
    state, p = chain.init(params), params
    update = jax.jit(chain.update)
    for t in range(STEPS):
        g = {k: jnp.asarray(x[t]) for k, x in grads.items()}
        alone, _ = adamw.update(g, state[0], p)
        out, state = update(g, state, p)
        for key in g:
            want_t, _ = _clip_rms64(np.asarray(alone[key], np.float64), c)
            atol = 1e-6 * float(np.max(np.abs(want_t)))
            np.testing.assert_allclose(np.asarray(out[key]), want_t, rtol=1e-6, atol=atol)
        p = optax.apply_updates(p, out)


def test_a_clip_after_adam_at_lr_times_d_is_the_clip_before_the_learning_rate():
    # Without weight decay, chain(adam(lr), clip(d * lr)) is Adafactor's clipping of
    # Adam's update, a learning-rate schedule included (read at the same step count).
    schedule = optax.cosine_decay_schedule(1e-2, decay_steps=STEPS)
    d = 0.5
    after = optax.chain(
        optax.adam(schedule, **ADAM),
        optaxclip.clip_by_block_rms(lambda count: d * schedule(count)),
    )
    before = optax.chain(
        optax.scale_by_adam(**ADAM),
        optaxclip.clip_by_block_rms(d),
        optax.scale_by_learning_rate(schedule),
    )
    grads = _grads(seed=3)
    params = {"w": jnp.ones((6, 5)), "b": jnp.zeros(5)}
    a, _ = _run(after, grads, params)
    b, _ = _run(before, grads, params)
    _close(a, b, rtol=1e-5)
    _, divisors = adam64(grads, params, lr=1.0, wd=0.0, clip_before=d, **ADAM)
    assert divisors["w"][SPIKE] > 1


# ---------------------------------------------------------------------------------------
# StableAdamW


def stable_adamw64(grads, params, *, lr, b1, b2, eps, wd, d=1.0):
    """Wortsman et al.'s ``StableAdamWUnfused`` step in float64 (per tensor).

    With the debiased ``beta_hat = beta * (1 - beta**(t-1)) / (1 - beta**t)``:
    ``v <- b1hat v + (1 - b1hat) g``; ``u <- b2hat u + (1 - b2hat) g**2``;
    ``rms = sqrt(mean(g**2 / max(u, eps**2)))``;
    ``theta <- theta * (1 - lr * wd) - lr / max(1, rms / d) * v / (sqrt(u) + eps)``.
    Returns the parameter updates per step and the divisors ``max(1, rms / d)``.
    """
    theta = {k: np.asarray(x, np.float64) for k, x in params.items()}
    mom = {k: 0.0 for k in grads}
    sq = {k: 0.0 for k in grads}
    out = {k: [] for k in grads}
    divisors = {k: [] for k in grads}
    for t in range(1, len(next(iter(grads.values()))) + 1):
        b1hat = b1 * (1 - b1 ** (t - 1)) / (1 - b1**t)
        b2hat = b2 * (1 - b2 ** (t - 1)) / (1 - b2**t)
        for key in grads:
            g = grads[key][t - 1].astype(np.float64)
            mom[key] = b1hat * mom[key] + (1 - b1hat) * g
            sq[key] = b2hat * sq[key] + (1 - b2hat) * g**2
            rms = np.sqrt(np.mean(g**2 / np.maximum(sq[key], eps**2)))
            divisor = max(1.0, rms / d)
            new = theta[key] * (1 - lr * wd) - lr / divisor * mom[key] / (np.sqrt(sq[key]) + eps)
            out[key].append(new - theta[key])
            theta[key] = new
            divisors[key].append(divisor)
    return {k: np.stack(x) for k, x in out.items()}, divisors


@functools.cache
def guide_namespace() -> dict:
    """The names defined by the guide's StableAdamW block, run as the page shows it."""
    text = GUIDE.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    block = next(b for b in blocks if "def stable_adamw" in b)
    namespace: dict = {"__name__": "update_clipping_guide"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(block, str(GUIDE), "exec"), namespace)  # noqa: S102 - our own page
    return namespace


def test_the_guides_stable_adamw_is_wortsmans_rule():
    guide = guide_namespace()
    lr, wd = 1e-2, 1e-2
    grads = _grads(seed=4)
    params = {"w": jnp.ones((6, 5)), "b": jnp.zeros(5)}
    got, _ = _run(guide["stable_adamw"](lr, b1=0.9, b2=0.99, eps=1e-6, weight_decay=wd),
                  grads, params)  # fmt: skip
    want, divisors = stable_adamw64(grads, params, lr=lr, b1=0.9, b2=0.99, eps=1e-6, wd=wd)
    _close(got, want, rtol=2e-5)
    assert divisors["w"][SPIKE] > 5  # the spike's learning rate is cut


def test_the_clip_recipe_is_stable_adamw_only_without_momentum_and_epsilon():
    guide = guide_namespace()
    lr, wd = 1e-2, 1e-2
    grads = _grads(seed=5)
    params = {"w": jnp.ones((6, 5)), "b": jnp.zeros(5)}
    # b1 = 0 and eps = 0: Adam's update is g / sqrt(v_hat), whose RMS is StableAdamW's.
    got, _ = _run(guide["adamw_clipped"](lr, b1=0.0, b2=0.99, eps=0.0, weight_decay=wd),
                  grads, params)  # fmt: skip
    want, divisors = stable_adamw64(grads, params, lr=lr, b1=0.0, b2=0.99, eps=0.0, wd=wd)
    _close(got, want, rtol=2e-5)
    assert divisors["w"][SPIKE] > 5

    # With momentum the recipe measures Adam's update, not g / sqrt(v_hat): at the spike
    # StableAdamW divides the step by more than 5, the clip recipe by less than 1.5.
    got, _ = _run(guide["adamw_clipped"](lr, b1=0.9, b2=0.99, eps=1e-6, weight_decay=wd),
                  grads, params)  # fmt: skip
    stable, divisors = stable_adamw64(grads, params, lr=lr, b1=0.9, b2=0.99, eps=1e-6, wd=wd)
    _, clip_divisors = adam64(grads, params, lr=lr, wd=wd, clip_before=1.0,
                              b1=0.9, b2=0.99, eps=1e-6)  # fmt: skip
    assert divisors["w"][SPIKE] > 5 and clip_divisors["w"][SPIKE] < 1.5
    assert _rms(got["w"][SPIKE]) > 3 * _rms(stable["w"][SPIKE])
