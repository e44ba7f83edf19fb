"""Monitoring: record the norm of the updates at a point of a chain, changing nothing."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _stats
from optaxclip._mechanics import measure, measure_leaves
from optaxclip._norms import AxisName, Sharded
from optaxclip._stats import ClipStats, as_float32
from optaxclip._validation import check_static_bool

__all__ = ["MonitorState", "monitor"]


class MonitorState(NamedTuple):
    """State of :func:`monitor`.

    Attributes:
      monitor: the :class:`ClipStats` (threshold inf, never clipped), also read as
        ``state.stats``. The field is named after the transform so that the name
        survives where the class does not (``nnx.state(optimizer)``, a checkpoint
        restored without a target).
      leaf_norms: with ``per_leaf=True``, a dict from each leaf's path (``"hidden/kernel"``)
        to its float32 L2 norm this step; None otherwise. A flat dict of scalars rather
        than a copy of the params tree: a copy would carry each parameter's metadata (a
        Flax NNX partitioning meant for a matrix) onto a scalar.
    """

    monitor: ClipStats
    leaf_norms: dict[str, jax.Array] | None

    @property
    def stats(self) -> ClipStats:
        return self.monitor


def _key_part(key: Any) -> str:
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def leaf_names(tree: Any) -> list[str]:
    """A readable, unique name for each leaf of ``tree``, in leaf order: its path joined by "/".

    A trailing ``.value`` (a Flax NNX Variable around its array) is left out, so that the
    params given to ``init`` (Variables) and the updates (plain arrays) name a leaf alike.
    """
    names: list[str] = []
    seen: dict[str, int] = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
            path = path[:-1]
        name = "/".join(_key_part(k) for k in path) or "<root>"
        if name in seen:
            seen[name] += 1
            name = f"{name}#{seen[name]}"
        else:
            seen[name] = 0
        names.append(name)
    return names


def monitor(
    *, per_leaf: bool = False, axis_name: AxisName = None, sharded: Sharded = None
) -> optax.GradientTransformationExtraArgs:
    """Records the norm of the updates at its place in a chain, and changes nothing.

    The updates pass through untouched; the state records a :class:`ClipStats` whose
    ``norm`` (and ``clipped_norm``) is the global L2 norm of the updates this transform
    received, with ``threshold`` inf and ``clipped`` False, so that
    :func:`optaxclip.stats` logs the gradient norm of a run that does not clip, or the
    norm at any point of a chain (before and after a clip, or of the optimizer's final
    updates). The norm is measured as robustly as :func:`optaxclip.global_norm`; a
    NaN/inf step is recorded (``nonfinite_count``) and passed on unchanged.

    With ``per_leaf=True`` the state also keeps each leaf's L2 norm, computed in the same
    pass as the global norm, and :func:`optaxclip.stats` reports them as
    ``leaf_norm/<path>`` (for example ``leaf_norm/params/dense/kernel``, or
    ``0/monitor/leaf_norm/params/dense/kernel`` beside other statistics), the per-layer
    gradient norms that levanter and t5x log. The leaves are those of the tree given to
    ``init``; the updates must have the same leaf paths.

    Args:
      per_leaf: also keep each leaf's norm (one float32 per leaf).
      axis_name: inside ``shard_map``/``pmap``, the mapped axis over which the norms
        are summed (see :func:`optaxclip.global_norm`).
      sharded: which leaves are sharded along ``axis_name``; default all.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`MonitorState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optaxclip
      >>> tx = optax.chain(optaxclip.monitor(per_leaf=True), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2), "b": jnp.zeros(1)}
      >>> grads = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> print(updates["w"])
      [-0.3 -0.4]
      >>> s = optaxclip.stats(state)
      >>> print(float(s["norm"]), float(s["leaf_norm/w"]), float(s["leaf_norm/b"]))
      13.0 5.0 12.0
      >>> print(bool(s["clipped"]), float(s["threshold"]))
      False inf
    """
    per_leaf = check_static_bool("monitor", "per_leaf", per_leaf, ())

    def init_fn(params):
        if not per_leaf:
            return MonitorState(_stats.init_stats(), None)
        # A buffer per leaf: a donated step refuses one buffer passed twice.
        names = leaf_names(params)
        return MonitorState(_stats.init_stats(), {n: jnp.zeros((), jnp.float32) for n in names})

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        if per_leaf:
            _, _, norms, norm = measure_leaves(updates, axis_name, sharded)
        else:  # the global norm alone: over a mesh, one scalar all-reduced
            norm = measure(updates, axis_name, sharded)
        new_stats = _stats.record(
            state.stats, norm=norm, clipped_norm=norm, threshold=jnp.inf, clipped=False
        )
        if not per_leaf:
            return updates, MonitorState(new_stats, None)
        names = leaf_names(updates)
        kept = state.leaf_norms or {}
        if set(names) != set(kept):
            missing = sorted(set(kept) - set(names))[:3]
            extra = sorted(set(names) - set(kept))[:3]
            raise ValueError(
                "monitor(per_leaf=True) keeps one norm per leaf of the tree given to init, "
                f"and the updates' leaves differ: not in the updates {missing}, not in init's "
                f"tree {extra}. Call init with the params (a tree of the updates' structure)."
            )
        per = {n: as_float32(norms[i]) for i, n in enumerate(names)}
        return updates, MonitorState(new_stats, per)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
