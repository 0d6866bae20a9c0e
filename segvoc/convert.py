"""``python -m segvoc.convert <seed.pth> <out.ckpt> [--output-stride 16|8]``: import a checkpoint of the seed
report's tool (DeepLabV3Plus-Pytorch format) into segvoc's format, which ``predict.py ckpt=<out.ckpt>`` loads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from segvoc.checkpoint import META_KEY, CheckpointError, read_checkpoint
from segvoc.errors import SegvocError
from segvoc.seed_format import convert_seed_checkpoint, seed_safe_globals


def convert_file(source: Path, target: Path, output_stride: int = 16) -> dict[str, Any]:
    """Convert the seed checkpoint ``source`` and write it to ``target``; return the written checkpoint."""
    if not source.is_file():
        raise CheckpointError(
            f"The seed checkpoint {source} does not exist; pass the .pth file written by the seed report's tool "
            "(e.g. best_deeplabv3plus_mobilenet_voc_os16.pth)."
        )
    if target.exists() and target.resolve() == source.resolve():
        raise CheckpointError(f"Refusing to overwrite the seed checkpoint {source}; give another output path.")
    with seed_safe_globals():
        seed = read_checkpoint(source)
    checkpoint = convert_seed_checkpoint(seed, output_stride, source=source)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, target)
    except OSError as exc:
        raise CheckpointError(
            f"Cannot write the converted checkpoint to {target} ({exc}); choose a writable path."
        ) from exc
    return checkpoint


def summary(checkpoint: dict[str, Any], target: Path) -> str:
    """One line saying what was written: classes, output stride, and the seed run's iterations and best score."""
    spec = checkpoint[META_KEY]["net"]
    seed = checkpoint["seed"]
    best = "unknown" if seed["best_score"] is None else f"{seed['best_score']:.4f}"
    return (
        f"Wrote {target}: {spec['arch']} with {spec['num_classes']} classes, output stride {spec['output_stride']}; "
        f"seed run at {seed['cur_itrs']} iterations, best score {best}."
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (1 with a message on stderr for a user error)."""
    parser = argparse.ArgumentParser(
        prog="python -m segvoc.convert", description="Convert a seed-tool checkpoint to segvoc's format."
    )
    parser.add_argument("input", type=Path, help="checkpoint written by the seed report's tool")
    parser.add_argument("output", type=Path, help="where to write the segvoc checkpoint")
    parser.add_argument(
        "--output-stride",
        type=int,
        choices=(16, 8),
        default=16,
        help="output stride to run the network at; the file does not record it (default: 16, the seed tool's)",
    )
    args = parser.parse_args(argv)
    try:
        checkpoint = convert_file(args.input, args.output, args.output_stride)
    except SegvocError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(checkpoint, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
