"""MobileNetV2 feature extractor for DeepLab: low-level features at stride 4, high-level at the output stride."""

from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from segvoc.errors import SegvocError

# Index in torchvision's ``mobilenet_v2().features`` where the stride-4, 24-channel stage ends.
_LOW_LEVEL_END = 4
# features[18] (1x1 conv 320 -> 1280) is the classification neck; DeepLab drops it.
_HIGH_LEVEL_END = 18
# Where an inverted-residual block pads for its 3x3 depthwise conv: "depthwise" at that conv (torchvision, ImageNet
# training), "input" at the block's input, before the 1x1 expansion (the seed report's tool; see InputPaddedBlock).
BlockPadding = Literal["depthwise", "input"]
BLOCK_PADDINGS: tuple[str, ...] = get_args(BlockPadding)


# The output strides the backbone can run at (strides beyond them become dilations) and ASPP has rates for.
OUTPUT_STRIDES = (16, 8)


def check_output_stride(
    output_stride: object, key: str = "model.net.output_stride", error: type[SegvocError] = SegvocError
) -> None:
    """Raise ``error`` naming ``key`` unless ``output_stride`` is one of ``OUTPUT_STRIDES``."""
    if output_stride not in OUTPUT_STRIDES:
        raise error(
            f"{key}={output_stride} is not supported: use 16 (ASPP rates 6/12/18) or 8 (12/24/36, about 3x the "
            "compute)."
        )


class WeightsUnavailableError(SegvocError):
    """The ImageNet weights for the backbone could not be obtained."""


def _spatial_conv(block: nn.Module) -> nn.Conv2d:
    """Return the one 3x3 convolution of a MobileNetV2 stage (the stem conv or a block's depthwise conv)."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 1, f"expected one 3x3 conv per MobileNetV2 stage, found {len(convs)}"
    return convs[0]


def _apply_output_stride(features: nn.Sequential, output_stride: int) -> None:
    """Turn the strides that would exceed ``output_stride`` into dilations, in place.

    The stage whose stride is removed keeps the current dilation; every stage after it gets the dilation doubled,
    so the receptive field is unchanged. Padding equals the dilation, so spatial size is preserved.
    """
    current_stride, dilation = 1, 1
    for block in features:
        conv = _spatial_conv(block)
        stride = conv.stride[0]
        if stride > 1 and current_stride >= output_stride:
            conv.stride = (1, 1)
            conv.dilation = conv.padding = (dilation, dilation)
            dilation *= stride
            continue
        current_stride *= stride
        if stride == 1:
            conv.dilation = conv.padding = (dilation, dilation)


def _load_imagenet_state(weights_path: str | Path | None) -> dict[str, torch.Tensor]:
    """Return torchvision MobileNetV2 ImageNet weights from ``weights_path`` or torchvision's weights API."""
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise WeightsUnavailableError(
                f"model.net.weights_path={path} does not exist. Point it at the ImageNet MobileNetV2 state dict "
                "(torchvision's mobilenet_v2-b0353104.pth), or set model.net.weights_path=null to fetch it."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure gets the same advice
            raise WeightsUnavailableError(
                f"Could not read backbone weights from {path} ({exc}). The file must be a plain state dict of "
                "torchvision's MobileNetV2 (tensors only); re-download it or set model.net.pretrained=false."
            ) from exc
        return state.get("state_dict", state)
    try:
        return MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        url = MobileNet_V2_Weights.IMAGENET1K_V1.url
        raise WeightsUnavailableError(
            f"Could not download the ImageNet MobileNetV2 weights from {url} ({exc}). Either download that file "
            "on a machine with network access and pass it with model.net.weights_path=/path/to/mobilenet_v2.pth, or "
            "train from scratch with model.net.pretrained=false (expect a much lower mIoU on VOC)."
        ) from exc


class InputPaddedBlock(nn.Module):
    """A torchvision MobileNetV2 inverted-residual block that zero-pads its input instead of its depthwise conv.

    The seed report's tool pads the block's input by the depthwise dilation ``d`` on every side, then runs the 1x1
    expansion + BN + ReLU6 (where the block has one), the 3x3 depthwise conv unpadded, the projection, and adds the
    residual to the unpadded input. The depthwise conv therefore sees ``ReLU6(BN(conv(0)))`` at the border, not
    zeros; output sizes are those of torchvision's block. The block's layers are kept under the same name
    (``conv``), so the state-dict keys do not change.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        depthwise = _spatial_conv(block)
        self.pad = depthwise.dilation[0]
        depthwise.padding = (0, 0)
        self.conv = block.conv
        self.use_res_connect = bool(block.use_res_connect)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, residual={self.use_res_connect}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.pad(x, (self.pad, self.pad, self.pad, self.pad)))
        return x + y if self.use_res_connect else y


class MobileNetV2Backbone(nn.Module):
    """MobileNetV2 without its classifier, split for DeepLab.

    ``forward(x)`` returns ``{"low": (N, 24, H/4, W/4), "high": (N, 320, H/os, W/os)}`` (sizes rounded up).
    ``stem_padding=0`` and ``block_padding="input"`` reproduce the seed report's tool (its checkpoints need both);
    the defaults are torchvision's, which the ImageNet weights were trained with. ``bn_momentum`` sets the momentum
    of every BatchNorm layer here (None: PyTorch's 0.1; the seed tool trains with 0.01); it changes training only.
    """

    low_channels = 24
    high_channels = 320

    def __init__(
        self,
        output_stride: int = 16,
        pretrained: bool = False,
        weights_path: str | Path | None = None,
        stem_padding: int = 1,
        block_padding: BlockPadding = "depthwise",
        bn_momentum: float | None = None,
    ) -> None:
        super().__init__()
        check_output_stride(output_stride)
        if block_padding not in BLOCK_PADDINGS:
            raise SegvocError(
                f"model.net.block_padding={block_padding!r} is not supported; use 'depthwise' (torchvision's, for "
                "ImageNet-initialised training) or 'input' (the seed report's tool)."
            )
        net = mobilenet_v2(weights=None)
        if pretrained or weights_path is not None:
            state = _load_imagenet_state(weights_path)
            missing, _ = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if k.startswith("features.")]
            if missing:
                raise WeightsUnavailableError(
                    f"The backbone weights lack {len(missing)} MobileNetV2 tensors (e.g. {missing[0]}); "
                    "they are not torchvision MobileNetV2 ImageNet weights."
                )
        features = net.features[:_HIGH_LEVEL_END]
        # The seed report's tool runs the stem conv unpadded (stem_padding=0); its checkpoints need that to match.
        features[0][0].padding = (stem_padding, stem_padding)
        _apply_output_stride(features, output_stride)
        if block_padding == "input":  # after the output stride: each block pads by its final dilation
            for i in range(1, len(features)):
                features[i] = InputPaddedBlock(features[i])
        if bn_momentum is not None:
            for module in features.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.momentum = bn_momentum
        self.output_stride = output_stride
        self.low_level = nn.Sequential(*features[:_LOW_LEVEL_END])
        self.high_level = nn.Sequential(*features[_LOW_LEVEL_END:])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        low = self.low_level(x)
        return {"low": low, "high": self.high_level(low)}
