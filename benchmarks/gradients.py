"""Pathwise gradients of the exact model against central finite differences.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/gradients.py [--pools N] [--steps T]
        [--out benchmarks/results/gradients.json]

The scenario is `configs/quickstart.toml` (BTC/ETH/SOL + USDC, K = 16 buckets, hourly GBM)
cut to 64 pools × 240 steps in float64 by config overrides. Outputs, each a mean over the
pools:

- `lp_return`: the LP's total return, final share price / initial share price − 1;
- `utilisation`: the time-average utilisation (value lent / pᵀR, averaged over the steps);
- `fee_income`: lending fees received / the pool's initial value;
- `hedged_return` (the `[hedge]` rows only): the hedged LP's wealth per share at the end /
  the initial share price − 1 (the hedge's entry cost included).

Every parameter θ enters as θ₀·λ (a vector such as `market.open_rate` is scaled as a whole),
and both derivatives are taken in λ at λ = 1 with common random numbers (same seed, same
pool keys, the same draws for every λ):

- pathwise: `jax.jacrev` of the outputs w.r.t. the vector λ of all of a scenario's params,
  through `lax.scan` of `simulate.step`, rematerialised per step with `jax.checkpoint`
  (as `calibrate` does), vmapped over the pools: one compiled program per scenario;
- central finite difference at a relative step h: (F(1 + h) − F(1 − h)) / 2h, each
  perturbation one run of a compiled forward program (the same scan without the gradient).

A scalar's row reports dF/dθ = (dF/dλ)/θ₀ (relative error is the same either way); a vector
param's row reports dF/dλ, the derivative per unit scale factor. Scenarios (one gradient and
one forward compile each):
- `base`: no target-weight arbitrage; `[hedge] enabled` (window estimator, rebalancing every
  24 steps) with `hedge.penalty = 1e-3` so that its relative step is not zero. The hedge
  does not move the pool's path, so the pool's and the market's params are measured here too;
- `glp` and `gmx`: `pool.discount`, for `pool.discount_base` and `pool.discount_tax`, which
  act only through the target-weight arbitrage (`twm.py`; its trade gates are discrete);
- `blocks`: the hedge over two `[[pools]]` blocks (BTC+ETH and SOL) with `hedge.damping =
  0.5`: the Schur damping acts only on a block pool (for a single pool its gradient is 0).

Each row also says how the per-pool central differences spread (the forward program keeps
every pool's outputs): `local_se`, the standard error over pools of the local derivative
(FD at the smallest h: the Monte Carlo error of the gradient itself); `pools_off`, the pools
whose FD at the table's h is more than 5% off their local one; `fd_minus_local_t`, the mean
of (FD at the table's h − local FD) over its standard error (|t| ≲ 2 is what pool-to-pool
noise alone gives; it is meaningful only on rows that disagree: where they agree, the
difference is the FD's own truncation error, the same sign in every pool). `verdict`:
`agree` (relative error < 5% at the table's h), `local` (not at the table's h, but at the
smallest: the output is not smooth at the table's scale: kinks, or jumps such as a merge
choice that flips), `zero` (both 0), `nan` (the pathwise gradient is not finite), `off`.

Writes `benchmarks/results/gradients.json` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

# LLVM at -O2 as in the test suite (tests/conftest.py): the gradient programs compile in
# about 3/4 of the time and run as fast, with IEEE arithmetic either way.
XLA_FLAG = "--xla_backend_optimization_level=2"
if XLA_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAG}".strip()

import equinox as eqx  # noqa: E402  (after XLA_FLAGS: jax reads it at import)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.toml"
OUT = ROOT / "benchmarks" / "results" / "gradients.json"
# Relative finite-difference steps, all measured: 1e-2 and 1e-3 are wide enough for the
# merge step's discrete choices to flip in some pools, 1e-5 sees the local derivative.
STEPS_H = (1e-2, 1e-3, 1e-4, 1e-5)
TABLE_H = 1e-3  # the one `finite_difference` and `relative_error` report
OUTPUTS = ("lp_return", "utilisation", "fee_income", "hedged_return")

# (param, scenario, outputs); a param with a vector value is scaled as a whole. The hedge
# does not move the pool's path, so the pool's params and the hedge's share one scenario.
ROWS = [
    *(
        (p, "base", OUTPUTS[:3])
        for p in (
            "pool.fee",
            "market.leverage",
            "market.funding_kappa",
            "market.funding_cap",
            "market.mean_holding",
            "market.open_rate",
            "market.fee_elasticity",
            "market.momentum",
            "market.leverage_spread",
            "market.max_leverage",
            "pool.max_utilisation",
        )
    ),
    ("hedge.risk_aversion", "base", OUTPUTS[3:]),
    ("hedge.cost", "base", OUTPUTS[3:]),
    ("hedge.penalty", "base", OUTPUTS[3:]),
    ("pool.fee", "glp", OUTPUTS[:3]),
    ("pool.discount_base", "glp", OUTPUTS[:3]),
    ("pool.discount_tax", "glp", OUTPUTS[:3]),
    ("pool.discount_base", "gmx", OUTPUTS[:3]),
    ("pool.discount_tax", "gmx", OUTPUTS[:3]),
    ("hedge.damping", "blocks", OUTPUTS[3:]),
]

HEDGE = ["hedge.enabled=true", "hedge.penalty=1e-3"]
SCENARIOS = {
    "base": HEDGE,
    "glp": ['pool.discount="glp"'],
    "gmx": ['pool.discount="gmx"'],
    "blocks": [*HEDGE, "hedge.damping=0.5"],
}
BLOCKS = [{"assets": ["BTC", "ETH"]}, {"assets": ["SOL"]}]


def scenario_config(name: str, pools: int, steps: int, path: Path = CONFIG):
    """The quickstart config cut to `pools` × `steps`, float64, with the scenario's overrides."""
    from pdlpjax.config import apply_overrides, config_from_dict

    raw = tomllib.loads(path.read_text())
    raw.setdefault("name", path.stem)
    overrides = [
        f"simulation.num_pools={pools}",
        f"simulation.num_steps={steps}",
        'simulation.dtype="float64"',
        "simulation.chunk_length=0",
        "simulation.progress=false",
        "output.record_every=0",
        "output.plots=false",
        *SCENARIOS[name],
    ]
    raw = apply_overrides(raw, overrides)
    if name == "blocks":
        raw["pools"] = BLOCKS
    return config_from_dict(raw, base_dir=path.parent), overrides


def _leaf(params, name: str):
    sec, key = name.split(".")
    return getattr(getattr(params, sec), key)


def inject(params, names: list[str], lam):
    """`params` with each named leaf multiplied by its factor λ_j (λ = 1: unchanged)."""
    for j, name in enumerate(names):
        params = eqx.tree_at(
            lambda q, name=name: _leaf(q, name), params, _leaf(params, name) * lam[j]
        )
    return params


def output_fn(cfg, names: list[str], checkpoint: bool = True):
    """F(λ) -> outputs (`OUTPUTS`, means over pools and blocks) and the blocks' params.
    See `pool_output_fn`."""
    per_pool, blocks = pool_output_fn(cfg, names, checkpoint)
    return (lambda lam: jnp.mean(per_pool(lam), axis=0)), blocks


def pool_output_fn(cfg, names: list[str], checkpoint: bool = True):
    """F(λ) -> each pool's outputs `(pools, len(OUTPUTS))` (means over the blocks of
    `[[pools]]`) and the blocks' params.

    Differentiable: a `lax.scan` of `simulate.step` with `jax.checkpoint` per step, vmapped
    over the pools; the hedge's rebalancing clock is the scan index (shared by all pools).
    `checkpoint` False stores every step's residuals instead (less to compile; for short runs).
    """
    from pdlpjax.build import make_block, make_model, make_params, make_spec
    from pdlpjax.simulate import draw_noise, init_state, pool_keys, step

    model = make_model(cfg)
    num_steps = cfg.simulation.num_steps
    keys, _ = pool_keys(cfg.simulation.seed, cfg.simulation.num_pools)
    if cfg.pools:
        blocks = [make_block(cfg, b) for b in range(len(cfg.pools))]
    else:
        blocks = [(make_params(cfg), make_spec(cfg))]

    def one(p, spec, key):
        s0 = init_state(p, model, spec)

        def body(s, t):
            return step(s, p, model, spec, draw_noise(model, spec, key, t), clock=t), None

        if checkpoint:  # recompute a step's internals on the backward pass, not store them
            body = jax.checkpoint(body)

        s, _ = lax.scan(body, s0, jnp.arange(num_steps, dtype=jnp.int32))
        price0 = s0.stats.initial_value
        hedged = s.hedge.stats.value / price0 - 1.0 if spec.hedge else jnp.zeros_like(price0)
        return jnp.stack(
            [
                s.stats.value / price0 - 1.0,
                s.accounts.utilisation_sum / num_steps,
                s.accounts.fees / p.pool.initial_value,
                hedged,
            ]
        )

    def per_pool(lam):
        total = 0.0
        for params, spec in blocks:
            p = inject(params, names, lam)
            total = total + jax.vmap(lambda q, k, spec=spec: one(q, spec, k))(p, keys)
        return total / len(blocks)

    return per_pool, blocks


def measure(cfg, names: list[str], steps_h=STEPS_H) -> dict:
    """Pathwise dF/dλ (one `jax.jacrev` for every output and param) and central FDs at
    each relative step (one compiled forward program run at every perturbation), in λ.
    The forward program keeps each pool's outputs, for the spread of the per-pool
    differences (`pool_fd`, `(h, pools, outputs, params)`)."""
    per_pool, blocks = pool_output_fn(cfg, names)

    def outputs(lam):
        return jnp.mean(per_pool(lam), axis=0)

    n = len(names)
    dtype = jnp.dtype(cfg.simulation.dtype)
    lam0 = jnp.ones((n,), dtype)
    t0 = time.perf_counter()
    jac_fn = jax.jit(jax.jacrev(outputs))
    jac_c = jac_fn.lower(lam0).compile()
    t_compile_grad = time.perf_counter() - t0
    t0 = time.perf_counter()
    jac = np.asarray(jac_c(lam0))  # (outputs, params)
    t_grad = time.perf_counter() - t0
    eye = np.eye(n)
    pert = np.concatenate([np.concatenate([1.0 + h * eye, 1.0 - h * eye]) for h in steps_h])
    pert = np.concatenate([np.ones((1, n)), pert])
    fwd = jax.jit(per_pool)
    t0 = time.perf_counter()
    fwd_c = fwd.lower(lam0).compile()
    t_compile_fd = time.perf_counter() - t0
    t0 = time.perf_counter()
    # (1 + 2·n·len(steps_h), pools, outputs): λ = 1, then per h every param up, every down
    pools = np.stack([np.asarray(fwd_c(jnp.asarray(x, dtype))) for x in pert])
    t_fd = time.perf_counter() - t0
    vals = pools.mean(axis=1)
    fd, pool_fd = {}, {}
    for i, h in enumerate(steps_h):
        up = pools[1 + 2 * n * i : 1 + 2 * n * i + n]
        down = pools[1 + 2 * n * i + n : 1 + 2 * n * (i + 1)]
        pool_fd[h] = np.transpose((up - down) / (2 * h), (1, 2, 0))  # (pools, outputs, params)
        fd[h] = pool_fd[h].mean(axis=0)
    base = {name: _leaf(blocks[0][0], name) for name in names}
    return {
        "jac": jac,
        "fd": fd,
        "pool_fd": pool_fd,
        "values": vals[0],
        "theta0": {k: np.asarray(v)[0] for k, v in base.items()},
        "seconds": {
            "compile_gradient": t_compile_grad,
            "gradient": t_grad,
            "compile_fd": t_compile_fd,
            "fd_forward_runs": t_fd,
            "fd_pool_steps": int(
                len(pert) * cfg.simulation.num_pools * len(blocks) * cfg.simulation.num_steps
            ),
        },
    }


def relative_error(g: float, fd: float) -> float | None:
    if fd == 0.0:
        return None if g == 0.0 else float("inf")
    return abs(g - fd) / abs(fd)


def pool_spread(pool_fd: dict, k: int, j: int, unit: float) -> dict:
    """How the per-pool differences spread, for one output k and param j.

    `local_se`: standard error over pools of the mean of the per-pool central differences at
    the smallest h (the local derivative; the pathwise gradient's Monte Carlo error with this
    many pools). `pools_off`: pools whose difference at the table's h is off their local one
    by more than 5%. `fd_minus_local_t`: mean over pools of (difference at the table's h −
    local one) over its standard error: |t| ≲ 2 is what noise alone gives.
    """
    local = pool_fd[min(STEPS_H)][:, k, j] / unit
    at_h = pool_fd[TABLE_H][:, k, j] / unit
    n = local.shape[0]
    diff = at_h - local
    se_diff = float(np.std(diff, ddof=1) / np.sqrt(n))
    tiny = 1e-12 * float(np.max(np.abs(local))) if np.any(local) else 0.0
    return {
        "local_se": float(np.std(local, ddof=1) / np.sqrt(n)),
        "pools_off": int(np.sum(np.abs(diff) > 0.05 * np.abs(local) + tiny)),
        "pools": int(n),
        "fd_minus_local_t": float(np.mean(diff) / se_diff) if se_diff > 0 else None,
    }


def rows_of(params: list[str], outs: list, m: dict, scenario: str) -> list[dict]:
    """One row per (param, output): scalars in d/dθ, vectors in d/d(scale factor)."""
    rows = []
    for j, p in enumerate(params):
        theta = m["theta0"][p]
        scalar = np.ndim(theta) == 0
        unit = float(theta) if scalar else 1.0
        for o in outs[j]:
            k = OUTPUTS.index(o)
            g = float(m["jac"][k, j]) / unit if unit else float("nan")
            fds = {h: float(m["fd"][h][k, j]) / unit for h in m["fd"]}
            spread = pool_spread(m["pool_fd"], k, j, unit)
            rows.append(
                {
                    "param": p,
                    "scenario": scenario,
                    "output": o,
                    "value": (float(theta) if scalar else np.asarray(theta).tolist()),
                    "wrt": "value" if scalar else "scale factor",
                    "autodiff": g,
                    "finite_difference": fds[TABLE_H],
                    "relative_error": relative_error(g, fds[TABLE_H]),
                    "mode": "exact",
                    "h": TABLE_H,
                    "finite_difference_by_h": {f"{h:g}": v for h, v in fds.items()},
                    "relative_error_by_h": {f"{h:g}": relative_error(g, v) for h, v in fds.items()},
                    **spread,
                }
            )
    return rows


def verdict(row: dict, tol: float = 0.05) -> str:
    """A one-word reading of a row: within `tol` at the table's h; `local` (off at the
    table's h, within `tol` at the smallest h: the output is not smooth at the table's scale);
    `zero` (both derivatives 0); `nan` (the pathwise gradient is not finite); `off`."""
    g = row["autodiff"]
    if not np.isfinite(g):
        return "nan"
    errs = row["relative_error_by_h"]
    if all(v is None for v in errs.values()):
        return "zero"
    if row["relative_error"] is not None and row["relative_error"] < tol:
        return "agree"
    smallest = errs[f"{min(STEPS_H):g}"]
    return "local" if smallest is not None and smallest < tol else "off"


def _plain(x):
    """JSON-safe: non-finite floats as the strings "nan", "inf", "-inf"."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    return x


def _fmt(x) -> str:
    if x is None:
        return "n/a (0/0)"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def table(rows: list[dict]) -> str:
    hs = list(rows[0]["relative_error_by_h"])
    head = (
        f"| param | scenario | output | autodiff | FD (h={TABLE_H:g}) | rel. err h={TABLE_H:g} | "
        + " | ".join(f"rel. err h={h}" for h in hs if h != f"{TABLE_H:g}")
        + " | SE (pools) | pools off | t | verdict |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        extra = [_fmt(r["relative_error_by_h"][h]) for h in hs if h != f"{TABLE_H:g}"]
        lines.append(
            f"| {r['param']} | {r['scenario']} | {r['output']} | {r['autodiff']:.6g} | "
            f"{r['finite_difference']:.6g} | {_fmt(r['relative_error'])} | "
            + " | ".join(extra)
            + f" | {r['local_se']:.3g} | {r['pools_off']}/{r['pools']} | "
            + f"{_fmt(r['fd_minus_local_t'])} | {r['verdict']} |"
        )
    return "\n".join(lines)


def machine() -> dict:
    name = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "jax_backend": jax.default_backend()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pools", type=int, default=64)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    args = ap.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    t_start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()
    wanted = args.scenarios.split(",")
    rows, timings, values, overrides = [], {}, {}, {}
    for scen in SCENARIOS:
        if scen not in wanted:
            continue
        params = list(dict.fromkeys(p for p, s, _ in ROWS if s == scen))
        outs = [next(o for q, s, o in ROWS if s == scen and q == p) for p in params]
        cfg, overrides[scen] = scenario_config(scen, args.pools, args.steps)
        print(f"[{scen}] {len(params)} params ...", file=sys.stderr, flush=True)
        m = measure(cfg, params)
        timings[scen] = m["seconds"]
        values[scen] = dict(zip(OUTPUTS, map(float, m["values"]), strict=True))
        print(f"[{scen}] {m['seconds']}", file=sys.stderr, flush=True)
        rows += rows_of(params, outs, m, scen)
    for r in rows:
        r["verdict"] = verdict(r)
    md = table(rows)
    print(md)
    result = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "command": "JAX_PLATFORMS=cpu .venv/bin/python benchmarks/gradients.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "scenario": {
            "config": "configs/quickstart.toml",
            "pools": args.pools,
            "steps": args.steps,
            "dtype": "float64",
            "seed": 0,
            "overrides": overrides,
            "blocks": BLOCKS,
            "outputs": {
                "lp_return": "mean over pools of final share price / initial − 1",
                "utilisation": "mean over pools of the time-average utilisation",
                "fee_income": "mean over pools of lending fees / initial pool value",
                "hedged_return": "mean over pools of the hedged LP's final wealth per share / "
                "initial share price − 1",
            },
            "derivative": "central finite difference at θ₀(1 ± h) with common random numbers; "
            "scalar params: d/dθ; vector params (market.open_rate, hedge.cost, hedge.penalty): "
            "d/d(scale factor of the whole vector)",
            "values_at_theta0": values,
            "table_h": TABLE_H,
            "steps_h": list(STEPS_H),
        },
        "seconds": timings,
        "wall_seconds": time.perf_counter() - t_start,
        # The machine may be shared: CPU seconds of this process (all threads) and the load
        # average (1, 5, 15 min) at the start and the end tell how much of the wall it had.
        "cpu_seconds": time.process_time() - cpu_start,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_plain(result), indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out} ({result['wall_seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
