"""`gradserve serve`: the gRPC gateway over a Ray cluster (embedded, or `--ray-address`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from .help import HelpFormatter

__all__ = ["register", "run", "RAY_LISTEN_CHOICES"]

# Where an embedded Ray runtime may be reached from: this machine only, or every interface.
RAY_LISTEN_CHOICES = ("loopback", "all")

log = logging.getLogger("gradserve.serve")


SERVE_HELP = """\
Serve the gRPC API; every step runs on Ray worker actors.

Output: once the server listens, the first line on stdout is one JSON object with the bound ports
(so --port 0 and --metrics-port 0 can be read back), and nothing else is written to stdout:
  {"event": "serving", "host": "127.0.0.1", "port": 50051, "metrics_port": 9090}
Logs go to stderr. Without --ray-address (or RAY_ADDRESS) an embedded Ray runtime starts first
(a few seconds; one line on stderr says so), listening on 127.0.0.1 only unless --ray-listen all.
Exit codes: 0 after SIGTERM/SIGINT (health NOT_SERVING, in-flight calls get --grace-s);
2 bad flags or no auth tokens.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve the gRPC API; every step runs on Ray workers",
                                   description=SERVE_HELP, formatter_class=HelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback: this machine only)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one")
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus port; 0 picks a free one")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="interface for the metrics exporter")
    parser.add_argument("--ray-address", default=None, help="existing Ray cluster (default: $RAY_ADDRESS, else embedded Ray)")
    parser.add_argument("--ray-listen", choices=RAY_LISTEN_CHOICES, default="loopback",
                        help="where the embedded Ray runtime listens: loopback (no other machine can reach or "
                             "join it) or all interfaces (other Ray nodes may join); ignored with --ray-address")
    parser.add_argument("--workers", type=int, default=2, help="worker actors of a session that asks for none")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--auth-tokens-file", help="IDENTITY:TOKEN lines (default: $GRADSERVE_AUTH_TOKENS)")
    auth.add_argument("--no-auth", action="store_true", help="accept every caller (local use only)")
    parser.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key; default: plaintext)")
    parser.add_argument("--tls-key", help="PEM private key (with --tls-cert)")
    parser.add_argument("--checkpoint-dir", default=os.environ.get("GRADSERVE_CHECKPOINT_DIR"),
                        help="where session checkpoints are written (default: $GRADSERVE_CHECKPOINT_DIR, "
                             "else none are written)")
    parser.add_argument("--max-concurrent-calls", type=int, default=64,
                        help="calls served at once; more are answered RESOURCE_EXHAUSTED")
    parser.add_argument("--grace-s", type=float, default=30.0, help="seconds in-flight calls get on SIGTERM")
    parser.add_argument("--call-timeout-s", type=int, default=None,
                        help="seconds one call of a step (a worker's shard, the servers' update) may take "
                             "before its actor counts as stuck and is replaced (default: ten minutes; "
                             "GetServerInfo's limits show the value in force)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if args.ray_listen == "loopback" and (args.ray_address or os.environ.get("RAY_ADDRESS") or "local") == "local":
        from gradserve_services.cluster.runtime import confine_embedded_ray_to_loopback

        if not confine_embedded_ray_to_loopback():  # before anything imports ray
            print("gradserve serve: cannot keep the embedded Ray runtime on loopback (ray is already "
                  "imported); pass --ray-listen all to accept all interfaces", file=sys.stderr)
            return 2
    from gradserve_services import metrics
    from gradserve_services.cluster import RayExecutor
    from gradserve_services.errors import GradserveError
    from gradserve_services.gateway import SessionLimits, create_server, load_tokens

    if bool(args.tls_cert) != bool(args.tls_key):
        print("gradserve serve: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        tokens = None if args.no_auth else load_tokens(args.auth_tokens_file)
    except (GradserveError, OSError) as bad:
        print(f"gradserve serve: no auth tokens ({bad}); give --auth-tokens-file, set "
              "GRADSERVE_AUTH_TOKENS, or pass --no-auth for local use", file=sys.stderr)
        return 2
    if args.call_timeout_s is not None and args.call_timeout_s < 1:
        print("gradserve serve: --call-timeout-s must be at least 1", file=sys.stderr)
        return 2
    limits = SessionLimits() if args.call_timeout_s is None else SessionLimits(call_timeout_s=args.call_timeout_s)
    tls = None
    if args.tls_cert:
        with open(args.tls_cert, "rb") as cert, open(args.tls_key, "rb") as key:
            tls = (cert.read(), key.read())

    executor = RayExecutor(address=args.ray_address, num_workers=args.workers)
    # Installed after Ray starts: ray.init sets its own SIGTERM handler, which would kill the
    # driver (and in-flight calls) instead of draining.
    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    try:
        gateway, port = create_server(
            executor, host=args.host, port=args.port, max_concurrent_calls=args.max_concurrent_calls,
            auth_tokens=tokens, tls=tls, checkpoint_dir=args.checkpoint_dir,
            limits=limits,
        )
        metrics_port = metrics.start_metrics_server(args.metrics_port, host=args.metrics_host)
        event = {"event": "serving", "host": args.host, "port": port, "metrics_port": metrics_port}
        print(json.dumps(event), flush=True)
        log.info("%s", json.dumps(event))
        while not stop_requested.wait(0.5):  # wake now and then so signals are handled promptly
            pass
        log.info("stopping: health NOT_SERVING, %.0f s grace for in-flight calls", args.grace_s)
        gateway.stop(args.grace_s)
        metrics.stop_metrics_server(metrics_port)
    finally:
        executor.shutdown()
    log.info("stopped")
    return 0
