"""Checkpoints written before the package layout changed still load, predict, fine-tune and resume.

``tests/data/checkpoint-6a0fccb.json`` is the structure of ``last.ckpt`` as commit 6a0fccb (the layout before
``segvoc.checkpoints``/``segvoc.training``/``segvoc.tasks``) wrote it after 2 training steps: every key, value
and nested container as saved, each tensor replaced by its shape and dtype. The test refills the tensors with
seeded random values and saves the file with ``torch.save``, so the bytes are a checkpoint of that version's
layout (its meta spec has no ``block_padding``; Lightning's loop, callback, optimizer and scheduler states are
that version's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from segvoc.checkpoints.load import build_net, load_model
from segvoc.tasks.train import train
from tests.conftest import compose_config

SKELETON = Path(__file__).parent / "data" / "checkpoint-6a0fccb.json"


def _rebuild(value: Any, generator: torch.Generator) -> Any:
    if isinstance(value, list):
        return [_rebuild(v, generator) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        dtype = getattr(torch, value["dtype"])
        if dtype.is_floating_point:
            return torch.rand(value["__tensor__"], generator=generator, dtype=dtype) * 0.1 + 0.05
        return torch.ones(value["__tensor__"], dtype=dtype)
    if "__tuple__" in value:
        return tuple(_rebuild(v, generator) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _rebuild(v, generator) for k, v in value["__dict__"]}
    return {k: _rebuild(v, generator) for k, v in value.items()}


@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("old") / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    checkpoint = _rebuild(json.loads(SKELETON.read_text()), torch.Generator().manual_seed(0))
    assert "block_padding" not in checkpoint["segvoc"]["net"]  # what makes it an old spec
    torch.save(checkpoint, path)
    return path


def test_an_old_checkpoint_loads_with_its_meta_and_predicts(old_checkpoint: Path, tmp_path: Path) -> None:
    net, meta = load_model(old_checkpoint)
    assert meta["net"] == {"arch": "deeplabv3plus", "num_classes": 21, "output_stride": 16, "stem_padding": 1}
    assert net.spec["block_padding"] == "depthwise"  # the padding that version ran with
    saved = torch.load(old_checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[f"net.{k}"]) for k, v in net.state_dict().items())
    Image.new("RGB", (40, 30), (90, 120, 30)).save(tmp_path / "photo.jpg")
    from segvoc.tasks.predict import run

    cfg = compose_config(
        [f"ckpt={old_checkpoint}", f"input={tmp_path / 'photo.jpg'}", f"output={tmp_path / 'out'}", "num_workers=0"],
        config_name="predict",
    )
    assert run(cfg) == 0
    assert Image.open(tmp_path / "out" / "photo.png").size == (40, 30)


def test_an_old_checkpoint_fine_tunes_and_resumes(old_checkpoint: Path, make_cfg) -> None:
    net = build_net(num_classes=3, init_from=old_checkpoint)  # another class count: classifier re-initialised
    saved = torch.load(old_checkpoint, weights_only=True)["state_dict"]
    assert torch.equal(net.state_dict()["head.fuse.0.weight"], saved["net.head.fuse.0.weight"])
    cfg = make_cfg(f"ckpt_path={old_checkpoint}", "trainer.max_steps=3", "trainer.val_check_interval=1")
    metrics = train(cfg)  # Lightning restores that version's loops, optimizer, scheduler and callback states
    assert metrics["val/mIoU"] >= 0.0
    resumed = torch.load(Path(cfg.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 3 and "block_padding" in resumed["segvoc"]["net"]
