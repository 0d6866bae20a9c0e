"""Loading a saved model of any kind (segvoc checkpoint, seed-tool checkpoint, ONNX, TorchScript) and building the
network of a config, with ``init_from``'s weights: the one place above ``segvoc.models`` and the checkpoint formats
that prediction, evaluation, export and training use."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from segvoc.checkpoints.exported import load_exported
from segvoc.checkpoints.format import (
    CLASSIFIER_KEYS,
    META_KEY,
    CheckpointError,
    _net_state,
    build_from_checkpoint,
    read_checkpoint,
)
from segvoc.checkpoints.seed import convert_seed_checkpoint, is_seed_checkpoint
from segvoc.models.deeplab import ARCHITECTURES, DeepLab

log = logging.getLogger(__name__)


def load_model(path: str | Path, output_stride: int = 16) -> tuple[DeepLab, dict[str, Any]]:
    """Read ``path`` safely and return ``(network in eval mode, meta)``; see ``describe`` for ``meta``.

    Accepts segvoc checkpoints and those of the seed report's tool; the latter do not record their output stride,
    so ``output_stride`` gives it (segvoc checkpoints carry their own and ignore it).
    """
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


def build_net(arch: str = "deeplabv3plus", init_from: str | Path | None = None, **options: Any) -> DeepLab:
    """The network of ``model.net``: ``ARCHITECTURES[arch](**options)``; with ``init_from`` (fine-tuning) the
    ImageNet weights are not fetched and the checkpoint's weights are loaded instead (``init_from_checkpoint``)."""
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"model.net.arch={arch} is not a known architecture; use one of {sorted(ARCHITECTURES)}.")
    if init_from:
        options.update(pretrained=False, weights_path=None)  # the checkpoint's weights replace the ImageNet ones
    net = ARCHITECTURES[arch](**options)
    if init_from:
        init_from_checkpoint(net, Path(init_from).expanduser())
    return net


def load_predictor(path: str | Path, output_stride: int = 16) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict]:
    """``(net, meta)`` from a segvoc or seed checkpoint, an ONNX file, or a TorchScript file."""
    path = Path(path)
    if path.suffix == ".onnx" or (path.is_file() and zipfile.is_zipfile(path) and _is_torchscript(path)):
        return load_exported(path)
    return load_model(path, output_stride=output_stride)


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())
