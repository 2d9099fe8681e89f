"""`gradserve` console script: `gradserve serve | train | bench SUITE`.

Each subcommand lives in its own module with `register(subparsers)`; modules keep heavy imports
(ray, grpc, torch) inside their run functions so `gradserve --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys

from .modules import present_modules

__all__ = ["main", "build_parser"]

SUBCOMMAND_MODULES = ("serve", "train", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradserve", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for _, module in present_modules("gradserve_services.cli", SUBCOMMAND_MODULES):
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
