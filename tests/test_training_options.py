"""Training options of the config: the loss group wired into the module, EMA of the weights (validation, best
checkpoint, resume), gradient accumulation counted in optimizer steps."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from segvoc.data.demo import make_demo_voc
from segvoc.losses import CrossEntropy, CrossEntropyDice, FocalLoss, OHEMCrossEntropy
from segvoc.tasks.evaluate import evaluate
from segvoc.tasks.train import train
from segvoc.training.ema import EMA


def class_weights_json(tmp_path: Path) -> Path:
    path = tmp_path / "stats.json"
    weights = [1.0 + i / 10 for i in range(21)]
    path.write_text(json.dumps({"weights": {"median_frequency": weights, "inverse_log": weights[::-1]}}))
    return path


@pytest.mark.parametrize(
    ("overrides", "kind", "weights", "step"),
    [
        ([], CrossEntropy, None, False),  # the default; trained by every other test
        (["loss=ohem", "loss.min_kept=1000"], OHEMCrossEntropy, None, True),
        (["loss=focal", "loss.gamma=1.5"], FocalLoss, None, True),
        (["loss=ce_dice"], CrossEntropyDice, None, True),
        (["loss.class_weights=[" + ",".join(["1.0"] * 20) + ",3.0]"], CrossEntropy, (1.0, 3.0), False),
        (["loss.class_weights=STATS", "loss.weighting=inverse_log"], CrossEntropy, (3.0, 1.0), True),
    ],
    ids=["ce", "ohem", "focal", "ce_dice", "weights", "stats_json"],
)
def test_each_loss_from_the_command_line(make_cfg, tmp_path: Path, overrides, kind, weights, step) -> None:
    overrides = [o.replace("STATS", str(class_weights_json(tmp_path))) for o in overrides]
    cfg = make_cfg(*overrides, "+trainer.fast_dev_run=true")
    module = hydra.utils.instantiate(cfg.model)
    assert type(module.criterion) is kind
    logits, masks = torch.randn(2, 21, 8, 8), torch.randint(0, 21, (2, 8, 8))
    masks[0, 0] = 255
    # module.loss (training, validation, segvoc.bench) is the configured loss
    assert torch.equal(module.loss(logits, masks), hydra.utils.instantiate(cfg.loss)(logits, masks))
    if weights is None:
        assert module.criterion.weight is None
    else:  # (first class, last class)
        assert (module.criterion.weight[0], module.criterion.weight[-1]) == pytest.approx(weights)
    if step:  # one training step and one validation batch
        metrics = train(cfg)
        assert torch.isfinite(torch.tensor(metrics["train/loss"])) and "val/loss" in metrics


def test_ema_is_off_by_default(make_cfg) -> None:
    module = hydra.utils.instantiate(make_cfg().model)
    assert module.ema == {"start_step": 0, "average_buffers": False} and module.configure_callbacks() == []


def mirror_invariant_tree(root: Path) -> Path:
    """A VOC tree whose 12 training samples are one image whose rows are each of one colour (class 15 below class
    0): shuffling, flipping and (with scale 1 and a crop larger than the image) cropping change nothing, so every
    run sees the same batches whatever the random state, which Lightning does not restore on resume. The JPEGs
    keep full-resolution colour: with 4:2:0 chroma subsampling the decoded pixels are not mirror-symmetric (up to 2
    grey levels), and which images were flipped would show in the weights."""
    voc = make_demo_voc(root, n_train=12, n_val=4, seed=3)
    rows = np.linspace(0, 255, 96, dtype=np.uint8)
    image = np.repeat(np.stack([rows, rows[::-1], np.full(96, 90, np.uint8)], axis=1)[:, None, :], 128, axis=1)
    mask = np.zeros((96, 128), dtype=np.uint8)
    mask[60:] = 15
    mask[58:60] = 255
    for name in (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split():
        Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg", subsampling=0)
        Image.fromarray(mask, mode="L").save(voc / "SegmentationClass" / f"{name}.png")
    return root


class SeedEachStep(L.Callback):
    """Dropout draws from the global random state, which Lightning does not restore on resume: seeding it from the
    step number makes a resumed run draw what an uninterrupted one draws."""

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        torch.manual_seed(trainer.global_step)


@pytest.mark.slow
def test_ema_validates_checkpoints_and_resumes(make_cfg, tmp_path: Path) -> None:
    root = mirror_invariant_tree(tmp_path / "voc")
    # 12 train images, batch 4: 3 steps an epoch; validation (and last.ckpt) every 3 steps; the poly schedule of
    # the 6-step run also in the run stopped after 3
    common = [f"data.root={root}", "data.scale_range=[1,1]", "data.crop_size=136", "model.ema.decay=0.7",
              "scheduler.total_iters=6",
              "trainer.val_check_interval=3", f"+callbacks.seed._target_={__name__}.SeedEachStep"]  # fmt: skip
    whole = make_cfg(*common, "trainer.max_steps=6")
    metrics = train(whole)
    ckpt = Path(whole.output_dir) / "checkpoints"
    full = torch.load(ckpt / "last.ckpt", map_location="cpu", weights_only=True)
    # the checkpoint's weights are the average, the raw ones kept beside them; 6 optimizer steps averaged
    assert int(full["averaging_state"]["n_averaged"]) == 6
    conv = next(k for k, v in full["state_dict"].items() if v.is_floating_point() and v.dim() == 4)
    assert not torch.allclose(full["state_dict"][conv], full["current_model_state"][conv])
    # validation scored the averaged weights: evaluating the best checkpoint gives the best score it was saved for
    report = evaluate(make_cfg(f"data.root={root}", "train=false", f"ckpt_path={ckpt / 'best.ckpt'}"))
    assert report["mean_iou"] == pytest.approx(metrics["best/val/mIoU"], abs=1e-6)

    # the same 6 steps, interrupted after 3 and resumed: the same average and the same raw weights
    resumed_dir = tmp_path / "resumed"
    first = make_cfg(*common, "trainer.max_steps=3")
    first.output_dir = str(resumed_dir)
    train(first)
    second = make_cfg(*common, "trainer.max_steps=6", f"ckpt_path={resumed_dir / 'checkpoints' / 'last.ckpt'}")
    second.output_dir = str(resumed_dir)
    train(second)
    resumed = torch.load(resumed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # the average was restored, not restarted: 3 updates before the interruption and 3 after
    assert int(resumed["averaging_state"]["n_averaged"]) == 6
    assert set(resumed["state_dict"]) == set(full["state_dict"])
    # ... and the resumed run continues exactly: the same average and the same raw weights as the uninterrupted one
    for key in ("state_dict", "current_model_state"):
        assert set(resumed[key]) == set(full[key])
        different = [k for k in full[key] if not torch.equal(resumed[key][k], full[key][k])]
        assert not different, f"{key}: {len(different)} tensors differ after the resume, e.g. {different[:3]}"


def test_ema_before_its_start_step_leaves_the_live_weights(make_cfg) -> None:
    """model.ema.start_step beyond the run: no average exists, so validation, checkpoints and the trained module are
    the live weights, not the initial ones the average starts as."""
    cfg = make_cfg(
        "trainer.max_steps=2", "trainer.val_check_interval=2", "model.ema.decay=0.9", "model.ema.start_step=50"
    )
    metrics = train(cfg)
    ckpt = Path(cfg.output_dir) / "checkpoints"
    state = torch.load(ckpt / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(state["averaging_state"]["n_averaged"]) == 0
    assert set(state["state_dict"]) == set(state["current_model_state"])
    assert all(torch.equal(v, state["current_model_state"][k]) for k, v in state["state_dict"].items())
    report = evaluate(make_cfg("train=false", f"ckpt_path={ckpt / 'best.ckpt'}"))
    assert report["mean_iou"] == pytest.approx(metrics["best/val/mIoU"], abs=1e-6)


def test_ema_callback_checks_its_decay() -> None:
    with pytest.raises(ValueError, match="model.ema.decay"):
        EMA(decay=1.0)


def test_gradient_accumulation_counts_optimizer_steps(make_cfg) -> None:
    # 12 images, batches of 3: 2 optimizer steps of 2 batches each; the schedule and the EMA advance once per
    # optimizer step (Lightning's val_check_interval counts batches: validation and last.ckpt after the 4th)
    options = ["data.batch_size=3", "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=4"]
    cfg = make_cfg(*options, "trainer.max_steps=2", "model.ema.decay=0.9")
    train(cfg)
    state = torch.load(Path(cfg.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and state["lr_schedulers"][0]["last_epoch"] == 2
    assert int(state["averaging_state"]["n_averaged"]) == 2
    loops = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    assert loops == 4  # batches
    # the average carries the live BatchNorm statistics (averaged ones lag a from-scratch run's so far behind that
    # the demo's EMA model predicted background only) and averages the weights
    average, live = state["state_dict"], state["current_model_state"]
    stats = [k for k in live if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(average[k], live[k]) for k in stats)
    weight = stats[0].replace("running_mean", "weight")
    assert not torch.equal(average[weight], live[weight])
