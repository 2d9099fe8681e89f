"""`gradserve bench SUITE --json`: each suite is a module in `gradserve_services.bench` with
`add_arguments(parser)` and `run(args) -> int`; each prints one JSON object per line."""

from __future__ import annotations

from .help import HelpFormatter
from .modules import present_modules

BENCH_HELP = """\
Run a benchmark suite; the peer it is compared with is measured in the same run.

Output: one JSON object per line on stdout, one line per measured case (each suite's help says
which fields its lines carry); progress and logs go to stderr. Exit code 0 when every case ran.
"""

SUITES = ("engine", "transport", "training", "scaling", "load", "soak", "sparse", "links", "functions")


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="run a benchmark suite, JSON lines on stdout",
                                  description=BENCH_HELP, formatter_class=HelpFormatter)
    suites = bench.add_subparsers(dest="suite", required=True)
    for name, module in present_modules("gradserve_services.bench", SUITES):
        summary = (module.__doc__ or name).strip()
        parser = suites.add_parser(name, help=summary.splitlines()[0], description=summary,
                                   formatter_class=HelpFormatter)
        parser.add_argument("--json", action="store_true", help="print JSON lines (the only format)")
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)
