"""The losses against values worked out from their definitions on a few written-out pixels, their ignore label,
class weights (also from a statistics JSON), OHEM's selection, and the Hydra configs that build them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from segvoc.errors import SegvocError
from segvoc.losses import CrossEntropy, CrossEntropyDice, FocalLoss, OHEMCrossEntropy, SegmentationLoss

REPO = Path(__file__).resolve().parents[1]
LOSSES = {"ce": CrossEntropy, "ohem": OHEMCrossEntropy, "focal": FocalLoss, "ce_dice": CrossEntropyDice}

# Two pixels, three classes: logits (1, 3, 1, 2) written out per pixel, and their labels.
PIXELS = [[2.0, 1.0, 0.0], [0.5, -1.0, 1.5]]
LABELS = [0, 2]


def batch(pixels: list[list[float]], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, C, 1, P)`` logits and ``(1, 1, P)`` int64 masks of pixels given as rows of class scores."""
    logits = torch.tensor(pixels, dtype=torch.float32).T.reshape(1, len(pixels[0]), 1, len(pixels))
    return logits, torch.tensor(labels).reshape(1, 1, len(labels))


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def ce(row: list[float], label: int) -> float:
    """``-log softmax(row)[label]``, from the definition."""
    return math.log(sum(math.exp(v) for v in row)) - row[label]


def two_class(probs: list[float]) -> list[list[float]]:
    """Logit rows of two classes whose softmax probability of class 0 is each of ``probs``."""
    return [[math.log(p), math.log(1 - p)] for p in probs]


def test_cross_entropy_is_the_mean_over_pixels() -> None:
    logits, masks = batch(PIXELS, LABELS)
    expected = (ce(PIXELS[0], 0) + ce(PIXELS[1], 2)) / 2
    assert CrossEntropy()(logits, masks).item() == pytest.approx(expected, rel=1e-6)


def test_class_weights_give_the_weighted_mean() -> None:
    logits, masks = batch(PIXELS, LABELS)
    expected = (0.5 * ce(PIXELS[0], 0) + 3.0 * ce(PIXELS[1], 2)) / (0.5 + 3.0)
    loss = CrossEntropy(class_weights=[0.5, 1.0, 3.0])(logits, masks)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, masks, weight=torch.tensor([0.5, 1.0, 3.0])).item(), rel=1e-6
    )


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("ignore", [255, 100])
def test_ignored_pixels_change_nothing(name: str, ignore: int) -> None:
    """A third, ignored pixel, whatever its scores, leaves value and gradient of the two pixels' loss unchanged."""
    loss = LOSSES[name](ignore_index=ignore, class_weights=[0.5, 1.0, 3.0])
    if isinstance(loss, OHEMCrossEntropy):
        loss.min_kept = 1  # only the hardest non-ignored pixel is certain to count; an ignored one must never
    reference = loss(*batch(PIXELS, LABELS))
    values = []
    for scores in ([9.0, -9.0, 0.0], [-50.0, 50.0, 3.0]):
        logits, masks = batch([*PIXELS, scores], [*LABELS, ignore])
        logits.requires_grad_(True)
        value = loss(logits, masks)
        value.backward()
        assert logits.grad[..., 2].abs().max() == 0
        values.append(value.item())
    assert values == pytest.approx([reference.item()] * 2, rel=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_an_all_ignored_batch_gives_zero_and_backward_works(name: str) -> None:
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    masks = torch.full((2, 4, 5), 255)
    value = LOSSES[name]()(logits, masks)
    assert value.item() == 0.0
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().max() == 0


def test_ohem_keeps_the_pixels_under_the_threshold() -> None:
    probs = [0.9, 0.6, 0.3, 0.95]
    logits, masks = batch(two_class(probs), [0, 0, 0, 0])
    logits.requires_grad_(True)
    value = OHEMCrossEntropy(thresh=0.7, min_kept=0)(logits, masks)
    assert value.item() == pytest.approx((-math.log(0.6) - math.log(0.3)) / 2, rel=1e-5)
    value.backward()
    assert [bool(logits.grad[..., i].abs().max() > 0) for i in range(4)] == [False, True, True, False]


def test_ohem_keeps_at_least_min_kept_hardest_pixels() -> None:
    probs = [0.9, 0.6, 0.3, 0.95]
    logits, masks = batch(two_class(probs), [0, 0, 0, 0])
    three = OHEMCrossEntropy(thresh=0.7, min_kept=3)(logits, masks)
    assert three.item() == pytest.approx(-(math.log(0.3) + math.log(0.6) + math.log(0.9)) / 3, rel=1e-5)
    two = OHEMCrossEntropy(thresh=0.7, min_kept=2)(logits, masks)  # two are under the threshold already
    assert two.item() == pytest.approx((-math.log(0.6) - math.log(0.3)) / 2, rel=1e-5)
    every = OHEMCrossEntropy(thresh=0.7, min_kept=10)(logits, masks)  # more than there are: all of them
    assert every.item() == pytest.approx(-sum(math.log(p) for p in probs) / 4, rel=1e-5)


def test_ohem_never_keeps_an_ignored_pixel_and_weighs_the_kept_ones() -> None:
    probs = [0.9, 0.6, 0.01, 0.95]  # the hardest pixel is ignored
    logits, masks = batch(two_class(probs), [0, 0, 255, 1])  # the last is class 1, probability 0.05
    value = OHEMCrossEntropy(thresh=0.7, min_kept=2, class_weights=[1.0, 4.0])(logits, masks)
    assert value.item() == pytest.approx((-math.log(0.6) - 4 * math.log(0.05)) / (1 + 4), rel=1e-5)
    # none under the threshold: the two hardest non-ignored pixels, not the ignored one
    logits, masks = batch(two_class([0.9, 0.8, 0.01, 0.95]), [0, 0, 255, 0])
    value = OHEMCrossEntropy(thresh=0.5, min_kept=2)(logits, masks)
    assert value.item() == pytest.approx(-(math.log(0.9) + math.log(0.8)) / 2, rel=1e-5)


def test_focal_loss_from_its_definition() -> None:
    logits, masks = batch(PIXELS, LABELS)
    p = [softmax(PIXELS[0])[0], softmax(PIXELS[1])[2]]
    terms = [(1 - pi) ** 2 * -math.log(pi) for pi in p]
    assert FocalLoss(gamma=2.0)(logits, masks).item() == pytest.approx(sum(terms) / 2, rel=1e-5)
    weighted = FocalLoss(gamma=2.0, class_weights=[0.5, 1.0, 3.0])(logits, masks)
    assert weighted.item() == pytest.approx((0.5 * terms[0] + 3.0 * terms[1]) / 3.5, rel=1e-5)


@pytest.mark.parametrize("class_weights", [None, [0.5, 1.0, 3.0]])
def test_focal_loss_with_gamma_0_is_cross_entropy(class_weights: list[float] | None) -> None:
    logits, masks = torch.randn(2, 3, 5, 6), torch.randint(0, 3, (2, 5, 6))
    masks[0, 0] = 255
    focal = FocalLoss(gamma=0.0, class_weights=class_weights)(logits, masks)
    assert focal.item() == pytest.approx(CrossEntropy(class_weights=class_weights)(logits, masks).item(), rel=1e-6)


def test_focal_loss_gradient_is_finite_for_gamma_under_1_on_confident_pixels() -> None:
    logits, masks = batch([[40.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [0, 255])
    logits.requires_grad_(True)
    FocalLoss(gamma=0.5)(logits, masks).backward()
    assert torch.isfinite(logits.grad).all()


def test_ce_dice_from_its_definition() -> None:
    logits, masks = batch(PIXELS, LABELS)
    probs = [softmax(row) for row in PIXELS]
    smooth = 1.0
    dice = []
    for c in range(3):
        overlap = sum(probs[i][c] for i in range(2) if LABELS[i] == c)
        total = sum(probs[i][c] for i in range(2)) + sum(1 for label in LABELS if label == c)
        dice.append((2 * overlap + smooth) / (total + smooth))
    cross_entropy = (ce(PIXELS[0], 0) + ce(PIXELS[1], 2)) / 2
    expected = 0.5 * cross_entropy + 2.0 * (1 - sum(dice) / 3)
    loss = CrossEntropyDice(ce_weight=0.5, dice_weight=2.0, smooth=smooth)(logits, masks)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dice_alone_is_near_0_for_a_confident_right_prediction_and_near_1_for_a_wrong_one() -> None:
    dice = CrossEntropyDice(ce_weight=0.0, smooth=1e-6)
    masks = torch.randint(0, 3, (1, 8, 8))
    right = torch.nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float() * 50
    assert dice(right, masks).item() == pytest.approx(0.0, abs=1e-4)
    wrong = torch.nn.functional.one_hot((masks + 1) % 3, 3).permute(0, 3, 1, 2).float() * 50
    assert dice(wrong, masks).item() == pytest.approx(1.0, abs=1e-4)


def test_class_weights_from_a_statistics_json(tmp_path: Path) -> None:
    path = tmp_path / "stats-train.json"
    path.write_text(json.dumps({"weights": {"median_frequency": [0.5, 1.0, 3.0], "inverse_log": [1.5, 2.0, 9.0]}}))
    assert CrossEntropy(class_weights=str(path)).weight.tolist() == [0.5, 1.0, 3.0]
    assert CrossEntropy(class_weights=path, weighting="inverse_log").weight.tolist() == [1.5, 2.0, 9.0]
    with pytest.raises(SegvocError, match="no 'enet' class weights.*median_frequency, inverse_log"):
        CrossEntropy(class_weights=path, weighting="enet")
    with pytest.raises(SegvocError, match="does not exist.*segvoc.data.stats"):
        CrossEntropy(class_weights=tmp_path / "nothing.json")


def test_class_weights_are_checked() -> None:
    for bad in ([1.0, -1.0, 1.0], [1.0, float("nan")], [], ["a", "b"]):
        with pytest.raises(SegvocError, match="class weights"):
            CrossEntropy(class_weights=bad)
    logits, masks = batch(PIXELS, LABELS)
    with pytest.raises(SegvocError, match="2 class weights but the model predicts 3 classes"):
        CrossEntropy(class_weights=[1.0, 2.0])(logits, masks)


def test_class_weights_follow_the_module_but_stay_out_of_its_state_dict() -> None:
    loss = CrossEntropy(class_weights=[0.5, 1.0, 3.0])
    assert loss.state_dict() == {}
    assert loss.to(torch.float64).weight.dtype == torch.float64  # a buffer: moved (and cast) with the module


@pytest.mark.parametrize("name", LOSSES)
def test_each_config_builds_its_loss_with_the_data_ignore_index(name: str) -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(overrides=["+data=voc", f"+loss={name}", "data.ignore_index=100"])
    loss = instantiate(cfg.loss)
    assert type(loss) is LOSSES[name] and isinstance(loss, SegmentationLoss)
    assert loss.ignore_index == 100 and loss.weight is None
    value = loss(*batch(PIXELS, LABELS))
    assert value.ndim == 0 and torch.isfinite(value)
