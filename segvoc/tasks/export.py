"""Export a segvoc checkpoint to ONNX or TorchScript and check the file against PyTorch.

``python -m segvoc.export ckpt=<file> [format=onnx|torchscript] [output=<file>] [opset=18] [check_images=<path>]
[quantize=int8 data.root=<data>]``

Both formats take normalised images ``images`` float32 ``(N, 3, H, W)`` and return ``logits`` ``(N, C, H, W)`` at
the input size, with batch, height and width free. Both carry the checkpoint's meta
(``segvoc.checkpoints.format.describe``: class names, palette, mean, std, network spec) as JSON, so prediction needs
nothing but the exported file; ``segvoc.checkpoints.exported`` reads them back.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from segvoc.checkpoints.exported import (
    INPUT_NAME,
    INSTALL_HINT,
    OUTPUT_NAME,
    TORCHSCRIPT_META_FILE,
    _import_onnxruntime,
    _quiet_torchscript,
    load_exported,
)
from segvoc.checkpoints.format import META_KEY
from segvoc.checkpoints.load import load_model
from segvoc.errors import SegvocError, exit_on_user_error
from segvoc.models.inference import Net

log = logging.getLogger("segvoc.tasks.export")  # not __name__, which is "__main__" under python -m

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
# torch.export specialises dimensions of size 0 or 1, so the example batch must hold at least two images.
EXAMPLE_SHAPE = (2, 3, 224, 224)


@contextmanager
def _quiet_onnx_passes() -> Iterator[None]:
    # onnxscript's optimiser logs hundreds of INFO lines per export, which drown the export report when the root
    # logger is at INFO (as under Hydra).
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(net: torch.nn.Module, meta: dict[str, Any], path: str | Path, opset: int | None = 18) -> Path:
    """Write ``net`` (in eval mode) to ``path`` as one self-contained ONNX file with dynamic batch, height and width.

    ``meta`` is stored as JSON under the ``segvoc`` key of the model's metadata_props; ``opset=None`` takes the
    exporter's default.
    """
    try:
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it; fail here with the install hint
    except ImportError as exc:
        raise SegvocError(f"ONNX export needs the onnxscript package, which is not installed. {INSTALL_HINT}") from exc
    from torch.export import Dim

    dims = {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")}
    with _quiet_onnx_passes():
        program = torch.onnx.export(
            net,
            (torch.randn(EXAMPLE_SHAPE),),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_shapes=(dims,),
            dynamo=True,
            verbose=False,
        )
    program.model.metadata_props[META_KEY] = json.dumps(meta)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        program.save(path, external_data=False)
    except OSError as exc:
        raise SegvocError(f"Cannot write the ONNX model to {path} ({exc}); choose another output=.") from exc
    return path


def export_torchscript(net: torch.nn.Module, meta: dict[str, Any], path: str | Path) -> Path:
    """Trace ``net`` (in eval mode) to TorchScript at ``path``, with ``meta`` as the extra file ``segvoc.json``.

    Tracing records the size arithmetic of the upsampling steps, so the file works for any input size; the parity
    check in ``run`` confirms that on sizes other than the traced one.
    """
    path = Path(path)
    with _quiet_torchscript(), torch.no_grad():
        # check_trace would re-run the net twice more and compare; the parity check does that on other sizes.
        traced = torch.jit.trace(net, torch.randn(EXAMPLE_SHAPE), check_trace=False)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_META_FILE: json.dumps(meta)})
        except OSError as exc:
            raise SegvocError(f"Cannot write the TorchScript model to {path} ({exc}); choose another output=.") from exc
    return path


@dataclass(frozen=True)
class Parity:
    """How closely an exported model reproduces PyTorch: largest logit difference, identical argmax pixels."""

    max_abs_diff: float
    identical_pixels: int
    pixels: int

    @property
    def agreement(self) -> float:
        return self.identical_pixels / self.pixels

    @classmethod
    def combine(cls, parts: Sequence[Parity]) -> Parity:
        return cls(
            max(p.max_abs_diff for p in parts),
            sum(p.identical_pixels for p in parts),
            sum(p.pixels for p in parts),
        )

    def __str__(self) -> str:
        return (
            f"max |logit diff| {self.max_abs_diff:.3g}, identical argmax {100 * self.agreement:.3f}% "
            f"of {self.pixels} pixels"
        )


@torch.inference_mode()
def compare(reference: Net, candidate: Net, images: torch.Tensor) -> Parity:
    """Run both nets on ``images`` and measure how far ``candidate``'s logits are from ``reference``'s."""
    expected, actual = reference(images), candidate(images).to(images.device)
    if actual.shape != expected.shape:
        raise SegvocError(
            f"The exported model returns logits of shape {tuple(actual.shape)} for input {tuple(images.shape)}, "
            f"PyTorch {tuple(expected.shape)}; the export is broken. Report it with your torch version."
        )
    identical = int((actual.argmax(1) == expected.argmax(1)).sum())
    return Parity(float((actual - expected).abs().max()), identical, expected[:, 0].numel())


def check_inputs(cfg: DictConfig, meta: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """Named normalised batches for the parity check: ``cfg.check_images`` one by one, else random ``check_shapes``."""
    if cfg.check_images is None:
        generator = torch.Generator().manual_seed(int(cfg.seed))
        shapes = [tuple(int(v) for v in shape) for shape in cfg.check_shapes]
        if not shapes or any(len(s) != 4 or s[1] != 3 for s in shapes):
            raise SegvocError(
                f"check_shapes={OmegaConf.to_container(cfg.check_shapes)} must list input shapes [N, 3, H, W], e.g. "
                "check_shapes=[[2,3,97,131]], or give check_images= to check on images."
            )
        return [("random " + "x".join(map(str, s)), torch.randn(s, generator=generator)) for s in shapes]
    from segvoc.data.image import read_image
    from segvoc.data.transforms import normalize
    from segvoc.tasks.predict import find_inputs

    files = find_inputs(str(cfg.check_images), key="check_images")[: int(cfg.check_max_images)]
    images = [torch.from_numpy(read_image(f)).permute(2, 0, 1)[None] for f in files]
    return [(f.name, normalize(image, meta["mean"], meta["std"])) for f, image in zip(files, images, strict=True)]


def output_path(cfg: DictConfig) -> Path:
    """Where the export goes: ``cfg.output``, or the checkpoint's path with the format's suffix."""
    if cfg.format not in FORMATS:
        raise SegvocError(f"format={cfg.format} is not supported; use one of {', '.join(FORMATS)}.")
    ckpt = Path(str(cfg.ckpt))
    path = Path(str(cfg.output)) if cfg.output is not None else ckpt.with_suffix(FORMATS[cfg.format])
    if path.resolve() == ckpt.resolve():
        raise SegvocError(f"Exporting to {path} would overwrite the checkpoint; give another file with output=.")
    return path


def run(cfg: DictConfig) -> Parity | None:
    """Export ``cfg.ckpt`` as ``cfg.format``, reload the file and check it against PyTorch; return the parity.

    Raises ``SegvocError`` when fewer than ``cfg.min_agreement`` of the argmax pixels agree; the file stays
    on disk for inspection. With ``quantize=int8`` the fp32 ONNX file (exported here, or ``ckpt`` itself when it is
    an ``.onnx``: then there is no parity to return) is quantised and gated (``quantize_and_gate``).
    """
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise SegvocError("Name the checkpoint to export: `python -m segvoc.export ckpt=path/to/model.ckpt`.")
    quantize = cfg.get("quantize")
    if quantize not in (None, "int8"):
        raise SegvocError(f"quantize={quantize} is not supported; use quantize=int8, or leave it out (null).")
    if quantize and cfg.format != "onnx":
        raise SegvocError("quantize=int8 quantises an ONNX model; use format=onnx (the default).")
    if quantize and Path(str(cfg.ckpt)).suffix == ".onnx":
        quantize_and_gate(cfg, Path(str(cfg.ckpt)), None)
        return None
    path = output_path(cfg)
    net, meta = load_model(cfg.ckpt)
    if cfg.format == "onnx":
        _import_onnxruntime()  # the check needs it: fail before the export rather than after
    inputs = check_inputs(cfg, meta)
    start = time.perf_counter()
    if cfg.format == "onnx":
        export_onnx(net, meta, path, opset=cfg.opset)
    else:
        export_torchscript(net, meta, path)
    log.info(
        "Exported %s to %s (%s, %.1f MB) in %.1f s",
        cfg.ckpt,
        path,
        cfg.format,
        path.stat().st_size / 1e6,
        time.perf_counter() - start,
    )

    start = time.perf_counter()
    exported, exported_meta = load_exported(path)
    if exported_meta != json.loads(json.dumps(meta)):
        raise SegvocError(f"The meta read back from {path} differs from the checkpoint's; the export is broken.")
    parts = []
    for name, images in inputs:
        part = compare(net, exported, images)
        log.info("Parity on %s: %s", name, part)
        parts.append(part)
    parity = Parity.combine(parts)
    log.info("Parity overall: %s (checked in %.1f s)", parity, time.perf_counter() - start)
    if parity.agreement < cfg.min_agreement:
        raise SegvocError(
            f"The exported model {path} reproduces PyTorch's prediction on only {100 * parity.agreement:.3f}% of the "
            f"pixels (min_agreement={cfg.min_agreement}); max |logit diff| {parity.max_abs_diff:.3g}. Do not use the "
            "file: try another opset= or format=, and report it with your torch and onnxruntime versions."
        )
    if quantize or cfg.gate.score:
        quantize_and_gate(cfg, path, net)
    return parity


def int8_path(cfg: DictConfig, fp32: Path) -> Path:
    """Where the int8 model goes: ``cfg.int8_output``, or the fp32 file's path with the suffix ``.int8.onnx``."""
    path = Path(str(cfg.int8_output)) if cfg.get("int8_output") else fp32.with_suffix(".int8.onnx")
    if path.resolve() == fp32.resolve():
        raise SegvocError(f"The int8 model would overwrite the fp32 model {fp32}; give another file with int8_output=.")
    return path


def quantize_and_gate(cfg: DictConfig, fp32: Path, net: Net | None) -> dict[str, Any]:
    """Quantise the fp32 ONNX model ``fp32`` to int8 (when ``cfg.quantize``) and score PyTorch (``net``, when
    given), fp32 and int8 on ``data.val_split``; log the table and return the scores by name.

    The int8 file is written as ``<int8 path>.pending`` and renamed to its path only when it loses at most
    ``gate.max_miou_drop`` mIoU points against fp32; otherwise it becomes ``<int8 path>.rejected`` (for
    inspection) and ``SegvocError`` says by how much it failed and what to try.
    """
    from segvoc.checkpoints.exported import OnnxNet
    from segvoc.tasks.quantize import calibration_images, gate_table, quantize_as_configured, score_models

    fp32_net = OnnxNet(fp32)
    meta = fp32_net.meta
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.check_data([datamodule.train_split, datamodule.val_split] if cfg.quantize else [datamodule.val_split])
    datamodule.setup("validate")
    if len(meta["class_names"]) != datamodule.num_classes:
        raise SegvocError(
            f"{fp32} predicts {len(meta['class_names'])} classes but data.num_classes={datamodule.num_classes}; "
            "score it on the data it was trained for (data.* as in training)."
        )
    nets: dict[str, Net] = {"pytorch": net} if net is not None else {}
    nets["fp32"] = fp32_net
    sizes: dict[str, int | None] = {"pytorch": Path(str(cfg.ckpt)).stat().st_size, "fp32": fp32.stat().st_size}
    final = pending = None
    if cfg.quantize:
        final = int8_path(cfg, fp32)
        pending = final.with_name(final.name + ".pending")
        calib = cfg.calibration
        start = time.perf_counter()
        images = calibration_images(
            datamodule.voc, datamodule.train_split, int(calib.num_images), meta["mean"], meta["std"],
            seed=int(cfg.seed), mask_dir=datamodule.mask_dir,
        )  # fmt: skip
        quantize_as_configured(fp32, pending, images, calib)
        log.info(
            "Quantised %s to int8 (%s activations, %s calibration on %d %s images, fp32: %s) in %.1f s",
            fp32, calib.activations, calib.method, len(images), datamodule.train_split,
            ", ".join([*calib.exclude, "the output upsampling"]),
            time.perf_counter() - start,
        )  # fmt: skip
        nets["int8"] = OnnxNet(pending)
        sizes["int8"] = pending.stat().st_size
    start = time.perf_counter()
    scores = score_models(
        nets, datamodule.val_set, datamodule.num_classes, meta["mean"], meta["std"],
        ignore_index=datamodule.ignore_index, max_images=cfg.gate.max_images,
    )  # fmt: skip
    log.info(
        "Scores on %d %s images (%.1f s):\n%s",
        len(datamodule.val_set) if cfg.gate.max_images is None else min(len(datamodule.val_set), cfg.gate.max_images),
        datamodule.val_split, time.perf_counter() - start, gate_table(scores, sizes, reference="fp32"),
    )  # fmt: skip
    if pending is None or final is None:
        return scores
    drop = 100 * (scores["fp32"].miou - scores["int8"].miou)
    if drop > float(cfg.gate.max_miou_drop):
        rejected = final.with_name(final.name + ".rejected")
        pending.replace(rejected)
        raise SegvocError(
            f"The int8 model loses {drop:.2f} mIoU points against fp32 on {datamodule.val_split} "
            f"({100 * scores['int8'].miou:.2f} vs {100 * scores['fp32'].miou:.2f}), more than "
            f"gate.max_miou_drop={cfg.gate.max_miou_drop}; it was not written to {final} (kept as {rejected} for "
            "inspection). Try more calibration images (calibration.num_images=), another calibration.method= "
            "(minmax, entropy, percentile) or keep more modules fp32 (calibration.exclude=[...]); or deploy the "
            f"fp32 model {fp32}."
        )
    pending.replace(final)
    log.info(
        "int8 model written to %s (mIoU %+.2f points against fp32; gate.max_miou_drop=%s)",
        final, -drop, cfg.gate.max_miou_drop,
    )  # fmt: skip
    return scores


@hydra.main(version_base="1.3", config_path="../../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except Exception as exc:
        exit_on_user_error(exc)


if __name__ == "__main__":
    main()
