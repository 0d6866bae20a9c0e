"""Train DeepLab on Pascal VOC2012 (`python train.py [experiment=demo] [key=value ...]`), or score a checkpoint
(`python train.py train=false ckpt_path=...`). See README.md."""

import sys

import hydra
from omegaconf import DictConfig

from segvoc.config import register_resolvers
from segvoc.errors import exit_on_user_error
from segvoc.tasks.evaluate import evaluate
from segvoc.tasks.train import optimized_value, train
from segvoc.training.rundir import follow_rank_zero

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        if not cfg.train:
            return evaluate(cfg)["mean_iou"]
        return optimized_value(train(cfg), cfg.optimized_metric)  # what a Hydra sweeper optimises
    except Exception as exc:
        exit_on_user_error(exc)


if __name__ == "__main__":
    try:
        sys.argv = follow_rank_zero(sys.argv)  # ranks > 0 under torchrun / srun: into rank 0's run directory
    except Exception as exc:
        exit_on_user_error(exc)
    main()
