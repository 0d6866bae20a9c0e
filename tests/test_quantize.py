"""int8 quantisation and the accuracy gate of ``python -m segvoc.export ... quantize=int8``, and scoring exported
models with ``train=false``: every test reads the session's tiny trained model and its exports (fp32 and int8 ONNX
through the export command, ``exported_models`` in conftest.py; TorchScript here), and writes elsewhere."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from PIL import Image

from segvoc.checkpoints.exported import OnnxNet
from segvoc.checkpoints.load import load_model, load_predictor
from segvoc.errors import SegvocError
from segvoc.tasks.evaluate import evaluate
from segvoc.tasks.export import run as export
from segvoc.tasks.quantize import calibration_images, excluded_nodes, quantize_int8
from tests.conftest import ExportedModels, compose_config

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.slow  # the session's tiny training run and ONNX export (about a minute on 2 cores)


def export_config(ckpt: Path, voc_root: Path, *overrides: str):
    return compose_config(
        [
            f"ckpt={ckpt}", f"data.root={voc_root}", "data.download=false", "data.num_workers=0",
            "calibration.num_images=4", "check_shapes=[[1,3,97,131]]", *overrides,
        ],
        "export",
    )  # fmt: skip


@pytest.fixture(scope="module")
def exported(
    exported_models: ExportedModels, voc_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The trained model as fp32 ONNX and int8 ONNX (through the gate: the session's ``python -m segvoc.export ...
    quantize=int8``) and as TorchScript (exported here). Read-only."""
    out = tmp_path_factory.mktemp("exported")
    export(export_config(exported_models.ckpt, voc_root, f"output={out / 'model.pt'}", "format=torchscript"))
    models = exported_models
    return {"ckpt": models.ckpt, "onnx": models.onnx, "int8": models.int8, "pt": out / "model.pt"}


def test_int8_model_is_written_with_the_meta_and_quantised_weights(exported: dict[str, Path]) -> None:
    int8, fp32 = exported["int8"], exported["onnx"]
    assert int8.is_file()
    assert not list(int8.parent.glob("*.pending")) and not list(int8.parent.glob("*.rejected"))
    _, meta = load_model(exported["ckpt"])
    net, int8_meta = load_predictor(int8)
    assert isinstance(net, OnnxNet) and int8_meta == meta
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert int8.stat().st_size <= 0.3 * fp32.stat().st_size
    # the default: uint8 activations (the fast x86 path), int8 weights in 7 bits (reduce_range)
    assert quantized_types(int8) == ({onnx.TensorProto.UINT8}, {onnx.TensorProto.INT8})
    assert largest_weight(int8) <= 64
    # every module quantised, the classifier too; the upsampling that writes the logits stays fp32 (no quantise /
    # dequantise pair around the full-size output)
    graph = onnx.load(str(int8)).graph
    (writer,) = [node for node in graph.node if node.output[0] == graph.output[0].name]
    assert writer.op_type == "Resize"
    dequantized = {node.output[0]: node for node in graph.node if node.op_type == "DequantizeLinear"}
    classifier = [node for node in graph.node if node.op_type == "Conv" and node.output[0] == writer.input[0]]
    assert not classifier and writer.input[0] in dequantized  # the classifier's int8 output, dequantised


def largest_weight(path: Path) -> int:
    """The largest |value| of the int8 conv weights of a QDQ model: at most 64 with 7-bit weights."""
    initializers = onnx.load(str(path)).graph.initializer
    weights = [t for t in initializers if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    return max(int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max()) for t in weights)


def quantized_types(path: Path) -> tuple[set[int], set[int]]:
    """The element types of the activations (QuantizeLinear zero points) and of the conv weights (the 4-d
    initializers that a DequantizeLinear reads) of a QDQ model."""
    graph = onnx.load(str(path)).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    activations = {initializers[n.input[2]].data_type for n in graph.node if n.op_type == "QuantizeLinear"}
    stored = [initializers.get(n.input[0]) for n in graph.node if n.op_type == "DequantizeLinear"]
    weights = {tensor.data_type for tensor in stored if tensor is not None and len(tensor.dims) == 4}
    return activations, weights


def test_int8_model_predicts_through_predict_py(exported: dict[str, Path], voc_root: Path, tmp_path: Path) -> None:
    from segvoc.tasks.predict import run as predict

    images = voc_root / "VOCdevkit" / "VOC2012" / "JPEGImages"
    masks = {}
    for kind in ("onnx", "int8"):
        out = tmp_path / kind
        cfg = compose_config([f"ckpt={exported[kind]}", f"input={images}", f"output={out}", "num_workers=0"], "predict")
        assert predict(cfg) == 0
        masks[kind] = {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))}
    assert len(masks["int8"]) == len(list(images.glob("*.jpg"))) and masks["int8"].keys() == masks["onnx"].keys()
    agree = np.mean([np.mean(masks["int8"][k] == masks["onnx"][k]) for k in masks["onnx"]])
    assert agree > 0.9  # int8 predicts what fp32 predicts on most pixels


def test_export_prints_the_gate_table(voc_root: Path, exported: dict[str, Path], tmp_path: Path, caplog) -> None:
    # quantising an existing fp32 .onnx: no PyTorch row, the fp32 and int8 rows with sizes
    with caplog.at_level(logging.INFO, logger="segvoc.tasks.export"):
        export(export_config(exported["onnx"], voc_root, "quantize=int8", f"int8_output={tmp_path / 'q.onnx'}"))
    table = caplog.text[caplog.text.index("mIoU") :]
    assert "fp32" in table and "int8" in table and "agree w/ fp32" in table
    assert (tmp_path / "q.onnx").is_file()


def test_gate_refuses_an_int8_model_that_loses_too_much(
    exported: dict[str, Path], voc_root: Path, tmp_path: Path
) -> None:
    target = tmp_path / "refused.int8.onnx"
    cfg = export_config(exported["onnx"], voc_root, "quantize=int8", f"int8_output={target}", "gate.max_miou_drop=-1")
    with pytest.raises(SegvocError, match=r"loses -?[\d.]+ mIoU points against fp32.*gate.max_miou_drop=-1"):
        export(cfg)
    assert not target.exists()
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("*.pending"))
    assert (tmp_path / "refused.int8.onnx.rejected").is_file()  # kept for inspection, under a name no tool loads


def test_excluded_modules_stay_fp32(exported: dict[str, Path], voc_root: Path, tmp_path: Path) -> None:
    target = tmp_path / "kept.onnx"
    export(
        export_config(
            exported["onnx"], voc_root, "quantize=int8", f"int8_output={target}",
            "calibration.exclude=[head.classifier]", "calibration.method=percentile", "gate.max_images=1",
            "calibration.activations=int8", "calibration.reduce_range=false",
        )
    )  # fmt: skip
    assert quantized_types(target) == ({onnx.TensorProto.INT8}, {onnx.TensorProto.INT8})
    assert largest_weight(target) > 64  # full 8-bit weights
    graph = onnx.load(str(target)).graph
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    convs = {node.input[1]: node for node in graph.node if node.op_type == "Conv"}
    assert "head.classifier.weight" in convs  # the fp32 weight feeds the classifier directly
    assert not set(convs["head.classifier.weight"].input[1:]) & dequantized  # weight and bias stay fp32
    assert any(name.endswith("_DequantizeLinear_Output") for name in convs)  # the other convs are quantised


def test_unknown_excluded_module_is_refused(exported: dict[str, Path]) -> None:
    with pytest.raises(SegvocError, match="head.clasifier"):
        excluded_nodes(onnx.load(str(exported["onnx"])), ["head.clasifier"])


def test_unknown_activation_type_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SegvocError, match="calibration.activations=uint4"):
        quantize_int8(exported["onnx"], tmp_path / "q.onnx", [], activations="uint4")


def test_calibration_images_are_normalised_whole_training_images(voc_root: Path) -> None:
    images = calibration_images(voc_root / "VOCdevkit" / "VOC2012", "train", 5, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert len(images) == 5 and all(i.shape[:2] == (1, 3) and i.dtype.name == "float32" for i in images)
    assert all(float(i.min()) >= -2.0 - 1e-6 and float(i.max()) <= 2.0 + 1e-6 for i in images)
    assert min(float(i.std()) for i in images) > 0.1  # images, not padding
    assert len(calibration_images(voc_root / "VOCdevkit" / "VOC2012", "train", 100, (0, 0, 0), (1, 1, 1))) == 12


def test_exported_models_score_like_the_checkpoint(exported: dict[str, Path], make_cfg) -> None:
    scores = {}
    for kind in ("ckpt", "onnx", "pt", "int8"):
        # one image per batch: the protocol of the gate, which let the int8 model through
        cfg = make_cfg("train=false", f"ckpt_path={exported[kind]}", "data.val_batch_size=1")
        report = evaluate(cfg)
        assert list(Path(cfg.output_dir).glob("eval*.json"))  # the report, written as for a checkpoint
        assert report["checkpoint"] == str(exported[kind])
        scores[kind] = report["mean_iou"]
    # fp32 parity (>= 99.9 % identical argmax pixels, logits within 1e-3) keeps the mIoU within 0.1 point
    assert scores["onnx"] == pytest.approx(scores["ckpt"], abs=1e-3)
    assert scores["pt"] == pytest.approx(scores["ckpt"], abs=1e-3)
    assert scores["onnx"] - scores["int8"] <= 0.01 + 1e-9  # what the gate (max_miou_drop=1.0 point) let through
    assert scores["ckpt"] > 0.05  # scored on real masks (the tiny model's mIoU is its background class's)


def test_exported_models_score_with_multi_scale_and_flip(exported: dict[str, Path], make_cfg) -> None:
    reports = [
        evaluate(
            make_cfg(
                "train=false",
                f"ckpt_path={exported[k]}",
                "model.inference.scales=[0.75,1.0]",
                "model.inference.flip=true",
            )
        )  # fmt: skip
        for k in ("ckpt", "onnx")
    ]
    assert reports[1]["protocol"]["flip"] is True
    assert reports[1]["mean_iou"] == pytest.approx(reports[0]["mean_iou"], abs=1e-3)
