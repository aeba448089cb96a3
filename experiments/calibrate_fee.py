"""Which lending fee maximises the LP's Sharpe ratio? A gradient fit, checked by a grid search.

Issue "Gradient calibration", item 4. The config (by default `configs/calibrate_fee.toml`:
the quickstart pool on BTC/ETH/SOL + USDC, 10 days of hourly steps) makes trader demand fall
with the fee, demand × exp(−elasticity · f · steps_per_year), so the fee trades income per
position against the number of positions. The script

1. fits the fee f (per step) by gradient: `pdlpjax.calibrate_config` with the config's
   `[calibrate]` (plain LP, objective "sharpe", sigmoid transform onto (lo, hi), Adam, fresh
   markets each step), on the model that is reported: the crowd-bucket book makes every
   event continuous in the fee, so the pathwise gradient needs no relaxation (until
   2026-12 this fit ran in a smooth mode, now removed). Each extra fee elasticity
   (`--elasticities`) is one more problem of the same fit. The same fit with the
   certainty-equivalent objective gives f_grad(CE);
2. runs a grid search: `pdlpjax.run_sweep` over the config's `[sweep]` fee grid ×
   elasticities, every fee on the same markets (common random numbers), so the Sharpe
   ratios of two fees are compared pool by pool;
3. evaluates, on held-out markets (a seed neither the fit nor the grid used, so the grid's
   winner is not scored on the markets that picked it), the Sharpe at f_grad and at f_grid,
   paired market by market;
4. evaluates the paper's fee bounds (eqs. 4-5, §2.3) at the config's κ and typical hourly
   price moves, as printed and in consistent units.

Outputs (`runs/calibrate_fee-<timestamp>/` or `--out DIR`): `fee_grid.csv` (per elasticity
and fee: Sharpe and certainty equivalent with 95% intervals, the paired Sharpe difference
from the grid optimum), `summary.json`, `sharpe_vs_fee.png`, `findings.md`, `config.toml`,
and the subfolders `calibration/` (and `calibration_ce/`) from `calibrate_config` and
`grid/` from `run_sweep`.

Everything runs in float64 (the config's dtype), kept for comparability with the earlier
smooth-mode runs (chosen when float32 smooth-mode gradients were NaN on an empty book); the
fit also runs in float32 now.

Usage:
    python experiments/calibrate_fee.py [CONFIG] [--out DIR] [--quick] [--set section.key=v]
        [--elasticities 0.5 2] [--eval-pools N] [--ce | --no-ce]
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

import pdlpjax

# A tiny version for the test: 2 days, 3 Adam steps on 4 markets, a 6-point grid on 8 markets.
QUICK = [
    "simulation.num_steps=48",
    "calibrate.steps=3",
    "calibrate.batch_pools=4",
    "calibrate.validation_pools=8",
    "calibrate.validate_every=2",
    "sweep.replicates=8",
    'sweep.params={ "pool.fee" = { linspace = [0.0, 5.0e-4, 6] } }',
]
QUICK_EVAL_POOLS = 16
# Seed offsets: the fit draws from `seed` (training) and `seed + 1_000_003` (its validation);
# the grid and the held-out evaluation get roots of their own.
GRID_SEED, EVAL_SEED = 1, 2


def fmt_fee(f: float) -> str:
    """A fee as quoted in findings.md (the test rebuilds these strings from fee_grid.csv)."""
    return f"{f:.3e}"


def fmt_num(x: float) -> str:
    """A Sharpe ratio or certainty equivalent as quoted in findings.md."""
    return f"{x:+.3f}"


def fmt_diff(x: float) -> str:
    """A paired difference: more digits, since pairing resolves differences of 1e-3."""
    return f"{x:+.4f}"


def _ci(d: dict, fmt=fmt_num) -> str:
    return f"[{fmt(d['ci95'][0])}, {fmt(d['ci95'][1])}]"


def _diff(d: dict) -> str:
    """A paired difference with its 95% interval."""
    return f"{fmt_diff(d['mean'])} {_ci(d, fmt_diff)}"


def _list(values) -> str:
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


# --------------------------------------------------------------------------- 1. gradient fit


def fit_fee(
    path: str, overrides: list[str], elasticities: list[float], objective: str, out: Path
) -> dict:
    """Fit the fee per elasticity with `calibrate_config` into `out`.

    **Returns:** `{"folder", "wall_seconds", "fits": {elasticity: {"f_grad", "f_init",
    "validation", "validation_initial", "last_iterates"}}}`.

    Several elasticities become a grid of the config, i.e. independent problems of one fit
    (one compile, vmapped); the fitted values are read back from its summary.json and the
    last iterates from calibration.csv (their spread shows how much the final value still
    moves from step to step under Adam's noisy steps).
    """
    extra = [f'calibrate.objective="{objective}"']
    if len(elasticities) > 1:
        # num_pools must divide by the grid; calibrate_config sets its own pool counts.
        extra += [
            f"market.fee_elasticity={{grid={_list(elasticities)}}}",
            f"simulation.num_pools={len(elasticities)}",
        ]
    else:
        extra.append(f"market.fee_elasticity={elasticities[0]!r}")
    cfg = pdlpjax.load_config(path, overrides + extra)
    folder = pdlpjax.calibrate_config(cfg, out, quiet=False)
    summary = json.loads((folder / "summary.json").read_text())
    with open(folder / "calibration.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["loss"] != ""]
    result = {}
    for i, prob in enumerate(summary["problems"]):
        e = prob["grid"].get("market.fee_elasticity", elasticities[0])
        path_i = [float(r["pool.fee"]) for r in rows if int(r["problem"]) == i]
        tail = np.array(path_i[-max(3, len(path_i) // 3) :])
        result[float(e)] = {
            "f_grad": prob["fitted"]["pool.fee"],
            "f_init": prob["initial"]["pool.fee"],
            "validation": prob["validation"],
            "validation_initial": prob["validation_initial"],
            "last_iterates": {
                "n": int(tail.size),
                "mean": float(tail.mean()),
                "min": float(tail.min()),
                "max": float(tail.max()),
            },
        }
    return {"folder": str(folder), "wall_seconds": summary["wall_seconds"], "fits": result}


# --------------------------------------------------------------------------- 2. grid search


def grid_search(path: str, overrides: list[str], elasticities: list[float], out: Path) -> dict:
    """Sweep over the config's fee grid × elasticities with common random numbers.

    **Returns:** `{"fees", "elasticities", "metrics": {(e, fee): {metric: per-pool array}},
    "folder", "wall_seconds"}`; replicate j of every cell is the same market.
    """
    base = pdlpjax.load_config(path, overrides)
    fees = [float(v) for v in base.sweep.params["pool.fee"].values]
    seed = base.simulation.seed + GRID_SEED
    # Both axes are sweep params: a grid left in [market] would not be counted by
    # `sweep_config` (see findings.md, pdlpjax issues).
    params = f'{{ "pool.fee" = {_list(fees)}, "market.fee_elasticity" = {_list(elasticities)} }}'
    cfg = pdlpjax.load_config(
        path,
        overrides + [f"simulation.seed={seed}", f"sweep.params={params}"],
    )
    folder = pdlpjax.run_sweep(cfg, out, quiet=False)
    summary = json.loads((folder / "summary.json").read_text())
    with open(folder / "pools.csv") as f:
        rows = list(csv.DictReader(f))
    columns = {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}
    metrics = {}
    for c, row in enumerate(summary["table"]):
        sel = columns["combination"] == c
        order = np.argsort(columns["replicate"][sel])  # align replicates across cells
        key = (float(row["params"]["market.fee_elasticity"]), float(row["params"]["pool.fee"]))
        metrics[key] = {k: v[sel][order] for k, v in columns.items()}
    return {
        "fees": fees,
        "elasticities": elasticities,
        "metrics": metrics,
        "folder": str(folder),
        "wall_seconds": summary["wall_seconds"],
        "replicates": summary["replicates"],
        "batch_pools": summary["batch_pools"],
        "seed": seed,
    }


def certainty_equivalent(m: dict, risk_aversion: float) -> np.ndarray:
    """Per-pool annualised mean − risk_aversion/2 · variance (`objective_value`'s CE)."""
    return m["ann_mean"] - 0.5 * risk_aversion * m["ann_vol"] ** 2


def grid_table(grid: dict, risk_aversion: float) -> tuple[list[dict], dict]:
    """Per (elasticity, fee): Sharpe and CE with 95% intervals, and the paired Sharpe (and CE)
    difference from the grid optimum of that elasticity. **Returns:** rows, optima."""
    rows, optima = [], {}
    for e in grid["elasticities"]:
        cells = {f: grid["metrics"][(e, f)] for f in grid["fees"]}
        sharpe = {f: pdlpjax.mean_ci(c["sharpe"]) for f, c in cells.items()}
        ce = {f: pdlpjax.mean_ci(certainty_equivalent(c, risk_aversion)) for f, c in cells.items()}
        best = max(grid["fees"], key=lambda f: sharpe[f]["mean"])
        best_ce = max(grid["fees"], key=lambda f: ce[f]["mean"])
        lo, hi = sharpe[best]["ci95"]
        optima[e] = {
            "f_grid": best,
            "sharpe": sharpe[best],
            # the fees whose mean Sharpe lies inside the optimum's (unpaired) 95% interval
            "within_interval": [f for f in grid["fees"] if lo <= sharpe[f]["mean"] <= hi],
            # the fees whose paired difference from the optimum has an interval holding 0
            "not_paired_worse": [],
            "f_grid_ce": best_ce,
            "ce": ce[best_ce],
        }
        for f, c in cells.items():
            d = pdlpjax.paired_difference(c["sharpe"], cells[best]["sharpe"])
            d_ce = pdlpjax.paired_difference(
                certainty_equivalent(c, risk_aversion),
                certainty_equivalent(cells[best_ce], risk_aversion),
            )
            if f == best or d["ci95"][1] >= 0:
                optima[e]["not_paired_worse"].append(f)
            if f in (grid["fees"][0], grid["fees"][-1]):  # how much the fee matters at all
                optima[e].setdefault("edges", []).append({"fee": f, "minus_best": d})
            rows.append(
                {
                    "elasticity": e,
                    "fee": f,
                    "fee_per_year": f * grid["steps_per_year"],
                    "sharpe": sharpe[f]["mean"],
                    "sharpe_lo": sharpe[f]["ci95"][0],
                    "sharpe_hi": sharpe[f]["ci95"][1],
                    "sharpe_minus_best": 0.0 if f == best else d["mean"],
                    "sharpe_minus_best_lo": 0.0 if f == best else d["ci95"][0],
                    "sharpe_minus_best_hi": 0.0 if f == best else d["ci95"][1],
                    "ce": ce[f]["mean"],
                    "ce_lo": ce[f]["ci95"][0],
                    "ce_hi": ce[f]["ci95"][1],
                    "ce_minus_best": 0.0 if f == best_ce else d_ce["mean"],
                    "ann_mean": float(np.nanmean(c["ann_mean"])),
                    "ann_vol": float(np.nanmean(c["ann_vol"])),
                    "fee_apr": float(np.nanmean(c["fee_apr"])),
                    "utilisation": float(np.nanmean(c["utilisation"])),
                    "open_interest": float(np.nanmean(c["open_interest"])),
                    "n": sharpe[f]["n"],
                }
            )
    return rows, optima


# --------------------------------------------------------------------------- 3. held-out check


def evaluate(
    path: str,
    overrides: list[str],
    cells: list[tuple[float, float]],
    reps: int,
    batch: int,
) -> dict[tuple[float, float], dict]:
    """Per-pool metrics of each (elasticity, fee) cell on `reps` held-out markets.

    Pool i·reps + j is cell i on market j (draw index j), so any two cells are paired market
    by market. The pools run through `pdlpjax.simulate` in batches of `batch` pools (the last
    padded by repeating its last pool): with the grid sweep's batch size the run reuses the
    sweep's compiled program instead of compiling its own.
    """
    fees = [f for _, f in cells for _ in range(reps)]
    elas = [e for e, _ in cells for _ in range(reps)]
    index = np.tile(np.arange(reps), len(cells))
    metrics: dict[str, list] = {}
    for lo in range(0, len(fees), batch):
        hi = min(lo + batch, len(fees))
        pad = batch - (hi - lo)
        cfg = pdlpjax.load_config(
            path,
            overrides
            + [
                f"simulation.num_pools={batch}",
                f"pool.fee={_list(fees[lo:hi] + fees[hi - 1 : hi] * pad)}",
                f"market.fee_elasticity={_list(elas[lo:hi] + elas[hi - 1 : hi] * pad)}",
            ],
        )
        if cfg.simulation.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        res = pdlpjax.simulate(
            pdlpjax.make_params(cfg),
            pdlpjax.make_model(cfg),
            pdlpjax.make_spec(cfg),
            seed=cfg.simulation.seed + EVAL_SEED,
            num_steps=cfg.simulation.num_steps,
            key_index=np.concatenate([index[lo:hi], np.repeat(index[hi - 1], pad)]),
        )
        for k, v in res.metrics.items():
            metrics.setdefault(k, []).append(np.asarray(v)[: hi - lo])
    joined = {k: np.concatenate(v) for k, v in metrics.items()}
    return {
        cell: {k: v[i * reps : (i + 1) * reps] for k, v in joined.items()}
        for i, cell in enumerate(cells)
    }


# --------------------------------------------------------------------------- 4. fee bounds


def fee_bounds(cfg, open_interest: float, fee: float) -> dict:
    """The paper's fee interval (§2.3, eqs. 4-5) for each risky market of `cfg`.

    Setting: L = S = L0 at p0, the price moves to p = B·p0 (B > 1) in one step. Typical B:
    exp(z·σ·√dt) for z = 1 and 2 hourly standard deviations. L0 (the long open interest, in
    tokens) is estimated from the grid: `open_interest` (time-average notional of both sides
    of every market / AUM) split over the markets in proportion to `open_rate`, halved.

    - eq. 4 (upper bound, funding arbitrage pays): as printed f ≤ κ(1 − 1/B)/L0, which
      compares a rate with an amount (its value changes with the unit of L0); in consistent
      units (the arbitrageur's share ℓ/(L0+ℓ) of the funding |γ|·L0 paid by the shorts covers
      the fee f·ℓ) f ≤ κ(1 − p0/p) = κ(1 − 1/B) < κ for every move.
    - eq. 5 (lower bound, LP profit ≥ 0 after the PDLP's swap arbitrage): needs the pool's
      swap curve G. This pool quotes swaps at the oracle (`swap_arbitrage = false`), so the
      arbitrage loss x* − pG(x*) is 0 and eq. 5 reads f ≥ 0. For the paper's Uniswap-v2
      example (G(x) = R2 x/(R1 + x), R1 the numéraire reserve) it is printed as
      f ≥ (B − 1) R1/L0, a price unless L0 is a value; with fee revenue f·ℓ·p (value) and the
      exact loss R1(√B − 1)² it is f ≥ R1(√B − 1)²/(L0 p0 · B(B − 1)).
    """
    m = cfg.market
    kappa = float(m.funding_kappa)
    vols = np.asarray(cfg.paths.vols, float)
    rates = np.asarray(m.open_rate, float)
    dt = 1.0 / cfg.simulation.steps_per_year
    value = float(cfg.pool.initial_value)
    r1 = float(np.asarray(cfg.pool.target_weights, float)[-1]) * value
    markets = []
    for i, asset in enumerate(m.assets):
        p0 = float(m.initial_prices[i])
        notional = 0.5 * open_interest * value * rates[i] / rates.sum()  # long side, numéraire
        l0 = notional / p0
        row = {
            "asset": asset,
            "hourly_vol": float(vols[i] * math.sqrt(dt)),
            "L0_tokens": l0,
            "L0_notional": notional,
            "moves": {},
        }
        for z in (1, 2):
            b = math.exp(z * vols[i] * math.sqrt(dt))
            row["moves"][f"{z}sd"] = {
                "B": b,
                "eq4_consistent": kappa * (1.0 - 1.0 / b),
                "eq4_printed_L0_tokens": kappa * (1.0 - 1.0 / b) / l0,
                "eq4_printed_L0_notional": kappa * (1.0 - 1.0 / b) / notional,
                "eq5_uniswap_printed_L0_tokens": (b - 1.0) * r1 / l0,
                "eq5_uniswap_printed_L0_notional": (b - 1.0) * r1 / notional,
                "eq5_uniswap_consistent": r1
                * (math.sqrt(b) - 1.0) ** 2
                / (notional * b * (b - 1.0)),
            }
        # The move that eq. 4 (consistent) needs before f pays the arbitrageur: 1 − 1/B ≥ f/κ.
        if fee < kappa:
            b_need = 1.0 / (1.0 - fee / kappa)
            row["eq4_move_needed_sd"] = math.log(b_need) / (vols[i] * math.sqrt(dt))
        else:
            row["eq4_move_needed_sd"] = math.inf
        markets.append(row)
    return {
        "kappa": kappa,
        "eq4_supremum": kappa,
        "eq5_this_pool": 0.0,
        "R1_numeraire": r1,
        "open_interest": open_interest,
        "fee": fee,
        "markets": markets,
    }


# --------------------------------------------------------------------------- outputs


def write_csv(path: Path, rows: list[dict]) -> None:
    """fee_grid.csv: floats at 10 significant digits (the test recomputes the optimum)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(rows[0]))
        for r in rows:
            w.writerow([f"{v:.10g}" if isinstance(v, float) else v for v in r.values()])


def plot(path: Path, rows: list[dict], result: dict) -> None:
    """sharpe_vs_fee.png: (a) Sharpe vs fee with 95% intervals at the base elasticity, f_grad
    and f_grid and the fee bounds marked; (b) the paired difference from f_grid and the
    certainty equivalent; (c) the other elasticities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result["base_elasticity"]
    elas = sorted({r["elasticity"] for r in rows})
    ncols = 3 if len(elas) > 1 else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.2))
    mine = [r for r in rows if r["elasticity"] == base]
    x = np.array([r["fee"] for r in mine])
    fit, opt = result["fits"]["sharpe"][base], result["grid"][base]
    bounds = result["bounds"]

    ax = axes[0]
    y = np.array([r["sharpe"] for r in mine])
    ax.fill_between(
        x,
        [r["sharpe_lo"] for r in mine],
        [r["sharpe_hi"] for r in mine],
        alpha=0.25,
        label="grid: 95% interval",
    )
    ax.plot(x, y, "o-", ms=3, lw=1, label="grid mean Sharpe")
    ax.axvline(fit["f_grad"], color="C3", lw=1.5, label=f"f_grad = {fmt_fee(fit['f_grad'])}")
    ax.axvline(opt["f_grid"], color="k", ls="--", lw=1, label=f"f_grid = {fmt_fee(opt['f_grid'])}")
    eq4_hi = max(mv["eq4_consistent"] for m in bounds["markets"] for mv in m["moves"].values())
    ax.axvspan(0.0, eq4_hi, color="C2", alpha=0.4, label=f"eq. 4 at 1-2 sd moves: f ≤ {eq4_hi:.1e}")
    ax.axvline(
        bounds["eq4_supremum"], color="C2", ls=":", lw=1.5, label="eq. 4 for any move: f < κ"
    )
    # κ can coincide with f_grid: name it on the axis as well
    ax.annotate(
        "κ",
        (bounds["eq4_supremum"], 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(3, -12),
        textcoords="offset points",
        color="C2",
    )
    ax.set_title(f"LP Sharpe vs fee (elasticity {base:g}); eq. 5 here: f ≥ 0")
    ax.set_xlabel("lending fee f per hour")
    ax.set_ylabel("annualised Sharpe (mean over pools)")
    ax.legend(fontsize=7, loc="best")

    ax = axes[1]
    d = np.array([r["sharpe_minus_best"] for r in mine])
    ax.fill_between(
        x,
        [r["sharpe_minus_best_lo"] for r in mine],
        [r["sharpe_minus_best_hi"] for r in mine],
        alpha=0.25,
        label="paired 95% interval",
    )
    ax.plot(x, d, "o-", ms=3, lw=1, label="Sharpe(f) − Sharpe(f_grid)")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.axvline(fit["f_grad"], color="C3", lw=1.5)
    ax.axvline(opt["f_grid"], color="k", ls="--", lw=1)
    ax.set_xlabel("lending fee f per hour")
    ax.set_ylabel("paired Sharpe difference")
    twin = ax.twinx()
    twin.plot(x, [r["ce"] for r in mine], color="C4", lw=1, label="certainty equivalent")
    best_ce = next(r for r in mine if r["fee"] == opt["f_grid_ce"])
    twin.plot([best_ce["fee"]], [best_ce["ce"]], "o", color="C4", ms=5, label="CE grid optimum")
    ce_fit = result["fits"].get("certainty_equivalent", {}).get(base)
    if ce_fit is not None:
        twin.axvline(ce_fit["f_grad"], color="C4", ls="-.", lw=1, label="f_grad (CE)")
    twin.set_ylabel("certainty equivalent (annualised)", color="C4")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower center")
    ax.set_title("paired with the grid optimum; CE objective")

    if ncols == 3:
        ax = axes[2]
        for k, e in enumerate(elas):
            sub = [r for r in rows if r["elasticity"] == e]
            ax.plot(
                [r["fee"] for r in sub],
                [r["sharpe"] for r in sub],
                "-",
                lw=1,
                color=f"C{k}",
                label=f"elasticity {e:g}",
            )
            ax.axvline(result["fits"]["sharpe"][e]["f_grad"], color=f"C{k}", lw=1.2)
            ax.axvline(result["grid"][e]["f_grid"], color=f"C{k}", ls="--", lw=1)
        ax.set_xlabel("lending fee f per hour")
        ax.set_ylabel("mean Sharpe")
        ax.set_title("other elasticities (solid: f_grad, dashed: f_grid)")
        ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def findings(result: dict) -> str:
    """findings.md: the headline figures, the fee bounds, the caveats."""
    base = result["base_elasticity"]
    fit, opt = result["fits"]["sharpe"][base], result["grid"][base]
    ev = result["heldout"][base]
    b = result["bounds"]
    spy = result["steps_per_year"]
    within = ", ".join(fmt_fee(f) for f in opt["within_interval"])
    paired = ", ".join(fmt_fee(f) for f in opt["not_paired_worse"])
    fees = result["grid_fees"]
    edges = opt["edges"]
    lines = [
        f"# {result['name']}: the LP's Sharpe-optimal lending fee, by gradient and by grid",
        "",
        f"{result['num_steps']} hourly steps; plain LP; fee elasticity {base:g} (demand × "
        f"exp(−{base:g}·f·{spy:g})). Fit: Adam, {result['calibrate']['steps']} steps × "
        f"{result['calibrate']['batch_pools']} fresh markets, pathwise gradient of the "
        f"reported model (no relaxation), sigmoid onto ({fmt_fee(result['fee_lo'])}, "
        f"{fmt_fee(result['fee_hi'])}). Grid: {len(fees)} fees from {fmt_fee(fees[0])} to "
        f"{fmt_fee(fees[-1])} × {result['grid_replicates']} markets (common random numbers). "
        f"Held-out check: {result['eval_pools']} further markets. "
        f"Wall {result['wall_seconds']:.0f} s ({result['device']}, {result['created']}).",
        "",
        "## Headline",
        "",
        f"- **f_grad = {fmt_fee(fit['f_grad'])}** per hour ({fit['f_grad'] * spy:.1%} a year "
        f"on borrowed value; from {fmt_fee(fit['f_init'])}); the last "
        f"{fit['last_iterates']['n']} iterates range over "
        f"[{fmt_fee(fit['last_iterates']['min'])}, {fmt_fee(fit['last_iterates']['max'])}].",
        f"- **f_grid = {fmt_fee(opt['f_grid'])}** per hour: grid Sharpe "
        f"{fmt_num(opt['sharpe']['mean'])} {_ci(opt['sharpe'])} (95%, over "
        f"{opt['sharpe']['n']} markets).",
        f"- Fees whose grid Sharpe lies inside that interval: {within} "
        f"({len(opt['within_interval'])} of {len(fees)}): each pool's Sharpe over "
        f"{result['num_steps']} steps is noisy. Paired on the same markets the grid resolves "
        f"the curve: Sharpe(f) − Sharpe(f_grid) is "
        + " and ".join(f"{_diff(x['minus_best'])} at f = {fmt_fee(x['fee'])}" for x in edges)
        + f", and the fees not worse than f_grid by the paired interval are {paired}.",
        f"- Held-out markets: Sharpe at f_grad {fmt_num(ev['grad']['mean'])} "
        f"{_ci(ev['grad'])}, at f_grid {fmt_num(ev['grid']['mean'])} {_ci(ev['grid'])}; "
        f"paired difference f_grad − f_grid {_diff(ev['grad_minus_grid'])} (unpaired "
        f"interval {_ci({'ci95': ev['grad_minus_grid']['unpaired_ci95']}, fmt_diff)}).",
        f"- The fit's own validation ({result['calibrate']['validation_pools']} "
        f"markets): {fmt_num(fit['validation']['mean'])} "
        f"{_ci(fit['validation'])}, at the initial fee "
        f"{fmt_num(fit['validation_initial']['mean'])}.",
    ]
    ce = result["fits"].get("certainty_equivalent", {}).get(base)
    lines.append(
        f"- Certainty equivalent (mean − {result['ce_risk_aversion']:g}/2·variance, "
        f"annualised): grid optimum {fmt_fee(opt['f_grid_ce'])} (CE "
        f"{fmt_num(opt['ce']['mean'])} {_ci(opt['ce'])})"
        + (
            f"; gradient fit {fmt_fee(ce['f_grad'])}; held-out CE at it "
            f"{fmt_num(result['heldout_ce']['grad']['mean'])} vs at the CE grid optimum "
            f"{fmt_num(result['heldout_ce']['grid']['mean'])}, paired difference "
            f"{_diff(result['heldout_ce']['grad_minus_grid'])}."
            if ce is not None
            else " (no gradient fit for it in this run: --no-ce or --quick)."
        )
    )
    others = [e for e in result["elasticities"] if e != base]
    if others:
        lines += [
            "",
            "## Other fee elasticities",
            "",
            "| elasticity | f_grad | f_grid | grid Sharpe at f_grid | held-out Sharpe at "
            "f_grad | held-out f_grad − f_grid (paired) |",
            "|---|---|---|---|---|---|",
        ]
        for e in result["elasticities"]:
            fe, oe, ee = result["fits"]["sharpe"][e], result["grid"][e], result["heldout"][e]
            lines.append(
                f"| {e:g} | {fmt_fee(fe['f_grad'])} | {fmt_fee(oe['f_grid'])} | "
                f"{fmt_num(oe['sharpe']['mean'])} {_ci(oe['sharpe'])} | "
                f"{fmt_num(ee['grad']['mean'])} {_ci(ee['grad'])} | "
                f"{_diff(ee['grad_minus_grid'])} |"
            )
        lines += [
            "",
            "A revenue-only view (income ∝ f·exp(−e·f·year)) peaks at f = 1/(e·year): "
            + ", ".join(f"{fmt_fee(1 / (e * spy))} for e = {e:g}" for e in result["elasticities"])
            + ".",
        ]
    lines += [
        "",
        "## The paper's fee bounds (§2.3, eqs. 4-5)",
        "",
        "Setting: L = S = L0 at p0; the price moves to p = B·p0 in one step. Reading of eq. 4: "
        "the funding arbitrageur's long ℓ = L0(B − 1) (eq. 3) receives its share ℓ/(L0 + ℓ) "
        "of the funding |γ| = κ(B − 1) per unit paid by the shorts; as printed the revenue "
        "omits the payers' size L0, so the bound f ≤ κ(1 − 1/B)/L0 compares a rate with an "
        "amount (its value depends on the unit of L0, table below). With the amount "
        "|γ|·L0 it is **f ≤ κ(1 − 1/B) < κ** for any move: the arbitrage of one period's price "
        "move never pays once f ≥ κ. Eq. 5 (LPs profit after the PDLP's swap arbitrage) "
        "as printed has the units of a price ((G − x/p)/(G'(0) − 1/p) is a numéraire amount, "
        "over L0 tokens); reading L0 as a notional fixes it. In this pool swaps are quoted at "
        "the oracle without delay (`swap_arbitrage = false`), so the swap-arbitrage loss is 0 "
        "and **eq. 5 reads f ≥ 0**. The paper's Uniswap-v2 example is shown for scale.",
        "",
        f"κ = {b['kappa']:g} per hour; L0 estimated from the grid's open interest at f_grid "
        f"({b['open_interest']:.3f} of AUM, both sides, all markets), split by open_rate.",
        "",
        "| market | move | B | eq. 4 consistent κ(1−1/B) | eq. 4 printed, L0 in tokens | "
        "eq. 4 printed, L0 in USDC | eq. 5 Uniswap-v2, consistent |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in b["markets"]:
        for z, mv in m["moves"].items():
            lines.append(
                f"| {m['asset']} (L0 ≈ {m['L0_tokens']:.3g} tokens) | {z} | {mv['B']:.5f} | "
                f"{mv['eq4_consistent']:.2e} | {mv['eq4_printed_L0_tokens']:.2e} | "
                f"{mv['eq4_printed_L0_notional']:.2e} | {mv['eq5_uniswap_consistent']:.2e} |"
            )
    f_hi = max(mv["eq4_consistent"] for m in b["markets"] for mv in m["moves"].values())
    f = fit["f_grad"]
    if f >= b["kappa"]:
        need = "none: f_grad ≥ κ, so no move makes it pay"
    else:
        need = ", ".join(f"{m['asset']} {m['eq4_move_needed_sd']:.1f} sd" for m in b["markets"])
    lines += [
        "",
        f"**Where the optimum sits:** f_grad = {fmt_fee(f)} and f_grid = "
        f"{fmt_fee(opt['f_grid'])} against eq. 4's {fmt_fee(f_hi)} at a 2 sd hourly move, "
        f"f_grad/κ = {f / b['kappa']:.2f}. The one-hour move eq. 4 needs before f_grad pays "
        f"the arbitrageur: {need}. So the Sharpe-optimal fee is "
        + ("above" if f > f_hi else "inside")
        + " the paper's interval [eq. 5, eq. 4] = [0, κ(1 − 1/B)] for typical moves, by a "
        f"factor of {f / f_hi:.0f}. The simulation's arbitrageur (`market.funding_arbitrage`) "
        "opens its profit-maximising size, which is positive only where f·L < |γ|·S with "
        "shorts paying (a long) or f·S < γ·L with longs paying (a short), γ = κ(L/S − p/p0) "
        "up to the funding cap: at L = S eq. 4's marginal form f < κ(B − 1), otherwise only "
        "on books skewed by ≳ f/κ (short-heavy for a long, long-heavy for a short). "
        "Eq. 5's lower bound binds only for a pool with a swap curve: the Uniswap-v2 column "
        "exceeds eq. 4 by orders of magnitude, so for such a pool the paper's interval is "
        "empty at these open interests.",
        "",
        "## Caveats and pdlpjax issues found",
        "",
        "- Each pool's Sharpe over a short horizon is noisy (sd ≈ √(steps per year / steps) "
        "per pool); compare fees by the paired intervals, not the per-fee ones.",
        "- The fit, the grid and the held-out check run the same model, the one reported "
        "(the smooth mode of earlier runs is gone). Float64 is kept for comparability with "
        "those runs.",
        "- pdlpjax bug: `sweep_config` ignores a grid of the base config in a section the sweep "
        "does not touch (e.g. `market.fee_elasticity = {grid = ...}` with a sweep over "
        "`pool.fee`): the run gets fewer pools than combinations × replicates. Here both keys "
        "are swept instead.",
        "",
        "Files: `fee_grid.csv`, `summary.json`, `sharpe_vs_fee.png`, `calibration/`, "
        + ("`calibration_ce/`, " if ce is not None else "")
        + "`grid/` (the sweep), `config.toml`.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def run(
    path: str,
    overrides: list[str],
    out: Path,
    elasticities: list[float],
    eval_pools: int,
    with_ce: bool,
) -> dict:
    """The whole experiment; writes the results folder and returns the summary."""
    t0 = time.perf_counter()
    cfg = pdlpjax.load_config(path, overrides)
    if "pool.fee" not in (cfg.calibrate.params or {}):
        raise pdlpjax.ConfigError("calibrate_fee: the config needs a free pool.fee")
    base = float(cfg.market.fee_elasticity)
    elas = [base] + [float(e) for e in elasticities if float(e) != base]
    free = cfg.calibrate.params["pool.fee"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(Path(path).read_text())
    timings = {}

    fits = {"sharpe": fit_fee(path, overrides, elas, "sharpe", out / "calibration")}
    timings["fit_sharpe"] = time.perf_counter() - t0
    if with_ce:
        fits["certainty_equivalent"] = fit_fee(
            path, overrides, [base], "certainty_equivalent", out / "calibration_ce"
        )
        timings["fit_ce"] = time.perf_counter() - t0 - sum(timings.values())

    t1 = time.perf_counter()
    grid = grid_search(path, overrides, elas, out / "grid")
    grid["steps_per_year"] = cfg.simulation.steps_per_year
    rows, optima = grid_table(grid, cfg.calibrate.ce_risk_aversion)
    write_csv(out / "fee_grid.csv", rows)
    timings["grid"] = time.perf_counter() - t1

    # Held-out check: every elasticity at f_grad and f_grid (and the CE pair at the base).
    t1 = time.perf_counter()
    cells = []
    for e in elas:
        cells += [(e, fits["sharpe"]["fits"][e]["f_grad"]), (e, optima[e]["f_grid"])]
    if with_ce:
        cells += [
            (base, fits["certainty_equivalent"]["fits"][base]["f_grad"]),
            (base, optima[base]["f_grid_ce"]),
        ]
    batch = grid["batch_pools"]
    held = evaluate(path, overrides, cells, eval_pools, batch=batch)
    timings["heldout"] = time.perf_counter() - t1
    heldout = {}
    for i, e in enumerate(elas):
        g, d = cells[2 * i], cells[2 * i + 1]
        heldout[e] = {
            "grad": pdlpjax.mean_ci(held[g]["sharpe"]),
            "grid": pdlpjax.mean_ci(held[d]["sharpe"]),
            "grad_minus_grid": pdlpjax.paired_difference(held[g]["sharpe"], held[d]["sharpe"]),
        }
    heldout_ce = None
    if with_ce:
        ra = cfg.calibrate.ce_risk_aversion
        g, d = cells[-2], cells[-1]
        ce_g, ce_d = certainty_equivalent(held[g], ra), certainty_equivalent(held[d], ra)
        heldout_ce = {
            "grad": pdlpjax.mean_ci(ce_g),
            "grid": pdlpjax.mean_ci(ce_d),
            "grad_minus_grid": pdlpjax.paired_difference(ce_g, ce_d),
        }

    oi = next(
        r["open_interest"]
        for r in rows
        if r["elasticity"] == base and r["fee"] == optima[base]["f_grid"]
    )
    bounds = fee_bounds(cfg, oi, fits["sharpe"]["fits"][base]["f_grad"])
    result = {
        "name": cfg.name,
        "base_elasticity": base,
        "elasticities": elas,
        "num_steps": cfg.simulation.num_steps,
        "steps_per_year": cfg.simulation.steps_per_year,
        "dtype": cfg.simulation.dtype,
        "fee_lo": free.lo,
        "fee_hi": free.hi,
        "calibrate": {
            "steps": cfg.calibrate.steps,
            "batch_pools": cfg.calibrate.batch_pools,
            "validation_pools": cfg.calibrate.validation_pools,
            "learning_rate": cfg.calibrate.learning_rate,
            "seed": cfg.simulation.seed,
        },
        "ce_risk_aversion": cfg.calibrate.ce_risk_aversion,
        "fits": {k: v["fits"] for k, v in fits.items()},
        "grid": optima,
        "grid_fees": grid["fees"],
        "grid_replicates": grid["replicates"],
        "grid_seed": grid["seed"],
        "eval_pools": eval_pools,
        "eval_seed": cfg.simulation.seed + EVAL_SEED,
        "heldout": heldout,
        "heldout_ce": heldout_ce,
        "bounds": bounds,
        "timings": timings,
        "wall_seconds": time.perf_counter() - t0,
        "device": str(jax.devices()[0].platform),
        "versions": {"pdlpjax": pdlpjax.__version__, "jax": jax.__version__},
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "overrides": overrides,
    }
    plot(out / "sharpe_vs_fee.png", rows, result)
    (out / "findings.md").write_text(findings(result))
    (out / "summary.json").write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    return result


def _jsonable(x):
    """JSON-safe copy: float keys (elasticities) as strings, inf/NaN as strings."""
    if isinstance(x, dict):
        return {(f"{k:g}" if isinstance(k, float) else str(k)): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float | np.floating) and not math.isfinite(x):
        return str(float(x))
    if isinstance(x, np.generic):
        return x.item()
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", default="configs/calibrate_fee.toml")
    p.add_argument("--out", default=None, help="results folder")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--quick", action="store_true", help="tiny version (the test's)")
    p.add_argument(
        "--elasticities",
        type=float,
        nargs="*",
        default=None,
        help="extra fee elasticities to fit and grid (default 0.5 2; none if --quick)",
    )
    p.add_argument(
        "--eval-pools",
        type=int,
        default=None,
        help="held-out markets per fee (default 512; 16 if --quick)",
    )
    p.add_argument(
        "--ce",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also fit the fee for the certainty equivalent (default: yes; no if "
        "--quick, whose time goes to compiling)",
    )
    args = p.parse_args(argv)
    overrides = (QUICK if args.quick else []) + args.overrides
    elas = (
        args.elasticities if args.elasticities is not None else ([] if args.quick else [0.5, 2.0])
    )
    eval_pools = args.eval_pools or (QUICK_EVAL_POOLS if args.quick else 512)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"calibrate_fee-{stamp}"
    try:
        with_ce = args.ce if args.ce is not None else not args.quick
        run(args.config, overrides, out, elas, eval_pools, with_ce)
    except pdlpjax.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((out / "findings.md").read_text())
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
