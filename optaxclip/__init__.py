"""optaxclip: robust, observable and adaptive gradient clipping for JAX and Optax."""

from optaxclip._adagc import AdagcState, adagc
from optaxclip._agc import AdaptiveGradClipState, adaptive_grad_clip
from optaxclip._autoclip import AutoclipState, autoclip
from optaxclip._block import (
    ClipByBlockNormState,
    ClipByBlockRmsState,
    clip_by_block_norm,
    clip_by_block_rms,
)
from optaxclip._diagnose import Diagnosis, diagnose
from optaxclip._global import (
    ClipByGlobalNormState,
    clip_by_global_norm,
    clip_tree_by_global_norm,
)
from optaxclip._monitor import MonitorState, monitor
from optaxclip._multisteps import skip_nonfinite_microbatch
from optaxclip._norms import block_norms, global_norm, unitwise_norm
from optaxclip._per_example import per_example_global_norm_clip, per_example_layer_norm_clip
from optaxclip._skip import SkipNonfiniteState, SkipSpikesState, skip_nonfinite, skip_spikes
from optaxclip._spike_aware import SpikeAwareClipState, spike_aware_clip
from optaxclip._stats import ClipStats, stats
from optaxclip._value import ClipByValueState, clip_by_value
from optaxclip._zclip import ZclipState, zclip

__version__ = "0.1.0"

__all__ = [
    "AdagcState",
    "AutoclipState",
    "ZclipState",
    "adagc",
    "autoclip",
    "zclip",
    "AdaptiveGradClipState",
    "adaptive_grad_clip",
    "SkipNonfiniteState",
    "SkipSpikesState",
    "skip_nonfinite",
    "skip_spikes",
    "SpikeAwareClipState",
    "spike_aware_clip",
    "MonitorState",
    "monitor",
    "per_example_global_norm_clip",
    "per_example_layer_norm_clip",
    "skip_nonfinite_microbatch",
    "ClipByBlockNormState",
    "ClipByBlockRmsState",
    "ClipByValueState",
    "clip_by_block_norm",
    "clip_by_block_rms",
    "clip_by_value",
    "ClipByGlobalNormState",
    "ClipStats",
    "Diagnosis",
    "diagnose",
    "block_norms",
    "clip_by_global_norm",
    "clip_tree_by_global_norm",
    "global_norm",
    "stats",
    "unitwise_norm",
]
