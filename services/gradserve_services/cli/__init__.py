"""`gradserve` console script: `gradserve serve | train | bench SUITE`.

Each subcommand lives in its own module with `register(subparsers)`; modules keep heavy imports
(ray, grpc, torch) inside their run functions so `gradserve --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser"]

SUBCOMMAND_MODULES = ("serve", "train", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradserve", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"gradserve_services.cli.{name}")
        except ModuleNotFoundError as missing:
            if missing.name != f"gradserve_services.cli.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
