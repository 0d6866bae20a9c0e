"""Train DeepLab on Pascal VOC2012 (`python train.py [experiment=demo] [key=value ...]`), or score a checkpoint
(`python train.py train=false ckpt_path=...`). See README.md."""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from segvoc.config import register_resolvers
from segvoc.errors import exit_on_user_error, user_error
from segvoc.tasks.evaluate import evaluate
from segvoc.tasks.train import optimized_value, train
from segvoc.training.console import quiet_libraries
from segvoc.training.rundir import discard_failed_start, follow_rank_zero, use_recorded_data

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        with quiet_libraries():
            if not cfg.train:
                record = use_recorded_data(cfg, HydraConfig.get().overrides.task)
                if record is not None:
                    logging.getLogger("segvoc").info(
                        "Evaluating on the data of the checkpoint's run (%s): data.root=%s; data.root=... or "
                        "data=... chooses other data.",
                        record,
                        cfg.data.root,
                    )
                return evaluate(cfg)["mean_iou"]
            return optimized_value(train(cfg), cfg.optimized_metric)  # what a Hydra sweeper optimises
    except Exception as exc:
        if user_error(exc) is not None:
            discard_failed_start()  # a start refused for a config or data error leaves no run directory behind
        exit_on_user_error(exc)


if __name__ == "__main__":
    try:
        sys.argv = follow_rank_zero(sys.argv)  # ranks > 0 under torchrun / srun: into rank 0's run directory
    except Exception as exc:
        exit_on_user_error(exc)
    main()
