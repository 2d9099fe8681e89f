"""Every subcommand's --help shows its options' defaults and says what it writes to stdout."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from gradserve_services.cli import build_parser
from gradserve_services.cli.bench import SUITES

GRADSERVE = str(Path(sys.executable).with_name("gradserve"))


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """{"serve": parser, "train": ..., "bench": ..., "bench engine": ...} from the real CLI."""
    found = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found[f"{prefix}{name}"] = child
                    walk(child, f"{prefix}{name} ")

    walk(build_parser(), "")
    return found


def shown_defaults(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(option, default as text) for every option whose default is a value to show."""
    return [(action.option_strings[-1], str(action.default)) for action in parser._actions
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS)]


def flat(text: str) -> str:
    return " ".join(text.split())


def option_entries(page: str) -> dict[str, str]:
    """{option string: its whole entry in the options list, on one line} of a rendered help page."""
    entries, current = {}, None
    for line in page[page.index("options:"):].splitlines()[1:]:
        stripped = line.strip()
        if line.startswith("  -"):
            current = stripped
            for option in stripped.split("  ")[0].replace(",", " ").split():
                if option.startswith("-"):
                    entries[option] = current
            keys = [k for k, v in entries.items() if v is current]
        elif current is not None and stripped:
            current = f"{current} {stripped}"
            for key in keys:
                entries[key] = current
    return entries


def test_every_subcommand_is_walked():
    names = set(subcommand_parsers())
    assert {"serve", "train", "bench"} <= names
    assert {f"bench {suite}" for suite in SUITES} <= names


@pytest.mark.parametrize("name", sorted(subcommand_parsers()))
def test_help_shows_every_default(name):
    parser = subcommand_parsers()[name]
    entries = option_entries(parser.format_help())
    for option, default in shown_defaults(parser):
        entry = entries[option]
        # a help that words its default itself ("default: the three issue models") keeps its words
        assert f"(default: {default})" in entry or f"default: {default}" in entry \
            or "(default: " in entry and "%(" not in entry, (option, default, entry)


def test_serve_help_shows_its_defaults_and_first_stdout_line():
    page = subprocess.run([GRADSERVE, "serve", "--help"], capture_output=True, text=True, timeout=60,
                          check=True).stdout
    entries = option_entries(page)
    for option, default in (("--grace-s", "30.0"), ("--max-concurrent-calls", "64"), ("--workers", "2"),
                            ("--port", "50051"), ("--metrics-port", "9090"), ("--ray-listen", "loopback")):
        assert f"(default: {default})" in entries[option], (option, entries[option])
    page = flat(page)
    assert "the first line on stdout is one JSON object with the bound ports" in page
    assert '{"event": "serving", "host": "127.0.0.1", "port": 50051, "metrics_port": 9090}' in page


def test_train_help_documents_the_summary_line_and_override_defaults():
    parser = subcommand_parsers()["train"]
    page = flat(parser.format_help())
    assert "stdout gets exactly one line, a JSON object" in page
    for key in ("steps", "epochs", "train_loss", "test_loss", "test_accuracy", "samples_per_s", "wall_s"):
        assert f'"{key}":' in page, key
    # override flags name the key they replace and its schema default
    assert "override train.epochs (default: the job file's, else `10`)" in page
    assert "override train.batch_size (default: the job file's, else `64`)" in page


@pytest.mark.parametrize("name", ["bench"] + [f"bench {suite}" for suite in SUITES])
def test_bench_help_documents_json_lines(name):
    page = flat(subcommand_parsers()[name].format_help())
    assert "JSON" in page and "line" in page, page[:400]
