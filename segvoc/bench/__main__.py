"""The bench's command line: ``python -m segvoc.bench [options] [overrides]`` (``--help`` lists them; BENCHMARKS.md
says what each figure times). ``main(argv)`` runs it and returns the ``Bench``, for tests and notebooks."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from segvoc.bench.runner import Bench
from segvoc.bench.sections import ALL_SECTIONS, SECTIONS, run
from segvoc.bench.workloads import PRECISIONS
from segvoc.cli import command_parser, run_command

DESCRIPTION = """\
Throughput and memory benchmarks, each through the code path that training, validation or prediction really runs:
data (decode + train augmentation), train (Lightning and a plain PyTorch loop over a grid of precision,
channels_last and torch.compile), val, predict, flops, deploy (batch-1 CPU latency of PyTorch fp32, bf16 +
channels_last, ONNX Runtime fp32 and int8), and the peak host and device memory. Every figure names its
device. Without --data-root the images are generated; with --json the file is rewritten after every figure.
BENCHMARKS.md says what each figure times and how to read it."""

EXAMPLES = (
    "python -m segvoc.bench --short --device cpu --json bench.json",
    "python -m segvoc.bench --device cuda --batch-size 16 --json bench_gpu.json",
    "python -m segvoc.bench --sections data,train --precision bf16-mixed --channels-last on --compile off",
    "python -m segvoc.bench --data-root data",
    "python -m segvoc.bench --sections deploy --device cpu --json deploy.json",
    "python -m segvoc.bench trainer.benchmark=true",
)

# Lightning's advice that does not apply to a benchmark's deliberately small runs
QUIETED_WARNINGS = (
    ".*does not have many workers.*",
    ".*smaller than the logging interval.*",
    ".*defined a `validation_step` but have no `val_dataloader`.*",
    ".*overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
)


def image_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` -> ``(width, height)``."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 500x375") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive")
    return width, height


def sections(text: str) -> list[str]:
    """A comma-separated list of section names, in the bench's order."""
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(ALL_SECTIONS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown sections {unknown}; choose from {','.join(ALL_SECTIONS)}")
    return [s for s in ALL_SECTIONS if s in chosen]


def positive(text: str) -> int:
    """A positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The bench's options from ``argv`` (``None``: the command line); a bad one exits with argparse's usage error."""
    parser = command_parser("segvoc.bench", DESCRIPTION, EXAMPLES)
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides of conf/train.yaml for every section, e.g. model=deeplabv3 trainer.benchmark=true",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--short",
        action="store_true",
        help="fewer steps and images, no torch.compile, training batch 2 on a CPU (under 5 minutes on 2 cores)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive,
        default=None,
        help="training batch, also the DataLoader's in the data section (default 8; training 2 with --short on CPU)",
    )
    parser.add_argument("--crop-size", type=positive, default=513, help="training crop and FLOP-count input size")
    parser.add_argument(
        "--image-size",
        type=image_size,
        default=(500, 375),
        help="WIDTHxHEIGHT of the generated landscape images; every other one is portrait (HEIGHTxWIDTH)",
    )
    parser.add_argument(
        "--sections",
        type=sections,
        default=list(SECTIONS),
        help=f"{','.join(ALL_SECTIONS)} (default: all but deploy)",
    )
    parser.add_argument(
        "--precision",
        action="append",
        choices=PRECISIONS,
        default=None,
        help="a training precision to measure (repeatable; default: each one the device supports)",
    )
    parser.add_argument("--channels-last", choices=("both", "off", "on"), default="both", help="training grid")
    parser.add_argument(
        "--compile", choices=("both", "off", "on"), default=None, help="training grid (default both; off with --short)"
    )
    parser.add_argument("--json", default=None, help="write the results to this file (rewritten as they come)")
    parser.add_argument(
        "--data-root",
        default=None,
        help="a folder holding VOCdevkit/VOC2012 to read instead of generated images (the data and train sections "
        "read its train split only; val and predict need a val split too)",
    )
    parser.add_argument(
        "--val-batch-size", type=positive, default=None, help="default: the config's data.val_batch_size"
    )
    parser.add_argument(
        "--predict-batch-size", type=positive, default=None, help="default: conf/predict.yaml's batch_size"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Bench:
    """Run the bench with command-line ``argv``; print the table and return the bench with its results.

    The table, what was skipped and the wall time are printed (and the JSON saved) also when the run is interrupted.
    A user error (``--device cuda`` without CUDA, an override that does not apply) raises ``SegvocError`` before
    anything is measured."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in QUIETED_WARNINGS:
        warnings.filterwarnings("ignore", message)
    console = Console() if sys.stdout.isatty() else Console(width=240)  # a log file gets the table unwrapped
    with tempfile.TemporaryDirectory(prefix="segvoc-bench-") as workdir:
        bench = Bench(args, Path(workdir), console)
        report = bench.report
        env = bench.environment()
        console.print(
            f"segvoc.bench on {env['device']} ({env['cpu_cores']} CPU cores, {env['torch_threads']} torch "
            f"threads, load average {env['load_average']}), torch {env['torch']}, lightning {env['lightning']}"
        )
        try:
            run(bench, args.sections)
        finally:
            report.save()
            console.print(bench.table())
            for skipped in report.skipped:
                console.print(f"skipped: {skipped['section']} {skipped['what']}: {skipped['why']}")
            console.print(
                f"wall time {time.perf_counter() - report.clock:.0f} s"
                + (f"; results in {report.json_path}" if report.json_path else "")
            )
    return bench


if __name__ == "__main__":
    run_command(main)  # exit status 0 once the table is printed: a failed figure is in the table, not the status
