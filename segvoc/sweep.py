"""``python -m segvoc.sweep``: the sweep summary (``segvoc.tasks.sweep``) under its documented name."""

import runpy

if __name__ == "__main__":
    # run as __main__, as ``python -m segvoc.tasks.sweep`` would (Hydra finds conf/ relative to the running file)
    runpy.run_module("segvoc.tasks.sweep", run_name="__main__", alter_sys=True)
