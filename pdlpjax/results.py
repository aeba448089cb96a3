"""`run_config`: simulate a config and write its results folder.

A results folder holds `summary.json` (with the P&L `attribution`, `attribution.py`),
`config.toml` (the resolved config), `pools.csv` (one row per pool: its params and metrics),
`record.npz` (when `output.record_every` > 0) and PNG plots. Every file is written atomically.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np
import tomli_w

from . import _io, sanity
from .attribution import LP_TERMS, summarise_attribution
from .config import SECTIONS, Config, ConfigError, config_hash, config_to_dict, resolve_dynamic
from .metrics import mean_ci
from .pool import guard_names

__all__ = [
    "run_config",
    "run_blocks",
    "prepare_out_dir",
    "simulate_config",
    "versions",
    "SimulationError",
    "Interrupted",
]


class SimulationError(RuntimeError):
    """A run finished but broke an invariant (e.g. the accounting identity); one line."""


def versions() -> dict[str, str]:
    """Versions of the package, JAX, jaxlib, NumPy and Python, and the JAX backend."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    return {
        "pdlpjax": v("pdlpjax"),
        "jax": jax.__version__,
        "jaxlib": v("jaxlib"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
    }


def data_fingerprint(cfg: Config) -> str | None:
    """SHA-256 (16 hex digits) of the CSV files behind `paths.data`, or None without data.

    The config hash names the data by its path; this names it by its content.
    """
    if not cfg.paths.data:
        return None
    src = Path(cfg.paths.data)
    files = sorted(src.glob("*.csv")) if src.is_dir() else [src]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def prepare_out_dir(cfg: Config, out_dir: str | Path | None = None) -> Path:
    """Resolve and create the results folder; fail with `ConfigError` if it is not writable.

    The default, `runs/<name>-<time>`, is a new folder: a second run in the same second gets
    `-2`, `-3`, ... (the CLI refuses a given non-empty folder without `--overwrite`).
    """
    if out_dir is None and cfg.output.dir:
        out_dir = cfg.output.dir
    elif out_dir is None:
        stem = Path("runs") / f"{cfg.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        out_dir, n = stem, 1
        while True:  # claim the folder by creating it: runs started together never share one
            try:
                stem.parent.mkdir(parents=True, exist_ok=True)
                out_dir.mkdir()
                break
            except FileExistsError:
                n += 1
                out_dir = stem.with_name(f"{stem.name}-{n}")
            except OSError:
                break  # reported below as not writable
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output.dir: {out}: not a writable folder ({err.strerror})") from None
    return out


def _progress(name: str):
    """Progress lines on stderr: "compiling…" now (the first compile takes seconds), then one
    line per chunk."""
    print(f"[{name}] compiling…", file=sys.stderr, flush=True)

    def show(done: int, total: int, run_s: float, compile_s: float) -> None:
        eta = run_s / done * (total - done)
        print(
            f"[{name}] step {done}/{total}  run {run_s:6.1f} s  compile {compile_s:5.1f} s"
            f"  ETA {eta:5.1f} s",
            file=sys.stderr,
            flush=True,
        )

    return show


def simulate_config(cfg: Config, params, model, spec, *, quiet: bool = False, **extra):
    """`simulate` with the config's seed, horizon, chunk length and devices, and progress on
    stderr unless `quiet` or `simulation.progress = false`; `extra` goes to `simulate`."""
    from .simulate import simulate

    return simulate(
        params,
        model,
        spec,
        seed=cfg.simulation.seed,
        num_steps=cfg.simulation.num_steps,
        chunk_length=cfg.simulation.chunk_length,
        progress=None if quiet or not cfg.simulation.progress else _progress(cfg.name),
        num_devices=_num_devices(cfg),
        **extra,
    )


# The [paths] params each model reads (pools.csv lists only these).
MODEL_FIELDS = {
    "gbm": {"drifts", "vols", "correlation"},
    "jump": {
        "drifts",
        "vols",
        "correlation",
        "jump_intensity",
        "jump_mean",
        "jump_vol",
        "crash_intensity",
        "crash_mean",
        "crash_vol",
    },
    "garch": {"drifts", "vols", "correlation", "garch_alpha", "garch_beta"},
    "bootstrap": {"block_length"},
}


def _param_columns(cfg: Config, values: dict) -> tuple[list[str], list[np.ndarray]]:
    """pools.csv columns for every dynamic param the run uses: scalars as is, vectors per
    asset, matrices by their upper triangle."""
    names, cols = [], []
    risky, assets = cfg.market.assets, cfg.asset_names
    for sec in SECTIONS:
        for key, arr in values.get(sec, {}).items():
            if sec == "paths" and key not in MODEL_FIELDS[cfg.paths.model]:
                continue
            base = f"{sec}.{key}"
            if arr.ndim == 1:
                names.append(base)
                cols.append(arr)
            elif arr.ndim == 2:
                labels = assets if arr.shape[1] == len(assets) else risky
                for j, a in enumerate(labels):
                    names.append(f"{base}.{a}")
                    cols.append(arr[:, j])
            else:
                for i in range(arr.shape[1]):
                    for j in range(i + 1, arr.shape[2]):
                        names.append(f"{base}.{risky[i]}_{risky[j]}")
                        cols.append(arr[:, i, j])
    return names, cols


CHECKPOINT = "checkpoint.npz"


def _save_checkpoint(out: Path, cfg: Config, done: int, state, records: list) -> None:
    """Atomically write the batched state after `done` steps and the records so far."""
    arrays = {f"state_{i:03d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
    if records:
        joined = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *records)
        for name in joined.__dataclass_fields__:
            if getattr(joined, name) is not None:  # hedged_share_price only when hedged
                arrays[f"record_{name}"] = getattr(joined, name)
    arrays["done"] = np.asarray(done)
    arrays["config_hash"] = np.asarray(config_hash(cfg))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _io.write_bytes(out / CHECKPOINT, buf.getvalue())


def read_checkpoint(out: Path, name: str, cfg: Config) -> dict[str, np.ndarray]:
    """The arrays of `out/name` (an .npz written with a `config_hash`); a `ConfigError` if
    it is missing, unreadable or belongs to another config."""
    path = out / name
    if not path.is_file():
        raise ConfigError(f"--resume {out}: no {name} (nothing to resume)")
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise ConfigError(f"--resume {out}: unreadable {name} ({err})") from None
    if str(data["config_hash"]) != config_hash(cfg):
        raise ConfigError(f"--resume {out}: {name} belongs to another config")
    return data


def _load_checkpoint(out: Path, cfg: Config) -> tuple[int, list, list]:
    """(done, state leaves, records) from `out/checkpoint.npz`; checks it is this config's."""
    from .simulate import Record

    data = read_checkpoint(out, CHECKPOINT, cfg)
    leaves = [data[k] for k in sorted(k for k in data if k.startswith("state_"))]
    records = []
    if "record_share_price" in data:
        fields = [n for n in Record.__dataclass_fields__ if f"record_{n}" in data]
        records = [Record(**{n: data[f"record_{n}"] for n in fields})]
    return int(data["done"]), leaves, records


def _write_diagnostic(out: Path, err) -> Path:
    """The state of the pool that broke a guard, at the end of its chunk, as JSON."""
    pool = jax.tree.map(lambda x: np.asarray(x)[err.pool].tolist(), err.state)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(pool)}
    path = out / f"diagnostic_pool{err.pool}.json"
    _io.write_json(
        path,
        {
            "pool": err.pool,
            "step": err.step,
            "code": err.code,
            "what": guard_names(err.code),
            "state_at_chunk_end": flat,
        },
    )
    return path


def _num_devices(cfg: Config) -> int:
    """`simulation.devices` resolved: "all" or 0 mean every visible device that divides the
    pools. One process only: multi-host runs go through `simulate` (README, Scale-out)."""
    if jax.process_count() > 1:
        raise ConfigError(
            f"pdlpjax run/sweep run in one process, not {jax.process_count()}: for a multi-host "
            "run call pdlpjax.simulate(..., num_devices=N) in every process (README, Scale-out)"
        )
    n = cfg.simulation.devices
    available = len(jax.devices())
    if n in ("all", 0):
        n = max(d for d in range(1, available + 1) if cfg.simulation.num_pools % d == 0)
    if n > available:
        raise ConfigError(f"simulation.devices: {n} requested, {available} visible")
    return n


class Interrupted(Exception):
    """The run was interrupted (Ctrl-C); a checkpoint was written to resume from."""


def run_config(
    cfg: Config, out_dir: str | Path | None = None, *, quiet: bool = False, resume: bool = False
) -> Path:
    """Simulate `cfg` and write its results folder; return the folder's path.

    The resolved config is written first and a checkpoint every `output.checkpoint_every`
    chunks (and on Ctrl-C, from the last finished chunk); `resume=True` continues the run in
    `out_dir` from its checkpoint, with a result bitwise equal to an uninterrupted run's.
    A pool that breaks a guard stops the run with `SimulationError` (after writing
    `diagnostic_pool<i>.json`), unless `simulation.on_invalid = "mask"`.
    """
    if cfg.pools:
        if resume:
            raise ConfigError("--resume: runs with [[pools]] blocks cannot be resumed yet")
        return run_blocks(cfg, out_dir, quiet=quiet)
    # Imported here so float64 can be switched on before any array exists.
    if cfg.simulation.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    from .build import make_model, make_params, make_spec
    from .simulate import InvalidPoolError

    model = make_model(cfg)  # reads and checks bootstrap data before anything compiles
    out = prepare_out_dir(cfg, out_dir)
    saved = _load_checkpoint(out, cfg) if resume else None
    notes = sanity.config_warnings(cfg)
    sanity.emit(notes)
    if not resume:
        _io.write_text(out / "config.toml", tomli_w.dumps(config_to_dict(cfg)))
        (out / CHECKPOINT).unlink(missing_ok=True)
    params, spec = make_params(cfg), make_spec(cfg)
    wall0 = time.perf_counter()
    latest: dict = {}
    every = cfg.output.checkpoint_every
    chunks = {"n": 0}

    def on_chunk(done: int, state, records: list) -> None:
        latest.update(done=done, state=state, records=list(records))
        chunks["n"] += 1
        if every and chunks["n"] % every == 0 and done < cfg.simulation.num_steps:
            _save_checkpoint(out, cfg, done, state, records)
            latest["saved"] = done

    try:
        res = simulate_config(
            cfg, params, model, spec, quiet=quiet, on_chunk=on_chunk, resume=saved
        )
    except KeyboardInterrupt:
        if latest and latest.get("saved") != latest["done"]:
            _save_checkpoint(out, cfg, latest["done"], latest["state"], latest["records"])
        done = latest.get("done", saved[0] if saved else 0)
        raise Interrupted(
            f"interrupted after step {done} of {cfg.simulation.num_steps}; continue with: "
            f"pdlpjax run --resume {out}"
        ) from None
    except InvalidPoolError as err:
        path = _write_diagnostic(out, err)
        raise SimulationError(
            f"pool {err.pool}, step {err.step}: {guard_names(err.code)} (snapshot in {path}; "
            f'set simulation.on_invalid = "mask" to continue without such pools)'
        ) from None
    wall = time.perf_counter() - wall0

    values, combos = resolve_dynamic(cfg)
    num_pools = cfg.simulation.num_pools
    reps = num_pools // len(combos)
    group = np.arange(num_pools) // reps
    metric_names = list(res.metrics)
    summary = {
        "name": cfg.name,
        "pools": num_pools,
        "steps": cfg.simulation.num_steps,
        "steps_per_year": cfg.simulation.steps_per_year,
        "years": cfg.simulation.num_steps / cfg.simulation.steps_per_year,
        "seed": cfg.simulation.seed,
        "config_hash": config_hash(cfg),
        "data_sha256": data_fingerprint(cfg),
        "wall_seconds": wall,
        "compile_seconds": res.compile_seconds,
        "run_seconds": res.run_seconds,
        "pool_steps_per_second": num_pools * cfg.simulation.num_steps / max(res.run_seconds, 1e-9),
        "versions": versions(),
        "devices": _num_devices(cfg),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "metrics": {k: mean_ci(v) for k, v in res.metrics.items()},
    }
    if len(combos) > 1:
        summary["groups"] = [
            {
                "params": {k: _plain(v) for k, v in combo.items()},
                "metrics": {k: mean_ci(res.metrics[k][group == g]) for k in metric_names},
            }
            for g, combo in enumerate(combos)
        ]
    err = res.metrics.get("identity_error")
    if err is not None and np.any(np.isfinite(err)):  # masked pools are NaN
        worst = int(np.nanargmax(err))
        summary["identity"] = {
            "max": float(err[worst]),
            "pool": worst,
            "step": int(np.asarray(res.state.accounts.identity_error_step)[worst]),
            "tolerance": cfg.simulation.identity_tolerance,
        }
    summary["attribution"] = summarise_attribution(res.metrics)
    summary["masked_pools"] = {"count": int(res.masked.size), "first": res.masked[:20].tolist()}
    if resume:
        summary["resumed_from_step"] = saved[0]
    found = sanity.result_warnings(res.metrics, int(res.masked.size))
    sanity.emit(found)
    summary["warnings"] = notes + found
    _io.write_json(out / "summary.json", summary)
    if res.masked.size == num_pools:
        (out / CHECKPOINT).unlink(missing_ok=True)
        raise SimulationError(
            f"all {num_pools} pools broke a guard and were masked: no metric is defined "
            f"(summary.json in {out}); with simulation.on_invalid = 'stop' the first one stops "
            "the run with a diagnostic"
        )

    names, cols = _param_columns(cfg, values)
    header = ["pool", "group", *names, *metric_names]
    rows = [
        [
            i,
            int(group[i]),
            *(_fmt(c[i]) for c in cols),
            *(_fmt(res.metrics[m][i]) for m in metric_names),
        ]
        for i in range(num_pools)
    ]
    _io.write_csv(out / "pools.csv", header, rows)

    if res.record is not None:
        _write_record(out / "record.npz", cfg, res)

    if cfg.output.plots:
        from . import plots

        plots.histogram(
            out / "sharpe_hist.png",
            res.metrics["sharpe"],
            f"{cfg.name}: LP Sharpe per pool ({num_pools} pools)",
            "annualised Sharpe ratio",
        )
        if res.record is not None and cfg.pool.mode == "pdlp":
            days = (
                np.arange(1, res.record.share_price.shape[1] + 1)
                * cfg.output.record_every
                * (365.0 / cfg.simulation.steps_per_year)
            )
            plots.utilisation_chart(
                out / "utilisation.png",
                days,
                res.record.utilisation,
                res.record.open_interest / _record_aum(res.record),
                f"{cfg.name}: utilisation and open interest",
            )
        if res.record is not None:
            _fan_charts(out, cfg, res)
        _attribution_plots(out, cfg, summary["attribution"], res.metrics)
    (out / CHECKPOINT).unlink(missing_ok=True)
    if not quiet:
        m = summary["metrics"]["sharpe"]
        print(
            f"[{cfg.name}] {num_pools} pools x {cfg.simulation.num_steps} steps in "
            f"{wall:.1f} s (compile {res.compile_seconds:.1f} s); mean Sharpe "
            f"{m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]; results in {out}",
            file=sys.stderr,
        )
    return out


def _fan_charts(out: Path, cfg: Config, res) -> None:
    """fan_chart.png (the LP share price from t = 0) and, with the hedge, hedged_fan_chart.png
    (the hedged LP's wealth per share, with the unhedged median over it)."""
    from . import plots

    rec = res.record
    days = (
        np.arange(0, rec.share_price.shape[1] + 1)
        * cfg.output.record_every
        * (365.0 / cfg.simulation.steps_per_year)
    )
    p0 = np.asarray(res.state.stats.initial_value, float)[:, None]
    sp = np.concatenate([p0, rec.share_price], axis=1)
    title = f"{cfg.name}: LP share price quantiles over {cfg.simulation.num_pools} pools"
    plots.fan_chart(out / "fan_chart.png", days, sp, title)
    if rec.hedged_share_price is not None:
        h0 = np.asarray(res.state.hedge.stats.initial_value, float)[:, None]
        hedged = np.concatenate([h0, rec.hedged_share_price], axis=1)
        plots.fan_chart(
            out / "hedged_fan_chart.png",
            days,
            hedged,
            f"{cfg.name}: delta-hedged LP, quantiles over {cfg.simulation.num_pools} pools",
            "hedged LP wealth per share (numéraire)",
            overlay=[(days, sp, "unhedged LP")],
        )


def _attribution_plots(out: Path, cfg: Config, attribution: dict, metrics: dict) -> None:
    """attribution.png (the LP return's waterfall) and, with the hedge, hedged_sharpe.png."""
    from . import plots

    view = attribution.get("lp_return")
    if view:

        def triple(x: dict) -> tuple[float, float, float]:
            return (x["mean"], *x["ci95"])

        plots.attribution_chart(
            out / "attribution.png",
            {t: triple(v) for t, v in view["terms"].items()},
            triple(view["total"]),
            f"{cfg.name}: where the LP's return came from (mean over "
            f"{view['total']['n']} pools, 95% intervals)",
            "% of the initial share price",
        )
    if "hedged_sharpe" in metrics:
        plots.sharpe_pair(
            out / "hedged_sharpe.png",
            metrics["sharpe"],
            metrics["hedged_sharpe"],
            f"{cfg.name}: hedged vs unhedged LP Sharpe per pool",
        )


def _write_record(path: Path, cfg: Config, res) -> None:
    """record.npz: every `output.record_every` steps (axis 1), for every pool (axis 0)."""
    rec = res.record
    p0 = np.asarray(res.state.stats.initial_value, float)[:, None, None]
    arrays = {
        "steps": np.arange(1, rec.share_price.shape[1] + 1) * cfg.output.record_every,
        "share_price": rec.share_price,
        "prices": rec.prices,
        "reserves": rec.reserves,
        "utilisation": rec.utilisation,
        "open_interest": rec.open_interest,
        "attribution": np.asarray(rec.attribution) / p0,
        "attribution_terms": np.asarray(LP_TERMS),
        "assets": np.asarray(cfg.asset_names),
    }
    if rec.hedged_share_price is not None:
        arrays["hedged_share_price"] = rec.hedged_share_price
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    _io.write_bytes(path, buf.getvalue())


def _record_aum(record) -> np.ndarray:
    """pᵀR at each record, shape (pools, k): the denominator of utilisation too."""
    return np.sum(record.prices * record.reserves, axis=-1)


def _fmt(x: float) -> str:
    return f"{float(x):.10g}"


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, tuple) else v


def run_blocks(cfg: Config, out_dir: str | Path | None = None, *, quiet: bool = False) -> Path:
    """Simulate a config with `[[pools]]` blocks: pools over disjoint subsets of the market's
    assets, on one shared market (the same price draws), each with its hedged LP whose Schur
    damping follows `hedge.damping_rule`. Writes `summary.json` (per block: its assets, every
    metric's mean and interval, and its P&L `attribution`), `config.toml`, `pools.csv` (one
    row per pool and block) and `sharpe_hist_block<b>.png`. No checkpoints: a block is one
    compiled run.
    """
    if cfg.simulation.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    from .build import make_block, make_model
    from .simulate import InvalidPoolError

    model = make_model(cfg)
    out = prepare_out_dir(cfg, out_dir)
    _io.write_text(out / "config.toml", tomli_w.dumps(config_to_dict(cfg)))
    notes = sanity.config_warnings(cfg)
    sanity.emit(notes)
    wall0 = time.perf_counter()
    blocks, rows, names = [], [], None
    compile_s = run_s = 0.0
    for b, block in enumerate(cfg.pools):
        params, spec = make_block(cfg, b)
        try:
            res = simulate_config(cfg, params, model, spec, quiet=quiet)
        except InvalidPoolError as err:
            raise SimulationError(
                f"pools[{b}] pool {err.pool}, step {err.step}: {guard_names(err.code)}"
            ) from None
        compile_s += res.compile_seconds
        run_s += res.run_seconds
        found = [f"pools[{b}]: {w}" for w in sanity.result_warnings(res.metrics, res.masked.size)]
        sanity.emit(found)
        notes += found
        names = names or list(res.metrics)
        blocks.append(
            {
                "assets": list(block.assets),
                "metrics": {k: mean_ci(v) for k, v in res.metrics.items()},
                "attribution": summarise_attribution(res.metrics),
            }
        )
        for i in range(cfg.simulation.num_pools):
            rows.append([i, b, *(_fmt(res.metrics[m][i]) for m in names)])
        if cfg.output.plots:
            from . import plots

            plots.histogram(
                out / f"sharpe_hist_block{b}.png",
                res.metrics.get("hedged_sharpe", res.metrics["sharpe"]),
                f"{cfg.name}: pool {b} ({', '.join(block.assets)}) LP Sharpe",
                "annualised Sharpe ratio" + (" (hedged)" if cfg.hedge.enabled else ""),
            )
    summary = {
        "name": cfg.name,
        "pools": cfg.simulation.num_pools,
        "blocks": blocks,
        "steps": cfg.simulation.num_steps,
        "seed": cfg.simulation.seed,
        "damping_rule": cfg.hedge.damping_rule,
        "config_hash": config_hash(cfg),
        "wall_seconds": time.perf_counter() - wall0,
        "compile_seconds": compile_s,
        "run_seconds": run_s,
        "versions": versions(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "warnings": notes,
    }
    _io.write_json(out / "summary.json", summary)
    _io.write_csv(out / "pools.csv", ["pool", "block", *names], rows)
    if not quiet:
        print(f"[{cfg.name}] {len(blocks)} pools per market; results in {out}", file=sys.stderr)
    return out
