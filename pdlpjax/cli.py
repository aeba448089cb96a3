"""Command line: `pdlpjax run|sweep|calibrate|stress CONFIG [--set section.key=value ...]`.

`run` simulates a config; `sweep` runs its `[sweep]` grid as one paired comparison;
`calibrate` fits its `[calibrate]` params by gradient; `stress` reports trader PnL ÷ pool value
over a price-shock × open-interest-skew grid of the config's final books (`pdlpjax.stress`);
`keys [SECTION]` lists every config key.
`pdlpjax run|sweep --resume DIR` continues an interrupted run from DIR's checkpoint.
Errors in the config or its data print one line (`error: ...`) and exit with status 2,
before anything is compiled: among them a results folder that already holds files (without
`--overwrite`) and a run whose estimated memory exceeds the machine's available memory. A run
in which a pool breaks a numerical guard exits with status 3 (with a diagnostic snapshot of
that pool in the results folder). Compiled programs are kept in a persistent cache
(`pdlpjax._cache`: `$PDLPJAX_CACHE`, default `~/.cache/pdlpjax/xla`; `PDLPJAX_CACHE=off`
switches it off), so a second run of a config does not compile again.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

from ._cache import enable_compilation_cache
from ._memory import check_memory
from .config import ARRAYS, SECTIONS, TOP_LEVEL, ConfigError, key_rows, load_config
from .results import Interrupted, SimulationError, run_config

__all__ = ["main"]

# What each subcommand needs, and an example config that has it.
_COMMANDS = {
    "run": ("simulate a config and write a results folder", "configs/quickstart.toml", None),
    "sweep": (
        "run the config's [sweep] grid (paired, common random numbers)",
        "configs/hedged_sharpe.toml",
        "sweep",
    ),
    "calibrate": (
        "fit the config's [calibrate] params by gradient (optax)",
        "configs/calibrate_hedge.toml",
        "calibrate",
    ),
    "stress": (
        "trader PnL / pool value over a price shock x open-interest skew grid",
        "configs/quickstart.toml",
        None,
    ),
}
# Sections only the experiment scripts' own configs have (a fallback when the file does not
# name its script).
_EXPERIMENT_SECTIONS = {
    "fit": "experiments/calibrate_gamma.py",
    "check": "experiments/calibrate_gamma.py",
    "real": "experiments/schur_damping.py",
    "plots": "experiments/schur_damping.py",
    "glp": "experiments/claims_twm.py",
    "claim_3_4": "experiments/claims_twm.py",
    "solver": "experiments/claims_twm.py",
    "heatmap": "experiments/claims_twm.py",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like a config error
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pdlpjax")
    except PackageNotFoundError:  # run from a source tree without installing
        return "0.0.0+local"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pdlpjax", description="Monte Carlo engine for PDLPs")
    p.add_argument("--version", action="version", version=f"pdlpjax {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (text, example, section) in _COMMANDS.items():
        needs = f"a config with a [{section}] section" if section else "a config"
        run = sub.add_parser(
            name,
            help=text,
            description=f"{text[0].upper()}{text[1:]}. Takes {needs}, e.g. "
            f"`pdlpjax {name} {example}`.",
        )
        run.add_argument("config", nargs="?", help=f"TOML config, e.g. {example}")
        run.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override a config value (TOML syntax)",
        )
        run.add_argument("--out", default=None, help="results folder (default runs/<name>-<time>)")
        run.add_argument(
            "--overwrite",
            action="store_true",
            help="write into an existing results folder that already holds files (files of the "
            "same name are replaced; other old files stay)",
        )
        run.add_argument("--quiet", action="store_true", help="no progress or summary line")
        if name == "stress":
            _stress_options(run)
        elif name != "calibrate":  # a calibration has no checkpoint (they are short)
            run.add_argument(
                "--resume",
                metavar="DIR",
                default=None,
                help="continue an interrupted run from its results folder's checkpoint",
            )
    keys = sub.add_parser(
        "keys",
        help="list every config key: kind, default, range, meaning",
        description="List every config key with its kind (static/dynamic), default, range "
        "and meaning.",
    )
    keys.add_argument("section", nargs="?", help=f"one of {', '.join(SECTIONS)}")
    return p


def _stress_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--asset", default=None, help="shock this risky asset only (default: all)")
    p.add_argument(
        "--shocks",
        default=None,
        metavar="A,B,...",
        help="relative price shocks, e.g. --shocks=-0.5,0,0.5 (default -0.5,-0.4,...,0.5)",
    )
    p.add_argument(
        "--skews",
        default=None,
        metavar="A,B,...",
        help="open-interest skews (L-S)/(L+S) in [-1, 1] (default -0.8,-0.6,...,0.8)",
    )
    p.add_argument(
        "--adl-threshold",
        type=float,
        default=0.45,
        metavar="X",
        help="trader PnL / pool value above which ADL would trigger (default 0.45)",
    )


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{option}: expected comma-separated numbers, got {text!r}") from None


def _stress_runner(args: argparse.Namespace):
    """`stress_test` with the command's options (parsed when called, inside main's errors)."""

    def run(cfg, out, quiet: bool = False):
        from .stress import stress_test

        return stress_test(
            cfg,
            out,
            shocks=_floats(args.shocks, "--shocks"),
            skews=_floats(args.skews, "--skews"),
            asset=args.asset,
            adl_threshold=args.adl_threshold,
            quiet=quiet,
        )

    return run


def _print_keys(section: str | None) -> None:
    rows = key_rows(section)
    width = max(len(r["key"]) for r in rows)
    current = None
    for r in rows:
        if r["section"] != current:
            if current is not None:
                print()
            current = r["section"]
            print(f"[{current}]")
        extra = f"  range {r['range']}" if r["range"] else ""
        print(f"  {r['key']:<{width}}  {r['kind']}, default {r['default']}{extra}")
        print(f"  {'':<{width}}  {r['meaning']}")


def _experiment_script(path: Path) -> str | None:
    """The experiment script that reads `path`, when it is not a `pdlpjax` config."""
    try:
        text = path.read_text()
        raw = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None  # load_config reports it
    unknown = [k for k in raw if k not in SECTIONS and k not in TOP_LEVEL and k not in ARRAYS]
    if not unknown:
        return None
    named = re.search(r"experiments/\w+\.py", text)
    if named:
        return named.group(0)
    return next((_EXPERIMENT_SECTIONS[k] for k in unknown if k in _EXPERIMENT_SECTIONS), None)


def _load(args: argparse.Namespace):
    path = Path(args.config)
    if path.is_file():
        script = _experiment_script(path)
        if script:
            raise ConfigError(
                f"{path} is read by {script}, not pdlpjax {args.command} (python {script} {path})"
            )
    cfg = load_config(path, args.overrides)
    section = _COMMANDS[args.command][2]
    example = _COMMANDS[args.command][1]
    other = {"sweep": "calibrate", "calibrate": "sweep"}.get(args.command)
    if section and not getattr(cfg, section).params:
        hint = ""
        if other and getattr(cfg, other).params:
            hint = f"; it has [{other}] params: pdlpjax {other} {path}"
        raise ConfigError(
            f"{path}: pdlpjax {args.command} needs [{section}] params (a [{section}.params] "
            f"table), e.g. {example}{hint}"
        )
    if args.command == "run" and not args.quiet:
        ignored = [s for s in ("sweep", "calibrate") if getattr(cfg, s).params]
        if ignored:
            what = " and ".join(f"[{s}]" for s in ignored)
            runs = " / ".join(f"pdlpjax {s}" for s in ignored)
            print(f"note: pdlpjax run ignores {what} ({runs} runs it)", file=sys.stderr)
    return cfg


def _check_out(out: str | None, where: str, overwrite: bool) -> None:
    """Refuse a results folder that already holds files, unless `overwrite`."""
    if not out or overwrite:
        return
    folder = Path(out)
    if folder.is_dir() and any(folder.iterdir()):
        raise ConfigError(
            f"{where}: {folder} already holds files; pass --overwrite to write into it, choose "
            "a new folder, or continue an interrupted run with --resume"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pdlpjax` command; returns the exit status."""
    args = _parser().parse_args(argv)
    resume = getattr(args, "resume", None)
    if args.command == "sweep":
        from .sweep import run_sweep

        runner = run_sweep
    elif args.command == "calibrate":
        from .calibrate import calibrate_config

        runner = calibrate_config
    elif args.command == "stress":
        runner = _stress_runner(args)
    else:
        runner = run_config
    try:
        if args.command == "keys":
            _print_keys(args.section)
            return 0
        enable_compilation_cache()
        if resume is not None:
            if args.config or args.overrides or args.out:
                raise ConfigError(
                    "--resume DIR: takes no config, --set or --out (the folder holds its config)"
                )
            cfg = load_config(Path(resume) / "config.toml")
            check_memory(cfg, args.command)
            out = runner(cfg, resume, quiet=args.quiet, resume=True)
        else:
            if args.config is None:
                raise ConfigError(
                    f"{args.command}: expected a config file, e.g. "
                    f"pdlpjax {args.command} {_COMMANDS[args.command][1]}"
                    + (" (or --resume DIR)" if args.command in ("run", "sweep") else "")
                )
            cfg = _load(args)
            if args.out:
                _check_out(args.out, "--out", args.overwrite)
            else:
                _check_out(cfg.output.dir, "output.dir", args.overwrite)
            check_memory(cfg, args.command)
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
