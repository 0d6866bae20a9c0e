"""Pixel-wise segmentation losses: cross-entropy, OHEM cross-entropy, focal loss, cross-entropy + soft Dice.

Every loss is a small ``nn.Module`` with one contract, ``loss(logits, masks) -> scalar``: ``logits`` are
``(N, C, H, W)`` scores, ``masks`` ``(N, H, W)`` int64 class indices in which ``ignore_index`` marks pixels without
a class. Ignored pixels never change the value or the gradient, and a batch in which every pixel is ignored gives
a finite 0 that still backpropagates (zeros), never NaN.

Class weights (``class_weights``) are None (every class 1), one number per class, or the path of a statistics JSON
written by ``python -m segvoc.data.stats``, whose ``weights[<weighting>]`` list is used (``weighting``:
``median_frequency`` or ``inverse_log``). A weighted loss is the weighted mean over pixels,
``sum(w[y] * l) / sum(w[y])``, as ``F.cross_entropy(weight=...)`` defines it. The weights live in a non-persistent
buffer: they follow the module to its device and never enter a checkpoint's ``state_dict``.

Built by Hydra from ``conf/loss/<name>.yaml``; plain torch, nothing here knows of Lightning or configs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segvoc.errors import SegvocError

IGNORE_INDEX = 255  # VOC's; the configs pass ${data.ignore_index}

ClassWeights = Sequence[float] | str | Path | None


def load_class_weights(path: str | Path, weighting: str = "median_frequency") -> list[float]:
    """The ``weights[weighting]`` list of a statistics JSON written by ``python -m segvoc.data.stats``.

    Raises ``SegvocError`` naming the file when it is missing, not JSON, or has no such weighting.
    """
    path = Path(path).expanduser()
    try:
        stats = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SegvocError(
            f"The class weights file {path} does not exist. Write it with `python -m segvoc.data.stats "
            "data.root=<root>` (it names the file it writes), or set loss.class_weights=null."
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SegvocError(f"Cannot read the class weights file {path}: {exc}.") from exc
    weights = stats.get("weights") if isinstance(stats, dict) else None
    if not isinstance(weights, dict) or weighting not in weights:
        found = ", ".join(weights) if isinstance(weights, dict) else "none"
        raise SegvocError(
            f"{path} has no '{weighting}' class weights (weightings there: {found}); it must be a statistics JSON "
            "of `python -m segvoc.data.stats`, and loss.weighting one of its weightings."
        )
    return weights[weighting]


def _weights_tensor(class_weights: ClassWeights, weighting: str) -> torch.Tensor | None:
    """``class_weights`` (None, numbers, or a stats JSON path) as a float32 tensor, checked to be usable."""
    if class_weights is None:
        return None
    source = "loss.class_weights"
    if isinstance(class_weights, str | Path):
        source = str(class_weights)
        class_weights = load_class_weights(class_weights, weighting)
    try:
        weights = torch.tensor([float(w) for w in class_weights], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise SegvocError(
            f"The class weights of {source} ({class_weights}) are not a list of numbers; give one weight per class, "
            "e.g. loss.class_weights=[1.0,2.5,...], or a statistics JSON path."
        ) from exc
    if weights.ndim != 1 or not len(weights) or not torch.isfinite(weights).all() or (weights < 0).any():
        raise SegvocError(
            f"The class weights of {source} ({class_weights}) must be one finite, non-negative number per class."
        )
    return weights


class SegmentationLoss(nn.Module):
    """The common part of every loss: ``ignore_index`` and the class weights (see the module docstring).

    A subclass implements ``forward(logits, masks) -> scalar`` and may use ``pixel_weights`` and ``per_pixel_ce``.
    """

    weight: torch.Tensor | None

    def __init__(
        self, ignore_index: int = IGNORE_INDEX, class_weights: ClassWeights = None, weighting: str = "median_frequency"
    ) -> None:
        super().__init__()
        self.ignore_index = int(ignore_index)
        self.register_buffer("weight", _weights_tensor(class_weights, weighting), persistent=False)

    def pixel_weights(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``(N, H, W)`` float32: each pixel's class weight (1 without weights), 0 where the mask is ignored.

        Raises ``SegvocError`` when the number of class weights is not the number of logit channels.
        """
        valid = masks != self.ignore_index
        if self.weight is None:
            return valid.float()
        if len(self.weight) != logits.shape[1]:
            raise SegvocError(
                f"The loss has {len(self.weight)} class weights but the model predicts {logits.shape[1]} classes; "
                "give one weight per class (data.num_classes), or a statistics JSON of this dataset."
            )
        return self.weight[torch.where(valid, masks, 0)] * valid

    def per_pixel_ce(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``(N, H, W)`` float32 unweighted cross-entropy ``-log softmax(logits)[y]`` per pixel; 0 where ignored."""
        return F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index, reduction="none")

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, weighted={self.weight is not None}"


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(weights * values) / sum(weights)``; 0, still connected to ``values``' graph, when the weights sum to 0.

    Pixels of weight 0 must have finite values (an ignored pixel's cross-entropy is 0), so their gradient is 0.
    """
    total = weights.sum()
    return (values * weights).sum() / total.clamp_min(torch.finfo(total.dtype).tiny)


class CrossEntropy(SegmentationLoss):
    """Mean pixel-wise cross-entropy over the non-ignored pixels, class-weighted when weights are given: the value of
    ``F.cross_entropy(logits, masks, weight, ignore_index=...)``, except 0 (not NaN) when every pixel is ignored."""

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return weighted_mean(self.per_pixel_ce(logits, masks), self.pixel_weights(logits, masks))


class OHEMCrossEntropy(SegmentationLoss):
    """Cross-entropy over the hard pixels only (online hard example mining, as in the PSPNet and DeepLab recipes).

    A pixel is hard when the softmax probability of its true class is below ``thresh``. When fewer than
    ``min_kept`` non-ignored pixels of the batch are hard, the ``min_kept`` with the lowest probability are kept
    instead (every non-ignored pixel when the batch has fewer; pixels tied with the last one kept are kept too).
    The loss is the (class-weighted) mean cross-entropy of the kept pixels. The selection has no gradient and
    involves no device-to-host synchronisation.
    """

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        class_weights: ClassWeights = None,
        weighting: str = "median_frequency",
        thresh: float = 0.7,
        min_kept: int = 100_000,
    ) -> None:
        super().__init__(ignore_index, class_weights, weighting)
        if not 0 < thresh <= 1:
            raise SegvocError(f"loss.thresh={thresh} is not a probability in (0, 1]; 0.7 is usual.")
        if min_kept < 0 or min_kept != int(min_kept):
            raise SegvocError(f"loss.min_kept={min_kept} is not a whole number >= 0; 100000 is usual.")
        self.thresh = float(thresh)
        self.min_kept = int(min_kept)

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        ce = self.per_pixel_ce(logits, masks)
        with torch.no_grad():
            # the probability of the true class; 2 for ignored pixels, so they rank after every other pixel (and
            # when kept, because fewer than min_kept pixels count, their pixel weight of 0 leaves them out)
            prob = torch.where(masks != self.ignore_index, torch.exp(-ce), 2.0)
            kept = prob < self.thresh
            k = min(self.min_kept, prob.numel())
            if k > 0:  # and the k hardest: all pixels up to the k-th lowest probability
                kept |= prob <= torch.kthvalue(prob.flatten(), k).values
        return weighted_mean(ce, self.pixel_weights(logits, masks) * kept)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, thresh={self.thresh}, min_kept={self.min_kept}"


class FocalLoss(SegmentationLoss):
    """Focal loss (Lin et al., 2017), ``(1 - p)^gamma * -log p`` with ``p`` the softmax probability of the true
    class, averaged over the non-ignored pixels (class-weighted like ``CrossEntropy``: the class weights play the
    part of the paper's alpha). ``gamma=0`` is exactly ``CrossEntropy`` with the same weights."""

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        class_weights: ClassWeights = None,
        weighting: str = "median_frequency",
        gamma: float = 2.0,
    ) -> None:
        super().__init__(ignore_index, class_weights, weighting)
        if gamma < 0:
            raise SegvocError(f"loss.gamma={gamma} must be >= 0 (0 is cross-entropy; 2 is the paper's choice).")
        self.gamma = float(gamma)

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        ce = self.per_pixel_ce(logits, masks)
        # 1 - p computed as -expm1(-ce), exact for confident pixels; the floor keeps the gradient of x^gamma finite
        # at x = 0 (ignored pixels, or p rounding to 1) when 0 < gamma < 1
        modulation = (-torch.expm1(-ce)).clamp_min(1e-12).pow(self.gamma)
        return weighted_mean(modulation * ce, self.pixel_weights(logits, masks))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"


class CrossEntropyDice(SegmentationLoss):
    """``ce_weight * CrossEntropy + dice_weight * (1 - soft Dice)``.

    The soft Dice is taken over the whole batch, per class ``c``, from the softmax probabilities ``p_c`` and the
    one-hot masks ``t_c`` of the non-ignored pixels only: ``(2 * sum(p_c * t_c) + smooth) / (sum(p_c) + sum(t_c) +
    smooth)``, then averaged over all classes. A class absent from the batch and not predicted scores about 1,
    one predicted where absent is pushed towards 0 probability; ``smooth`` > 0 keeps an all-ignored batch at 0. The
    class weights apply to the cross-entropy term only.
    """

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        class_weights: ClassWeights = None,
        weighting: str = "median_frequency",
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        smooth: float = 1.0,
    ) -> None:
        super().__init__(ignore_index, class_weights, weighting)
        if smooth <= 0:
            raise SegvocError(f"loss.smooth={smooth} must be > 0 (it keeps the Dice of an absent class finite); 1.0.")
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.smooth = float(smooth)

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        ce = weighted_mean(self.per_pixel_ce(logits, masks), self.pixel_weights(logits, masks))
        valid = (masks != self.ignore_index).unsqueeze(1)  # (N, 1, H, W)
        probs = logits.float().softmax(dim=1) * valid
        classes = torch.arange(logits.shape[1], device=masks.device).view(1, -1, 1, 1)
        target = (masks.unsqueeze(1) == classes) & valid  # one-hot (N, C, H, W) as bools: an eighth of int64's memory
        dims = (0, 2, 3)
        overlap = (probs * target).sum(dims)
        total = probs.sum(dims) + target.sum(dims)
        dice = (2 * overlap + self.smooth) / (total + self.smooth)
        return self.ce_weight * ce + self.dice_weight * (1 - dice.mean())

    def extra_repr(self) -> str:
        weights = f"ce_weight={self.ce_weight}, dice_weight={self.dice_weight}"
        return f"{super().extra_repr()}, {weights}, smooth={self.smooth}"
