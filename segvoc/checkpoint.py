"""Reading checkpoints safely and rebuilding the network they describe, with nothing but the file."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from segvoc.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from segvoc.errors import SegvocError
from segvoc.models.deeplab import DeepLab, deeplabv3_mobilenet, deeplabv3plus_mobilenet
from segvoc.palette import IGNORE_INDEX, Palette, class_palette

# The networks a checkpoint may name. A checkpoint names one of these keys, never an import path, so loading one
# cannot run code.
ARCHITECTURES: dict[str, Callable[..., DeepLab]] = {
    "deeplabv3plus": deeplabv3plus_mobilenet,
    "deeplabv3": deeplabv3_mobilenet,
}
META_KEY = "segvoc"
# The final 1x1 convolution: the only tensors whose shape depends on the number of classes.
CLASSIFIER_KEYS = ("head.classifier.weight", "head.classifier.bias")

log = logging.getLogger(__name__)


class CheckpointError(SegvocError):
    """A checkpoint cannot be read or does not fit."""


def describe(
    net: DeepLab,
    class_names: list[str],
    mean: Any = IMAGENET_MEAN,
    std: Any = IMAGENET_STD,
    palette: Palette | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> dict:
    """The plain-value description stored under ``checkpoint["segvoc"]``: what prediction needs to run.

    ``palette`` holds one ``[R, G, B]`` per class (None: the VOC colour map's first colours); ``ignore_index`` is
    the label the training masks used for pixels without a class.
    """
    return {
        "net": dict(net.spec),
        "class_names": list(class_names),
        "palette": class_palette(len(class_names), palette).tolist(),
        "ignore_index": int(ignore_index),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }


def _net_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The network's entries of a segvoc checkpoint's ``state_dict`` (``net.*``), keys without the ``net.`` prefix."""
    state = checkpoint.get("state_dict")
    prefix = "net."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)} if isinstance(state, dict) else {}


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
    try:
        net.load_state_dict(_net_state(checkpoint))
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


def init_from_checkpoint(net: DeepLab, path: str | Path) -> None:
    """Load the network weights of the segvoc or seed checkpoint ``path`` into ``net``: where fine-tuning starts.

    Unlike resuming (``ckpt_path``), only the weights are taken, and the number of classes may differ: then the
    final classifier keeps ``net``'s fresh initialisation. Every other tensor must exist in both networks with the
    same shape (the output stride may differ: it is not part of the weights), else ``CheckpointError``. The file is
    read with ``weights_only=True``. Logs what was loaded.
    """
    from segvoc.seed_format import convert_seed_checkpoint, is_seed_checkpoint

    checkpoint = read_checkpoint(path)
    if is_seed_checkpoint(checkpoint):
        output_stride = net.spec.get("output_stride", 16)
        checkpoint = convert_seed_checkpoint(checkpoint, output_stride=output_stride, source=str(path))
    source = _net_state(checkpoint)
    if not source:
        raise CheckpointError(
            f"model.net.init_from={path} holds no network weights (no 'net.*' tensors in a state_dict). Give a "
            "checkpoint written by segvoc (outputs/train/<run>/checkpoints/best.ckpt) or by the seed report's tool."
        )
    target = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in source.items()}
    reinit = [k for k in CLASSIFIER_KEYS if k in shapes and shapes[k] != target.get(k)]
    unfit = [f"the checkpoint lacks {k!r}" for k in target if k not in shapes]
    unfit += [f"model.net has no {k!r}" for k in shapes if k not in target]
    unfit += [
        f"{k!r} is {shapes[k]} there but {target[k]} here"
        for k in shapes
        if k in target and k not in reinit and shapes[k] != target[k]
    ]
    meta_net = (checkpoint.get(META_KEY) or {}).get("net") or {}
    if unfit:
        raise CheckpointError(
            f"model.net.init_from={path} holds a {meta_net.get('arch', 'different')} network that does not fit "
            f"model.net ({net.spec.get('arch', type(net).__name__)}): {len(unfit)} tensors differ, e.g. {unfit[0]}. "
            "Fine-tune from a checkpoint of the same architecture (choose it with model=...); only the number of "
            "classes may differ."
        )
    net.load_state_dict({k: v for k, v in source.items() if k not in reinit}, strict=not reinit)
    classes = (shapes[CLASSIFIER_KEYS[0]][0], target[CLASSIFIER_KEYS[0]][0])
    if reinit:
        log.info(
            "init_from %s: %d -> %d classes, classifier re-initialised; %d of %d tensors loaded",
            path, *classes, len(target) - len(reinit), len(target),
        )  # fmt: skip
    else:
        log.info("init_from %s: all %d tensors loaded (%d classes)", path, len(target), classes[1])
    stem = (meta_net.get("stem_padding"), net.spec.get("stem_padding"))
    if None not in stem and stem[0] != stem[1]:
        log.warning(
            "init_from %s: its network ran the stem convolution with padding %d, this one uses %d; fine-tuning adapts "
            "to it, or pass ++model.net.stem_padding=%d to keep the source's.",
            path, stem[0], stem[1], stem[0],
        )  # fmt: skip
    # A segvoc spec without block_padding predates the key and ran with the default.
    blocks = (meta_net.get("block_padding", "depthwise") if meta_net else None, net.spec.get("block_padding"))
    if None not in blocks and blocks[0] != blocks[1]:
        log.warning(
            "init_from %s: its network padded the inverted-residual blocks with block_padding=%s, this one uses %s; "
            "fine-tuning adapts to it, or pass ++model.net.block_padding=%s to keep the source's.",
            path, blocks[0], blocks[1], blocks[0],
        )  # fmt: skip
