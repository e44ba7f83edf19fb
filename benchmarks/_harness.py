"""Trees, candidates and the timing loops shared by the benchmark sections."""

from __future__ import annotations

import gc
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip


def make_tree(n_leaves: int, n_params: int, seed: int, scale: float = 1.0) -> dict:
    """``n_leaves`` float32 leaves of (nearly) equal size adding up to ``n_params``.

    Equal sizes, like the measurement in the issue that motivated these benchmarks;
    names are zero-padded so that the leaf order is the creation order.
    """
    base, extra = divmod(n_params, n_leaves)
    rng = np.random.default_rng(seed)
    tree = {}
    for i in range(n_leaves):
        size = base + (1 if i < extra else 0)
        tree[f"w{i:05d}"] = jnp.asarray(rng.standard_normal(size, np.float32) * scale)
    return tree


def tree_bytes(tree: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree)))


def bare_clip(max_norm: float) -> optax.GradientTransformation:
    """The cheapest possible clip: one float32 norm, one scalar multiply per element.

    No robustness (overflows, loses half-precision leaves); it is the reference for
    "one extra read of the gradient". The scale leaves through a ``lax.cond`` so that
    XLA cannot copy the sum over all leaves into every kernel that reads it (which
    makes compile time grow with the square of the number of leaves).
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        leaves = jax.tree_util.tree_leaves(updates)
        norm = jnp.sqrt(jnp.sum(jnp.stack([jnp.sum(jnp.square(x)) for x in leaves])))
        scale = jax.lax.cond(
            norm > max_norm, lambda n: max_norm / n, lambda n: jnp.ones_like(n), norm
        )
        return jax.tree.map(lambda x: x * scale.astype(x.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def optimizer(name: str) -> optax.GradientTransformation:
    if name == "adamw":
        return optax.adamw(1e-3)
    if name == "sgd":
        return optax.sgd(1e-3)
    raise ValueError(name)


def clip_candidates(opt_name: str) -> dict[str, Callable[[], optax.GradientTransformation]]:
    """Step candidates: the optimizer alone, and after each clip."""
    return {
        "alone": lambda: optimizer(opt_name),
        "optaxclip": lambda: optax.chain(optaxclip.clip_by_global_norm(1.0), optimizer(opt_name)),
        "optax": lambda: optax.chain(optax.clip_by_global_norm(1.0), optimizer(opt_name)),
        "bare": lambda: optax.chain(bare_clip(1.0), optimizer(opt_name)),
    }


def step_fn(tx: optax.GradientTransformation) -> Callable:
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


class Compiled:
    """A compiled training step, with how long lowering and compiling took."""

    def __init__(self, tx: optax.GradientTransformation, params: Any, grads: Any, state=None):
        self.state = tx.init(params) if state is None else state
        w0, c0 = time.perf_counter(), time.process_time()
        lowered = jax.jit(step_fn(tx)).lower(params, self.state, grads)
        w1 = time.perf_counter()
        self.executable = lowered.compile()
        w2, c2 = time.perf_counter(), time.process_time()
        self.lower_s, self.compile_s = w1 - w0, w2 - w1
        self.total_s = w2 - w0
        self.total_cpu_s = c2 - c0
        memory = self.executable.memory_analysis()
        self.temp_bytes = int(getattr(memory, "temp_size_in_bytes", -1)) if memory else -1
        self.params, self.grads = params, grads

    def timings(self) -> dict[str, float]:
        return {
            "lower_s": self.lower_s,
            "compile_s": self.compile_s,
            "total_s": self.total_s,
            "total_cpu_s": self.total_cpu_s,
        }

    def run(self) -> None:
        jax.block_until_ready(self.executable(self.params, self.state, self.grads))


class Donated:
    """A training step jitted with its parameters and optimizer state donated.

    This is how training loops run (``jax.jit(step, donate_argnums=...)``): XLA may
    write the new parameters and state over the old ones, and must copy whatever it
    cannot. Each call carries on from the previous call's output, from private
    copies of the parameters and state.
    """

    def __init__(self, tx: optax.GradientTransformation, params: Any, grads: Any):
        # A private copy of the parameters (donation consumes them; the caller's tree is
        # shared by other candidates), and the state from an eager init, as users build it.
        params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
        state = tx.init(params)
        lowered = jax.jit(step_fn(tx), donate_argnums=(0, 1)).lower(params, state, grads)
        self.executable = lowered.compile()
        memory = self.executable.memory_analysis()
        self.temp_bytes = int(getattr(memory, "temp_size_in_bytes", -1)) if memory else -1
        self.carry, self.grads = (params, state), grads

    def run(self) -> None:
        self.carry = jax.block_until_ready(self.executable(*self.carry, self.grads))


def time_interleaved(
    runs: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int = 2,
    progress: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, the candidates taking turns.

    Repeat r runs every candidate once, starting from a different one each time, so
    that the calls compared within a repeat are adjacent in time.
    """
    names = list(runs)
    for name in names:
        for _ in range(warmup):
            runs[name]()
    gc.collect()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
        if progress is not None:
            progress()
    return times


def median_ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over repeats of (this candidate's time / the base's, same repeat)."""
    return float(np.median(np.asarray(times[name]) / np.asarray(times[base])))


def machine_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "optaxclip": optaxclip.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
