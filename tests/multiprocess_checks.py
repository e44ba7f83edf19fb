"""One worker of the 2-process check of optaxclip (``tests/test_multiprocess.py``).

``tests/test_multiprocess.py`` starts this script three times, at once:

* twice with ``jax.distributed`` on a loopback coordinator (CPU collectives over gloo),
  4 simulated CPU devices each, 8 in all::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
        python tests/multiprocess_checks.py OUT_DIR PROCESS_ID 2 PORT

* once as the reference: a single process with 8 simulated CPU devices and no
  distributed initialisation::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python tests/multiprocess_checks.py OUT_DIR single

All three run the same program: every transform of the catalog (the skip wrappers
around Adam) for STEPS steps, all in one ``jax.jit``, over a 1-D mesh ``"data"`` of the 8
devices, some leaves of the parameters and gradients split along it and others
replicated. The gradients' global norm spikes at SPIKE_STEP, and skip_nonfinite's get a
NaN on a shard that only process 1 holds.

Each run writes ``OUT_DIR/<process0|process1|single>.pkl``: for every output leaf
(updates and ``optaxclip.stats`` per step, the final state) its global shape and dtype
and the data of each shard it can address, with the shard's place in the array and the
device's position in the mesh. The pytest process puts the shards of the two processes
together and compares them with the reference, and the replicas of each value with each
other. Importing this module does nothing (pytest imports it to collect doctests).
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip
from optaxclip._catalog import ENTRIES

NUM_DEVICES = 8
# Global-norm scale of each step: a spike at step 4. No two steps share a norm: a norm
# equal to an earlier one can sit exactly on an adaptive threshold (autoclip's percentile
# of the past norms), where 1 ulp of the all-reduce's summation order, which differs
# between 2 processes and 1, decides whether to clip.
STEP_SCALES = (1.0, 1.3, 0.8, 1.1, 9.0, 0.9, 1.2)
STEPS = len(STEP_SCALES)
SPIKE_STEP = 4
SHAPES = {
    "w_rows": (16, 4),  # rows split over "data" (FSDP / row-parallel)
    "w_cols": (4, 16),  # columns split over "data" (column-parallel)
    "stack": (8, 4, 4),  # scanned layers, the layer axis split
    "bias": (4,),  # replicated
    "scale": (),  # replicated scalar
}
SPECS = {
    "w_rows": P("data", None),
    "w_cols": P(None, "data"),
    "stack": P("data", None, None),
    "bias": P(),
    "scale": P(),
}
STACKED = {k: int(k == "stack") for k in SHAPES}  # adaptive_grad_clip's stacked_axes
NAN_STEP = 3
# Column 13 of w_cols: columns 12-13 live on mesh device 6, which is process 1's.
NAN_LEAF, NAN_INDEX = "w_cols", (1, 13)


def make_sequence(seed: int) -> dict[str, np.ndarray]:
    """STEPS gradients (stacked on axis 0) whose global norm follows STEP_SCALES."""
    rng = np.random.default_rng(seed)
    seq = {k: rng.standard_normal((STEPS, *s)).astype(np.float32) for k, s in SHAPES.items()}
    total = np.sqrt(sum(np.sum(v.reshape(STEPS, -1) ** 2, axis=1) for v in seq.values()))
    factor = np.asarray(STEP_SCALES, np.float32) * 1.5 / total.astype(np.float32)
    return {k: v * factor.reshape((STEPS,) + (1,) * (v.ndim - 1)) for k, v in seq.items()}


def data() -> tuple[dict, dict, dict]:
    """(params, gradients per step, the same with one NaN): numpy, the same everywhere."""
    grads = make_sequence(seed=11)
    nan_grads = {k: v.copy() for k, v in grads.items()}
    nan_grads[NAN_LEAF][(NAN_STEP, *NAN_INDEX)] = np.nan
    rng = np.random.default_rng(12)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    return params, grads, nan_grads


def run_all(params: Any, grads: Any, nan_grads: Any) -> dict[str, Any]:
    """Every catalog transform over the steps: name -> (updates per step, stats per
    step, final state)."""
    out = {}
    for entry in ENTRIES:
        extra = {"stacked_axes": STACKED} if entry.factory is optaxclip.adaptive_grad_clip else {}
        tx = entry.build(inner=optax.adam(0.01), **extra)
        seq = nan_grads if entry.name == "skip_nonfinite" else grads

        def step(state, g, tx=tx):
            updates, state = tx.update(g, state, params)
            return state, (updates, optaxclip.stats(state))

        state, (updates, stats) = jax.lax.scan(step, tx.init(params), seq)
        out[entry.name] = {"updates": updates, "stats": stats, "state": state}
    return out


def shards(tree: Any, mesh: Mesh) -> dict[str, dict[str, Any]]:
    """Every leaf's global shape, dtype and addressable shards, by its path."""
    positions = {d: i for i, d in enumerate(mesh.devices.flat)}
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        pieces = []
        for s in x.addressable_shards:
            index = tuple(sl.indices(n)[:2] for sl, n in zip(s.index, x.shape, strict=True))
            pieces.append(
                {
                    "mesh_position": positions[s.device],
                    "process": s.device.process_index,
                    "index": index,  # (start, stop) per axis
                    "data": np.asarray(s.data),
                }
            )
        out[jax.tree_util.keystr(path)] = {
            "shape": tuple(x.shape),
            "dtype": str(x.dtype),
            "fully_addressable": bool(x.is_fully_addressable),
            "shards": pieces,
        }
    return out


def main(argv: list[str]) -> None:
    out_dir = Path(argv[0])
    distributed = argv[1] != "single"
    # The CPU collectives the 2-process run needs: gloo (set before initialising).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if distributed:
        process_id, num_processes, port = int(argv[1]), int(argv[2]), int(argv[3])
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=120,
            shutdown_timeout_seconds=60,
        )
        tag = f"process{process_id}"
        want = (num_processes, NUM_DEVICES // num_processes)
    else:
        tag, want = "single", (1, NUM_DEVICES)
    got = (jax.process_count(), jax.local_device_count())
    if got != want or jax.device_count() != NUM_DEVICES:
        raise RuntimeError(f"(processes, local devices) {got}, expected {want}: {jax.devices()}")

    start = time.perf_counter()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    params, grads, nan_grads = data()

    def put(tree: dict[str, np.ndarray], lead: tuple = ()) -> dict[str, jax.Array]:
        # Each process makes its own shards from the (identical) host data.
        return {
            k: jax.make_array_from_callback(
                v.shape, NamedSharding(mesh, P(*lead, *SPECS[k])), lambda i, v=v: v[i]
            )
            for k, v in tree.items()
        }

    args = (put(params), put(grads, (None,)), put(nan_grads, (None,)))
    # Which processes hold the NaN: each device's block of the gradient, from its sharding.
    nan_at = (NAN_STEP, *NAN_INDEX)
    held = args[2][NAN_LEAF].sharding.devices_indices_map(nan_grads[NAN_LEAF].shape)
    shape = nan_grads[NAN_LEAF].shape
    nan_processes = sorted(
        {
            d.process_index
            for d, index in held.items()
            if all(
                i in range(*sl.indices(n)) for sl, i, n in zip(index, nan_at, shape, strict=True)
            )
        }
    )
    results = jax.jit(run_all)(*args)
    jax.block_until_ready(results)
    elapsed = time.perf_counter() - start
    report = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "mesh_processes": [d.process_index for d in mesh.devices.flat],
        "inputs_fully_addressable": {k: bool(v.is_fully_addressable) for k, v in args[1].items()},
        "nan_processes": nan_processes,
        "seconds": elapsed,
        "results": {name: shards(tree, mesh) for name, tree in results.items()},
    }
    tmp = out_dir / f"{tag}.tmp"
    with tmp.open("wb") as f:
        pickle.dump(report, f)
    tmp.rename(out_dir / f"{tag}.pkl")
    if distributed:
        jax.distributed.shutdown()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except Exception:  # noqa: BLE001 - reported on stderr, to the pytest process
        traceback.print_exc()
        sys.stderr.flush()
        # Exit at once: a normal exit could wait for the other process in jax.distributed.
        os._exit(1)
