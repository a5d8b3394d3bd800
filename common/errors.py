"""The one exception type the CLI turns into a clean, traceback-free message."""


class EdfedError(Exception):
    """Bad input or configuration: the message names what is wrong and where."""
