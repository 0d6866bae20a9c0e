"""``python -m segvoc.convert``: the seed-checkpoint converter (``segvoc.checkpoints.convert``) under its documented
name."""

import runpy

if __name__ == "__main__":
    # run as __main__, as ``python -m segvoc.checkpoints.convert`` would
    runpy.run_module("segvoc.checkpoints.convert", run_name="__main__", alter_sys=True)
