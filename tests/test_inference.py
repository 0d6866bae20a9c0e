"""The shared inference routine: plain, sliding window, multi-scale + flip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segvoc.models.deeplab import deeplabv3plus_mobilenet
from segvoc.models.inference import crop_to_sizes, infer, sliding_window


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return deeplabv3plus_mobilenet(num_classes=5).eval()


def test_scale_one_without_flip_is_the_plain_forward(net: nn.Module) -> None:
    images = torch.randn(2, 3, 75, 101)
    with torch.no_grad():
        assert torch.equal(infer(net, images), net(images))


@pytest.mark.parametrize("window", [None, 64])
def test_multiscale_flip_and_window_keep_the_input_size(net: nn.Module, window: int | None) -> None:
    images = torch.randn(2, 3, 75, 101)
    with torch.no_grad():
        logits = infer(net, images, scales=(0.5, 1.0, 1.5), flip=True, window=window)
    assert logits.shape == (2, 5, 75, 101) and torch.isfinite(logits).all()


def test_flip_averages_the_mirrored_run() -> None:
    net = nn.Conv2d(3, 2, 3, padding=1)
    images = torch.randn(1, 3, 9, 11)
    with torch.no_grad():
        expected = (net(images) + net(images.flip(-1)).flip(-1)) / 2
        assert torch.allclose(infer(net, images, flip=True), expected, atol=1e-6)


class Ramp(nn.Module):
    """Multiplies column ``x`` by ``x + 1``: a net whose output depends on where a pixel is, so a flip shows."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * torch.arange(1, images.shape[-1] + 1, dtype=images.dtype)


def test_multiscale_flip_average_by_hand() -> None:
    """One channel, one row ``[2, 8]``, scales 0.5 and 1, with flip. By hand:
    scale 1: ``[2, 8] * [1, 2] = [2, 16]``; flipped: ``[8, 2] * [1, 2] = [8, 4]``, mirrored back ``[4, 8]``;
    scale 0.5: bilinear 2 -> 1 pixel is the mean 5, times 1, back to 2 pixels ``[5, 5]``, the same flipped.
    Mean of the four runs: ``[(2 + 4 + 5 + 5) / 4, (16 + 8 + 5 + 5) / 4] = [4, 8.5]``."""
    images = torch.tensor([[[[2.0, 8.0]]]])
    assert infer(Ramp(), images, scales=(0.5, 1.0), flip=True).tolist() == [[[[4.0, 8.5]]]]
    assert infer(Ramp(), images, scales=(1.0,), flip=True).tolist() == [[[[3.0, 12.0]]]]  # (2 + 4) / 2, (16 + 8) / 2
    assert infer(Ramp(), images, scales=(0.5, 1.0)).tolist() == [[[[3.5, 10.5]]]]  # (2 + 5) / 2, (16 + 5) / 2


def test_sliding_window_equals_whole_image_for_a_pointwise_net() -> None:
    net = nn.Conv2d(3, 4, 1)  # no context: tiles must reproduce the whole-image result exactly
    with torch.no_grad():
        for size in [(50, 70), (20, 30), (64, 64)]:
            images = torch.randn(2, 3, *size)
            assert torch.allclose(sliding_window(net, images, window=32), net(images), atol=1e-6)


def test_crop_to_sizes_undoes_padding() -> None:
    batch = torch.zeros(2, 4, 10, 12)
    crops = crop_to_sizes(batch, [(10, 5), (3, 12)])
    assert [tuple(c.shape) for c in crops] == [(4, 10, 5), (4, 3, 12)]
