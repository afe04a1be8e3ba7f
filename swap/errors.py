"""The one error type for bad input, in a module of its own so that every other module (config,
schedules, data readers) can raise it without importing another."""
from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with every non-printable character (newline, carriage return, ``\\x1e``, ``\\x85``,
    ``\\u2028``, tab, ...) written as its Python escape, so that it renders as exactly one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class SwapError(ValueError):
    """The one error type for bad input: its message says what was wrong and how to fix it. Every
    building block raises it (a ``ValueError``, so code that catches those keeps working).

    User values quoted in the message may hold any character; the message is stored with
    non-printable characters escaped (``printable``), so it is always one printable line.
    The CLI prints it (no traceback) and exits with status 2.
    """

    def __init__(self, message: object = ""):
        super().__init__(printable(str(message)))


__all__ = ["SwapError", "printable"]
