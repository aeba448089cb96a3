"""`run_sweep`: a large paired comparison of settings (`pdlpjax sweep CONFIG`).

The `[sweep]` section names dynamic params and their values (a Cartesian grid, or `draws`
random combinations). Every combination runs `replicates` pools; replicate j of every
combination uses draw index j, so all combinations see the same markets (common random
numbers) and differences between them are paired. All pools run as one vmapped program, in
batches of at most `batch_pools` pools along the pool axis (the last batch is padded, so one
compile serves every batch).

Outputs (atomically written): `config.toml` (the sweep's config), `sweep.csv` (one row per
combination), `summary.json` (the same table with every metric's mean and 95% interval),
`pools.csv` (per pool), heatmaps of the hedged-minus-unhedged Sharpe over every pair of swept
params (grid sweeps; `sharpe_<a>_<b>.png`), and `sweep_checkpoint.npz` while running: an
interrupted sweep continues with `pdlpjax sweep --resume DIR` from its last finished batch.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import tomli_w

from . import _io, sanity
from .config import (
    SECTIONS,
    Config,
    ConfigError,
    Grid,
    Range,
    config_hash,
    config_to_dict,
    resolve_dynamic,
)
from .metrics import mean_ci

__all__ = ["sweep_config", "run_sweep", "paired_difference", "SWEEP_CHECKPOINT"]

SWEEP_CHECKPOINT = "sweep_checkpoint.npz"


def sweep_config(cfg: Config) -> tuple[Config, list[dict]]:
    """The run config a sweep simulates, and its combinations.

    Grid sweeps set each swept key to its `Grid`; random sweeps draw `draws` combinations
    (seeded by `simulation.seed`) and give every pool its combination's value. `num_pools`
    becomes combinations × replicates (times any grid already in the base config).
    **Returns:** `(config, combos)`, combos as from `config.resolve_dynamic`.
    """
    sw = cfg.sweep
    if not sw.params:
        raise ConfigError('sweep.params: a sweep needs at least one swept key, e.g. "pool.fee"')
    if cfg.pools:
        raise ConfigError("sweep: configs with [[pools]] blocks cannot be swept yet (use run)")
    if sw.replicates < 2:  # one pool per combination: every interval would have zero width
        raise ConfigError(
            f"sweep.replicates: expected at least 2 (95% intervals need two replicates per "
            f"combination), got {sw.replicates}"
        )
    if cfg.paths.antithetic and sw.replicates % 2:
        raise ConfigError(
            f"sweep.replicates: antithetic pairs need an even number, got {sw.replicates}"
        )
    sections: dict[str, dict] = {}
    if sw.draws == 0:
        for name, grid in sw.params.items():
            sec, key = name.split(".")
            sections.setdefault(sec, {})[key] = grid
        base_combos = math.prod(len(g.values) for g in sw.params.values())
        num_pools = base_combos * sw.replicates
    else:
        rng = np.random.default_rng(cfg.simulation.seed)
        num_pools = sw.draws * sw.replicates
        for name, spec in sw.params.items():
            sec, key = name.split(".")
            if isinstance(spec, Range):
                vals = [float(v) for v in spec.sample(rng, sw.draws)]
            else:  # a list of values: pick among them
                vals = [spec.values[i] for i in rng.integers(0, len(spec.values), sw.draws)]
            # The draws become one grid axis of `draws` values zipped together: a per-pool
            # list with each combination repeated `replicates` times.
            sections.setdefault(sec, {})[key] = tuple(v for v in vals for _ in range(sw.replicates))
    existing = 1  # grids of the config itself, on keys the sweep does not set
    for sec_name in SECTIONS:
        section = getattr(cfg, sec_name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, Grid) and f.name not in sections.get(sec_name, {}):
                existing *= len(value.values)
    if existing > 1 and sw.draws:
        raise ConfigError("sweep.draws: random sweeps cannot combine with grids in the config")
    changes = {
        name: dataclasses.replace(getattr(cfg, name), **values) for name, values in sections.items()
    }
    sim = dataclasses.replace(cfg.simulation, num_pools=num_pools * existing)
    run = dataclasses.replace(cfg, simulation=sim, **changes)
    _check_run(run)
    values, combos = resolve_dynamic(run)
    if sw.draws:
        names = list(sw.params)
        combos = [
            {n: _plain(_value_of(values, n, i * sw.replicates)) for n in names}
            for i in range(sw.draws)
        ]
    return run, combos


def _check_run(cfg: Config) -> None:
    from .config import config_from_dict

    config_from_dict(config_to_dict(cfg))  # the cross checks, on the expanded config


def _value_of(values: dict, name: str, pool: int):
    sec, key = name.split(".")
    return values[sec][key][pool].tolist()


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, tuple | list) else float(v)


def paired_difference(a: np.ndarray, b: np.ndarray, z: float = 1.96) -> dict:
    """Mean of a − b over pairs with both finite, its paired 95% interval, and the interval an
    unpaired comparison of the same samples would give (sqrt(sd_a²/n + sd_b²/n)).

    **Returns:** `{"mean", "ci95", "unpaired_ci95", "n"}`.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = int(a.size)
    if n < 2:
        nan = float("nan")
        return {"mean": nan, "ci95": [nan, nan], "unpaired_ci95": [nan, nan], "n": n}
    d = a - b
    mean = float(d.mean())
    half = z * float(d.std(ddof=1)) / math.sqrt(n)
    half_u = z * math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / n)
    return {
        "mean": mean,
        "ci95": [mean - half, mean + half],
        "unpaired_ci95": [mean - half_u, mean + half_u],
        "n": n,
    }


def _batches(num_pools: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, num_pools)) for i in range(0, num_pools, size)]


def _take(tree, lo: int, hi: int, size: int):
    """Pools lo..hi of a batched pytree, padded to `size` by repeating the last pool."""
    import jax

    def cut(x):
        part = x[lo:hi]
        if hi - lo < size:
            pad = np.repeat(np.asarray(part[-1:]), size - (hi - lo), axis=0)
            part = np.concatenate([np.asarray(part), pad])
        return part

    return jax.tree.map(cut, tree)


def run_sweep(
    cfg: Config, out_dir: str | Path | None = None, *, quiet: bool = False, resume: bool = False
) -> Path:
    """Run the sweep of `cfg` and write its results folder; return the folder's path.

    `resume=True` continues a sweep in `out_dir` from its checkpoint (finished batches are
    kept, the rest run); results equal an uninterrupted sweep's.
    """
    import jax

    if cfg.simulation.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    from .build import make_model, make_params, make_spec
    from .results import Interrupted, SimulationError, _num_devices, prepare_out_dir, versions
    from .simulate import InvalidPoolError, simulate

    run, combos = sweep_config(cfg)
    model = make_model(run)
    out = prepare_out_dir(cfg, out_dir)
    notes = sanity.config_warnings(run)
    sanity.emit(notes)
    params, spec = make_params(run), make_spec(run)
    num_pools = run.simulation.num_pools
    reps = num_pools // len(combos)
    key_index = np.arange(num_pools) % reps  # common random numbers across combinations
    size = min(cfg.sweep.batch_pools, num_pools)
    devices = _num_devices(dataclasses.replace(run, simulation=_sim_with_pools(run, size)))
    done_metrics: list[dict] = []
    if resume:
        done_metrics = _load(out, cfg)
    else:
        _io.write_text(out / "config.toml", tomli_w.dumps(config_to_dict(cfg)))
        (out / SWEEP_CHECKPOINT).unlink(missing_ok=True)
    batches = _batches(num_pools, size)
    wall0 = time.perf_counter()
    compile_s = run_s = 0.0
    if not quiet and len(done_metrics) < len(batches):
        print(f"[{cfg.name}] compiling…", file=sys.stderr, flush=True)
    try:
        for b, (lo, hi) in enumerate(batches):
            if b < len(done_metrics):
                continue
            res = simulate(
                _take(params, lo, hi, size),
                model,
                spec,
                seed=run.simulation.seed,
                num_steps=run.simulation.num_steps,
                chunk_length=run.simulation.chunk_length,
                num_devices=devices,
                key_index=_take(key_index, lo, hi, size),
            )
            compile_s += res.compile_seconds
            run_s += res.run_seconds
            done_metrics.append({k: np.asarray(v)[: hi - lo] for k, v in res.metrics.items()})
            if len(done_metrics) < len(batches):
                _save(out, cfg, done_metrics)
            if not quiet:
                print(
                    f"[{cfg.name}] batch {b + 1}/{len(batches)}: pools {hi}/{num_pools}  "
                    f"run {run_s:6.1f} s  compile {compile_s:5.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted after {len(done_metrics)} of {len(batches)} batches; continue with: "
            f"pdlpjax sweep --resume {out}"
        ) from None
    except InvalidPoolError as err:
        raise SimulationError(
            f"pool {err.pool} of a batch, step {err.step}: set simulation.on_invalid = "
            '"mask" to continue without such pools'
        ) from None
    wall = time.perf_counter() - wall0
    metrics = {k: np.concatenate([m[k] for m in done_metrics]) for k in done_metrics[0]}
    table = _table(metrics, combos, reps)
    masked = int(np.sum(~np.isfinite(metrics["total_return"])))
    found = sanity.result_warnings(metrics, masked)
    sanity.emit(found)
    # The config's own grids on keys the sweep does not set: without them as columns,
    # rows that differ only there would look like duplicates.
    grid_keys = [k for k in combos[0] if k not in cfg.sweep.params]
    summary = {
        "name": cfg.name,
        "combinations": len(combos),
        "replicates": reps,
        "pools": num_pools,
        "steps": run.simulation.num_steps,
        "batches": len(batches),
        "batch_pools": size,
        "config_hash": config_hash(cfg),
        "wall_seconds": wall,
        "compile_seconds": compile_s,
        "run_seconds": run_s,
        "pools_per_second": num_pools / max(wall, 1e-9),
        "pool_steps_per_second": num_pools * run.simulation.num_steps / max(run_s, 1e-9),
        "versions": versions(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "swept": list(cfg.sweep.params),
        "config_grid": grid_keys,
        "table": table,
        "warnings": notes + found,
    }
    _io.write_json(out / "summary.json", summary)
    _write_csv(out / "sweep.csv", table, [*cfg.sweep.params, *grid_keys])
    if masked == num_pools:
        (out / SWEEP_CHECKPOINT).unlink(missing_ok=True)
        raise SimulationError(
            f"all {num_pools} pools broke a guard and were masked: no metric is defined "
            f"(summary.json in {out})"
        )
    group = np.arange(num_pools) // reps
    names = list(metrics)
    rows = [
        [i, int(group[i]), int(key_index[i]), *(f"{float(metrics[m][i]):.10g}" for m in names)]
        for i in range(num_pools)
    ]
    _io.write_csv(out / "pools.csv", ["pool", "combination", "replicate", *names], rows)
    if cfg.output.plots and cfg.sweep.draws == 0 and "hedged_sharpe" in metrics:
        _heatmaps(out, cfg, combos, table, metrics=metrics, reps=reps)
    (out / SWEEP_CHECKPOINT).unlink(missing_ok=True)
    if not quiet:
        print(
            f"[{cfg.name}] {len(combos)} combinations x {reps} replicates = {num_pools} pools in "
            f"{wall:.1f} s (compile {compile_s:.1f} s, {summary['pools_per_second']:.0f} "
            f"pools/s); results in {out}",
            file=sys.stderr,
        )
    return out


def _sim_with_pools(cfg: Config, pools: int):
    return dataclasses.replace(cfg.simulation, num_pools=pools)


# Headline columns of sweep.csv, after the swept params.
_SHARES = ("claim41_fee", "claim41_variance", "claim41_holds", "hedge_beats")


def _table(metrics: dict, combos: list[dict], reps: int) -> list[dict]:
    rows = []
    for g, combo in enumerate(combos):
        sel = slice(g * reps, (g + 1) * reps)
        row = {"params": {k: _plain(v) for k, v in combo.items()}}
        row["metrics"] = {k: mean_ci(v[sel]) for k, v in metrics.items()}
        if "hedged_sharpe" in metrics:
            row["sharpe_difference"] = paired_difference(
                metrics["hedged_sharpe"][sel], metrics["sharpe"][sel]
            )
            claim = metrics["claim41_holds"][sel] > 0.5
            beats = metrics["hedge_beats"][sel] > 0.5
            row["claim41_confusion"] = {
                "holds_and_beats": int(np.sum(claim & beats)),
                "holds_not_beats": int(np.sum(claim & ~beats)),
                "fails_and_beats": int(np.sum(~claim & beats)),
                "fails_not_beats": int(np.sum(~claim & ~beats)),
            }
        rows.append(row)
    return rows


def _write_csv(path: Path, table: list[dict], swept: list[str]) -> None:
    hedged = "sharpe_difference" in table[0]
    header = [*swept, "sharpe", "sharpe_lo", "sharpe_hi"]
    if hedged:
        header += ["hedged_sharpe", "hedged_sharpe_lo", "hedged_sharpe_hi"]
        header += ["difference", "difference_lo", "difference_hi"]
        header += ["unpaired_lo", "unpaired_hi", *(f"share_{s}" for s in _SHARES)]
    rows = []
    for row in table:
        m = row["metrics"]
        vals = [row["params"][k] for k in swept]
        line = [*(_cell(v) for v in vals), m["sharpe"]["mean"], *m["sharpe"]["ci95"]]
        if hedged:
            d = row["sharpe_difference"]
            line += [m["hedged_sharpe"]["mean"], *m["hedged_sharpe"]["ci95"]]
            line += [d["mean"], *d["ci95"], *d["unpaired_ci95"]]
            line += [m[s]["mean"] for s in _SHARES]
        rows.append([x if isinstance(x, str) else f"{x:.6g}" for x in line])
    _io.write_csv(path, header, rows)


def _cell(v) -> str:
    return " ".join(f"{x:g}" for x in np.ravel(v)) if isinstance(v, list) else f"{v:g}"


def _heatmaps(
    out: Path,
    cfg: Config,
    combos: list[dict],
    table: list[dict],
    *,
    metrics: dict | None = None,
    reps: int | None = None,
) -> None:
    """Mean hedged − unhedged Sharpe over each pair of swept scalar params with ≥ 2 values,
    averaged over the other swept params (and the config's own grids).

    With the per-pool `metrics` (combination g's pools are g·reps .. (g+1)·reps − 1, replicate
    j on market j), a cell's value and paired 95% interval come from the per-replicate means
    over the cell's combinations: replicate j sees the same market in each, so the interval
    keeps the pairing; cells whose interval excludes 0 are marked.
    """
    from . import plots

    swept = [
        k for k, g in cfg.sweep.params.items() if len(g.values) > 1 and np.ndim(g.values[0]) == 0
    ]
    spy = cfg.simulation.steps_per_year
    reps = reps or cfg.sweep.replicates
    diff = np.array([row["sharpe_difference"]["mean"] for row in table])
    per_pool = None
    if metrics is not None:
        per_pool = (
            np.asarray(metrics["hedged_sharpe"], float) - np.asarray(metrics["sharpe"], float)
        ).reshape(len(combos), reps)
    for i, a in enumerate(swept):
        for b in swept[i + 1 :]:
            xs = sorted({c[a] for c in combos})
            ys = sorted({c[b] for c in combos})
            grid = np.full((len(ys), len(xs)), np.nan)
            marks = np.zeros(grid.shape, bool)
            sizes = set()
            for yi, y in enumerate(ys):
                for xi, x in enumerate(xs):
                    idx = [g for g, c in enumerate(combos) if c[a] == x and c[b] == y]
                    if not idx:
                        continue
                    sizes.add(len(idx))
                    if per_pool is None:
                        grid[yi, xi] = np.nanmean(diff[idx])
                        continue
                    with warnings.catch_warnings():  # a replicate masked everywhere: NaN
                        warnings.simplefilter("ignore", RuntimeWarning)
                        rep_means = np.nanmean(per_pool[idx], axis=0)
                    ci = mean_ci(rep_means)
                    grid[yi, xi] = ci["mean"]
                    lo, hi = ci["ci95"]
                    marks[yi, xi] = bool(lo > 0 or hi < 0)  # NaN compares False
            others = [
                k for k in combos[0] if k not in (a, b) and len({str(c[k]) for c in combos}) > 1
            ]
            m = max(sizes) if sizes else 1
            if m == 1:
                note = f"mean over {reps} pools per cell, paired on common random numbers"
            else:
                note = (
                    f"mean over {m * reps} pools per cell: {reps} replicates (paired on "
                    f"common random numbers) × {m} settings of {', '.join(others)}, averaged over"
                )
            plots.heatmap(
                out / f"sharpe_{a}_{b}.png".replace("/", "_"),
                grid,
                xs,
                ys,
                plots.axis_label(a, spy),
                plots.axis_label(b, spy),
                f"{cfg.name}: hedged − unhedged LP Sharpe",
                "hedged − unhedged Sharpe (annualised)",
                marks=marks if per_pool is not None else None,
                note=note,
            )


def _save(out: Path, cfg: Config, done: list[dict]) -> None:
    arrays = {f"b{i:05d}_{k}": v for i, m in enumerate(done) for k, v in m.items()}
    arrays["config_hash"] = np.asarray(config_hash(cfg))
    arrays["batches"] = np.asarray(len(done))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _io.write_bytes(out / SWEEP_CHECKPOINT, buf.getvalue())


def _load(out: Path, cfg: Config) -> list[dict]:
    from .results import read_checkpoint

    data = read_checkpoint(out, SWEEP_CHECKPOINT, cfg)
    done = []
    for i in range(int(data["batches"])):
        prefix = f"b{i:05d}_"
        done.append({k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)})
    return done
