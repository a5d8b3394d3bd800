"""Every `edfed` command written in the README and docs/ is one the CLI takes as written: its command, its flags and
their values parse (the slow tests run the README's own-data block and the deployment runbook end to end)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from edfed.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([a-z]*)\n(.*?)^```", re.M | re.S)


SEPARATORS = ("&&", "||", ";", "|", "&")
REDIRECT = re.compile(r"^\d?(>>?|<)(&\d)?$")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(document, line, argv after `edfed`) for each edfed command in a shell block of the docs; a `$VAR` the doc
    sets (`export VAR=value`) takes its value there, any other `$VAR` stands for a path."""
    found = []
    for doc in DOCS:
        variables: dict[str, str] = {}
        for language, block in FENCE.findall(doc.read_text()):
            if language not in ("", "bash", "sh", "console"):
                continue
            for line in block.replace("\\\n", " ").splitlines():
                try:
                    words = shlex.split(line.removeprefix("$ "), comments=True)
                except ValueError:
                    continue  # not a shell line (a diagram, a log excerpt)
                for word in words:
                    if (m := re.fullmatch(r"([A-Z_]+)=(\S*)", word)):
                        variables[m[1]] = m[2]
                expand = lambda m, known=variables: known.get(m[1], "/x")  # noqa: E731
                words = [re.sub(r"\$\{?([A-Z_]+)\}?", expand, w) for w in words]
                command: list[str] = []
                skip = False
                for word in [*words, "&&"]:
                    if skip or REDIRECT.match(word):  # a redirection and its target are the shell's
                        skip = not skip and not word.endswith(("&1", "&2"))
                        continue
                    if word in SEPARATORS:
                        while command and re.fullmatch(r"[A-Z_]+=.*", command[0]):
                            command.pop(0)  # VAR=value before the command
                        if command and Path(command[0]).name == "edfed" and len(command) > 1:
                            found.append((doc.relative_to(ROOT).as_posix(), line.strip(), command[1:]))
                        command = []
                    else:
                        command.append(word)
    return found


COMMANDS = documented_commands()


def test_the_docs_show_the_commands_a_user_runs() -> None:
    shown = {argv[0] for _, _, argv in COMMANDS}
    assert {"simulate", "data", "personalize", "predict", "report", "site", "coordinator", "deploy", "release",
            "ledger", "cohort", "privacy-sweep", "track"} <= shown, shown


@pytest.mark.parametrize("doc, line, argv", COMMANDS, ids=[f"{d}: {' '.join(a[:2])}" for d, _, a in COMMANDS])
def test_each_documented_command_parses_as_written(doc: str, line: str, argv: list[str]) -> None:
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{doc}: `{line}` is not a command edfed takes (argparse exit {exc.code})")
