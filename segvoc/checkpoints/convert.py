"""``python -m segvoc.convert <seed.pth> <out.ckpt> [--output-stride 16|8]``: import a checkpoint of the seed
report's tool (DeepLabV3Plus-Pytorch format) into segvoc's format, which ``predict.py ckpt=<out.ckpt>`` loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from segvoc.checkpoints.format import META_KEY, CheckpointError, read_checkpoint, seed_safe_globals
from segvoc.checkpoints.seed import convert_seed_checkpoint
from segvoc.cli import command, command_parser, run_command


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


@command
def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (1 with a message on stderr for a user error)."""
    parser = command_parser(
        "segvoc.convert",
        "Convert a checkpoint of the seed report's tool (DeepLabV3Plus-Pytorch, deeplabv3plus_mobilenet) to segvoc's\n"
        "self-describing format. predict.py and train.py also read seed checkpoints directly.",
        ["python -m segvoc.convert best_deeplabv3plus_mobilenet_voc_os16.pth seed.ckpt"],
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
    checkpoint = convert_file(args.input, args.output, args.output_stride)
    print(summary(checkpoint, args.output))
    return 0


if __name__ == "__main__":
    run_command(main)
