"""Terminal output: progress bars and consoles that stay readable when piped to a log file."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def make_console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=140)  # logs: don't squeeze tables to 80


def progress_bar(enabled: bool = True) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(), disable=not enabled,
                    console=make_console())
