"""Reading exported models: ONNX files (through onnxruntime) and TorchScript files, with the segvoc meta that
``segvoc.tasks.export`` embeds in both (class names, palette, mean, std, network spec as JSON).

Both formats take normalised images ``images`` float32 ``(N, 3, H, W)`` and return ``logits`` ``(N, C, H, W)``.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segvoc.checkpoints.format import META_KEY
from segvoc.errors import SegvocError
from segvoc.models.inference import Net

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
TORCHSCRIPT_META_FILE = "segvoc.json"
INSTALL_HINT = 'Install the export dependencies with `pip install -e ".[export]"` (onnx, onnxscript, onnxruntime).'


@contextmanager
def _quiet_torchscript() -> Iterator[None]:
    # TorchScript is deprecated in favour of torch.export; the format was chosen explicitly, so each jit call's
    # deprecation notice would only be noise for the person exporting or predicting.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated.*")
        yield


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load a TorchScript file written by ``export_torchscript``: ``(module on the CPU in eval mode, meta)``."""
    path = Path(path)
    if not path.is_file():
        raise SegvocError(f"The TorchScript model {path} does not exist; export one with `python -m segvoc.export`.")
    extra = {TORCHSCRIPT_META_FILE: ""}
    try:
        with _quiet_torchscript():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except RuntimeError as exc:
        raise SegvocError(
            f"Cannot read {path} as a TorchScript model ({exc}); the file is truncated or not one."
        ) from exc
    if not extra[TORCHSCRIPT_META_FILE]:
        raise SegvocError(
            f"{path} has no segvoc meta ({TORCHSCRIPT_META_FILE}); it was not written by segvoc. Export the "
            "checkpoint again with `python -m segvoc.export ckpt=<file> format=torchscript`."
        )
    return module.eval(), json.loads(extra[TORCHSCRIPT_META_FILE])


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise SegvocError(f"Running an ONNX model needs onnxruntime, which is not installed. {INSTALL_HINT}") from exc
    return onnxruntime


class OnnxNet(nn.Module):
    """An exported ONNX model (fp32 or int8) behind the torch net's interface: ``net(images) -> logits`` and
    ``net.meta``.

    An ``nn.Module`` without parameters, so it can stand where a network does (the Lightning module of
    ``train=false``): moving it or changing its memory format does nothing. Runs on onnxruntime's CUDA provider
    when it is available and ``device`` is not ``"cpu"``, else on the CPU, with ``threads`` intra-op threads
    (``None``: onnxruntime's default, one per core). Takes and returns torch tensors; the logits come back on the
    device of the images (through host memory), without gradients.
    """

    def __init__(self, path: str | Path, threads: int | None = None, device: str | None = None) -> None:
        super().__init__()
        ort = _import_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise SegvocError(f"The ONNX model {self.path} does not exist; export one with `python -m segvoc.export`.")
        available = ort.get_available_providers()
        wanted = ("CPUExecutionProvider",) if device == "cpu" else ("CUDAExecutionProvider", "CPUExecutionProvider")
        providers = [p for p in wanted if p in available]
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own error types for unreadable models
            raise SegvocError(
                f"onnxruntime cannot load {self.path} ({exc}); the file is truncated or not ONNX."
            ) from exc
        raw = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if raw is None:
            raise SegvocError(
                f"{self.path} has no segvoc meta (metadata key '{META_KEY}'); it was not written by segvoc. Export "
                "the checkpoint again with `python -m segvoc.export ckpt=<file> format=onnx`."
            )
        self.meta: dict[str, Any] = json.loads(raw)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, C, H, W)`` for normalised images ``(N, 3, H, W)``."""
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})
        return torch.from_numpy(logits).to(images.device)

    def extra_repr(self) -> str:
        return f"{str(self.path)!r}, providers={self.session.get_providers()}"


def is_exported(path: str | Path) -> bool:
    """Whether ``path`` is an exported model (ONNX by its suffix, or a TorchScript archive) rather than a checkpoint."""
    path = Path(path)
    if path.suffix == ".onnx":
        return True
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def load_exported(path: str | Path) -> tuple[Net, dict[str, Any]]:
    """``(net, meta)`` from an exported file, by suffix: ``.onnx`` through ``OnnxNet``, else TorchScript."""
    if Path(path).suffix == ".onnx":
        net = OnnxNet(path)
        return net, net.meta
    return load_torchscript(path)
