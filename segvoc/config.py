"""Start-up validation of a composed config: every value a user can get wrong, one clear line each, before any
data is read or any model is built.

``register_resolvers`` makes the resolvers the configs use available.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from segvoc.data.download import VOC_MEMBER
from segvoc.data.voc import IMAGE_DIR, MASK_DIR, SPLIT_DIR
from segvoc.errors import SegvocError
from segvoc.models.backbone import check_output_stride


class ConfigError(SegvocError):
    """A config value that cannot work."""


def register_resolvers() -> None:
    """Make the resolvers segvoc's configs use available (idempotent); every entry point calls it before Hydra
    composes: ``${len:<list>}`` (the number of items: ``conf/data/custom.yaml`` derives ``num_classes`` with it),
    ``${resume_run_dir:...}`` and ``${resume_config_subdir:...}`` (``conf/hydra/default.yaml``: a resumed run
    continues in its own folder)."""
    from segvoc.training.hparams import run_name_resolver, store_dir_resolver
    from segvoc.training.rundir import resume_config_subdir, resume_run_dir

    resolvers = {"len": len, "resume_run_dir": resume_run_dir, "resume_config_subdir": resume_config_subdir}
    resolvers |= {"run_name": run_name_resolver, "store_dir": store_dir_resolver}  # conf/logger/: run names, stores
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def _positive(cfg: DictConfig, key: str, kind: type = int) -> None:
    value = cfg
    for part in key.split("."):
        value = value.get(part) if isinstance(value, DictConfig) else None
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value <= 0
        or (kind is int and value != int(value))
    ):
        what = "a positive whole number" if kind is int else "a positive number"
        raise ConfigError(f"{key}={value} is not valid: it must be {what}.")


def validate_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first value of ``cfg`` (the train config) that cannot work.

    Checks the dataset's classes, palette, ignore index and folder (``validate_data``), sizes, learning rate,
    steps, output stride, class counts (data vs model, and vs the checkpoint when resuming or evaluating), that a
    given ``ckpt_path`` exists and is a safe checkpoint, and that a given ``model.net.init_from`` exists. First of
    all, that every ``_target_`` accepts the keys it is given (``validate_targets``).
    """
    validate_targets(cfg)
    validate_data(cfg)
    for key in (
        "data.crop_size",
        "data.batch_size",
        "data.val_batch_size",
        "trainer.max_steps",
        "trainer.val_check_interval",
    ):
        _positive(cfg, key)
    _positive(cfg, "optimizer.lr", float)
    _validate_scale_range(cfg.data.get("scale_range"))
    _validate_optimized_metric(cfg)
    net = cfg.model.get("net") or {}
    stride = net.get("output_stride")
    if stride is not None:
        check_output_stride(stride, error=ConfigError)
    num_classes = cfg.data.num_classes
    for key, value, data_key in (
        ("model.num_classes", cfg.model.get("num_classes"), "num_classes"),
        ("model.net.num_classes", net.get("num_classes"), "num_classes"),
        ("model.ignore_index", cfg.model.get("ignore_index"), "ignore_index"),
    ):
        if value is not None and value != cfg.data.get(data_key):
            raise ConfigError(
                f"{key}={value} disagrees with data.{data_key}={cfg.data.get(data_key)}; leave it at "
                f"${{data.{data_key}}}."
            )
    init_from = net.get("init_from")
    if init_from and not Path(str(init_from)).expanduser().is_file():
        raise ConfigError(
            f"model.net.init_from={init_from} does not exist; give the segvoc checkpoint (.ckpt) or seed tool "
            "checkpoint (.pth) to fine-tune from, or leave model.net.init_from=null."
        )
    if cfg.get("ckpt_path"):
        from segvoc.checkpoints.format import read_checkpoint

        path = Path(str(cfg.ckpt_path)).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path} does not exist; give the path of a .ckpt file (e.g. "
                "outputs/train/<run>/checkpoints/last.ckpt) or leave ckpt_path unset."
            )
        from segvoc.checkpoints.exported import is_exported

        # an exported model (.onnx, TorchScript) is no torch checkpoint: evaluate checks its classes from its meta
        meta = {} if is_exported(path) else (read_checkpoint(path).get("segvoc") or {})
        ckpt_classes = (meta.get("net") or {}).get("num_classes")
        if ckpt_classes is not None and ckpt_classes != num_classes:
            raise ConfigError(
                f"{path} was trained for {ckpt_classes} classes but data.num_classes={num_classes}; "
                "use data with the checkpoint's classes."
            )


def validate_targets(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` when a ``_target_`` of ``cfg`` cannot be imported or is given a key that it does not
    take, e.g. ``+optimizer.lrr=0.1``: "optimizer.lrr is not a parameter of torch.optim.SGD; valid: ...".

    Every node with a ``_target_`` is checked (optimizer, scheduler, loss, callbacks, loggers, trainer, model,
    model.net, data, ...) against ``inspect.signature`` of its target, which is imported but never called; a target
    that takes ``**kwargs`` accepts any key. Hydra's own keys (``_partial_``, ``_convert_``, ...) are not checked,
    nor nodes that only point at another (``model.optimizer: ${optimizer}`` is checked as ``optimizer``), nor the
    ``hydra`` node.
    """
    from hydra._internal.utils import _locate  # what instantiate uses; the public get_object also logs an error

    for path, node in _target_nodes(cfg, ""):
        target = node._target_
        try:
            factory = _locate(str(target))
        except Exception as exc:  # ImportError, AttributeError, ...: Hydra would fail on it later
            while exc.__cause__ is not None:
                exc = exc.__cause__
            raise ConfigError(
                f"{path}._target_={target} cannot be imported ({exc}); give the dotted path of a class or function."
            ) from None
        try:
            parameters = list(inspect.signature(factory).parameters.values())
        except (TypeError, ValueError):  # no signature to check against (some builtins)
            continue
        forwarded = _forwarded_parameters(factory)
        if forwarded:  # its **options are those of the function it builds with
            parameters = [p for p in parameters if p.kind is not p.VAR_KEYWORD] + forwarded
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            continue  # takes any keyword
        valid = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for key in node:
            key = str(key)
            if key.startswith("_") and key.endswith("_") or key in valid:
                continue
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {path}.{close[0]}?)" if close else ""
            raise ConfigError(
                f"{path}.{key} is not a parameter of {target}{hint}; valid: {', '.join(valid)}. Remove it, e.g. "
                f"~{path}.{key}, or correct its name."
            )


def _forwarded_parameters(factory: Any) -> list[inspect.Parameter]:
    """The parameters that ``factory`` takes through ``**options`` and passes on, where segvoc knows them:
    ``model.net``'s ``build_net`` builds ``deeplab_mobilenet``."""
    from segvoc.checkpoints.load import build_net
    from segvoc.models.deeplab import deeplab_mobilenet

    if factory is build_net:
        return [p for p in inspect.signature(deeplab_mobilenet).parameters.values() if p.name != "arch"]
    return []


def _target_nodes(node: DictConfig | ListConfig, path: str) -> list[tuple[str, DictConfig]]:
    """``(dotted path, node)`` of every node under ``node`` that has a ``_target_``, outermost first, without
    following interpolations or entering the ``hydra`` node."""
    found: list[tuple[str, DictConfig]] = []
    if isinstance(node, DictConfig) and "_target_" in node and not OmegaConf.is_interpolation(node, "_target_"):
        found.append((path, node))
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        if (not path and key == "hydra") or OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig | ListConfig) and not child._is_none():
            name = f"{path}[{key}]" if isinstance(node, ListConfig) else f"{path}.{key}" if path else str(key)
            found += _target_nodes(child, name)
    return found


def _validate_optimized_metric(cfg: DictConfig) -> None:
    """``optimized_metric`` must name a metric that training logs, or ``best/<monitor>`` of a checkpoint callback."""
    name = cfg.get("optimized_metric")
    if name is None or not cfg.get("train", True):
        return
    from segvoc.palette import default_class_names
    from segvoc.training.module import logged_metric_names

    classes = cfg.data.get("classes") or default_class_names(cfg.data.num_classes)
    monitors = [c.get("monitor") for c in (cfg.get("callbacks") or {}).values() if isinstance(c, DictConfig)]
    known = logged_metric_names(classes) + [f"best/{m}" for m in monitors if m]
    if name not in known:
        raise ConfigError(
            f"optimized_metric={name} is not a metric this run logs; choose one of {', '.join(known)}."
        )


def _validate_scale_range(scale_range: Any) -> None:
    """``data.scale_range`` is ``[low, high]`` with ``0 < low <= high`` (the random rescaling of training images)."""
    if scale_range is None:
        return
    values = list(scale_range) if isinstance(scale_range, ListConfig | list) else None
    if (
        values is None
        or len(values) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        or not 0 < values[0] <= values[1]
    ):
        shown = values if values is not None else scale_range
        raise ConfigError(
            f"data.scale_range={shown} is not valid: give [low, high] with 0 < low <= high, the factors training "
            "images are rescaled by at random, e.g. data.scale_range=[0.5,2.0]."
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_data(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` when the dataset described by ``cfg.data`` (train or check config) cannot work.

    ``data.classes`` (null: VOC's names for 21 classes, ``class_<i>`` otherwise) must be distinct names, as many as
    ``data.num_classes``; ``data.palette`` (null: the VOC colour map) one ``[R, G, B]`` of 0..255 per class;
    ``data.ignore_index`` an 8-bit mask value that is not a class index. A tree outside ``VOCdevkit/VOC2012``
    (``data.subdir``; ``data=custom`` reads ``data.root`` itself) is never downloaded or generated, so it must exist.
    """
    data = cfg.data
    if OmegaConf.is_missing(data, "root"):
        raise ConfigError(
            "data.root is not set: give the folder of your dataset, the one that holds JPEGImages, "
            "SegmentationClass and ImageSets/Segmentation, e.g. data.root=/data/cracks."
        )
    if OmegaConf.is_missing(data, "classes"):
        raise ConfigError(
            "data.classes is not set: a dataset of your own (data=custom) names its classes in index order, mask "
            "value 0 first, e.g. data.classes=[background,crack,rust]."
        )
    classes = data.get("classes")
    if classes is not None:
        if not isinstance(classes, ListConfig | list) or not classes:
            raise ConfigError(
                f"data.classes={classes} is not a list of class names; give them in index order, e.g. "
                "data.classes=[background,crack,rust]."
            )
        for index, name in enumerate(classes):
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(
                    f"data.classes[{index}]={name!r} is not a class name: every class needs a non-empty name "
                    "(quote names that look like numbers, e.g. data.classes='[background,\"1\"]')."
                )
        repeated = sorted({name for name in classes if list(classes).count(name) > 1})
        if repeated:
            raise ConfigError(
                f"data.classes lists {', '.join(map(repr, repeated))} more than once; every class needs a distinct "
                "name (they label the val/iou/<class> metrics and the checkpoint's classes)."
            )
    _positive(cfg, "data.num_classes")
    num_classes = data.num_classes
    if classes is not None and len(classes) != num_classes:
        raise ConfigError(
            f"data.classes names {len(classes)} classes but data.num_classes={num_classes}; set "
            f"data.num_classes={len(classes)} (data=custom derives it from data.classes)."
        )
    palette = data.get("palette")
    if palette is not None:
        is_list = isinstance(palette, ListConfig | list)
        if not is_list or len(palette) != num_classes:
            what = f" has {len(palette)} colours for {num_classes} classes" if is_list else f"={palette} is not a list"
            raise ConfigError(
                f"data.palette{what}; give one [R, G, B] per class in class order, e.g. "
                "data.palette=[[0,0,0],[255,0,0],[0,0,255]], or leave data.palette=null for the VOC colours."
            )
        for index, colour in enumerate(palette):
            if not (
                isinstance(colour, ListConfig | list)
                and len(colour) == 3
                and all(_is_int(v) and 0 <= v <= 255 for v in colour)
            ):
                shown = list(colour) if isinstance(colour, ListConfig) else colour
                raise ConfigError(
                    f"data.palette[{index}]={shown} is not a colour: each entry is [R, G, B], three whole numbers "
                    "0..255."
                )
    ignore = data.get("ignore_index", 255)
    if num_classes > 255:
        raise ConfigError(
            f"data.num_classes={num_classes} is more than masks can hold: masks are 8-bit PNGs, so at most 255 "
            "classes (0..254) and an ignore label fit."
        )
    if not _is_int(ignore) or not 0 <= ignore <= 255 or ignore < num_classes:
        raise ConfigError(
            f"data.ignore_index={ignore} is not valid: it must be the 8-bit mask value (0..255) of pixels without a "
            f"class, outside the class indices 0..{num_classes - 1}; 255, as in VOC, is usual."
        )
    _validate_tree(data)


def _validate_tree(data: DictConfig) -> None:
    """A tree outside ``VOCdevkit/VOC2012`` is used where it is: it must exist, and nothing may try to make it."""
    subdir = str(data.get("subdir", VOC_MEMBER))
    if Path(subdir) == Path(VOC_MEMBER):
        return
    for key in ("demo", "tar_path"):
        if data.get(key):
            value = "true" if data.get(key) is True else data.get(key)
            raise ConfigError(
                f"data.{key}={value} puts Pascal VOC2012 into <root>/{VOC_MEMBER}, but data.subdir='{subdir}' "
                f"reads another folder; leave data.subdir={VOC_MEMBER} for VOC, or drop data.{key} for your own data."
            )
    tree = Path(str(data.root)).expanduser() / subdir
    required = (IMAGE_DIR, data.get("mask_dir", MASK_DIR), str(SPLIT_DIR))
    missing = [name for name in required if not (tree / name).is_dir()]
    if missing:
        where = f"data.root={data.root}" + (f" (data.subdir={subdir})" if subdir else "")
        raise ConfigError(
            f"{where} does not hold a dataset in VOC layout: {tree} lacks {', '.join(missing)}. Point data.root at "
            f"the folder that holds {IMAGE_DIR}/<id>.jpg, {required[1]}/<id>.png and {SPLIT_DIR}/<split>.txt; a "
            "dataset of your own is never downloaded."
        )
