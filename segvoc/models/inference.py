"""The one inference routine, shared by validation, evaluation and prediction.

``infer`` turns a batch of normalised images into logits at the images' own size: whole image or sliding window,
optionally averaged over scales and a horizontal flip. Batches of images of different sizes are padded at the
bottom/right by the caller (``segvoc.data.datamodule.pad_collate``) and cropped back with ``crop_to_sizes``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Net = Callable[[torch.Tensor], torch.Tensor]


def sliding_window(net: Net, images: torch.Tensor, window: int, overlap: float = 1 / 3) -> torch.Tensor:
    """Logits from ``window``-sized tiles overlapping by ``overlap``, averaged where they overlap.

    Images smaller than the window are padded with zeros (the normalised mean) and cropped back.
    """
    n, _, height, width = images.shape
    pad_h, pad_w = max(window - height, 0), max(window - width, 0)
    padded = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
    full_h, full_w = padded.shape[-2:]
    stride = max(int(window * (1 - overlap)), 1)
    tops = list(range(0, full_h - window + 1, stride))
    lefts = list(range(0, full_w - window + 1, stride))
    tops += [full_h - window] if tops[-1] != full_h - window else []
    lefts += [full_w - window] if lefts[-1] != full_w - window else []
    logits: torch.Tensor | None = None
    counts = torch.zeros(1, 1, full_h, full_w, device=images.device, dtype=images.dtype)
    for top in tops:
        for left in lefts:
            tile = net(padded[:, :, top : top + window, left : left + window])
            if logits is None:
                logits = tile.new_zeros(n, tile.shape[1], full_h, full_w)
            logits[:, :, top : top + window, left : left + window] += tile
            counts[:, :, top : top + window, left : left + window] += 1
    assert logits is not None
    return (logits / counts)[:, :, :height, :width]


def infer(
    net: Net,
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: int | None = None,
    overlap: float = 1 / 3,
) -> torch.Tensor:
    """Logits ``(N, C, H, W)`` for normalised images ``(N, 3, H, W)``.

    For each scale the batch is resized (bilinear), run whole or through ``sliding_window``, and the logits are
    resized back to ``H x W``; with ``flip`` the mirrored batch is run too and its logits mirrored back. The result
    is the mean over all these runs, so ``scales=(1.0,)`` without flip is exactly ``net(images)``.
    """
    height, width = images.shape[-2:]

    def run(batch: torch.Tensor) -> torch.Tensor:
        return sliding_window(net, batch, window, overlap) if window else net(batch)

    total: torch.Tensor | None = None
    runs = 0
    for scale in scales:
        if scale == 1.0:
            scaled = images
        else:
            size = (max(int(round(height * scale)), 1), max(int(round(width * scale)), 1))
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            logits = run(scaled.flip(-1) if mirrored else scaled)
            logits = logits.flip(-1) if mirrored else logits
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            total = logits if total is None else total + logits
            runs += 1
    assert total is not None, "scales must not be empty"
    return total / runs if runs > 1 else total


def crop_to_sizes(batch: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Undo bottom/right padding: the ``[..., :h, :w]`` part of each item of ``batch``."""
    return [item[..., :h, :w] for item, (h, w) in zip(batch, sizes, strict=True)]
