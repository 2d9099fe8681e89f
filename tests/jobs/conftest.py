"""Helpers for the job tests: write job files and data into tmp_path, run the CLI in-process."""

from __future__ import annotations

import pytest
import yaml

from gradserve_services.cli import main


@pytest.fixture
def write_job(tmp_path):
    """write_job(mapping, name="job.yaml") -> path of a YAML job file in tmp_path."""

    def write(mapping: dict, name: str = "job.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(mapping, sort_keys=False))
        return path

    return write


@pytest.fixture
def run_cli(capsys):
    """run_cli(*argv) -> (exit code, stdout, stderr) of `gradserve ARGV` run in this process."""

    def run(*argv):
        code = main([str(arg) for arg in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
