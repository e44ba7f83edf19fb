"""``python -m benchmarks [--quick]``: measure optaxclip against Optax, write the report.

Sections: the step time, compile time and temp memory of chain(clip, optimizer) for
optaxclip.clip_by_global_norm, optax.clip_by_global_norm and a bare one-norm clip,
against the optimizer alone (adamw and sgd; 10, 100 and 2000 leaves; 1M and 20M
parameters), with the machine's read-once bound; and the step time of the adaptive
transforms against clip_by_global_norm, including AutoClip late in training; and the
step time of clips and skip wrappers with the parameters and optimizer state donated,
as training loops run them; and the per-example (DP-SGD) clips against Optax's.

``--only quality`` (not run by default: it trains ~1,000 small models) is the evidence for
choosing a method: a character-level transformer and LSTM trained on Python's own
sources with every method, over a learning-rate sweep and with injected bad batches
(``benchmarks/_quality.py``; results in <out>/[quick_]quality.{json,md} and PNG plots).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0],
        epilog="Results: <out>/[quick_]results.{json,md} and PNG plots.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smaller grid and fewer repeats (~1 minute; --only quality: ~3 minutes)",
    )
    parser.add_argument(
        "--only",
        choices=("clip", "adaptive", "donated", "per_example", "quality"),
        action="append",
        help="run only these sections (repeatable); default: clip, adaptive, donated and "
        "per_example "
        "(quality, the training benchmark, runs only when named)",
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=HERE / "results", help="output directory"
    )
    parser.add_argument(
        "--platform",
        choices=("cpu", "tpu", "gpu"),
        default="cpu",
        help="cpu: run the sections here; tpu: compile for a TPU v5e topology with libtpu "
        '(no TPU needed; pip install -e ".[tpu]" in an environment of its own) and report '
        "the TPU compiler's figures in <out>/[quick_]tpu.{json,md}; gpu: the same for four "
        'H100s with the CUDA plugin (pip install -e ".[gpu]", its own environment) in '
        "<out>/[quick_]gpu.{json,md} (--only does not apply to either)",
    )
    args = parser.parse_args(argv)
    if args.platform != "cpu" and args.only:
        parser.error("--only applies to --platform cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.platform == "tpu":
        from benchmarks import _tpu

        # Before JAX is imported: the TPU compiler is loaded for a topology, not a chip.
        _tpu.prepare_environment()
        command = "python -m benchmarks --platform tpu" + (" --quick" if args.quick else "")
        return _tpu.main(args.quick, args.out, command)
    if args.platform == "gpu":
        from benchmarks import _gpu

        # Before JAX is imported: the CUDA compiler is loaded for a description, not a GPU.
        _gpu.prepare_environment()
        command = "python -m benchmarks --platform gpu" + (" --quick" if args.quick else "")
        return _gpu.main(args.quick, args.out, command)
    # Imported here so that --help answers without starting JAX.
    from benchmarks import _cases, _harness, _report

    sections = args.only or ["clip", "adaptive", "donated", "per_example"]
    plan = _cases.Plan.make(args.quick)
    notes: list[str] = []

    def log(message: str) -> None:
        if message not in notes:
            notes.append(message)
            print(f"note: {message}", file=sys.stderr, flush=True)

    if "quality" in sections:
        from benchmarks import _quality

        quality = _quality.run(_quality.QualityPlan.make(args.quick), log)
        quality["meta"]["command"] = "python -m benchmarks --only quality" + (
            " --quick" if args.quick else ""
        )
        quality["meta"]["notes"] = list(notes)
        written = _quality.write(quality, args.out, "quick_" if args.quick else "")
        print(_quality.summary(quality))
        print("wrote " + ", ".join(written))
        # The quality section writes files of its own: with nothing else named, the
        # timing report (results.json) is left as it was rather than overwritten empty.
        sections = [s for s in sections if s != "quality"]
        if not sections:
            return 0

    command = "python -m benchmarks" + (" --quick" if args.quick else "")
    if args.only:
        command += "".join(f" --only {s}" for s in sections)
    results: dict = {
        "meta": {"command": command, "machine": _harness.machine_info(), "plan": repr(plan)},
        "clip": {"step": [], "compile": [], "memory": []},
        "adaptive": None,
        "donated": None,
        "per_example": None,
    }
    start = time.perf_counter()
    if "clip" in sections:
        results["clip"] = _cases.clip_benchmarks(plan, log)
    if "adaptive" in sections:
        results["adaptive"] = _cases.adaptive_benchmarks(plan, log)
    if "donated" in sections:
        results["donated"] = _cases.donated_benchmarks(plan, log)
    if "per_example" in sections:
        results["per_example"] = _cases.per_example_benchmarks(plan, log)
    results["meta"]["duration_s"] = time.perf_counter() - start
    results["meta"]["notes"] = notes
    prefix = "quick_" if args.quick else ""
    written = _report.write(results, args.out, prefix)
    print(_report.markdown(results))
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
