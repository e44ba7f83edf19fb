"""Argument validation and threshold reading shared by every transform.

Concrete hyperparameters are checked when a transform is built, so a bad value fails
at the line that wrote it, not deep inside XLA. Traced values (a transform rebuilt
inside ``optax.inject_hyperparams`` under ``jit``) cannot be checked and pass through.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ThresholdLike = Any  # float | Array | optax.Schedule


def is_concrete(value: Any) -> bool:
    """True when ``value`` is a Python/NumPy scalar or a non-traced JAX array."""
    if isinstance(value, jax.core.Tracer):
        return False
    return isinstance(value, (int, float, np.ndarray, np.generic, jax.Array))


def _as_float(name: str, value: Any) -> float | None:
    """The float value of a concrete scalar argument, or None when it is traced."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got the bool {value!r}.")
    if isinstance(value, jax.core.Tracer):
        return None
    if not is_concrete(value):
        raise TypeError(
            f"{name} must be a real scalar (a Python, NumPy or JAX number), got "
            f"{type(value).__name__} {value!r}."
        )
    arr = np.asarray(value)
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got an array of shape {arr.shape}.")
    # jnp.issubdtype also knows bfloat16 (inject_hyperparams may hand one over).
    if not jnp.issubdtype(arr.dtype, jnp.number) or jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    return float(arr)


def check_threshold(name: str, value: ThresholdLike, *, allow_none: bool = False) -> None:
    """Rejects a negative or NaN threshold; schedules and traced values pass.

    Args:
      name: the argument's name, used in the error message.
      value: a scalar, a traced value, an ``optax.Schedule`` or (if allowed) None.
      allow_none: whether None (meaning "no threshold") is accepted.
    """
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must be a non-negative number or a schedule, got None.")
    if callable(value) and not is_concrete(value):
        return
    if not isinstance(value, (bool, jax.core.Tracer)) and not is_concrete(value):
        raise TypeError(
            f"{name} must be a non-negative real scalar or an optax schedule (a callable "
            f"count -> value), got {type(value).__name__} {value!r}."
        )
    x = _as_float(name, value)
    if x is None:
        return
    if math.isnan(x) or x < 0:
        raise ValueError(
            f"{name} must be a non-negative number (or an optax schedule), got {value!r}."
        )


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Rejects a concrete scalar outside ``[low, high]`` (ends open where asked)."""
    x = _as_float(name, value)
    if x is None:
        return
    too_low = x <= low if low_open else x < low
    too_high = x >= high if high_open else x > high
    if math.isnan(x) or too_low or too_high:
        interval = ("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open else "]")
        raise ValueError(f"{name} must lie in {interval}, got {value!r}.")


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """Rejects anything but a positive (or, if allowed, zero) Python/NumPy integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {bound} integer, got {value!r}.")


def static_hint(who: str, name: str, static: Sequence[str]) -> str:
    """What to write when ``optax.inject_hyperparams`` turned a static int into an array."""
    names = ", ".join(repr(n) for n in static) + ("," if len(static) == 1 else "")
    return (
        f"{who}: {name} is fixed when the step is compiled (it sizes the state or picks "
        f"the computation), so it must be a Python int. optax.inject_hyperparams turns "
        f"every numeric argument it is not told about into an array, even one left at its "
        f"default: build it as optax.inject_hyperparams(optaxclip.{who}, "
        f"static_args=({names}))(...)."
    )


def check_static_bool(who: str, name: str, value: Any, static: Sequence[str]) -> bool:
    """``value`` as a Python bool; a TypeError naming ``name`` for anything else.

    An array (concrete or traced) is refused with a hint: the option picks the
    computation when the step is compiled, so it cannot be a traced hyperparameter.

    Args:
      who: the transform's name, for the message.
      name: the argument's name.
      value: its value.
      static: the transform's other ``static_args``, for the hint.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (jax.Array, jax.core.Tracer, np.ndarray)):
        names = ", ".join(repr(n) for n in (*static, name))
        raise TypeError(
            f"{who}: {name} picks the computation when the step is compiled, so it must "
            f"be a Python bool, got the array {value!r}. optax.inject_hyperparams keeps a "
            "Python bool as it is but turns an array into a traced hyperparameter: pass "
            f"True or False, or build it as optax.inject_hyperparams(optaxclip.{who}, "
            f"static_args=({names}))(...)."
        )
    raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}.")


def check_static_int(
    who: str,
    name: str,
    value: Any,
    static: Sequence[str],
    *,
    allow_zero: bool = False,
    allow_none: bool = False,
) -> None:
    """Checks an int that shapes the state or the computation (a window, a warm-up).

    Args:
      who: the transform's name, for the message.
      name: the argument's name.
      value: its value.
      static: every such argument of the transform, for the ``static_args`` hint.
      allow_zero: whether 0 is accepted.
      allow_none: whether None is accepted.
    """
    if value is None and allow_none:
        return
    if isinstance(value, (jax.Array, jax.core.Tracer)):
        raise TypeError(static_hint(who, name, static) + f" Got {value!r}.")
    check_positive_int(name, value, allow_zero=allow_zero)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Rejects a string option that is not one of ``choices``."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}.")


def check_float_leaves(tree: Any, what: str = "updates") -> None:
    """Raises TypeError naming the first leaf whose dtype is not floating or complex.

    Runs at trace time on static dtypes, so it costs nothing in the compiled step.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        where = jax.tree_util.keystr(path) or "<root>"
        if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
            raise TypeError(
                f"{what} leaf {where} is a {type(leaf).__name__} ({leaf!r}), not an array: "
                "gradient clipping works on pytrees of arrays. Wrap numbers in "
                "jnp.asarray, and keep other objects out of the tree."
            )
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{what} leaf {where} has dtype {dtype}; gradient clipping needs floating "
                "point or complex leaves. Cast it, or leave it out of the optimized tree "
                "(optax.masked / optax.set_to_zero)."
            )


def _bad_threshold(name: str) -> Callable[..., Exception]:
    def make(step: Any, value: Any) -> Exception:
        return ValueError(
            f"{name} is {float(value)} at step {int(step)} (count from 1): a threshold must "
            "be non-negative and not NaN. A negative one would flip the update's sign and "
            "a NaN one would turn clipping off. Check the schedule or the value injected "
            "with optax.inject_hyperparams."
        )

    return make


def positive_at(name: str, value: Any, count: jax.Array, *, allow_zero: bool = False) -> jax.Array:
    """A positive (or non-negative) hyperparameter as float32, checked at run time when
    traced (injected with ``optax.inject_hyperparams`` under ``jit``): a negative, NaN
    (or zero) value raises naming ``name`` and the step, where it would flip an update's
    sign or skip every step. A concrete value was checked when the transform was built.
    """
    x = jnp.asarray(value, dtype=jnp.float32)
    if is_concrete(value):
        return x
    bad = jnp.isnan(x) | ((x < 0) if allow_zero else (x <= 0))
    bound = "non-negative" if allow_zero else "positive"

    def make(step: Any, v: Any) -> Exception:
        return ValueError(
            f"{name} is {float(v)} at step {int(step)} (count from 1): it must be {bound}. "
            "Check the value injected with optax.inject_hyperparams."
        )

    raise_at_runtime_if(bad, make, count + 1, x)
    return x


def as_threshold(value: Any, dtype: Any = jnp.float32) -> jax.Array:
    """A threshold as a scalar of ``dtype``: a concrete one rounded once from its exact
    value, and above the dtype's largest finite number read as inf without NumPy's
    overflow warning (a ``max_norm`` of 1e39 clips nothing a float32 tree can hold)."""
    if is_concrete(value):
        exact = float(np.asarray(value))
        if abs(exact) > float(jnp.finfo(dtype).max):
            exact = math.copysign(math.inf, exact)
        return jnp.asarray(exact, dtype)
    # Under jit a constant threshold may arrive as a tracer whose cast JAX still folds
    # with NumPy, which warns where float64's 1e39 becomes float32's inf.
    with np.errstate(over="ignore"):
        return jnp.asarray(value).astype(dtype)


def checked_bound(who: str, name: str, value: Any, dtype: Any, keeper: str) -> jax.Array:
    """A non-negative clip norm of a function (not a transform: no schedule, no step) as
    a scalar of ``dtype``: checked now, or at run time where it is traced (a bound passed
    through ``jit`` or ``vmap``), so that a negative bound raises instead of flipping the
    sign of what it clips. ``keeper`` says what keeps at most that norm ("an example
    keeps")."""
    if callable(value) and not is_concrete(value):
        raise TypeError(
            f"{who}: {name} must be a number, got a callable. Pass schedule(step) for a "
            "clip norm that changes during training."
        )
    x = _as_float(name, value)  # TypeError for anything but a real scalar, naming it
    if x is not None and (math.isnan(x) or x < 0):
        raise ValueError(
            f"{who}: {name} must be a non-negative number (the largest L2 norm {keeper}), "
            f"got {value!r}."
        )
    t = as_threshold(value, dtype)
    if x is None:

        def make(v: Any) -> Exception:
            return ValueError(
                f"{who}: {name} is {float(v)}; it must be non-negative and not NaN (a "
                "negative bound would flip the sign of what it clips)."
            )

        raise_at_runtime_if(jnp.isnan(t) | (t < 0), make, t)
    return t


def threshold_at(
    value: ThresholdLike, count: jax.Array, name: str = "threshold", dtype: Any = jnp.float32
) -> jax.Array:
    """The threshold in force at step ``count`` as a scalar of ``dtype``.

    ``dtype`` is the one the clip's arithmetic runs in: float64 where the tree has a
    float64 leaf (under ``JAX_ENABLE_X64``), so that a threshold of 1e-40 or 1e39 is not
    flushed to 0 or raised to inf on its way to a float64 norm. The statistics record it
    as float32 whatever it is (:class:`ClipStats`).

    A callable is an ``optax.Schedule`` evaluated at the transform's own count. A
    schedule's value, or a traced one (injected with ``optax.inject_hyperparams`` under
    ``jit``), is checked at run time: negative or NaN raises, naming ``name`` and the
    step. A concrete constant was checked when the transform was built.
    """
    if callable(value) and not is_concrete(value):
        value = value(count)
    elif is_concrete(value):
        return as_threshold(value, dtype)
    t = as_threshold(value, dtype)
    raise_at_runtime_if(jnp.isnan(t) | (t < 0), _bad_threshold(name), count + 1, t)
    return t


def resolve_per_leaf(option: Any, tree: Any, name: str, default: Any) -> list[Any]:
    """Expands a per-leaf option into one value per leaf of ``tree``.

    ``option`` is None (``default`` everywhere), a plain value shared by every leaf, a
    callable ``(path, leaf) -> value``, or a pytree whose structure is a prefix of
    ``tree`` (each of its leaves covers the subtree beneath it).
    """
    with_path = jax.tree_util.tree_flatten_with_path(tree)[0]
    if option is None:
        return [default] * len(with_path)
    if callable(option):
        return [option(path, leaf) for path, leaf in with_path]
    if isinstance(option, (bool, int, np.integer, np.bool_)):
        return [option] * len(with_path)
    try:
        subtrees = jax.tree_util.tree_structure(option).flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{name} must be a value, a callable (path, leaf) -> value, or a pytree "
            f"matching the structure of the updates: {err}"
        ) from err
    values = jax.tree_util.tree_leaves(option)
    out: list[Any] = []
    for value, subtree in zip(values, subtrees, strict=True):
        out.extend([value] * len(jax.tree_util.tree_leaves(subtree)))
    return out


Schedule = Callable[[jax.Array], jax.Array]


def raise_at_runtime_if(bad: jax.Array, make_error: Callable[..., Exception], *operands) -> None:
    """Raises ``make_error(*operands)`` from inside ``jit`` when ``bad`` is True.

    Free when ``bad`` is False: the host callback sits in the untaken branch of a
    ``lax.cond``. Under ``jax.vmap`` that cond becomes a select and the callback runs on
    every step, so it checks ``bad`` again on the host and raises only for a batch
    element that really is bad, naming the first.
    """

    def on_host(bad_values, *values):
        bad_values = np.asarray(bad_values)
        if not bad_values.any():
            return
        first = np.unravel_index(int(np.argmax(bad_values)), bad_values.shape)
        raise make_error(*(np.asarray(v)[first] if np.ndim(v) else v for v in values))

    jax.lax.cond(
        bad,
        lambda: jax.debug.callback(on_host, bad, *operands, ordered=False),
        lambda: None,
    )

