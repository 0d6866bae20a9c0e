"""Converting checkpoints of the seed report's tool: key mapping, identical logits, clear errors, the command line.

The seed network is rebuilt here independently of segvoc.models, from the documented layout of the seed tool's
checkpoints (DeepLabV3Plus-Pytorch's deeplabv3plus_mobilenet), so that a mapping error cannot cancel itself out.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segvoc.checkpoints.convert import main
from segvoc.checkpoints.format import CheckpointError, build_from_checkpoint, read_checkpoint, seed_safe_globals
from segvoc.checkpoints.load import build_net, load_model
from segvoc.checkpoints.seed import convert_seed_checkpoint, is_seed_checkpoint
from segvoc.palette import VOC_CLASSES

ROOT = Path(__file__).resolve().parents[1]


# MobileNetV2's inverted-residual stages (Sandler et al. 2018, table 2): expansion t, channels c, repeats n. The
# strides come from the seed geometry below.
_MOBILENET_V2_STAGES = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]


def _seed_geometry(output_stride: int) -> list[tuple[int, int]]:
    """(stride, dilation) of the 3x3 conv of each torchvision ``features`` block 0..17, as the seed tool runs it."""
    if output_stride == 16:
        strides, dilations = {0: 2, 2: 2, 4: 2, 7: 2}, dict.fromkeys((15, 16, 17), 2)
    else:
        strides, dilations = {0: 2, 2: 2, 4: 2}, {**dict.fromkeys(range(8, 15), 2), **dict.fromkeys((15, 16, 17), 4)}
    return [(strides.get(i, 1), dilations.get(i, 1)) for i in range(18)]


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1) -> list[nn.Module]:
    pad = dilation if kernel == 3 else 0
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding=pad, dilation=dilation, bias=False)
    return [conv, nn.BatchNorm2d(out_ch), nn.ReLU()]


def _conv_bn_relu6(
    in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, dilation: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv (never padded: the seed tool pads the stem not at all and the blocks at their input), BN, ReLU6."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=0, dilation=dilation, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_ch), nn.ReLU6())


class SeedInvertedResidual(nn.Module):
    """A MobileNetV2 block as the seed tool runs it: the input is zero-padded by the depthwise dilation, then the
    1x1 expansion + BN + ReLU6 (not for expansion 1), the unpadded 3x3 depthwise conv + BN + ReLU6, the 1x1
    projection + BN, and the residual added to the unpadded input."""

    def __init__(self, in_ch: int, out_ch: int, expansion: int, stride: int, dilation: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        layers = [] if expansion == 1 else [_conv_bn_relu6(in_ch, hidden)]
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, dilation, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.pad = dilation
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(F.pad(x, (self.pad, self.pad, self.pad, self.pad)))
        return x + out if self.residual else out


class SeedASPP(nn.Module):
    def __init__(self, rates: tuple[int, int, int]) -> None:
        super().__init__()
        pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(320, 256))
        atrous = [nn.Sequential(*_conv_bn_relu(320, 256, 3, r)) for r in rates]
        self.convs = nn.ModuleList([nn.Sequential(*_conv_bn_relu(320, 256)), *atrous, pooling])
        self.project = nn.Sequential(*_conv_bn_relu(1280, 256), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [conv(x) for conv in self.convs]
        outs[-1] = F.interpolate(outs[-1], size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat(outs, dim=1))


class SeedHead(nn.Module):
    def __init__(self, num_classes: int, rates: tuple[int, int, int]) -> None:
        super().__init__()
        self.project = nn.Sequential(*_conv_bn_relu(24, 48))
        self.aspp = SeedASPP(rates)
        self.classifier = nn.Sequential(*_conv_bn_relu(304, 256, 3), nn.Conv2d(256, num_classes, 1))

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        low = self.project(low)
        high = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(torch.cat([low, high], dim=1))  # low-level first, as the seed tool does


class SeedBackbone(nn.Module):
    """MobileNetV2's features 0..17 built from the stage table: the stem (3x3 stride-2 conv, padding 0) and the
    inverted-residual blocks, with the seed tool's strides and dilations."""

    def __init__(self, output_stride: int) -> None:
        super().__init__()
        geometry = _seed_geometry(output_stride)
        features = [_conv_bn_relu6(3, 32, 3, stride=geometry[0][0])]
        in_ch = 32
        for expansion, out_ch, repeats in _MOBILENET_V2_STAGES:
            for _ in range(repeats):
                stride, dilation = geometry[len(features)]
                features.append(SeedInvertedResidual(in_ch, out_ch, expansion, stride, dilation))
                in_ch = out_ch
        # Slicing an nn.Sequential keeps the original indices, hence high_level_features.4 .. .17.
        blocks = nn.Sequential(*features)
        self.low_level_features, self.high_level_features = blocks[0:4], blocks[4:18]


class SeedDeepLabV3Plus(nn.Module):
    """The seed tool's deeplabv3plus_mobilenet: same module names, paddings, dilations and forward."""

    def __init__(self, num_classes: int = 21, output_stride: int = 16) -> None:
        super().__init__()
        self.backbone = SeedBackbone(output_stride)
        self.classifier = SeedHead(num_classes, (6, 12, 18) if output_stride == 16 else (12, 24, 36))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.backbone.low_level_features(x)
        logits = self.classifier(low, self.backbone.high_level_features(low))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics that keep activations of order one through the network.

    The running means, variances, weights and biases are far from BatchNorm's initial 0/1/1/0, as in a trained
    model: only then does ReLU6(BN(conv(0))), what a block padded at its input shows its depthwise conv at the
    border, differ from the zeros of a depthwise conv padded itself.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=gen)))
    return model.eval()


def _seed_checkpoint(model: nn.Module) -> dict:
    """A checkpoint dict as the seed tool's save_ckpt writes it (its best_score is a numpy float)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return {
        "cur_itrs": 30000,
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": {"last_epoch": 30000, "max_iters": 30000, "power": 0.9, "base_lrs": [0.01, 0.01]},
        "best_score": np.float64(0.7213),
    }


@pytest.fixture(scope="module")
def seed_model() -> SeedDeepLabV3Plus:
    return _randomise(SeedDeepLabV3Plus(output_stride=16))


@pytest.fixture(scope="module")
def seed_file(seed_model: SeedDeepLabV3Plus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seed") / "best_deeplabv3plus_mobilenet_voc_os16.pth"
    torch.save(_seed_checkpoint(seed_model), path)
    return path


def test_reference_model_has_the_documented_seed_layout(seed_model: SeedDeepLabV3Plus) -> None:
    state = seed_model.state_dict()
    assert len(state) == 356
    assert sum(p.numel() for p in seed_model.parameters()) == 5_225_717
    documented = {
        "backbone.low_level_features.0.0.weight": (32, 3, 3, 3),
        "backbone.low_level_features.1.conv.1.weight": (16, 32, 1, 1),
        "backbone.high_level_features.4.conv.0.0.weight": (144, 24, 1, 1),
        "backbone.high_level_features.17.conv.3.running_var": (320,),
        "classifier.project.0.weight": (48, 24, 1, 1),
        "classifier.aspp.convs.3.0.weight": (256, 320, 3, 3),
        "classifier.aspp.convs.4.1.weight": (256, 320, 1, 1),
        "classifier.aspp.project.0.weight": (256, 1280, 1, 1),
        "classifier.classifier.0.weight": (256, 304, 3, 3),
        "classifier.classifier.3.bias": (21,),
    }
    assert {k: tuple(state[k].shape) for k in documented} == documented
    assert state["classifier.aspp.convs.4.2.num_batches_tracked"].dtype == torch.int64
    assert not any(k.startswith("backbone.high_level_features.3.") for k in state)


@pytest.mark.parametrize(("output_stride", "size"), [(16, (97, 131)), (16, (64, 65)), (8, (130, 97)), (8, (67, 90))])
def test_converted_network_gives_the_seed_logits(
    seed_model: SeedDeepLabV3Plus, output_stride: int, size: tuple[int, int]
) -> None:
    reference = SeedDeepLabV3Plus(output_stride=output_stride).eval()
    reference.load_state_dict(seed_model.state_dict())
    converted = convert_seed_checkpoint(_seed_checkpoint(reference), output_stride=output_stride)
    net, meta = build_from_checkpoint(converted)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = reference(x), net(x)
    assert actual.shape == (1, 21, *size)
    assert expected.std() > 0.5  # logits far from zero, so the tolerance below is meaningful
    # Padding the blocks' depthwise conv instead of their input changes the border of every block's output: with
    # the BatchNorm statistics of _randomise, logits differ by more than 1 and argmaxes on many pixels.
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert meta["net"] == {
        "arch": "deeplabv3plus",
        "num_classes": 21,
        "output_stride": output_stride,
        "stem_padding": 0,
        "block_padding": "input",
    }


def test_command_line_round_trip(
    seed_file: Path, seed_model: SeedDeepLabV3Plus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "converted" / "seed_os16.ckpt"
    assert main([str(seed_file), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "21 classes" in printed and "output stride 16" in printed
    assert "30000 iterations" in printed and "0.7213" in printed
    net, meta = load_model(out)
    assert meta["class_names"] == list(VOC_CLASSES)
    assert torch.load(out, weights_only=True)["seed"] == {"cur_itrs": 30000, "best_score": pytest.approx(0.7213)}
    x = torch.randn(1, 3, 67, 90)
    with torch.no_grad():
        torch.testing.assert_close(net(x), seed_model(x), atol=1e-4, rtol=1e-4)


def test_output_stride_option(seed_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "seed_os8.ckpt"
    assert main([str(seed_file), str(out), "--output-stride", "8"]) == 0
    assert "output stride 8" in capsys.readouterr().out
    net, meta = load_model(out)
    assert meta["net"]["output_stride"] == 8 and net.backbone.output_stride == 8


@pytest.mark.slow  # python -m segvoc.convert in its own process: the entry point's one subprocess test
def test_missing_input_exits_with_a_message(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    result = subprocess.run(
        [sys.executable, "-m", "segvoc.convert", str(missing), str(tmp_path / "out.ckpt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert str(missing) in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.ckpt").exists()


def test_refuses_to_overwrite_the_input(seed_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(seed_file), str(seed_file)]) == 1
    assert "overwrite" in capsys.readouterr().err


def test_numpy_1_best_score_is_readable(tmp_path: Path) -> None:
    # Seed checkpoints written under numpy 1 name numpy.core.multiarray.scalar; numpy 2 renamed it numpy._core.
    buffer = io.BytesIO()
    torch.save({"best_score": np.float64(0.5)}, buffer, _use_new_zipfile_serialization=False)
    path = tmp_path / "numpy1.pth"
    path.write_bytes(buffer.getvalue().replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))
    with seed_safe_globals():
        assert read_checkpoint(path)["best_score"] == 0.5


def test_seed_format_is_recognised(seed_model: SeedDeepLabV3Plus) -> None:
    seed = _seed_checkpoint(seed_model)
    assert is_seed_checkpoint(seed)
    assert not is_seed_checkpoint(convert_seed_checkpoint(seed))
    assert not is_seed_checkpoint({"state_dict": {}, "epoch": 3})


def test_data_parallel_prefix_is_accepted(seed_model: SeedDeepLabV3Plus) -> None:
    seed = _seed_checkpoint(seed_model)
    seed["model_state"] = {f"module.{k}": v for k, v in seed["model_state"].items()}
    assert len(convert_seed_checkpoint(seed)["state_dict"]) == 356


def _with_state(seed_model: nn.Module, edit) -> dict:
    seed = _seed_checkpoint(seed_model)
    state = dict(seed["model_state"])
    edit(state)
    seed["model_state"] = state
    return seed


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("classifier.aspp.convs.2.1.running_var"), "lacks 'classifier.aspp.convs.2.1.running_var'"),
        (lambda s: s.update({"classifier.aux.weight": torch.zeros(1)}), "'classifier.aux.weight'"),
        (lambda s: s.update({"backbone.layer1.0.conv1.weight": torch.zeros(1)}), "backbone is not MobileNetV2"),
        (lambda s: s.update({"classifier.classifier.0.convs.0.0.weight": torch.zeros(1)}), "without the V3\\+ decoder"),
        (
            lambda s: s.update({"classifier.project.0.weight": torch.zeros(48, 32, 1, 1)}),
            "has shape \\(48, 32, 1, 1\\)",
        ),
        (lambda s: s.pop("classifier.classifier.3.weight"), "number of classes"),
    ],
    ids=["missing", "extra", "resnet", "deeplabv3", "shape", "no-classifier"],
)
def test_unfit_seed_state_is_a_clear_error(seed_model: SeedDeepLabV3Plus, edit, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as info:
        convert_seed_checkpoint(_with_state(seed_model, edit), source="seed.pth")
    assert "seed.pth" in str(info.value)


def test_class_names_must_match_the_classifier(seed_model: SeedDeepLabV3Plus) -> None:
    with pytest.raises(CheckpointError, match="21 classes but 2 class names"):
        convert_seed_checkpoint(_seed_checkpoint(seed_model), class_names=["a", "b"])


def test_not_a_seed_checkpoint_is_a_clear_error() -> None:
    with pytest.raises(CheckpointError, match="no 'model_state'"):
        convert_seed_checkpoint({"state_dict": {}}, source="x.ckpt")


def test_raw_seed_file_loads_and_predicts_directly(
    seed_file: Path, seed_model: SeedDeepLabV3Plus, tmp_path: Path
) -> None:
    net, meta = load_model(seed_file)  # no conversion step: predict.py ckpt=<seed .pth> takes this path
    assert meta["net"]["stem_padding"] == 0
    x = torch.randn(1, 3, 71, 93)
    with torch.no_grad():
        torch.testing.assert_close(net(x), seed_model(x), atol=1e-4, rtol=1e-4)

    from PIL import Image

    from segvoc.tasks.predict import run
    from tests.conftest import compose_config

    Image.new("RGB", (93, 71), (120, 80, 40)).save(tmp_path / "photo.jpg")
    cfg = compose_config(
        [f"ckpt={seed_file}", f"input={tmp_path / 'photo.jpg'}", f"output={tmp_path / 'out'}", "num_workers=0"],
        config_name="predict",
    )
    assert run(cfg) == 0
    mask = Image.open(tmp_path / "out" / "photo.png")
    assert mask.mode == "L" and mask.size == (93, 71)


def test_init_from_warns_when_the_block_padding_differs(seed_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="segvoc.checkpoints.load"):
        build_net(init_from=seed_file)
    assert "block_padding=input, this one uses depthwise" in caplog.text
    assert "++model.net.block_padding=input" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="segvoc.checkpoints.load"):
        build_net(stem_padding=0, block_padding="input", init_from=seed_file)
    assert "padding" not in caplog.text
