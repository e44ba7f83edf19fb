"""ClipStats: what every clipping transform records about each step, and `stats()`."""

from __future__ import annotations

import functools
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
      norm: global L2 norm of the updates it received this step (float32; a float64
        norm beyond float32's range is held at its largest, ~3.4e38, not made inf).
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


def as_float32(x: Any) -> jax.Array:
    """``x`` as a float32 statistic, a finite value held at float32's largest.

    A float64 norm above ~3.4e38 is finite, but cast to float32 it becomes inf, which
    every statistic and adaptive history reads as a non-finite step; it is held at
    ~3.4e38 instead. NaN and inf stay as they are; float32 and narrower pass unchanged.
    """
    x = jnp.asarray(x)
    if jnp.finfo(x.dtype).bits <= 32:
        return x.astype(jnp.float32)
    big = jnp.finfo(jnp.float32).max
    return jnp.where(jnp.isfinite(x), jnp.clip(x, -big, big), x).astype(jnp.float32)


def threshold_for_norm(threshold: jax.Array, norm: jax.Array) -> jax.Array:
    """An adaptive threshold, computed in float32 from float32 records of the norms, as
    the threshold for ``norm`` in the norm's own dtype: where the float32 record of the
    norm differs from it by rounding alone and does not exceed the threshold, the norm
    itself (nothing is clipped).

    Under x64 the float32 record of a float64 norm may round below it, and a threshold
    equal to that record (ZClip's on a step that is no spike, AutoClip's where the
    percentile falls on this step) would otherwise clip the step by its own rounding
    (~6e-8 relative) and count it as clipped. A norm above float32's largest value is
    recorded as that value (:func:`as_float32`), which is no rounding: it is clipped.
    A float32 norm is its own record: the threshold passes unchanged.
    """
    if jnp.finfo(norm.dtype).bits <= 32:
        return threshold
    wide = jnp.asarray(threshold).astype(norm.dtype)
    rounded = (norm <= jnp.finfo(jnp.float32).max) & (as_float32(norm) <= threshold)
    return jnp.where(rounded, jnp.maximum(wide, norm), wide)


def record(
    prev: ClipStats,
    *,
    norm: jax.Array,
    clipped_norm: jax.Array,
    threshold: jax.Array,
    clipped: jax.Array,
) -> ClipStats:
    """The statistics after one more step, from values the transform already computed."""
    norm = as_float32(norm)
    clipped = jnp.asarray(clipped, jnp.bool_)
    return ClipStats(
        count=prev.count + 1,
        norm=norm,
        clipped_norm=as_float32(clipped_norm),
        threshold=as_float32(threshold),
        clipped=clipped,
        clip_count=prev.clip_count + clipped.astype(jnp.int32),
        nonfinite_count=prev.nonfinite_count + (~jnp.isfinite(norm)).astype(jnp.int32),
    )


# Fields of Optax's wrappers (and of Flax NNX's optimizer) that only say "the inner
# state is here": left out of names. As dict keys (the form nnx.state gives them) only
# the unmistakable ones are: a partition label such as "value" or "stats" is a name.
_PLUMBING_FIELDS = frozenset(
    {"inner_state", "inner_states", "inner_opt_state", "opt_state", "stats", "inner", "value"}
)
_PLUMBING_KEYS = frozenset({"inner_state", "inner_states", "inner_opt_state", "opt_state"})

# Extra scalars that some optaxclip states keep beside their ClipStats, reported by
# stats() with it.
_EXTRA_FIELDS = ("consecutive_skips", "clipped_fraction")
# Per-leaf values that some optaxclip states keep beside their ClipStats, as a dict from
# leaf path to scalar: reported by stats() as "<prefix>/<leaf path>" (monitor's
# leaf_norms as "leaf_norm/hidden/kernel").
_PER_LEAF_FIELDS = {"leaf_norms": "leaf_norm"}


def _snake(class_name: str) -> str:
    """'clip_by_global_norm' for 'ClipByGlobalNormState'."""
    name = class_name.removesuffix("State")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@functools.cache
def _names_by_fields() -> dict[frozenset, str]:
    """Each optaxclip state's set of field names, mapped to its transform's name.

    A state that lost its class (``nnx.state(optimizer)`` turns NamedTuples into dicts,
    as does a checkpoint restored without a target) is recognised by its fields, so it
    gets the name its class would give it.
    """
    import optaxclip  # the state classes live in the modules that import this one

    out: dict[frozenset, str] = {}
    for public in optaxclip.__all__:
        cls = getattr(optaxclip, public)
        if isinstance(cls, type) and issubclass(cls, tuple) and public.endswith("State"):
            fields = frozenset(cls._fields)
            assert fields not in out, f"{public} has the same fields as {out[fields]}"
            out[fields] = _snake(public)
    return out


def _state_name(node: Any) -> str | None:
    """The transform name of an optaxclip state (a NamedTuple, or a dict of its fields)."""
    cls = type(node)
    if getattr(cls, "__module__", "").startswith("optaxclip.") and hasattr(cls, "_fields"):
        return _snake(cls.__name__)
    if isinstance(node, Mapping) and all(isinstance(k, str) for k in node):
        return _names_by_fields().get(frozenset(node.keys()))
    return None


def _is_clip_stats(node: Any) -> bool:
    return isinstance(node, ClipStats) or (
        isinstance(node, Mapping) and set(node.keys()) == set(ClipStats._fields)
    )


def _as_clip_stats(node: Any) -> ClipStats:
    if isinstance(node, ClipStats):
        return node
    return ClipStats(**{f: node[f] for f in ClipStats._fields})


def _fields_of(node: Any) -> dict[str, Any]:
    return dict(node) if isinstance(node, Mapping) else node._asdict()


def _key_name(key: Any) -> str | None:
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.DictKey):
        name = str(key.key)
        return None if name in _PLUMBING_KEYS else name
    if isinstance(key, jax.tree_util.GetAttrKey):
        # nnx Variables hold their array in .value
        return None if key.name in _PLUMBING_FIELDS else key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _find_clip_stats(node: Any, parts: tuple[str, ...], out: list) -> None:
    """Appends ``(name, ClipStats, extras)`` for every ClipStats below ``node``."""
    if _is_clip_stats(node):
        out.append(("/".join(parts), _as_clip_stats(node), {}))
        return
    own = _state_name(node)
    if own is not None:
        # An optaxclip state: named by its transform; its own fields never add to the
        # name (one holds its ClipStats, any other an inner optimizer's state).
        parts = (*parts, own)
        fields = _fields_of(node)
        extras = {k: fields[k] for k in _EXTRA_FIELDS if k in fields}
        for field, prefix in _PER_LEAF_FIELDS.items():
            if isinstance(fields.get(field), Mapping):
                extras.update({f"{prefix}/{leaf}": v for leaf, v in fields[field].items()})
        for field, value in fields.items():
            if _is_clip_stats(value):
                out.append(("/".join(parts), _as_clip_stats(value), extras))
            elif (
                value is not None
                and field not in _PER_LEAF_FIELDS
                and not any(value is e for e in extras.values())
            ):
                _find_clip_stats(value, parts, out)
        return
    children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
    if len(children) == 1 and children[0][1] is node:
        return  # an array or other leaf
    for path, child in children:
        name = _key_name(path[0]) if path else None
        _find_clip_stats(child, (*parts, name) if name else parts, out)


def _flat(s: ClipStats, extras: dict[str, Any]) -> dict[str, jax.Array]:
    # jnp.asarray unwraps mutable containers such as Flax NNX's OptArray: returning the
    # live Variable would make every logged step alias the optimizer's latest value.
    out = {k: jnp.asarray(v) for k, v in s._asdict().items()}
    out["clip_rate"] = out["clip_count"].astype(jnp.float32) / jnp.maximum(
        out["count"], 1
    ).astype(jnp.float32)
    out.update({k: jnp.asarray(v) for k, v in extras.items()})
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
    ``inner_state``, are left out). A :func:`optaxclip.monitor` built with
    ``per_leaf=True`` adds one ``leaf_norm/<leaf path>`` key per leaf beside its fields
    (``leaf_norm/hidden/kernel``, or ``0/monitor/leaf_norm/hidden/kernel``).

    Args:
      opt_state: any optimizer state, or pytree containing one.

    Returns:
      A dict from names to scalar arrays; empty when there is no ClipStats.

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
    found: list[tuple[str, ClipStats, dict[str, Any]]] = []
    _find_clip_stats(opt_state, (), found)
    if len(found) == 1:
        return _flat(found[0][1], found[0][2])
    out: dict[str, jax.Array] = {}
    seen: dict[str, int] = {}
    for name, s, extras in found:
        name = name or "clip"
        if name in seen:
            seen[name] += 1
            name = f"{name}#{seen[name]}"
        else:
            seen[name] = 0
        for key, value in _flat(s, extras).items():
            out[f"{name}/{key}"] = value
    return out
