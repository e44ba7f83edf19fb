"""The one list of optaxclip's transforms, for the tests and the benchmarks.

Every public transform has an entry here, and the conformance tests
(``tests/test_conformance.py`` and the files it names) run each entry through the ways
users run an optimizer: eager ``init`` and donated ``jax.jit`` steps, ``nnx.Optimizer``
under ``nnx.jit``, ``lax.scan``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
Orbax, 8 devices and 2 processes. ``tests/test_conformance.py`` fails when a public
transform has no entry, so a new transform is covered the day it is added: adding one
means one module, one test module and one entry below.

An entry's ``kwargs`` use short warm-ups, windows and tight thresholds so that a few
dozen steps on small test models exercise the adaptive parts (ring buffers wrap, EMAs
start, spikes are caught); ``defaults`` is what a user would write for real training,
which is what the benchmarks build.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

from optaxclip._adagc import adagc
from optaxclip._agc import adaptive_grad_clip
from optaxclip._autoclip import autoclip
from optaxclip._block import clip_by_block_norm, clip_by_block_rms
from optaxclip._global import clip_by_global_norm
from optaxclip._monitor import monitor
from optaxclip._skip import skip_nonfinite, skip_spikes
from optaxclip._spike_aware import spike_aware_clip
from optaxclip._value import clip_by_value
from optaxclip._zclip import zclip

__all__ = ["Entry", "ENTRIES", "BY_NAME", "NAMES"]


def _adamw() -> optax.GradientTransformation:
    return optax.adamw(1e-2, weight_decay=1e-4)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One transform as the tests and benchmarks build it.

    Attributes:
      name: a unique name (the factory's name, with a suffix where one factory has
        several entries, e.g. ``autoclip_window`` and ``autoclip_sketch``).
      factory: the public factory.
      kwargs: arguments for short test runs (short warm-ups, tight thresholds).
      defaults: arguments for a real training run (required ones only, and those that
        pick this entry's variant); the factory's defaults do the rest.
      knob: the threshold-like argument that ``build(scale=...)`` multiplies, and that
        ``optax.inject_hyperparams`` exposes as a hyperparameter.
      static: the arguments that size the state (``static_args`` of
        ``optax.inject_hyperparams``).
      wraps: True for the skip wrappers, which wrap the optimizer instead of preceding it.
      clips: False for a transform that only records (``monitor``): it never clips or
        skips, so its ``clip_count`` stays 0.
    """

    name: str
    factory: Callable[..., optax.GradientTransformationExtraArgs]
    kwargs: dict[str, Any]
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    knob: str | None = None
    static: tuple[str, ...] = ()
    wraps: bool = False
    clips: bool = True

    def build(
        self, scale: float = 1.0, inner: Any = None, *, defaults: bool = False, **extra: Any
    ) -> optax.GradientTransformationExtraArgs:
        """The transform alone (a skip wrapper wraps ``inner``, default AdamW).

        Args:
          scale: multiplies the ``knob`` argument.
          inner: the optimizer a skip wrapper wraps (ignored by the others).
          defaults: build with ``defaults`` instead of the short-run ``kwargs``.
          **extra: more arguments for the factory (``axis_name``, ``sharded``...).

        Returns:
          The transform.
        """
        kwargs = dict(self.defaults if defaults else self.kwargs)
        if self.knob is not None and self.knob in kwargs and scale != 1.0:
            kwargs[self.knob] = kwargs[self.knob] * scale
        kwargs.update(extra)
        if self.wraps:
            return self.factory(_adamw() if inner is None else inner, **kwargs)
        return self.factory(**kwargs)

    def optimizer(
        self, scale: float = 1.0, inner: Any = None, *, defaults: bool = False, **extra: Any
    ) -> optax.GradientTransformationExtraArgs:
        """A whole optimizer: ``chain(transform, inner)``, or ``transform(inner)``."""
        inner = _adamw() if inner is None else inner
        tx = self.build(scale, inner, defaults=defaults, **extra)
        return tx if self.wraps else optax.chain(tx, inner)

    def injected(self, inner: Any = None) -> optax.GradientTransformationExtraArgs:
        """The transform built through ``optax.inject_hyperparams``."""
        factory = optax.inject_hyperparams(self.factory, static_args=self.static)
        if self.wraps:
            return factory(_adamw() if inner is None else inner, **self.kwargs)
        return factory(**self.kwargs)


ENTRIES: tuple[Entry, ...] = (
    Entry(
        "clip_by_global_norm",
        clip_by_global_norm,
        {"max_norm": 0.5},
        {"max_norm": 1.0},
        knob="max_norm",
    ),
    Entry(
        "clip_by_value",
        clip_by_value,
        {"max_delta": 0.05},
        {"max_delta": 0.1},
        knob="max_delta",
    ),
    Entry(
        "clip_by_block_norm",
        clip_by_block_norm,
        {"max_norm": 0.3},
        {"max_norm": 1.0},
        knob="max_norm",
    ),
    Entry(
        "clip_by_block_rms",
        clip_by_block_rms,
        {"threshold": 0.05},
        {"threshold": 1.0},
        knob="threshold",
    ),
    Entry(
        "adaptive_grad_clip",
        adaptive_grad_clip,
        {"clipping": 0.02, "eps": 1e-3},
        {"clipping": 0.01},
        knob="clipping",
        static=("axis", "stacked_axes"),
    ),
    Entry(
        "autoclip_window",
        autoclip,
        {"percentile": 25.0, "history": 6, "warmup_steps": 2},
        {"percentile": 10.0, "history": 1000},
        knob="percentile",
        static=("history", "warmup_steps"),
    ),
    Entry(
        "autoclip_sketch",
        autoclip,
        {"percentile": 25.0, "warmup_steps": 2},
        {"percentile": 10.0},
        knob="percentile",
        static=("history", "warmup_steps"),
    ),
    Entry(
        "zclip",
        zclip,
        {"alpha": 0.9, "z_thresh": 1.0, "max_norm": 10.0, "warmup_steps": 3},
        knob="z_thresh",
        static=("warmup_steps",),
    ),
    Entry(
        "adagc",
        adagc,
        {"ratio": 1.01, "beta": 0.9, "warmup_steps": 3, "warmup_max_norm": 1.0},
        knob="ratio",
        static=("warmup_steps",),
    ),
    Entry(
        "spike_aware_clip",
        spike_aware_clip,
        # A ratio of 2 to an EMA (decay 0.9) of g**2 after a 2-step warm-up clips the
        # coordinates of the test runs' spikes, and some ordinary ones.
        {"threshold": 2.0, "beta": 0.9, "warmup_steps": 2},
        knob="threshold",
    ),
    Entry("monitor", monitor, {}, clips=False),
    Entry("monitor_per_leaf", monitor, {"per_leaf": True}, {"per_leaf": True}, clips=False),
    Entry("skip_nonfinite", skip_nonfinite, {}, wraps=True),
    Entry(
        "skip_spikes",
        skip_spikes,
        {"window": 6, "min_history": 3, "num_sigmas": 1.5},
        knob="num_sigmas",
        static=("window", "min_history", "max_consecutive_skips"),
        wraps=True,
    ),
)

BY_NAME: dict[str, Entry] = {entry.name: entry for entry in ENTRIES}
NAMES: list[str] = [entry.name for entry in ENTRIES]
