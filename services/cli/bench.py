"""`gradserve bench SUITE --json`: each suite is a module in `gradserve_services.bench` with
`add_arguments(parser)` and `run(args) -> int`; each prints one JSON object per line."""

from __future__ import annotations

import importlib

SUITES = ("engine", "transport", "training", "scaling", "load", "soak")


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="run a benchmark suite, JSON lines on stdout")
    suites = bench.add_subparsers(dest="suite", required=True)
    for name in SUITES:
        try:
            module = importlib.import_module(f"gradserve_services.bench.{name}")
        except ModuleNotFoundError as missing:
            if missing.name != f"gradserve_services.bench.{name}":
                raise
            continue
        parser = suites.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
        parser.add_argument("--json", action="store_true", help="print JSON lines (the only format)")
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)
