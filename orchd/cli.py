"""The ``orchd`` command."""

from __future__ import annotations

import argparse
import sys

from orchd.config import ConfigError, load


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="orchd", description="LLM inference orchestrator")
    sub = ap.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="start orchd: scheduler, engine supervisors, frontends")
    serve.add_argument("--config", help="TOML config file (default: built-in, two mock replicas)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080; 0 picks a free one)")
    serve.add_argument("--frontends", type=int, help="frontend processes sharing the port")
    serve.add_argument("--gpus", choices=["auto"], help="one replica per GPU that NVML finds")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        from orchd.launcher import serve as run_serve

        try:
            cfg = load(
                args.config,
                cli={
                    "host": args.host,
                    "port": args.port,
                    "frontends": args.frontends,
                    "gpus": args.gpus,
                },
            )
            return run_serve(cfg)
        except ConfigError as e:
            print(f"orchd: {e}", file=sys.stderr)
            return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
