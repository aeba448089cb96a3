"""Command line: `pdlpjax run CONFIG [--set section.key=value ...] [--out DIR]`.

Errors in the config or its data print one line (`error: ...`) and exit with status 2,
before anything is compiled; a run that breaks the accounting identity exits with status 3
(its results folder is kept for diagnosis).
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config
from .results import SimulationError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like a config error
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pdlpjax", description="Monte Carlo engine for PDLPs")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="simulate a config and write a results folder")
    run.add_argument("config", help="TOML config, e.g. configs/quickstart.toml")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (TOML syntax)",
    )
    run.add_argument("--out", default=None, help="results folder (default runs/<name>-<time>)")
    run.add_argument("--quiet", action="store_true", help="no progress or summary line")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pdlpjax` command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "run":
            from .results import run_config

            out = run_config(cfg, args.out, quiet=args.quiet)
            print(out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SimulationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
