"""Command line: `pdlpjax run|sweep CONFIG [--set section.key=value ...] [--out DIR]`.

`run` simulates a config; `sweep` runs its `[sweep]` grid as one paired comparison;
`calibrate` fits its `[calibrate]` params by gradient.
`pdlpjax run|sweep --resume DIR` continues an interrupted run from DIR's checkpoint.
Errors in the config or its data print one line (`error: ...`) and exit with status 2,
before anything is compiled; a run in which a pool breaks a numerical guard exits with status 3
(with a diagnostic snapshot of that pool in the results folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .results import Interrupted, SimulationError, run_config

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like a config error
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pdlpjax", description="Monte Carlo engine for PDLPs")
    sub = p.add_subparsers(dest="command", required=True)
    helps = {
        "run": "simulate a config and write a results folder",
        "sweep": "run the config's [sweep] grid (paired, common random numbers)",
        "calibrate": "fit the config's [calibrate] params by gradient (optax)",
    }
    for name, text in helps.items():
        run = sub.add_parser(name, help=text)
        run.add_argument("config", nargs="?", help="TOML config, e.g. configs/quickstart.toml")
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
        run.add_argument(
            "--resume",
            metavar="DIR",
            default=None,
            help="continue an interrupted run from its results folder's checkpoint",
        )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pdlpjax` command; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "sweep":
        from .sweep import run_sweep

        runner = run_sweep
    elif args.command == "calibrate":
        from .calibrate import calibrate_config

        def runner(cfg, out, quiet=False, resume=False):
            if resume:
                raise ConfigError("calibrate: --resume is not supported (calibrations are short)")
            return calibrate_config(cfg, out, quiet=quiet)
    else:
        runner = run_config
    try:
        if args.resume is not None:
            if args.config or args.overrides or args.out:
                raise ConfigError(
                    "--resume DIR: takes no config, --set or --out (the folder holds its config)"
                )
            cfg = load_config(Path(args.resume) / "config.toml")
            out = runner(cfg, args.resume, quiet=args.quiet, resume=True)
        else:
            if args.config is None:
                raise ConfigError(f"{args.command}: expected a config file (or --resume DIR)")
            cfg = load_config(args.config, args.overrides)
            out = runner(cfg, args.out, quiet=args.quiet)
        print(out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SimulationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except RuntimeError as err:  # a calibration's NaN gradient (CalibrationError)
        if type(err).__name__ != "CalibrationError":
            raise
        print(f"error: {err}", file=sys.stderr)
        return 3
    except Interrupted as err:
        print(f"error: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
