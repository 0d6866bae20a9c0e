"""Errors that are meant for the user: their message is one paragraph that says what is wrong and what to do."""


class SegvocError(RuntimeError):
    """Base class of every error that the entry points report as a message instead of a traceback."""


def user_error(exc: BaseException) -> SegvocError | None:
    """The ``SegvocError`` behind ``exc``, also when Hydra's ``instantiate`` wrapped it; else ``None``."""
    while exc is not None:
        if isinstance(exc, SegvocError):
            return exc
        exc = exc.__cause__
    return None
