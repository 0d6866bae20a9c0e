"""Export to ONNX and TorchScript: dynamic sizes, parity with PyTorch, meta in the file, the CLI and its errors.
The ONNX checks read the session's one export of the tiny trained model (``exported_models`` in conftest.py)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segvoc.checkpoints.exported import OnnxNet, load_torchscript
from segvoc.checkpoints.format import describe
from segvoc.checkpoints.load import load_model
from segvoc.errors import SegvocError
from segvoc.models.deeplab import deeplabv3plus_mobilenet
from segvoc.palette import VOC_CLASSES
from segvoc.tasks.export import compare, run
from tests.conftest import ExportedModels, compose_config, export_cli

# Sizes other than the export's example input (2x3x224x224), odd so that every stride rounds.
OTHER_SHAPES = [(1, 3, 97, 131), (3, 3, 160, 224)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A segvoc checkpoint of a random DeepLabV3+ (21 classes, OS16) with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    net = deeplabv3plus_mobilenet(num_classes=21, output_stride=16)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "segvoc": describe(net, list(VOC_CLASSES))}, path)
    return path


def test_cli_exports_onnx_and_reports_parity(exported_models: ExportedModels) -> None:
    # the session's one ONNX export ran the command as a user does: python -m segvoc.export ckpt=... output=...
    output, log = exported_models.onnx, exported_models.log
    assert output.is_file()
    assert "Parity on random 2x3x97x131" in log and "Parity on random 1x3x375x500" in log
    overall = re.search(r"Parity overall: max \|logit diff\| (\S+), identical argmax ([\d.]+)%", log)
    assert overall, log
    assert float(overall.group(1)) < 1e-3
    assert float(overall.group(2)) >= 99.9
    assert "onnx_ir" not in log  # the optimiser's INFO lines are kept out of the report


@pytest.mark.parametrize("shape", OTHER_SHAPES)
def test_onnx_net_matches_pytorch_at_other_sizes(exported_models: ExportedModels, shape) -> None:
    net, _ = load_model(exported_models.ckpt)
    onnx_net = OnnxNet(exported_models.onnx)
    images = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    assert onnx_net(images).shape == (shape[0], 21, *shape[2:])
    parity = compare(net, onnx_net, images)
    assert parity.agreement >= 0.999
    assert parity.max_abs_diff < 1e-3


def test_onnx_model_declares_dynamic_inputs_and_keeps_the_meta(exported_models: ExportedModels) -> None:
    onnx_net = OnnxNet(exported_models.onnx)
    (inputs,), (outputs,) = onnx_net.session.get_inputs(), onnx_net.session.get_outputs()
    assert (inputs.name, inputs.shape) == ("images", ["batch", 3, "height", "width"])
    assert (outputs.name, outputs.shape) == ("logits", ["batch", 21, "height", "width"])
    _, meta = load_model(exported_models.ckpt)
    assert onnx_net.meta == meta
    assert onnx_net.meta["class_names"] == list(VOC_CLASSES)


def test_onnx_net_without_onnxruntime_says_what_to_install(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(SegvocError, match=re.escape('pip install -e ".[export]"')):
        OnnxNet(tmp_path / "model.onnx")


def test_onnx_net_rejects_a_file_that_is_not_onnx(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(SegvocError, match="truncated or not ONNX"):
        OnnxNet(path)


def test_torchscript_export_checks_images_and_runs_at_other_sizes(checkpoint: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (75, 101)), ("b.jpg", (120, 93))):
        cv2.imwrite(str(images / name), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    output = tmp_path / "model.pt"
    cfg = compose_config(
        [f"ckpt={checkpoint}", "format=torchscript", f"output={output}", f"check_images={images}"], "export"
    )
    assert run(cfg).agreement >= 0.999

    module, meta = load_torchscript(output)
    net, expected_meta = load_model(checkpoint)
    assert meta == expected_meta
    for shape in OTHER_SHAPES:
        parity = compare(net, module, torch.randn(shape))
        assert parity.agreement >= 0.999 and parity.max_abs_diff < 1e-3


def test_failed_parity_exits_1_with_a_message_and_no_traceback(checkpoint: Path, tmp_path: Path) -> None:
    # No export reaches an agreement above 100%, so this exercises the failure path on a correct export.
    ckpt = shutil.copy(checkpoint, tmp_path / "model.ckpt")  # output=null writes beside it: not into the fixture
    result = export_cli(
        f"ckpt={ckpt}", "format=torchscript", "min_agreement=1.01", "check_shapes=[[1,3,33,47]]", cwd=tmp_path
    )
    assert result.returncode == 1
    output = result.stdout + result.stderr  # logged like train.py's errors (Hydra's console handler and the log)
    assert "reproduces PyTorch's prediction on only" in output and "min_agreement=1.01" in output
    assert "Traceback" not in output
    assert (tmp_path / "model.pt").is_file()  # output=null: next to the checkpoint


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "Name the checkpoint to export"),
        (["ckpt=missing.ckpt"], "missing.ckpt does not exist"),
        (["ckpt={ckpt}", "format=tflite"], "format=tflite is not supported"),
        (["ckpt={ckpt}", "format=torchscript", "output={ckpt}"], "would overwrite the checkpoint"),
        (["ckpt={ckpt}", "format=torchscript", "check_images={tmp}"], "names no image"),
        (["ckpt={ckpt}", "format=torchscript", "check_shapes=[[97,131]]"], "must list input shapes"),
    ],
)
def test_bad_settings_fail_before_exporting(checkpoint: Path, tmp_path: Path, overrides, message) -> None:
    cfg = compose_config([o.format(ckpt=checkpoint, tmp=tmp_path) for o in overrides], "export")
    with pytest.raises(SegvocError, match=message):
        run(cfg)
