"""``python -m segvoc.export``: the export command (``segvoc.tasks.export``) under its documented name."""

import runpy

if __name__ == "__main__":
    # run as __main__, as ``python -m segvoc.tasks.export`` would (Hydra finds conf/ relative to the running file)
    runpy.run_module("segvoc.tasks.export", run_name="__main__", alter_sys=True)
