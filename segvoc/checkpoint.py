"""Reading checkpoints safely and rebuilding the network they describe, with nothing but the file."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from segvoc.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from segvoc.errors import SegvocError
from segvoc.models.deeplab import DeepLab, deeplabv3_mobilenet, deeplabv3plus_mobilenet
from segvoc.palette import IGNORE_INDEX, voc_palette

# The networks a checkpoint may name. A checkpoint names one of these keys, never an import path, so loading one
# cannot run code.
ARCHITECTURES: dict[str, Callable[..., DeepLab]] = {
    "deeplabv3plus": deeplabv3plus_mobilenet,
    "deeplabv3": deeplabv3_mobilenet,
}
META_KEY = "segvoc"


class CheckpointError(SegvocError):
    """A checkpoint cannot be read or does not fit."""


def describe(net: DeepLab, class_names: list[str], mean: Any = IMAGENET_MEAN, std: Any = IMAGENET_STD) -> dict:
    """The plain-value description stored under ``checkpoint["segvoc"]``: what prediction needs to run."""
    return {
        "net": dict(net.spec),
        "class_names": list(class_names),
        "palette": voc_palette()[: len(class_names)].tolist(),
        "ignore_index": IGNORE_INDEX,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, never pickled objects."""
    from segvoc.seed_format import seed_safe_globals

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"The checkpoint {path} does not exist; check the path you gave.")
    try:
        with seed_safe_globals():  # numpy scalars, as in the seed's best_score; still no code runs
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"Refusing to load {path}: it contains pickled Python objects, which could run code when loaded "
            f"({str(exc).splitlines()[0]}). Load only checkpoints written by segvoc or the seed report's tool, or "
            "re-save the state dict of tensors from a trusted environment."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - truncated or foreign files all get the same advice
        raise CheckpointError(
            f"Cannot read the checkpoint {path} ({exc}); the file is truncated or not a checkpoint."
        ) from exc
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dictionary.")
    return checkpoint


def build_from_checkpoint(
    checkpoint: dict[str, Any], source: str | Path = "checkpoint"
) -> tuple[DeepLab, dict[str, Any]]:
    """Rebuild the network of a segvoc checkpoint and load its weights; return ``(net in eval mode, meta)``."""
    meta = checkpoint.get(META_KEY)
    if not isinstance(meta, dict) or "net" not in meta:
        raise CheckpointError(
            f"{source} does not describe its network (no '{META_KEY}' entry). Checkpoints of the seed report's tool "
            "are converted with `python -m segvoc.convert <in> <out>`."
        )
    spec = dict(meta["net"])
    arch = spec.pop("arch", None)
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{source} names the architecture {arch!r}; known: {sorted(ARCHITECTURES)}.")
    net = ARCHITECTURES[arch](**spec)
    prefix = "net."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"The weights in {source} do not fit the network it describes: {exc}") from exc
    return net.eval(), meta


def load_model(path: str | Path, output_stride: int = 16) -> tuple[DeepLab, dict[str, Any]]:
    """Read ``path`` safely and return ``(network in eval mode, meta)``; see ``describe`` for ``meta``.

    Accepts segvoc checkpoints and those of the seed report's tool; the latter do not record their output stride,
    so ``output_stride`` gives it (segvoc checkpoints carry their own and ignore it).
    """
    from segvoc.seed_format import convert_seed_checkpoint, is_seed_checkpoint

    checkpoint = read_checkpoint(path)
    if is_seed_checkpoint(checkpoint):
        checkpoint = convert_seed_checkpoint(checkpoint, output_stride=output_stride, source=str(path))
    return build_from_checkpoint(checkpoint, path)
