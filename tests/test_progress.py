"""What a log file of `edfed simulate` shows: round 1 site by site, the time left, the next command."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from edfed.simulations.federated import _follow_first_round, _time_left, next_steps


def _message(kind: str, node: int, site: str | None = None):
    content = {"site": {"site-name": site}} if site else {}
    return SimpleNamespace(metadata=SimpleNamespace(message_type=kind, src_node_id=node),
                           content=content, has_error=lambda: False)


class _Grid:
    def __init__(self) -> None:
        self.replies: list = []

    def push_messages(self, messages):
        return [id(m) for m in messages]

    def pull_messages(self, message_ids):
        replies, self.replies = self.replies, []
        return replies


def test_round_one_is_followed_site_by_site():
    grid, console = _Grid(), Console(record=True, width=200)
    _follow_first_round(grid, console)
    grid.replies = [_message("query.check", 11, "site-1"), _message("query.check", 12, "site-2")]
    grid.pull_messages([])
    grid.push_messages([_message("train", 0), _message("train", 0)])  # round 1's instructions
    for node in (12, 11):
        grid.replies = [_message("train", node)]
        assert len(list(grid.pull_messages([]))) == 1  # the replies pass through untouched
    grid.push_messages([_message("train", 0)])  # round 2: no more lines
    grid.replies = [_message("train", 11)]
    grid.pull_messages([])
    lines = console.export_text().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("round 1: site-2 sent its update (1/2 sites), ") and "s into the round" in lines[0]
    assert lines[1].startswith("round 1: site-1 sent its update (2/2 sites)")


def test_time_left():
    assert _time_left({0: 5.0}, 0, 4, 10.0) == ""
    assert _time_left({0: 5, 1: 120.0}, 1, 4, 180.0) == ", 3.0 min elapsed, at most 6.0 min left for rounds 2-4"
    assert _time_left({1: 120.0, 2: 60.0}, 2, 4, 240.0) == ", 4.0 min elapsed, about 2.0 min left for rounds 3-4"
    assert _time_left({1: 120.0, 2: 60.0}, 4, 4, 300.0) == ", 5.0 min elapsed"


def test_the_end_names_the_next_commands():
    steps = next_steps(Path("runs/r"), {})
    assert steps[1].startswith("next: edfed report runs/r")
    assert any("edfed personalize runs/r --data SITE_FILE" in s for s in steps)
    assert any("edfed predict runs/r --data SITE_FILE --out predictions.csv" in s for s in steps)


def test_a_log_file_gets_no_bar_frame(capsys):
    from edfed.common.display import progress_bar

    with progress_bar() as progress:  # pytest's captured stdout is not a terminal, as a log file is not
        task = progress.add_task("federated rounds", total=2, status="")
        progress.advance(task, 2)
        progress.console.print("round 2/2: 3 s")
    out = capsys.readouterr().out
    assert out == "round 2/2: 3 s\n"
