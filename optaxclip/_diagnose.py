"""Diagnose a gradient-norm history and suggest a clipping threshold.

Practitioners set a clipping threshold by looking at the gradient norms a run actually produces
and putting ``max_norm`` just above their typical range (Pascanu et al., 2013; Zhang et al.,
2020). :func:`diagnose` turns that advice into a tool: given the per-step ``stats()`` dicts of a
clipping transform (or just an array of norms) it reports norm percentiles, the clip rate, the
number of non-finite norms, a suggested ``max_norm``, and plain-language warnings about the
usual failure modes. Everything here is host-side NumPy; no JAX is needed.

The rules, in one place (all of them are module constants, see below):

* **Suggested max_norm.** Take the finite, strictly positive norms; in log space drop spikes
  above ``median + 3 * MAD`` (MAD scaled by 1.4826 to estimate a standard deviation, so this
  is a "3 sigma" cut that a few loss spikes cannot move); the suggestion is ``1.25 *`` the 95th
  percentile of what remains. With log-normal norms of spread ``sigma = 0.3`` this is about
  ``2 x`` the median and clips roughly 1% of steps. NaN when there is no positive finite norm.
* **Clipping nearly every step.** ``clip_rate > 0.5`` over at least 20 steps that record
  ``clipped``.
* **Never clipping.** ``clip_rate == 0`` over at least 100 steps, and the (median) recorded
  threshold is more than ``2 x`` the 99th percentile of the finite norms.
* **Non-finite norms.** Any NaN/inf norm, or a positive cumulative ``nonfinite_count``.
* **Upward trend.** With at least 40 finite norms, split them (in step order) into four
  consecutive quarters; warn when the quarter medians rise strictly every quarter and the last
  is at least ``4 x`` the first.
* **All-zero gradients.** Every finite norm is exactly zero.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["Diagnosis", "diagnose"]

# Percentiles reported in ``Diagnosis.percentiles``.
_PERCENTILES = (50, 90, 99)
# suggested_max_norm = _MARGIN * percentile(_SUGGEST_PERCENTILE) of the norms left after
# dropping log-space spikes above median + _SPIKE_K * 1.4826 * MAD.
_SUGGEST_PERCENTILE = 95.0
_MARGIN = 1.25
_SPIKE_K = 3.0
_MAD_TO_SIGMA = 1.4826
# "Clipping nearly every step": clip_rate above this, over at least this many steps.
_FREQUENT_CLIP_RATE = 0.5
_MIN_STEPS_FREQUENT = 20
# "Never clipping": clip_rate == 0 over at least this many steps, with the threshold more than
# _LOOSE_FACTOR times the 99th percentile of the finite norms.
_MIN_STEPS_NEVER = 100
_LOOSE_FACTOR = 2.0
# Upward trend: >= _MIN_STEPS_TREND finite norms, quarter medians strictly rising, and the last
# quarter's median >= _TREND_FACTOR times the first quarter's.
_MIN_STEPS_TREND = 40
_TREND_FACTOR = 4.0


def _to_float(value: Any) -> float:
    return float(np.asarray(value))


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.4g}"


@dataclasses.dataclass(repr=False, eq=False)
class Diagnosis:
    """Summary of a gradient-norm history, with a suggested threshold and warnings.

    Normally built by :func:`diagnose`. ``str(d)`` and ``repr(d)`` both give the short report of
    :meth:`report`; :meth:`plot` draws the norm history. The array fields keep the parsed
    history (in step order) so the record can be re-plotted or inspected.

    Args:
        percentiles: ``{50: p50, 90: p90, 99: p99}`` of the finite norms (NaN if there are
            none), as Python floats.
        clip_rate: Fraction of steps (among those that record ``clipped``) on which the norm
            was clipped; ``None`` when the history carries no ``clipped``.
        nonfinite_count: Number of non-finite (NaN/inf) norms in the history, or the largest
            recorded cumulative ``nonfinite_count`` if that is larger.
        suggested_max_norm: A ``max_norm`` just above the typical range of the norms (see the
            module docstring for the rule); NaN when there is no positive finite norm.
        warnings: Plain-language warnings, each saying what to do; empty when all is well.
        num_steps: Number of steps in the history.
        threshold: Median of the finite recorded thresholds, or ``None`` if none recorded.
        norms: The norms, float array of shape ``(num_steps,)``, non-finite values kept.
        steps: Step numbers (the ``count`` key when present, else ``0..num_steps-1``).
        thresholds: Per-step thresholds (NaN where missing), or ``None``.
        clipped: Per-step boolean clip flags (``False`` where missing), or ``None``.
        num_clip_recorded: Number of steps that record ``clipped`` (the clip-rate denominator).

    Returns:
        A ``Diagnosis`` record (the dataclass constructor).

    References:
        Pascanu, Mikolov and Bengio, 2013, "On the difficulty of training recurrent neural
        networks", https://arxiv.org/abs/1211.5063.
        Zhang, He, Sra and Jadbabaie, 2020, "Why gradient clipping accelerates training: a
        theoretical justification for adaptivity", https://arxiv.org/abs/1905.11881.

    Examples:
        >>> import numpy as np
        >>> from optaxclip import diagnose
        >>> d = diagnose(np.exp(0.05 * np.arange(100)))   # norms growing 5% per step
        >>> d.clip_rate is None, d.nonfinite_count
        (True, 0)
        >>> print(d)
        Gradient-norm diagnosis over 100 steps
          norm percentiles:   p50=11.89  p90=86.07  p99=134.4
          clip rate:          n/a (no "clipped" recorded)
          threshold:          n/a
          non-finite norms:   0
          suggested max_norm: 137.8
          warnings:
            - Gradient norms are trending upward: the median norm grew 42.5x ...
    """

    percentiles: dict[int, float]
    clip_rate: float | None
    nonfinite_count: int
    suggested_max_norm: float
    warnings: list[str]
    num_steps: int = 0
    threshold: float | None = None
    norms: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    steps: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    thresholds: np.ndarray | None = None
    clipped: np.ndarray | None = None
    num_clip_recorded: int = 0

    def report(self) -> str:
        """Return the diagnosis as a short, human-readable multi-line report.

        Lists the norm percentiles, clip rate, recorded threshold, non-finite count, the
        suggested ``max_norm`` and the warnings (wrapped to 80 columns), or ``warnings: none``.

        Args:
            None.

        Returns:
            The report as a string (no trailing newline).

        References:
            Pascanu et al., 2013, https://arxiv.org/abs/1211.5063; Zhang et al., 2020,
            https://arxiv.org/abs/1905.11881.

        Examples:
            >>> from optaxclip import diagnose
            >>> hist = [{"norm": n, "threshold": 3.0, "clipped": n > 3.0}
            ...         for n in [1.0, 2.0, 1.5, 4.0]]
            >>> print(diagnose(hist).report())
            Gradient-norm diagnosis over 4 steps
              norm percentiles:   p50=1.75  p90=3.4  p99=3.94
              clip rate:          25.0% (1 of 4 steps)
              threshold:          3
              non-finite norms:   0
              suggested max_norm: 4.7...
              warnings: none
        """
        pct = "  ".join(f"p{q}={_fmt(v)}" for q, v in self.percentiles.items())
        if self.clip_rate is None:
            rate = 'n/a (no "clipped" recorded)'
        else:
            n_clip = int(self.clipped.sum()) if self.clipped is not None else 0
            rate = f"{100 * self.clip_rate:.1f}% ({n_clip} of {self.num_clip_recorded} steps)"
        lines = [
            f"Gradient-norm diagnosis over {self.num_steps} steps",
            f"  norm percentiles:   {pct}",
            f"  clip rate:          {rate}",
            f"  threshold:          {_fmt(self.threshold)}",
            f"  non-finite norms:   {self.nonfinite_count}",
            f"  suggested max_norm: {_fmt(self.suggested_max_norm)}",
        ]
        if not self.warnings:
            lines.append("  warnings: none")
        else:
            lines.append("  warnings:")
            for w in self.warnings:
                lines.append(
                    textwrap.fill(w, width=80, initial_indent="    - ", subsequent_indent="      ")
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()

    def __repr__(self) -> str:
        return self.report()

    def plot(self, ax: Any = None) -> Any:
        """Plot the norm history on a log y axis with the threshold and clipped steps marked.

        Draws the finite norms against the step, the recorded per-step threshold (dashed),
        the suggested ``max_norm`` (dotted horizontal line), red crosses on clipped steps and
        black triangles along the top edge at steps whose norm was NaN/inf. matplotlib is
        imported lazily; any backend works, including ``Agg``.

        Args:
            ax: A matplotlib ``Axes`` to draw into; if ``None`` a new figure and axes are made.

        Returns:
            The matplotlib ``Axes`` drawn into.

        References:
            Pascanu et al., 2013, https://arxiv.org/abs/1211.5063; Zhang et al., 2020,
            https://arxiv.org/abs/1905.11881.

        Examples:
            >>> import matplotlib
            >>> matplotlib.use("Agg")
            >>> from optaxclip import diagnose
            >>> hist = {"norm": [1.0, 2.0, 5.0, 1.5], "threshold": 3.0,
            ...         "clipped": [False, False, True, False]}
            >>> ax = diagnose(hist).plot()
            >>> ax.get_yscale(), len(ax.lines) >= 2
            ('log', True)
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(8, 4))
        norms = np.asarray(self.norms, dtype=float)
        steps = np.asarray(self.steps)
        finite = np.isfinite(norms)
        shown = np.where(finite, norms, np.nan)
        ax.plot(steps, shown, lw=1.0, color="C0", label="grad norm")
        if self.thresholds is not None and np.isfinite(self.thresholds).any():
            ax.plot(steps, self.thresholds, ls="--", lw=1.2, color="C1", label="threshold")
        if math.isfinite(self.suggested_max_norm) and self.suggested_max_norm > 0:
            ax.axhline(
                self.suggested_max_norm,
                ls=":",
                lw=1.2,
                color="C2",
                label=f"suggested max_norm ({_fmt(self.suggested_max_norm)})",
            )
        if self.clipped is not None:
            mask = np.asarray(self.clipped, dtype=bool) & finite
            if mask.any():
                ax.scatter(
                    steps[mask],
                    norms[mask],
                    marker="x",
                    s=20,
                    color="C3",
                    label="clipped",
                    zorder=3,
                )
        if (~finite).any():
            ax.scatter(
                steps[~finite],
                np.full(int((~finite).sum()), 0.98),
                transform=ax.get_xaxis_transform(),
                marker="v",
                s=30,
                color="k",
                label="NaN/inf",
                zorder=3,
            )
        if (norms[finite] > 0).any():
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("global gradient norm")
        ax.set_title("Gradient-norm history")
        ax.legend(loc="best", fontsize="small")
        return ax


def _split_prefix(keys: Sequence[Any]) -> str:
    """Return the key prefix ("" for bare keys) under which the norm is stored."""
    if "norm" in keys:
        return ""
    for k in keys:
        if isinstance(k, str) and k.endswith("/norm"):
            return k[: -len("norm")]
    raise ValueError(
        "history has no norm: expected a 'norm' key (or a prefixed key ending in '/norm', "
        f"as stats() returns for several clip transforms); got keys {list(keys)!r}"
    )


def _from_columns(history: Mapping[str, Any]) -> dict[str, Any]:
    prefix = _split_prefix(list(history.keys()))
    norms = np.atleast_1d(np.asarray(history[prefix + "norm"], dtype=float)).reshape(-1)
    n = norms.size
    if n == 0:
        raise ValueError("history is empty: it holds no norms")

    def column(name: str, dtype: Any) -> np.ndarray | None:
        if prefix + name not in history:
            return None
        col = np.asarray(history[prefix + name], dtype=dtype)
        if col.ndim == 0:
            col = np.full(n, col, dtype=dtype)
        col = col.reshape(-1)
        if col.size != n:
            raise ValueError(
                f"column {prefix + name!r} has {col.size} entries but the norm column has {n}"
            )
        return col

    clipped = column("clipped", bool)
    return {
        "norms": norms,
        "steps": column("count", float),
        "thresholds": column("threshold", float),
        "clipped": clipped,
        "clip_known": n if clipped is not None else 0,
        "nonfinite_counts": column("nonfinite_count", float),
    }


def _from_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    prefix = _split_prefix(list(records[0].keys()))
    n = len(records)
    norms = np.empty(n)
    steps = np.full(n, np.nan)
    thresholds = np.full(n, np.nan)
    clipped = np.zeros(n, dtype=bool)
    nonfinite = np.full(n, np.nan)
    has_steps = has_thr = has_nonfinite = False
    clip_known = 0
    for i, rec in enumerate(records):
        if prefix + "norm" not in rec:
            raise ValueError(f"history entry {i} has no {prefix + 'norm'!r} key")
        norms[i] = _to_float(rec[prefix + "norm"])
        if prefix + "count" in rec:
            steps[i] = _to_float(rec[prefix + "count"])
            has_steps = True
        if prefix + "threshold" in rec:
            thresholds[i] = _to_float(rec[prefix + "threshold"])
            has_thr = True
        if prefix + "clipped" in rec:
            clipped[i] = bool(np.asarray(rec[prefix + "clipped"]))
            clip_known += 1
        if prefix + "nonfinite_count" in rec:
            nonfinite[i] = _to_float(rec[prefix + "nonfinite_count"])
            has_nonfinite = True
    return {
        "norms": norms,
        "steps": steps if has_steps and np.isfinite(steps).all() else None,
        "thresholds": thresholds if has_thr else None,
        "clipped": clipped if clip_known else None,
        "clip_known": clip_known,
        "nonfinite_counts": nonfinite if has_nonfinite else None,
    }


def _parse(history: Any) -> dict[str, Any]:
    if isinstance(history, Mapping):
        return _from_columns(history)
    if isinstance(history, (str, bytes)):
        raise ValueError("history must be a sequence of stats() dicts or an array of norms")
    if hasattr(history, "__array__") and not isinstance(history, (list, tuple)):
        items: list[Any] | None = None
    else:
        items = list(history)
        if not items:
            raise ValueError("history is empty: pass at least one stats() dict or norm")
        is_map = [isinstance(x, Mapping) for x in items]
        if all(is_map):
            return _from_records(items)
        if any(is_map):
            raise ValueError("history mixes stats() dicts and bare numbers")
    try:
        norms = np.asarray(history if items is None else items, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(
            "history must be a sequence of stats() dicts, a dict of columns or a 1-D array of norms"
        ) from e
    norms = np.atleast_1d(norms)
    if norms.ndim != 1:
        raise ValueError(f"an array history must be 1-D (one norm per step); got {norms.shape}")
    if norms.size == 0:
        raise ValueError("history is empty: it holds no norms")
    return {
        "norms": norms,
        "steps": None,
        "thresholds": None,
        "clipped": None,
        "clip_known": 0,
        "nonfinite_counts": None,
    }


def _suggest_max_norm(finite: np.ndarray) -> float:
    """_MARGIN x the 95th percentile of the positive norms after dropping log-space spikes."""
    pos = finite[finite > 0]
    if pos.size == 0:
        return math.nan
    logs = np.log(pos)
    med = np.median(logs)
    mad = _MAD_TO_SIGMA * np.median(np.abs(logs - med))
    kept = pos[logs <= med + _SPIKE_K * mad]
    return float(_MARGIN * np.percentile(kept, _SUGGEST_PERCENTILE))


def _trend(finite: np.ndarray) -> tuple[bool, float]:
    """Return (upward trend?, ratio of last- to first-quarter median)."""
    if finite.size < _MIN_STEPS_TREND:
        return False, math.nan
    medians = [float(np.median(q)) for q in np.array_split(finite, 4)]
    if medians[0] <= 0:
        return False, math.nan
    ratio = medians[-1] / medians[0]
    rising = bool(np.all(np.diff(medians) > 0))
    return rising and ratio >= _TREND_FACTOR, ratio


def diagnose(history: Any) -> Diagnosis:
    """Diagnose a gradient-norm history: percentiles, clip rate, a threshold and warnings.

    ``history`` is what you collected from ``optaxclip.stats(opt_state)`` during training, in
    any of these forms:

    * a sequence of per-step ``stats()`` dicts holding any subset of their keys, at least
      ``norm`` (``count``, ``threshold``, ``clipped`` and ``nonfinite_count`` are used when
      present). Values may be Python/NumPy scalars or 0-d JAX arrays;
    * a dict of columns, e.g. ``{"norm": array, "clipped": array}`` (a scalar ``threshold``
      is broadcast to every step);
    * a 1-D array (or list) of norms; ``clip_rate`` is then ``None``.

    Prefixed keys: if there is no bare ``"norm"`` key (several clip transforms give keys such
    as ``"0/clip_by_global_norm/norm"``), the first key ending in ``"/norm"`` is used and the
    other keys are read under the same prefix (``"0/clip_by_global_norm/clipped"``, ...). To
    diagnose another transform, select its keys yourself first.

    Non-finite norms are excluded from the percentiles and the suggestion and counted in
    ``nonfinite_count``. The clip rate is the fraction of the steps recording ``clipped`` on
    which it was true. The suggested ``max_norm`` is ``1.25 x`` the 95th percentile of the
    positive finite norms after dropping log-space spikes above ``median + 3 * MAD`` over the
    whole history passed in (pass ``history[-1000:]`` to focus on the recent range). The
    warning rules (clipping on more than half the steps, no clipping in 100+ steps with the
    threshold above ``2 x`` p99, NaN/inf seen, quarter medians rising to ``4 x``, all-zero
    gradients) are listed in the module docstring.

    Args:
        history: A sequence of ``stats()`` dicts, a dict of columns, or a 1-D array of norms.

    Returns:
        A :class:`Diagnosis` with ``percentiles``, ``clip_rate``, ``nonfinite_count``,
        ``suggested_max_norm``, ``warnings`` and the parsed history; print it for a report,
        call ``.plot()`` for a figure.

    Raises:
        ValueError: If the history is empty, carries no norm, or is malformed.

    References:
        Pascanu, Mikolov and Bengio, 2013, "On the difficulty of training recurrent neural
        networks", https://arxiv.org/abs/1211.5063 (clip to a threshold set from the norms
        observed in training).
        Zhang, He, Sra and Jadbabaie, 2020, "Why gradient clipping accelerates training: a
        theoretical justification for adaptivity", https://arxiv.org/abs/1905.11881.

    Examples:
        >>> import numpy as np
        >>> from optaxclip import diagnose
        >>> norms = [1.0 + 0.2 * np.sin(i) for i in range(200)]
        >>> norms[50] = 40.0                     # one loss spike
        >>> norms[120] = float("nan")            # one overflow
        >>> history = [{"count": i + 1, "norm": n, "threshold": 1.15, "clipped": n > 1.15}
        ...            for i, n in enumerate(norms)]
        >>> d = diagnose(history)
        >>> {q: round(v, 3) for q, v in d.percentiles.items()}
        {50: 1.004, 90: 1.19, 99: 1.2}
        >>> round(d.clip_rate, 3), d.nonfinite_count, round(d.suggested_max_norm, 3)
        (0.235, 1, 1.497)
        >>> print(d)
        Gradient-norm diagnosis over 200 steps
          norm percentiles:   p50=1.004  p90=1.19  p99=1.2
          clip rate:          23.5% (47 of 200 steps)
          threshold:          1.15
          non-finite norms:   1
          suggested max_norm: 1.497
          warnings:
            - 1 of 200 steps (0.5%) had a non-finite (NaN or inf) gradient norm. ...
    """
    parsed = _parse(history)
    norms: np.ndarray = parsed["norms"]
    n = int(norms.size)
    finite_mask = np.isfinite(norms)
    finite = norms[finite_mask]

    if finite.size:
        percentiles = {q: float(np.percentile(finite, q)) for q in _PERCENTILES}
    else:
        percentiles = {q: math.nan for q in _PERCENTILES}

    clipped = parsed["clipped"]
    clip_known = parsed["clip_known"]
    clip_rate = float(clipped.sum()) / clip_known if clipped is not None else None

    nonfinite_count = int((~finite_mask).sum())
    cum = parsed["nonfinite_counts"]
    if cum is not None and np.isfinite(cum).any():
        nonfinite_count = max(nonfinite_count, int(cum[np.isfinite(cum)].max()))

    thresholds = parsed["thresholds"]
    threshold: float | None = None
    if thresholds is not None and np.isfinite(thresholds).any():
        threshold = float(np.median(thresholds[np.isfinite(thresholds)]))

    suggested = _suggest_max_norm(finite)
    steps = parsed["steps"]
    if steps is None:
        steps = np.arange(n)
    sugg_txt = _fmt(suggested) if math.isfinite(suggested) else None

    warnings: list[str] = []
    if nonfinite_count:
        if finite.size == 0:
            warnings.append(
                f"Every one of the {n} gradient norms is NaN or inf, so nothing else can be "
                "judged. Training has diverged or the loss is broken: look for the first "
                "non-finite value (jax.config.update('jax_debug_nans', True)), check the data "
                "and the loss for log(0), division by zero or low-precision overflow, and "
                "lower the learning rate."
            )
        else:
            warnings.append(
                f"{nonfinite_count} of {n} steps ({100 * nonfinite_count / n:.1f}%) had a "
                "non-finite (NaN or inf) gradient norm. Clipping cannot repair a NaN: skip "
                "such updates (e.g. optax.apply_if_finite), and find the cause (enable "
                "jax_debug_nans; check the data and the loss for log(0), division by zero or "
                "low-precision overflow; lower the learning rate if they keep appearing)."
            )
    if finite.size and not (finite > 0).any():
        warnings.append(
            "Every finite gradient norm is exactly zero: the loss does not depend on the "
            "parameters being trained. Check that the loss uses the model output, that you "
            "differentiate with respect to the right parameters, and that no stop_gradient or "
            "integer cast cuts the graph."
        )
    if (
        clip_rate is not None
        and clip_known >= _MIN_STEPS_FREQUENT
        and clip_rate > _FREQUENT_CLIP_RATE
    ):
        advice = (
            f" If the run is otherwise healthy, raise max_norm to about {sugg_txt}, just "
            "above the typical norm."
            if sugg_txt
            else ""
        )
        warnings.append(
            f"The gradient was clipped on {100 * clip_rate:.0f}% of steps, i.e. nearly every "
            "step: the clip is doing the optimizer's job and is likely hiding a problem with "
            "the learning rate, the initialisation or the data. Check those first (try a "
            "lower learning rate or a warmup, and look at the raw loss curve)." + advice
        )
    if (
        clip_rate == 0.0
        and clip_known >= _MIN_STEPS_NEVER
        and threshold is not None
        and finite.size
        and threshold > _LOOSE_FACTOR * percentiles[99]
    ):
        advice = f" Lower max_norm to about {sugg_txt}" if sugg_txt else " Lower max_norm"
        warnings.append(
            f"The gradient was never clipped in {clip_known} steps, and the threshold "
            f"({_fmt(threshold)}) is {threshold / percentiles[99]:.1f}x the 99th percentile "
            f"of the norms ({_fmt(percentiles[99])}), so it is too loose to protect against "
            "a spike." + advice + ", just above the typical range, so that only rare spikes "
            "are clipped."
        )
    rising, ratio = _trend(finite)
    if rising:
        warnings.append(
            f"Gradient norms are trending upward: the median norm grew {ratio:.1f}x from the "
            "first to the last quarter of the history and rose in every quarter. This "
            "usually precedes divergence, and clipping only hides it. Lower the learning rate "
            "(or add decay), and check for growing weights or activations (weight decay, "
            "normalisation layers) and for loss-scale problems."
        )

    return Diagnosis(
        percentiles=percentiles,
        clip_rate=clip_rate,
        nonfinite_count=nonfinite_count,
        suggested_max_norm=suggested,
        warnings=warnings,
        num_steps=n,
        threshold=threshold,
        norms=norms,
        steps=np.asarray(steps),
        thresholds=thresholds,
        clipped=clipped,
        num_clip_recorded=clip_known,
    )
