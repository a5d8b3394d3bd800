"""The one Markdown table formatter: `edfed report`, a sweep's and an experiment's results.md all use it.

Kept apart from server/report.py so that light modules (the experiments' command line) can use it without
importing pandas.
"""

from __future__ import annotations


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A table as Markdown lines, then a blank line; a `|` or line break inside a cell is escaped."""
    clean = [[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in rows]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in clean), ""]
