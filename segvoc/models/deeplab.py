"""The DeepLab networks: a backbone joined to a head, the builders of each architecture, and the architecture table
(``ARCHITECTURES``) by which checkpoints name their network. Plain ``nn.Module``s: nothing here reads checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segvoc.models.backbone import BlockPadding, MobileNetV2Backbone
from segvoc.models.heads import DeepLabV3Head, DeepLabV3PlusHead

ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


class DeepLab(nn.Module):
    """A backbone and a head; ``forward(images)`` returns logits ``(N, C, H, W)`` at the input's size.

    ``spec`` holds the plain values that rebuild the network (architecture name, classes, output stride, stem and
    block padding); checkpoints store it so that prediction needs nothing but the checkpoint. A spec without
    ``block_padding`` (checkpoints written before it was recorded) rebuilds with the default, ``"depthwise"``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, spec: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = dict(spec or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _deeplabv3plus_head(backbone: MobileNetV2Backbone, num_classes: int, rates: tuple[int, ...]) -> nn.Module:
    return DeepLabV3PlusHead(backbone.low_channels, backbone.high_channels, num_classes, rates)


def _deeplabv3_head(backbone: MobileNetV2Backbone, num_classes: int, rates: tuple[int, ...]) -> nn.Module:
    return DeepLabV3Head(backbone.high_channels, num_classes, rates)


# The heads a checkpoint may name (its spec's ``arch``). A checkpoint names one of these keys, never an import path,
# so loading one cannot run code.
HEADS: dict[str, Callable[[MobileNetV2Backbone, int, tuple[int, ...]], nn.Module]] = {
    "deeplabv3plus": _deeplabv3plus_head,  # ASPP + decoder on the stride-4 features: 5,225,717 parameters
    "deeplabv3": _deeplabv3_head,  # ASPP only
}


def deeplab_mobilenet(
    arch: str = "deeplabv3plus",
    num_classes: int = 21,
    output_stride: int = 16,
    pretrained: bool = False,
    weights_path: str | Path | None = None,
    stem_padding: int = 1,
    block_padding: BlockPadding = "depthwise",
    backbone_bn_momentum: float | None = None,
) -> DeepLab:
    """The DeepLab network ``arch`` (a key of ``HEADS``) on a MobileNetV2 backbone.

    ``stem_padding``, ``block_padding``, ``backbone_bn_momentum``: see ``MobileNetV2Backbone`` (``bn_momentum``); the
    paddings are part of the spec a checkpoint records, the momentum is a training setting and is not.
    """
    backbone = MobileNetV2Backbone(
        output_stride, pretrained, weights_path, stem_padding, block_padding, backbone_bn_momentum
    )
    head = HEADS[arch](backbone, num_classes, ASPP_RATES[output_stride])
    spec = {"arch": arch, "num_classes": num_classes, "output_stride": output_stride}
    spec |= {"stem_padding": stem_padding, "block_padding": block_padding}
    return DeepLab(backbone, head, spec)


def deeplabv3plus_mobilenet(**options: Any) -> DeepLab:
    """DeepLabV3+ on MobileNetV2 (5,225,717 parameters with 21 classes); options of ``deeplab_mobilenet``."""
    return deeplab_mobilenet("deeplabv3plus", **options)


def deeplabv3_mobilenet(**options: Any) -> DeepLab:
    """DeepLabV3 (no decoder) on MobileNetV2; options of ``deeplab_mobilenet``."""
    return deeplab_mobilenet("deeplabv3", **options)


# Builders by architecture name: what ``segvoc.checkpoints`` rebuilds a checkpoint's network with.
ARCHITECTURES: dict[str, Callable[..., DeepLab]] = {
    "deeplabv3plus": deeplabv3plus_mobilenet,
    "deeplabv3": deeplabv3_mobilenet,
}
