"""The speed options train real steps on the CPU: mixed precision, channels_last, torch.compile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from segvoc.checkpoints.load import load_model
from segvoc.tasks.train import train


def _train_steps(make_cfg, *overrides: str) -> tuple[dict[str, float], Path]:
    cfg = make_cfg("trainer.max_steps=2", "trainer.val_check_interval=2", "data.crop_size=64", *overrides)
    metrics = train(cfg)
    return metrics, Path(cfg.output_dir)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_precision_and_channels_last_train_a_step(make_cfg, precision: str, channels_last: bool) -> None:
    metrics, run = _train_steps(make_cfg, f"trainer.precision={precision}", f"model.channels_last={channels_last}")
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and 0.0 <= metrics["val/mIoU"] <= 1.0
    assert json.loads((run / "result.json").read_text())["global_step"] == 2
    net, _ = load_model(run / "checkpoints" / "last.ckpt")  # checkpoints load whatever the memory format was
    assert net(torch.zeros(1, 3, 40, 52)).shape == (1, 21, 40, 52)


def test_channels_last_puts_the_network_in_nhwc() -> None:
    from segvoc.training.module import SegmentationModule

    module = SegmentationModule(fresh_net(), channels_last=True)
    module.configure_model()
    convs = [m.weight for m in module.net.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    images = torch.randint(0, 256, (2, 3, 16, 20), dtype=torch.uint8)
    batch = module.on_after_batch_transfer((images, torch.zeros(2, 16, 20, dtype=torch.uint8)), 0)
    assert batch[0].dtype == torch.float32 and batch[0].is_contiguous(memory_format=torch.channels_last)
    assert batch[1].dtype == torch.int64


def fresh_net() -> torch.nn.Module:
    from segvoc.models.deeplab import deeplabv3plus_mobilenet

    return deeplabv3plus_mobilenet(pretrained=False)


def _check_compiled_run(metrics: dict[str, float], run: Path) -> None:
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)  # compiled in place: checkpoints stay interchangeable
    load_model(run / "checkpoints" / "last.ckpt")


def test_compile_options_reach_torch_compile(make_cfg) -> None:
    # TorchDynamo graph capture with the aot_eager backend: the whole compile path without Inductor's C++ build
    _check_compiled_run(*_train_steps(make_cfg, "model.compile={backend:aot_eager}"))


@pytest.mark.long
def test_inductor_compiled_network_trains_in_bf16(make_cfg) -> None:
    # about 3.5 minutes of kernel compilation on 2 CPU cores
    _check_compiled_run(*_train_steps(make_cfg, "model.compile=true", "trainer.precision=bf16-mixed"))
