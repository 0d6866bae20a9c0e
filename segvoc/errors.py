"""Errors that are meant for the user: their message is one paragraph that says what is wrong and what to do."""


class SegvocError(RuntimeError):
    """Base class of every error that the entry points report as a message instead of a traceback."""


def exit_on_user_error(exc: BaseException) -> None:
    """In an entry point's ``except``: log the ``SegvocError`` behind ``exc`` and exit 1; re-raise anything else."""
    import logging
    import sys

    error = user_error(exc)
    if error is None:
        raise exc
    logging.getLogger("segvoc").error("%s", error)
    sys.exit(1)


def user_error(exc: BaseException) -> SegvocError | None:
    """The ``SegvocError`` behind ``exc``, also when Hydra's ``instantiate`` wrapped it; else ``None``."""
    while exc is not None:
        if isinstance(exc, SegvocError):
            return exc
        exc = exc.__cause__
    return None
