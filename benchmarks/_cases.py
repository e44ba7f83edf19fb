"""The benchmark sections: clip step time, compile time and memory; adaptive overhead."""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import optaxclip
from benchmarks import _harness as H
from optaxclip._catalog import ENTRIES

M = 1_000_000


@dataclasses.dataclass
class Plan:
    """What to measure and how often."""

    quick: bool
    optimizers: tuple[str, ...] = ("adamw", "sgd")
    leaves: tuple[int, ...] = (10, 100, 2000)
    params: tuple[int, ...] = (1 * M, 20 * M)
    step_repeats: dict[int, int] = dataclasses.field(default_factory=lambda: {M: 40, 20 * M: 20})
    compile_repeats_small: int = 3  # samples of compile time at <= 100 leaves
    compile_repeats_large: int = 1  # at 2000 leaves (Optax alone takes ~a minute there)
    # (optimizer, leaves, params) compiled but not timed: sgd at 2000 leaves and 2M
    # parameters is the tree the compile-time figures (~4 s vs ~40 s) describe.
    compile_only: tuple[tuple[str, int, int], ...] = (("sgd", 2000, 2 * M),)
    # (candidate, leaves) not compiled: the bare clip takes ~45 s to compile at 2000
    # small leaves (XLA fuses its 2000 reductions into one kernel); the read-once
    # pass gives the step-time floor there.
    skip: tuple[tuple[str, int], ...] = (("bare", 2000),)
    adaptive_tree: tuple[int, int] = (100, 20 * M)
    adaptive_repeats: int = 30
    autoclip_steps: int = 100_000
    # Per-example (DP-SGD) clipping: (examples, leaves, parameters per example). The
    # per-example gradients are examples x parameters floats (256 MiB at 64 x 1M).
    per_example_trees: tuple[tuple[int, int, int], ...] = ((64, 10, M), (64, 100, M))
    per_example_repeats: int = 20

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True,
            leaves=(10, 100),
            params=(1 * M,),
            step_repeats={M: 15},
            compile_repeats_small=1,
            compile_repeats_large=1,
            compile_only=(("sgd", 2000, 1 * M),),
            skip=(("optax", 2000), ("bare", 2000)),
            adaptive_tree=(100, 1 * M),
            adaptive_repeats=8,
            per_example_trees=((16, 100, M // 4),),
            per_example_repeats=8,
        )

    def configs(self) -> list[tuple[str, int, int, bool]]:
        """(optimizer, leaves, params, time the steps too)."""
        out = [(o, n, p, True) for o in self.optimizers for n in self.leaves for p in self.params]
        return out + [(o, n, p, False) for o, n, p in self.compile_only]


def _read_once_jax(grads: Any) -> Callable[[], None]:
    """A jitted pass that reads every gradient element once (sums each leaf)."""
    f = jax.jit(lambda g: [jnp.sum(x) for x in jax.tree_util.tree_leaves(g)])
    jax.block_until_ready(f(grads))
    return lambda: jax.block_until_ready(f(grads))


def _read_once_numpy(grads: Any) -> Callable[[], None]:
    arrays = [np.asarray(x) for x in jax.tree_util.tree_leaves(grads)]
    return lambda: [float(np.add.reduce(a)) for a in arrays]


def clip_benchmarks(plan: Plan, log: Callable[[str], None]) -> dict[str, list[dict]]:
    """Step time, compile time and temp memory of each clip before each optimizer."""
    results: dict[str, list[dict]] = {"step": [], "compile": [], "memory": []}
    configs = plan.configs()
    with tqdm(total=len(configs), desc="clip: configs", unit="config") as bar:
        for opt_name, n_leaves, n_params, timed in configs:
            bar.set_postfix_str(f"{opt_name} {n_leaves} leaves {n_params // M}M")
            params = H.make_tree(n_leaves, n_params, seed=0)
            grads = H.make_tree(n_leaves, n_params, seed=1)
            grad_bytes = H.tree_bytes(grads)
            makers = H.clip_candidates(opt_name)
            names = [n for n in makers if (n, n_leaves) not in plan.skip]
            skipped = [n for n in makers if n not in names]
            for name in skipped:
                log(f"skipped {name} at {n_leaves} leaves ({'--quick' if plan.quick else 'plan'})")
            compiled: dict[str, H.Compiled] = {}
            samples: dict[str, list[dict]] = {n: [] for n in names}
            many = n_leaves > 100
            repeats = plan.compile_repeats_large if many else plan.compile_repeats_small
            for r in range(repeats):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    c = H.Compiled(makers[name](), params, grads)
                    samples[name].append(c.timings())
                    if name not in compiled:
                        compiled[name] = c
                    gc.collect()
            base = "alone"
            comp_entry = {
                "optimizer": opt_name,
                "leaves": n_leaves,
                "params": n_params,
                "skipped": skipped,
                "candidates": {},
            }
            for name in names:
                totals = [s["total_s"] for s in samples[name]]
                cpus = [s["total_cpu_s"] for s in samples[name]]
                comp_entry["candidates"][name] = {
                    "samples": samples[name],
                    "median_total_s": float(np.median(totals)),
                    "median_total_cpu_s": float(np.median(cpus)),
                }
            for name in names:
                cand = comp_entry["candidates"][name]
                ref = comp_entry["candidates"][base]
                cand["ratio_vs_alone"] = cand["median_total_s"] / ref["median_total_s"]
                cand["cpu_ratio_vs_alone"] = cand["median_total_cpu_s"] / ref["median_total_cpu_s"]
            results["compile"].append(comp_entry)
            mem_entry = {
                "optimizer": opt_name,
                "leaves": n_leaves,
                "params": n_params,
                "grad_bytes": grad_bytes,
                "temp_bytes": {n: compiled[n].temp_bytes for n in names},
            }
            mem_entry["extra_pct_of_grad"] = {
                n: 100.0 * (compiled[n].temp_bytes - compiled[base].temp_bytes) / grad_bytes
                for n in names
            }
            results["memory"].append(mem_entry)
            if timed:
                runs = {n: compiled[n].run for n in names}
                runs["read_jax"] = _read_once_jax(grads)
                runs["read_numpy"] = _read_once_numpy(grads)
                reps = plan.step_repeats[n_params]
                times = H.time_interleaved(runs, reps)
                step_entry = {
                    "optimizer": opt_name,
                    "leaves": n_leaves,
                    "params": n_params,
                    "grad_bytes": grad_bytes,
                    "repeats": reps,
                    "candidates": {
                        n: {
                            "median_s": float(np.median(t)),
                            "ratio_vs_alone": H.median_ratio(times, n, base),
                            "times_s": t,
                        }
                        for n, t in times.items()
                    },
                }
                results["step"].append(step_entry)
            del compiled, params, grads
            gc.collect()
            bar.update()
    return results


def _adaptive_makers(opt: Callable[[], optax.GradientTransformation]) -> dict[str, Callable]:
    """Every transform of the catalog as a user would build it, before (or around) ``opt``."""
    makers: dict[str, Callable] = {
        entry.name: functools.partial(entry.optimizer, inner=opt(), defaults=True)
        for entry in ENTRIES
    }
    # Optax's own skip wrapper, for scale: it branches with lax.cond.
    makers["optax.apply_if_finite (reference)"] = lambda: optax.apply_if_finite(opt(), 10)
    # The update-clipping recipes of the quality benchmark (and of the update-clipping
    # guide): AdamW with its preconditioned step clipped per tensor. They replace the
    # optimizer, so they are compared with chain(clip_by_global_norm, adamw) like the rest.
    from benchmarks._quality import adafactor_style_adamw, stable_adamw

    makers["update: Adafactor-style RMS"] = lambda: adafactor_style_adamw(1e-3)
    makers["update: StableAdamW"] = lambda: stable_adamw(1e-3)
    return makers


ZERO_LEAF_PREFIX = "a zero leaf: "  # candidates stepped on gradients with one leaf of zeros


def _donated_makers(opt: Callable[[], optax.GradientTransformation]) -> dict[str, Callable]:
    return {
        "alone": opt,
        "optaxclip.clip_by_global_norm": lambda: optax.chain(
            optaxclip.clip_by_global_norm(1.0), opt()
        ),
        "optax.clip_by_global_norm": lambda: optax.chain(optax.clip_by_global_norm(1.0), opt()),
        # A leaf of exact zeros (a parameter the loss does not use) sends per-leaf norms
        # down their rescue on every step, which reads that leaf's run of leaves again.
        "optaxclip.clip_by_block_norm": lambda: optax.chain(
            optaxclip.clip_by_block_norm(1.0), opt()
        ),
        ZERO_LEAF_PREFIX + "optaxclip.clip_by_block_norm": lambda: optax.chain(
            optaxclip.clip_by_block_norm(1.0), opt()
        ),
        "optaxclip.skip_nonfinite": lambda: optaxclip.skip_nonfinite(opt()),
        "optaxclip.skip_spikes": lambda: optaxclip.skip_spikes(opt()),
        "optax.apply_if_finite": lambda: optax.apply_if_finite(opt(), 10),
        # Gradient accumulation, each step one micro-batch: the predicates that drop a
        # NaN micro-batch before it enters the accumulator, against MultiSteps without one.
        "optax.MultiSteps(k=4)": lambda: optax.MultiSteps(opt(), 4),
        "optax.MultiSteps(k=4, optax.skip_not_finite)": lambda: optax.MultiSteps(
            opt(), 4, should_skip_update_fn=optax.skip_not_finite
        ),
        "optax.MultiSteps(k=4, optaxclip.skip_nonfinite_microbatch)": lambda: optax.MultiSteps(
            opt(), 4, should_skip_update_fn=optaxclip.skip_nonfinite_microbatch
        ),
    }


def donated_benchmarks(plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """Step time and temp memory with the parameters and optimizer state donated."""
    del log
    n_leaves, n_params = plan.adaptive_tree
    params = H.make_tree(n_leaves, n_params, seed=0)
    grads = H.make_tree(n_leaves, n_params, seed=1)
    makers = _donated_makers(lambda: optax.adamw(1e-3))
    middle = sorted(grads)[len(grads) // 2]
    with_zero_leaf = dict(grads, **{middle: jnp.zeros_like(grads[middle])})
    steps = {
        n: H.Donated(m(), params, with_zero_leaf if n.startswith(ZERO_LEAF_PREFIX) else grads)
        for n, m in tqdm(makers.items(), desc="donated: compile", unit="candidate")
    }
    runs = {n: s.run for n, s in steps.items()}
    with tqdm(total=plan.adaptive_repeats, desc="donated: steps", unit="round") as bar:
        times = H.time_interleaved(runs, plan.adaptive_repeats, progress=bar.update)
    grad_bytes = H.tree_bytes(grads)
    return {
        "optimizer": "adamw",
        "leaves": n_leaves,
        "params": n_params,
        "repeats": plan.adaptive_repeats,
        "grad_bytes": grad_bytes,
        "candidates": {
            n: {
                "median_s": float(np.median(times[n])),
                "ratio_vs_alone": H.median_ratio(times, n, "alone"),
                "extra_temp_pct_of_grad": 100.0
                * (steps[n].temp_bytes - steps["alone"].temp_bytes)
                / grad_bytes,
                "times_s": times[n],
            }
            for n in makers
        },
    }


def _autoclip_state_after(steps: int, history: int | None, seed: int = 0) -> Any:
    """AutoClip's state after ``steps`` steps of log-normal gradient norms.

    Its state does not depend on the tree's shape, so a one-number tree stands in
    for the real one (checked by the caller).
    """
    tx = optaxclip.autoclip(10.0, history=history)
    tiny = {"g": jnp.zeros((), jnp.float32)}

    def body(state, key):
        g = {"g": jnp.exp(0.5 * jax.random.normal(key, (), jnp.float32))}
        _, state = tx.update(g, state)
        return state, None

    keys = jax.random.split(jax.random.PRNGKey(seed), steps)
    state, _ = jax.jit(lambda s, k: jax.lax.scan(body, s, k))(tx.init(tiny), keys)
    return jax.block_until_ready(state)


def adaptive_benchmarks(plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """Step time of each adaptive transform relative to clip_by_global_norm."""
    n_leaves, n_params = plan.adaptive_tree
    params = H.make_tree(n_leaves, n_params, seed=0)
    grads = H.make_tree(n_leaves, n_params, seed=1)
    makers = _adaptive_makers(lambda: optax.adamw(1e-3))
    names = list(makers)
    compiled = {}
    for name in tqdm(names, desc="adaptive: compile", unit="transform"):
        compiled[name] = H.Compiled(makers[name](), params, grads)
    runs = {n: compiled[n].run for n in names}
    with tqdm(total=plan.adaptive_repeats, desc="adaptive: steps", unit="round") as bar:
        times = H.time_interleaved(runs, plan.adaptive_repeats, progress=bar.update)
    base = "clip_by_global_norm"
    out: dict[str, Any] = {
        "optimizer": "adamw",
        "leaves": n_leaves,
        "params": n_params,
        "repeats": plan.adaptive_repeats,
        "candidates": {
            n: {
                "median_s": float(np.median(times[n])),
                "ratio_vs_clip_by_global_norm": H.median_ratio(times, n, base),
                "compile_s": compiled[n].total_s,
                "temp_bytes": compiled[n].temp_bytes,
                "times_s": times[n],
            }
            for n in names
        },
        "autoclip_late": {},
    }
    # AutoClip late in training: the same step with the state of step 1 and of a
    # state that has seen plan.autoclip_steps norms.
    for label, history in (("autoclip_sketch", None), ("autoclip_window", 1000)):
        if label not in compiled:
            continue
        t0 = time.perf_counter()
        late = _autoclip_state_after(plan.autoclip_steps, history)
        made_s = time.perf_counter() - t0
        early_state = compiled[label].state
        if jax.tree.structure(late) != jax.tree.structure(early_state[0]) or any(
            a.shape != b.shape
            for a, b in zip(jax.tree.leaves(late), jax.tree.leaves(early_state[0]), strict=True)
        ):
            log(f"{label}: its state depends on the tree; late-step comparison skipped")
            continue
        late_compiled = compiled[label]
        late_state = (late, early_state[1])
        count = int(optaxclip.stats(late)["count"])

        def run_late(c=late_compiled, s=late_state):
            jax.block_until_ready(c.executable(c.params, s, c.grads))

        runs = {"step 1": compiled[label].run, f"step {count}": run_late}
        with tqdm(total=plan.adaptive_repeats, desc=f"{label}: late", unit="round") as bar:
            t = H.time_interleaved(runs, plan.adaptive_repeats, progress=bar.update)
        out["autoclip_late"][label] = {
            "late_step": count,
            "state_built_in_s": made_s,
            "median_s": {k: float(np.median(v)) for k, v in t.items()},
            "ratio_late_vs_first": H.median_ratio(t, f"step {count}", "step 1"),
        }
    return out


def _per_example_grads(n_examples: int, n_leaves: int, n_params: int, seed: int) -> dict:
    """Per-example gradients: each leaf of ``make_tree`` with ``n_examples`` rows, the
    examples' norms spread over two decades so that about half of them are clipped."""
    rows = [H.make_tree(n_leaves, n_params, seed=seed + i) for i in range(n_examples)]
    scales = np.geomspace(0.1, 10.0, n_examples).astype(np.float32)
    return {
        name: jnp.stack([r[name] * s for r, s in zip(rows, scales, strict=True)])
        for name in rows[0]
    }


def _per_example_makers() -> dict[str, Callable]:
    """The four per-example clips; the bound is each tree's median example norm."""
    return {
        "optaxclip.per_example_global_norm_clip": optaxclip.per_example_global_norm_clip,
        "optax.per_example_global_norm_clip": optax.per_example_global_norm_clip,
        "optaxclip.per_example_layer_norm_clip": optaxclip.per_example_layer_norm_clip,
        "optax.per_example_layer_norm_clip": optax.per_example_layer_norm_clip,
    }


def per_example_benchmarks(plan: Plan, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Time, compile time and temp memory of each per-example clip against Optax's.

    Each candidate is jitted on its own, from the per-example gradients to the summed,
    clipped gradient and the clip counts, as a DP-SGD step calls it after
    ``jax.vmap(jax.grad(loss))``.
    """
    del log
    out = []
    makers = _per_example_makers()
    for n_examples, n_leaves, n_params in tqdm(
        plan.per_example_trees, desc="per-example: trees", unit="tree"
    ):
        grads = _per_example_grads(n_examples, n_leaves, n_params, seed=0)
        bound = float(
            np.median(
                np.sqrt(sum(np.sum(np.square(np.asarray(x)), axis=1) for x in grads.values()))
            )
        )
        compiled, info = {}, {}
        for name, fn in makers.items():
            w0, c0 = time.perf_counter(), time.process_time()
            exe = jax.jit(fn).lower(grads, bound).compile()
            memory = exe.memory_analysis()
            info[name] = {
                "compile_s": time.perf_counter() - w0,
                "compile_cpu_s": time.process_time() - c0,
                "temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1)) if memory else -1,
            }
            compiled[name] = exe
        runs = {
            n: (lambda e=e, g=grads, b=bound: jax.block_until_ready(e(g, b)))
            for n, e in compiled.items()
        }
        times = H.time_interleaved(runs, plan.per_example_repeats)
        entry: dict[str, Any] = {
            "examples": n_examples,
            "leaves": n_leaves,
            "params": n_params,
            "grad_bytes": H.tree_bytes(grads),
            "bound": bound,
            "repeats": plan.per_example_repeats,
            "candidates": {},
        }
        for name in makers:
            theirs = "optax." + name.split(".", 1)[1]
            entry["candidates"][name] = {
                **info[name],
                "median_s": float(np.median(times[name])),
                "ratio_vs_optax": H.median_ratio(times, name, theirs),
                "times_s": times[name],
            }
        out.append(entry)
        del grads, compiled, runs
        gc.collect()
    return out
