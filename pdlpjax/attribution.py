"""P&L attribution: where an LP's return came from, term by term.

Two views, each a set of terms that add up to its total:

- **The LP's return** (`LP_TERMS`), per share of an LP who held from t = 0 to the end, as a
  fraction of the share price at t = 0. It is the LP wealth identity (`simulate.lp_identity`)
  summed over the steps: each step's AUM terms divided by the share supply that held them.
  `total` is `total_return`. LP deposits and withdrawals trade at the share price, so they
  are not in this view (they change who holds, not what a share earns); the target-weight
  arbitrageurs' mints and burns show only as the `dilution` they were paid. With the hedge
  on, the hedge's PnL, funding and costs follow, and `total` is the hedged LP's return from
  its wealth before the hedge's entry cost (`hedged_total_return` starts after that cost).
- **The pool's value** (`POOL_TERMS`), in numéraire, as a fraction of the initial value: the
  accounting identity summed over the steps, so `total` = (AUM_T − AUM_0) / AUM_0 and the
  capital that LP flows and target-weight trades brought in or took out is a term.

Term meanings (both views; signed, gains to the pool positive):
- `inventory`: (p_{t+1} − p_t)ᵀR, the price exposure of the reserves.
- `trader_pnl`: the pool's mark-to-market gain against traders' positions (minus the change
  of their unrealised PnL from price moves), less the margin liquidations seized. Summed over
  a run (pool view) it is a cash basis: what exiting traders paid the pool less what it paid
  them, minus the open book's unrealised PnL at the end, plus the losses beyond margin (which
  `bad_debt` takes back); `tests/test_attribution.py` checks that from the final book.
- `fees`: lending (borrow) fees. `funding`: none, since funding (eq. 2) passes between
  longs and shorts and never reaches the pool, so the views have no funding term.
- `liquidated_margin`: margin the pool took from liquidated positions.
- `bad_debt`: losses of liquidated or exiting positions beyond their margin (≤ 0).
- `dilution`: value existing LPs gave target-weight arbitrageurs (eq. 7, 10; ≤ 0 when F ≥ 0).
- `swap_arbitrage`: the pool's loss to stale-oracle swap arbitrage (§2.3.2; ≤ 0).
- `lp_flows`, `twm_flows` (pool view only): net LP deposits and the target-weight trades'
  assets in − out.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Array, Float

from .metrics import mean_ci

__all__ = [
    "LP_TERMS",
    "HEDGE_TERMS",
    "POOL_TERMS",
    "per_share_terms",
    "attribution_metrics",
    "summarise_attribution",
]

# Order of the LP view's terms; `Accounts.share_<term>` holds each per share, in numéraire.
LP_TERMS = (
    "inventory",
    "trader_pnl",
    "fees",
    "liquidated_margin",
    "bad_debt",
    "dilution",
    "swap_arbitrage",
)
HEDGE_TERMS = ("hedge_pnl", "hedge_funding", "hedge_costs")
POOL_TERMS = (
    "inventory",
    "trader_pnl",
    "fees",
    "liquidated_margin",
    "bad_debt",
    "swap_arbitrage",
    "lp_flows",
    "twm_flows",
)


def per_share_terms(
    *,
    inventory: Float[Array, ""],
    book: Float[Array, ""],
    fees: Float[Array, ""],
    liquidated_margin: Float[Array, ""],
    early_bad_debt: Float[Array, ""],
    late_bad_debt: Float[Array, ""],
    dilution: Float[Array, ""],
    swap: Float[Array, ""],
    supply_before: Float[Array, ""],
    supply_held: Float[Array, ""],
    supply_after: Float[Array, ""],
) -> dict[str, Float[Array, ""]]:
    """One step's LP terms per share (numéraire), keyed by `LP_TERMS`; their sum is ΔW/h of
    `simulate.lp_identity`.

    Terms before the target-weight trade (the price move, liquidations, fees) are shared by
    `supply_before`; the arbitrageur's `dilution` by the shares not its own (`supply_held`);
    terms after the LP flows (swap arbitrage, exits' `late_bad_debt`) by `supply_after`.
    `book` is the whole mark-to-market change; `liquidated_margin` is split out of it.
    """
    return {
        "inventory": inventory / supply_before,
        "trader_pnl": (book - liquidated_margin) / supply_before,
        "fees": fees / supply_before,
        "liquidated_margin": liquidated_margin / supply_before,
        "bad_debt": -early_bad_debt / supply_before - late_bad_debt / supply_after,
        "dilution": -dilution / supply_held,
        "swap_arbitrage": swap / supply_after,
    }


def attribution_metrics(
    accounts, stats, final_value: Float[Array, "*b"], initial_supply: Float[Array, "*b"], hedge=None
) -> dict[str, Array]:
    """Per-pool attribution metrics from the final state's parts (batched or not).

    **Arguments:** `accounts` (`pool.Accounts`), `stats` (the LP's `metrics.ReturnStats`),
    `final_value` (AUM at the end), `initial_supply` (the share supply at t = 0), `hedge`
    (`hedge.HedgeState` or None).
    **Returns:** `attr_<term>` for `LP_TERMS` (and `HEDGE_TERMS` when hedged) and `attr_total`
    (fractions of the initial share price); `pool_<term>` for `POOL_TERMS` and `pool_total`
    (fractions of AUM_0 = the initial share price × the initial supply).
    """
    p0 = stats.initial_value
    out = {f"attr_{t}": getattr(accounts, f"share_{t}") / p0 for t in LP_TERMS}
    total = stats.value / p0 - 1.0
    if hedge is not None:
        # From the wealth before the hedge's entry cost (h·P₀), so that the cost is a term;
        # `hedged_total_return` starts after it (`hedge.enter_hedge`).
        initial = hedge.shares * p0
        out["attr_hedge_pnl"] = hedge.pnl / initial
        out["attr_hedge_funding"] = -hedge.funding / initial
        out["attr_hedge_costs"] = -hedge.costs / initial
        total = hedge.stats.value / p0 - 1.0
    out["attr_total"] = total
    a = accounts
    initial_value = p0 * initial_supply
    pool = {
        "inventory": a.inventory_pnl,
        "trader_pnl": a.book_pnl - a.liquidated_margin,
        "fees": a.fees,
        "liquidated_margin": a.liquidated_margin,
        "bad_debt": -a.bad_debt,
        "swap_arbitrage": a.swap_pnl,
        "lp_flows": a.lp_flows,
        "twm_flows": a.twm_flows,
    }
    out |= {f"pool_{k}": v / initial_value for k, v in pool.items()}
    out["pool_total"] = final_value / initial_value - 1.0
    return out


def summarise_attribution(metrics: dict[str, np.ndarray]) -> dict:
    """The `attribution` section of summary.json from per-pool `metrics` (NaN for masked
    pools, which are left out of every mean).

    **Returns:** `{"lp_return": view, "pool_value": view}`, each view `{"basis", "terms":
    {term: mean_ci}, "total": mean_ci, "sum_of_term_means", "max_abs_residual"}`, where the
    residual is |Σ terms − total| per pool (float rounding; the identities bound it).
    """
    lp_terms = [t for t in (*LP_TERMS, *HEDGE_TERMS) if f"attr_{t}" in metrics]
    hedged = "attr_hedge_pnl" in metrics
    views = {
        "lp_return": (
            "attr_",
            lp_terms,
            metrics.get("attr_total"),
            "return of an LP who held from t = 0 to the end (hedged LP: with its hedge), "
            "fraction of the initial share price",
        ),
        "pool_value": (
            "pool_",
            list(POOL_TERMS),
            metrics.get("pool_total"),
            "change of the pool's value (AUM_T - AUM_0) / AUM_0, LP and arbitrage capital "
            "flows included",
        ),
    }
    out = {"hedged": hedged}
    for name, (prefix, terms, total, basis) in views.items():
        if total is None:
            continue
        keep = np.isfinite(total)
        parts = np.stack([np.asarray(metrics[prefix + t], float)[keep] for t in terms])
        tot = np.asarray(total, float)[keep]
        residual = np.abs(parts.sum(axis=0) - tot)
        out[name] = {
            "basis": basis,
            "terms": {t: mean_ci(metrics[prefix + t]) for t in terms},
            "total": mean_ci(total),
            "sum_of_term_means": float(parts.mean(axis=1).sum()) if tot.size else float("nan"),
            "max_abs_residual": float(residual.max()) if tot.size else float("nan"),
        }
    return out
