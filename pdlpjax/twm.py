"""The target-weight mechanism inside the step (Chitra et al. §3; DESIGN step 5).

Each step, after liquidations, funding and fees, an arbitrageur looks at the pool's discount
function F and does the more profitable of
- share creation (eq. 7): deposit δ (0 ≤ δ, each asset at most `twm_capital` of AUM: a
  mint deposits; eq. 7 allows δ ≥ −R^A) and receive shares worth (1 + F)·pᵀδ;
- share redemption (eq. 10): buy σ shares at the share price and redeem them for λ
  (0 ≤ λ ≤ R^A, each asset at most `twm_capital` of AUM) with pᵀλ = (1 + F(−λ))·σ·(share
  price);
if its profit exceeds `twm_cost` of AUM. Shares are minted and burnt so that the profit the
solver maximises is the profit the arbitrageur receives (`twm_settle`). Existing LPs pay it
through dilution: AUM moves by the assets that come in or go out (`twm_flows`, an identity
term) while the share price moves by −profit / S_h (`dilution`, reported), S_h the shares
held by everyone else after the trade (S for a creation, S − σ for a redemption).

The solvers work in *value fractions* x = p ⊙ δ / AUM, so that μ (`twm_mu`, the surrogate's
strong-concavity modulus, δ_H = g/μ) and the step sizes do not depend on the pool's size or
on asset prices.

Then, with `swap_arbitrage`, the pool's swaps are quoted at the previous step's oracle
prices while the market has moved to the new ones (the latency of §2.3.2): for each risky
asset against the numéraire, an arbitrageur swaps when the move beats GMX's dynamic swap fee
(`swap_arbitrage_oracle`); the LP loses the arbitrageur's profit (`swap_pnl`).
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._numerics import fixed_sum
from .arbitrage import create_arbitrage, redeem_arbitrage, swap_arbitrage_oracle
from .discount import (
    discount_subgradient,
    glp_discount,
    glp_discount_axiomatic,
    glp_discount_smooth,
    gmx_discount,
)
from .pool import PoolParams, PoolState

__all__ = [
    "DISCOUNTS",
    "TwmResult",
    "discount_function",
    "twm_arbitrage",
    "twm_settle",
    "swap_arbitrage",
]

DISCOUNTS = ("none", "glp", "glp_axiomatic", "glp_smooth", "gmx")


def discount_function(
    kind: str, prices: Float[Array, " n"], reserves: Float[Array, " n"], params: PoolParams
) -> Callable[[Float[Array, " n"]], Float[Array, ""]]:
    """F(δ) of the configured kind at the pool's prices and reserves (δ in tokens).

    "glp": eq. 11 as printed; "glp_axiomatic": its variant with F(0) = 0; "glp_smooth": eq.
    11 relaxed at `discount_temperature`; "gmx": GMX v1 mint/burn fees as −fee/10⁴ (never
    positive, so it never pays an arbitrageur). γ_b, γ_t are `discount_base`, `discount_tax`.
    """
    w, base, tax = params.target_weights, params.discount_base, params.discount_tax
    match kind:
        case "glp":
            return lambda d: glp_discount(prices, w, reserves, d, base, tax)
        case "glp_axiomatic":
            return lambda d: glp_discount_axiomatic(prices, w, reserves, d, base, tax)
        case "glp_smooth":
            temp = params.discount_temperature
            return lambda d: glp_discount_smooth(prices, w, reserves, d, base, tax, temp)
        case "gmx":
            return lambda d: gmx_discount(
                prices, w, reserves, d, mint_burn_bps=base * 1e4, tax_bps=tax * 1e4
            )
    raise ValueError(f"unknown discount {kind!r}; expected one of {DISCOUNTS}")


class TwmResult(eqx.Module):
    """What the arbitrageur did this step (numéraire values)."""

    reserve_change: Float[Array, " n"]  # tokens
    supply_change: Float[Array, ""]
    flow: Float[Array, ""]  # assets in − assets out, at current prices (ΔAUM)
    profit: Float[Array, ""]  # = dilution of the existing LPs
    created: Float[Array, ""]  # 1 if a creation happened
    redeemed: Float[Array, ""]  # 1 if a redemption happened


def twm_arbitrage(
    kind: str,
    state: PoolState,
    value: Float[Array, ""],
    available: Float[Array, " n"],
    params: PoolParams,
    num_steps: int,
) -> TwmResult:
    """One step of target-weight arbitrage on one pool (see the module docstring).

    **Arguments:** `kind` (static, one of `DISCOUNTS` but "none"); the pool `state`; its AUM
    `value`; `available` R^A (tokens, `(n,)`); `params`; `num_steps` of the solvers (static).
    """
    p, r = state.prices, state.reserves
    scale = jnp.maximum(value, jnp.finfo(p.dtype).tiny)
    to_tokens = scale / p
    F = discount_function(kind, p, r, params)

    def F_x(x):
        return F(x * to_tokens)

    ones = jnp.ones_like(p) * scale  # pᵀδ = AUM · Σx
    avail_x = jnp.maximum(available, 0.0) * p / scale
    cap_x = jnp.broadcast_to(params.twm_capital, p.shape)
    mu = params.twm_mu
    # The exact discounts have a kink at δ = 0 (jax.grad there may be 0): take g = ∇F(0) by
    # one-sided differences over 0.1% of AUM per asset: forward for deposits, backward for
    # withdrawals (the two differ at the kink).
    n = p.shape[0]
    g_in = discount_subgradient(F_x, n, p.dtype, eps=1e-3)
    g_out = -discount_subgradient(lambda x: F_x(-x), n, p.dtype, eps=1e-3)
    # A creation deposits (δ ≥ 0), as a GLP/JLP mint does; eq. 7's δ ≥ −R^A would let one
    # "creation" withdraw every available asset while depositing one, which the max over
    # assets in eq. 11 rewards.
    create = create_arbitrage(
        F_x, ones, jnp.zeros_like(avail_x), mu, num_steps=num_steps, g=g_in, upper=cap_x
    )
    redeem = redeem_arbitrage(
        F_x, ones, jnp.minimum(avail_x, cap_x), mu, num_steps=num_steps, g=g_out
    )
    threshold = params.twm_cost * scale
    # Creation must bring assets in (eq. 7 with pᵀδ ≤ 0 would be a redemption in disguise).
    c_ok = (create.profit > threshold) & (fixed_sum(create.trade) > 0)
    r_ok = redeem.profit > threshold
    do_create = c_ok & (~r_ok | (create.profit >= redeem.profit))
    do_redeem = r_ok & ~do_create
    delta = jnp.where(do_create, create.trade * to_tokens, 0.0)
    lam = jnp.where(do_redeem, redeem.trade * to_tokens, 0.0)
    value_in = fixed_sum(p * delta)
    value_out = fixed_sum(p * lam)
    f_create = jnp.where(do_create, F(delta), 0.0)
    f_redeem = jnp.where(do_redeem, F(-lam), 0.0)
    minted, burnt = twm_settle(value, state.supply, value_in, f_create, value_out, f_redeem)
    profit = jnp.where(do_create, f_create * value_in, 0.0) + jnp.where(
        do_redeem, value_out * f_redeem / (1.0 + f_redeem), 0.0
    )
    return TwmResult(
        reserve_change=delta - lam,
        supply_change=jnp.where(do_create, minted, 0.0) - jnp.where(do_redeem, burnt, 0.0),
        flow=value_in - value_out,
        profit=profit,
        created=do_create.astype(p.dtype),
        redeemed=do_redeem.astype(p.dtype),
    )


def twm_settle(
    value: Float[Array, ""],
    supply: Float[Array, ""],
    value_in: Float[Array, ""],
    f_create: Float[Array, ""],
    value_out: Float[Array, ""],
    f_redeem: Float[Array, ""],
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Shares minted for a deposit worth v = `value_in` and burnt for a withdrawal worth
    pᵀλ = `value_out`, on a pool of AUM V = `value` and `supply` S.

    Creation (§3.3): the depositor owns (1 + F)·v / (V + v) of the pool *after* the deposit,
    worth (1 + F)·v, so m / (S + m) = (1 + F)·v / (V + v), i.e. m = S (1 + F) v / (V − F v).
    Its gain m·(V + v)/(S + m) − v is then exactly F·v, eq. 7's objective. (Minting at the
    pre-deposit price, m = (1 + F)·v·S/V, pays less than F·v: the new shares are diluted by
    their own mint.) Redemption (eq. 9): σ = S·pᵀλ / ((1 + f)·V), bought at V/S, so the gain
    pᵀλ − σ·V/S = pᵀλ·f/(1 + f) is eq. 10's objective. Zero trades mint and burn nothing.
    """
    tiny = jnp.finfo(value.dtype).tiny
    denom = value - f_create * value_in
    minted = supply * (1.0 + f_create) * value_in / jnp.where(denom > 0, denom, tiny)
    burnt = supply * value_out / jnp.maximum((1.0 + f_redeem) * value, tiny)
    return jnp.where(value_in > 0, minted, 0.0), jnp.where(value_out > 0, burnt, 0.0)


def swap_arbitrage(
    state: PoolState,
    old_prices: Float[Array, " n"],
    available: Float[Array, " n"],
    params: PoolParams,
) -> tuple[Float[Array, " n"], Float[Array, ""], Float[Array, ""]]:
    """Stale-oracle swap arbitrage, each risky asset against the numéraire (last), in order.

    **Returns:** the reserve change (tokens), the pool's value change at market prices
    (−arbitrage profit, ≤ 0) and the number of swaps.
    """
    p, reserves = state.prices, state.reserves
    n = p.shape[0]
    change = jnp.zeros_like(reserves)
    pnl = jnp.zeros((), p.dtype)
    swaps = jnp.zeros((), p.dtype)
    avail = jnp.maximum(available, 0.0)
    for i in range(n - 1):
        pair = jnp.array([i, n - 1])
        cur = reserves + change
        usdg = old_prices[pair] * cur[pair]
        target = params.target_weights[pair] * fixed_sum(old_prices * cur)
        arb = swap_arbitrage_oracle(
            old_prices[pair],
            p[pair],
            usdg,
            target,
            (avail + jnp.minimum(change, 0.0))[pair],
            swap_bps=params.swap_fee * 1e4,
            tax_bps=params.discount_tax * 1e4,
        )
        a = arb.token_in
        size = jnp.where(arb.exists, arb.size_usd, 0.0)
        keep = 1.0 - arb.fee_bps.astype(p.dtype) / 1e4
        tokens_in = size / old_prices[pair][a]
        tokens_out = size * keep / old_prices[pair][1 - a]
        delta_pair = jnp.where(
            a == 0, jnp.stack([tokens_in, -tokens_out]), jnp.stack([-tokens_out, tokens_in])
        )
        change = change.at[pair].add(delta_pair)
        pnl = pnl + fixed_sum(p[pair] * delta_pair)
        swaps = swaps + arb.exists.astype(p.dtype)
    return change, pnl, swaps
