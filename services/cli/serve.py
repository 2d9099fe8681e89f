"""`gradserve serve`: the gRPC gateway over a Ray cluster (embedded, or `--ray-address`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

__all__ = ["register", "run"]

log = logging.getLogger("gradserve.serve")


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve the gRPC API; every step runs on Ray workers")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one")
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus port; 0 picks a free one")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="interface for the metrics exporter")
    parser.add_argument("--ray-address", default=None, help="existing Ray cluster; default: embedded Ray")
    parser.add_argument("--workers", type=int, default=2, help="default worker actors per session")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--auth-tokens-file", help="IDENTITY:TOKEN lines (default: $GRADSERVE_AUTH_TOKENS)")
    auth.add_argument("--no-auth", action="store_true", help="accept every caller (local use only)")
    parser.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key (with --tls-cert)")
    parser.add_argument("--checkpoint-dir", default=os.environ.get("GRADSERVE_CHECKPOINT_DIR"),
                        help="where session checkpoints are written (default: $GRADSERVE_CHECKPOINT_DIR)")
    parser.add_argument("--max-concurrent-calls", type=int, default=64)
    parser.add_argument("--grace-s", type=float, default=30.0, help="time in-flight calls get on SIGTERM")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    from gradserve_services import metrics
    from gradserve_services.cluster import RayExecutor
    from gradserve_services.errors import GradserveError
    from gradserve_services.gateway import create_server, load_tokens

    if bool(args.tls_cert) != bool(args.tls_key):
        print("gradserve serve: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        tokens = None if args.no_auth else load_tokens(args.auth_tokens_file)
    except (GradserveError, OSError) as bad:
        print(f"gradserve serve: no auth tokens ({bad}); give --auth-tokens-file, set "
              "GRADSERVE_AUTH_TOKENS, or pass --no-auth for local use", file=sys.stderr)
        return 2
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
