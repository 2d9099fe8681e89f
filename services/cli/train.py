"""`gradserve train JOB.yaml [flags]`: run a batch training job through a gradserve service.

Flags override the job file. Without `--target` the job embeds a service (gRPC on 127.0.0.1, an
ephemeral port, with a local Ray runtime) and stops it at the end. Exit codes: 0 done; 2 the job file
or its data is wrong (one line on stderr naming the problem, nothing trained); 1 training failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

EXIT_OK, EXIT_FAILED, EXIT_BAD_JOB = 0, 1, 2


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="run a training job file (YAML) through a gradserve service",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("job", help="the job file (YAML); see examples/")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--batch-size", type=int, help="override train.batch_size")
    parser.add_argument("--workers", type=int, help="override train.workers")
    parser.add_argument("--consistency", help="override train.consistency (sync | async | bounded)")
    parser.add_argument("--lr", type=float, help="override optimizer.lr")
    parser.add_argument("--seed", type=int, help="override seed (split, batch order, initial parameters)")
    parser.add_argument("--target", help="host:port of a running gradserve service (default: embed one)")
    parser.add_argument("--token", help="override service.token (bearer token for the service)")
    parser.add_argument("--checkpoint-dir", help="override checkpoint.dir")
    parser.add_argument("--checkpoint-every", type=int, help="override checkpoint.every_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in checkpoint.dir")
    parser.add_argument("--out", help="override out (folder for metrics.jsonl, metrics.png, parameters)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="force the progress bar on or off (default: on when stderr is a terminal)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from gradserve_services.errors import GradserveError
    from gradserve_services.jobs.jobfile import OVERRIDES, load_job
    from gradserve_services.jobs.prepare import prepare_job

    flags = {name: getattr(args, name, None) for name in OVERRIDES}
    try:
        prepared = prepare_job(load_job(args.job, flags))
        if args.resume and prepared.job.checkpoint.dir is None:
            raise GradserveError("--resume needs a checkpoint directory (checkpoint.dir or --checkpoint-dir)",
                                 field="checkpoint.dir")
    except GradserveError as problem:
        print(f"gradserve train: {args.job}: {problem}", file=sys.stderr)
        return EXIT_BAD_JOB

    from gradserve import GradserveError as ServiceError
    from gradserve_services.jobs.runner import run_job
    from gradserve_services.jobs.state import CheckpointMismatch

    stdout = sys.stdout
    try:
        # Only the summary goes to stdout: anything a library prints meanwhile goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            summary = run_job(prepared, resume=args.resume, progress=args.progress)
    except CheckpointMismatch as problem:
        print(f"gradserve train: {args.job}: {problem}", file=sys.stderr)
        return EXIT_BAD_JOB
    except (GradserveError, ServiceError) as problem:
        print(f"gradserve train: training failed: {type(problem).__name__}: {problem}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(summary), file=stdout, flush=True)
    return EXIT_OK
