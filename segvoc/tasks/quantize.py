"""int8 post-training quantisation of an exported fp32 ONNX model, and the accuracy gate that scores it.

``quantize_int8`` runs ONNX Runtime's static quantisation: QDQ format, per-channel int8 weights, 8-bit activations
(unsigned by default: ONNX Runtime's x86 kernels multiply uint8 activations by int8 weights natively) whose ranges
are calibrated on normalised training images (``calibration_images``: the validation transform,
whole images). Nodes of the modules named in ``exclude`` (module paths such as ``head.classifier``, which the
exporter records in each node's ``pkg.torch.onnx.name_scopes``) stay fp32. The int8 file carries the fp32 file's
segvoc meta, so ``segvoc.checkpoints.load.load_predictor`` and ``predict.py`` read it like any other.

``score_models`` runs several nets over the validation split with ``segvoc.models.inference.infer`` and the one
metric (``segvoc.metrics.SegmentationMetrics``); ``gate_table`` prints them side by side. ``python -m
segvoc.export ... quantize=int8`` (``segvoc.tasks.export``) uses all three.
"""

from __future__ import annotations

import ast
import json
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segvoc.checkpoints.exported import _import_onnxruntime
from segvoc.checkpoints.format import META_KEY
from segvoc.data.transforms import normalize, val_transform
from segvoc.data.voc import VOCSegmentation
from segvoc.errors import SegvocError
from segvoc.files import temp_name
from segvoc.metrics import SegmentationMetrics
from segvoc.models.inference import Net, infer

log = logging.getLogger("segvoc.tasks.quantize")

CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "distribution")
ACTIVATION_TYPES = ("uint8", "int8")
NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def calibration_images(
    voc: str | Path,
    split: str,
    count: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
    mask_dir: str = "SegmentationClass",
) -> list[np.ndarray]:
    """``count`` images of ``split`` (drawn with ``seed``, all when the split is smaller), each as a normalised
    float32 ``(1, 3, H, W)`` array through the validation transform (whole image), as the model sees them."""
    dataset = VOCSegmentation(Path(voc), split, val_transform(None), mask_dir)
    if count < 1:
        raise SegvocError(f"calibration.num_images={count} must be at least 1.")
    if len(dataset) == 0:
        raise SegvocError(f"The split {split} of {voc} is empty; calibration needs training images (data.*).")
    indices = random.Random(seed).sample(range(len(dataset)), min(count, len(dataset)))
    return [normalize(dataset[i][0][None], mean, std).numpy() for i in sorted(indices)]


def excluded_nodes(model: Any, modules: Sequence[str]) -> list[str]:
    """Names of the nodes of the ONNX ``model`` that belong to one of ``modules`` (PyTorch module paths, e.g.
    ``head.classifier`` or ``backbone.low_level.0``), read from the exporter's name scopes; a module that matches
    no node raises ``SegvocError`` (a misspelt exclusion would otherwise quietly quantise everything)."""
    found: dict[str, list[str]] = {name: [] for name in modules}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        scopes = props.get(NAME_SCOPES)
        if not scopes:
            continue
        scopes = set(ast.literal_eval(scopes)) if scopes.startswith("[") else {scopes}
        for name in modules:
            if name in scopes:
                found[name].append(node.name)
    missing = [name for name, nodes in found.items() if not nodes]
    if missing:
        raise SegvocError(
            f"calibration.exclude names {missing}, which no node of the ONNX model belongs to. Give PyTorch module "
            "paths of the network, e.g. head.classifier, head.aspp.branches.4 (the ASPP pooling branch) or "
            "backbone.low_level.0 (the first conv), or [] to quantise everything."
        )
    return sorted({node for nodes in found.values() for node in nodes})


def output_nodes(model: Any) -> list[str]:
    """Names of the nodes of the ONNX ``model`` that write its outputs (the upsampling of the logits to the input
    size). They stay fp32: quantising them would wrap the full-size logits, 21 x H x W floats, in a quantise /
    dequantise pair, rounding the output the argmax is taken of, and costs more than the int8 op saves (measured:
    BENCHMARKS.md, deployment)."""
    outputs = {output.name for output in model.graph.output}
    return [node.name for node in model.graph.node if outputs.intersection(node.output)]


class _DropMessage(logging.Filter):
    """Drop log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The central ``height x width`` of ``image`` ``(..., H, W)``."""
    top, left = (image.shape[-2] - height) // 2, (image.shape[-1] - width) // 2
    return np.ascontiguousarray(image[..., top : top + height, left : left + width])


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of input arrays (batch 1, any size)."""

    def __init__(self, images: Sequence[np.ndarray], input_name: str) -> None:
        self._items: Iterator[dict[str, np.ndarray]] = iter([{input_name: image} for image in images])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize_int8(
    fp32_path: str | Path,
    output: str | Path,
    images: Sequence[np.ndarray],
    method: str = "minmax",
    exclude: Sequence[str] = (),
    percentile: float = 99.999,
    per_channel: bool = True,
    activations: str = "uint8",
    reduce_range: bool = True,
) -> Path:
    """Write the int8 QDQ quantisation of the ONNX model ``fp32_path`` to ``output`` and return ``output``.

    Activations are calibrated on ``images`` (normalised ``(1, 3, H, W)`` float32 arrays) with ``method``
    (``minmax``, ``entropy``, ``percentile`` at ``percentile``, ``distribution``; the histogram methods, all but
    ``minmax``, see the central crop of the size all images share); weights are int8, per output
    channel with ``per_channel`` and 7-bit with ``reduce_range`` (no int16 overflow in x86 kernels without VNNI);
    activations ``uint8`` or ``int8`` (``ACTIVATION_TYPES``); the nodes of the modules in ``exclude`` stay fp32. The
    segvoc meta of ``fp32_path`` is copied over. The file is written under a temporary name and renamed at the end,
    so an interrupted quantisation leaves no file at ``output``.
    """
    import onnx

    ort = _import_onnxruntime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise SegvocError(f"calibration.method={method} is not known; use one of {', '.join(CALIBRATION_METHODS)}.")
    if activations not in ACTIVATION_TYPES:
        raise SegvocError(
            f"calibration.activations={activations} is not known; use one of {', '.join(ACTIVATION_TYPES)}."
        )
    fp32_path, output = Path(fp32_path), Path(output)
    model = onnx.load(str(fp32_path))
    meta = {p.key: p.value for p in model.metadata_props}
    nodes = excluded_nodes(model, list(exclude)) + output_nodes(model)
    input_name = model.graph.input[0].name
    options: dict[str, Any] = {}
    if method == "percentile":
        options["CalibPercentile"] = float(percentile)
    if method != "minmax":  # onnxruntime's histogram calibrators stack the tensors of all images: one size
        height = min(image.shape[-2] for image in images)
        width = min(image.shape[-1] for image in images)
        images = [center_crop(image, height, width) for image in images]
    temp = temp_name(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    advice = _DropMessage("Please consider")  # the exporter already folded BatchNorm
    logging.getLogger().addFilter(advice)
    try:
        quantize_static(
            model,
            temp,
            _Reader(images, input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=nodes,
            calibrate_method=getattr(CalibrationMethod, {"minmax": "MinMax"}.get(method, method.capitalize())),
            extra_options=options,
        )
        quantized = onnx.load(str(temp))
        quantized.ClearField("metadata_props")
        onnx.helper.set_model_props(quantized, {**meta, "segvoc_quantization": json.dumps(
            {"method": method, "exclude": list(exclude), "calibration_images": len(images),
             "per_channel": per_channel, "activations": activations,
             "reduce_range": reduce_range, "onnxruntime": ort.__version__}
        )})  # fmt: skip
        onnx.save(quantized, str(temp))
        temp.replace(output)
    finally:
        logging.getLogger().removeFilter(advice)
        temp.unlink(missing_ok=True)
    if META_KEY not in meta:
        log.warning("%s has no segvoc meta; %s cannot be predicted with or scored", fp32_path, output)
    return output


def quantize_as_configured(
    fp32_path: str | Path, output: str | Path, images: Sequence[np.ndarray], calibration: Mapping[str, Any]
) -> Path:
    """``quantize_int8`` with the settings of a ``calibration`` block of conf/export.yaml (method, exclude,
    percentile, per_channel, activations, reduce_range): what the export command and ``segvoc.bench`` both run."""
    return quantize_int8(
        fp32_path, output, images, method=str(calibration["method"]), exclude=list(calibration["exclude"]),
        percentile=float(calibration["percentile"]), per_channel=bool(calibration["per_channel"]),
        activations=str(calibration["activations"]), reduce_range=bool(calibration["reduce_range"]),
    )  # fmt: skip


@dataclass
class Score:
    """The validation figures of one net, and how often its argmax agrees with the reference net's."""

    metrics: SegmentationMetrics
    agreeing: int = 0
    pixels: int = 0
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def miou(self) -> float:
        return float(self.figures["mIoU"])

    @property
    def agreement(self) -> float:
        return self.agreeing / self.pixels if self.pixels else float("nan")


@torch.inference_mode()
def score_models(
    nets: Mapping[str, Net],
    dataset: VOCSegmentation,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    ignore_index: int = 255,
    inference: Mapping[str, Any] | None = None,
    max_images: int | None = None,
) -> dict[str, Score]:
    """Score every net of ``nets`` on ``dataset`` (whole images one by one, through ``infer`` with the
    ``inference`` options) with ``SegmentationMetrics``; argmax agreement is counted against the first net."""
    scores = {name: Score(SegmentationMetrics(num_classes, ignore_index)) for name in nets}
    count = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    for index in range(count):
        image, mask = dataset[index]
        images = normalize(image[None], mean, std)
        reference: torch.Tensor | None = None
        for name, net in nets.items():
            preds = infer(net, images, **dict(inference or {})).argmax(1)
            scores[name].metrics.update(preds, mask[None].long())
            reference = preds if reference is None else reference
            scores[name].agreeing += int((preds == reference).sum())
            scores[name].pixels += preds.numel()
    for score in scores.values():
        score.figures = score.metrics.compute()
    return scores


def gate_table(scores: Mapping[str, Score], sizes: Mapping[str, int | None], reference: str) -> str:
    """The accuracy gate's table: mIoU of each net, its difference to ``reference`` in points, argmax agreement
    with the first net, file size."""
    first = next(iter(scores))
    rows = [f"{'model':<10} {'mIoU':>8} {'diff (pts)':>11} {'agree w/ ' + first:>16} {'size (MB)':>10}"]
    for name, score in scores.items():
        diff = 100 * (score.miou - scores[reference].miou)
        size = sizes.get(name)
        rows.append(
            f"{name:<10} {100 * score.miou:>8.2f} {diff:>+11.2f} {100 * score.agreement:>15.3f}% "
            f"{(size / 1e6 if size is not None else float('nan')):>10.2f}"
        )
    return "\n".join(rows)
