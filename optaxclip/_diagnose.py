"""Diagnose a gradient-norm history and suggest a clipping threshold.

Practitioners set a clipping threshold by looking at the gradient norms a run actually produces
and putting ``max_norm`` just above their typical range (Pascanu et al., 2013; Zhang et al.,
2020). :func:`diagnose` turns that advice into a tool: given the per-step ``stats()`` dicts of a
clipping transform (or just an array of norms) it reports norm percentiles, the clip rate, the
number of non-finite norms, a suggested ``max_norm``, and plain-language warnings about the
usual failure modes. Everything here is host-side NumPy; no JAX is needed.

**The method.** Advice depends on the transform that produced the history, so :func:`diagnose`
works out which one it was and the report names it:

* ``diagnose(history, method="autoclip")`` names it; this wins over what the keys say.
* Otherwise it is read from the keys. With several clipping transforms, ``stats()`` prefixes
  each key with where the transform sits and its name (``"0/clip_by_global_norm/norm"``,
  ``"skip_nonfinite/0/zclip/norm"``); the method is the last path component before the field
  name when it is a transform's name (a ``#1`` that ``stats()`` appends to a repeated name is
  ignored). Bare keys (one clipping transform) do not name it, except that a
  ``consecutive_skips`` key marks a skip wrapper (``skip_spikes`` when a finite threshold was
  recorded, since ``skip_nonfinite`` always records ``inf``; else "a skip wrapper").
* Otherwise it is unknown and a fixed ``max_norm`` is assumed; the report says so.

The families, and what "clipped" means for each:

* **Fixed thresholds** (``clip_by_global_norm``, ``clip_by_block_norm``, ``clip_by_block_rms``,
  ``clip_by_value``, and an unknown method): all the rules below. For the per-block and
  per-element methods the threshold is a per-block norm, RMS or element bound, which the
  report labels as such; since ``diagnose`` sees only the global norm, their advice names
  the parameter to change and gives the suggestion only as a ``clip_by_global_norm`` value.
* **Adaptive clips** (``autoclip``, ``adagc``, ``adaptive_grad_clip``) clip often by design:
  AutoClip whenever the norm exceeds a percentile of the past norms (``autoclip(10)`` clips
  about 90% of steps), AdaGC whenever any tensor exceeds ``ratio`` times the EMA of its own
  norm, AGC whenever any unit's update exceeds ``clipping`` times its weight norm. Their clip
  rate draws no warning and no advice to raise a ``max_norm``, and neither does a zero clip
  rate. AGC's threshold is that ratio, not a norm: the report shows it as the "clipping
  ratio" and labels the suggestion as a global-norm value for ``clip_by_global_norm``.
* **ZClip** clips z-score spikes of the norm against its EMA, which a steady run has on a
  few percent of steps. Clipping on more than half the steps is a warning, but not one to
  raise a threshold: when most clipped steps sit at the same, largest recorded threshold,
  ZClip's fixed ``max_norm`` cap (or warm-up bound) is below the typical norm and ZClip is
  acting as a fixed clip, which can hide a learning-rate, initialisation or data problem;
  otherwise the norms outrun the EMA (``alpha``) on most steps, a symptom that raising
  ``z_thresh`` would only hide.
* **Skip wrappers** (``skip_nonfinite``, ``skip_spikes``): ``clipped`` means the step was
  *skipped*, and the report shows a skip rate and the longest run of consecutive skips. A
  skipped step does not train, so skipping on more than ``10%`` of at least 20 steps, or
  ``10`` or more steps in a row, is a stalling run; the warning points at the cause and at
  the wrappers' ``max_consecutive_skips``, which makes a stall raise.

The rules, in one place (all of them are module constants, see below):

* **Suggested max_norm.** Take the finite, strictly positive norms; in log space drop spikes
  above ``median + 3 * MAD`` (MAD scaled by 1.4826 to estimate a standard deviation, so this
  is a "3 sigma" cut that a few loss spikes cannot move); the suggestion is ``1.25 *`` the 95th
  percentile of what remains. With log-normal norms of spread ``sigma = 0.3`` this is about
  ``2 x`` the median and clips roughly 1% of steps. NaN when there is no positive finite norm.
  It is always a global-norm threshold (the ``max_norm`` of ``clip_by_global_norm``). For a
  diverging run it is computed from the healthy early part, never from the diverged tail:
  the first quarter of the finite norms (in step order), or, while that part still grows
  ``4 x`` from the median of its first half to that of its second, the first quarter of it
  (a run that blows up within its first steps is judged by its first norms).
* **Clipping nearly every step** (fixed thresholds; ZClip, see above). ``clip_rate > 0.5``
  over at least 20 steps that record ``clipped``. The advice to raise the threshold is left
  out when the run is diverging.
* **Never clipping** (fixed thresholds only). ``clip_rate == 0`` over at least 100 steps,
  and the (median) recorded threshold is more than ``2 x`` the 99th percentile of the finite
  norms (a block norm, block RMS or element never exceeds the global norm, so this holds for
  the per-block and per-element bounds too).
* **Non-finite norms.** Any NaN/inf norm, or a positive cumulative ``nonfinite_count``.
* **Divergence.** Either an upward trend (with at least 40 finite norms, split them in step
  order into four consecutive quarters; the quarter medians rise strictly every quarter and
  the last is at least ``4 x`` the first), or a history that ends in at least 3 non-finite
  norms after finite ones. The warning calls the run diverging (and then replaces the
  non-finite warning).
* **All-zero gradients.** Every finite norm is exactly zero.
"""

from __future__ import annotations

import dataclasses
import math
import re
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
# Divergence into NaN/inf: the history ends in at least this many non-finite norms after
# finite ones.
_MIN_NONFINITE_TAIL = 3
# Skip wrappers: a stalling run skips on more than this fraction of at least
# _MIN_STEPS_FREQUENT steps, or this many steps in a row.
_FREQUENT_SKIP_RATE = 0.1
_LONG_SKIP_RUN = 10

# The methods, as stats() names their transforms.
_FIXED = ("clip_by_global_norm", "clip_by_block_norm", "clip_by_block_rms", "clip_by_value")
_ADAPTIVE = ("autoclip", "zclip", "adagc", "adaptive_grad_clip", "spike_aware_clip")
_SKIPS = ("skip_nonfinite", "skip_spikes")
# Records the norm and never clips.
_RECORD_ONLY = ("monitor",)
# Methods whose recorded threshold is a ratio, not a norm: no threshold line on the plot.
_RATIO_THRESHOLDS = ("adaptive_grad_clip", "spike_aware_clip")
# A skip wrapper whose kind the history does not tell.
_ANY_SKIP = "skip_wrapper"
_METHODS = _FIXED + _ADAPTIVE + _SKIPS + _RECORD_ONLY
_ACCEPTED = (*_METHODS, _ANY_SKIP)
_SKIP_METHODS = (*_SKIPS, _ANY_SKIP)

# What the report says about each method, and how it labels the recorded threshold.
_DESCRIPTIONS = {
    None: "unknown, not given or read (assuming a fixed max_norm)",
    "clip_by_global_norm": "clip_by_global_norm (fixed max_norm)",
    "clip_by_block_norm": "clip_by_block_norm (fixed per-block norm bound)",
    "clip_by_block_rms": "clip_by_block_rms (fixed per-block RMS bound)",
    "clip_by_value": "clip_by_value (fixed per-element limit)",
    "autoclip": "autoclip (adaptive percentile: clips often by design)",
    "zclip": "zclip (adaptive: clips z-score spikes over a norm EMA)",
    "adagc": "adagc (adaptive per-tensor: clips often by design)",
    "adaptive_grad_clip": "adaptive_grad_clip (AGC: clips often by design)",
    "spike_aware_clip": "spike_aware_clip (SPAM: clips coordinates against their own EMA)",
    "monitor": "monitor (records the norm only: nothing is clipped)",
    "skip_nonfinite": 'skip_nonfinite (skip wrapper: "clipped" means skipped)',
    "skip_spikes": 'skip_spikes (skip wrapper: "clipped" means skipped)',
    _ANY_SKIP: "a skip wrapper (skip_nonfinite or skip_spikes)",
}
_THRESHOLD_LABELS = {
    "clip_by_block_norm": ("per-block bound", ""),
    "clip_by_block_rms": ("block RMS bound", ""),
    "clip_by_value": ("value limit", " (per element)"),
    "autoclip": ("threshold", " (median; adaptive)"),
    "zclip": ("threshold", " (median; adaptive)"),
    "adagc": ("threshold", " (median of the largest per-tensor bound)"),
    "adaptive_grad_clip": ("clipping ratio", " (update-to-weight norm ratio, not a norm)"),
    "spike_aware_clip": ("threshold", " (ratio of g^2 to its EMA, not a norm)"),
    "skip_spikes": ("skip threshold", " (median norm threshold)"),
    _ANY_SKIP: ("skip threshold", " (median norm threshold)"),
}
# The parameter that holds the fixed bound of the per-block and per-element methods.
_BOUND_PARAMS = {
    "clip_by_block_norm": "max_norm (the per-block norm bound)",
    "clip_by_block_rms": "threshold (the per-block RMS bound)",
    "clip_by_value": "max_delta (the per-element limit)",
}


def _to_float(value: Any) -> float:
    return float(np.asarray(value))


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.4g}"


def _row(label: str, value: str) -> str:
    """One report line, ``label:`` padded to a column, wrapped to 80 columns."""
    return textwrap.fill(
        f"  {label + ':':<19} {value}",
        width=80,
        subsequent_indent=" " * 22,
        break_on_hyphens=False,
    )


def _longest_run(flags: np.ndarray) -> int:
    """The longest run of consecutive True values."""
    best = run = 0
    for f in np.asarray(flags, dtype=bool):
        run = run + 1 if f else 0
        best = max(best, run)
    return best


@dataclasses.dataclass(repr=False, eq=False)
class Diagnosis:
    """Summary of a gradient-norm history, with a suggested threshold and warnings.

    Normally built by :func:`diagnose`. ``str(d)`` and ``repr(d)`` both give the short report of
    :meth:`report`, which names the method analysed in its first lines; :meth:`plot` draws the
    norm history. The array fields keep the parsed history (in step order) so the record can be
    re-plotted or inspected.

    Args:
        percentiles: ``{50: p50, 90: p90, 99: p99}`` of the finite norms (NaN if there are
            none), as Python floats.
        clip_rate: Fraction of steps (among those that record ``clipped``) on which the norm
            was clipped (for a skip wrapper: skipped); ``None`` when the history carries no
            ``clipped``.
        nonfinite_count: Number of non-finite (NaN/inf) norms in the history, or the largest
            recorded cumulative ``nonfinite_count`` if that is larger.
        suggested_max_norm: A global-norm ``max_norm`` (for ``clip_by_global_norm``) just
            above the typical range of the norms (see the module docstring for the rule); for
            a diverging run, of its healthy early part (the first quarter of the finite
            norms, see the module docstring); NaN when there is no positive finite norm.
        warnings: Plain-language warnings, each saying what to do; empty when all is well.
        num_steps: Number of steps in the history.
        threshold: Median of the finite recorded thresholds, or ``None`` if none recorded.
        norms: The norms, float array of shape ``(num_steps,)``, non-finite values kept.
        steps: Step numbers (the ``count`` key when present, else ``0..num_steps-1``).
        thresholds: Per-step thresholds (NaN where missing), or ``None``.
        clipped: Per-step boolean clip flags (``False`` where missing), or ``None``.
        num_clip_recorded: Number of steps that record ``clipped`` (the clip-rate denominator).
        method: The method analysed, as ``stats()`` names its transform (``"autoclip"``,
            ``"clip_by_global_norm"``, ...), ``"skip_wrapper"`` for a skip wrapper of unknown
            kind, or ``None`` when it was neither given nor readable (a fixed ``max_norm`` is
            then assumed).
        diverging: Whether the run looks divergent (norms trending upward without bound, or
            a history ending in NaN/inf after finite norms).
        max_consecutive_skips: For a skip wrapper, the longest run of consecutive skipped
            steps (the larger of the recorded ``consecutive_skips`` and the runs of
            ``clipped``); ``None`` for other methods.

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
        >>> d.clip_rate is None, d.nonfinite_count, d.diverging, d.method is None
        (True, 0, True, True)
        >>> print(d)
        Gradient-norm diagnosis over 100 steps
          method:             unknown, not given or read (assuming a fixed max_norm)
          norm percentiles:   p50=11.89  p90=86.07  p99=134.4
          clip rate:          n/a (no "clipped" recorded)
          threshold:          n/a
          non-finite norms:   0
          suggested max_norm: 3.909 (of the early steps, before the divergence)
          warnings:
            - The run is diverging: gradient norms are trending upward without bound ...
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
    method: str | None = None
    diverging: bool = False
    max_consecutive_skips: int | None = None

    def report(self) -> str:
        """Return the diagnosis as a short, human-readable multi-line report.

        Names the method analysed, then lists the norm percentiles, the clip rate (the skip
        rate for a skip wrapper), the recorded threshold (labelled by what it is: AGC's is a
        clipping ratio), the non-finite count, the suggested ``max_norm`` (labelled as a
        global-norm value where the method's own threshold is something else, and as taken
        from the early steps when the run diverges) and the warnings (wrapped to 80
        columns), or ``warnings: none``.

        Returns:
            The report as a string (no trailing newline).

        Examples:
            >>> from optaxclip import diagnose
            >>> hist = [{"norm": n, "threshold": 3.0, "clipped": n > 3.0}
            ...         for n in [1.0, 2.0, 1.5, 4.0]]
            >>> print(diagnose(hist).report())
            Gradient-norm diagnosis over 4 steps
              method:             unknown, not given or read (assuming a fixed max_norm)
              norm percentiles:   p50=1.75  p90=3.4  p99=3.94
              clip rate:          25.0% (1 of 4 steps)
              threshold:          3
              non-finite norms:   0
              suggested max_norm: 4.7...
              warnings: none
            >>> print(diagnose(hist, method="adaptive_grad_clip").report())
            Gradient-norm diagnosis over 4 steps
              method:             adaptive_grad_clip (AGC: clips often by design)
              norm percentiles:   p50=1.75  p90=3.4  p99=3.94
              clip rate:          25.0% (1 of 4 steps)
              clipping ratio:     3 (update-to-weight norm ratio, not a norm)
              non-finite norms:   0
              suggested max_norm: 4.7... (global norm, for clip_by_global_norm)
              warnings: none
        """
        method = self.method
        skip = method in _SKIP_METHODS
        pct = "  ".join(f"p{q}={_fmt(v)}" for q, v in self.percentiles.items())
        if self.clip_rate is None:
            rate = 'n/a (no "clipped" recorded)'
        else:
            n_clip = int(self.clipped.sum()) if self.clipped is not None else 0
            what = "skipped" if skip else "steps"
            rate = f"{100 * self.clip_rate:.1f}% ({n_clip} of {self.num_clip_recorded} {what}"
            if skip and self.max_consecutive_skips is not None:
                rate += f"; longest run {self.max_consecutive_skips}"
            rate += ")"
        thr_label, thr_note = _THRESHOLD_LABELS.get(method, ("threshold", ""))
        thr = _fmt(self.threshold) + (thr_note if self.threshold is not None else "")
        sugg = _fmt(self.suggested_max_norm)
        notes = []
        if method is not None and method != "clip_by_global_norm":
            notes.append("global norm, for clip_by_global_norm")
        if self.diverging:
            notes.append("of the early steps, before the divergence")
        if notes and math.isfinite(self.suggested_max_norm):
            sugg += f" ({'; '.join(notes)})"
        lines = [
            f"Gradient-norm diagnosis over {self.num_steps} steps",
            _row("method", _DESCRIPTIONS.get(method, str(method))),
            _row("norm percentiles", pct),
            _row("skip rate" if skip else "clip rate", rate),
            _row(thr_label, thr),
            _row("non-finite norms", str(self.nonfinite_count)),
            _row("suggested max_norm", sugg),
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

        Draws the finite norms against the step, the recorded per-step threshold (dashed;
        not for AGC, whose threshold is a ratio, not a norm), the suggested ``max_norm``
        (dotted horizontal line), red crosses on clipped (for a skip wrapper: skipped) steps
        and black triangles along the top edge at steps whose norm was NaN/inf. matplotlib is
        imported lazily; any backend works, including ``Agg``.

        Args:
            ax: A matplotlib ``Axes`` to draw into; if ``None`` a new figure and axes are made.

        Returns:
            The matplotlib ``Axes`` drawn into.

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
        if (
            self.thresholds is not None
            and np.isfinite(self.thresholds).any()
            and self.method not in _RATIO_THRESHOLDS
        ):
            label = _THRESHOLD_LABELS.get(self.method, ("threshold", ""))[0]
            ax.plot(steps, self.thresholds, ls="--", lw=1.2, color="C1", label=label)
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
                    label="skipped" if self.method in _SKIP_METHODS else "clipped",
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
        ax.set_title(
            "Gradient-norm history" + (f" ({self.method})" if self.method is not None else "")
        )
        ax.legend(loc="best", fontsize="small")
        return ax


def _prefix_method(prefix: str) -> str | None:
    """The method a key prefix such as ``"skip_nonfinite/0/zclip/"`` names, or None."""
    parts = prefix.rstrip("/").split("/")
    name = re.sub(r"#\d+$", "", parts[-1]) if parts else ""
    return name if name in _METHODS else None


def _split_prefix(keys: Sequence[Any], method: str | None = None) -> str:
    """Return the key prefix ("" for bare keys) under which the norm is stored.

    Bare keys win; otherwise the first key ending in ``/norm`` whose prefix names
    ``method`` (when one is given), else the first key ending in ``/norm``.
    """
    if "norm" in keys:
        return ""
    prefixes = [k[: -len("norm")] for k in keys if isinstance(k, str) and k.endswith("/norm")]
    if method is not None:
        wanted = _SKIPS if method == _ANY_SKIP else (method,)
        for prefix in prefixes:
            if _prefix_method(prefix) in wanted:
                return prefix
    if prefixes:
        return prefixes[0]
    raise ValueError(
        "history has no norm: expected a 'norm' key (or a prefixed key ending in '/norm', "
        f"as stats() returns for several clip transforms); got keys {list(keys)!r}"
    )


def _from_columns(history: Mapping[str, Any], method: str | None) -> dict[str, Any]:
    prefix = _split_prefix(list(history.keys()), method)
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
        "prefix": prefix,
        "norms": norms,
        "steps": column("count", float),
        "thresholds": column("threshold", float),
        "clipped": clipped,
        "clip_known": n if clipped is not None else 0,
        "nonfinite_counts": column("nonfinite_count", float),
        "consecutive_skips": column("consecutive_skips", float),
    }


def _from_records(records: Sequence[Mapping[str, Any]], method: str | None) -> dict[str, Any]:
    prefix = _split_prefix(list(records[0].keys()), method)
    n = len(records)
    norms = np.empty(n)
    steps = np.full(n, np.nan)
    thresholds = np.full(n, np.nan)
    clipped = np.zeros(n, dtype=bool)
    nonfinite = np.full(n, np.nan)
    skips = np.full(n, np.nan)
    has_steps = has_thr = has_nonfinite = has_skips = False
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
        if prefix + "consecutive_skips" in rec:
            skips[i] = _to_float(rec[prefix + "consecutive_skips"])
            has_skips = True
    return {
        "prefix": prefix,
        "norms": norms,
        "steps": steps if has_steps and np.isfinite(steps).all() else None,
        "thresholds": thresholds if has_thr else None,
        "clipped": clipped if clip_known else None,
        "clip_known": clip_known,
        "nonfinite_counts": nonfinite if has_nonfinite else None,
        "consecutive_skips": skips if has_skips else None,
    }


def _parse(history: Any, method: str | None = None) -> dict[str, Any]:
    if isinstance(history, Mapping):
        return _from_columns(history, method)
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
            return _from_records(items, method)
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
        "prefix": "",
        "norms": norms,
        "steps": None,
        "thresholds": None,
        "clipped": None,
        "clip_known": 0,
        "nonfinite_counts": None,
        "consecutive_skips": None,
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


def _check_method(method: Any) -> str | None:
    """``method`` as given to :func:`diagnose`, validated (case-insensitive)."""
    if method is None:
        return None
    name = method.strip().lower() if isinstance(method, str) else None
    if name not in _ACCEPTED:
        raise ValueError(
            f"unknown method {method!r}: expected one of {', '.join(_ACCEPTED)} (the names "
            "stats() gives the transforms; 'skip_wrapper' for a skip wrapper of either kind), "
            "or None to read it from the history"
        )
    return name


def _read_method(parsed: dict[str, Any]) -> str | None:
    """The method the history's keys name, or None."""
    method = _prefix_method(parsed["prefix"]) if parsed["prefix"] else None
    if method is None and parsed["consecutive_skips"] is not None:
        # Only the skip wrappers record consecutive_skips; skip_nonfinite's threshold is
        # always inf, so a finite one comes from skip_spikes.
        thr = parsed["thresholds"]
        method = "skip_spikes" if thr is not None and np.isfinite(thr).any() else _ANY_SKIP
    return method


def _cap_bound(thresholds: np.ndarray | None, clipped: np.ndarray | None) -> float | None:
    """The fixed cap most clipped steps were clipped at (their threshold is the largest
    finite one recorded), or None when the clipping came from the adaptive rule."""
    if thresholds is None or clipped is None:
        return None
    finite = np.isfinite(thresholds)
    on = np.asarray(clipped, dtype=bool) & finite
    if not on.any():
        return None
    cap = float(thresholds[finite].max())
    share = float(np.isclose(thresholds[on], cap, rtol=1e-6, atol=0.0).mean())
    return cap if share > 0.5 else None


def _early_part(finite: np.ndarray) -> np.ndarray:
    """The healthy early part of a diverging run's finite norms (in step order).

    The first quarter; while that still grows (the median of its second half is at least
    ``_TREND_FACTOR x`` that of its first half), the first quarter of that, and so on.
    """
    early = finite[: max(1, -(-finite.size // 4))]
    while early.size >= 2:
        half = early.size // 2
        first, second = float(np.median(early[:half])), float(np.median(early[half:]))
        if not (first > 0 and second >= _TREND_FACTOR * first):
            break
        early = early[: max(1, -(-early.size // 4))]
    return early


def _nonfinite_tail(norms: np.ndarray) -> int:
    """How many non-finite norms end the history after a finite one (0 if none)."""
    finite_at = np.flatnonzero(np.isfinite(norms))
    if finite_at.size == 0:
        return 0
    return int(norms.size - 1 - finite_at[-1])


def _frequent_clip_warning(
    method: str | None,
    clip_rate: float,
    sugg_txt: str | None,
    diverging: bool,
    thresholds: np.ndarray | None,
    clipped: np.ndarray | None,
    percentiles: dict[int, float],
) -> str | None:
    """The warning for clipping on more than half the steps, as fits the method."""
    pct = f"{100 * clip_rate:.0f}%"
    if method in ("autoclip", "adagc", "adaptive_grad_clip", "spike_aware_clip"):
        return None  # adaptive clips clip often by design
    if method in _SKIP_METHODS or method in _RECORD_ONLY:
        return None  # skips have their own rule; a monitor never clips
    if method == "zclip":
        cap = _cap_bound(thresholds, clipped)
        if cap is not None:
            return (
                f"ZClip clipped the gradient on {pct} of steps, and on most of them at the "
                f"same threshold, {_fmt(cap)}: its fixed max_norm cap (or warm-up bound), not "
                "its z-score rule. The cap is meant as a safety bound above the typical norm, "
                f"but the median norm is {_fmt(percentiles[50])}, so ZClip is acting as a "
                "fixed clip on nearly every step, which can hide a problem with the learning "
                "rate, the initialisation or the data. Check those first (try a lower "
                "learning rate or a warmup, and look at the raw loss curve)."
            )
        return (
            f"ZClip clipped the gradient on {pct} of steps by its z-score rule, i.e. it saw "
            "a spike on most steps. A steady run has spikes on a few percent of steps, so "
            "the norms are rising faster than the EMA (alpha) follows or are very "
            "heavy-tailed: something other than the clip is wrong. Check the learning rate "
            "(try a lower one or a warmup), the loss curve and the data; raising z_thresh "
            "would only hide the symptom."
        )
    if method in _BOUND_PARAMS:
        advice = (
            f" If the run is otherwise healthy, raise {_BOUND_PARAMS[method]}; diagnose sees "
            "only the global norm, so it cannot suggest a value for it"
            + (f" (a clip_by_global_norm max_norm would be about {sugg_txt})." if sugg_txt else ".")
        )
    elif sugg_txt:
        advice = (
            f" If the run is otherwise healthy, raise max_norm to about {sugg_txt}, just "
            "above the typical norm."
        )
    else:
        advice = ""
    if diverging:
        advice = ""  # the divergence warning says what to do; a larger clip would not help
    hint = (
        " (If these stats come from an adaptive clip such as autoclip, which clips often by "
        'design, say so: diagnose(history, method="autoclip").)'
        if method is None
        else ""
    )
    return (
        f"The gradient was clipped on {pct} of steps, i.e. nearly every "
        "step: the clip is doing the optimizer's job and is likely hiding a problem with "
        "the learning rate, the initialisation or the data. Check those first (try a "
        "lower learning rate or a warmup, and look at the raw loss curve)." + advice + hint
    )


def _skip_warning(
    method: str, skip_rate: float | None, skip_known: int, longest: int, n_skipped: int
) -> str | None:
    """The warning for a skip wrapper that skips often enough to stall the run."""
    frequent = (
        skip_rate is not None
        and skip_known >= _MIN_STEPS_FREQUENT
        and skip_rate > _FREQUENT_SKIP_RATE
    )
    if not frequent and longest < _LONG_SKIP_RUN:
        return None
    rate = f"{100 * skip_rate:.0f}% of steps" if skip_rate is not None else "steps"
    if method == "skip_nonfinite":
        cause = (
            "skip_nonfinite skips only NaN/inf gradients, so find where they come from "
            "(jax.config.update('jax_debug_nans', True); log(0), division by zero or "
            "low-precision overflow in the loss; a learning rate that is too high)."
        )
    elif method == "skip_spikes":
        cause = (
            "skip_spikes skips NaN/inf gradients and norms far above its recent window "
            "(mean + num_sigmas * std): look at the losses of the skipped steps. If they are "
            "not bad batches, the norms are rising or heavier-tailed than the window allows, "
            "which usually means the learning rate is too high."
        )
    else:
        cause = (
            "A skip wrapper skips NaN/inf gradients (and, for skip_spikes, norms far above "
            "its recent window): find where they come from (jax_debug_nans; the data; the "
            "learning rate)."
        )
    return (
        f"The skip wrapper skipped {rate} ({n_skipped} of {skip_known}; longest run of "
        f"consecutive skips: {longest}). A skipped step does not train, so a run that skips "
        "this often is stalling rather than being shielded from rare bad batches. "
        + cause
        + " Set max_consecutive_skips on the wrapper so that a run which stops training "
        "raises instead of silently going on."
    )


def diagnose(history: Any, method: str | None = None) -> Diagnosis:
    """Diagnose a gradient-norm history: percentiles, clip rate, a threshold and warnings.

    ``history`` is what you collected from ``optaxclip.stats(opt_state)`` during training, in
    any of these forms:

    * a sequence of per-step ``stats()`` dicts holding any subset of their keys, at least
      ``norm`` (``count``, ``threshold``, ``clipped``, ``nonfinite_count`` and
      ``consecutive_skips`` are used when present). Values may be Python/NumPy scalars or 0-d
      JAX arrays;
    * a dict of columns, e.g. ``{"norm": array, "clipped": array}`` (a scalar ``threshold``
      is broadcast to every step);
    * a 1-D array (or list) of norms; ``clip_rate`` is then ``None``.

    Prefixed keys: if there is no bare ``"norm"`` key (several clip transforms give keys such
    as ``"0/clip_by_global_norm/norm"``), the first key ending in ``"/norm"`` is used (with
    ``method`` given, the first whose prefix names that method) and the other keys are read
    under the same prefix (``"0/clip_by_global_norm/clipped"``, ...). To diagnose another
    transform, select its keys yourself first.

    The advice fits the method that produced the history. ``method`` names it; without it,
    the method is read from the prefix (its last component before the field name, e.g.
    ``"autoclip"`` in ``"skip_spikes/autoclip/norm"``), or a bare ``consecutive_skips`` key
    marks a skip wrapper; a history with bare keys otherwise does not say (``stats()`` of a
    single clipping transform), and a fixed ``max_norm`` is assumed. The report names the
    method analysed. An adaptive clip (``autoclip``, ``adagc``, ``adaptive_grad_clip``)
    clips often by design and gets no advice about its clip rate; ZClip's clip rate is
    judged by its z-score rule and cap, never with advice to raise a ``max_norm``; AGC's
    threshold is reported as the clipping ratio it is; for a skip wrapper ``clipped`` means
    skipped and frequent skipping is called a stall. The module docstring gives every rule.

    Non-finite norms are excluded from the percentiles and the suggestion and counted in
    ``nonfinite_count``. The clip rate is the fraction of the steps recording ``clipped`` on
    which it was true. The suggested ``max_norm`` (a global-norm threshold, the
    ``max_norm`` of ``clip_by_global_norm``) is ``1.25 x`` the 95th percentile of the
    positive finite norms after dropping log-space spikes above ``median + 3 * MAD`` over the
    whole history passed in (pass ``history[-1000:]`` to focus on the recent range). A run
    whose quarter medians rise to ``4 x``, or whose history ends in NaN/inf after finite
    norms, is called diverging, and its suggestion is taken from its healthy early part (the
    first quarter of the finite norms, narrowed further while that part still grows), never
    from the diverged tail. The other warning
    rules (clipping on more than half the steps, no clipping in 100+ steps with the
    threshold above ``2 x`` p99, NaN/inf seen, all-zero gradients) are listed in the module
    docstring.

    Args:
        history: A sequence of ``stats()`` dicts, a dict of columns, or a 1-D array of norms.
        method: The transform that produced the history, as ``stats()`` names it:
            ``"clip_by_global_norm"``, ``"clip_by_block_norm"``, ``"clip_by_block_rms"``,
            ``"clip_by_value"``, ``"adaptive_grad_clip"``, ``"autoclip"``, ``"zclip"``,
            ``"adagc"``, ``"skip_nonfinite"``, ``"skip_spikes"`` (or ``"skip_wrapper"`` for
            a skip wrapper of either kind); case-insensitive. It wins over what the keys
            say. ``None`` (the default) reads it from the history.

    Returns:
        A :class:`Diagnosis` with ``method``, ``percentiles``, ``clip_rate``,
        ``nonfinite_count``, ``suggested_max_norm``, ``warnings``, ``diverging`` and the
        parsed history; print it for a report, call ``.plot()`` for a figure.

    Raises:
        ValueError: If the history is empty, carries no norm, or is malformed, or if
            ``method`` is not one of the names above.

    References:
        Pascanu, Mikolov and Bengio, 2013, "On the difficulty of training recurrent neural
        networks", https://arxiv.org/abs/1211.5063 (clip to a threshold set from the norms
        observed in training).
        Zhang, He, Sra and Jadbabaie, 2020, "Why gradient clipping accelerates training: a
        theoretical justification for adaptivity", https://arxiv.org/abs/1905.11881.
        Seetharaman et al., 2020, "AutoClip: Adaptive Gradient Clipping for Source
        Separation Networks", https://arxiv.org/abs/2007.14469 (clipping at a low
        percentile of past norms, so on most steps).

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
          method:             unknown, not given or read (assuming a fixed max_norm)
          norm percentiles:   p50=1.004  p90=1.19  p99=1.2
          clip rate:          23.5% (47 of 200 steps)
          threshold:          1.15
          non-finite norms:   1
          suggested max_norm: 1.497
          warnings:
            - 1 of 200 steps (0.5%) had a non-finite (NaN or inf) gradient norm. ...

        AutoClip at the 10th percentile clips about 90% of steps by design, and the method
        can be read from ``stats()``'s prefixed keys or given:

        >>> rng = np.random.default_rng(0)
        >>> norms = np.exp(0.3 * rng.normal(size=300))
        >>> thr = [np.percentile(norms[: i + 1], 10) for i in range(300)]
        >>> auto = {"autoclip/norm": norms, "autoclip/threshold": thr,
        ...         "autoclip/clipped": norms > thr}
        >>> d = diagnose(auto)
        >>> d.method, round(d.clip_rate, 2), d.warnings
        ('autoclip', 0.87, [])
        >>> diagnose({"norm": norms, "clipped": norms > thr}, method="autoclip").warnings
        []
    """
    given = _check_method(method)
    parsed = _parse(history, given)
    method = given if given is not None else _read_method(parsed)
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

    max_skips: int | None = None
    if method in _SKIP_METHODS:
        max_skips = _longest_run(clipped) if clipped is not None else 0
        recorded = parsed["consecutive_skips"]
        if recorded is not None and np.isfinite(recorded).any():
            max_skips = max(max_skips, int(recorded[np.isfinite(recorded)].max()))

    rising, ratio = _trend(finite)
    tail = _nonfinite_tail(norms)
    nan_tail = tail >= _MIN_NONFINITE_TAIL
    diverging = rising or nan_tail
    early = _early_part(finite) if diverging else finite
    suggested = _suggest_max_norm(early)
    steps = parsed["steps"]
    if steps is None:
        steps = np.arange(n)
    sugg_txt = _fmt(suggested) if math.isfinite(suggested) else None

    warnings: list[str] = []
    if nonfinite_count and not nan_tail:
        if finite.size == 0:
            warnings.append(
                f"Every one of the {n} gradient norms is NaN or inf, so nothing else can be "
                "judged. Training has diverged or the loss is broken: look for the first "
                "non-finite value (jax.config.update('jax_debug_nans', True)), check the data "
                "and the loss for log(0), division by zero or low-precision overflow, and "
                "lower the learning rate."
            )
        elif method in _SKIP_METHODS:
            warnings.append(
                f"{nonfinite_count} of {n} steps ({100 * nonfinite_count / n:.1f}%) had a "
                "non-finite (NaN or inf) gradient norm. The skip wrapper kept them from the "
                "weights, but each one is a lost step and a sign of trouble: find the cause "
                "(enable jax_debug_nans; check the data and the loss for log(0), division by "
                "zero or low-precision overflow; lower the learning rate if they keep "
                "appearing)."
            )
        else:
            warnings.append(
                f"{nonfinite_count} of {n} steps ({100 * nonfinite_count / n:.1f}%) had a "
                "non-finite (NaN or inf) gradient norm. Clipping cannot repair a NaN: skip "
                "such updates (optaxclip.skip_nonfinite or optax.apply_if_finite), and find "
                "the cause (enable jax_debug_nans; check the data and the loss for log(0), "
                "division by zero or low-precision overflow; lower the learning rate if they "
                "keep appearing)."
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
        msg = _frequent_clip_warning(
            method, clip_rate, sugg_txt, diverging, thresholds, clipped, percentiles
        )
        if msg:
            warnings.append(msg)
    if (
        (method is None or method in _FIXED)
        and clip_rate == 0.0
        and clip_known >= _MIN_STEPS_NEVER
        and threshold is not None
        and finite.size
        and threshold > _LOOSE_FACTOR * percentiles[99]
    ):
        if method in _BOUND_PARAMS:
            param = _BOUND_PARAMS[method]
            warnings.append(
                f"The gradient was never clipped in {clip_known} steps, and the bound "
                f"({_fmt(threshold)}) is {threshold / percentiles[99]:.1f}x the 99th "
                f"percentile of the global norm ({_fmt(percentiles[99])}), which no block's "
                "norm or RMS and no element ever exceeds, so it is too loose to protect "
                f"against a spike. Lower {param} to just above the typical size of what it "
                "bounds, so that only rare spikes are clipped; diagnose sees only the "
                "global norm, so it cannot suggest a value for it."
            )
        else:
            advice = f" Lower max_norm to about {sugg_txt}" if sugg_txt else " Lower max_norm"
            warnings.append(
                f"The gradient was never clipped in {clip_known} steps, and the threshold "
                f"({_fmt(threshold)}) is {threshold / percentiles[99]:.1f}x the 99th "
                f"percentile of the norms ({_fmt(percentiles[99])}), so it is too loose to "
                "protect against a spike." + advice + ", just above the typical range, so "
                "that only rare spikes are clipped."
            )
    if method in _SKIP_METHODS:
        n_skipped = int(clipped.sum()) if clipped is not None else 0
        msg = _skip_warning(method, clip_rate, clip_known, max_skips or 0, n_skipped)
        if msg:
            warnings.append(msg)
    if diverging:
        reasons = []
        if rising:
            reasons.append(
                f"gradient norms are trending upward without bound (the median norm grew "
                f"{ratio:.1f}x from the first to the last quarter of the history and rose in "
                "every quarter)"
            )
        if nan_tail:
            reasons.append(
                f"the history ends in {tail} steps with a non-finite (NaN or inf) gradient "
                f"norm after finite ones ({nonfinite_count} of {n} steps in all)"
            )
        sugg_note = (
            f" The suggested max_norm ({sugg_txt}) is taken from the first {early.size} "
            "finite norms, before the divergence; a max_norm fitted to the diverged tail "
            "would protect nothing."
            if sugg_txt
            else ""
        )
        warnings.append(
            "The run is diverging: "
            + "; and ".join(reasons)
            + ". Clipping cannot fix this, and a larger max_norm would only let it run away. "
            "Lower the learning rate (or add warmup or decay), "
            + ("look for the first non-finite value (jax_debug_nans), " if nan_tail else "")
            + "and check for growing weights or activations (weight decay, normalisation "
            "layers) and for loss-scale problems." + sugg_note
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
        method=method,
        diverging=diverging,
        max_consecutive_skips=max_skips,
    )
