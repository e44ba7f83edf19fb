"""adaptive_grad_clip inside shard_map/pmap on 8 simulated CPU devices, where a device
holds a part of a leaf whose split axis has size 1 locally, and where norms overflow.

JAX fixes its device count when it first initialises, so ``tests/test_agc_hardening.py``
runs this file in a subprocess::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python tests/agc_sharded_checks.py

It prints one JSON object ``{check name: {"ok": bool, "detail": str}}`` on its last line.
Each check compares the mapped run with a float64 NumPy AGC (``agc64`` below, written
without optaxclip) and with the single-device run of the same transform. Importing this
module does nothing (pytest imports it to collect doctests).
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import optaxclip

CLIPPING, EPS = 0.05, 1e-3
TOL = 1e-5  # against float64; 1e-6 against the single-device float32 run
_AXES = {2: (0,), 3: (0,)}  # the default unit axes of an unstacked rank-2/3 layer


def agc64(g: np.ndarray, w: np.ndarray, depth: int = 0) -> np.ndarray:
    """AGC in float64: each layer (the first ``depth`` axes index layers) of rank 2 or 3
    has one unit per slice over its axis 0."""
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    axes = tuple(depth + a for a in _AXES[g.ndim - depth])
    g_norm = np.sqrt(np.sum(g**2, axis=axes, keepdims=True))
    w_norm = np.sqrt(np.sum(w**2, axis=axes, keepdims=True))
    bound = CLIPPING * np.maximum(w_norm, EPS)
    return g * np.where(g_norm > bound, bound / np.where(g_norm > 0, g_norm, 1), 1.0)


def grad64(g: np.ndarray, w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """d/dg of sum(c * agc64(g, w)) in float64, for a rank-2 leaf (units: columns)."""
    g, w, c = (np.asarray(x, np.float64) for x in (g, w, c))
    n = np.sqrt(np.sum(g**2, axis=0, keepdims=True))
    bound = CLIPPING * np.maximum(np.sqrt(np.sum(w**2, axis=0, keepdims=True)), EPS)
    dot = np.sum(c * g, axis=0, keepdims=True)
    clipped = bound * (c / n - dot * g / n**3)
    return np.where(n > bound, clipped, c)


def rel(actual: Any, expected: Any) -> float:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), np.finfo(np.float64).tiny))


def _data(shape: tuple[int, ...], seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    # Per-unit magnitudes over four decades: some units clip, some do not.
    mags = 10.0 ** rng.uniform(-3, 1, size=shape[-1:])
    g = (rng.normal(size=shape) * mags * scale).astype(np.float32)
    return g, w


def _one_device(g, w, depth):
    tx = optaxclip.adaptive_grad_clip(CLIPPING, EPS, stacked_axes=depth)
    out, state = jax.jit(lambda g, w: tx.update({"w": g}, tx.init({"w": w}), {"w": w}))(g, w)
    return out["w"], state.stats


def _mapped(mesh, spec, split, depth, axis_name="x"):
    tx = optaxclip.adaptive_grad_clip(
        CLIPPING, EPS, stacked_axes=depth, axis_name=axis_name, sharded_axis=split
    )

    def body(g, w):
        out, state = tx.update({"w": g}, tx.init({"w": w}), {"w": w})
        return out["w"], state.stats

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, P())))


def _compare(problems, g, w, depth, out, stats):
    ref_out, ref_stats = _one_device(g, w, depth)
    expected = agc64(g, w, depth)
    if np.array_equal(expected, np.asarray(g, np.float64)):
        problems.append("nothing was clipped: the comparison would prove little")
    if (err := rel(out, expected)) > TOL:
        problems.append(f"updates vs float64 AGC: relative error {err:.3g}")
    if (err := rel(out, ref_out)) > 1e-6:
        problems.append(f"updates vs one device: relative error {err:.3g}")
    norm64, clipped64 = np.linalg.norm(np.float64(g)), np.linalg.norm(expected)
    for field, want in (("norm", norm64), ("clipped_norm", clipped64)):
        got, one = float(getattr(stats, field)), float(getattr(ref_stats, field))
        if abs(got - want) > TOL * want or abs(got - one) > 1e-6 * one:
            problems.append(f"{field}: {got} mapped, {one} on one device, {want} in float64")


def check_size_one_shards() -> dict[str, list[str]]:
    """Each device holds one row of an (8, 16) kernel, or one slice of axis 1 of a
    (4, 8, 16) stack: locally a size-1 axis, which must not make the unit "a vector"."""
    mesh = Mesh(np.array(jax.devices()), ("x",))
    results = {}
    cases = {
        "rows_of_a_kernel": ((8, 16), P("x", None), 0, 0),
        "stack_axis_1_of_a_scanned_stack": ((4, 8, 16), P(None, "x", None), 1, 1),
    }
    for name, (shape, spec, split, depth) in cases.items():
        problems: list[str] = []
        g, w = _data(shape, seed=len(results))
        out, stats = _mapped(mesh, spec, split, depth)(g, w)
        _compare(problems, g, w, depth, out, stats)
        results[f"size_one_shards/{name}"] = problems
    # The same rows over a 2x4 mesh with a tuple axis_name.
    mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    g, w = _data((8, 16), seed=7)
    problems = []
    out, stats = _mapped(mesh2, P(("a", "b"), None), 0, 0, axis_name=("a", "b"))(g, w)
    _compare(problems, g, w, 0, out, stats)
    results["size_one_shards/tuple_axis_name"] = problems
    return results


def check_pmap() -> dict[str, list[str]]:
    """pmap: each device holds one row (1, 16) of an (8, 16) kernel."""
    g, w = _data((8, 16), seed=11)
    tx = optaxclip.adaptive_grad_clip(CLIPPING, EPS, axis_name="i", sharded_axis=0)

    def body(g, w):
        out, state = tx.update({"w": g}, tx.init({"w": w}), {"w": w})
        return out["w"], state.stats

    out, stats = jax.pmap(body, axis_name="i")(g[:, None], w[:, None])
    problems: list[str] = []
    _compare(problems, g, w, 0, np.asarray(out).reshape(8, 16), jax.tree.map(lambda x: x[0], stats))
    return {"pmap/rows_of_a_kernel": problems}


def check_overflow_statistics() -> dict[str, list[str]]:
    """Updates near 1e20 (squares overflow float32): the global norm and clipped norm
    from units held whole by different devices (columns split) or cut by the split
    (rows split) equal the single-device and float64 values."""
    mesh = Mesh(np.array(jax.devices()), ("x",))
    results = {}
    for name, spec, split in (("columns_split", P(None, "x"), 1), ("rows_split", P("x", None), 0)):
        g, w = _data((16, 16), seed=3, scale=1e20)
        problems: list[str] = []
        out, stats = _mapped(mesh, spec, split, 0)(g, w)
        _compare(problems, g, w, 0, out, stats)
        results[f"overflow_statistics/{name}"] = problems
    return results


def check_gradient() -> dict[str, list[str]]:
    """jax.grad through the mapped AGC (units cut by the split, so the norms are psum-ed):
    finite, equal to the float64 derivative and to the single-device gradient."""
    mesh = Mesh(np.array(jax.devices()), ("x",))
    results = {}
    for name, scale in (("normal", 1.0), ("near_1e20", 1e20)):
        g, w = _data((16, 8), seed=5, scale=scale)
        c = np.random.default_rng(6).normal(size=g.shape).astype(np.float32)
        tx = optaxclip.adaptive_grad_clip(CLIPPING, EPS, axis_name="x", sharded_axis=0)
        one = optaxclip.adaptive_grad_clip(CLIPPING, EPS)

        def body(g, w, c, tx=tx):
            return tx.update({"w": g}, tx.init({"w": w}), {"w": w})[0]["w"] * c

        mapped = jax.shard_map(
            body, mesh=mesh, in_specs=(P("x", None),) * 3, out_specs=P("x", None)
        )

        def on_one(g, w, c, one=one):
            return one.update({"w": g}, one.init({"w": w}), {"w": w})[0]["w"] * c

        got = jax.jit(jax.grad(lambda g, w, c, f=mapped: jnp.sum(f(g, w, c))))(g, w, c)
        ref = jax.jit(jax.grad(lambda g, w, c: jnp.sum(on_one(g, w, c))))(g, w, c)
        problems = []
        if not np.all(np.isfinite(np.asarray(got))):
            problems.append("the gradient is not finite")
        expected = grad64(g, w, c)
        if (err := rel(got, expected)) > 1e-4:
            problems.append(f"gradient vs float64: relative error {err:.3g}")
        if (err := rel(got, ref)) > 1e-5:
            problems.append(f"gradient vs one device: relative error {err:.3g}")
        results[f"gradient/{name}"] = problems
    return results


def main() -> None:
    if len(jax.devices()) != 8:
        print(json.dumps({"setup": {"ok": False, "detail": f"{jax.devices()}"}}))
        return
    checks: list[Callable[[], dict[str, list[str]]]] = [
        check_size_one_shards,
        check_pmap,
        check_overflow_statistics,
        check_gradient,
    ]
    report: dict[str, dict[str, Any]] = {}
    for check in checks:
        try:
            results = check()
        except Exception:  # noqa: BLE001 - reported to pytest, which fails the check
            results = {check.__name__: [traceback.format_exc(limit=-6)]}
        for name, problems in results.items():
            report[name] = {"ok": not problems, "detail": "\n".join(problems)}
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
