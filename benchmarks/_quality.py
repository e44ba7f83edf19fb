"""Which clipping method trains best? ``python -m benchmarks --only quality [--quick]``.

Two small character-level language models a reader will recognise, a causal
transformer (2 layers, d = 64) and an LSTM (1 layer), learn to predict the next
character of Python's own standard-library sources (a fixed list of files that ships
with every Python, the last 10% held out for validation). Each is trained with no
clipping, with every transform in :data:`optaxclip._catalog.ENTRIES` built with the
defaults a user would write, with ``optax.clip_by_global_norm(1.0)``, and with two
update-clipping recipes (a clip placed after Adam's preconditioner instead of before
the optimizer), under AdamW and SGD with momentum, over a learning-rate sweep, on
clean data and with injected bad batches (one, and a cluster of four), for several
seeds. Per cell: final validation loss, divergence, whether the loss recovered after
the bad batches, clip and skip rates, time.

One program is compiled per (model, optimizer, method): every learning rate, condition
and seed of that group is one ``jax.vmap`` lane of a ``lax.scan`` over the training
steps, so compile time is paid once per group and the runs share the machine's cores.
The learning rate, the seed and the bad-batch pattern are traced arguments.

Results: ``<out>/[quick_]quality.json``, ``quality.md``, ``quality_lr.png`` (final
validation loss against the learning rate) and ``quality_curves_<model>_<optimizer>.png``
(training-loss curves per method).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import pathlib
import sysconfig
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip
from benchmarks import _report
from optaxclip import _catalog
from optaxclip import _stats as clipstats

# ---------------------------------------------------------------------------- data

# Files that exist, as single modules, in every CPython from 3.10 on (pathlib, for one,
# became a package in 3.13, so it is not here). Their order fixes the text.
STDLIB_FILES = (
    "argparse.py",
    "dataclasses.py",
    "functools.py",
    "contextlib.py",
    "statistics.py",
    "random.py",
    "fractions.py",
    "textwrap.py",
    "heapq.py",
    "string.py",
)

# Newline and printable ASCII get their own ids; anything else (tabs, non-ASCII in
# docstrings) shares id 0. 97 symbols in all.
_ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB = len(_ALPHABET) + 1
VALID_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The encoded text: training and validation ids, and where they came from."""

    train: np.ndarray
    valid: np.ndarray
    files: tuple[str, ...]
    chars: int
    sha256: str


def load_corpus(files: Sequence[str] = STDLIB_FILES) -> Corpus:
    """The standard library's sources as character ids, the last 10% held out.

    Reads the files of *this* Python (``sysconfig.get_paths()["stdlib"]``); their
    digest goes into the results, since a different Python version has slightly
    different sources.
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"the quality benchmark reads {missing} from {root}")
    text = "".join((root / f).read_text(encoding="utf-8") for f in files)
    table = np.zeros(128, np.int32)
    table[[ord(c) for c in _ALPHABET]] = np.arange(1, VOCAB, dtype=np.int32)
    codes = np.frombuffer(text.encode("utf-8"), np.uint8)
    # Bytes >= 128 (UTF-8 pieces of non-ASCII characters) map to 0, like tabs.
    ids = np.where(codes < 128, table[np.minimum(codes, 127)], 0).astype(np.int32)
    cut = int(len(ids) * (1 - VALID_FRACTION))
    return Corpus(
        train=ids[:cut],
        valid=ids[cut:],
        files=tuple(files),
        chars=len(text),
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )


def valid_batch(corpus: Corpus, sequences: int, context: int) -> np.ndarray:
    """``sequences`` windows of ``context + 1`` ids, evenly spaced over the held-out text."""
    starts = np.linspace(0, len(corpus.valid) - context - 1, sequences).astype(np.int64)
    return np.stack([corpus.valid[s : s + context + 1] for s in starts])


def sample_batch(key: jax.Array, train: jax.Array, batch: int, context: int) -> jax.Array:
    """``batch`` random windows of ``context + 1`` ids from the training text."""
    starts = jax.random.randint(key, (batch,), 0, train.shape[0] - context - 1)
    return jax.vmap(lambda s: jax.lax.dynamic_slice(train, (s,), (context + 1,)))(starts)


# -------------------------------------------------------------------------- models


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(key, shape, jnp.float32)


def _layer_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale


@dataclasses.dataclass(frozen=True)
class Transformer:
    """A GPT-2-style causal transformer: pre-LayerNorm blocks, learned positions, GELU MLP.

    As nanoGPT with ``bias=False``: no biases in the linear layers or LayerNorms (fewer
    leaves, so every method compiles faster). Initialised as GPT-2 is (normal, std 0.02;
    the projections into the residual stream scaled by 1/sqrt(2 * layers)). Every
    layer's weights are leaves of their own, so per-tensor methods (block norms, AGC,
    AdaGC) see per-layer tensors: 16 leaves, 113k parameters.
    """

    context: int
    d: int = 64
    layers: int = 2
    heads: int = 4
    mlp: int = 4
    name: str = "transformer"

    def init(self, key: jax.Array) -> dict:
        d, keys = self.d, jax.random.split(key, 3 + 4 * self.layers)
        resid = 0.02 / math.sqrt(2 * self.layers)
        blocks = []
        for i in range(self.layers):
            k = keys[3 + 4 * i : 7 + 4 * i]
            blocks.append(
                {
                    "ln1": jnp.ones(d),
                    "qkv": _normal(k[0], (d, 3 * d), 0.02),
                    "proj": _normal(k[1], (d, d), resid),
                    "ln2": jnp.ones(d),
                    "fc1": _normal(k[2], (d, self.mlp * d), 0.02),
                    "fc2": _normal(k[3], (self.mlp * d, d), resid),
                }
            )
        return {
            "embed": _normal(keys[0], (VOCAB, d), 0.02),
            "pos": _normal(keys[1], (self.context, d), 0.01),
            "blocks": blocks,
            "ln_f": jnp.ones(d),
            "unembed": _normal(keys[2], (d, VOCAB), 0.02),
        }

    def logits(self, params: dict, tokens: jax.Array) -> jax.Array:
        b, t = tokens.shape
        h, dh = self.heads, self.d // self.heads
        x = params["embed"][tokens] + params["pos"][:t]
        causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
        for blk in params["blocks"]:
            q, k, v = jnp.split(_layer_norm(x, blk["ln1"]) @ blk["qkv"], 3, axis=-1)
            q, k, v = (a.reshape(b, t, h, dh) for a in (q, k, v))
            att = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dh)
            att = jax.nn.softmax(jnp.where(causal, att, -1e9), axis=-1)
            out = jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, self.d)
            x = x + out @ blk["proj"]
            x = x + jax.nn.gelu(_layer_norm(x, blk["ln2"]) @ blk["fc1"]) @ blk["fc2"]
        return _layer_norm(x, params["ln_f"]) @ params["unembed"]


@dataclasses.dataclass(frozen=True)
class LSTM:
    """A one-layer LSTM language model, initialised as PyTorch's ``nn.LSTM`` is.

    Uniform(+-1/sqrt(hidden)) weights, the forget-gate bias at 1 (Jozefowicz et al.
    2015), a learned embedding and a linear read-out.
    """

    context: int
    d: int = 64
    hidden: int = 128
    name: str = "lstm"

    def init(self, key: jax.Array) -> dict:
        k = jax.random.split(key, 4)
        bound = 1 / math.sqrt(self.hidden)

        def uniform(key, shape):
            return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

        bias = jnp.zeros(4 * self.hidden).at[self.hidden : 2 * self.hidden].set(1.0)
        return {
            "embed": _normal(k[0], (VOCAB, self.d), 1.0),
            "w_x": uniform(k[1], (self.d, 4 * self.hidden)),
            "w_h": uniform(k[2], (self.hidden, 4 * self.hidden)),
            "bias": bias,
            "w_out": uniform(k[3], (self.hidden, VOCAB)),
            "b_out": jnp.zeros(VOCAB),
        }

    def logits(self, params: dict, tokens: jax.Array) -> jax.Array:
        # The input projections of all positions at once; only h @ w_h is sequential.
        xs = params["embed"][tokens] @ params["w_x"] + params["bias"]

        def cell(carry, x_t):
            h, c = carry
            i, f, g, o = jnp.split(x_t + h @ params["w_h"], 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((tokens.shape[0], self.hidden))
        _, hs = jax.lax.scan(cell, (zeros, zeros), jnp.swapaxes(xs, 0, 1))
        return jnp.swapaxes(hs, 0, 1) @ params["w_out"] + params["b_out"]


def lm_loss(model: Any, params: dict, windows: jax.Array) -> jax.Array:
    """Mean next-character cross-entropy (nats) over every position of the windows."""
    logits = model.logits(params, windows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


# ---------------------------------------------------------------------- optimizers

ADAM_B1, ADAM_B2, ADAM_EPS, WEIGHT_DECAY, MOMENTUM = 0.9, 0.95, 1e-8, 0.1, 0.9


def schedule(peak: Any, steps: int) -> optax.Schedule:
    """Linear warm-up over the first 5% of the steps, then cosine decay to 10% of peak.

    ``peak`` may be a traced value: every learning rate of the sweep runs in one program.
    """
    shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, steps // 20), steps, end_value=0.1)
    return lambda count: peak * shape(count)


def _decay_mask(params: Any) -> Any:
    # Weight decay on matrices only (not on biases, LayerNorm gains), as GPT-2 and
    # nanoGPT train.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def base_optimizer(name: str, lr: Any) -> optax.GradientTransformation:
    """AdamW (b2 = 0.95, weight decay 0.1 on matrices) or SGD with momentum 0.9."""
    if name == "adamw":
        return optax.adamw(
            lr, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY, mask=_decay_mask
        )
    if name == "sgd":
        return optax.sgd(lr, momentum=MOMENTUM)
    raise ValueError(f"unknown optimizer {name!r}")


def adafactor_style_adamw(
    lr: Any, threshold: float = 1.0, clip: Callable = optaxclip.clip_by_block_rms
) -> optax.GradientTransformation:
    """AdamW whose preconditioned update is clipped per tensor to RMS <= ``threshold``.

    Adafactor's update clipping (Shazeer & Stern 2018; ``clipping_threshold`` of
    ``optax.adafactor``): the clip sits after the preconditioner and before the
    learning rate, where an RMS of 1 is the scale of a normal Adam step. (After the
    learning rate it would never act.) ``clip`` is optaxclip's ``clip_by_block_rms``,
    which gives the same results as ``optax.clip_by_block_rms`` and records
    ``ClipStats``; the TPU benchmark passes Optax's to build the counterpart.
    """
    return optax.chain(
        optax.scale_by_adam(ADAM_B1, ADAM_B2, ADAM_EPS),
        clip(threshold),
        optax.add_decayed_weights(WEIGHT_DECAY, _decay_mask),
        optax.scale_by_learning_rate(lr),
    )


def stable_adamw(lr: Any) -> optax.GradientTransformation:
    """AdamW with StableAdamW's per-tensor update clipping (Wortsman et al. 2023).

    Each tensor's step (Adam's update plus its weight decay) is divided by
    ``max(1, RMS(g / sqrt(v_hat)))``, the RMS over the tensor of the new gradient
    against the bias-corrected second moment: a gradient far larger than its history
    shrinks the whole step of that tensor, like a per-tensor learning-rate cut. The
    paper's optimizer also changes the betas' schedule; this keeps AdamW's.
    """
    adam = optax.scale_by_adam(ADAM_B1, ADAM_B2, ADAM_EPS)

    def init_fn(params):
        return adam.init(params), clipstats.init_stats()

    def update_fn(updates, state, params):
        adam_state, stats = state
        steps, adam_state = adam.update(updates, adam_state, params)
        nu = adam_state.nu
        correction = 1 - ADAM_B2 ** adam_state.count.astype(jnp.float32)

        def rms(g, v):
            return jnp.sqrt(jnp.mean(jnp.square(g) / jnp.maximum(v / correction, ADAM_EPS**2)))

        ratios = jax.tree.map(rms, updates, nu)
        masks = _decay_mask(params)
        out = jax.tree.map(
            lambda u, p, r, m: (u + WEIGHT_DECAY * p * m) / jnp.maximum(1.0, r),
            steps,
            params,
            ratios,
            masks,
        )
        worst = jnp.max(jnp.stack(jax.tree.leaves(ratios)))
        stats = clipstats.record(
            stats,
            norm=optax.tree_utils.tree_norm(updates),
            clipped_norm=optax.tree_utils.tree_norm(updates),
            threshold=jnp.asarray(1.0),
            clipped=worst > 1.0,
        )
        return out, (adam_state, stats)

    return optax.chain(
        optax.GradientTransformation(init_fn, update_fn), optax.scale_by_learning_rate(lr)
    )


# ------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Method:
    """One way to protect training: a function from (optimizer name, lr) to an optimizer.

    Attributes:
      name: as it appears in the tables.
      make: ``make(optimizer, lr) -> GradientTransformation`` (the whole optimizer).
      optimizers: the optimizers it applies to.
      kind: ``"none"``, ``"clip"`` (before the optimizer), ``"skip"`` (wraps it) or
        ``"update"`` (clips the optimizer's own update).
      fixed_threshold: for a transform without ``ClipStats``, the global-norm threshold
        from which the clip rate is computed (``optax.clip_by_global_norm``).
      description: how it is built, for the report.
    """

    name: str
    make: Callable[[str, Any], optax.GradientTransformation]
    optimizers: tuple[str, ...] = ("adamw", "sgd")
    kind: str = "clip"
    fixed_threshold: float | None = None
    description: str = ""


def _before(transform: Callable[[], optax.GradientTransformation]) -> Callable:
    return lambda opt, lr: optax.chain(transform(), base_optimizer(opt, lr))


def _catalog_method(entry: _catalog.Entry) -> Method:
    args = ", ".join(f"{k}={v!r}" for k, v in entry.defaults.items())
    if entry.wraps:
        return Method(
            entry.name,
            lambda opt, lr: entry.build(inner=base_optimizer(opt, lr), defaults=True),
            kind="skip",
            description=f"{entry.factory.__name__}(opt{', ' + args if args else ''})",
        )
    return Method(
        entry.name,
        _before(lambda: entry.build(defaults=True)),
        description=f"chain({entry.factory.__name__}({args}), opt)",
    )


def methods() -> list[Method]:
    """Every method the benchmark compares; append to extend it.

    No clipping; every transform of optaxclip's catalog that clips or skips, with the
    defaults a user would write (``Entry.defaults``; a skip wrapper wraps the
    optimizer); Optax's own ``clip_by_global_norm(1.0)``; the two update-clipping
    recipes (AdamW only); and ``optaxclip.spike_aware_clip`` with its defaults where
    this optaxclip has it and the catalog does not list it.
    """
    out = [Method("no clipping", base_optimizer, kind="none", description="opt")]
    # Entries that only record (``monitor``: clips=False) train exactly as no clipping.
    out += [_catalog_method(e) for e in _catalog.ENTRIES if getattr(e, "clips", True)]
    names = {m.name for m in out}
    if hasattr(optaxclip, "spike_aware_clip") and "spike_aware_clip" not in names:
        out.append(
            Method(
                "spike_aware_clip",
                _before(lambda: optaxclip.spike_aware_clip()),
                description="chain(spike_aware_clip(), opt)",
            )
        )
    out += [
        Method(
            "optax.clip_by_global_norm",
            _before(lambda: optax.clip_by_global_norm(1.0)),
            fixed_threshold=1.0,
            description="chain(optax.clip_by_global_norm(1.0), opt)",
        ),
        Method(
            "update: Adafactor-style RMS",
            lambda opt, lr: adafactor_style_adamw(lr),
            optimizers=("adamw",),
            kind="update",
            description="chain(scale_by_adam, clip_by_block_rms(1.0), decay, -lr)",
        ),
        Method(
            "update: StableAdamW",
            lambda opt, lr: stable_adamw(lr),
            optimizers=("adamw",),
            kind="update",
            description="AdamW, each tensor's step / max(1, RMS(g / sqrt(v_hat)))",
        ),
    ]
    return out


# -------------------------------------------------------------------------- plan

CONDITIONS = ("clean", "single", "cluster")
CONDITION_TEXT = {
    "clean": "clean data",
    "single": "one bad batch",
    "cluster": "clustered bad batches",
}
# The cluster: four bad batches within ten steps, of mixed size, as bad data arrives
# (a 100x batch, then smaller ones that a detector blinded by the first would miss).
CLUSTER_OFFSETS = (0, 2, 5, 9)
CLUSTER_FACTORS = (100.0, 10.0, 100.0, 30.0)
CONDITION_SHORT = {"clean": "clean", "single": "one bad", "cluster": "cluster"}
SINGLE_FACTOR = 100.0
# Divergence: a final validation loss that is not finite, or no better than guessing
# uniformly among the VOCAB symbols (ln 97 = 4.575; a run whose model collapsed to the
# uniform guess ends a hair below it, hence the 0.01 margin).
UNIFORM_LOSS = math.log(VOCAB)
DIVERGED_ABOVE = round(UNIFORM_LOSS - 0.01, 2)
# Recovery: the mean training loss over the RECOVER_WINDOW steps ending
# `recover_after` steps after the last bad batch is within RECOVER_TOLERANCE of its
# mean over the RECOVER_WINDOW steps before the first one.
RECOVER_TOLERANCE = 0.10
RECOVER_WINDOW = 10


@dataclasses.dataclass(frozen=True)
class QualityPlan:
    """The grid: models, optimizers with their learning rates, conditions, seeds, sizes.

    ``lrs[model][optimizer]`` is the learning-rate sweep of that pair (clean data at
    every one); the bad-batch conditions run at ``spike_lrs[model][optimizer]`` (a
    subset), which keeps the grid inside the time budget of a small CPU. The sweeps are
    per model because they must span good to too high for each: the LSTM takes a
    learning rate ten times the transformer's.
    """

    quick: bool
    steps: int
    batch: int
    context: int
    seeds: tuple[int, ...]
    lrs: dict[str, dict[str, tuple[float, ...]]]
    spike_lrs: dict[str, dict[str, tuple[float, ...]]]
    conditions: tuple[str, ...] = CONDITIONS
    valid_sequences: int = 128
    only_methods: tuple[str, ...] | None = None
    curve_points: int = 60
    first_bad: int | None = None  # the step of the first bad batch; None: half-way

    # Chosen from a one-seed pilot of 250 steps (no clipping and five methods): for
    # each pair, the best learning rate without clipping is in the sweep, and so is one
    # at which training without clipping fails or nearly does. Bad batches are injected
    # at a learning rate that trains well without clipping.
    FULL_LRS = {
        "transformer": {"adamw": (1e-3, 3e-3, 1e-2, 3e-2), "sgd": (0.1, 0.3, 1.0, 3.0)},
        "lstm": {"adamw": (3e-3, 3e-2, 1e-1, 3e-1), "sgd": (0.3, 1.0, 3.0, 10.0)},
    }
    FULL_SPIKE_LRS = {
        "transformer": {"adamw": (3e-3,), "sgd": (0.3,)},
        "lstm": {"adamw": (3e-2,), "sgd": (1.0,)},
    }

    @classmethod
    def make(cls, quick: bool) -> QualityPlan:
        if quick:
            # Compiling dominates a short run (one program per model, optimizer and
            # method), so --quick runs two pairs, not four, and one bad-batch condition:
            # every method, both models and both optimizers are still exercised.
            return cls(
                quick=True,
                steps=100,
                batch=4,
                context=32,
                seeds=(0,),
                lrs={"transformer": {"adamw": (3e-3, 3e-2)}, "lstm": {"sgd": (1.0, 10.0)}},
                spike_lrs={"transformer": {"adamw": (3e-3,)}, "lstm": {"sgd": (1.0,)}},
                conditions=("clean", "cluster"),
                curve_points=40,
                # After skip_spikes has its 64 norms (min_history); AdaGC's 100-step
                # warm-up is still running, so --quick tests its warm-up clip there.
                first_bad=70,
            )
        return cls(
            quick=False,
            steps=240,
            batch=4,
            context=32,
            seeds=(0, 1, 2),
            lrs=cls.FULL_LRS,
            spike_lrs=cls.FULL_SPIKE_LRS,
        )

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.lrs)

    def lanes(self, model: str, optimizer: str) -> list[tuple[float, str, int]]:
        """The runs of one group: (learning rate, condition, seed)."""
        out = []
        for lr in self.lrs[model][optimizer]:
            for cond in self.conditions:
                if cond == "clean" or lr in self.spike_lrs[model][optimizer]:
                    out += [(lr, cond, seed) for seed in self.seeds]
        return out

    @property
    def spike_at(self) -> int:
        """The first bad batch: half-way unless given (in the full run, step 120: after
        every method's warm-up, AdaGC's 100 steps and skip_spikes' 64 norms)."""
        return self.steps // 2 if self.first_bad is None else self.first_bad

    @property
    def recover_after(self) -> int:
        return max(RECOVER_WINDOW, self.steps // 8)

    def factors(self, condition: str) -> np.ndarray:
        """The per-step multiplier of the gradient: 1, and the bad batches' factors."""
        f = np.ones(self.steps, np.float32)
        if condition == "single":
            f[self.spike_at] = SINGLE_FACTOR
        elif condition == "cluster":
            for off, x in zip(CLUSTER_OFFSETS, CLUSTER_FACTORS, strict=True):
                f[self.spike_at + off] = x
        elif condition != "clean":
            raise ValueError(f"unknown condition {condition!r}")
        return f

    def last_bad(self, condition: str) -> int:
        return self.spike_at + (CLUSTER_OFFSETS[-1] if condition == "cluster" else 0)

    def model(self, name: str) -> Any:
        if name == "transformer":
            return Transformer(self.context)
        if name == "lstm":
            return LSTM(self.context)
        raise ValueError(f"unknown model {name!r}")


# ------------------------------------------------------------------------ training


def _acted(opt_state: Any) -> jax.Array:
    """Whether any optaxclip transform in the state clipped (or skipped) on this step."""
    s = optaxclip.stats(opt_state)
    flags = [v for k, v in s.items() if k == "clipped" or k.endswith("/clipped")]
    if not flags:
        return jnp.zeros((), jnp.bool_)
    return jnp.any(jnp.stack(flags))


@dataclasses.dataclass
class ModelFns:
    """What is compiled once per model and shared by every method and optimizer.

    ``grad(params[R], starts[R, steps, batch], t, train)``: each lane's loss and
    gradient on its batch of step ``t`` (the windows starting at ``starts[:, t]``).
    ``valid(params[R], windows)``: each lane's validation loss. Keeping the model out of
    the per-method programs is what makes a group cheap to compile: the methods only
    compile their own update.
    """

    model: Any
    grad: Callable
    valid: Callable
    compile_s: float

    @classmethod
    def make(
        cls, plan: QualityPlan, model: Any, params: Any, starts: jax.Array, train, valid
    ) -> ModelFns:
        """Compiles the model's programs for these lanes (``params`` and ``starts``)."""
        loss_and_grad = jax.value_and_grad(lambda p, w: lm_loss(model, p, w))

        def grad_one(params, starts, t, train):
            def window(s):
                return jax.lax.dynamic_slice(train, (s,), (plan.context + 1,))

            return loss_and_grad(params, jax.vmap(window)(starts[t]))

        def valid_one(params, windows):
            return lm_loss(model, params, windows)

        t0 = time.perf_counter()
        grad = jax.jit(jax.vmap(grad_one, in_axes=(0, 0, None, None)))
        grad = grad.lower(params, starts, np.int32(0), train).compile()
        valid_fn = jax.jit(jax.vmap(valid_one, in_axes=(0, None))).lower(params, valid).compile()
        return cls(model, grad, valid_fn, time.perf_counter() - t0)


def lane_inputs(
    plan: QualityPlan, model: Any, corpus: Corpus, lanes: list[tuple[float, str, int]]
) -> tuple[Any, jax.Array, jax.Array, jax.Array]:
    """Per lane: learning rate, initial parameters, batch starts and gradient factors.

    A seed fixes the initialisation and every batch, so lanes that differ only in
    learning rate, condition or method see the same data (their differences are the
    method's, not the sampling's).
    """
    by_seed = {}
    for seed in sorted({s for _, _, s in lanes}):
        rng = np.random.default_rng(seed)
        starts = rng.integers(0, len(corpus.train) - plan.context - 1, (plan.steps, plan.batch))
        by_seed[seed] = (model.init(jax.random.key(seed)), starts.astype(np.int32))
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[by_seed[s][0] for _, _, s in lanes])
    starts = jnp.asarray(np.stack([by_seed[s][1] for _, _, s in lanes]))
    factors = jnp.asarray(np.stack([plan.factors(c) for _, c, _ in lanes]))
    lrs = jnp.asarray([lr for lr, _, _ in lanes], jnp.float32)
    return lrs, params, starts, factors


def train_group(
    plan: QualityPlan,
    fns: ModelFns,
    method: Method,
    optimizer: str,
    inputs: tuple[Any, jax.Array, jax.Array, jax.Array],
    train: jax.Array,
    valid: jax.Array,
) -> dict[str, Any]:
    """Trains every lane of one (model, optimizer, method) group side by side.

    Returns per-step training losses, gradient norms (as the method received them, bad
    batches included) and whether the method acted, each ``[R, steps]``, the final
    validation losses ``[R]``, and the compile and run times.
    """
    lrs, params0, starts, factors = inputs

    def tx(lr):
        return method.make(optimizer, schedule(lr, plan.steps))

    def step_one(lr, params, state, grads, factors, t):
        # A bad batch: the data is normal, its gradient is multiplied (100x, say).
        grads = jax.tree.map(lambda g: g * factors[t], grads)
        updates, state = tx(lr).update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return params, state, optax.tree_utils.tree_norm(grads), _acted(state)

    t0 = time.perf_counter()
    # The state is built eagerly: its few ops are compiled once and cached across the
    # groups, where a jitted init would be one more compile per group.
    state = jax.vmap(lambda lr, p: tx(lr).init(p))(lrs, params0)
    # The parameters and state are donated: XLA updates them in place, as training does.
    step = (
        jax.jit(jax.vmap(step_one, in_axes=(0, 0, 0, 0, 0, None)), donate_argnums=(1, 2))
        .lower(lrs, params0, state, params0, factors, np.int32(0))
        .compile()
    )
    t1 = time.perf_counter()
    params = jax.tree.map(jnp.copy, params0)  # params0 is shared by every group
    trace = []
    for t in range(plan.steps):
        loss, grads = fns.grad(params, starts, np.int32(t), train)
        params, state, norm, acted = step(lrs, params, state, grads, factors, np.int32(t))
        trace.append((loss, norm, acted))
    final = fns.valid(params, valid)
    losses, norms, acted = (np.stack(x, axis=1) for x in zip(*jax.device_get(trace), strict=True))
    final = np.asarray(jax.device_get(final))
    t2 = time.perf_counter()
    return {
        "losses": losses,
        "norms": norms,
        "acted": acted,
        "final": final,
        "compile_s": t1 - t0,
        "run_s": t2 - t1,
    }


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _run_metrics(
    plan: QualityPlan, method: Method, condition: str, losses, norms, acted, val
) -> dict:
    """One run's metrics from its per-step traces (host side)."""
    val = float(val)
    out: dict[str, Any] = {
        "final_val": _finite_or_none(val),
        "diverged": bool(not np.isfinite(val) or val > DIVERGED_ABOVE),
        "clip_rate": None,
        "skip_rate": None,
    }
    if method.kind != "none":
        if method.fixed_threshold is not None:
            rate = float(np.mean(norms > method.fixed_threshold))
        else:
            rate = float(np.mean(acted))
        out["skip_rate" if method.kind == "skip" else "clip_rate"] = rate
    if condition != "clean":
        first, last = plan.spike_at, plan.last_bad(condition)
        before = losses[first - RECOVER_WINDOW : first].mean()
        end = min(last + plan.recover_after, plan.steps)
        after = losses[end - RECOVER_WINDOW : end].mean()
        out["loss_before"] = _finite_or_none(before)
        out["loss_after"] = _finite_or_none(after)
        out["survived"] = bool(np.isfinite(after) and after <= (1 + RECOVER_TOLERANCE) * before)
    return out


def _curve(losses: np.ndarray, points: int) -> list[float | None]:
    """The training loss averaged over equal chunks of steps (``points`` of them)."""
    chunks = np.array_split(np.asarray(losses, np.float64), points)
    return [_finite_or_none(c.mean()) for c in chunks]


def _aggregate(runs: list[dict], clean_runs: list[dict] | None) -> dict:
    """A cell's summary over seeds: median and worst, counts, the cost over clean data."""

    def vals(key):
        return [r[key] for r in runs if r.get(key) is not None]

    finals = [r["final_val"] if r["final_val"] is not None else math.inf for r in runs]
    out: dict[str, Any] = {
        "median_val": _finite_or_none(float(np.median(finals))),
        "worst_val": _finite_or_none(float(np.max(finals))),
        "diverged": sum(r["diverged"] for r in runs),
        "seeds": len(runs),
    }
    for key in ("clip_rate", "skip_rate"):
        v = vals(key)
        out[key] = float(np.median(v)) if v else None
    if "survived" in runs[0]:
        out["survived"] = sum(r["survived"] for r in runs)
    if clean_runs is not None:
        # Paired by seed: the same initialisation and batches, only the bad batches differ.
        costs = [
            r["final_val"] - c["final_val"]
            for r, c in zip(runs, clean_runs, strict=True)
            if r["final_val"] is not None and c["final_val"] is not None
        ]
        out["cost_vs_clean"] = float(np.median(costs)) if len(costs) == len(runs) else None
    return out


def describe_methods() -> dict[str, str]:
    """Each method's name and how it is built (``opt`` is the optimizer)."""
    return {m.name: m.description for m in methods()}


def groups(plan: QualityPlan) -> list[tuple[str, str, Method]]:
    """Every (model, optimizer, method) that the plan trains, in order."""
    out = []
    for model in plan.models:
        for optimizer in plan.lrs[model]:
            for method in methods():
                if optimizer not in method.optimizers:
                    continue
                if plan.only_methods is not None and method.name not in plan.only_methods:
                    continue
                out.append((model, optimizer, method))
    return out


def run(plan: QualityPlan, log: Callable[[str], None], progress: bool = True) -> dict:
    """Trains every group of the plan; returns the results (JSON-ready)."""
    from benchmarks import _harness

    corpus = load_corpus()
    train = jnp.asarray(corpus.train)
    valid = jnp.asarray(valid_batch(corpus, plan.valid_sequences, plan.context))
    todo = groups(plan)
    results: dict[str, Any] = {
        "meta": {
            "machine": _harness.machine_info(),
            "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k != "only_methods"}
            | {"spike_at": plan.spike_at, "recover_after": plan.recover_after},
            "only_methods": plan.only_methods,
            "methods": describe_methods(),
            "data": {
                "stdlib": sysconfig.get_paths()["stdlib"],
                "files": list(corpus.files),
                "chars": corpus.chars,
                "train_ids": int(len(corpus.train)),
                "valid_ids": int(len(corpus.valid)),
                "sha256": corpus.sha256,
                "vocab": VOCAB,
            },
            "definitions": {
                "diverged_above": DIVERGED_ABOVE,
                "recover_tolerance": RECOVER_TOLERANCE,
                "recover_window": RECOVER_WINDOW,
                "single_factor": SINGLE_FACTOR,
                "cluster_offsets": list(CLUSTER_OFFSETS),
                "cluster_factors": list(CLUSTER_FACTORS),
                "adamw": {
                    "b1": ADAM_B1,
                    "b2": ADAM_B2,
                    "eps": ADAM_EPS,
                    "weight_decay": WEIGHT_DECAY,
                },
                "sgd": {"momentum": MOMENTUM},
            },
        },
        "model_compile_s": {},
        "groups": [],
        "cells": [],
    }
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="quality", unit="group", dynamic_ncols=True)
    fns: dict[str, ModelFns] = {}
    inputs: dict[tuple[str, str], Any] = {}
    for model_name, optimizer, method in todo:
        if bar is not None:
            bar.set_postfix_str(f"{model_name}/{optimizer}/{method.name}")
        lanes = plan.lanes(model_name, optimizer)
        if (model_name, optimizer) not in inputs:
            model = plan.model(model_name)
            inputs[model_name, optimizer] = lane_inputs(plan, model, corpus, lanes)
            key = f"{model_name}, {len(lanes)} lanes"
            if key not in fns:
                _, params0, starts, _ = inputs[model_name, optimizer]
                fns[key] = ModelFns.make(plan, model, params0, starts, train, valid)
                results["model_compile_s"][key] = fns[key].compile_s
        key = f"{model_name}, {len(lanes)} lanes"
        out = train_group(
            plan, fns[key], method, optimizer, inputs[model_name, optimizer], train, valid
        )
        results["groups"].append(
            {
                "model": model_name,
                "optimizer": optimizer,
                "method": method.name,
                "kind": method.kind,
                "runs": len(lanes),
                "compile_s": out["compile_s"],
                "run_s": out["run_s"],
                "step_ms_per_run": 1e3 * out["run_s"] / (len(lanes) * plan.steps),
            }
        )
        index = {lane: i for i, lane in enumerate(lanes)}
        per_run = {
            lane: _run_metrics(
                plan,
                method,
                lane[1],
                out["losses"][i],
                out["norms"][i],
                out["acted"][i],
                out["final"][i],
            )
            for lane, i in index.items()
        }
        for lr in plan.lrs[model_name][optimizer]:
            clean = [per_run[(lr, "clean", s)] for s in plan.seeds]
            for cond in plan.conditions:
                if (lr, cond, plan.seeds[0]) not in index:
                    continue
                runs = [per_run[(lr, cond, s)] for s in plan.seeds]
                rows = [index[(lr, cond, s)] for s in plan.seeds]
                cell = {
                    "model": model_name,
                    "optimizer": optimizer,
                    "method": method.name,
                    "kind": method.kind,
                    "lr": lr,
                    "condition": cond,
                    "runs": runs,
                    "curve": _curve(np.median(out["losses"][rows], axis=0), plan.curve_points),
                    "step_ms_per_run": results["groups"][-1]["step_ms_per_run"],
                }
                cell.update(_aggregate(runs, clean if cond != "clean" else None))
                results["cells"].append(cell)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    results["meta"]["duration_s"] = time.perf_counter() - start
    results["overview"] = overview(results)
    return results


# ------------------------------------------------------------------------- report


def overview(results: dict) -> list[dict]:
    """Per method, over every cell it ran in: divergences, recoveries, excess loss.

    The excess of a cell is its median final validation loss minus the best median of
    any method in the same (model, optimizer, lr, condition); a diverged median counts
    as the divergence bound.
    """
    cells = results["cells"]
    best: dict[tuple, float] = {}
    for c in cells:
        key = (c["model"], c["optimizer"], c["lr"], c["condition"])
        v = _capped(c["median_val"])
        best[key] = min(best.get(key, math.inf), v)
    out = []
    for name in dict.fromkeys(c["method"] for c in cells):
        mine = [c for c in cells if c["method"] == name]
        excess = [
            _capped(c["median_val"]) - best[(c["model"], c["optimizer"], c["lr"], c["condition"])]
            for c in mine
        ]
        spiky = [c for c in mine if "survived" in c]
        rates = [c["clip_rate"] for c in mine if c["clip_rate"] is not None]
        skips = [c["skip_rate"] for c in mine if c["skip_rate"] is not None]
        out.append(
            {
                "method": name,
                "kind": mine[0]["kind"],
                "cells": len(mine),
                "runs": sum(c["seeds"] for c in mine),
                "diverged": sum(c["diverged"] for c in mine),
                "spike_runs": sum(c["seeds"] for c in spiky),
                "survived": sum(c["survived"] for c in spiky),
                "median_excess": float(np.median(excess)),
                "worst_excess": float(np.max(excess)),
                "median_clip_rate": float(np.median(rates)) if rates else None,
                "median_skip_rate": float(np.median(skips)) if skips else None,
            }
        )
    return out


def _capped(v: float | None) -> float:
    return DIVERGED_ABOVE if v is None else min(v, DIVERGED_ABOVE)


def _lr(x: float) -> str:
    return f"{x:g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _val(v: float | None) -> str:
    return "inf/NaN" if v is None else f"{v:.3f}"


def _loss(c: dict) -> str:
    """A cell's median final loss, with the seeds that diverged."""
    if c["diverged"] == c["seeds"]:
        return "**div**"
    text = "-" if c["median_val"] is None else f"{c['median_val']:.3f}"
    if c["diverged"]:
        text += f" ({c['diverged']}/{c['seeds']} div)"
    return text


def cell_key(c: dict) -> str:
    """How the guide cites a row: ``transformer / adamw / lr 0.003 / clustered bad batches``."""
    return f"{c['model']} / {c['optimizer']} / lr {_lr(c['lr'])} / {CONDITION_TEXT[c['condition']]}"


def _overview_lines(results: dict) -> list[str]:
    # The markers let the docs include this table ({include} :start-after:) instead of
    # pasting it.
    ov = results.get("overview") or overview(results)
    lines = [
        "## Overview",
        "",
        "<!-- overview:start -->",
        "Over every cell a method ran in (all models, optimizers, learning rates and "
        "conditions). *excess*: the cell's median final loss minus the best method's in "
        f"that cell (a diverged median counts as {DIVERGED_ABOVE:.2f}).",
        "",
        "| method | runs diverged | bad-batch runs recovered | median excess | worst excess "
        "| median clip | median skip |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for o in ov:
        lines.append(
            f"| {o['method']} | {o['diverged']}/{o['runs']} | {o['survived']}/{o['spike_runs']} "
            f"| {o['median_excess']:.3f} | {o['worst_excess']:.3f} | "
            f"{_pct(o['median_clip_rate'])} | {_pct(o['median_skip_rate'])} |"
        )
    lines += ["", "<!-- overview:end -->", ""]
    return lines


def summary(results: dict) -> str:
    """The overview table and the run time, for the terminal."""
    minutes = results["meta"]["duration_s"] / 60
    return "\n".join(_overview_lines(results) + [f"quality benchmark: {minutes:.1f} min"])


def markdown(results: dict) -> str:
    meta, plan = results["meta"], results["meta"]["plan"]
    m, data, d = meta["machine"], meta["data"], meta["definitions"]
    seeds = len(plan["seeds"])
    lines = [
        "# optaxclip quality benchmark: which clipping method trains best",
        "",
        f"`{meta.get('command', 'python -m benchmarks --only quality')}` on {m['processor']} "
        f"({m['cpu_count']} cores, backend {m['backend']}), Python {m['python']}, JAX "
        f"{m['jax']}, Optax {m['optax']}, {m['date']}; {meta['duration_s'] / 60:.1f} min.",
        "",
        "**Setup.** Next-character prediction on Python's own standard library "
        f"({', '.join(data['files'])} from `{data['stdlib']}`: {data['chars']:,} characters, "
        f"sha256 `{data['sha256'][:12]}`; {VOCAB} symbols; the last "
        f"{100 * VALID_FRACTION:.0f}% held out). Models: a causal transformer (2 layers, "
        "d = 64, 4 heads, GPT-2 style) and an LSTM (1 layer, 128 units, 64-d embedding). "
        f"{plan['steps']} steps of {plan['batch']} windows of {plan['context']} characters; "
        "learning rate warmed up over the first 5% of the steps, then cosine-decayed to 10% "
        f"of the peak (the **lr** below). AdamW: b1 {d['adamw']['b1']}, b2 "
        f"{d['adamw']['b2']}, weight decay {d['adamw']['weight_decay']} on matrices. SGD: "
        f"momentum {d['sgd']['momentum']}. Seeds {', '.join(map(str, plan['seeds']))}: a "
        "seed fixes the initialisation and the batches, the same for every method.",
        "",
        "**Conditions.** *clean*; *one bad batch*: at step "
        f"{plan['spike_at']} the gradient is multiplied by {d['single_factor']:g}; "
        "*clustered bad batches*: at steps "
        + ", ".join(f"{plan['spike_at'] + o}" for o in d["cluster_offsets"])
        + " by "
        + ", ".join(f"{f:g}" for f in d["cluster_factors"])
        + ". (The batch's data is normal; only its gradient is wrong, as with a corrupted "
        "batch or a numerical blow-up.)",
        "",
        "**Methods** (`opt` is the optimizer; the learning rate is applied last): every "
        "optaxclip transform in `optaxclip._catalog` that clips or skips, built with the "
        "defaults a user would write, placed before the optimizer (the skip wrappers wrap "
        "it); Optax's own clip; and two *update* clips, AdamW only, that act on Adam's "
        "preconditioned step instead of the gradient: Adafactor's per-tensor RMS clip and "
        "StableAdamW's per-tensor step scale. "
        + "; ".join(
            f"*{name}*: `{text}`"
            for name, text in (meta.get("methods") or describe_methods()).items()
            if text
        )
        + ".",
        "",
        "**Metrics** (median over seeds; *worst* is the worst seed). *final*: validation "
        "loss in nats per character at the end. *div*: diverged, the final validation loss "
        f"NaN/inf or above {d['diverged_above']:.2f} (no better than guessing uniformly: "
        f"ln {VOCAB} = {UNIFORM_LOSS:.3f}). *recovered*: the mean training loss over the "
        f"{d['recover_window']} steps ending {plan['recover_after']} steps after the last "
        f"bad batch is within {100 * d['recover_tolerance']:.0f}% of its mean over the "
        f"{d['recover_window']} steps before the first. *cost*: final loss minus the same "
        "seed's on clean data (what the bad batches cost). *clip* / *skip*: the share of "
        "steps on which the method clipped or skipped (from `optaxclip.stats`; for "
        "Optax's clip, the share of gradient norms above 1).",
        "",
    ]
    lines += _overview_lines(results)
    cells = results["cells"]
    for model in plan["lrs"]:
        for opt in plan["lrs"][model]:
            mine = [c for c in cells if c["model"] == model and c["optimizer"] == opt]
            if not mine:
                continue
            columns = list(dict.fromkeys((c["lr"], c["condition"]) for c in mine))
            lines += [
                f"## {model} / {opt}: median final validation loss ({seeds} seed"
                f"{'s' if seeds > 1 else ''})",
                "",
                "**div**: every seed diverged; (k/n div): k of n did.",
                "",
                "| method | "
                + " | ".join(f"lr {_lr(lr)}, {CONDITION_SHORT[cond]}" for lr, cond in columns)
                + " |",
                "|---|" + "---:|" * len(columns),
            ]
            for name in dict.fromkeys(c["method"] for c in mine):
                by_column = {(c["lr"], c["condition"]): c for c in mine if c["method"] == name}
                row = [_loss(by_column[col]) if col in by_column else "" for col in columns]
                lines.append(f"| {name} | " + " | ".join(row) + " |")
            lines.append("")
    lines += [
        "## Every cell",
        "",
        "A row is cited as *model / optimizer / lr / condition* plus the method.",
        "",
        "| model / optimizer / lr / condition | method | final (median) | final (worst) "
        "| div | recovered | cost | clip | skip |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        recovered = f"{c['survived']}/{c['seeds']}" if "survived" in c else "-"
        cost = c.get("cost_vs_clean")
        lines.append(
            f"| {cell_key(c)} | {c['method']} | {_val(c['median_val'])} | "
            f"{_val(c['worst_val'])} | {c['diverged']}/{c['seeds']} | {recovered} | "
            f"{'-' if cost is None else f'{cost:+.3f}'} | {_pct(c['clip_rate'])} | "
            f"{_pct(c['skip_rate'])} |"
        )
    lines.append("")
    lines += [
        "## Time",
        "",
        "Each group (model, optimizer, method) is one compiled program running all its "
        "learning rates, conditions and seeds side by side (`jax.vmap`); *step* is the "
        "group's run time divided by its runs and steps. The machine is shared, so these "
        "are rough; the other benchmark sections measure step cost properly.",
        "",
        "| model | optimizer | method | runs | compile | run | step per run |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for g in results["groups"]:
        lines.append(
            f"| {g['model']} | {g['optimizer']} | {g['method']} | {g['runs']} | "
            f"{g['compile_s']:.1f} s | {g['run_s']:.1f} s | {g['step_ms_per_run']:.2f} ms |"
        )
    lines.append("")
    lines += _report.targets_and_notes([], meta.get("notes", []))
    return "\n".join(lines)


# -------------------------------------------------------------------------- plots

_STYLES = {"none": "-", "clip": "-", "skip": "--", "update": ":"}


def _colors(names: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return {name: cmap(i % 20) for i, name in enumerate(names)}


def _legend(axes: Any) -> None:
    """One legend for every method drawn on any of the panels, right of the last one."""
    seen: dict[str, Any] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    np.ravel(axes)[-1].legend(
        seen.values(), seen.keys(), fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1)
    )


def plots(results: dict, out: pathlib.Path, prefix: str) -> list[str]:
    """``quality_lr.png`` and one ``quality_curves_<model>_<optimizer>.png`` per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan, cells = results["meta"]["plan"], results["cells"]
    names = list(dict.fromkeys(c["method"] for c in cells))
    colors = _colors(names)
    pairs = [
        (m, o)
        for m in plan["lrs"]
        for o in plan["lrs"][m]
        if any(c["model"] == m and c["optimizer"] == o for c in cells)
    ]
    written = []
    if not pairs:
        return written

    # Final validation loss against the learning rate, clean data.
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4), squeeze=False)
    for ax, (model, opt) in zip(axes[0], pairs, strict=True):
        for name in names:
            mine = sorted(
                (
                    c
                    for c in cells
                    if c["model"] == model
                    and c["optimizer"] == opt
                    and c["method"] == name
                    and c["condition"] == "clean"
                ),
                key=lambda c: c["lr"],
            )
            if not mine:
                continue
            kind = mine[0]["kind"]
            ax.plot(
                [c["lr"] for c in mine],
                [_capped(c["median_val"]) for c in mine],
                _STYLES[kind],
                marker="o",
                ms=3,
                color="k" if kind == "none" else colors[name],
                lw=2 if kind == "none" else 1,
                label=name,
            )
        ax.axhline(DIVERGED_ABOVE, color="r", lw=0.8, ls="--")
        ax.set_xscale("log")
        # The sweep's own values as ticks: log-axis minor labels overlap at 3x spacing.
        swept = sorted({c["lr"] for c in cells if c["model"] == model and c["optimizer"] == opt})
        ax.set_xticks(swept, [_lr(x) for x in swept])
        ax.minorticks_off()
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("final validation loss (nats/char)")
        ax.set_title(f"{model} / {opt}, clean data", fontsize=10)
    _legend(axes)
    fig.suptitle(
        "Final validation loss vs learning rate (median over seeds; "
        f"red: the divergence bound {DIVERGED_ABOVE})",
        fontsize=10,
    )
    fig.tight_layout()
    path = out / f"{prefix}quality_lr.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))

    # Training-loss curves: one panel per (learning rate, condition) that ran.
    for model, opt in pairs:
        mine = [c for c in cells if c["model"] == model and c["optimizer"] == opt]
        columns = list(dict.fromkeys((c["lr"], c["condition"]) for c in mine))
        ncols = min(4, len(columns))
        nrows = math.ceil(len(columns) / ncols)
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False, sharey=True
        )
        for ax, (lr, cond) in zip(axes.flat, columns, strict=False):
            for c in mine:
                if c["lr"] != lr or c["condition"] != cond:
                    continue
                curve = np.array([np.nan if v is None else v for v in c["curve"]])
                x = np.linspace(0, plan["steps"], len(curve), endpoint=False)
                ax.plot(
                    x,
                    np.minimum(curve, DIVERGED_ABOVE + 0.5),
                    _STYLES[c["kind"]],
                    color="k" if c["kind"] == "none" else colors[c["method"]],
                    lw=1.6 if c["kind"] == "none" else 0.9,
                    label=c["method"],
                )
            if cond != "clean":
                ax.axvline(plan["spike_at"], color="r", lw=0.6, ls=":")
            ax.set_title(f"lr {_lr(lr)}, {CONDITION_TEXT[cond]}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylim(1.0, DIVERGED_ABOVE + 0.5)
        for ax in axes.flat[len(columns) :]:
            ax.axis("off")
        axes[0][0].set_ylabel("training loss (median over seeds)")
        _legend(axes)
        fig.suptitle(f"{model} / {opt}: training loss per method", fontsize=10)
        fig.tight_layout()
        path = out / f"{prefix}quality_curves_{model}_{opt}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written


def write(results: dict, out: pathlib.Path, prefix: str) -> list[str]:
    """Writes ``<prefix>quality.json``, ``<prefix>quality.md`` and the plots."""
    written = _report.write_json_and_markdown(
        results, markdown(results), out, f"{prefix}quality"
    ) + plots(results, out, prefix)
    if not prefix:
        readme = _report.sync_readme_block(markdown(results), "overview", out)
        written += [readme] if readme else []
    return written
