"""DeepLab heads: ASPP (atrous spatial pyramid pooling with image pooling), the DeepLabV3 head and the DeepLabV3+
decoder. Each takes the backbone's feature dict (``"low"``, ``"high"``) and returns logits at its own stride."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average, 1x1 conv + BN + ReLU, broadcast back to the input size.

    The pooled map has one value per channel and image, so BatchNorm cannot compute batch statistics for a batch
    of one; in that case (training with batch 1) it normalises with its running statistics instead of failing.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.adaptive_avg_pool2d(x, 1))
        if self.training and y.shape[0] == 1:
            bn = self.bn
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            y = self.bn(y)
        return F.interpolate(F.relu(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three atrous 3x3 branches, image pooling, 1x1 projection."""

    def __init__(self, in_ch: int, rates: Sequence[int], out_ch: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_ch, out_ch)]
            + [_conv_bn_relu(in_ch, out_ch, kernel=3, dilation=r) for r in rates]
            + [ImagePooling(in_ch, out_ch)]
        )
        self.project = nn.Sequential(
            _conv_bn_relu(out_ch * len(self.branches), out_ch),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLabV3Head(nn.Module):
    """DeepLabV3: ASPP on the high-level features, a 3x3 conv, a 1x1 classifier. Logits at the output stride."""

    def __init__(self, high_ch: int, num_classes: int, rates: Sequence[int], channels: int = 256) -> None:
        super().__init__()
        self.aspp = ASPP(high_ch, rates, channels)
        self.fuse = _conv_bn_relu(channels, channels, kernel=3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.fuse(self.aspp(features["high"])))


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+: ASPP output upsampled to stride 4, joined with projected low-level features, 3x3 conv, 1x1.

    Returns logits at stride 4 of the input.
    """

    def __init__(
        self,
        low_ch: int,
        high_ch: int,
        num_classes: int,
        rates: Sequence[int],
        channels: int = 256,
        low_proj_ch: int = 48,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(high_ch, rates, channels)
        self.low_project = _conv_bn_relu(low_ch, low_proj_ch)
        self.fuse = _conv_bn_relu(channels + low_proj_ch, channels, kernel=3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        low = self.low_project(features["low"])
        high = F.interpolate(self.aspp(features["high"]), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([high, low], dim=1)))
