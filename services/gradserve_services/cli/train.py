"""`gradserve train JOB.yaml [flags]`: run a batch training job through a gradserve service.

Flags override the job file (`--print-reference` lists every job-file key with its default).
Without `--target` the job embeds a service (gRPC on 127.0.0.1, an ephemeral port, with a local Ray
runtime listening on 127.0.0.1 only) and stops it at the end.

Output: stdout gets exactly one line, a JSON object, when the job is done:
  {"steps": 840, "epochs": 30, "train_loss": 0.02, "test_loss": 0.08, "test_accuracy": 0.98,
   "samples_per_s": 5400.0, "wall_s": 25.1}
(test_accuracy for classification only; test_auc for a binary task with one output; for synthetic_ctr
planted_test_loss and planted_test_auc, the planted model's own on the same rows). stderr gets a
progress bar per epoch (on a terminal) and one line when the embedded Ray runtime starts; OUT/metrics.jsonl gets one JSON object per epoch,
OUT/metrics.png the loss/accuracy plot, OUT/parameters.npz the final parameters.
Exit codes: 0 done; 2 the job file or its data is wrong (one line on stderr naming the problem,
nothing trained); 1 training failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from .help import HelpFormatter

EXIT_OK, EXIT_FAILED, EXIT_BAD_JOB = 0, 1, 2


def register(subparsers) -> None:
    from gradserve_services.cluster.config import CONSISTENCY_MODES

    parser = subparsers.add_parser(
        "train", help="run a training job file (YAML) through a gradserve service",
        description=__doc__, formatter_class=HelpFormatter,
    )
    parser.add_argument("--print-reference", action=PrintReference,
                        help="print every job-file key with its default and meaning (Markdown), then exit")
    parser.add_argument("job", help="the job file (YAML); see examples/")
    overrides = _override_help()
    parser.add_argument("--epochs", type=int, help=overrides["epochs"])
    parser.add_argument("--batch-size", type=int, help=overrides["batch_size"])
    parser.add_argument("--workers", type=int, help=overrides["workers"])
    parser.add_argument("--consistency", help=overrides["consistency"] + "; " + " | ".join(CONSISTENCY_MODES))
    parser.add_argument("--lr", type=float, help=overrides["lr"])
    parser.add_argument("--seed", type=int, help=overrides["seed"] + "; seeds split, batch order, initial parameters")
    parser.add_argument("--target", help=overrides["target"] + "; host:port of a running gradserve service "
                                                              "(null: embed one)")
    parser.add_argument("--token", help=overrides["token"] + "; bearer token for --target")
    parser.add_argument("--checkpoint-dir", help=overrides["checkpoint_dir"])
    parser.add_argument("--checkpoint-every", type=int, help=overrides["checkpoint_every"])
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in checkpoint.dir")
    parser.add_argument("--out", help=overrides["out"] + "; folder for metrics.jsonl, metrics.png, parameters.npz")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="force the progress bar on or off (default: on when stderr is a terminal)")
    parser.set_defaults(func=run)


def _override_help() -> dict[str, str]:
    """Per override flag: the key it replaces and that key's default (the job file's value wins)."""
    from gradserve_services.jobs.job_keys import JOB_FILE_KEYS, OVERRIDES

    defaults = {entry.key: _default_text(entry) for entry in JOB_FILE_KEYS}
    return {flag: f"override {key} (default: the job file's, else {defaults[key]})"
            for flag, key in OVERRIDES.items()}


class PrintReference(argparse.Action):
    """Like --version: acts as soon as it is parsed, so the job argument is not needed."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(job_file_reference(), end="")
        parser.exit()


def job_file_reference() -> str:
    """The job-file keys as a Markdown table, from the schema in `gradserve_services.jobs.jobfile`
    (the README's job-file reference is this text)."""
    from gradserve_services.jobs.job_keys import JOB_FILE_KEYS

    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{entry.key}` | {_default_text(entry)} | {entry.meaning} |" for entry in JOB_FILE_KEYS]
    return "\n".join(rows) + "\n"


def _default_text(entry) -> str:
    if entry.default_rule is not None:
        return entry.default_rule
    # as written in a job file: YAML's true/false/null, flow-style lists; a `|` escaped, not a cell's end
    text = entry.default if isinstance(entry.default, str) else json.dumps(entry.default)
    return "`" + text.replace("|", "\\|") + "`"


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
    if prepared.job.target is None:
        _embed_quietly()

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
    except GradserveError as problem:  # the SDK's and the service's: one tree
        print(f"gradserve train: training failed: {type(problem).__name__}: {problem}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(summary), file=stdout, flush=True)
    return EXIT_OK


def _embed_quietly() -> None:
    """The embedded service's Ray runtime stays on loopback (when this process has not imported
    ray yet: run in-process by a program that has, it keeps Ray's default and says so) and
    announces itself in one line."""
    from gradserve_services.cluster.runtime import announce, confine_embedded_ray_to_loopback

    confine_embedded_ray_to_loopback()
    if not any(isinstance(handler, _CurrentStderr) for handler in announce.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("gradserve train: %(message)s"))
        announce.addHandler(handler)
    announce.setLevel(logging.INFO)
    announce.propagate = False


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a job run in-process may have replaced it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _ignored):
        pass
