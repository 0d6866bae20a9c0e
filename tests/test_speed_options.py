"""The speed options train real steps on the CPU: mixed precision, channels_last, torch.compile."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from segvoc.checkpoints.load import load_model
from segvoc.tasks.train import train


class Probe(L.Callback):
    """Records, during the first training step, what the network ran with: the dtype of its output (autocast), the
    memory format of its input, and whether it is compiled and with which options; written to ``path`` as JSON."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.seen: dict[str, object] = {}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        def hook(net: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not self.seen:
                self.seen.update(
                    output_dtype=str(output.dtype),
                    input_channels_last=inputs[0].is_contiguous(memory_format=torch.channels_last)
                    and not inputs[0].is_contiguous(),
                    compiled=getattr(module.net, "_compiled_call_impl", None) is not None,
                )
                self.path.write_text(json.dumps(self.seen))

        self.handle = module.net.register_forward_hook(hook)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.handle.remove()


def _train_steps(make_cfg, tmp_path: Path, *overrides: str) -> tuple[dict[str, float], Path, dict]:
    probe = tmp_path / "probe.json"
    cfg = make_cfg(
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.crop_size=64",
        "+callbacks.probe._target_=tests.test_speed_options.Probe",
        f"+callbacks.probe.path={probe}",
        *overrides,
    )
    metrics = train(cfg)
    return metrics, Path(cfg.output_dir), json.loads(probe.read_text())


@pytest.mark.parametrize(
    ("precision", "channels_last", "dtype"),
    [("32-true", False, "torch.float32"), ("bf16-mixed", True, "torch.bfloat16")],
)
def test_precision_and_channels_last_take_effect(
    make_cfg, tmp_path: Path, precision: str, channels_last: bool, dtype: str
) -> None:
    """Each value of each option once (the two options are independent: see the unit test below for the layout)."""
    metrics, run, seen = _train_steps(
        make_cfg, tmp_path, f"trainer.precision={precision}", f"model.channels_last={channels_last}"
    )
    assert seen == {"output_dtype": dtype, "input_channels_last": channels_last, "compiled": False}
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


def _check_compiled_run(metrics: dict[str, float], run: Path, seen: dict) -> None:
    assert seen["compiled"] is True
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)  # compiled in place: checkpoints stay interchangeable
    load_model(run / "checkpoints" / "last.ckpt")


def test_compile_options_reach_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.compile`` as a mapping is passed to ``nn.Module.compile`` as keyword arguments, once."""
    from segvoc.training.module import SegmentationModule

    calls: list[dict] = []
    real_compile = torch.nn.Module.compile

    def recording_compile(self: torch.nn.Module, *args: object, **kwargs: object) -> None:
        calls.append(kwargs)
        real_compile(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", recording_compile)
    module = SegmentationModule(fresh_net(), compile={"backend": "eager", "dynamic": False})
    module.configure_model()
    module.configure_model()  # Lightning may call it again (resume): compiled once
    assert calls == [{"backend": "eager", "dynamic": False}]
    assert module.net._compiled_call_impl is not None
    assert SegmentationModule(fresh_net(), compile=False).net._compiled_call_impl is None


@pytest.mark.slow  # TorchDynamo graph capture and AOTAutograd on the CPU: about half a minute
def test_compiled_network_trains(make_cfg, tmp_path: Path) -> None:
    # the aot_eager backend: the whole compile path (forward and backward graphs) without Inductor's C++ build; one
    # step and one validation batch compile the training graphs and the evaluation graph once each
    from torch._dynamo.utils import counters

    counters.clear()
    run = _train_steps(
        make_cfg, tmp_path, "model.compile={backend:aot_eager}", "trainer.max_steps=1", "trainer.val_check_interval=1",
        "+trainer.limit_val_batches=1",
    )  # fmt: skip
    _check_compiled_run(*run)
    # Dynamo captured the network's frames and AOTAutograd built its graphs (the backward one for the training step)
    assert counters["stats"]["unique_graphs"] >= 2 and counters["aot_autograd"]["total"] >= 2


@pytest.mark.long
def test_inductor_compiled_network_trains_in_bf16(make_cfg, tmp_path: Path) -> None:
    # about 3.5 minutes of kernel compilation on 2 CPU cores
    _check_compiled_run(*_train_steps(make_cfg, tmp_path, "model.compile=true", "trainer.precision=bf16-mixed"))
