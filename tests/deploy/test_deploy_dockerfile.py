"""deploy/Dockerfile, read as instructions (no Docker engine here to build it): the base image,
the `[server]` install, a non-root user, and COPY sources that exist in the build context."""

from __future__ import annotations

import fnmatch
import re

from tests.support.dashboard import REPO_ROOT

DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / "deploy" / "Dockerfile.dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    parsed = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            parsed.append((keyword.upper(), arguments.strip()))
    return parsed


def test_base_image_and_server_install():
    parsed = instructions()
    assert parsed[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(arguments for keyword, arguments in parsed if keyword == "RUN")
    assert 'pip install ".[server]"' in runs


def test_runs_as_non_root():
    users = [arguments for keyword, arguments in instructions() if keyword == "USER"]
    assert users, "no USER instruction: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_copy_sources_exist_and_pass_the_dockerignore():
    allowed_patterns = [line[1:] for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")]
    for keyword, arguments in instructions():
        if keyword != "COPY":
            continue
        *sources, _destination = arguments.split()
        for source in sources:
            assert (REPO_ROOT / source).exists(), source
            assert any(fnmatch.fnmatch(source, pattern) or fnmatch.fnmatch(f"{source}/x", pattern)
                       for pattern in allowed_patterns), f"{source} is excluded from the build context"


def test_healthcheck_script_installed_under_the_name_compose_uses():
    copies = [arguments for keyword, arguments in instructions() if keyword == "COPY"]
    assert "deploy/grpc_healthcheck.py /usr/local/bin/gradserve-healthcheck" in copies
