"""The pool's portfolio: reserves, LP shares, weights w(p, R), value, LP flows and accounts.

Pool value (AUM) = pᵀR − net unrealised trader PnL (the pool is the traders' counterparty);
LP share price = AUM / share supply. `Accounts` keeps the running sum of every term that
moves AUM, so that each step ΔAUM = inventory + book + fees − bad debt + LP flows (the
accounting identity of DESIGN.md), checked step by step. A second identity, on the wealth
of the initial LPs (share price × the shares they hold), sees what the first cannot: the
supply that mints, burns and LP flows change, and the dilution paid to arbitrageurs (see
`simulate.lp_identity`).
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._numerics import fixed_sum

__all__ = [
    "PoolParams",
    "PoolState",
    "Accounts",
    "init_pool",
    "init_accounts",
    "pool_value",
    "weights",
    "with_numeraire",
    "lp_flow",
    "account_metrics",
    "GUARDS",
    "guard_names",
]


class PoolParams(eqx.Module):
    """`[pool]` dynamic params of one pool."""

    initial_value: Float[Array, ""]  # numéraire at t = 0
    target_weights: Float[Array, " n"]  # w*, numéraire last
    fee: Float[Array, ""]  # lending fee f per step on borrowed value
    max_utilisation: Float[Array, ""]  # lent ≤ this fraction of each reserve
    lp_flow_drift: Float[Array, ""]  # net LP deposits, fraction of AUM per year
    lp_flow_vol: Float[Array, ""]  # sd of LP flows, fraction of AUM per √year
    discount_base: Float[Array, ""]  # γ_b of eq. 11 (GMX: mint/burn fee)
    discount_tax: Float[Array, ""]  # γ_t of eq. 11 (GMX: tax)
    discount_temperature: Float[Array, ""]  # of the smooth discount
    twm_mu: Float[Array, ""]  # surrogate modulus μ, in value fractions of AUM
    twm_capital: Float[Array, ""]  # arbitrageur's capital per asset, fraction of AUM
    twm_cost: Float[Array, ""]  # arbitrageurs act when profit > this fraction of AUM
    swap_fee: Float[Array, ""]  # GMX base swap fee (fraction)


class PoolState(eqx.Module):
    """One pool: `prices` and `reserves` (num_assets,; numéraire last), LP `supply` ()."""

    prices: Float[Array, " n"]
    reserves: Float[Array, " n"]
    supply: Float[Array, ""]


class Accounts(eqx.Module):
    """Running totals of one pool (value in numéraire unless a count).

    The identity terms: `inventory_pnl` ((p_{t+1} − p_t)ᵀR), `book_pnl` (minus the change of
    unrealised trader PnL from the price move), `fees`, `bad_debt` (subtracted), `lp_flows`
    (deposits − withdrawals), `twm_flows` and `swap_pnl`. The rest is detail: margin taken at
    liquidations and exits, profits paid to traders, funding paid between traders, event
    counts, time sums for averages, and the largest relative violations of the accounting
    identity and of the LP wealth identity, with their steps. `share_<term>` are the LP's
    P&L terms per share (`attribution.LP_TERMS`, signed: gains positive), which add up to the
    share price's change.
    """

    inventory_pnl: Float[Array, ""]
    book_pnl: Float[Array, ""]
    fees: Float[Array, ""]
    bad_debt: Float[Array, ""]
    lp_flows: Float[Array, ""]
    twm_flows: Float[Array, ""]  # assets in − out through creation/redemption arbitrage
    swap_pnl: Float[Array, ""]  # pool's loss to stale-oracle swap arbitrage (≤ 0)
    dilution: Float[Array, ""]  # value existing LPs gave TWM arbitrageurs (≥ 0 when F ≥ 0)
    creations: Float[Array, ""]
    redemptions: Float[Array, ""]
    swaps: Float[Array, ""]
    liquidated_margin: Float[Array, ""]
    exit_received: Float[Array, ""]
    exit_paid: Float[Array, ""]
    funding_paid: Float[Array, ""]
    liquidations: Float[Array, ""]  # positions: crowd-equivalents liquidated
    liquidated_notional: Float[Array, ""]  # value: Σ δ p of what was liquidated
    exits: Float[Array, ""]  # crowd-equivalents that left
    merged: Float[Array, ""]  # merges of a full book (`market.add_crowd`)
    opened: Float[Array, ""]  # crowds written
    rejected: Float[Array, ""]  # requests refused, counting a part-accepted one by its share
    utilisation_sum: Float[Array, ""]
    open_interest_sum: Float[Array, ""]
    value_sum: Float[Array, ""]
    share_inventory: Float[Array, ""]
    share_trader_pnl: Float[Array, ""]
    share_fees: Float[Array, ""]
    share_liquidated_margin: Float[Array, ""]
    share_bad_debt: Float[Array, ""]
    share_dilution: Float[Array, ""]
    share_swap_arbitrage: Float[Array, ""]
    identity_error: Float[Array, ""]
    identity_error_step: Float[Array, ""]
    lp_identity_error: Float[Array, ""]  # largest relative violation of the LP identity
    lp_identity_error_step: Float[Array, ""]
    invalid_step: Float[Array, ""]  # first step that broke a guard (−1: none)
    invalid_code: Float[Array, ""]  # what broke then: sum of `GUARDS` codes


# Numerical guards checked every step: code → what broke.
GUARDS = {
    1: "a non-finite value (NaN or inf) in prices, reserves, supply, margins or AUM",
    2: "a negative reserve",
    4: "lent above the available reserves",
    8: "the accounting identity beyond simulation.identity_tolerance",
    16: "the LP wealth identity (share price × supply; hedged LP) beyond "
    "simulation.identity_tolerance",
}


def guard_names(code: float) -> str:
    """The guards a code names, joined by "; "."""
    return "; ".join(v for k, v in GUARDS.items() if int(code) & k)


def init_accounts(dtype) -> Accounts:
    """All totals zero; no guard broken."""
    zero = jnp.zeros((), dtype)
    fields = {f: zero for f in Accounts.__dataclass_fields__}
    fields["invalid_step"] = jnp.full((), -1.0, dtype)
    return Accounts(**fields)


def with_numeraire(risky: Float[Array, " r"], has_numeraire: bool) -> Float[Array, " n"]:
    """Append the numéraire's price 1 when the pool has one."""
    if not has_numeraire:
        return risky
    return jnp.concatenate([risky, jnp.ones((1,), risky.dtype)])


def pool_value(prices: Float[Array, " n"], reserves: Float[Array, " n"]) -> Float[Array, ""]:
    """pᵀR, the value of the reserves in numéraire."""
    return fixed_sum(prices * reserves)


def weights(prices: Float[Array, " n"], reserves: Float[Array, " n"]) -> Float[Array, " n"]:
    """w(p, R) = p ⊙ R / pᵀR (Chitra et al. §3.1)."""
    v = prices * reserves
    return v / fixed_sum(v)


def init_pool(
    initial_prices: Float[Array, " r"], pool: PoolParams, has_numeraire: bool
) -> PoolState:
    """Reserves at the target weights worth `initial_value`; share price 1."""
    prices = with_numeraire(initial_prices, has_numeraire)
    reserves = pool.target_weights * pool.initial_value / prices
    return PoolState(prices=prices, reserves=reserves, supply=pool.initial_value)


def lp_flow(
    state: PoolState,
    aum: Float[Array, ""],
    available: Float[Array, " n"],
    params: PoolParams,
    z: Float[Array, ""],
    dt: float,
) -> tuple[PoolState, Float[Array, ""]]:
    """Exogenous LP deposits and withdrawals at the current share price (§2.2 step 5).

    The net flow is a fraction φ = drift·dt + vol·√dt·z of AUM. A deposit brings assets at the
    target weights; a withdrawal takes assets in proportion to the available value p ⊙ R^A and
    is capped at 99% of it (lent assets cannot leave). Shares are minted or burnt at AUM /
    supply, so the share price does not move.
    **Returns:** the new state and the net flow (deposits − withdrawals, numéraire).
    """
    phi = params.lp_flow_drift * dt + params.lp_flow_vol * jnp.sqrt(dt) * z
    available = jnp.maximum(available, 0.0)
    avail_value = fixed_sum(state.prices * available)
    deposit = jnp.maximum(phi, 0.0) * aum
    withdraw = jnp.minimum(jnp.maximum(-phi, 0.0) * aum, 0.99 * avail_value)
    # × reciprocal, not ÷ a broadcast scalar: see `market.accept_trades`.
    out_share = available * (1.0 / jnp.where(avail_value > 0, avail_value, 1.0))
    reserves = (
        state.reserves + deposit * params.target_weights / state.prices - withdraw * out_share
    )
    flow = deposit - withdraw
    supply = state.supply + flow / (aum / state.supply)
    return PoolState(state.prices, reserves, supply), flow


def account_metrics(
    acc: Accounts, initial_value: Float[Array, "*b"], num_steps: int, steps_per_year: float
) -> dict[str, Array]:
    """Per-pool figures from the accounts (batched or not).

    **Returns:** `utilisation` and `open_interest` (time averages; open interest as a fraction
    of average AUM), `fee_income` (numéraire), `fee_apr` (fees / average AUM per year),
    `liquidations` (positions: crowd-equivalents), `liquidated_value` (their notional at the
    liquidation prices, fraction of initial value), `bad_debt` (fraction of initial value),
    `funding_paid` (numéraire),
    `rejected` and `opened` trades, `dilution` and `swap_loss` (fractions of initial value
    given to TWM and swap arbitrageurs), `creations`, `redemptions`, `identity_error` and
    `lp_identity_error` (largest relative violations of the two identities).
    """
    avg_value = acc.value_sum / num_steps
    years = num_steps / steps_per_year
    safe = jnp.where(avg_value > 0, avg_value, 1.0)
    return {
        "utilisation": acc.utilisation_sum / num_steps,
        "open_interest": acc.open_interest_sum / num_steps / safe,
        "fee_income": acc.fees,
        "fee_apr": acc.fees / safe / years,
        "liquidations": acc.liquidations,
        "liquidated_value": acc.liquidated_notional / initial_value,
        "bad_debt": acc.bad_debt / initial_value,
        "funding_paid": acc.funding_paid,
        "opened": acc.opened,
        "rejected": acc.rejected,
        "dilution": acc.dilution / initial_value,
        "swap_loss": -acc.swap_pnl / initial_value,
        "creations": acc.creations,
        "redemptions": acc.redemptions,
        "identity_error": acc.identity_error,
        "lp_identity_error": acc.lp_identity_error,
    }
