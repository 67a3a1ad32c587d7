"""The ``orchd`` command: ``serve`` (``--self-test``), ``check``, ``config``, ``--version``."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import msgspec

from orchd.build_info import version_line
from orchd.config import Config, ConfigError, Pool, Replica, load_sourced
from orchd.keys import key_entry

EXIT_CONFIG = 2  # a config that cannot be used
EXIT_CHECK = 1  # a self-test failed


def _config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="TOML config file (default: $ORCHD_CONFIG, else built-in: two mock replicas)",
    )


def _shape_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frontends", type=int, help="frontend processes sharing the port")
    p.add_argument("--gpus", choices=["auto"], help="one replica per GPU that NVML finds")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="orchd", description="LLM inference orchestrator")
    ap.add_argument("--version", action="version", version=version_line())
    sub = ap.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="start orchd: scheduler, engine supervisors, frontends")
    _config_flag(serve)
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080; 0 picks a free one)")
    _shape_flags(serve)
    serve.add_argument(
        "--self-test",
        action="store_true",
        help="first run `orchd check` on this config; do not serve if it fails",
    )
    check = sub.add_parser(
        "check",
        help="start orchd with a config on a free port and run the start-up self-tests "
        "(engine ping, one-token decode, cancel, metrics, logs); exit 1 on a failure",
    )
    _config_flag(check)
    _shape_flags(check)
    config = sub.add_parser(
        "config", help="check a config and print every resolved value with its source"
    )
    _config_flag(config)
    config.add_argument("--host")
    config.add_argument("--port", type=int)
    _shape_flags(config)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cli: dict[str, Any] = {"frontends": args.frontends, "gpus": args.gpus}
    if args.cmd in ("serve", "config"):
        cli.update(host=args.host, port=args.port)
    try:
        cfg, sources = load_sourced(args.config, cli=cli)
    except ConfigError as e:
        print(f"orchd: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.cmd == "config":
        with contextlib.suppress(BrokenPipeError):  # `orchd config | head`
            sys.stdout.write("\n".join(describe(cfg, sources)) + "\n")
            sys.stdout.flush()
        return 0
    from orchd.selftest import run_check

    if args.cmd == "check":
        return 0 if run_check(args.config, args.frontends, args.gpus) else EXIT_CHECK
    if args.self_test:
        print("orchd: self-test first (orchd check)", file=sys.stderr, flush=True)
        ok = run_check(args.config, args.frontends, args.gpus, emit=_to_stderr)
        if not ok:
            print("orchd: self-test failed; not serving", file=sys.stderr)
            return EXIT_CHECK
    from orchd.launcher import serve as run_serve

    try:
        return run_serve(cfg)
    except ConfigError as e:
        print(f"orchd: {e}", file=sys.stderr)
        return EXIT_CONFIG


def _to_stderr(line: str) -> None:
    print(f"orchd self-test: {line}", file=sys.stderr, flush=True)


def _shown(path: str, value: Any) -> Any:
    """A value as printed: secrets by their key id only."""
    if path == "server.api_keys":
        return [f"key id {key_entry(k).id} ({key_entry(k).role})" for k in value]
    if path == "catalog.signing_keys":
        return {k: "<secret>" for k in value}
    return value


def describe(cfg: Config, sources: dict[str, str]) -> list[str]:
    """Every field of the resolved config, ``path = <JSON value>  # source``; a value's source
    is the one recorded for it, for a path above it (a table set whole), or for an entry
    in it (a table whose entries were set)."""
    lines: list[str] = []

    def source_of(path: str) -> str:
        probe = path
        while probe:
            if probe in sources:
                return sources[probe]
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut] if cut > 0 else ""
        below = [v for k, v in sources.items() if k.startswith((path + ".", path + "["))]
        return below[0] if below else "default"  # a table whose entries were set

    def walk(path: str, value: Any) -> None:
        if isinstance(value, msgspec.Struct):
            for name in value.__struct_fields__:
                walk(f"{path}.{name}" if path else name, getattr(value, name))
        elif isinstance(value, list) and value and isinstance(value[0], Replica | Pool):
            for i, v in enumerate(value):
                walk(f"{path}[{i}]", v)
        else:
            shown = msgspec.to_builtins(_shown(path, value))
            lines.append(f"{path} = {msgspec.json.encode(shown).decode()}  # {source_of(path)}")

    walk("", cfg)
    return lines


if __name__ == "__main__":
    sys.exit(main())
