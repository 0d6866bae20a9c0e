"""Errors that are meant for the user: their message is one paragraph that says what is wrong and what to do."""


class SegvocError(RuntimeError):
    """Base class of every error that the entry points report as a message instead of a traceback."""
