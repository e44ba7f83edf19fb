"""ClipStats: what every clipping transform records about each step, and `stats()`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["ClipStats", "stats"]


class ClipStats(NamedTuple):
    """Per-step statistics carried in the state of every optaxclip transform.

    Attributes:
      count: steps seen by this transform (int32).
      norm: global L2 norm of the updates it received this step (float32).
      clipped_norm: global L2 norm of the updates it returned this step (float32).
      threshold: the threshold in force this step (float32); for adaptive methods the
        threshold as computed, for per-block methods the per-block bound.
      clipped: whether it changed the updates this step (bool).
      clip_count: steps on which it clipped, cumulative (int32).
      nonfinite_count: steps whose norm was NaN/inf, cumulative (int32).
    """

    count: jax.Array
    norm: jax.Array
    clipped_norm: jax.Array
    threshold: jax.Array
    clipped: jax.Array
    clip_count: jax.Array
    nonfinite_count: jax.Array


def init_stats() -> ClipStats:
    """A fresh ClipStats: nothing seen yet.

    Every field gets a buffer of its own: a step jitted with ``donate_argnums`` over the
    state refuses a buffer that appears twice among its arguments, so one shared zeros
    array would fail the first donated step.
    """
    return ClipStats(
        count=jnp.zeros((), jnp.int32),
        norm=jnp.zeros((), jnp.float32),
        clipped_norm=jnp.zeros((), jnp.float32),
        threshold=jnp.zeros((), jnp.float32),
        clipped=jnp.zeros((), jnp.bool_),
        clip_count=jnp.zeros((), jnp.int32),
        nonfinite_count=jnp.zeros((), jnp.int32),
    )


def record(
    prev: ClipStats,
    *,
    norm: jax.Array,
    clipped_norm: jax.Array,
    threshold: jax.Array,
    clipped: jax.Array,
) -> ClipStats:
    """The statistics after one more step, from values the transform already computed."""
    norm = jnp.asarray(norm, jnp.float32)
    clipped = jnp.asarray(clipped, jnp.bool_)
    return ClipStats(
        count=prev.count + 1,
        norm=norm,
        clipped_norm=jnp.asarray(clipped_norm, jnp.float32),
        threshold=jnp.asarray(threshold, jnp.float32),
        clipped=clipped,
        clip_count=prev.clip_count + clipped.astype(jnp.int32),
        nonfinite_count=prev.nonfinite_count + (~jnp.isfinite(norm)).astype(jnp.int32),
    )


# Optax wrapper fields that only say "the inner state is here": left out of names.
_PLUMBING_FIELDS = frozenset(
    {"inner_state", "inner_states", "inner_opt_state", "stats", "inner"}
)


def _state_name(node: Any) -> str | None:
    """'clip_by_global_norm' for an optaxclip ``ClipByGlobalNormState``, else None."""
    cls = type(node)
    if not getattr(cls, "__module__", "").startswith("optaxclip."):
        return None
    name = cls.__name__.removesuffix("State")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _key_name(key: Any) -> str | None:
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return None if key.name in _PLUMBING_FIELDS else key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _find_clip_stats(node: Any, parts: tuple[str, ...], out: list) -> None:
    if isinstance(node, ClipStats):
        out.append(("/".join(parts), node))
        return
    if isinstance(node, Mapping) and set(node.keys()) == set(ClipStats._fields):
        # A ClipStats turned into a dict of its fields, as in Flax NNX's
        # `nnx.state(optimizer)` (an nnx.State) or a checkpoint restored without a target.
        # Its class and the transform's state class are gone; "stats" is plumbing.
        if parts and parts[-1] == "stats":
            parts = parts[:-1]
        out.append(("/".join(parts), ClipStats(**{f: node[f] for f in ClipStats._fields})))
        return
    own = _state_name(node)
    if own is not None:
        parts = (*parts, own)
    children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
    if len(children) == 1 and children[0][1] is node:
        return  # an array or other leaf
    for path, child in children:
        name = _key_name(path[0]) if path else None
        _find_clip_stats(child, (*parts, name) if name else parts, out)


def _flat(s: ClipStats) -> dict[str, jax.Array]:
    # jnp.asarray unwraps mutable containers such as Flax NNX's OptArray: returning the
    # live Variable would make every logged step alias the optimizer's latest value.
    out = {k: jnp.asarray(v) for k, v in s._asdict().items()}
    out["clip_rate"] = out["clip_count"].astype(jnp.float32) / jnp.maximum(
        out["count"], 1
    ).astype(jnp.float32)
    return out


def stats(opt_state: Any) -> dict[str, jax.Array]:
    """Every :class:`ClipStats` in an optimizer state, as flat scalars for logging.

    Looks through any nesting of states (``optax.chain``, ``inject_hyperparams``,
    ``MultiSteps``, ``masked``, ``partition``, optaxclip's own wrappers, a Flax NNX
    optimizer or its ``opt_state``) and is safe to call inside ``jax.jit``. It also reads
    states whose NamedTuples became dicts (``nnx.state(optimizer)``, a checkpoint
    restored without a target); names then give positions instead of transforms.
    With a single ClipStats the keys are its field names plus ``clip_rate``
    (``clip_count / max(count, 1)``). With several, each key is prefixed by where its
    ClipStats sits: chain positions, dict keys and the transform's name, for example
    ``"0/clip_by_global_norm/norm"`` (fields that only hold an inner state, like
    ``inner_state``, are left out).

    Args:
      opt_state: any optimizer state, or pytree containing one.

    Returns:
      A dict from names to scalar arrays; empty when there is no ClipStats.

    References:
      Pascanu et al., `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, 2013 (monitoring the gradient norm).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optaxclip
      >>> tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
      >>> s = optaxclip.stats(state)
      >>> print(float(s["norm"]), float(s["clipped_norm"]), bool(s["clipped"]))
      5.0 1.0 True
      >>> print(float(s["clip_rate"]))
      1.0
    """
    found: list[tuple[str, ClipStats]] = []
    _find_clip_stats(opt_state, (), found)
    if len(found) == 1:
        return _flat(found[0][1])
    out: dict[str, jax.Array] = {}
    seen: dict[str, int] = {}
    for name, s in found:
        name = name or "clip"
        if name in seen:
            seen[name] += 1
            name = f"{name}#{seen[name]}"
        else:
            seen[name] = 0
        for key, value in _flat(s).items():
            out[f"{name}/{key}"] = value
    return out
