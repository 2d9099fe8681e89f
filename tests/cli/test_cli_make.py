"""The Makefile's install sets: `make run` installs `.[server]` only, `make test` `.[dev]`, and the
stamps make `make test` after `make run` install dev (and a changed pyproject.toml reinstall).
The sets themselves are resolved by pip (`--dry-run --report`, nothing installed) as a fresh venv
would get them: the server set holds none of the dev-only requirements."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PIP_INSTALL = re.compile(r"^(?P<venv>\S+)/bin/pip install (?P<args>.+)$")


def make_dry_run(target: str, venv: Path) -> list[str]:
    """The commands `make TARGET` would run with this VENV, one per line (nothing is run)."""
    run = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def installs(lines: list[str]) -> list[list[str]]:
    """The arguments of each `pip install` of a project extra in `lines`."""
    found = []
    for line in lines:
        match = PIP_INSTALL.match(line.strip())
        if match and ".[" in match["args"]:
            found.append(shlex.split(match["args"]))
    return found


def fake_venv(tmp_path: Path, *stamps: str) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    for stamp in stamps:
        (venv / stamp).touch()
    return venv


def test_run_installs_the_server_extra_and_test_the_dev_extra(tmp_path):
    venv = tmp_path / "fresh"
    assert installs(make_dry_run("run", venv)) == [["-q", "-e", ".[server]"]]
    assert installs(make_dry_run("test", venv)) == [["-q", "-e", ".[dev]"]]
    run_lines = make_dry_run("run", venv)
    assert any(line.startswith(f"{venv}/bin/gradserve train") for line in run_lines)


def test_test_after_run_installs_dev_and_dev_satisfies_run(tmp_path):
    after_run = fake_venv(tmp_path / "a", ".installed-server")
    assert installs(make_dry_run("run", after_run)) == []
    assert installs(make_dry_run("test", after_run)) == [["-q", "-e", ".[dev]"]]
    after_test = fake_venv(tmp_path / "b", ".installed-dev", ".installed-server")
    assert installs(make_dry_run("run", after_test)) == []
    assert installs(make_dry_run("test", after_test)) == []


def test_a_changed_pyproject_reinstalls(tmp_path):
    venv = fake_venv(tmp_path, ".installed-dev", ".installed-server")
    older = (REPO / "pyproject.toml").stat().st_mtime - 60
    for stamp in (".installed-dev", ".installed-server"):
        os.utime(venv / stamp, (older, older))
    assert installs(make_dry_run("run", venv)) == [["-q", "-e", ".[server]"]]


def canonical(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


def resolved(tmp_path: Path, pip_args: list[str]) -> tuple[set[str], list[str]]:
    """The distributions pip would install for `pip_args` into an empty venv (nothing is installed),
    and the project's own requirements as pip read them from this checkout's pyproject.toml."""
    source = tmp_path / "source"
    if not source.exists():
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, source / name)
        for name in ("client", "services"):
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    report = tmp_path / f"report-{len(list(tmp_path.glob('report-*')))}.json"
    args = [a for a in pip_args if a != "-q"]
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                          "--report", str(report), *args], cwd=source, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    items = json.loads(report.read_text())["install"]
    [project] = [item["metadata"] for item in items if canonical(item["metadata"]["name"]) == "gradserve"]
    return {canonical(item["metadata"]["name"]) for item in items}, project["requires_dist"]


def extra_requirements(requires_dist: list[str], extra: str) -> set[str]:
    return {canonical(r) for r in requires_dist if re.search(rf"extra\s*==\s*['\"]{extra}['\"]", r)}


@pytest.mark.slow
def test_install_sets_resolve_as_declared(tmp_path):
    [run_args] = installs(make_dry_run("run", tmp_path / "venv"))
    [test_args] = installs(make_dry_run("test", tmp_path / "venv"))
    server_set, requires_dist = resolved(tmp_path, run_args)
    server_names = extra_requirements(requires_dist, "server")
    dev_only = extra_requirements(requires_dist, "dev") - server_names - {"gradserve"}
    assert {"ray", "prometheus-client", "scikit-learn"} <= server_names
    assert {"torch", "pytest", "hypothesis", "grpcio-tools"} <= dev_only

    assert server_names <= server_set
    assert not dev_only & server_set, dev_only & server_set
    dev_set, _ = resolved(tmp_path, test_args)
    assert server_set | dev_only <= dev_set
