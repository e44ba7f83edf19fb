"""Multi-device checks for optaxclip, run on 8 simulated CPU devices.

JAX fixes its device count when it first initialises, so these checks cannot run in
the pytest process (which already has one device). ``tests/test_multidevice.py`` runs
this file once in a subprocess::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python tests/multidevice_checks.py

It prints one JSON object ``{check name: {"ok": bool, "detail": str}}`` on its last
line. Every check compares a multi-device run with a single-device run of the same
transform on the same (logical) gradients; the single-device behaviour itself is pinned
against independent references by the other test files. Importing this module does
nothing (pytest imports it to collect doctests).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip
from optaxclip._catalog import ENTRIES

REL_TOL = 1e-6
STEPS = 7
# Global-norm scale of each step: a spike at step 5 exercises the adaptive rules.
STEP_SCALES = (1.0, 1.3, 0.8, 1.1, 9.0, 0.9, 1.2)  # no two equal: no percentile ties
NAN_STEP = 3  # the step whose gradient holds one NaN (in one device's shard)
# Transforms that only record (monitor): nothing to clip, the statistics are compared.
RECORD_ONLY = {entry.name for entry in ENTRIES if not entry.clips}
# The transforms checked under pmap (test_multidevice.py reports one test each).
PMAP_TRANSFORMS = (
    "clip_by_global_norm",
    "clip_by_block_rms",
    "adaptive_grad_clip",
    "autoclip_window",
    "zclip",
    "adagc",
    "skip_nonfinite",
    "skip_spikes",
)


# ---------------------------------------------------------------------------------------
# Comparison helpers


def _np(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def tree_mismatches(actual: Any, expected: Any, where: str = "") -> list[str]:
    """Differences between two pytrees: floats to REL_TOL of each leaf's largest
    magnitude (NaN where NaN), integers and bools exactly."""
    a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
    e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
    if a_def != e_def:
        return [f"{where}: structures differ: {a_def} vs {e_def}"]
    out = []
    for (path, a), (_, e) in zip(a_leaves, e_leaves, strict=True):
        name = where + jax.tree_util.keystr(path)
        a, e = _np(a), _np(e)
        if a.shape != e.shape or a.dtype != e.dtype:
            out.append(f"{name}: {a.dtype}{a.shape} vs {e.dtype}{e.shape}")
            continue
        if not np.issubdtype(e.dtype, np.inexact):
            if not np.array_equal(a, e):
                out.append(f"{name}: {a.ravel()[:8]} != {e.ravel()[:8]}")
            continue
        a64, e64 = a.astype(np.complex128), e.astype(np.complex128)
        if not np.array_equal(np.isnan(a64), np.isnan(e64)):
            out.append(f"{name}: NaN positions differ")
            continue
        ok = ~np.isnan(e64)
        if not np.array_equal(np.isinf(a64[ok]), np.isinf(e64[ok])) or not np.array_equal(
            a64[ok][np.isinf(e64[ok])], e64[ok][np.isinf(e64[ok])]
        ):
            out.append(f"{name}: inf positions differ")
            continue
        ok &= ~np.isinf(e64)
        if not ok.any():
            continue
        scale = max(float(np.max(np.abs(e64[ok]))), np.finfo(np.float32).tiny)
        err = float(np.max(np.abs(a64[ok] - e64[ok]))) / scale
        if err > REL_TOL:
            out.append(f"{name}: relative error {err:.3g} > {REL_TOL}")
    return out


# ---------------------------------------------------------------------------------------
# Data


def make_sequence(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """STEPS gradients (stacked on axis 0) whose global norm follows STEP_SCALES."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        x = rng.standard_normal((STEPS, *shape)).astype(np.float32)
        out[name] = x
    total = np.sqrt(sum(np.sum(v.reshape(STEPS, -1) ** 2, axis=1) for v in out.values()))
    factor = np.asarray(STEP_SCALES, np.float32) * 1.5 / total.astype(np.float32)
    return {k: v * factor.reshape((STEPS,) + (1,) * (v.ndim - 1)) for k, v in out.items()}


def with_nan(seq: dict[str, np.ndarray], leaf: str, index: tuple[int, ...]) -> dict:
    """A copy of ``seq`` with one NaN at ``index`` of ``leaf`` on step NAN_STEP."""
    seq = {k: v.copy() for k, v in seq.items()}
    seq[leaf][(NAN_STEP, *index)] = np.nan
    return seq


def run_steps(tx: optax.GradientTransformation, params: Any, grads_seq: Any):
    """Runs ``tx`` over the stacked gradients: (updates per step, final state)."""

    def step(state, grads):
        updates, state = tx.update(grads, state, params)
        return state, updates

    state, updates = jax.lax.scan(step, tx.init(params), grads_seq)
    return updates, state


# ---------------------------------------------------------------------------------------
# The transforms: every entry of the catalog, whose warm-ups are short enough that the
# adaptive rules act within STEPS.


def transforms(**dist: Any) -> dict[str, Callable[[], optax.GradientTransformation]]:
    """Builders of every transform in the catalog (built lazily, so that one that fails
    to build fails its own check only), the skip wrappers around Adam. ``dist``
    (axis_name/sharded) goes to each; ``agc=`` holds adaptive_grad_clip's own keyword
    arguments instead."""
    agc = dist.pop("agc", {})
    return {
        entry.name: functools.partial(
            entry.build,
            inner=optax.adam(0.01),
            **(agc if entry.factory is optaxclip.adaptive_grad_clip else dist),
        )
        for entry in ENTRIES
    }


# ---------------------------------------------------------------------------------------
# Check 1: jax.jit over a 2x4 (data x model) mesh, FSDP and tensor-parallel shardings.

MESH_SHAPES = {
    "embed": (16, 8),  # FSDP: rows over data, columns over model
    "attn_qkv": (8, 3, 8),  # multi-head kernel: heads' features over model
    "mlp_in": (8, 16),  # column-parallel (model) + FSDP (data)
    "mlp_out": (16, 8),  # row-parallel (model) + FSDP (data)
    "mlp_bias": (16,),  # over model
    "layers": (4, 8, 8),  # scanned layers: the stack over data, features over model
    "norm_scale": (8,),  # replicated
    "temperature": (),  # replicated scalar
}
MESH_SPECS = {
    "embed": P("data", "model"),
    "attn_qkv": P("data", None, "model"),
    "mlp_in": P("data", "model"),
    "mlp_out": P("model", "data"),
    "mlp_bias": P("model"),
    "layers": P("data", None, "model"),
    "norm_scale": P(),
    "temperature": P(),
}
MESH_STACKED = {k: int(k == "layers") for k in MESH_SHAPES}


def check_mesh_jit() -> dict[str, list[str]]:
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    grads = make_sequence(MESH_SHAPES, seed=0)
    nan_grads = with_nan(grads, "mlp_in", (5, 13))  # rows 4-7 x cols 12-15: one device
    rng = np.random.default_rng(1)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in MESH_SHAPES.items()}

    def run_all(params, grads, nan_grads):
        out = {}
        for name, build in transforms(agc={"stacked_axes": MESH_STACKED}).items():
            seq = nan_grads if name == "skip_nonfinite" else grads
            out[name] = run_steps(build(), params, seq)
        return out

    param_sh = {k: NamedSharding(mesh, s) for k, s in MESH_SPECS.items()}
    seq_sh = {k: NamedSharding(mesh, P(None, *s)) for k, s in MESH_SPECS.items()}
    args = (params, grads, nan_grads)
    sharded_args = (
        jax.device_put(params, param_sh),
        jax.device_put(grads, seq_sh),
        jax.device_put(nan_grads, seq_sh),
    )
    single_args = jax.device_put(args, jax.devices()[0])
    fn = jax.jit(run_all)
    on_mesh = fn(*sharded_args)
    on_one = fn(*single_args)

    results = {}
    for name in on_one:
        problems = tree_mismatches(on_mesh[name], on_one[name], name)
        if int(optaxclip.stats(on_one[name][1])["clip_count"]) == 0 and name not in RECORD_ONLY:
            problems.append(f"{name} never clipped: the comparison would prove little")
        # The updates keep the parameters' layout: nothing was gathered onto one device.
        for key, spec in MESH_SPECS.items():
            got = on_mesh[name][0][key].sharding
            want = NamedSharding(mesh, P(None, *spec))
            if not got.is_equivalent_to(want, len(MESH_SHAPES[key]) + 1):
                problems.append(f"{name}: updates[{key!r}] came back as {got}")
        results[f"mesh_jit/{name}"] = problems
    # A NaN on one device's shard: every device skips (and the step is counted once).
    skipped = _np(on_mesh["skip_nonfinite"][1].stats.clip_count)
    zero_step = [bool(np.all(_np(u)[NAN_STEP] == 0)) for u in on_mesh["skip_nonfinite"][0].values()]
    problems = []
    if int(skipped) != 1 or not all(zero_step):
        problems.append(f"clip_count {skipped}, zero updates per leaf at the NaN step {zero_step}")
    results["mesh_jit/nan_on_one_shard_skips_everywhere"] = problems
    return results


# ---------------------------------------------------------------------------------------
# Check 2: shard_map over 8 devices, some leaves split along the axis, some replicated.

SM_SHAPES = {
    # Sorted first, so that a bucket of sharded leaves precedes the replicated ones: a
    # link between buckets of the two kinds made every statistic device-varying.
    "a_rows": (16, 4),
    "w_rows": (16, 4),  # split along its unit axis (rows: FSDP / row-parallel)
    "w_cols": (4, 16),  # split along its output axis (column-parallel)
    "stack": (8, 4, 4),  # scanned layers, the layer axis split
    "bias": (4,),  # replicated
    "scale": (),  # replicated scalar
}
SM_SPECS = {
    "a_rows": P("x", None),
    "w_rows": P("x", None),
    "w_cols": P(None, "x"),
    "stack": P("x", None, None),
    "bias": P(),
    "scale": P(),
}
SM_SHARDED = {k: s != P() for k, s in SM_SPECS.items()}
SM_SPLIT = {"a_rows": 0, "w_rows": 0, "w_cols": 1, "stack": 0, "bias": None, "scale": None}
SM_STACKED = {k: int(k == "stack") for k in SM_SHAPES}


def _specs_like(tree: Any, specs: dict[str, Any], lead: tuple = ()) -> Any:
    """PartitionSpecs for a pytree (an optimizer state, updates): a leaf reached through
    a dict key naming a parameter gets that parameter's spec, any other leaf is
    replicated. ``lead`` is prepended (a scanned step axis)."""

    def spec(path, leaf):
        key = path[-1] if path else None
        # (monitor's per-leaf norms are scalars keyed by parameter name: replicated.)
        named = isinstance(key, jax.tree_util.DictKey) and key.key in specs
        if named and np.ndim(leaf) >= len(specs[key.key]):
            return P(*lead, *specs[key.key])
        return P(*lead) if lead and np.ndim(leaf) else P()

    return jax.tree_util.tree_map_with_path(spec, tree)


def _pick(name: str, grads: Any, nan_grads: Any) -> Any:
    return nan_grads if name == "skip_nonfinite" else grads


def _run_mapped(mesh, txs, refs, params, grads, nan_grads, specs, *, check_vma=True):
    """Runs each transform of ``txs`` inside one shard_map: name -> (updates per step,
    final state), as global arrays (``refs``: the same transforms without axis_name,
    for the output shapes).

    Every output not tied to a parameter (statistics, histories, EMAs) is declared
    replicated, which shard_map's ``check_vma`` verifies: a value that could differ
    between devices is an error at trace time.
    """

    def body(params, grads, nan_grads):
        return {n: run_steps(tx, params, _pick(n, grads, nan_grads)) for n, tx in txs.items()}

    seq_specs = {k: P(None, *s) for k, s in specs.items()}
    shapes = jax.eval_shape(
        lambda: {n: run_steps(tx, params, _pick(n, grads, nan_grads)) for n, tx in refs.items()}
    )
    out_specs = {
        n: (_specs_like(u, specs, lead=(None,)), _specs_like(st, specs))
        for n, (u, st) in shapes.items()
    }
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(specs, seq_specs, seq_specs),
        out_specs=out_specs,
        check_vma=check_vma,
    )
    return jax.jit(fn)(params, grads, nan_grads)


def check_shard_map() -> dict[str, list[str]]:
    mesh = Mesh(np.array(jax.devices()), ("x",))
    grads = make_sequence(SM_SHAPES, seed=2)
    nan_grads = with_nan(grads, "w_cols", (1, 5))  # column 5 lives on device 2 only
    rng = np.random.default_rng(3)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SM_SHAPES.items()}
    mapped = transforms(
        axis_name="x",
        sharded=SM_SHARDED,
        agc={"stacked_axes": SM_STACKED, "axis_name": "x", "sharded_axis": SM_SPLIT},
    )
    plain = transforms(agc={"stacked_axes": SM_STACKED})

    def reference(params, grads, nan_grads):
        return {
            n: run_steps(build(), params, _pick(n, grads, nan_grads)) for n, build in plain.items()
        }

    on_one = jax.jit(reference)(params, grads, nan_grads)
    args = (params, grads, nan_grads, SM_SPECS)
    results = {}
    try:  # all at once: one compilation
        txs = {n: build() for n, build in mapped.items()}
        got = _run_mapped(mesh, txs, {n: plain[n]() for n in txs}, *args)
    except Exception:  # noqa: BLE001 - one at a time, to tell which one fails
        got = {}
        for name, build in mapped.items():
            try:
                got.update(_run_mapped(mesh, {name: build()}, {name: plain[name]()}, *args))
            except Exception:  # noqa: BLE001 - reported as the check's failure
                results[f"shard_map/{name}"] = [traceback.format_exc(limit=-4)]
    for name, out in got.items():
        problems = tree_mismatches(out, on_one[name], name)
        if int(optaxclip.stats(on_one[name][1])["clip_count"]) == 0 and name not in RECORD_ONLY:
            problems.append(f"{name} never clipped: the comparison would prove little")
        results[f"shard_map/{name}"] = problems
    # AGC's three kinds of leaves (units cut by the split, units held whole, replicated)
    # were all clipped at some step, so each path was compared.
    agc_updates = on_one["adaptive_grad_clip"][0]
    for key in SM_SHAPES:
        if np.array_equal(_np(agc_updates[key]), grads[key]):
            results["shard_map/adaptive_grad_clip"].append(f"AGC never clipped {key!r}")

    # Each device reports its own view of the statistics along a mapped output axis.
    seq_specs = {k: P(None, *s) for k, s in SM_SPECS.items()}

    def views(tx, seq):
        def body(params, grads):
            updates, state = run_steps(tx, params, grads)
            return updates, jax.tree.map(lambda x: x[None], state.stats)

        fn = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(SM_SPECS, seq_specs),
            out_specs=(seq_specs, P("x")),
            check_vma=False,
        )
        return jax.jit(fn)(params, seq)

    global_norm = float(np.sqrt(sum(np.sum(v[-1].astype(np.float64) ** 2) for v in grads.values())))
    problems = []
    wrong, local = views(optaxclip.clip_by_global_norm(1.0), grads)
    local_norms = _np(local.norm)  # the last step's norm as each device saw it
    if not np.all(local_norms < global_norm * 0.9):
        problems.append(f"per-shard norms {local_norms} vs global {global_norm}")
    if not tree_mismatches(wrong, on_one["clip_by_global_norm"][0]):
        problems.append("without axis_name the updates equal the single-device ones")
    results["shard_map/without_axis_name_each_shard_uses_its_own_norm"] = problems

    problems = []
    for axis_name in ("x", None):
        tx = optaxclip.skip_nonfinite(optax.sgd(1.0), axis_name=axis_name, sharded=SM_SHARDED)
        updates, per_device = views(tx, nan_grads)
        skips = _np(per_device.clip_count)
        if axis_name == "x":
            if not np.all(skips == 1):
                problems.append(f"with axis_name, skips per device: {skips}")
            if not all(np.all(_np(u)[NAN_STEP] == 0) for u in updates.values()):
                problems.append("with axis_name, some device applied the NaN step")
        elif np.all(skips == skips[0]):
            problems.append(f"without axis_name all devices agreed anyway: {skips}")
    results["shard_map/nan_on_one_shard_skips_on_every_device"] = problems
    results["shard_map/block_norms_rescue_leaf_by_leaf"] = _block_norms_rescue(mesh)
    with target_platform_is("gpu"):
        results["shard_map/gpu_layout/block_norms_rescue"] = _block_norms_rescue(mesh)
    results.update(_gpu_layout(mesh, mapped, plain, args, on_one))
    for platform in ("tpu", "gpu"):
        results[f"shard_map/spike_aware_clip_{platform}_layout"] = _spike_norm_first(
            platform, mesh, mapped, plain, args, on_one["spike_aware_clip"]
        )
    return results


def target_platform_is(platform: str) -> contextlib.ExitStack:
    """Every module that chooses a layout by the target platform reads ``platform``:
    the layouts a TPU or GPU target gets, traced on these CPU devices (DESIGN §9)."""
    from unittest import mock

    from optaxclip import _mechanics, _norm_engine, _skip, _spike_aware

    stack = contextlib.ExitStack()
    for module in (_mechanics, _norm_engine, _skip, _spike_aware):
        stack.enter_context(mock.patch.object(module, "target_platform", lambda leaves: platform))
    return stack


def _spike_norm_first(
    platform: str, mesh: Mesh, mapped: dict, plain: dict, args: tuple, want: Any
) -> list[str]:
    """spike_aware_clip in the layout a TPU or GPU ``platform`` gets (the norm first,
    then the clipped values summed at three scales, with no rescue branch) under
    shard_map, with sharded and replicated leaves, against the single-device run: on the
    sequence of the other checks and on it scaled by 1e25 and by 1e-25 (whose sums of
    squares overflow and flush to zero in float32)."""
    name = "spike_aware_clip"
    params, grads, nan_grads, specs = args
    problems = []
    for scale in (1.0, 1e25, 1e-25):
        seq = {k: (v * np.float32(scale)).astype(np.float32) for k, v in grads.items()}
        if scale != 1.0:
            want = jax.jit(lambda p, g: run_steps(plain[name](), p, g))(params, seq)
        with target_platform_is(platform):
            got = _run_mapped(
                mesh, {name: mapped[name]()}, {name: plain[name]()}, params, seq, nan_grads, specs
            )
        problems += tree_mismatches(got[name], want, f"{name} x{scale:g}")
    return problems


# The transforms checked under shard_map in the GPU layout (the norm engine's sums at
# three scales, no rescue branch): the global norm, per-leaf norms, an adaptive one.
GPU_LAYOUT_TRANSFORMS = ("clip_by_global_norm", "clip_by_block_rms", "zclip", "skip_nonfinite")


def _gpu_layout(mesh: Mesh, mapped: dict, plain: dict, args: tuple, on_one: dict) -> dict:
    """The engine's transforms in the layout a GPU target gets, under shard_map with
    sharded and replicated leaves, against the single-device runs (in the default
    layout) of the other checks: name -> problems."""
    with target_platform_is("gpu"):
        got = _run_mapped(
            mesh,
            {n: mapped[n]() for n in GPU_LAYOUT_TRANSFORMS},
            {n: plain[n]() for n in GPU_LAYOUT_TRANSFORMS},
            *args,
        )
    return {
        f"shard_map/gpu_layout/{n}": tree_mismatches(got[n], on_one[n], n)
        for n in GPU_LAYOUT_TRANSFORMS
    }


def _block_norms_rescue(mesh: Mesh) -> list[str]:
    """block_norms and global_norm under shard_map (axis_name, sharded and replicated
    leaves, small and big) against float64, where sharded and replicated leaves have
    squares that all flush to zero in float32 and two sharded leaves overflow: each
    leaf's norm is taken at its own scale."""
    rng = np.random.default_rng(5)
    # Beside SM_SHAPES's small leaves (bucketed), two of 4,096 elements per device (each
    # reduced on its own): one sharded, one replicated.
    shapes = {**SM_SHAPES, "big_rows": (8 * 4096,), "big_rep": (4096,)}
    specs = {**SM_SPECS, "big_rows": P("x"), "big_rep": P()}
    sharded = {k: s != P() for k, s in specs.items()}
    tree = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    tree["w_rows"] *= np.float32(1e-25)
    tree["bias"] *= np.float32(1e-25)
    tree["big_rep"] *= np.float32(1e-25)
    tree["w_cols"][0, :2] = [3e19, -4e19]
    tree["big_rows"][5 * 4096] = 5e19
    fn = jax.shard_map(
        lambda g: (
            optaxclip.block_norms(g, axis_name="x", sharded=sharded),
            optaxclip.global_norm(g, axis_name="x", sharded=sharded),
        ),
        mesh=mesh,
        in_specs=(specs,),
        out_specs=P(),
    )
    got, got_global = jax.jit(fn)(tree)
    problems = []
    for key, value in tree.items():
        want = float(np.sqrt(np.sum(np.square(value.astype(np.float64)))))
        if not abs(float(got[key]) - want) <= REL_TOL * want:
            problems.append(f"block_norms[{key!r}] {float(got[key])!r} vs {want!r} (float64)")
    want = float(np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in tree.values())))
    if not abs(float(got_global) - want) <= REL_TOL * want:
        problems.append(f"global_norm {float(got_global)!r} vs {want!r} (float64)")
    return problems


def _clip_gradient64(grads: dict, w: dict, max_norm: float, per_leaf: bool) -> dict:
    """d/dg of sum <w, clip(g)> in float64: the clip is c g / ||g|| where ||g|| > c, of
    the whole tree or (``per_leaf``) of each leaf."""
    g = {k: v.astype(np.float64) for k, v in grads.items()}

    def grad(keys):
        n = np.sqrt(sum(np.sum(g[k] ** 2) for k in keys))
        if n <= max_norm:
            return {k: w[k].astype(np.float64) for k in keys}
        dot = sum(np.sum(w[k] * g[k]) for k in keys)
        return {k: max_norm * (w[k] / n - g[k] * dot / n**3) for k in keys}

    if per_leaf:
        return {k: v for key in g for k, v in grad([key]).items()}
    return grad(list(g))


def check_gradient_through_shard_map() -> dict[str, list[str]]:
    """jax.grad through clip_by_global_norm and clip_by_block_norm under shard_map, with
    sharded and replicated leaves, in the default, TPU and GPU layouts, against float64:
    at ordinary scale, where the norm's cotangent flushed to zero through the sums of
    squares (global norm ~1.3e19 at x7e17, leaf norms at x5e18) and beyond their overflow
    (1e25). The norm's derivative rule psums
    each sharded leaf's partial <x / ||x||, dx>."""
    mesh = Mesh(np.array(jax.devices()), ("x",))
    rng = np.random.default_rng(9)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SM_SHAPES.items()}
    w = {k: rng.standard_normal(s).astype(np.float32) for k, s in SM_SHAPES.items()}
    sharded = {k: s != P() for k, s in SM_SPECS.items()}
    results = {}
    for name, per_leaf in (("clip_by_global_norm", False), ("clip_by_block_norm", True)):
        factory = getattr(optaxclip, name)
        problems = []
        for layout in ("cpu", "tpu", "gpu"):
            for scale in (1.0, 7e17, 5e18, 1e25):
                grads = {k: (v * np.float32(scale)).astype(np.float32) for k, v in base.items()}
                max_norm = 1.0 if scale != 1.0 else 2.0  # clips some leaves, not all
                tx = factory(max_norm, axis_name="x", sharded=sharded)

                def loss(g, w, tx=tx):
                    out, _ = tx.update(g, tx.init(g))
                    split = sum(jnp.sum(out[k] * w[k]) for k in out if sharded[k])
                    whole = sum(jnp.sum(out[k] * w[k]) for k in out if not sharded[k])
                    return jax.lax.psum(split, "x") + whole

                fn = jax.shard_map(
                    lambda g, w, loss=loss: jax.grad(loss)(g, w),
                    mesh=mesh,
                    in_specs=(SM_SPECS, SM_SPECS),
                    out_specs=SM_SPECS,
                )
                with target_platform_is(layout):
                    got = jax.jit(fn)(grads, w)
                want = _clip_gradient64(grads, w, max_norm, per_leaf)
                for key, value in want.items():
                    # Relative to the gradient's own size, max_norm / norm: a scalar
                    # leaf clipped on its own has a gradient of 0 (c * sign(g)).
                    group = [key] if per_leaf else list(grads)
                    norm = np.sqrt(sum(np.sum(grads[k].astype(np.float64) ** 2) for k in group))
                    size = max(float(np.max(np.abs(value))), max_norm / norm)
                    err = float(np.max(np.abs(_np(got[key]) - value))) / size
                    if not err <= REL_TOL:
                        problems.append(f"{layout} x{scale:g} [{key!r}]: relative error {err:.3g}")
        results[f"shard_map/gradient/{name}"] = problems
    return results


def check_shard_map_two_axes() -> dict[str, list[str]]:
    """axis_name as a tuple: leaves split over both axes of a 2x4 mesh."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    axes = ("data", "model")
    specs = {"a": P(axes, None), "b": P(None, axes), "c": P()}
    shapes = {"a": (16, 3), "b": (3, 8), "c": (5,)}
    grads = make_sequence(shapes, seed=4)
    params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    sharded = {k: s != P() for k, s in specs.items()}
    tx = optaxclip.clip_by_global_norm(1.0, axis_name=axes, sharded=sharded)
    ref_tx = optaxclip.clip_by_global_norm(1.0)
    got = _run_mapped(mesh, {"c": tx}, {"c": ref_tx}, params, grads, grads, specs)["c"]
    ref = jax.jit(lambda g: run_steps(ref_tx, params, g))(grads)
    first = {k: v[0] for k, v in grads.items()}
    norm = jax.jit(
        jax.shard_map(
            lambda g: optaxclip.global_norm(g, axis_name=axes, sharded=sharded),
            mesh=mesh,
            in_specs=(specs,),
            out_specs=P(),
        )
    )(first)
    problems = tree_mismatches(got, ref, "clip_by_global_norm")
    problems += tree_mismatches(norm, optaxclip.global_norm(first), "global_norm")
    return {"shard_map/tuple_axis_name_over_a_2x4_mesh": problems}


# ---------------------------------------------------------------------------------------
# Check 3: pmap, each device holding a slice of the split leaves.


def check_pmap() -> dict[str, list[str]]:
    n = len(jax.devices())
    shapes = {"w": (16, 4), "v": (24,), "b": (4,)}
    mapped = {"w": True, "v": True, "b": False}
    grads = make_sequence(shapes, seed=5)
    nan_grads = with_nan(grads, "v", (7,))  # on device 2
    rng = np.random.default_rng(6)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    in_axes = {k: 0 if m else None for k, m in mapped.items()}

    def to_devices(tree, lead):
        # A mapped logical leaf -> (devices, [steps,] its slice of axis 0, ...).
        def one(k, v):
            if not mapped[k]:
                return v
            x = v.reshape(*v.shape[:lead], n, v.shape[lead] // n, *v.shape[lead + 1 :])
            return np.moveaxis(x, lead, 0)

        return {k: one(k, v) for k, v in tree.items()}

    def merge(tree, lead, problems):
        # Back to logical arrays; every other output must be equal on all devices.
        def one(path, x):
            x = _np(x)
            key = path[-1] if path else None
            if isinstance(key, jax.tree_util.DictKey) and mapped.get(key.key):
                x = np.moveaxis(x, 0, lead)
                return x.reshape(*x.shape[:lead], -1, *x.shape[lead + 2 :])
            if not all(np.array_equal(x[0], x[d], equal_nan=True) for d in range(n)):
                problems.append(f"{jax.tree_util.keystr(path)} differs between devices")
            return x[0]

        return jax.tree_util.tree_map_with_path(one, tree)

    names = PMAP_TRANSFORMS
    split = {"w": 0, "v": 0, "b": None}  # both split along a unit axis: psum per unit
    with_axis = transforms(
        axis_name="i", sharded=mapped, agc={"axis_name": "i", "sharded_axis": split}
    )
    plain = transforms()

    def body(builders):
        def run(params, grads, nan_grads):
            return {
                k: run_steps(builders[k](), params, nan_grads if k == "skip_nonfinite" else grads)
                for k in names
            }

        return run

    per_device = jax.pmap(body(with_axis), axis_name="i", in_axes=(in_axes,) * 3)(
        to_devices(params, 0), to_devices(grads, 1), to_devices(nan_grads, 1)
    )
    on_one = jax.jit(body(plain))(params, grads, nan_grads)
    results = {}
    for name in names:
        problems = []
        updates = merge(per_device[name][0], 1, problems)
        state = merge(per_device[name][1], 0, problems)
        problems += tree_mismatches((updates, state), on_one[name], name)
        if int(optaxclip.stats(on_one[name][1])["clip_count"]) == 0 and name not in RECORD_ONLY:
            problems.append(f"{name} never clipped: the comparison would prove little")
        results[f"pmap/{name}"] = problems
    return results


# ---------------------------------------------------------------------------------------
# Check 4: the rescue of a global norm over sharded leaves, against float64. Under jit
# over several devices the global transforms add the sharded leaves' sums as scalars
# (one all-reduce, as Optax) and their rescue runs apart from the per-leaf norms'.

# "ordinary" takes the common path, the others the rescue.
RESCUE_SCALES = {"ordinary": 1.0, "overflow": 1e25, "underflow": 1e-25, "one_huge_leaf": None}


def check_mesh_rescue() -> dict[str, list[str]]:
    """The global norm under jit over a mesh, against float64, in the layout XLA:CPU
    gets, in the one a TPU target gets (leaves reduced on their own, their sums added
    in order) and in a GPU target's (each leaf summed at three scales), with the leaves
    sharded and with every leaf placed replicated."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    placements = {
        "": {k: NamedSharding(mesh, s) for k, s in MESH_SPECS.items()},
        "replicated/": {k: NamedSharding(mesh, P()) for k in MESH_SPECS},
    }
    results = {}
    for layout in ("", "tpu_layout/", "gpu_layout/"):
        with target_platform_is(layout[:3]) if layout else contextlib.nullcontext():
            for placement, shardings in placements.items():
                for case, problems in _mesh_rescue_cases(shardings).items():
                    results[f"mesh_rescue/{layout}{placement}{case}"] = problems
    return results


def _mesh_rescue_cases(shardings: dict[str, NamedSharding]) -> dict[str, list[str]]:
    base = {k: v[0] for k, v in make_sequence(MESH_SHAPES, seed=11).items()}
    tx = optaxclip.clip_by_global_norm(1.0)

    @jax.jit  # compiled once for every case (a new function per layout and placement)
    def step(g):
        updates, state = tx.update(g, tx.init(g))
        return optaxclip.global_norm(g), updates, state.stats.norm

    results = {}
    for case, scale in RESCUE_SCALES.items():
        if scale is None:  # one leaf's squares overflow, the others are ordinary
            grads = dict(base, mlp_in=base["mlp_in"] * np.float32(1e22))
        else:
            grads = {k: v * np.float32(scale) for k, v in base.items()}
        norm64 = np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in grads.values()))
        norm, updates, recorded = step(jax.device_put(grads, shardings))
        problems = []
        for what, value in (("global_norm", norm), ("recorded norm", recorded)):
            err = abs(float(value) - norm64) / norm64
            if not err <= REL_TOL:
                problems.append(f"{case}: {what} {float(value)!r} vs {norm64!r} (float64)")
        shrink = max(norm64, 1.0)  # max_norm 1
        expected = {k: (v.astype(np.float64) / shrink).astype(np.float32) for k, v in grads.items()}
        problems += tree_mismatches(updates, expected, f"{case}: updates")
        results[case] = problems
    return results


# ---------------------------------------------------------------------------------------
# Check 5: the compiled program of a sharded clip_by_global_norm step.

_COLLECTIVE = re.compile(
    r"=\s*(.+?)\s+(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
    r"(?:-start)?\("
)


def check_hlo() -> dict[str, list[str]]:
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    tx = optaxclip.clip_by_global_norm(1.0)
    shardings = {k: NamedSharding(mesh, s) for k, s in MESH_SPECS.items()}
    grads = jax.device_put(
        {k: v[0] for k, v in make_sequence(MESH_SHAPES, seed=7).items()}, shardings
    )
    state = tx.init(grads)
    step = jax.jit(tx.update, out_shardings=(shardings, None))
    text = step.lower(grads, state).compile().as_text()
    problems = []
    found = _COLLECTIVE.findall(text)
    if not any(kind == "all-reduce" for _, kind in found):
        problems.append("no all-reduce at all: is the program really sharded?")
    for shape, kind in found:
        if kind != "all-reduce":
            problems.append(f"{kind} of {shape}")
            continue
        # f32[] or a tuple/vector of a few scalars (one partial sum per leaf at most).
        sizes = [
            int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            for dims in re.findall(r"\[([\d,]*)\]", shape)
        ]
        if sum(sizes) > len(MESH_SHAPES):
            problems.append(f"all-reduce moves {shape}")
    return {"hlo/clip_by_global_norm_all_reduces_scalars_only": problems}


# ---------------------------------------------------------------------------------------
# Entry point


def main() -> None:
    checks: list[Callable[[], dict[str, list[str]]]] = [
        check_mesh_jit,
        check_shard_map,
        check_shard_map_two_axes,
        check_gradient_through_shard_map,
        check_pmap,
        check_mesh_rescue,
        check_hlo,
    ]
    if len(jax.devices()) != 8:
        print(json.dumps({"setup": {"ok": False, "detail": f"{jax.devices()}"}}))
        return
    report: dict[str, dict[str, Any]] = {}
    for check in checks:
        start = time.perf_counter()
        try:
            results = check()
        except Exception:  # noqa: BLE001 - reported to pytest, which fails the checks
            results = {check.__name__: [traceback.format_exc()]}
        elapsed = time.perf_counter() - start
        for name, problems in results.items():
            report[name] = {"ok": not problems, "detail": "\n".join(problems)}
        report[f"timing/{check.__name__}"] = {"ok": True, "detail": f"{elapsed:.1f}s"}
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
