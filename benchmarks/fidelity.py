"""Fidelity of the K-bucket book: the JAX engine (merging buckets, K = 16 by default) against
the per-trade reference (`numpy_vectorised.run(..., per_trade=True)`: every accepted crowd its
own bucket, never merged) on the same draws, and against itself as K grows.

```bash
JAX_PLATFORMS=cpu .venv/bin/python benchmarks/fidelity.py [--pools 256] [--steps 720] [--quick]
```

Scenarios: `configs/quickstart.toml` (256 pools × 720 hourly steps) and a stress version (the
quickstart with every vol × 2 and `market.leverage = 20`, built with the config's
`section.key=value` overrides), both in float64. The reference consumes JAX's own draws
(`draw_noise` per pool and step, the pool keys `simulate` uses), so the comparison is paired
pool by pool. For each metric (per pool, over the horizon) it reports both means over pools,
the relative difference, the Monte Carlo standard error of the paired difference and
pass = |diff| ≤ max(2% · |reference mean|, 2 SE). Then the engine runs with K = 16, 32, 64,
128 and each metric's relative move from K = 16 is reported (goal: ≤ 3%). As a check that
the pairing is right, the NumPy merge mode at K = 16 is run too: it is the same model as the
engine, so it must agree with it to rounding.

Writes `benchmarks/results/fidelity.json` (date, machine from `lscpu`, command) and prints
a table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUICKSTART = ROOT / "configs" / "quickstart.toml"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


nv = sys.modules.get("numpy_vectorised") or _load("numpy_vectorised", HERE / "numpy_vectorised.py")

# metric -> (label, unit)
METRICS = {
    "utilisation": ("time-average utilisation", "fraction"),
    "fees": ("fee income", "numéraire"),
    "liquidated_notional": ("liquidated notional", "numéraire"),
    "liquidated_margin": ("liquidated margin", "numéraire"),
    "bad_debt": ("bad debt", "numéraire"),
    "book_pnl": ("book PnL (pool's side of trader PnL)", "numéraire"),
    "liquidations": ("liquidations", "positions (crowd-equivalents)"),
}
K_VALUES = (16, 32, 64, 128)
REL_TOL = 0.02  # |diff| ≤ max(2% |reference|, 2 SE)
K_GOAL = 0.03  # relative move from K = 16


def scenario_overrides(name: str) -> list[str]:
    """The `section.key=value` overrides of a scenario on top of the quickstart."""
    if name == "quickstart":
        return []
    if name == "stress":
        import pdlpjax

        vols = [2.0 * float(v) for v in np.ravel(pdlpjax.load_config(QUICKSTART).paths.vols)]
        return [f"paths.vols=[{', '.join(repr(v) for v in vols)}]", "market.leverage=20.0"]
    raise ValueError(name)


def make_config(name: str, pools: int, steps: int, cohorts: int = 16, extra: tuple[str, ...] = ()):
    """The scenario's config in float64 with `pools` pools, `steps` steps, K = `cohorts`."""
    import pdlpjax

    overrides = [
        *scenario_overrides(name),
        'simulation.dtype="float64"',
        f"simulation.num_pools={pools}",
        f"simulation.num_steps={steps}",
        f"simulation.chunk_length={steps}",
        "simulation.progress=false",
        "output.plots=false",
        f"market.cohorts={cohorts}",
        *extra,
    ]
    return pdlpjax.load_config(QUICKSTART, overrides)


def per_pool(acc, steps: int) -> dict[str, np.ndarray]:
    """The metrics of `METRICS` per pool from accounts (a JAX `Accounts` or a dict)."""
    get = (lambda k: acc[k]) if isinstance(acc, dict) else (lambda k: getattr(acc, k))
    out = {"utilisation": np.asarray(get("utilisation_sum"), np.float64) / steps}
    for name in METRICS:
        if name != "utilisation":
            out[name] = np.asarray(get(name), np.float64)
    return out


def run_jax(cfg) -> tuple[dict[str, np.ndarray], dict]:
    """The engine on `cfg` (float64): per-pool metrics and timings."""
    import pdlpjax
    from pdlpjax.results import simulate_config

    with jax.enable_x64(True):
        params = pdlpjax.make_params(cfg)
        model, spec = pdlpjax.make_model(cfg), pdlpjax.make_spec(cfg)
        res = simulate_config(cfg, params, model, spec, quiet=True, pool_block=0)
        acc = jax.tree_util.tree_map(np.asarray, res.state.accounts)
    steps = cfg.simulation.num_steps
    return per_pool(acc, steps), {
        "compile_seconds": res.compile_seconds,
        "run_seconds": res.run_seconds,
    }


def draws(cfg) -> list:
    """Every step's draws of every pool (batched `StepNoise`, one per step): JAX's
    `draw_noise` with the keys `simulate` gives the pools (as `tests/test_numpy_vectorised.py`
    does), so the reference and the engine see the same prices and trader flow."""
    import pdlpjax

    with jax.enable_x64(True):
        model, spec = pdlpjax.make_model(cfg), pdlpjax.make_spec(cfg)
        keys, _ = pdlpjax.pool_keys(cfg.simulation.seed, cfg.simulation.num_pools)
        draw = jax.jit(jax.vmap(lambda k, t: pdlpjax.draw_noise(model, spec, k, t), (0, None)))
        return [draw(keys, t) for t in range(cfg.simulation.num_steps)]


def run_jax_steps(cfg, noise: list) -> dict[str, np.ndarray]:
    """The engine's step (jit + vmap over pools) on `cfg` with the given draws, one call per
    step: the same numbers as `simulate`, with a smaller program to compile (for the test)."""
    import pdlpjax

    with jax.enable_x64(True):
        params = pdlpjax.make_params(cfg)
        model, spec = pdlpjax.make_model(cfg), pdlpjax.make_spec(cfg)
        jstep = jax.jit(jax.vmap(lambda s, p, n: pdlpjax.step(s, p, model, spec, n)))
        st = jax.vmap(lambda p: pdlpjax.init_state(p, model, spec))(params)
        for step_noise in noise:
            st = jstep(st, params, step_noise)
        acc = jax.tree_util.tree_map(np.asarray, st.accounts)
    return per_pool(acc, len(noise))


def run_reference(
    cfg, noise: list | None = None, per_trade: bool = True
) -> tuple[dict[str, np.ndarray], dict]:
    """The NumPy book on `cfg` with JAX's draws (`draws(cfg)` unless given): per-trade
    (default) or merge mode with the config's K."""
    import pdlpjax

    with jax.enable_x64(True):
        params, spec = pdlpjax.make_params(cfg), pdlpjax.make_spec(cfg)
    nspec = nv.spec_from_pdlpjax(spec, cfg.paths.model)
    nprm = nv.params_from_pdlpjax(params)
    noise = draws(cfg) if noise is None else noise
    with jax.enable_x64(True):
        np_noise = [nv.noise_from_pdlpjax(n) for n in noise]  # converted apart from the run
    steps = len(np_noise)
    start = time.perf_counter()
    st = nv.run(nspec, nprm, np_noise, steps, per_trade=per_trade)
    seconds = time.perf_counter() - start
    info = {
        "run_seconds": seconds,
        "book_slots": int(st.book.size.shape[-1]),
        "max_open_buckets": int(st.book.is_open.sum(-1).max()),
        "merged": float(st.accounts["merged"].sum()),
        "opened": float(st.accounts["opened"].sum()),
        "identity_error": float(st.accounts["identity_error"].max()),
    }
    return per_pool(st.accounts, steps), info


def compare(
    engine: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """Per metric: both means, relative difference, SE of the paired difference, pass."""
    out = {}
    for name in METRICS:
        a, b = engine[name], reference[name]
        d = a - b
        n = d.size
        se = float(np.std(d, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        mean_a, mean_b, diff = float(a.mean()), float(b.mean()), float(d.mean())
        rel = diff / abs(mean_b) if mean_b != 0 else (0.0 if diff == 0 else float("inf"))
        out[name] = {
            "engine_mean": mean_a,
            "reference_mean": mean_b,
            "diff": diff,
            "rel_diff": rel,
            "se_paired": se,
            "tolerance": max(REL_TOL * abs(mean_b), 2.0 * se),
            "pass": bool(abs(diff) <= max(REL_TOL * abs(mean_b), 2.0 * se)),
        }
    return out


def k_moves(by_k: dict[int, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Per metric and K: the mean over pools, its relative move from the smallest K, and the
    standard error of that move's paired difference (same draws, pool by pool)."""
    base_k = min(by_k)
    out = {}
    for name in METRICS:
        base_pools = by_k[base_k][name]
        base = float(base_pools.mean())
        row = {}
        for k, metrics in sorted(by_k.items()):
            d = metrics[name] - base_pools
            mean = float(metrics[name].mean())
            move = (mean - base) / abs(base) if base != 0 else (0.0 if mean == 0 else float("inf"))
            se = float(np.std(d, ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
            row[str(k)] = {
                "mean": mean,
                "rel_move": move,
                "diff": float(d.mean()),
                "se_paired": se,
                "within_goal": bool(abs(move) <= K_GOAL),
            }
        out[name] = row
    return out


def max_rel_gap(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest relative difference pool by pool over the metrics (scale: the metric's largest
    magnitude over pools)."""
    worst = 0.0
    for name in METRICS:
        scale = max(np.max(np.abs(b[name])), 1e-300)
        worst = max(worst, float(np.max(np.abs(a[name] - b[name])) / scale))
    return worst


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"machine": platform.machine()}
    keep = ("Architecture", "Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket")
    rows = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: rows[k].strip() for k in keep if k in rows}


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return ""
    return out.stdout.strip()


def run_scenario(name: str, pools: int, steps: int, k_values=K_VALUES) -> dict:
    """One scenario: the engine at every K, the per-trade reference, the merge-mode check."""
    out: dict = {"overrides": scenario_overrides(name), "pools": pools, "steps": steps}
    by_k, timings = {}, {}
    for k in k_values:
        by_k[k], timings[f"engine_K{k}"] = run_jax(make_config(name, pools, steps, k))
        print(f"  {name}: engine K={k} ran in {timings[f'engine_K{k}']['run_seconds']:.1f} s")
    cfg = make_config(name, pools, steps, k_values[0])
    noise = draws(cfg)
    reference, timings["per_trade_reference"] = run_reference(cfg, noise, per_trade=True)
    print(
        f"  {name}: per-trade reference ran in "
        f"{timings['per_trade_reference']['run_seconds']:.1f} s"
    )
    merge, timings[f"numpy_merge_K{k_values[0]}"] = run_reference(cfg, noise, per_trade=False)
    out["engine_vs_numpy_merge_max_rel_gap"] = max_rel_gap(by_k[k_values[0]], merge)
    out["fidelity"] = compare(by_k[k_values[0]], reference)
    out["fidelity_by_k"] = {str(k): compare(by_k[k], reference) for k in k_values}
    out["k_sweep"] = k_moves(by_k)
    out["timings"] = timings
    return out


def print_table(name: str, res: dict) -> None:
    print(f"\n{name} ({res['pools']} pools × {res['steps']} steps, float64)")
    print(
        f"{'metric':<22} {'engine K=16':>14} {'per-trade':>14} {'rel diff':>9} "
        f"{'SE':>11} {'pass':>5}   " + "  ".join(f"K={k:<4}" for k in res["k_sweep"]["fees"])
    )
    for name_m in METRICS:
        f = res["fidelity"][name_m]
        moves = "  ".join(f"{v['rel_move']:+6.2%}" for v in res["k_sweep"][name_m].values())
        print(
            f"{name_m:<22} {f['engine_mean']:>14.6g} {f['reference_mean']:>14.6g} "
            f"{f['rel_diff']:>+9.2%} {f['se_paired']:>11.4g} {('yes' if f['pass'] else 'NO'):>5}   "
            f"{moves}"
        )
    print(
        "engine vs NumPy merge mode (K=16), largest gap: "
        f"{res['engine_vs_numpy_merge_max_rel_gap']:.2e}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pools", type=int, default=256)
    ap.add_argument("--steps", type=int, default=720)
    ap.add_argument("--quick", action="store_true", help="32 pools × 120 steps")
    ap.add_argument("--scenarios", default="quickstart,stress")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fidelity.json")
    ap.add_argument("--note", default="", help="a note stored in the JSON")
    args = ap.parse_args(argv)
    pools, steps = (32, 120) if args.quick else (args.pools, args.steps)
    jax.config.update("jax_enable_x64", True)
    import pdlpjax

    started = time.perf_counter()
    result = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": _lscpu(),
        "git_commit": _git_commit(),
        "software": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "numpy": np.__version__,
            "pdlpjax": pdlpjax.__version__,
            "backend": jax.default_backend(),
        },
        "criterion": "pass = |mean diff| <= max(2% * |reference mean|, 2 * SE of the paired diff);"
        " K goal: |relative move from K=16| <= 3%",
        "metrics": {k: {"label": v[0], "unit": v[1]} for k, v in METRICS.items()},
        "note": args.note,
        "scenarios": {},
    }
    for name in args.scenarios.split(","):
        print(f"{name}: {pools} pools × {steps} steps", flush=True)
        result["scenarios"][name] = run_scenario(name, pools, steps)
        print_table(name, result["scenarios"][name])
    result["wall_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
