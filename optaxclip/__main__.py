"""`python -m optaxclip`: a small model trained through a loss cliff, with and without
clipping, in a few seconds on CPU.

A two-layer tanh MLP learns a smooth 1-D regression with SGD. At a few steps a corrupted
batch arrives (inputs scaled by 300, targets by 100: a data-loader bug or a bad shard),
and its gradient is hundreds of times the usual size: the same cliff Pascanu et al.
(2013) describe. Without clipping one such step throws the weights far away and the loss
jumps by orders of magnitude; with `clip_by_global_norm(1.0)` the step is cut to a
normal length and training carries on. The statistics come out of the optimizer state.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip

STEPS = 400
BAD_STEPS = (150, 151, 300)
HIDDEN = 32


def _data(key, steps=STEPS, batch=64):
    x = jax.random.uniform(key, (steps, batch, 1), minval=-2.0, maxval=2.0)
    y = jnp.sin(2.0 * x) + 0.3 * x
    bad = jnp.zeros((steps, 1, 1)).at[jnp.array(BAD_STEPS)].set(1.0)
    x = jnp.where(bad > 0, 300.0 * x, x)
    y = jnp.where(bad > 0, 100.0 * y, y)
    return x, y


def _init(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (1, HIDDEN)) * 1.0,
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, 1)) / jnp.sqrt(HIDDEN),
        "b2": jnp.zeros(1),
    }


def _loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def train(tx: optax.GradientTransformation, seed: int = 0):
    """Trains the MLP with ``tx``; returns per-step clean-data losses and the final state."""
    kp, kd = jax.random.split(jax.random.key(seed))
    params = _init(kp)
    xs, ys = _data(kd)
    x_eval = jnp.linspace(-2.0, 2.0, 256)[:, None]
    y_eval = jnp.sin(2.0 * x_eval) + 0.3 * x_eval

    def step(carry, batch):
        params, opt_state = carry
        grads = jax.grad(_loss)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), (_loss(params, x_eval, y_eval), optaxclip.global_norm(grads))

    run = jax.jit(lambda p, s: jax.lax.scan(step, (p, s), (xs, ys)))
    (params, opt_state), (losses, norms) = run(params, tx.init(params))
    return np.asarray(losses), np.asarray(norms), opt_state


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    lr = 0.05
    plain_losses, norms, _ = train(optax.sgd(lr), args.seed)
    clip_tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(lr))
    clip_losses, _, clip_state = train(clip_tx, args.seed)

    print("optaxclip demo: a 2-layer MLP trained with SGD through corrupted batches at steps",
          ", ".join(str(s + 1) for s in BAD_STEPS))
    print(f"typical gradient norm {np.median(norms):.3g}; on the bad batches "
          + ", ".join(f"{norms[s]:.3g}" for s in BAD_STEPS))
    print(f"\n{'step':>6} {'loss, no clipping':>20} {'loss, clip_by_global_norm(1.0)':>32}")
    for s in (0, 50, 149, 150, 152, 200, 299, 300, 350, STEPS - 1):
        print(f"{s + 1:>6} {plain_losses[s]:>20.4g} {clip_losses[s]:>32.4g}")
    print("\nclip statistics from optaxclip.stats(opt_state) after the last step:")
    for key, value in optaxclip.stats(clip_state).items():
        print(f"  {key:<16} {np.asarray(value)}")
    worst_plain = np.nanmax(plain_losses[BAD_STEPS[0]:])
    worst_clip = np.nanmax(clip_losses[BAD_STEPS[0]:])
    print(f"\nworst loss after the first bad batch: {worst_plain:.4g} without clipping, "
          f"{worst_clip:.4g} with clipping")
    print(f"final loss: {plain_losses[-1]:.4g} without clipping, {clip_losses[-1]:.4g} with "
          f"clipping  ({time.perf_counter() - start:.1f} s on {jax.devices()[0].platform})")


if __name__ == "__main__":
    main()
