"""The simulation: one pure, unbatched step; `lax.scan` over time in chunks; `vmap` over pools.

Randomness: pool i's key is `fold_in(root, i)` (with antithetic pairs, `fold_in(root, i // 2)`
and odd pools mirror their price draws); step t's draws are `draw_noise(model, spec, pool_key,
t)`, a pure function of `fold_in(pool_key, t)`. So a pool's path depends only on (seed, pool
index, t): not on how many pools run with it nor on the chunk length, and the results are
bitwise the same either way (see `_numerics.fixed_sum` and `_chunk` for what that takes).
`rollout_from_noise` takes injected draws instead.

Compiled chunk programs are cached by the shapes, dtypes and static fields of their inputs,
so a new value of any dynamic param never recompiles (`trace_count()` tells, for tests).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._numerics import fixed_sum
from .attribution import LP_TERMS, attribution_metrics, per_share_terms
from .hedge import (
    Exposure,
    HedgeInputs,
    HedgeParams,
    HedgePlan,
    HedgeState,
    enter_hedge,
    hedge_metrics,
    hedge_step,
    init_hedge,
    model_covariance,
    pool_delta,
)
from .market import (
    Book,
    MarketParams,
    accept_trades,
    add_crowd,
    charge_fees,
    empty_book,
    funding_arbitrage,
    funding_rate,
    leave,
    liquidate,
    open_interest,
    pay_funding,
    reserved,
    side_sizes,
    trader_demand,
    unrealised_pnl,
)
from .metrics import ReturnStats, finalize_stats, init_stats, update_stats
from .paths import AbstractPathModel, PathParams
from .pool import (
    Accounts,
    PoolParams,
    PoolState,
    account_metrics,
    guard_names,
    init_accounts,
    init_pool,
    lp_flow,
    pool_value,
)
from .twm import swap_arbitrage, twm_arbitrage

__all__ = [
    "Params",
    "SimSpec",
    "SimState",
    "StepNoise",
    "Record",
    "SimResult",
    "InvalidPoolError",
    "init_state",
    "step",
    "draw_noise",
    "rollout",
    "rollout_from_noise",
    "pool_keys",
    "simulate",
    "trace_count",
    "aum",
    "lp_share_price",
    "lp_identity",
    "hedged_lp_identity",
]


class Params(eqx.Module):
    """All dynamic params of one pool (or, batched, of all pools with a leading axis)."""

    market: MarketParams
    paths: PathParams
    pool: PoolParams
    hedge: HedgeParams


class SimSpec(eqx.Module):
    """Static settings of the step: they fix shapes and control flow (changing one recompiles)."""

    num_risky: int = eqx.field(static=True)
    has_numeraire: bool = eqx.field(static=True)
    steps_per_year: float = eqx.field(static=True)
    worst_capacity: int = eqx.field(static=True)  # CVaR buffer (`metrics.worst_capacity`)
    mode: str = eqx.field(static=True, default="pdlp")  # "pdlp" | "passive"
    num_cohorts: int = eqx.field(static=True, default=16)  # K, buckets per market and side
    rebalance: bool = eqx.field(static=True, default=False)
    record_every: int = eqx.field(static=True, default=0)
    antithetic: bool = eqx.field(static=True, default=False)
    identity_tolerance: float = eqx.field(static=True, default=1e-4)
    discount: str = eqx.field(static=True, default="none")  # TWM discount function
    twm_steps: int = eqx.field(static=True, default=10)
    swap_arbitrage: bool = eqx.field(static=True, default=False)
    mask_invalid: bool = eqx.field(static=True, default=False)  # freeze pools that broke a guard
    hedge: bool = eqx.field(static=True, default=False)  # simulate the delta-hedged LP (§4)
    hedge_every: int = eqx.field(static=True, default=24)  # rebalance period, steps
    hedge_estimator: str = eqx.field(static=True, default="window")  # config.COVARIANCE_ESTIMATORS
    hedge_window: int = eqx.field(static=True, default=168)  # returns kept for the estimators
    # A pool over a block of the path model's assets ([[pools]]): their indices in it.
    market_assets: tuple | None = eqx.field(static=True, default=None)
    damping_rule: str = eqx.field(static=True, default="fixed")  # `config.DAMPING_RULES`
    coupling: str = eqx.field(static=True, default="canonical")  # ρ̂ for γ*
    stream: int = eqx.field(static=True, default=0)  # block b of [[pools]]: its own trader draws

    @property
    def hedge_plan(self) -> HedgePlan:
        """The hedged LP's static settings (`hedge.HedgePlan`)."""
        return HedgePlan(
            every=self.hedge_every,
            estimator=self.hedge_estimator,
            own=self.market_assets,
            rule=self.damping_rule,
            coupling=self.coupling,
        )

    def own_assets(self, x: Array) -> Array:
        """The pool's entries of a vector over the path model's assets."""
        return x if self.market_assets is None else x[jnp.asarray(self.market_assets)]

    @property
    def dt(self) -> float:
        return 1.0 / self.steps_per_year


class SimState(eqx.Module):
    """Evolving state of one pool."""

    t: Int[Array, ""]  # steps taken
    pool: PoolState
    book: Book
    accounts: Accounts
    path: Any  # the path model's own state
    stats: ReturnStats
    hedge: HedgeState | None = None  # the delta-hedged LP (None when `spec.hedge` is off)


class StepNoise(eqx.Module):
    """One step's draws: the path model's, then the market's (shapes r = risky markets)."""

    path: Any
    z_demand: Float[Array, "r 2"]  # noise traders' log demand
    z_leverage: Float[Array, "r 2"]  # log leverage of new trades
    z_flow: Float[Array, ""]  # LP flow


class Record(eqx.Module):
    """A thinned record (every `record_every` steps) of one pool."""

    share_price: Float[Array, "*k"]
    prices: Float[Array, "*k n"]
    reserves: Float[Array, "*k n"]
    utilisation: Float[Array, "*k"]  # value lent / pᵀR
    open_interest: Float[Array, "*k"]  # Σ δ p, numéraire
    attribution: Float[Array, "*k m"]  # running LP P&L terms per share (`LP_TERMS` order)
    hedged_share_price: Float[Array, "*k"] | None = None  # hedged LP's wealth per share


def aum(pool: PoolState, book: Book, num_risky: int) -> Float[Array, ""]:
    """Pool value: pᵀR − net unrealised trader PnL."""
    return pool_value(pool.prices, pool.reserves) - unrealised_pnl(book, pool.prices[:num_risky])


def lp_share_price(state: SimState, num_risky: int) -> Float[Array, ""]:
    """LP share price: AUM / share supply."""
    return aum(state.pool, state.book, num_risky) / state.pool.supply


def _available(pool: PoolState, book: Book, num_risky: int) -> Float[Array, " n"]:
    """R^A = R − what is lent (long tokens per asset; short numéraire)."""
    long_tokens, short_value = reserved(book)
    return pool.reserves - jnp.concatenate([long_tokens, short_value[None]])


def _utilisation(pool: PoolState, book: Book, num_risky: int) -> Float[Array, ""]:
    long_tokens, short_value = reserved(book)
    lent = fixed_sum(long_tokens * pool.prices[:num_risky]) + short_value
    return lent / pool_value(pool.prices, pool.reserves)


def init_state(params: Params, model: AbstractPathModel, spec: SimSpec) -> SimState:
    """State at t = 0 of one pool: reserves at target weights, no positions, share price 1."""
    pool = init_pool(params.market.initial_prices, params.pool, spec.has_numeraire)
    dtype = pool.prices.dtype
    book = empty_book(spec.num_risky, spec.num_cohorts, dtype)
    share_price = pool_value(pool.prices, pool.reserves) / pool.supply
    hedge = None
    if spec.hedge:
        hedge = init_hedge(
            pool.supply,
            spec.num_risky,
            spec.hedge_window,
            init_stats(share_price, spec.worst_capacity),
            dtype,
            params.paths.vols.shape[0],
        )
        r = spec.num_risky  # the LP is hedged from t = 0 (`hedge.enter_hedge`)
        hedge = enter_hedge(
            hedge,
            params.hedge,
            pool.prices[:r],
            pool_delta(pool.prices, pool.reserves, book, r),
            reserved(book)[0],
            pool.supply,
            params.pool.fee,
            model_covariance(params.paths.vols, params.paths.correlation, spec.dt),
            spec.hedge_plan,
        )
    return SimState(
        t=jnp.asarray(0, jnp.int32),
        pool=pool,
        book=book,
        accounts=init_accounts(dtype),
        path=model.init(params.paths),
        stats=init_stats(share_price, spec.worst_capacity),
        hedge=hedge,
    )


def step(
    state: SimState,
    params: Params,
    model: AbstractPathModel,
    spec: SimSpec,
    noise: StepNoise,
    clock: Int[Array, ""] | None = None,
) -> SimState:
    """Advance one pool by one step with the given draws, in the paper's order (§2.2, App. A).

    1. Oracle: prices move by the path model's log returns (numéraire fixed at 1).
    2. Liquidations: the members of each bucket whose liquidation prices the new prices
       reached (sign(η) δ (p0 − p) ≥ c) close; the pool takes their margin and absorbs any
       loss beyond it as bad debt (`market.liquidate`).
    3. Funding at γ_L = κ (L/S − p_{t+1}/p_t) (eq. 2), between longs and shorts.
    4. Lending fee f on borrowed value, from margins to the pool.
    5. LP updates: target-weight arbitrage (creation eq. 7 or redemption eq. 10 priced by the
       discount F, `twm.py`), exogenous deposits and withdrawals at the share price, and
       stale-oracle swap arbitrage (§2.3.2).
    6. Trades: the fraction 1/mean_holding of the book exits and settles against the pool;
       new demand and the funding-rate arbitrageur (eq. 3, 4) open crowds, of which the
       part that passes the collateral condition (eq. 1) and fits under the solvency
       requirement is accepted (`market.accept_trades`, `market.add_crowd`).
    Every event is continuous in the prices and the dynamic params, so the pathwise gradient
    is that of this model (the target-weight and swap arbitrage gates are the exceptions).
    In `passive` mode only step 1 runs, with reserves optionally reset to the target weights.
    With `spec.hedge`, the hedged LP then updates (`hedge.hedge_step`). The accounting
    identity (`Accounts.identity_error`) and the LP wealth identity (`lp_identity`, with
    `hedged_lp_identity` for the hedged LP; `Accounts.lp_identity_error`) are checked every
    step. `clock` is this step's index as a value shared by all pools (defaults to
    `state.t`): `simulate` passes its loop counter so that under vmap the hedge's
    rebalancing branch stays a branch.
    """
    r = spec.num_risky
    pool, book, acc = state.pool, state.book, state.accounts
    p_old = pool.prices
    aum_before = aum(pool, book, r)

    # 1. Oracle.
    path_state, market_ret = model.step(state.path, params.paths, noise.path)
    log_ret = spec.own_assets(market_ret)
    growth = jnp.exp(log_ret)
    if spec.has_numeraire:
        growth = jnp.concatenate([growth, jnp.ones((1,), growth.dtype)])
    p_new = p_old * growth
    inventory = fixed_sum((p_new - p_old) * pool.reserves)
    book_move = -(unrealised_pnl(book, p_new[:r]) - unrealised_pnl(book, p_old[:r]))
    reserves = pool.reserves
    zero = jnp.zeros((), p_new.dtype)
    fees = bad_debt = flow = zero
    liq_margin = liq_count = liq_notional = funding = exit_received = exit_paid = zero
    n_exits = n_merged = n_open = n_rejected = zero
    twm_flow = dilution = swap_pnl = n_create = n_redeem = n_swaps = zero
    late_bad_debt = zero  # bad debt of exits, after the step's supply changes
    held = pool.supply  # shares held by all but the TWM arbitrageur after its trade
    gamma = jnp.zeros((r,), p_new.dtype)  # funding rate (none in passive mode)

    if spec.mode == "passive":
        if spec.rebalance:
            reserves = params.pool.target_weights * pool_value(p_new, reserves) / p_new
            inventory = inventory + pool_value(p_new, reserves) - pool_value(p_new, pool.reserves)
        pool = PoolState(p_new, reserves, pool.supply)
    else:
        pr, pr_old = p_new[:r], p_old[:r]
        mp, pp = params.market, params.pool
        # 2. Liquidations: the members whose keys the new prices reached.
        liq = liquidate(book, pr)
        book, reserves = liq.book, reserves + liq.reserve_change
        liq_margin, liq_count, bad_debt = liq.received, liq.count, liq.bad_debt
        liq_notional = liq.notional
        # 3. Funding on the positions of the previous period.
        gamma = funding_rate(side_sizes(book), pr, pr_old, mp.funding_kappa, mp.funding_cap)
        book, funding = pay_funding(book, gamma, pr)
        # 4. Lending fees.
        book, fees = charge_fees(book, pr, pp.fee)
        reserves = reserves.at[r].add(fees)
        # 5. LP updates: target-weight arbitrage (eq. 7, 10), exogenous flows, swap arbitrage.
        pool = PoolState(p_new, reserves, pool.supply)
        if spec.discount != "none":
            twm = twm_arbitrage(
                spec.discount,
                pool,
                aum(pool, book, r),
                _available(pool, book, r),
                pp,
                spec.twm_steps,
            )
            pool = PoolState(
                p_new, pool.reserves + twm.reserve_change, pool.supply + twm.supply_change
            )
            twm_flow, dilution = twm.flow, twm.profit
            held = jnp.minimum(held, pool.supply)
            n_create, n_redeem = twm.created, twm.redeemed
        value = aum(pool, book, r)
        pool, flow = lp_flow(pool, value, _available(pool, book, r), pp, noise.z_flow, spec.dt)
        if spec.swap_arbitrage:
            change, swap_pnl, n_swaps = swap_arbitrage(pool, p_old, _available(pool, book, r), pp)
            pool = PoolState(p_new, pool.reserves + change, pool.supply)
        # 6. Trades: exits first (they free capacity), then new crowds.
        ex = leave(book, jnp.clip(1.0 / mp.mean_holding, 0.0, 1.0), pr)
        book = ex.book
        pool = PoolState(p_new, pool.reserves + ex.reserve_change, pool.supply)
        late_bad_debt = ex.bad_debt
        bad_debt = bad_debt + ex.bad_debt
        exit_received, exit_paid = ex.received, ex.paid
        n_exits = ex.count
        sd = spec.own_assets(params.paths.vols) * jnp.sqrt(spec.dt)
        z_ret = log_ret / jnp.where(sd > 0, sd, 1.0)
        notional, lev = trader_demand(
            mp,
            aum(pool, book, r),
            z_ret,
            pp.fee,
            spec.steps_per_year,
            noise.z_demand,
            noise.z_leverage,
        )
        arb = funding_arbitrage(side_sizes(book), gamma, pr, pr_old, pp.fee)
        arb_notional = jnp.where(mp.arb_leverage > 0, arb * pr[:, None], 0.0)
        arb_lev = jnp.broadcast_to(mp.arb_leverage, arb.shape)
        ok = accept_trades(
            [(notional, lev), (arb_notional, arb_lev)],
            pr,
            pool.reserves,
            book,
            mp.max_leverage,
            pp.max_utilisation,
            mp.leverage_spread,
        )
        for crowd in ok.crowds:
            book, written, merges = add_crowd(book, crowd, pr)
            n_open, n_merged = n_open + written, n_merged + merges
        n_rejected = ok.rejected

    aum_after = aum(pool, book, r)
    terms = inventory + book_move + fees - bad_debt + flow + twm_flow + swap_pnl
    violation = jnp.abs(aum_after - aum_before - terms) / jnp.maximum(jnp.abs(aum_before), 1e-30)
    stats = update_stats(state.stats, aum_after / pool.supply)
    hedge = state.hedge
    if spec.hedge:
        hedge = hedge_step(
            hedge,
            params.hedge,
            HedgeInputs(
                p_old=p_old[:r],
                p_new=p_new[:r],
                log_return=market_ret,
                funding_rate=gamma,
                share_price_old=state.stats.value,
                share_price_new=stats.value,
                supply=pool.supply,
                fee=params.pool.fee,
            ),
            state.t if clock is None else clock,
            spec.hedge_plan,
            lambda: Exposure(
                delta=pool_delta(pool.prices, pool.reserves, book, r),
                lent=reserved(book)[0],
                model_cov=model_covariance(params.paths.vols, params.paths.correlation, spec.dt),
            ),
        )
    # The LP wealth identity (`lp_identity`): the share price moves by the per-share terms,
    # each over the supply that held it, less the dilution the TWM arbitrageur was paid.
    # Those terms are the LP's P&L attribution, so the identity checks it every step.
    price_before, price_after = aum_before / state.pool.supply, aum_after / pool.supply
    share = per_share_terms(
        inventory=inventory,
        book=book_move,
        fees=fees,
        liquidated_margin=liq_margin,
        early_bad_debt=bad_debt - late_bad_debt,
        late_bad_debt=late_bad_debt,
        dilution=dilution,
        swap=swap_pnl,
        supply_before=state.pool.supply,
        supply_held=held,
        supply_after=pool.supply,
    )
    predicted = sum(share[t] for t in LP_TERMS)
    lp_violation = lp_identity(price_before, price_after, predicted)
    if spec.hedge:
        lp_violation = jnp.maximum(
            lp_violation,
            hedged_lp_identity(
                state.hedge,
                hedge,
                params.hedge,
                p_old[:r],
                p_new[:r],
                gamma,
                price_before,
                price_after,
            ),
        )
    code = _guard_code(pool, book, r, aum_after, violation, lp_violation, spec)
    first_invalid = (acc.invalid_step < 0) & (code > 0)
    worse = violation > acc.identity_error
    lp_worse = lp_violation > acc.lp_identity_error
    acc = Accounts(
        inventory_pnl=acc.inventory_pnl + inventory,
        book_pnl=acc.book_pnl + book_move,
        fees=acc.fees + fees,
        bad_debt=acc.bad_debt + bad_debt,
        lp_flows=acc.lp_flows + flow,
        twm_flows=acc.twm_flows + twm_flow,
        swap_pnl=acc.swap_pnl + swap_pnl,
        dilution=acc.dilution + dilution,
        creations=acc.creations + n_create,
        redemptions=acc.redemptions + n_redeem,
        swaps=acc.swaps + n_swaps,
        liquidated_margin=acc.liquidated_margin + liq_margin,
        exit_received=acc.exit_received + exit_received,
        exit_paid=acc.exit_paid + exit_paid,
        funding_paid=acc.funding_paid + funding,
        liquidations=acc.liquidations + liq_count,
        liquidated_notional=acc.liquidated_notional + liq_notional,
        exits=acc.exits + n_exits,
        merged=acc.merged + n_merged,
        opened=acc.opened + n_open,
        rejected=acc.rejected + n_rejected,
        utilisation_sum=acc.utilisation_sum + _utilisation(pool, book, r),
        open_interest_sum=acc.open_interest_sum + open_interest(book, p_new[:r]),
        value_sum=acc.value_sum + aum_after,
        **{f"share_{t}": getattr(acc, f"share_{t}") + share[t] for t in LP_TERMS},
        identity_error=jnp.where(worse, violation, acc.identity_error),
        identity_error_step=jnp.where(
            worse, state.t.astype(violation.dtype), acc.identity_error_step
        ),
        lp_identity_error=jnp.where(lp_worse, lp_violation, acc.lp_identity_error),
        lp_identity_error_step=jnp.where(
            lp_worse, state.t.astype(violation.dtype), acc.lp_identity_error_step
        ),
        invalid_step=jnp.where(first_invalid, state.t.astype(code.dtype), acc.invalid_step),
        invalid_code=jnp.where(first_invalid, code, acc.invalid_code),
    )
    new = SimState(
        t=state.t + 1,
        pool=pool,
        book=book,
        accounts=acc,
        path=path_state,
        stats=stats,
        hedge=hedge,
    )
    if spec.mask_invalid:  # a pool that broke a guard earlier stays frozen where it broke
        frozen = state.accounts.invalid_step >= 0
        new = jtu.tree_map(lambda a, b: jnp.where(frozen, a, b), state, new)
    return new


def _guard_code(
    pool: PoolState,
    book: Book,
    r: int,
    value: Float[Array, ""],
    violation: Float[Array, ""],
    lp_violation: Float[Array, ""],
    spec: SimSpec,
) -> Float[Array, ""]:
    """Sum of the `pool.GUARDS` codes this step breaks (0: none).

    Negative amounts are judged against 1e-6 of the pool's value, so rounding is not flagged.
    """
    finite = (
        jnp.isfinite(value)
        & jnp.all(jnp.isfinite(pool.prices))
        & jnp.all(jnp.isfinite(pool.reserves))
        & jnp.isfinite(pool.supply)
        & jnp.all(jnp.isfinite(jnp.where(book.is_open, book.margin, 0.0)))
    )
    slack = -1e-6 * jnp.abs(pool_value(pool.prices, pool.reserves))
    negative = jnp.any(pool.reserves * pool.prices < slack)
    over_lent = jnp.any(_available(pool, book, r) * pool.prices < slack)
    identity = violation > spec.identity_tolerance
    lp_identity = lp_violation > spec.identity_tolerance
    flags = [~finite, negative, over_lent, identity, lp_identity]
    return sum(f.astype(value.dtype) * c for f, c in zip(flags, (1, 2, 4, 8, 16), strict=True))


def lp_identity(
    price_before: Float[Array, ""], price_after: Float[Array, ""], predicted: Float[Array, ""]
) -> Float[Array, ""]:
    """Relative violation of the LP wealth identity in one step.

    The initial LPs hold h shares throughout (the shares of LP flows and arbitrageurs are
    others'), so their wealth is W = h·P, P = AUM / supply. One step moves it by

        ΔW = h/S₀ (inventory + book + fees − bad debt of liquidations)
             − h/S_h · dilution
             + h/S₁ (swap PnL − bad debt of exits)
             + h/S_f (LP flow − shares the flow minted × P)  [= 0: flows trade at P]

    S₀ = supply at the start (the terms before the TWM trade), S_h = the shares not the TWM
    arbitrageur's after its trade (S₀ for a creation; S₀ − σ for a redemption, whose σ the
    arbitrageur bought at P), S₁ = supply at the end (terms after the LP flows), and
    dilution = the arbitrageur's gain as the solver reports it (F·v or pᵀλ·f/(1 + f)). The
    actual ΔW comes from the state's AUM and supply, so a mint or burn at the wrong price,
    or an LP flow off the share price, breaks it while ΔAUM still balances.
    `predicted` is ΔW/h; **returns** |ΔP − ΔW/h| / |P_before| (h cancels).
    """
    return jnp.abs(price_after - price_before - predicted) / jnp.maximum(
        jnp.abs(price_before), 1e-30
    )


def hedged_lp_identity(
    old: HedgeState,
    new: HedgeState,
    params: HedgeParams,
    p_old: Float[Array, " r"],
    p_new: Float[Array, " r"],
    funding_rate: Float[Array, " r"],
    price_before: Float[Array, ""],
    price_after: Float[Array, ""],
) -> Float[Array, ""]:
    """Relative violation of the hedged LP's wealth identity in one step.

    W_h = h·P + cash, so ΔW_h = h·ΔP + π_oldᵀ(p_new − p_old) − Σ γ_L π_old p_new
    − Σ c |π_new − π_old| p_new: the unhedged LP's change (checked by `lp_identity`), the
    hedge's PnL, less its funding and trading costs, recomputed here from the positions
    and W_h read from the hedged `stats`. It checks the hedge's cash bookkeeping (a term
    lost, double-counted or booked at the wrong price), not the formulas themselves: PnL
    and funding are written as in `hedge_step` (the NumPy reference checks those).
    **Returns:** |ΔW_h − that| / max(|W_h|, h·|P|) before the step.
    """
    h = old.shares
    pnl = fixed_sum(old.position * (p_new - p_old))
    funding = fixed_sum(funding_rate * old.position * p_new)
    cost = fixed_sum(params.cost * jnp.abs(new.position - old.position) * p_new)
    hedged_change = h * (new.stats.value - old.stats.value)  # W_h = h × the hedged stats' value
    lp_change = h * (price_after - price_before)
    wealth = h * old.stats.value
    scale = jnp.maximum(jnp.maximum(jnp.abs(wealth), jnp.abs(h * price_before)), 1e-30)
    return jnp.abs(hedged_change - lp_change - pnl + funding + cost) / scale


def draw_noise(
    model: AbstractPathModel, spec: SimSpec, key: PRNGKeyArray, t: Int[Array, ""]
) -> StepNoise:
    """Step t's draws of one pool: a pure function of (pool key, t)."""
    k = jr.fold_in(key, t)
    # Five keys, as when exits were drawn: the other streams kept their draws.
    k_path, _, k_demand, k_lev, k_flow = jr.split(k, 5)
    if spec.stream:  # pools of one market share the price draws, not the traders'
        _, k_demand, k_lev, k_flow = jr.split(jr.fold_in(k, spec.stream), 4)
    dtype = model.dtype
    shape = (spec.num_risky, 2)
    return StepNoise(
        path=model.noise(k_path),
        z_demand=jr.normal(k_demand, shape, dtype),
        z_leverage=jr.normal(k_lev, shape, dtype),
        z_flow=jr.normal(k_flow, (), dtype),
    )


def _draw(
    model: AbstractPathModel,
    spec: SimSpec,
    key: PRNGKeyArray,
    flip: Bool[Array, ""],
    t: Int[Array, ""],
) -> StepNoise:
    noise = draw_noise(model, spec, key, t)
    if spec.antithetic:  # mirror the price path's draws only
        mirrored = model.antithetic(noise.path)
        path = jtu.tree_map(lambda a, b: jnp.where(flip, b, a), noise.path, mirrored)
        noise = eqx.tree_at(lambda n: n.path, noise, path)
    return noise


def _record(state: SimState, spec: SimSpec) -> Record:
    r = spec.num_risky
    return Record(
        share_price=lp_share_price(state, r),
        prices=state.pool.prices,
        reserves=state.pool.reserves,
        utilisation=_utilisation(state.pool, state.book, r),
        open_interest=open_interest(state.book, state.pool.prices[:r]),
        attribution=jnp.stack([getattr(state.accounts, f"share_{t}") for t in LP_TERMS], -1),
        hedged_share_price=state.hedge.stats.value if spec.hedge else None,
    )


def rollout(
    state: SimState,
    params: Params,
    model: AbstractPathModel,
    spec: SimSpec,
    key: PRNGKeyArray,
    flip: Bool[Array, ""],
    num_steps: int,
) -> tuple[SimState, Record | None]:
    """Run one pool `num_steps` steps from `state`, drawing noise from `key` and `state.t`.

    **Returns:** `(state, record)`; `record` has leading axis `num_steps // record_every`
    (None when `spec.record_every` is 0).
    """

    def one(s: SimState, _: None) -> tuple[SimState, None]:
        return step(s, params, model, spec, _draw(model, spec, key, flip, s.t)), None

    if not spec.record_every:
        state, _ = lax.scan(one, state, None, length=num_steps)
        return state, None

    def block(s: SimState, _: None) -> tuple[SimState, Record]:
        s, _ = lax.scan(one, s, None, length=spec.record_every)
        return s, _record(s, spec)

    return lax.scan(block, state, None, length=num_steps // spec.record_every)


def rollout_from_noise(
    state: SimState, params: Params, model: AbstractPathModel, spec: SimSpec, noise: Any
) -> tuple[SimState, Record]:
    """Run one pool over injected draws (a noise pytree with a leading time axis).

    **Returns:** `(state, record)` with a record of every step.
    """

    def one(s: SimState, n: StepNoise) -> tuple[SimState, Record]:
        s = step(s, params, model, spec, n)
        return s, _record(s, spec)

    return lax.scan(one, state, noise)


def pool_keys(seed: int, num_pools: int, antithetic: bool = False, index=None):
    """Per-pool keys `fold_in(key(seed), i)` and the antithetic flags, shapes `(num_pools,)`.

    `index` (num_pools,) gives each pool's draw index i instead of its position: pools with
    the same index see the same draws (common random numbers across a sweep's combinations).
    """
    idx = np.arange(num_pools) if index is None else np.asarray(index)
    base = idx // 2 if antithetic else idx
    root = jr.key(seed)
    keys = jax.vmap(lambda i: jr.fold_in(root, i))(jnp.asarray(base, jnp.uint32))
    flips = jnp.asarray((idx % 2 == 1) & antithetic)
    return keys, flips


# --------------------------------------------------------------------------- batched driver

_TRACES = {"count": 0}


def trace_count() -> int:
    """How many times the batched chunk function has been traced (tests use it)."""
    return _TRACES["count"]


def _chunk(
    state,
    params,
    model,
    keys,
    flips,
    num_blocks,
    start,
    *,
    spec: SimSpec,
    max_blocks: int,
    num_devices: int = 1,
):
    """Run every pool `num_blocks` blocks (a traced count) from step `start` (a traced scalar
    shared by all pools); a block is `record_every` steps followed by a record, or one step
    without records.

    The trip count is dynamic on purpose: the compiled loop body is then the same whatever
    the chunk length, so results do not depend on it (a static one-trip loop is inlined and
    fused differently, which changes rounding), and the last, shorter chunk reuses the
    program. Records go into a buffer of `max_blocks` rows; rows past `num_blocks` are unused.
    """
    _TRACES["count"] += 1

    def one_pool(s, p, k, f):
        def one(i, s):  # i: steps done, a counter shared by all pools (not vmapped)
            return step(s, p, model, spec, _draw(model, spec, k, f, s.t), start + i)

        if not spec.record_every:
            return lax.fori_loop(0, num_blocks, one, s), None

        def block(i, carry):
            s, rec = carry
            s = lax.fori_loop(
                0,
                spec.record_every,
                lambda j, s: one(i * spec.record_every + j, s),
                s,
            )
            rec = jtu.tree_map(lambda b, x: b.at[i].set(x), rec, _record(s, spec))
            return s, rec

        rec0 = jtu.tree_map(lambda x: jnp.zeros((max_blocks, *x.shape), x.dtype), _record(s, spec))
        return lax.fori_loop(0, num_blocks, block, (s, rec0))

    def batch(state, params, model, keys, flips, num_blocks, start):
        return jax.vmap(one_pool)(state, params, keys, flips)

    if num_devices == 1:
        return batch(state, params, model, keys, flips, num_blocks, start)
    # shard_map: each device runs the one-device program on its share of the pools, with no
    # collective. Results agree with one device to rounding (1e-16 relative in float64), not
    # bitwise: the multi-device compile rounds a few fused operations differently.
    pools = jax.sharding.PartitionSpec("pools")
    rep = jax.sharding.PartitionSpec()
    return jax.shard_map(
        batch,
        mesh=_mesh(num_devices),
        in_specs=(pools, pools, rep, pools, pools, rep, rep),
        out_specs=pools,
        check_vma=False,  # the record buffer starts as replicated zeros, then varies
    )(state, params, model, keys, flips, num_blocks, start)


def _mesh(num_devices: int) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.asarray(jax.devices()[:num_devices]), ("pools",))


def _init_batched(params, model, *, spec: SimSpec):
    return jax.vmap(lambda p: init_state(p, model, spec))(params)


_COMPILED: dict = {}

# Pools per compiled call on a CPU (see `simulate`): a multiple of every vector width.
POOL_BLOCK = 128


def _signature(args) -> tuple:
    leaves, treedef = jtu.tree_flatten(args)
    return treedef, tuple(
        (np.shape(x), jnp.result_type(x), str(getattr(x, "sharding", None))) for x in leaves
    )


def _shard_pools(tree: Any, num_devices: int) -> Any:
    """Place every leaf's leading (pool) axis across the first `num_devices` devices.

    With several processes (`jax.distributed.initialize`), every process holds the whole
    host array (same config, same seed) and hands each of its own devices its slice.
    """
    sharding = jax.sharding.NamedSharding(_mesh(num_devices), jax.sharding.PartitionSpec("pools"))
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jr.wrap_key_data(put(jr.key_data(x)), impl=jr.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

    return jtu.tree_map(put, tree)


def _host(x: Array) -> np.ndarray:
    """`x` as a NumPy array on this process, gathered from every process if it spans several."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _compiled(fn: Callable, args: tuple, **static: Any) -> tuple[Callable, float]:
    """AOT-compile `fn(*args, **static)` once per input signature; return it and the seconds
    spent compiling now (0 when cached)."""
    key = (fn.__name__, _signature(args), tuple(sorted(static.items())))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    exe = jax.jit(fn, static_argnames=tuple(static)).lower(*args, **static).compile()
    _COMPILED[key] = exe
    return exe, time.perf_counter() - t0


class InvalidPoolError(RuntimeError):
    """A pool broke a numerical guard (see `pool.GUARDS`); raised between chunks.

    Carries `pool` (index), `step`, `code`, and `state`: the batched state at the end of the
    chunk in which it happened (for a diagnostic snapshot).
    """

    def __init__(self, pool: int, step: int, code: float, state: SimState) -> None:
        self.pool, self.step, self.code, self.state = pool, step, code, state
        super().__init__(f"pool {pool} broke a guard at step {step}: {guard_names(code)}")


class _HeldInterrupt:
    """Holds Ctrl-C (SIGINT) until the end of the chunk that runs, then raises it there.

    A chunk's blocks run on threads, and a KeyboardInterrupt raised while the main thread
    waits in `concurrent.futures`' locks can break them ("release unlocked lock") or be lost
    (a run that exits 0 after Ctrl-C). So the signal is only noted while a chunk runs and
    raised between chunks, where the state is whole and `on_chunk` has seen it (`run_config`
    then checkpoints it). A second Ctrl-C raises at once. Only in the main thread and only
    over Python's default handler: a caller's own handler is left alone, and so is an
    ignored SIGINT (a job started in the background by a script inherits it ignored, as
    POSIX shells do; Python keeps it so): such a run goes on to its end, as it should.
    """

    def __enter__(self) -> _HeldInterrupt:
        self.hit, self.previous = False, None
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum, frame) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def check(self) -> None:
        """Raise the Ctrl-C noted during the chunk, if any."""
        if self.hit:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


@dataclass
class SimResult:
    """What `simulate` returns: final batched state, per-pool metrics (NaN for masked pools),
    record, timings, and the indices of pools masked after breaking a guard."""

    state: SimState
    metrics: dict[str, np.ndarray]
    record: Record | None
    compile_seconds: float
    run_seconds: float
    chunk_seconds: list[float] = field(default_factory=list)
    masked: np.ndarray = field(default_factory=lambda: np.zeros(0, int))


def _metrics_batched(state: SimState, params: Params, num_steps, *, spec: SimSpec):
    """Every pool's metrics from its final state (batched)."""
    metrics = finalize_stats(state.stats, spec.steps_per_year)
    if spec.mode == "pdlp":
        metrics |= account_metrics(
            state.accounts, params.pool.initial_value, num_steps, spec.steps_per_year
        )
    if spec.hedge:
        metrics |= hedge_metrics(state.hedge, metrics["sharpe"], spec.steps_per_year)
    # Passive pools too: their only term is inventory.
    final_value = jax.vmap(aum, in_axes=(0, 0, None))(state.pool, state.book, spec.num_risky)
    return metrics | attribution_metrics(
        state.accounts,
        state.stats,
        final_value,
        params.pool.initial_value,
        state.hedge if spec.hedge else None,
    )


def _default_pool_block(num_pools: int) -> int:
    """Pools per compiled call when `simulate(pool_block=None)`: `POOL_BLOCK` on a CPU, where
    it keeps results independent of the batch size. Accelerators need many pools per kernel
    to be busy: there the batch, rounded up to a multiple of `POOL_BLOCK`, runs as one block
    of at most 16,384 pools (so the batch-size invariance is only claimed on a CPU)."""
    if jax.default_backend() == "cpu":
        return POOL_BLOCK
    return min(16384, -(-num_pools // POOL_BLOCK) * POOL_BLOCK)


def _pad_pools(tree: Any, size: int) -> Any:
    """Every leaf's leading (pool) axis extended to `size` by repeating its last pool (the
    padding pools are valid pools; their results are dropped)."""

    def pad(x):
        if x.shape[0] == size:
            return x
        return x[np.minimum(np.arange(size), x.shape[0] - 1)]

    return jtu.tree_map(pad, tree)


def _split_pools(tree: Any, block: int) -> list:
    """`tree`'s leading axis (a multiple of `block`) as a list of `block`-pool slices."""
    count = jtu.tree_leaves(tree)[0].shape[0] // block
    return [jtu.tree_map(lambda x, b=b: x[b * block : (b + 1) * block], tree) for b in range(count)]


def _join_pools(parts: list, num_pools: int) -> Any:
    """The inverse of `_split_pools`, cut back to the first `num_pools` pools."""
    if len(parts) == 1:
        if jtu.tree_leaves(parts[0])[0].shape[0] == num_pools:
            return parts[0]  # unpadded (and, across processes, not touched)
        return jtu.tree_map(lambda x: x[:num_pools], parts[0])
    return jtu.tree_map(lambda *xs: jnp.concatenate(xs)[:num_pools], *parts)


def simulate(
    params: Params,
    model: AbstractPathModel,
    spec: SimSpec,
    *,
    seed: int,
    num_steps: int,
    chunk_length: int = 0,
    progress: Callable[[int, int, float, float], None] | None = None,
    on_chunk: Callable[[int, SimState, list], None] | None = None,
    resume: tuple[int, SimState, list] | None = None,
    num_devices: int = 1,
    key_index: np.ndarray | None = None,
    pool_block: int | None = None,
) -> SimResult:
    """Simulate every pool of `params` (leaves with a leading pool axis) for `num_steps`.

    The horizon runs in chunks of `chunk_length` steps (0: one chunk). After each chunk the
    numerical guards are checked: a pool that broke one raises `InvalidPoolError`, unless
    `spec.mask_invalid` (then it stays frozen, is counted in `SimResult.masked` and its
    metrics are NaN). Then `progress(done, total, run_seconds, compile_seconds)` and
    `on_chunk(done, state, records)` are called (the latter to checkpoint); a Ctrl-C during
    a chunk is raised after them (a second one at once: `_HeldInterrupt`). `resume =
    (done, state, records)` continues from such a checkpoint; the result is bitwise the same
    as an uninterrupted run. `num_devices` > 1 shards the pool axis over that many devices
    (`jax.shard_map`; results agree with one device to rounding). `key_index` (num_pools,)
    sets each pool's draw index (default: its position; see `pool_keys`). Compilation is
    timed apart from running.

    On one device the pools run in blocks of `pool_block` (default `POOL_BLOCK` on a CPU),
    the last one padded, all through one compiled program. Pool i is then always lane
    i mod `pool_block` of the same executable, whatever the number of pools, so its results
    are bitwise the same for any batch size on any CPU. (XLA's vectorised loops round a
    partial last vector differently from full ones on some CPUs, e.g. with AVX-512, so a
    program whose pool axis is the batch size cannot promise that.) The blocks of a chunk
    run on a thread per core. `pool_block = 0` runs all pools as one block, unpadded. With
    `num_devices` > 1 the pools run as one block.
    """
    num_pools = jtu.tree_leaves(params)[0].shape[0]
    keys, flips = pool_keys(seed, num_pools, spec.antithetic, key_index)
    if num_devices > 1:
        if num_devices > len(jax.devices()) or num_pools % num_devices:
            raise ValueError(
                f"cannot shard {num_pools} pools over {num_devices} of "
                f"{len(jax.devices())} devices (pools must divide evenly)"
            )
        block = num_pools
    else:
        if pool_block is not None and pool_block < 0:
            raise ValueError(f"pool_block must be >= 0 (0: one block), got {pool_block}")
        block = _default_pool_block(num_pools) if pool_block is None else pool_block
        block = block or num_pools
    padded = -(-num_pools // block) * block
    parts = _split_pools(_pad_pools((params, keys, flips), padded), block)
    if num_devices > 1:
        parts = [_shard_pools(part, num_devices) for part in parts]
    chunk_length = chunk_length or num_steps
    init_fn, compile_s = _compiled(_init_batched, (parts[0][0], model), spec=spec)
    states = [init_fn(p, model) for p, _, _ in parts]
    records, chunk_seconds = [], []
    t_run = 0.0
    done = 0
    if resume is not None:
        done, saved, records = resume
        full = _pad_pools(_restore(_join_pools(states, num_pools), saved), padded)
        states = _split_pools(full, block)
        if num_devices > 1:
            states = [_shard_pools(s, num_devices) for s in states]
    unit = spec.record_every or 1
    # Without a record the chunk program does not depend on the chunk length at all (one
    # executable for every chunk length); with one, its record buffer has a row per block.
    max_blocks = chunk_length // unit if spec.record_every else 0
    with _HeldInterrupt() as held:
        while done < num_steps:
            length = min(chunk_length, num_steps - done)
            blocks = jnp.asarray(length // unit, jnp.int32)
            start = jnp.asarray(done, jnp.int32)
            p0, k0, f0 = parts[0]
            args = (states[0], p0, model, k0, f0, blocks, start)
            fn, c = _compiled(
                _chunk, args, spec=spec, max_blocks=max_blocks, num_devices=num_devices
            )
            compile_s += c
            t0 = time.perf_counter()

            def run_block(b, fn=fn, states=states, blocks=blocks, start=start):
                p, k, f = parts[b]
                return jax.block_until_ready(fn(states[b], p, model, k, f, blocks, start))

            # Blocks are independent: run them on a thread per core (XLA does not split one small
            # block's loops over cores as it does one large batch's).
            if len(parts) > 1:
                with ThreadPoolExecutor(min(len(parts), os.cpu_count() or 1)) as pool:
                    outs = list(pool.map(run_block, range(len(parts))))
            else:
                outs = [run_block(0)]
            states = [s for s, _ in outs]
            dt = time.perf_counter() - t0
            t_run += dt
            chunk_seconds.append(dt)
            if spec.record_every:
                rows = length // unit

                def rows_of(*xs, rows=rows):
                    return np.concatenate([_host(x)[:, :rows] for x in xs])[:num_pools]

                records.append(jtu.tree_map(rows_of, *[r for _, r in outs]))
            done += length
            if not spec.mask_invalid:  # the guards read one small field per block, not the state
                invalid = np.concatenate([_host(s.accounts.invalid_step) for s in states])
                invalid = invalid[:num_pools]
                if np.any(invalid >= 0):
                    state = _join_pools(states, num_pools)
                    bad = np.flatnonzero(invalid >= 0)
                    first = int(bad[np.argmin(invalid[bad])])
                    code = float(_host(state.accounts.invalid_code)[first])
                    raise InvalidPoolError(first, int(invalid[first]), code, state)
            if progress is not None:
                progress(done, num_steps, t_run, compile_s)
            if on_chunk is not None:
                on_chunk(done, _join_pools(states, num_pools), records)
            held.check()
    state = _join_pools(states, num_pools)
    # The metrics too go through one compiled program per block: an eager computation on
    # the whole batch would round by the batch size again.
    steps = jnp.asarray(num_steps, jnp.int32)
    metrics_fn, c = _compiled(_metrics_batched, (states[0], parts[0][0], steps), spec=spec)
    compile_s += c
    per_block = [metrics_fn(s, p[0], steps) for s, p in zip(states, parts, strict=True)]
    metrics = _join_pools(per_block, num_pools)
    invalid = _host(state.accounts.invalid_step) >= 0  # one transfer, not one per metric
    masked = np.flatnonzero(invalid)
    metrics = {k: np.where(invalid, np.nan, _host(v)) for k, v in metrics.items()}
    record = None
    if records:
        record = jtu.tree_map(lambda *xs: np.concatenate(xs, axis=1), *records)
    return SimResult(state, metrics, record, compile_s, t_run, chunk_seconds, masked)


def _restore(template: SimState, saved: SimState | list) -> SimState:
    """`saved` (a state or its list of leaves) checked against the shapes and dtypes of
    `template`, as device arrays."""
    leaves, treedef = jtu.tree_flatten(template)
    new = saved if isinstance(saved, list) else jtu.tree_leaves(saved)
    if len(new) != len(leaves):
        raise ValueError(f"checkpoint has {len(new)} arrays, the run needs {len(leaves)}")
    for a, b in zip(leaves, new, strict=True):
        if np.shape(a) != np.shape(b) or jnp.result_type(a) != np.asarray(b).dtype:
            raise ValueError(
                f"checkpoint array {np.shape(b)} {np.asarray(b).dtype} does not match the run's "
                f"{np.shape(a)} {jnp.result_type(a)}"
            )
    return jtu.tree_unflatten(treedef, [jnp.asarray(x) for x in new])
