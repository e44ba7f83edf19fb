"""Turns the measurements into results.json, a markdown report and PNG plots."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

M = 1_000_000
CLIPS = ("optaxclip", "optax", "bare")


# The transforms whose step should cost what a global clip costs (they add scalar work
# to one global norm), with the ratio each may take: 1.05x for the adaptive clips, and
# 1.10x for the skip wrappers, which must also keep the previous parameters and state
# when they skip (issue #14 settled the skip wrappers' target at 1.10x). The per-leaf
# and per-element clips do other work and are reported without a target.
ADAPTIVE_TARGETED = {
    "autoclip_window": 1.05,
    "autoclip_sketch": 1.05,
    "zclip": 1.05,
    "adagc": 1.05,
    "skip_nonfinite": 1.10,
    "skip_spikes": 1.10,
}
# Compile time at 10 and 100 leaves may take this many times Optax's (issue #14).
COMPILE_VS_OPTAX_SMALL = 1.5


README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _p(n: int) -> str:
    return f"{n // M}M" if n % M == 0 else f"{n / M:.1f}M"


def marked_block(text: str, name: str) -> str:
    """The block of ``text`` between ``<!-- name:start -->`` and ``<!-- name:end -->``,
    markers included: a summary a report writes and the README carries a copy of."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    return text[text.index(start) : text.index(end) + len(end)]


def sync_readme_block(report: str, name: str, out: pathlib.Path, readme: pathlib.Path = README):
    """Copies block ``name`` of a report into the README, for a full run written to
    ``benchmarks/results`` (the README shows those); ``tests/test_docs.py`` checks the
    copies agree. Returns the README's path, or None when nothing was copied."""
    if out.resolve() != RESULTS.resolve():
        return None
    text = readme.read_text(encoding="utf-8")
    readme.write_text(
        text.replace(marked_block(text, name), marked_block(report, name)), encoding="utf-8"
    )
    return str(readme)


# The trees of the README's CPU summary: (optimizer, leaves, parameters).
SUMMARY_TREES = (
    ("adamw", 10, 20 * M),
    ("adamw", 100, 20 * M),
    ("adamw", 2000, 20 * M),
    ("sgd", 100, 1 * M),
    ("sgd", 2000, 2 * M),
)


def cpu_summary(results: dict) -> list[str]:
    """The README's CPU table: the global clip against Optax's on a few trees."""
    m = results["meta"]["machine"]
    lines = [
        "<!-- cpu-summary:start -->",
        f"`{results['meta']['command']}` on a {m['cpu_count']}-core {m['processor']} CPU, "
        f"JAX {m['jax']}, {m['date'][:10]}: `chain(clip_by_global_norm(1.0), opt)`, "
        "step and compile time as ratios to `opt` alone, extra temp memory in % of the "
        "gradient's bytes.",
        "",
        "| opt | leaves | params | step optaxclip | Optax | compile optaxclip | Optax "
        "| extra temp optaxclip | Optax |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    clip = results["clip"]
    for opt, leaves, params in SUMMARY_TREES:
        key = dict(optimizer=opt, leaves=leaves, params=params)
        step, comp, mem = (_find(clip[k], **key) for k in ("step", "compile", "memory"))
        if comp is None or "optax" not in comp["candidates"]:
            continue

        def ratio(entry, name):
            return f"{entry['candidates'][name]['ratio_vs_alone']:.2f}x" if entry else "-"

        def extra(name, mem=mem):
            return f"{mem['extra_pct_of_grad'][name]:.1f}%" if mem else "-"

        lines.append(
            f"| {opt} | {leaves} | {_p(params)} | {ratio(step, 'optaxclip')} | "
            f"{ratio(step, 'optax')} | {ratio(comp, 'optaxclip')} | {ratio(comp, 'optax')} | "
            f"{extra('optaxclip')} | {extra('optax')} |"
        )
    met = results.get("targets", [])
    lines += [
        "",
        f"Targets met: {sum(t['met'] for t in met)} of {len(met)} (the list, with the "
        "rows above and the adaptive transforms: `benchmarks/results/results.md`).",
        "<!-- cpu-summary:end -->",
    ]
    return lines


def _find(entries: list[dict], **key: Any) -> dict | None:
    for e in entries:
        if all(e.get(k) == v for k, v in key.items()):
            return e
    return None


def is_reference(name: str) -> bool:
    """True for a candidate that is not an optaxclip transform (shown, never scored)."""
    return name.startswith("optax.")


def targets(results: dict) -> list[dict]:
    """The issue's targets, each with what was measured and whether it is met."""
    out = []
    step, comp, mem = results["clip"]["step"], results["clip"]["compile"], results["clip"]["memory"]
    e = _find(step, optimizer="adamw", leaves=100, params=20 * M)
    if e:
        oc = e["candidates"]["optaxclip"]["ratio_vs_alone"]
        out.append(
            {
                "target": "step: chain(clip_by_global_norm, adamw) <= 1.15x adamw "
                "(20M, 100 leaves)",
                "measured": f"{oc:.3f}x",
                "met": oc <= 1.15,
            }
        )
        if "optax" in e["candidates"]:
            ox = e["candidates"]["optax"]["ratio_vs_alone"]
            out.append(
                {
                    "target": "step: overhead at least 10% below Optax's (20M, 100 leaves)",
                    "measured": f"+{100 * (oc - 1):.1f}% vs Optax +{100 * (ox - 1):.1f}%",
                    "met": (oc - 1) <= 0.9 * (ox - 1),
                }
            )
    for params in sorted({c["params"] for c in comp if c["leaves"] == 2000}):
        c = _find(comp, optimizer="sgd", leaves=2000, params=params)
        if c:
            r = c["candidates"]["optaxclip"]["ratio_vs_alone"]
            text = f"{r:.2f}x"
            if "optax" in c["candidates"]:
                text += f" (Optax {c['candidates']['optax']['ratio_vs_alone']:.1f}x)"
            out.append(
                {
                    "target": f"compile: chain(clip, sgd) <= 2x sgd (2000 leaves, {_p(params)})",
                    "measured": text,
                    "met": r <= 2.0,
                }
            )
    worse = []
    checked = 0
    for c in comp:
        if c["leaves"] <= 100 and "optax" in c["candidates"]:
            checked += 1
            mine = c["candidates"]["optaxclip"]["median_total_s"]
            theirs = c["candidates"]["optax"]["median_total_s"]
            if mine > COMPILE_VS_OPTAX_SMALL * theirs:
                worse.append(
                    f"{c['optimizer']}/{c['leaves']}/{_p(c['params'])}: "
                    f"{mine:.2f}s vs {theirs:.2f}s"
                )
    if checked:
        out.append(
            {
                "target": f"compile: within {COMPILE_VS_OPTAX_SMALL}x of Optax at 10 and "
                "100 leaves",
                "measured": "; ".join(worse) if worse else f"all {checked} configs",
                "met": not worse,
            }
        )
    for c in comp:
        if c["leaves"] == 2000 and c["params"] == 20 * M and "optax" in c["candidates"]:
            mine = c["candidates"]["optaxclip"]["median_total_s"]
            theirs = c["candidates"]["optax"]["median_total_s"]
            out.append(
                {
                    "target": f"compile: no worse than Optax at 2000 leaves x 20M "
                    f"({c['optimizer']})",
                    "measured": f"{mine:.2f}s vs {theirs:.2f}s",
                    "met": mine <= theirs,
                }
            )
    if mem:
        worst = max(mem, key=lambda m: m["extra_pct_of_grad"]["optaxclip"])
        pct = worst["extra_pct_of_grad"]["optaxclip"]
        out.append(
            {
                "target": "memory: extra temp from clipping <= 10% of the gradient's bytes",
                "measured": f"max {pct:.1f}% ({worst['optimizer']}, {worst['leaves']} leaves, "
                f"{_p(worst['params'])})",
                "met": pct <= 10.0,
            }
        )
    ad = results.get("adaptive")
    if ad:
        for name, c in ad["candidates"].items():
            if name not in ADAPTIVE_TARGETED:
                continue
            r = c["ratio_vs_clip_by_global_norm"]
            limit = ADAPTIVE_TARGETED[name]
            out.append(
                {
                    "target": f"adaptive: {name} <= {limit:.2f}x clip_by_global_norm",
                    "measured": f"{r:.3f}x",
                    "met": r <= limit,
                }
            )
        late = ad.get("autoclip_late", {}).get("autoclip_sketch")
        if late:
            r = late["ratio_late_vs_first"]
            out.append(
                {
                    "target": f"AutoClip sketch at step {late['late_step']:,} within 5% of step 1",
                    "measured": f"{r:.3f}x",
                    "met": abs(r - 1) <= 0.05,
                }
            )
    return out


def markdown(results: dict) -> str:
    meta = results["meta"]
    m = meta["machine"]
    summary = cpu_summary(results) + [""] if results["clip"]["compile"] else []
    lines = [
        "# optaxclip benchmarks",
        "",
        *summary,
        f"`{meta['command']}` on {m['processor']} ({m['cpu_count']} cores), backend "
        f"{m['backend']}, JAX {m['jax']}, Optax {m['optax']}, {m['date']}; "
        f"{meta['duration_s'] / 60:.1f} min; load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['load_average'] or [])}.",
        "",
        "Every number is a median over repeats in which the candidates took turns, and "
        "every ratio is taken within a repeat. Leaves are float32 vectors of equal size; "
        "*bare* is the cheapest possible clip (one float32 norm, one scalar multiply, "
        "no robustness), *read once* a jitted pass that only sums each gradient leaf: "
        "1 + its ratio is the floor for any clip that must read the gradient before "
        "scaling it.",
        "",
    ]
    step = results["clip"]["step"]
    if step:
        lines += [
            "## Step time (ratio to the optimizer alone)",
            "",
            "| optimizer | leaves | params | alone | optaxclip | Optax | bare | read once "
            "(JAX) | read once (NumPy) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in step:
            c = e["candidates"]

            def r(name, c=c):
                return f"{c[name]['ratio_vs_alone']:.3f}x" if name in c else "-"

            lines.append(
                f"| {e['optimizer']} | {e['leaves']} | {_p(e['params'])} | "
                f"{1e3 * c['alone']['median_s']:.1f} ms | {r('optaxclip')} | {r('optax')} | "
                f"{r('bare')} | +{c['read_jax']['ratio_vs_alone']:.3f} | "
                f"+{c['read_numpy']['ratio_vs_alone']:.3f} |"
            )
        lines.append("")
    comp = results["clip"]["compile"]
    if comp:
        lines += [
            "## Compile time (lower + compile, seconds; ratio to the optimizer alone)",
            "",
            "| optimizer | leaves | params | alone | optaxclip | Optax | bare | samples |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in comp:
            c = e["candidates"]

            def s(name, c=c):
                if name not in c:
                    return "skipped"
                return f"{c[name]['median_total_s']:.2f} ({c[name]['ratio_vs_alone']:.1f}x)"

            n = len(c["alone"]["samples"])
            lines.append(
                f"| {e['optimizer']} | {e['leaves']} | {_p(e['params'])} | "
                f"{c['alone']['median_total_s']:.2f} | {s('optaxclip')} | {s('optax')} | "
                f"{s('bare')} | {n} |"
            )
        lines.append("")
    mem = results["clip"]["memory"]
    if mem:
        lines += [
            "## Memory (XLA temp buffers beyond the optimizer's, % of the gradient's bytes)",
            "",
            "| optimizer | leaves | params | gradient | optaxclip | Optax | bare |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for e in mem:
            x = e["extra_pct_of_grad"]

            def pc(name, x=x):
                return f"{x[name]:.2f}%" if name in x else "-"

            lines.append(
                f"| {e['optimizer']} | {e['leaves']} | {_p(e['params'])} | "
                f"{e['grad_bytes'] / 2**20:.0f} MiB | {pc('optaxclip')} | {pc('optax')} | "
                f"{pc('bare')} |"
            )
        lines.append("")
    ad = results.get("adaptive")
    if ad:
        lines += [
            f"## Adaptive transforms (adamw, {ad['leaves']} leaves, {_p(ad['params'])})",
            "",
            "Every catalog entry before (or, for the skip wrappers, around) adamw, Optax's "
            "`apply_if_finite`, and the update-clipping recipes (AdamW with its step clipped "
            "per tensor); compile is lower + compile of the whole step, temp its XLA temp "
            "buffers.",
            "",
            "| transform | step | ratio to clip_by_global_norm | compile | temp |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, c in ad["candidates"].items():
            lines.append(
                f"| {name} | {1e3 * c['median_s']:.1f} ms | "
                f"{c['ratio_vs_clip_by_global_norm']:.3f}x | {c['compile_s']:.2f} s | "
                f"{c['temp_bytes'] / 2**20:.1f} MiB |"
            )
        for name, late in ad.get("autoclip_late", {}).items():
            late_s = late["median_s"][f"step {late['late_step']}"]
            lines.append(
                f"| {name}, step {late['late_step']:,} vs step 1 | {1e3 * late_s:.1f} ms | "
                f"{late['ratio_late_vs_first']:.3f}x (of step 1) | | |"
            )
        lines.append("")
    dn = results.get("donated")
    if dn:
        lines += [
            f"## Donated parameters and state (adamw, {dn['leaves']} leaves, {_p(dn['params'])})",
            "",
            "`jax.jit(step, donate_argnums=(0, 1))`, each step carrying on from the last, as "
            "training loops run it. Extra temp memory is what XLA allocates beyond adamw's "
            "own, in % of the gradient's bytes.",
            "",
            "| step | time | ratio to adamw alone | extra temp |",
            "|---|---:|---:|---:|",
        ]
        for name, c in dn["candidates"].items():
            lines.append(
                f"| {name} | {1e3 * c['median_s']:.1f} ms | {c['ratio_vs_alone']:.3f}x | "
                f"{c['extra_temp_pct_of_grad']:.0f}% |"
            )
        lines.append("")
    pe = results.get("per_example")
    if pe:
        lines += [
            "## Per-example clipping (DP-SGD)",
            "",
            "Each function jitted alone, from per-example gradients (examples on axis 0 of "
            "every leaf, float32, norms spread from 0.1x to 10x the median) to the summed "
            "clipped gradient, with the median example norm as the bound. The ratio is to "
            "Optax's function of the same name, within each repeat.",
            "",
            "| examples | leaves | params / example | function | optaxclip | Optax | ratio "
            "| compile optaxclip | Optax | temp optaxclip | Optax |",
            "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in pe:
            for fn in ("per_example_global_norm_clip", "per_example_layer_norm_clip"):
                mine = e["candidates"].get(f"optaxclip.{fn}")
                theirs = e["candidates"].get(f"optax.{fn}")
                if not mine or not theirs:
                    continue
                lines.append(
                    f"| {e['examples']} | {e['leaves']} | {_p(e['params'])} | {fn} | "
                    f"{1e3 * mine['median_s']:.1f} ms | {1e3 * theirs['median_s']:.1f} ms | "
                    f"{mine['ratio_vs_optax']:.3f}x | {mine['compile_s']:.2f} s | "
                    f"{theirs['compile_s']:.2f} s | {mine['temp_bytes'] / 2**20:.1f} MiB | "
                    f"{theirs['temp_bytes'] / 2**20:.1f} MiB |"
                )
        lines.append("")
    lines += targets_and_notes(results.get("targets", []), results["meta"].get("notes", []))
    return "\n".join(lines)


def targets_and_notes(
    targets: list[dict], notes: list[str], heading: str = "## Targets"
) -> list[str]:
    """A report's closing lines: its targets as a table (when it has any), then its notes."""
    lines = []
    if targets:
        lines += [heading, "", "| target | measured | met |", "|---|---|:-:|"]
        for t in targets:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
        lines.append("")
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return lines


def plots(results: dict, out: pathlib.Path, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    step = results["clip"]["step"]
    if step:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(step)), 4))
        labels = [f"{e['optimizer']}\n{e['leaves']}L {_p(e['params'])}" for e in step]
        x = np.arange(len(step))
        width = 0.25
        for k, name in enumerate(CLIPS):
            vals = [e["candidates"].get(name, {}).get("ratio_vs_alone", np.nan) for e in step]
            ax.bar(x + (k - 1) * width, vals, width, label=name)
        floor = [1 + e["candidates"]["read_jax"]["ratio_vs_alone"] for e in step]
        ax.scatter(x, floor, color="k", marker="_", s=400, zorder=3, label="1 + read once")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel("step time / optimizer alone")
        ax.set_ylim(bottom=0.9)
        ax.legend(fontsize=8)
        ax.set_title("Step time of chain(clip, optimizer)")
        fig.tight_layout()
        path = out / f"{prefix}step_time.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    comp = results["clip"]["compile"]
    if comp:
        groups = sorted({(e["optimizer"], e["params"]) for e in comp})
        fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.6), squeeze=False)
        for ax, (opt, params) in zip(axes[0], groups, strict=True):
            es = sorted(
                (e for e in comp if e["optimizer"] == opt and e["params"] == params),
                key=lambda e: e["leaves"],
            )
            for name in ("alone",) + CLIPS:
                pts = [
                    (e["leaves"], e["candidates"][name]["median_total_s"])
                    for e in es
                    if name in e["candidates"]
                ]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=name)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("leaves")
            ax.set_ylabel("lower + compile [s]")
            ax.set_title(f"{opt}, {_p(params)} params", fontsize=10)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{prefix}compile_time.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    ad = results.get("adaptive")
    if ad and ad["candidates"]:
        names = list(ad["candidates"])
        fig, ax = plt.subplots(figsize=(7, 3.5))
        vals = [ad["candidates"][n]["ratio_vs_clip_by_global_norm"] for n in names]
        ax.barh(names, vals)
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.axvline(1.05, color="r", lw=0.8, ls="--", label="1.05x")
        ax.set_xlabel("step time / clip_by_global_norm")
        ax.set_xlim(left=min(0.9, min(vals) - 0.02))
        ax.legend(fontsize=8)
        ax.set_title(f"Adaptive transforms (adamw, {ad['leaves']} leaves, {_p(ad['params'])})")
        fig.tight_layout()
        path = out / f"{prefix}adaptive.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written


def write_json_and_markdown(results: dict, text: str, out: pathlib.Path, stem: str) -> list[str]:
    """Writes ``<stem>.json`` (replaced whole, never left half-written) and ``<stem>.md``
    into ``out``; returns their paths. Every section of the benchmarks writes this way."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float))
    tmp.replace(json_path)
    md_path = out / f"{stem}.md"
    md_path.write_text(text)
    return [str(json_path), str(md_path)]


def write(results: dict, out: pathlib.Path, prefix: str) -> list[str]:
    """Writes ``<prefix>results.json``, ``.md`` and the plots; a full run with the clip
    section also copies its summary into the README."""
    results["targets"] = targets(results)
    report = markdown(results)
    written = write_json_and_markdown(results, report, out, f"{prefix}results")
    if not prefix and results["clip"]["compile"]:
        readme = sync_readme_block(report, "cpu-summary", out)
        written += [readme] if readme else []
    return written + plots(results, out, prefix)
