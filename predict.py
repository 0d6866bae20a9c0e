"""Turn images into masks: `python predict.py ckpt=<checkpoint> input=<file|folder|glob> output=<folder>`.

Writes one single-channel PNG of class indices per image, at the image's size (see README.md for more formats), and
the log, predict.log, beside them.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from segvoc.errors import exit_on_user_error, user_error
from segvoc.tasks.predict import run
from segvoc.training.rundir import discard_failed_start


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        failed = run(cfg)
    except Exception as exc:
        if user_error(exc) is not None:
            discard_failed_start()  # a refused start leaves no output folder holding only predict.log
        exit_on_user_error(exc)
    if failed:
        logging.getLogger("segvoc").error("%d file(s) could not be read or written; see the messages above.", failed)
        sys.exit(2)


if __name__ == "__main__":
    main()
