"""The CLI as a user expects it: --version, help and defaults on every argument, and a mistyped --data or a bad
flag value stops a command before anything is generated or written."""

from __future__ import annotations

import argparse
from importlib.metadata import version
from pathlib import Path

import pytest

from edfed.cli import main as cli


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"edfed {version('edfed')}"


def test_top_level_help_is_for_users(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "emergency departments" in out and "edfed simulate" in out
    assert "argument parsing" not in out  # not the module's internal docstring


def _actions(parser: argparse.ArgumentParser, name: str = "edfed"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _actions(subparser, f"{name} {sub}")
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield name, action


def test_every_argument_has_help_and_shows_its_default():
    parser = cli.build_parser()
    formatter = parser._get_formatter()
    missing = []
    for name, action in _actions(parser):
        text = formatter._get_help_string(action) or ""
        if not text.strip():
            missing.append(f"{name} {action.dest}: no help")
        elif (action.option_strings and not action.required and "default" not in text
              and not isinstance(action, argparse._StoreTrueAction)):
            missing.append(f"{name} {action.option_strings[0]}: no default shown")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("command", [["simulate"], ["train", "central"], ["privacy-sweep"]])
def test_missing_data_folder_is_an_error_and_writes_nothing(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    code = cli.main([*command, "--data", "does-not-exist"])
    err = capsys.readouterr().err
    assert code == 2 and "does-not-exist" in err and "no such folder" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no cohort, no run folder


@pytest.mark.parametrize("flags", [["--epsilon", "-1"], ["--epsilon", "0"], ["--rounds", "0"], ["--delta", "1"],
                                   ["--max-tokens", "4"]])
def test_bad_flag_value_stops_before_the_default_cohort_is_generated(tmp_path, monkeypatch, capsys, flags):
    monkeypatch.chdir(tmp_path)  # the default data/cohort is missing here: a run would generate it first
    try:
        code = cli.main(["simulate", *flags])
    except SystemExit as exc:  # argparse's own refusal: exit 2, usage on stderr
        code = exc.code
    assert code == 2 and "Traceback" not in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_default_data_folder_is_still_generated(tmp_path, monkeypatch):
    from edfed.simulations import cohort

    made = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cohort, "generate_cohort", lambda out, **kw: made.append(Path(out)))
    cohort.ensure_cohort(Path("data/cohort"))
    assert made == [Path("data/cohort")]
