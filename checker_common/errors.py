"""An exception said in one line: for log lines, rejection reasons and command errors."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of the exception's text, or its type's name when it has no text."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
