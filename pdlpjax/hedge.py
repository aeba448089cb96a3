"""The LP's mean-variance delta hedge (Chitra et al. §4, eq. 12-13) and its inputs.

- `mean_variance_hedge`: the closed-form solution of eq. 12 (eq. 13 without costs), by
  Cholesky solves; unbatched, `vmap` it for many pools.
- `pool_delta`: Δ = ∇_p AUM(p) by `jax.grad` through the pool's value function
  (reserves minus the traders' unrealised PnL), not by hand.
- Covariance of log returns estimated inside the scan from a `CovState` (the last `window`
  returns in a ring, and an EWMA): `rolling_covariance`, `ewma_covariance`,
  `oas_shrinkage` (Oracle Approximating Shrinkage of the rolling estimate, Chen et al. 2010).

Units. π, Δ and ℓ are in tokens of the risky assets; Σ in eq. 12 is the covariance of *price
changes* over one hedge period (numéraire² per token²), `price_change_cov` converts from a
per-step log-return covariance; f is the fee per hedge period; the risk aversion γ_r is per
numéraire (called `risk_aversion` in code; the papers' "γ").
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from ._numerics import fixed_sum
from .config import COVARIANCE_ESTIMATORS
from .market import Book, unrealised_pnl
from .metrics import ReturnStats, finalize_stats, init_stats, update_stats
from .pool import pool_value

__all__ = [
    "mean_variance_hedge",
    "pool_delta",
    "price_change_cov",
    "CovState",
    "init_cov_state",
    "update_cov_state",
    "rolling_covariance",
    "ewma_covariance",
    "oas_shrinkage",
    "estimate_covariance",
    "COVARIANCE_ESTIMATORS",
    "HedgeParams",
    "HedgeState",
    "HedgeInputs",
    "Exposure",
    "Moments",
    "variance",
    "init_hedge",
    "hedge_step",
    "enter_hedge",
    "HedgePlan",
    "model_covariance",
    "hedge_metrics",
]


def mean_variance_hedge(
    cov: Float[Array, "r r"],
    lent: Float[Array, " r"],
    delta: Float[Array, " r"],
    fee: Float[Array, ""],
    risk_aversion: Float[Array, ""],
    cost: Float[Array, " r"] | None = None,
    previous: Float[Array, " r"] | None = None,
) -> Float[Array, " r"]:
    """The offsetting portfolio π of eq. 12: argmax f ℓᵀ(x + R) − ½(x − π)ᵀDiag(c)(x − π)
    − (γ_r/2)(x + Δ)ᵀΣ(x + Δ).

    π = (γ_r Σ + Diag(c))⁻¹ [f ℓ + Diag(c) π_prev − γ_r Σ Δ]; with `cost` None (c = 0) this is
    eq. 13, π = (f/γ_r) Σ⁻¹ ℓ − Δ. Both by a Cholesky factorisation, never an inverse.
    `previous` defaults to no position. Shapes: `cov` (r, r) SPD, the rest (r,) or scalars.
    """
    if cost is None:
        factor = jsl.cho_factor(cov, lower=True)
        return (fee / risk_aversion) * jsl.cho_solve(factor, lent) - delta
    if previous is None:
        previous = jnp.zeros_like(delta)
    system = risk_aversion * cov + jnp.diag(cost)
    rhs = fee * lent + cost * previous - risk_aversion * (cov @ delta)
    return jsl.cho_solve(jsl.cho_factor(system, lower=True), rhs)


def pool_delta(
    prices: Float[Array, " n"], reserves: Float[Array, " n"], book: Book, num_risky: int
) -> Float[Array, " r"]:
    """Δ = ∂AUM/∂p over the risky prices, by autodiff of AUM = pᵀR − unrealised trader PnL.

    With no open positions Δ equals the risky reserves; an open long of δ tokens lowers it by
    δ (the pool is short what the trader is long), an open short raises it by δ.
    """

    def value(risky: Float[Array, " r"]) -> Float[Array, ""]:
        p = jnp.concatenate([risky, prices[num_risky:]])
        return pool_value(p, reserves) - unrealised_pnl(book, risky)

    return jax.grad(value)(prices[:num_risky])


def price_change_cov(
    log_cov: Float[Array, "r r"], prices: Float[Array, " r"], horizon: float
) -> Float[Array, "r r"]:
    """Covariance of price changes over `horizon` steps from a per-step log-return covariance:
    horizon · Diag(p) Σ_log Diag(p) (first order in the step)."""
    return horizon * (prices[:, None] * log_cov * prices[None, :])


class CovState(eqx.Module):
    """Running inputs of the covariance estimators for one pool (r risky assets).

    `window` holds the last `n` log-return vectors in a ring (row `count % n` is next);
    `ewma` the exponentially weighted second moment, with `ewma_weight` = 1 − λ^count for
    its bias correction.
    """

    window: Float[Array, "n r"]
    count: Int[Array, ""]
    ewma: Float[Array, "r r"]
    ewma_weight: Float[Array, ""]


def init_cov_state(num_risky: int, window: int, dtype) -> CovState:
    """No returns seen yet."""
    return CovState(
        window=jnp.zeros((window, num_risky), dtype),
        count=jnp.zeros((), jnp.int32),
        ewma=jnp.zeros((num_risky, num_risky), dtype),
        ewma_weight=jnp.zeros((), dtype),
    )


def update_cov_state(
    state: CovState, log_return: Float[Array, " r"], decay: Float[Array, ""]
) -> CovState:
    """Add one step's log returns; `decay` is the EWMA's λ (weight of the past)."""
    n = state.window.shape[0]
    window = state.window.at[state.count % n].set(log_return)
    outer = log_return[:, None] * log_return[None, :]
    return CovState(
        window=window,
        count=state.count + 1,
        ewma=decay * state.ewma + (1.0 - decay) * outer,
        ewma_weight=decay * state.ewma_weight + (1.0 - decay),
    )


def rolling_covariance(state: CovState) -> tuple[Float[Array, "r r"], Float[Array, ""]]:
    """Sample covariance (mean removed, divisor m − 1) of the last m = min(count, n) returns.

    **Returns:** the estimate and m (as a float), the number of returns it used.
    """
    n = state.window.shape[0]
    m = jnp.minimum(state.count, n).astype(state.window.dtype)
    used = (jnp.arange(n) < state.count)[:, None]
    x = jnp.where(used, state.window, 0.0)
    mean = fixed_sum(x, axis=0) * (1.0 / jnp.maximum(m, 1.0))
    dev = jnp.where(used, x - mean, 0.0)
    cov = fixed_sum(dev[:, :, None] * dev[:, None, :], axis=0) * (1.0 / jnp.maximum(m - 1.0, 1.0))
    return cov, m


def ewma_covariance(state: CovState) -> Float[Array, "r r"]:
    """Bias-corrected EWMA second moment of the log returns (zero mean assumed)."""
    return state.ewma * (1.0 / jnp.where(state.ewma_weight > 0, state.ewma_weight, 1.0))


def oas_shrinkage(
    cov: Float[Array, "r r"], num_samples: Float[Array, ""]
) -> tuple[Float[Array, "r r"], Float[Array, ""]]:
    """Oracle Approximating Shrinkage (Chen, Wiesel, Eldar, Hero 2010, eq. 23) of a sample
    covariance from `num_samples` returns towards μI, μ = tr(S)/p:

    ρ = min(1, ((1 − 2/p) tr(S²) + tr(S)²) / ((m + 1 − 2/p)(tr(S²) − tr(S)²/p))).

    Chosen over Ledoit-Wolf because it needs only S and m (not the returns themselves), so it
    runs on the same ring state, and it shrinks harder when m is small, where Ledoit-Wolf is
    known to under-shrink for Gaussian data. **Returns:** (shrunk covariance, ρ).
    """
    p = cov.shape[0]
    tr = jnp.trace(cov)
    tr2 = fixed_sum(cov * cov)
    num = (1.0 - 2.0 / p) * tr2 + tr * tr
    den = (num_samples + 1.0 - 2.0 / p) * (tr2 - tr * tr / p)
    rho = jnp.where(den > 0, jnp.minimum(num / jnp.where(den > 0, den, 1.0), 1.0), 1.0)
    mu = tr / p
    return (1.0 - rho) * cov + rho * mu * jnp.eye(p, dtype=cov.dtype), rho


def estimate_covariance(
    kind: str, state: CovState, model_cov: Float[Array, "r r"]
) -> tuple[Float[Array, "r r"], Float[Array, ""]]:
    """Per-step log-return covariance by estimator `kind` (one of `COVARIANCE_ESTIMATORS`):
    "model" (the path model's own Σ, an oracle), "window", "ewma" or "shrinkage" (OAS of the
    window). **Returns:** the estimate and whether it is usable yet (at least 2 returns seen;
    "model" always is).
    """
    if kind == "model":
        return model_cov, jnp.asarray(True)
    ready = state.count >= 2
    if kind == "ewma":
        return ewma_covariance(state), ready
    cov, m = rolling_covariance(state)
    if kind == "shrinkage":
        cov, _ = oas_shrinkage(cov, m)
    return cov, ready


# --------------------------------------------------------------------------- the hedged LP


class HedgeParams(eqx.Module):
    """`[hedge]` dynamic params of one pool."""

    risk_aversion: Float[Array, ""]  # γ_r of eq. 12 (value units: dimensionless)
    penalty: Float[Array, " r"]  # c of eq. 12 (value units: dimensionless); 0 gives eq. 13
    cost: Float[Array, " r"]  # proportional charge on traded notional (taker fee), fraction
    ewma_halflife: Float[Array, ""]  # steps, for covariance = "ewma"
    damping: Float[Array, ""]  # Schur damping γ for damping_rule = "fixed" ([[pools]] only)


class Moments(eqx.Module):
    """Welford count, mean and sum of squared deviations of a scalar series."""

    count: Float[Array, ""]
    mean: Float[Array, ""]
    m2: Float[Array, ""]


def _add(m: Moments, x: Float[Array, ""]) -> Moments:
    count = m.count + 1.0
    delta = x - m.mean
    mean = m.mean + delta / count
    return Moments(count, mean, m.m2 + delta * (x - mean))


def variance(m: Moments) -> Float[Array, "*b"]:
    """Sample variance (divisor count − 1) of a `Moments` (batched or not)."""
    return m.m2 / jnp.maximum(m.count - 1.0, 1.0)


class HedgeState(eqx.Module):
    """The hedged LP of one pool: it holds the pool's initial share supply (`shares`) and a
    perpetuals position `position` (tokens, r,) financed from `cash` (numéraire).

    Running totals (numéraire): `pnl` (πᵀΔp), `funding` (paid on the hedge), `costs`
    (trading charges); `rebalances`; Claim 4.1's sums over rebalances (`fee_term` = f·1ᵀℓ,
    `risk_term` = γ_r λ_max(Σ) 1ᵀΔ, in value units); Welford moments of the per-step hedge
    PnL and of the unhedged LP's PnL (for its variance condition); and the hedged wealth's
    `ReturnStats` (`stats`).
    """

    shares: Float[Array, ""]
    position: Float[Array, " r"]
    cash: Float[Array, ""]
    cov: CovState
    pnl: Float[Array, ""]
    funding: Float[Array, ""]
    costs: Float[Array, ""]
    rebalances: Float[Array, ""]
    damping_sum: Float[Array, ""]  # Σ of the Schur damping γ used at the rebalances
    damping_count: Float[Array, ""]  # rebalances that used a covariance (not the entry's −Δ)
    fee_term: Float[Array, ""]
    risk_term: Float[Array, ""]
    hedge_moments: Moments
    lp_moments: Moments
    stats: ReturnStats


def init_hedge(
    shares: Float[Array, ""],
    num_risky: int,
    window: int,
    stats: ReturnStats,
    dtype,
    num_market: int | None = None,
) -> HedgeState:
    """An LP holding `shares` with no hedge yet; `stats` are its initial `ReturnStats`.
    `num_market` (default `num_risky`) is how many assets the covariance estimate covers:
    all the market's, when the pool holds a block of them (`[[pools]]`)."""
    zero = jnp.zeros((), dtype)
    empty = Moments(zero, zero, zero)
    return HedgeState(
        shares=shares,
        position=jnp.zeros((num_risky,), dtype),
        cash=zero,
        cov=init_cov_state(num_market or num_risky, window, dtype),
        pnl=zero,
        funding=zero,
        costs=zero,
        rebalances=zero,
        damping_sum=zero,
        damping_count=zero,
        fee_term=zero,
        risk_term=zero,
        hedge_moments=empty,
        lp_moments=empty,
        stats=stats,
    )


def model_covariance(vols: Float[Array, " r"], correlation: Float[Array, "r r"], dt: float):
    """Per-step log-return covariance of the diffusion part of the path model:
    dt · Diag(σ) C Diag(σ) (jumps and GARCH clustering are not in it)."""
    return dt * (vols[:, None] * correlation * vols[None, :])


class HedgeInputs(eqx.Module):
    """What the pool step hands the hedge after its own update (one pool)."""

    p_old: Float[Array, " r"]
    p_new: Float[Array, " r"]
    log_return: Float[Array, " n"]  # this step's log returns of all the market's assets
    funding_rate: Float[Array, " r"]  # γ_L per market this step (> 0: longs pay)
    share_price_old: Float[Array, ""]
    share_price_new: Float[Array, ""]
    supply: Float[Array, ""]
    fee: Float[Array, ""]  # the pool's lending fee per step


class Exposure(eqx.Module):
    """What a rebalance needs of the pool after the step (one pool); `hedge_step` asks for
    it only on rebalancing steps."""

    delta: Float[Array, " r"]  # ∂AUM/∂p of the pool (tokens)
    lent: Float[Array, " r"]  # tokens lent (reserved for longs)
    model_cov: Float[Array, "n n"]  # per-step log-return covariance of the path model


class HedgePlan(eqx.Module):
    """Static settings of the hedged LP: rebalance period, covariance estimator, and, for a
    pool that holds a block of the market's assets (`[[pools]]`), the block's indices in the
    market (`own`), how its Schur damping γ is set (`rule`, one of `config.DAMPING_RULES`)
    and which coupling ρ̂ feeds γ* (`coupling`)."""

    every: int = eqx.field(static=True, default=24)
    estimator: str = eqx.field(static=True, default="window")
    own: tuple | None = eqx.field(static=True, default=None)
    rule: str = eqx.field(static=True, default="fixed")
    coupling: str = eqx.field(static=True, default="canonical")


def _damping(
    full: Float[Array, "n n"], m1: int, params: HedgeParams, plan: HedgePlan, n_eff
) -> Float[Array, ""]:
    """The Schur damping γ of the rule, from the covariance ordered [own block, the rest]."""
    from .schur import claim_b1, coupling_rho, gamma_star  # schur builds on this module

    if plan.rule == "fixed":
        return params.damping
    if plan.rule == "isolated":
        return jnp.zeros_like(params.damping)
    if plan.rule == "merged":
        return jnp.ones_like(params.damping)
    if plan.rule == "binary":
        return claim_b1(full, m1).passes.astype(full.dtype)
    rho = coupling_rho(full, m1, kind=plan.coupling)
    g = gamma_star(rho, jnp.maximum(n_eff, 3.0))  # n ≤ 2 has no residual: no trust (γ = 0)
    return jnp.where(n_eff > 2, g, 0.0)


def _rebalance(
    held_value: Float[Array, " r"],
    delta_value: Float[Array, " r"],
    lent_value: Float[Array, " r"],
    fee_per_step: Float[Array, ""],
    log_cov: Float[Array, "n n"],
    ready: Bool[Array, ""],
    params: HedgeParams,
    plan: HedgePlan,
    n_eff: Float[Array, ""],
):
    """Eq. 12 in value units: x = p ⊙ π, Δ and ℓ are the LP's pro-rata share of the pool's
    delta and lent tokens times p, Σ = `every` × the per-step log-return covariance,
    f = fee × `every`. For a block pool (`plan.own`), Σ is the damped own block
    A(γ) = A − γ B C⁻¹ Bᵀ of the market's covariance (Cotton eq. 3), γ by `plan.rule`.
    **Returns:** (new position value, whether it moved, Claim 4.1's fee term f·1ᵀℓ and risk
    term γ_r λ_max(Σ) 1ᵀΔ, both 0 when it did not move, and the γ used).
    """
    from .schur import damped_blocks

    fee = fee_per_step * plan.every
    # A tiny ridge keeps the factorisation finite while the window has fewer returns than
    # assets (the sample covariance is then singular): 1e-9 of the mean variance.
    n = log_cov.shape[0]
    ridge = 1e-9 * jnp.trace(log_cov) / n + jnp.finfo(log_cov.dtype).tiny
    log_cov = log_cov + ridge * jnp.eye(n, dtype=log_cov.dtype)
    gamma = jnp.zeros_like(fee)
    if plan.own is not None:
        own = list(plan.own)
        perm = jnp.asarray(own + [i for i in range(n) if i not in own])
        full = log_cov[perm][:, perm]
        gamma = _damping(full, len(own), params, plan, n_eff)
        log_cov = damped_blocks(full, len(own), gamma)[0]
    sigma = plan.every * log_cov
    target = mean_variance_hedge(
        sigma,
        lent_value,
        delta_value,
        fee,
        params.risk_aversion,
        params.penalty,
        held_value,
    )
    ok = ready & jnp.all(jnp.isfinite(target))
    lam_max = jnp.linalg.eigvalsh(sigma)[-1]
    zero = jnp.zeros_like(fee)
    return (
        jnp.where(ok, target, held_value),
        ok,
        jnp.where(ok, fee * fixed_sum(lent_value), zero),
        jnp.where(ok, params.risk_aversion * lam_max * fixed_sum(delta_value), zero),
        jnp.where(ok, gamma, zero),
    )


def _effective_samples(plan: HedgePlan, cov: CovState, params: HedgeParams) -> Float[Array, ""]:
    """How many returns the estimate rests on, for γ*: the window's count, the EWMA's
    (1 + λ)/(1 − λ) (Kish's effective size of infinite geometric weights), or 1e9 for the
    model's own Σ (known exactly)."""
    dtype = cov.ewma.dtype
    if plan.estimator == "model":
        return jnp.asarray(1e9, dtype)
    if plan.estimator == "ewma":
        lam = 0.5 ** (1.0 / params.ewma_halflife)
        return jnp.minimum((1.0 + lam) / (1.0 - lam), cov.count.astype(dtype))
    return jnp.minimum(cov.count, cov.window.shape[0]).astype(dtype)


def enter_hedge(
    state: HedgeState,
    params: HedgeParams,
    prices: Float[Array, " r"],
    delta: Float[Array, " r"],
    lent: Float[Array, " r"],
    supply: Float[Array, ""],
    fee: Float[Array, ""],
    model_cov: Float[Array, "n n"],
    plan: HedgePlan,
) -> HedgeState:
    """Put on the first hedge at t = 0. With the model's covariance (estimator "model") it is
    eq. 12's π; the estimators have no returns yet, so the LP holds the pure delta hedge
    x = −Δ (eq. 13's limit γ_r → ∞, which needs no Σ) until the first rebalance. The entry
    cost is paid from cash, and the hedged wealth's statistics start from the wealth after
    it."""
    own = state.shares * (1.0 / supply)
    delta_value = own * delta * prices
    if plan.estimator == "model":
        new_value, done, fee_term, risk_term, gamma = _rebalance(
            jnp.zeros_like(prices),
            delta_value,
            own * lent * prices,
            fee,
            model_cov,
            jnp.asarray(True),
            params,
            plan,
            _effective_samples(plan, state.cov, params),
        )
    else:
        zero = jnp.zeros_like(fee)
        new_value, done, fee_term, risk_term, gamma = -delta_value, True, zero, zero, zero
    cost = fixed_sum(params.cost * jnp.abs(new_value))
    cash = state.cash - cost
    value = state.stats.initial_value + cash / state.shares
    return eqx.tree_at(
        lambda h: (
            h.position,
            h.cash,
            h.costs,
            h.rebalances,
            h.damping_sum,
            h.damping_count,
            h.fee_term,
            h.risk_term,
            h.stats,
        ),
        state,
        (
            new_value * (1.0 / prices),
            cash,
            state.costs + cost,
            state.rebalances + jnp.asarray(done, cash.dtype),
            state.damping_sum + gamma,
            state.damping_count + jnp.asarray(plan.estimator == "model", cash.dtype),
            state.fee_term + fee_term,
            state.risk_term + risk_term,
            init_stats(value, state.stats.worst_losses.shape[0]),
        ),
    )


def hedge_step(
    state: HedgeState,
    params: HedgeParams,
    x: HedgeInputs,
    t: Int[Array, ""],
    plan: HedgePlan,
    exposure: Callable[[], Exposure],
) -> HedgeState:
    """One step of the hedged LP (Chitra et al. §4), after the pool's own step.

    1. The position held since the last rebalance earns πᵀ(p_{t+1} − p_t) and pays funding
       Σ γ_L π p_{t+1} (a short receives when longs pay).
    2. The covariance estimator sees this step's log returns (all the market's assets).
    3. Every `plan.every` steps (at the end of step t with (t + 1) % every == 0), once the
       estimate is usable, the LP moves to eq. 12's π (`_rebalance`). It pays `cost` ×
       |traded notional|.
    The hedged wealth is shares × share price + cash; its returns go into `stats`. The LP
    is hedged from t = 0 (`enter_hedge`). `exposure()` is called inside the rebalancing
    branch, so the pool's delta (a gradient through the whole book) is taken only there.
    """
    pnl = fixed_sum(state.position * (x.p_new - x.p_old))
    funding = fixed_sum(x.funding_rate * state.position * x.p_new)
    cov_state = update_cov_state(state.cov, x.log_return, 0.5 ** (1.0 / params.ewma_halflife))
    held_value = state.position * x.p_new

    def rebalance(_):
        e = exposure()
        log_cov, ready = estimate_covariance(plan.estimator, cov_state, e.model_cov)
        own = state.shares * (1.0 / x.supply)
        return _rebalance(
            held_value,
            own * e.delta * x.p_new,
            own * e.lent * x.p_new,
            x.fee,
            log_cov,
            ready,
            params,
            plan,
            _effective_samples(plan, cov_state, params),
        )

    def hold(_):
        zero = jnp.zeros_like(state.cash)
        return held_value, jnp.asarray(False), zero, zero, zero

    # `t` is a plain loop counter in `simulate` (the same for every pool), so under vmap this
    # stays a real branch and the estimate and solve run only on rebalancing steps.
    due = (t + 1) % plan.every == 0
    new_value, done, fee_term, risk_term, gamma = lax.cond(due, rebalance, hold, None)
    cost = fixed_sum(params.cost * jnp.abs(new_value - held_value))
    cash = state.cash + pnl - funding - cost
    lp_pnl = state.shares * (x.share_price_new - x.share_price_old)
    wealth = state.shares * x.share_price_new + cash
    return HedgeState(
        shares=state.shares,
        position=new_value * (1.0 / x.p_new),
        cash=cash,
        cov=cov_state,
        pnl=state.pnl + pnl,
        funding=state.funding + funding,
        costs=state.costs + cost,
        rebalances=state.rebalances + done.astype(cash.dtype),
        damping_sum=state.damping_sum + gamma,
        damping_count=state.damping_count + done.astype(cash.dtype),
        fee_term=state.fee_term + fee_term,
        risk_term=state.risk_term + risk_term,
        hedge_moments=_add(state.hedge_moments, pnl),
        lp_moments=_add(state.lp_moments, lp_pnl),
        stats=update_stats(state.stats, wealth / state.shares),
    )


def hedge_metrics(
    state: HedgeState, unhedged_sharpe: Float[Array, "*b"], steps_per_year: float
) -> dict[str, Array]:
    """Per-pool figures of the hedged LP (batched or not), next to the unhedged Sharpe.

    **Returns:** the `metrics.finalize_stats` figures of the hedged wealth prefixed
    `hedged_`; `hedge_pnl`, `hedge_funding`, `hedge_costs` (fractions of the LP's initial
    value); `rebalances`; `hedge_damping` (mean Schur γ over the rebalances; 0 for a
    single pool); `hedge_variance_ratio` = Var[πᵀΔp] / Var[LP PnL] per step;
    Claim 4.1's conditions as 0/1: `claim41_fee` (f·E[1ᵀℓ] ≥ γ_r λ_max E[1ᵀΔ] over the
    rebalances), `claim41_variance` (variance ratio ≤ 4), `claim41_holds` (both); and
    `hedge_beats` (1 when the hedged Sharpe is above the unhedged one).
    """
    hedged = {f"hedged_{k}": v for k, v in finalize_stats(state.stats, steps_per_year).items()}
    initial = state.shares * state.stats.initial_value
    tiny = jnp.finfo(state.cash.dtype).tiny
    ratio = variance(state.hedge_moments) / jnp.maximum(variance(state.lp_moments), tiny)
    fee_ok = (state.fee_term >= state.risk_term) & (state.rebalances > 0)
    var_ok = ratio <= 4.0
    return hedged | {
        "hedge_pnl": state.pnl / initial,
        "hedge_funding": state.funding / initial,
        "hedge_costs": state.costs / initial,
        "rebalances": state.rebalances,
        "hedge_damping": state.damping_sum / jnp.maximum(state.damping_count, 1.0),
        "hedge_variance_ratio": ratio,
        "claim41_fee": fee_ok.astype(ratio.dtype),
        "claim41_variance": var_ok.astype(ratio.dtype),
        "claim41_holds": (fee_ok & var_ok).astype(ratio.dtype),
        "hedge_beats": (hedged["hedged_sharpe"] > unhedged_sharpe).astype(ratio.dtype),
    }
