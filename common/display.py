"""Terminal output: progress bars and consoles that stay readable when piped to a log file."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def make_console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=140)  # logs: don't squeeze tables to 80


def progress_bar(enabled: bool = True) -> Progress:
    """A bar on a terminal; none in a log file, where it could only leave its last frame behind (callers print a
    line per step there instead)."""
    console = make_console()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                    disable=not (enabled and console.is_terminal), console=console)


class Phases:
    """Wall seconds of each named phase of a job, kept for summary.json and printed as one line when it ends."""

    def __init__(self, console: Console | None = None, quiet: bool = False) -> None:
        self.console, self.quiet = console or make_console(), quiet
        self.seconds: dict[str, float] = {}

    def line(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[f"{name.replace(' ', '_')}_seconds"] = seconds = time.perf_counter() - started
        self.line(f"{name}: {seconds:.1f} s")
