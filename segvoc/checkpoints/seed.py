"""Checkpoints of the seed report's tool (DeepLabV3Plus-Pytorch format) and their conversion to segvoc's format.

A seed checkpoint is a dict ``{"cur_itrs", "model_state", "optimizer_state", "scheduler_state", "best_score"}`` whose
``model_state`` holds the 356 tensors of ``deeplabv3plus_mobilenet``. The tensors are the same as ours under other
names; only the decoder's 3x3 conv needs its input channels reordered (see ``seed_to_segvoc_state``). The network
is built as the seed tool runs it: stem conv unpadded (``stem_padding=0``), inverted-residual blocks padded at their
input (``block_padding="input"``); both are recorded in the converted checkpoint's spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from segvoc.checkpoints.format import META_KEY, CheckpointError, describe
from segvoc.models.backbone import check_output_stride
from segvoc.models.deeplab import DeepLab, deeplabv3plus_mobilenet
from segvoc.palette import default_class_names

SEED_STATE_KEY = "model_state"
NET_PREFIX = "net."
_CLASSIFIER_WEIGHT = "classifier.classifier.3.weight"
_DECODER_CONV_WEIGHT = "classifier.classifier.0.weight"
_LOW_PROJECT_WEIGHT = "classifier.project.0.weight"


def _module_renames() -> dict[str, str]:
    """Seed module prefix -> our module prefix (both without ``net.``), one entry per renamed module."""
    renames = {f"backbone.low_level_features.{i}.": f"backbone.low_level.{i}." for i in range(4)}
    # The seed slices torchvision's features[4:18] without renumbering; our high_level counts from 0.
    renames |= {f"backbone.high_level_features.{i}.": f"backbone.high_level.{i - 4}." for i in range(4, 18)}
    renames |= {f"classifier.aspp.convs.{i}.": f"head.aspp.branches.{i}." for i in range(4)}
    renames |= {
        # convs.4 is Sequential(AdaptiveAvgPool2d, conv, bn, relu): the pool at index 0 has no tensors.
        "classifier.aspp.convs.4.1.": "head.aspp.branches.4.conv.",
        "classifier.aspp.convs.4.2.": "head.aspp.branches.4.bn.",
        "classifier.aspp.project.": "head.aspp.project.0.",
        "classifier.project.": "head.low_project.",
        "classifier.classifier.0.": "head.fuse.0.",
        "classifier.classifier.1.": "head.fuse.1.",
        "classifier.classifier.3.": "head.classifier.",
    }
    return renames


_RENAMES = _module_renames()
_INVERSE = {ours: seed for seed, ours in _RENAMES.items()}


def is_seed_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` is in the seed tool's format (a ``model_state`` dict), whatever network it holds.

    Any seed-format file counts, so that ``convert_seed_checkpoint`` can say why an unsupported one (a ResNet or
    DeepLabV3 model) cannot be converted instead of it being reported as an unknown file.
    """
    return isinstance(checkpoint.get(SEED_STATE_KEY), Mapping)


def _rename(seed_key: str) -> str | None:
    for seed_prefix, our_prefix in _RENAMES.items():
        if seed_key.startswith(seed_prefix):
            return our_prefix + seed_key[len(seed_prefix) :]
    return None


def _seed_name(our_key: str) -> str:
    """The seed name of one of our state-dict keys (without ``net.``)."""
    for our_prefix, seed_prefix in _INVERSE.items():
        if our_key.startswith(our_prefix):
            return seed_prefix + our_key[len(our_prefix) :]
    return our_key


def _unknown_key_error(key: str, source: str | Path) -> CheckpointError:
    if key.startswith("classifier.classifier.0.convs."):
        why = "it holds a DeepLabV3 model without the V3+ decoder"
    elif key.startswith("backbone.") and not key.startswith(
        ("backbone.low_level_features.", "backbone.high_level_features.")
    ):
        why = "its backbone is not MobileNetV2 (a ResNet or HRNet seed model?)"
    else:
        why = "the key is not part of deeplabv3plus_mobilenet"
    return CheckpointError(
        f"Cannot convert {source}: its model_state has the key {key!r}, so {why}. Only the seed tool's "
        "--model deeplabv3plus_mobilenet can be converted; run other seed models with the seed tool itself."
    )


def seed_to_segvoc_state(model_state: Mapping[str, torch.Tensor], source: str | Path = "checkpoint") -> dict[str, Any]:
    """Rename a seed ``model_state`` into the keys of ``DeepLab.state_dict()`` prefixed ``net.``.

    Raises ``CheckpointError`` naming the first key that deeplabv3plus_mobilenet does not have. Missing keys and
    shapes are checked by ``convert_seed_checkpoint``, which knows the network.
    """
    if model_state and all(k.startswith("module.") for k in model_state):  # saved from a DataParallel wrapper
        model_state = {k[len("module.") :]: v for k, v in model_state.items()}
    state: dict[str, Any] = {}
    for key, value in model_state.items():
        ours = _rename(key)
        if ours is None:
            raise _unknown_key_error(key, source)
        state[NET_PREFIX + ours] = value
    if _DECODER_CONV_WEIGHT in model_state and _LOW_PROJECT_WEIGHT in model_state:
        # The seed decoder concatenates [low-level (48), ASPP (256)]; ours concatenates [ASPP, low-level].
        weight = model_state[_DECODER_CONV_WEIGHT]
        low = model_state[_LOW_PROJECT_WEIGHT].shape[0]
        state[NET_PREFIX + _rename(_DECODER_CONV_WEIGHT)] = torch.cat([weight[:, low:], weight[:, :low]], dim=1)
    return state


def _check_fits(state: Mapping[str, Any], net: DeepLab, source: str | Path) -> None:
    """Raise ``CheckpointError`` naming the first seed key that is extra, missing or of the wrong shape."""
    expected_state = net.state_dict()
    for key in state:
        if key[len(NET_PREFIX) :] not in expected_state:
            raise _unknown_key_error(_seed_name(key[len(NET_PREFIX) :]), source)
    for key, expected in expected_state.items():
        value = state.get(NET_PREFIX + key)
        if value is None:
            raise CheckpointError(
                f"Cannot convert {source}: its model_state lacks {_seed_name(key)!r}; the file is incomplete or "
                "not a deeplabv3plus_mobilenet checkpoint of the seed report's tool."
            )
        if not isinstance(value, torch.Tensor) or value.shape != expected.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(
                f"Cannot convert {source}: {_seed_name(key)!r} has shape {shape}, deeplabv3plus_mobilenet needs "
                f"{tuple(expected.shape)}; the seed model was built with other settings (width multiplier?)."
            )


def convert_seed_checkpoint(
    checkpoint: Mapping[str, Any],
    output_stride: int = 16,
    class_names: list[str] | None = None,
    source: str | Path = "checkpoint",
) -> dict[str, Any]:
    """Return a segvoc checkpoint ``{"state_dict", "segvoc", "seed"}`` built from a seed checkpoint.

    The state dict cannot tell which output stride the seed model ran at, so ``output_stride`` (8 or 16; the seed
    tool's default is 16) is taken as given. ``class_names`` defaults to the VOC classes for 21 classes and to
    ``class_<i>`` otherwise. The result loads with ``segvoc.checkpoints.format.build_from_checkpoint``; ``"seed"``
    keeps the seed's ``cur_itrs`` and ``best_score`` as plain values.
    """
    if not is_seed_checkpoint(checkpoint):
        raise CheckpointError(
            f"{source} is not a checkpoint of the seed report's tool: it has no '{SEED_STATE_KEY}' dictionary "
            f"(its keys: {list(checkpoint)[:8]})."
        )
    check_output_stride(output_stride, f"The output stride for {source}", CheckpointError)
    model_state = checkpoint[SEED_STATE_KEY]
    state = seed_to_segvoc_state(model_state, source)
    classifier = state.get(NET_PREFIX + "head.classifier.weight")
    if not isinstance(classifier, torch.Tensor):
        raise CheckpointError(
            f"Cannot convert {source}: its model_state lacks {_CLASSIFIER_WEIGHT!r}, which gives the number of "
            "classes; the file is incomplete."
        )
    num_classes = classifier.shape[0]
    if class_names is None:
        class_names = default_class_names(num_classes)
    if len(class_names) != num_classes:
        raise CheckpointError(
            f"{source} predicts {num_classes} classes but {len(class_names)} class names were given; pass one name "
            "per output channel."
        )
    net = deeplabv3plus_mobilenet(
        num_classes=num_classes, output_stride=output_stride, stem_padding=0, block_padding="input"
    )
    _check_fits(state, net, source)
    net.load_state_dict({k[len(NET_PREFIX) :]: v for k, v in state.items()})
    best_score = checkpoint.get("best_score")
    cur_itrs = checkpoint.get("cur_itrs")
    return {
        "state_dict": state,
        META_KEY: describe(net, class_names),
        "seed": {
            "cur_itrs": None if cur_itrs is None else int(cur_itrs),
            "best_score": None if best_score is None else float(best_score),
        },
    }
