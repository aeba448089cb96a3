"""The pool's portfolio: reserves, LP shares, weights w(p, R) and value.

For now the pool is a passive LP portfolio (reserves at target weights, optionally reset to
them every step); the perpetuals dynamics of Chitra et al. §2 build on the same state.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = [
    "MarketParams",
    "PoolParams",
    "PoolState",
    "init_pool",
    "pool_value",
    "weights",
    "share_price",
    "with_numeraire",
]


class MarketParams(eqx.Module):
    """`[market]` dynamic params: `initial_prices` of the risky assets, shape `(num_risky,)`."""

    initial_prices: Float[Array, " r"]


class PoolParams(eqx.Module):
    """`[pool]` dynamic params: `initial_value` (), `target_weights` (num_assets,)."""

    initial_value: Float[Array, ""]
    target_weights: Float[Array, " n"]


class PoolState(eqx.Module):
    """One pool: `prices` and `reserves` (num_assets,; numéraire last), LP `supply` ()."""

    prices: Float[Array, " n"]
    reserves: Float[Array, " n"]
    supply: Float[Array, ""]


def with_numeraire(risky: Float[Array, " r"], has_numeraire: bool) -> Float[Array, " n"]:
    """Append the numéraire's price 1 when the pool has one."""
    if not has_numeraire:
        return risky
    return jnp.concatenate([risky, jnp.ones((1,), risky.dtype)])


def pool_value(prices: Float[Array, " n"], reserves: Float[Array, " n"]) -> Float[Array, ""]:
    """pᵀR, the value of the reserves in numéraire."""
    return jnp.sum(prices * reserves)


def weights(prices: Float[Array, " n"], reserves: Float[Array, " n"]) -> Float[Array, " n"]:
    """w(p, R) = p ⊙ R / pᵀR (Chitra et al. §3.1)."""
    v = prices * reserves
    return v / jnp.sum(v)


def share_price(state: PoolState) -> Float[Array, ""]:
    """LP share price: pool value / share supply."""
    return pool_value(state.prices, state.reserves) / state.supply


def init_pool(market: MarketParams, pool: PoolParams, has_numeraire: bool) -> PoolState:
    """Reserves at the target weights worth `initial_value`; share price 1."""
    prices = with_numeraire(market.initial_prices, has_numeraire)
    reserves = pool.target_weights * pool.initial_value / prices
    return PoolState(prices=prices, reserves=reserves, supply=pool.initial_value)
