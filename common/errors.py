"""The one exception type the CLI turns into a clean, traceback-free message."""

from __future__ import annotations


class EdfedError(Exception):
    """Bad input or configuration: the message names what is wrong and where.

    `offsite` is the same message as a site may send it to the coordinator: files, columns, rules and row
    numbers, never an identifier or a cell value. It defaults to the message itself; an error whose
    message quotes site data (the data contract's) sets a redacted one.
    """

    def __init__(self, message: str, *, offsite: str | None = None) -> None:
        super().__init__(message)
        self.offsite = message if offsite is None else offsite
