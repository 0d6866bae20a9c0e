"""segvoc's checkpoint format: the self-describing meta (``describe``), safe reading (``read_checkpoint``,
``weights_only=True``), and rebuilding the network a checkpoint describes from the architecture table."""

from __future__ import annotations

import contextlib
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segvoc.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from segvoc.errors import SegvocError
from segvoc.models.deeplab import ARCHITECTURES, DeepLab
from segvoc.palette import IGNORE_INDEX, Palette, class_palette

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


def _numpy_scalar_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` must allow to rebuild a pickled numpy float or int scalar."""
    scalar = np.float64(0).__reduce__()[0]
    return [
        # numpy 1 pickles name numpy.core, numpy 2 pickles numpy._core; both resolve to the same function.
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *(type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32)),
    ]


SEED_SAFE_GLOBALS = _numpy_scalar_globals()


def seed_safe_globals() -> contextlib.AbstractContextManager:
    """A context in which ``torch.load(weights_only=True)`` also reads numeric numpy scalars, and nothing more.

    The seed tool stores ``best_score`` as a ``numpy.float64`` (its mean IoU), which the weights-only unpickler
    refuses by default. Rebuilding a numeric numpy scalar from its bytes runs no code.
    """
    return torch.serialization.safe_globals(SEED_SAFE_GLOBALS)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, never pickled objects."""
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
        detail = " ".join(str(exc).split())  # PyTorch's message spans many lines; one paragraph here
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        raise CheckpointError(
            f"The weights in {source} do not fit the network it describes ({detail}); the file was edited or "
            "written by another program. Use a checkpoint written by segvoc, or convert a seed checkpoint with "
            "`python -m segvoc.convert`."
        ) from exc
    return net.eval(), meta
