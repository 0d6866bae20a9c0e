"""Turning image files into masks: reading them (``segvoc.data.image``), batched inference, writing the requested
formats.

``run(cfg)`` is the body of ``predict.py``. Files are read by DataLoader workers, run through
``segvoc.models.inference.infer`` in batches of same-size images, and written by a thread pool while the next batch is
computed. An unreadable file is reported and skipped; the others are still written.
"""

from __future__ import annotations

import glob
import logging
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset

from segvoc.checkpoints.load import load_predictor
from segvoc.data.datamodule import default_num_workers, pad_stack
from segvoc.data.image import displayed_sizes, read_image
from segvoc.data.sampler import SizeGroupedBatchSampler
from segvoc.data.transforms import normalize
from segvoc.errors import SegvocError
from segvoc.models.inference import crop_to_sizes, infer
from segvoc.palette import IGNORE_INDEX, lookup_table
from segvoc.visualize import overlay

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FORMATS = ("index", "palette", "overlay", "voc")
VOC_RESULTS = Path("results/VOC2012/Segmentation/comp5_test_cls")


def find_inputs(spec: str, key: str = "input") -> list[Path]:
    """The image files named by ``spec``: a file, a folder (its images, not recursive) or a glob pattern.

    ``key`` is the config key the user gave ``spec`` with, named in the error when nothing matches."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise SegvocError(
            f"{key}={spec} names no image files (a file, a folder of {', '.join(sorted(IMAGE_SUFFIXES))} files, "
            "or a glob such as 'photos/*.jpg' in quotes)."
        )
    return files


class ImageFiles(Dataset):
    """``dataset[i]`` is ``(uint8 RGB (3, H, W) tensor or None, i, error message or None)``."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str | None]:
        try:
            rgb = read_image(self.files[index])
        except SegvocError as exc:  # an unreadable file is reported and skipped, never fatal
            return None, index, str(exc)
        return torch.from_numpy(rgb).permute(2, 0, 1), index, None


def collate(items: Sequence[tuple[torch.Tensor | None, int, str | None]]) -> dict[str, Any]:
    """Pad the readable images of a batch to one size; keep the failures aside."""
    good = [(image, index) for image, index, _ in items if image is not None]
    failed = [(index, error) for image, index, error in items if image is None]
    if not good:
        return {"images": None, "indices": [], "sizes": [], "failed": failed}
    images = pad_stack([image for image, _ in good])
    sizes = [tuple(image.shape[1:]) for image, _ in good]
    return {"images": images, "indices": [i for _, i in good], "sizes": sizes, "failed": failed}


def write_outputs(
    mask: np.ndarray, rgb_path: Path, stem: str, output: Path, formats: Sequence[str], palette: list[int]
) -> None:
    """Write one mask in every requested format (see README: Prediction)."""
    if "index" in formats:
        Image.fromarray(mask, mode="L").save(output / f"{stem}.png")
    if "palette" in formats or "voc" in formats:
        coloured = Image.fromarray(mask, mode="P")
        coloured.putpalette(palette)
        if "palette" in formats:
            coloured.save(output / "palette" / f"{stem}.png")
        if "voc" in formats:
            coloured.save(output / VOC_RESULTS / f"{stem}.png")
    if "overlay" in formats:
        blended = overlay(read_image(rgb_path), mask, palette=palette)
        Image.fromarray(blended).save(output / "overlay" / f"{stem}.jpg", quality=92)


def run(cfg: DictConfig) -> int:
    """Predict masks for ``cfg.input`` into ``cfg.output``; return the number of files that could not be done."""
    formats = list(cfg.formats)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise SegvocError(f"formats={formats} is not a list of {list(FORMATS)}; e.g. formats=[index,palette].")
    files = find_inputs(str(cfg.input))
    net, meta = load_predictor(cfg.ckpt, output_stride=cfg.output_stride)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if isinstance(net, torch.nn.Module):
        net = net.to(device).eval()
    # the checkpoint's class colours first; the rest (the ignore index: boundary cream) from the VOC map
    palette = lookup_table(meta["palette"], meta.get("ignore_index", IGNORE_INDEX)).flatten().tolist()
    output = Path(cfg.output)
    for sub in (
        [Path(".")]
        + [Path(f) for f in ("palette", "overlay") if f in formats]
        + ([VOC_RESULTS] if "voc" in formats else [])
    ):
        (output / sub).mkdir(parents=True, exist_ok=True)
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        log.warning("Several inputs share a file name stem; later masks overwrite earlier ones of the same name.")

    workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    # batches of one image size: no padding, so a mask never depends on the other images of its batch
    sizes = displayed_sizes(files)
    loader = DataLoader(
        ImageFiles(files),
        batch_sampler=SizeGroupedBatchSampler(sizes, cfg.batch_size),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    inference = OmegaConf.to_container(cfg.inference)
    norm = [torch.tensor(meta[key], device=device) for key in ("mean", "std")]
    failures: list[tuple[Path, str]] = []
    pending: deque[tuple[Future, Path]] = deque()  # writes in flight, oldest first

    def finish_oldest() -> None:
        future, path = pending.popleft()
        try:
            future.result()
        except OSError as exc:
            failures.append((path, f"cannot write its mask into {output}: {exc}"))

    with ThreadPoolExecutor(max_workers=2) as writer, Progress() as progress, torch.inference_mode():
        task = progress.add_task("Predicting", total=len(files))
        for batch in loader:
            failures += [(files[i], error) for i, error in batch["failed"]]
            if batch["images"] is not None:
                images = normalize(batch["images"].to(device, non_blocking=True), *norm)
                logits = infer(net, images, **inference)
                preds = logits.argmax(dim=1).to(torch.uint8).cpu()
                for index, pred in zip(batch["indices"], crop_to_sizes(preds, batch["sizes"]), strict=True):
                    future = writer.submit(write_outputs, pred.numpy(), files[index], files[index].stem, output,
                                           formats, palette)  # fmt: skip
                    pending.append((future, files[index]))
            # writing overlaps the next batches' reading and inference; a bounded queue keeps memory flat
            while len(pending) > 2 * cfg.batch_size:
                finish_oldest()
            progress.advance(task, len(batch["indices"]) + len(batch["failed"]))
        while pending:
            finish_oldest()
    for path, error in failures:
        log.error("Skipped %s: %s", path, error)
    log.info("Wrote masks for %d of %d images to %s", len(files) - len(failures), len(files), output)
    return len(failures)
