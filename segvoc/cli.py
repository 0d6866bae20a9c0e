"""The one command-line style of segvoc's argparse commands (``python -m segvoc.data.prepare``, ``segvoc.convert``,
``segvoc.sweep``, ``segvoc.bench``): the same ``--help`` layout (description, arguments, examples) and the same
one-paragraph ``error: ...`` on stderr with exit status 1 for a user error. The Hydra entry points (``train.py``,
``predict.py``, ``python -m segvoc.export``, ``segvoc.data.check``, ``segvoc.data.stats``) report user errors with
``segvoc.errors.exit_on_user_error``: logged, so the message also lands in the run's log file.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from segvoc.errors import user_error

T = TypeVar("T")


def command_parser(prog: str, description: str, examples: Sequence[str] = ()) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` for ``python -m <prog>``: ``description`` as written (line breaks kept), then the
    arguments, then ``examples`` (one command line each)."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples) if examples else None
    return argparse.ArgumentParser(
        prog=f"python -m {prog}",
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def command(main: Callable[..., T]) -> Callable[..., T | int]:
    """Decorate a command's ``main(argv=None)``: a ``SegvocError`` (also one wrapped by another exception) is
    printed as ``error: <paragraph>`` on stderr and ``main`` returns 1; anything else propagates with its
    traceback, since it is a defect and not the user's doing."""

    @functools.wraps(main)
    def checked(argv: Sequence[str] | None = None) -> T | int:
        try:
            return main(argv)
        except Exception as exc:
            error = user_error(exc)
            if error is None:
                raise
            print(f"error: {error}", file=sys.stderr)
            return 1

    return checked


def run_command(main: Callable[..., Any]) -> NoReturn:
    """``sys.exit`` with the status of ``command(main)()``: its int, else 0."""
    status = command(main)()
    sys.exit(status if isinstance(status, int) else 0)
