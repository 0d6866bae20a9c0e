"""DeepLab networks: parameter count, output shapes, strides and dilations, weight loading errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segvoc.checkpoints.format import build_from_checkpoint, describe
from segvoc.errors import SegvocError
from segvoc.models.backbone import InputPaddedBlock, MobileNetV2Backbone, WeightsUnavailableError
from segvoc.models.deeplab import deeplabv3_mobilenet, deeplabv3plus_mobilenet
from segvoc.palette import VOC_CLASSES


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_deeplabv3plus_has_the_seed_parameter_count() -> None:
    model = deeplabv3plus_mobilenet(num_classes=21, output_stride=16)
    assert n_params(model) == 5_225_717
    assert len(model.state_dict()) == 356  # same number of tensors as the seed's checkpoints


def test_parameter_count_does_not_depend_on_output_stride() -> None:
    assert n_params(deeplabv3plus_mobilenet(output_stride=8)) == 5_225_717


@pytest.mark.parametrize("size", [(65, 65), (97, 131), (64, 65), (33, 50)])  # 65 = 64k+1 like 513
@pytest.mark.parametrize("factory", [deeplabv3plus_mobilenet, deeplabv3_mobilenet])
def test_logits_have_input_size_for_odd_sizes_in_eval(size: tuple[int, int], factory) -> None:
    model = factory(num_classes=21).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 21, *size)


def test_batch_of_one_trains() -> None:
    model = deeplabv3plus_mobilenet(num_classes=5).train()
    out = model(torch.randn(1, 3, 67, 91))
    out.mean().backward()
    assert out.shape == (1, 5, 67, 91)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    ("output_stride", "high_size"),
    [(16, 5), (8, 9)],  # 65 -> 33 -> 17 (low level, stride 4) -> 9 (stride 8) -> 5 (stride 16)
)
def test_feature_strides(output_stride: int, high_size: int) -> None:
    backbone = MobileNetV2Backbone(output_stride=output_stride).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 65, 65))
    assert features["low"].shape == (1, 24, 17, 17)
    assert features["high"].shape == (1, 320, high_size, high_size)


def _spatial_convs(backbone: MobileNetV2Backbone) -> list[nn.Conv2d]:
    blocks = list(backbone.low_level) + list(backbone.high_level)
    return [next(m for m in b.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)) for b in blocks]


def test_strides_and_dilations_follow_the_seed_layout() -> None:
    # ../shared/reference/seed-checkpoint-layout.txt, by torchvision features index
    os16 = _spatial_convs(MobileNetV2Backbone(output_stride=16))
    assert [i for i, c in enumerate(os16) if c.stride == (2, 2)] == [0, 2, 4, 7]
    assert [i for i, c in enumerate(os16) if c.dilation == (2, 2)] == [15, 16, 17]
    os8 = _spatial_convs(MobileNetV2Backbone(output_stride=8))
    assert [i for i, c in enumerate(os8) if c.stride == (2, 2)] == [0, 2, 4]
    assert [i for i, c in enumerate(os8) if c.dilation == (2, 2)] == list(range(8, 15))
    assert [i for i, c in enumerate(os8) if c.dilation == (4, 4)] == [15, 16, 17]
    assert all(c.padding == c.dilation for c in os8[1:])


def test_unsupported_output_stride_is_a_clear_error() -> None:
    with pytest.raises(SegvocError, match="output_stride=32"):
        MobileNetV2Backbone(output_stride=32)


def test_local_weights_file_is_loaded(tmp_path) -> None:
    from torchvision.models import mobilenet_v2

    reference = mobilenet_v2(weights=None)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(reference.state_dict(), path)
    backbone = MobileNetV2Backbone(weights_path=path)
    assert torch.equal(backbone.low_level[0][0].weight, reference.features[0][0].weight)
    assert torch.equal(backbone.high_level[13].conv[2].weight, reference.features[17].conv[2].weight)


def test_missing_weights_file_names_the_ways_out(tmp_path) -> None:
    with pytest.raises(WeightsUnavailableError, match=r"^model\.net\.weights_path="):
        MobileNetV2Backbone(weights_path=tmp_path / "nope.pth")


def test_unreachable_weights_name_both_ways_out(monkeypatch) -> None:
    from torchvision.models import MobileNet_V2_Weights

    def offline(*args, **kwargs):
        import urllib.error

        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(type(MobileNet_V2_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        MobileNetV2Backbone(pretrained=True)
    assert "model.net.weights_path" in str(info.value) and "model.net.pretrained=false" in str(info.value)


@pytest.mark.parametrize("output_stride", [16, 8])
def test_input_block_padding_keeps_keys_sizes_and_geometry(output_stride: int) -> None:
    torchvision = deeplabv3plus_mobilenet(output_stride=output_stride).eval()
    seed = deeplabv3plus_mobilenet(output_stride=output_stride, block_padding="input").eval()
    assert list(seed.state_dict()) == list(torchvision.state_dict())  # seed and segvoc checkpoints load unchanged
    assert seed.spec["block_padding"] == "input" and torchvision.spec["block_padding"] == "depthwise"
    blocks = list(seed.backbone.low_level)[1:] + list(seed.backbone.high_level)
    assert all(isinstance(b, InputPaddedBlock) for b in blocks) and len(blocks) == 17
    assert [b.pad for b in blocks] == [c.dilation[0] for c in _spatial_convs(torchvision.backbone)[1:]]
    assert all(c.padding == (0, 0) for c in _spatial_convs(seed.backbone)[1:])
    seed.load_state_dict(torchvision.state_dict())
    x = torch.randn(1, 3, 67, 90)
    with torch.no_grad():
        assert seed(x).shape == torchvision(x).shape == (1, 21, 67, 90)


def test_spec_without_block_padding_rebuilds_torchvision_padding() -> None:
    # Checkpoints written before block_padding was recorded ran with torchvision's padding.
    net = deeplabv3plus_mobilenet().eval()
    meta = describe(net, list(VOC_CLASSES))
    del meta["net"]["block_padding"]
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    rebuilt, _ = build_from_checkpoint({"state_dict": state, "segvoc": meta})
    assert rebuilt.spec["block_padding"] == "depthwise"
    assert not any(isinstance(m, InputPaddedBlock) for m in rebuilt.modules())


def test_unknown_block_padding_is_a_clear_error() -> None:
    with pytest.raises(SegvocError, match="model.net.block_padding='zeros' is not supported"):
        deeplabv3plus_mobilenet(block_padding="zeros")


def test_backbone_bn_momentum_sets_only_the_backbone() -> None:
    net = deeplabv3plus_mobilenet(backbone_bn_momentum=0.01)
    backbone = [m.momentum for m in net.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    head = [m.momentum for m in net.head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(backbone) == 51 and set(backbone) == {0.01} and set(head) == {0.1}
    assert "backbone_bn_momentum" not in net.spec  # a training setting: the checkpoint's spec rebuilds without it
    default = deeplabv3plus_mobilenet()
    assert {m.momentum for m in default.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}
