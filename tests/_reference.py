"""Independent float64 NumPy references shared by the tests, and the scaffolding the
adaptive tests share to drive a transform with a chosen sequence of norms."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import optaxclip


def np64(x):
    """A leaf as a float64 (complex128 for complex) NumPy array."""
    x = np.asarray(jax.device_get(x))
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def norm64(tree):
    """Global L2 norm in float64, computed without any optaxclip code."""
    leaves = jax.tree_util.tree_leaves(tree)
    return float(np.sqrt(sum(np.sum(np.abs(np64(x)) ** 2) for x in leaves)))


def clip64(tree, max_norm):
    """The global-norm clip rule in float64: g * min(1, c / ||g||), 1 at ||g|| = 0."""
    n = norm64(tree)
    scale = 1.0 if n <= max_norm or n == 0 else max_norm / n
    return jax.tree.map(lambda x: np64(x) * scale, tree), scale


def rel_err(actual, expected):
    actual, expected = np64(actual), np64(expected)
    denom = np.maximum(np.abs(expected), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(actual - expected) / denom)) if actual.size else 0.0


# Shared by the adaptive tests that drive a transform with a chosen norm sequence.
RNG = np.random.default_rng(0)
# A fixed direction with unit global norm: step t's gradient is DIRECTION * norms[t].
DIRECTION = {
    "w": RNG.normal(size=(3, 4)).astype(np.float32),
    "b": RNG.normal(size=(4,)).astype(np.float32),
}
_SCALE = math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in DIRECTION.values()))
DIRECTION = jax.tree.map(lambda x: jnp.asarray(x / _SCALE), DIRECTION)


def norms64(tree):
    """Each leaf's L2 norm in float64 NumPy (eager optaxclip norms would compile op by op)."""
    return [
        float(np.linalg.norm(np.asarray(x, np.complex128).ravel())) for x in jax.tree.leaves(tree)
    ]


def scaled(s):
    """The gradient tree DIRECTION * s (global norm s)."""
    return jax.tree.map(lambda d: d * s, DIRECTION)


def scan_steps(tx, norms):
    """Feeds DIRECTION * norms[t] through ``tx`` in a lax.scan (trace it under jit).

    Returns the final state and, per step, the measured norm, the output's norm, the
    threshold and the clip decision.
    """

    def step(state, s):
        out, state = tx.update(scaled(s), state, DIRECTION)
        st = optaxclip.stats(state)  # also finds it inside inject_hyperparams
        return state, (st["norm"], optaxclip.global_norm(out), st["threshold"], st["clipped"])

    return jax.lax.scan(step, tx.init(DIRECTION), norms)


def run_scan(tx, norms):
    final, per_step = jax.jit(functools.partial(scan_steps, tx))(norms)
    return final, [np.asarray(x) for x in per_step]


def jit_run(tx, grads_seq):
    """Feeds each tree of ``grads_seq`` through a jitted ``tx.update``, one call per step.

    Returns how many times the update was traced, the threshold and the measured norm
    of each step (from the transform's ``state.stats``), and the final state.
    """
    traces = []

    def update(grads, state):
        traces.append(1)
        return tx.update(grads, state)

    update = jax.jit(update)
    state = tx.init(grads_seq[0])
    thresholds, measured = [], []
    for grads in grads_seq:
        _, state = update(grads, state)
        thresholds.append(float(state.stats.threshold))
        measured.append(float(state.stats.norm))
    return len(traces), thresholds, measured, state


def jit_steps(tx, norms):
    """:func:`jit_run` on DIRECTION * norms[t], without the final state."""
    return jit_run(tx, [scaled(s) for s in norms])[:3]
