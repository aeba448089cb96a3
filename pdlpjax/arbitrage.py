"""Arbitrage against a PDLP: share creation (eq. 7), redemption (eq. 10), swaps (§2.3.2).

- `create_arbitrage` / `redeem_arbitrage`: the arbitrageur starts at the surrogate optimum
  δ_H = g/μ (§3.3, g = ∇F(0)), projects it onto the feasible set, and refines it with a fixed
  number of projected gradient ascent steps (`lax.fori_loop`: no while loop, so it jits,
  vmaps and reverse-differentiates). It keeps the best iterate and never returns a trade
  worse than not trading.
- `swap_arbitrage_uniswap`: the closed-form arbitrage against G(x) = R₂x/(R₁ + x).
- `swap_arbitrage_oracle`: a GMX-style swap at oracle prices with dynamic swap fees.
- `claim_3_1_bound` … `claim_3_4`: the paper's claims as checks, each with the bound as
  printed and a corrected one (derivations in the docstrings).

All functions are pure and unbatched; n = number of assets.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._numerics import fixed_sum
from .discount import BASIS_POINTS, SWAP_BPS, TAX_BPS, swap_fee_bps

__all__ = [
    "ArbResult",
    "create_arbitrage",
    "redeem_arbitrage",
    "UniswapArb",
    "swap_arbitrage_uniswap",
    "uniswap_fee_bound",
    "OracleSwapArb",
    "swap_arbitrage_oracle",
    "ClaimCheck",
    "claim_3_1_bound",
    "claim_3_2_bound",
    "claim_3_3_bound",
    "Claim34",
    "claim_3_4",
]

Discount = Callable[[Float[Array, " n"]], Float[Array, ""]]


def _dot(a: Array, b: Array) -> Array:
    return fixed_sum(a * b)


def _norm(a: Array) -> Array:
    return jnp.sqrt(fixed_sum(a * a))


# --------------------------------------------------------------------------- TWM arbitrage


class ArbResult(eqx.Module):
    """A create/redeem arbitrage: the trade, its profit, and the surrogate's start point."""

    trade: Float[Array, " n"]  # create: δ (reserve change); redeem: λ (assets taken out)
    profit: Float[Array, ""]  # numéraire
    surrogate: Float[Array, " n"]  # δ_H = g/μ (λ_H for redeem), projected
    surrogate_profit: Float[Array, ""]


# Relative step sizes tried at each ascent step, all at once (a fixed-cost line search).
_STEP_SCALES = tuple(2.0**k for k in range(-6, 3))


def _projected_ascent(
    objective: Callable[[Array], Array],
    project: Callable[[Array], Array],
    x0: Array,
    num_steps: int,
    step_size: ArrayLike | None,
) -> tuple[Array, Array, Array]:
    """Fixed-count projected gradient ascent from `x0`; returns (best x, its value, value at x0).

    Each step tries x + η·s·∇ for the scales s in `_STEP_SCALES` (vmapped, so the cost is
    fixed), keeps the best if it improves, and carries η·s on; if none improves, η shrinks by
    2⁶. The value never decreases, which a fixed step cannot promise here: S = F·pᵀδ is cubic
    and its curvature at the start says little about it one step away. The initial η is
    `step_size`, or 1/‖∇²objective(x0)‖_F. The zero trade (value 0) is the first incumbent:
    an arbitrageur does not trade at a loss. NaN candidates never win.
    """
    dtype = x0.dtype
    v0 = objective(x0)
    if step_size is None:
        # The step size is the solver's setting, not part of the trade it finds: no gradient
        # flows through it. (Through 1/√(Σ H²) a zero Hessian made every gradient NaN,
        # 0 · inf in the backward pass, even where the value was guarded.)
        hess = lax.stop_gradient(jax.hessian(objective)(x0))
        sq = fixed_sum(hess * hess)
        ok = jnp.isfinite(sq) & (sq > 0)
        eta = jnp.where(ok, 1.0 / jnp.sqrt(jnp.where(ok, sq, 1.0)), 1.0).astype(dtype)
    else:
        eta = jnp.asarray(step_size, dtype)
    scales = jnp.asarray(_STEP_SCALES, dtype)
    grad = jax.grad(objective)
    batch_objective = jax.vmap(objective)

    def body(_, carry):
        x, v, eta = carry
        g = grad(x)
        g = jnp.where(jnp.isfinite(g), g, 0.0)
        cand = jax.vmap(lambda s: project(x + (eta * s) * g))(scales)
        vals = batch_objective(cand)
        vals = jnp.where(jnp.isnan(vals), -jnp.inf, vals)
        k = jnp.argmax(vals)
        better = vals[k] > v
        x = jnp.where(better, cand[k], x)
        v = jnp.where(better, vals[k], v)
        eta = jnp.where(better, eta * scales[k], eta * scales[0])
        return x, v, eta

    use_start = v0 > 0  # NaN or a loss: start from the zero trade instead
    x = jnp.where(use_start, x0, jnp.zeros_like(x0))
    v = jnp.where(use_start, v0, jnp.zeros_like(v0))
    x, v, _ = lax.fori_loop(0, num_steps, body, (x, v, eta))
    return x, v, v0


def create_arbitrage(
    F: Discount,
    prices: Float[Array, " n"],
    available: Float[Array, " n"],
    mu: Float[ArrayLike, ""],
    num_steps: int = 100,
    step_size: float | Float[Array, ""] | None = None,
    g: Float[Array, " n"] | None = None,
    upper: Float[Array, " n"] | None = None,
) -> ArbResult:
    """Share creation, eq. 7: maximise S(δ) = F(δ)·pᵀδ subject to δ ≥ −R^A (and δ ≤ `upper`,
    the arbitrageur's capital, when given: with eq. 11 as printed S grows without bound).

    **Arguments:** `F` maps δ (shape `(n,)`) to the discount (a closure over p, w*, R);
    `prices` p and `available` R^A, shape `(n,)`; `mu` the strong-concavity modulus μ of F;
    `num_steps` (static) and `step_size` of the refinement (None: 1/‖∇²S(δ_H)‖_F); `g` a
    subgradient of F at 0 (None: jax.grad(F)(0), which needs F differentiable there).
    **Returns:** `ArbResult` with δ, S(δ), projected δ_H = max(g/μ, −R^A) and S(δ_H).

    Note the sign convention of eq. 7 on withdrawals (δ_i < 0): the LP gives up shares worth
    (1 + F)·|pᵀδ| for assets worth |pᵀδ|, so a withdrawal profits when F < 0, whereas eq. 9-10
    pay a redeemer (1 + f) times the share value, profiting when f > 0. With a strongly
    concave F, F(δ)·pᵀδ grows like ‖δ‖³ toward −R^A, so for a large R^A the global maximum of
    eq. 7 can be the full withdrawal. This solver is the paper's local method: it refines from
    δ_H and finds the optimum near it.
    """
    prices = jnp.asarray(prices)
    available = jnp.asarray(available, prices.dtype)
    mu = jnp.asarray(mu, prices.dtype)
    if g is None:
        g = jax.grad(F)(jnp.zeros_like(prices))

    def project(d):
        d = jnp.maximum(d, -available)
        return d if upper is None else jnp.minimum(d, upper)

    def objective(d):
        return F(d) * _dot(prices, d)

    start = project(g / mu)
    trade, profit, start_profit = _projected_ascent(objective, project, start, num_steps, step_size)
    return ArbResult(trade=trade, profit=profit, surrogate=start, surrogate_profit=start_profit)


def redeem_arbitrage(
    F: Discount,
    prices: Float[Array, " n"],
    available: Float[Array, " n"],
    mu: Float[ArrayLike, ""],
    num_steps: int = 100,
    step_size: float | Float[Array, ""] | None = None,
    g: Float[Array, " n"] | None = None,
) -> ArbResult:
    """Share redemption, eq. 10: maximise pᵀλ·f(λ)/(1 + f(λ)) subject to 0 ≤ λ ≤ R^A.

    f(λ) = F(−λ). The surrogate is h(λ) = g_λᵀλ − μ/2 ‖λ‖² with g_λ = ∇f(0) = −∇F(0), so
    λ_H = clip(g_λ/μ, 0, R^A). (The paper writes μ‖λ‖² here and μ/2‖δ‖² in eq. 8; we use
    μ/2 in both, so μ means the same modulus.) Where 1 + f ≤ 0 the objective is −∞ (the
    redemption formula of eq. 9 breaks down). Arguments as `create_arbitrage`; `g`, if
    given, is ∇F(0) (not ∇f). **Returns:** `ArbResult` with λ in `trade`.
    """
    prices = jnp.asarray(prices)
    available = jnp.asarray(available, prices.dtype)
    mu = jnp.asarray(mu, prices.dtype)
    if g is None:
        g = jax.grad(F)(jnp.zeros_like(prices))

    def project(lam):
        return jnp.clip(lam, 0.0, available)

    def objective(lam):
        f = F(-lam)
        den = 1.0 + f
        ok = den > 0
        ratio = jnp.where(ok, f / jnp.where(ok, den, 1.0), -jnp.inf)
        return _dot(prices, lam) * ratio

    start = project(-g / mu)
    trade, profit, start_profit = _projected_ascent(objective, project, start, num_steps, step_size)
    return ArbResult(trade=trade, profit=profit, surrogate=start, surrogate_profit=start_profit)


# --------------------------------------------------------------------------- swaps


class UniswapArb(eqx.Module):
    """Arbitrage of a Uniswap-v2-like forward exchange function G(x) = R₂x/(R₁ + x)."""

    x_star: Float[Array, ""]  # numéraire in (negative: numéraire out, asset in)
    asset_out: Float[Array, ""]  # G(x*) (negative: asset in)
    profit: Float[Array, ""]  # pG(x*) − x*
    lp_loss: Float[Array, ""]  # −(x* − pG(x*)), the fall of the pool's value at price p
    divergence_loss: Float[Array, ""]  # (R₁ + pR₂) − pool value after, at price p


def swap_arbitrage_uniswap(
    reserve_numeraire: Float[ArrayLike, ""],
    reserve_asset: Float[ArrayLike, ""],
    price: Float[ArrayLike, ""],
) -> UniswapArb:
    """Closed-form arbitrage of §2.3.2's example, G(x) = R₂x/(R₁ + x), at market price p.

    G'(x) = R₁R₂/(R₁ + x)², so G'(x*) = 1/p gives x* = √(pR₁R₂) − R₁. This holds on the whole
    domain x > −R₁ (G is the constant-product rule both ways), so for p < p₀ = R₁/R₂ x* < 0:
    the arbitrageur sells the asset. Then G(x*) = R₂ − √(R₁R₂/p) and the profit and LP loss
    are both R₁ + pR₂ − 2√(pR₁R₂) = (√R₁ − √(pR₂))² ≥ 0, the paper's expression. It equals
    the divergence ("impermanent") loss at p, hold value R₁ + pR₂ minus pool value 2√(pR₁R₂):
    for one arbitrage from a pool quoting p₀ the two coincide. It is not LVR, which
    accumulates over continuous rebalancing.
    """
    r1 = jnp.asarray(reserve_numeraire)
    r2 = jnp.asarray(reserve_asset, r1.dtype)
    p = jnp.asarray(price, r1.dtype)
    root = jnp.sqrt(p * r1 * r2)
    x_star = root - r1
    asset_out = r2 * x_star / (r1 + x_star)
    profit = p * asset_out - x_star
    value_after = (r1 + x_star) + p * (r2 - asset_out)
    return UniswapArb(
        x_star=x_star,
        asset_out=asset_out,
        profit=profit,
        lp_loss=-(x_star - p * asset_out),
        divergence_loss=(r1 + p * r2) - value_after,
    )


def uniswap_fee_bound(
    reserve_numeraire: Float[ArrayLike, ""],
    open_interest: Float[ArrayLike, ""],
    max_ratio: Float[ArrayLike, ""],
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Lending fee f that keeps LPs profitable for price moves 1 < p/p₀ ≤ B (§2.3.3, example).

    With ℓ = L₀(p/p₀ − 1) (eq. 3) and the loss R₁(√r − 1)² at r = p/p₀, fℓ ≥ loss needs
    f ≥ R₁(√r − 1)/(L₀(√r + 1)), increasing in r: the tight bound is R₁(√B − 1)/(L₀(√B + 1)).
    The paper's (B − 1)R₁/L₀ is valid but looser by the factor (√B + 1)².
    **Returns:** `(tight, paper)`.
    """
    r1 = jnp.asarray(reserve_numeraire)
    l0 = jnp.asarray(open_interest, r1.dtype)
    b = jnp.asarray(max_ratio, r1.dtype)
    sb = jnp.sqrt(b)
    return r1 * (sb - 1.0) / (l0 * (sb + 1.0)), (b - 1.0) * r1 / l0


class OracleSwapArb(eqx.Module):
    """Best swap against an oracle-priced pool with GMX swap fees (tokens 0 and 1)."""

    exists: Bool[Array, ""]
    token_in: Int[Array, ""]  # 0 or 1 (the other token goes out)
    size_usd: Float[Array, ""]  # USDG value of the input at oracle prices
    fee_bps: Int[Array, ""]
    profit: Float[Array, ""]  # arbitrageur, at market prices
    lp_loss: Float[Array, ""]  # = profit: the swap is zero-sum at market prices
    fee_paid: Float[Array, ""]  # size · fee (part of what the pool keeps)


def swap_arbitrage_oracle(
    oracle_prices: Float[Array, " 2"],
    market_prices: Float[Array, " 2"],
    usdg_amounts: Float[Array, " 2"],
    target_amounts: Float[Array, " 2"],
    available: Float[Array, " 2"],
    *,
    stable_swap: Bool[ArrayLike, ""] = False,
    swap_bps: ArrayLike = SWAP_BPS,
    tax_bps: ArrayLike = TAX_BPS,
    dynamic: Bool[ArrayLike, ""] = True,
    num_sizes: int = 64,
) -> OracleSwapArb:
    """A GMX v1 swap at oracle prices: one arbitrage event between tokens 0 and 1.

    Swapping s USD of token a (at oracle price o_a) pays out s(1 − φ)/o_b of token b, φ the
    swap fee (`swap_fee_bps`, dynamic in s). At market prices m the profit is
    s·((1 − φ)·m_b/o_b − m_a/o_a): with flat fees an arbitrage exists iff the market moved
    against the oracle by more than the fee, (m_b/o_b)/(m_a/o_a) > 1/(1 − φ). With no price
    impact the size is limited by the available out-token and by the dynamic fee (which
    grows with s once the trade worsens balance), so the best size is taken on a grid of
    `num_sizes` (static) sizes up to the out-token's available value at the oracle. The LP
    loses exactly the arbitrageur's profit.

    **Arguments:** prices, USDG amounts I, targets T and available R^A (tokens), shape `(2,)`.
    """
    o = jnp.asarray(oracle_prices)
    m = jnp.asarray(market_prices, o.dtype)
    usdg = jnp.asarray(usdg_amounts, o.dtype)
    target = jnp.asarray(target_amounts, o.dtype)
    avail = jnp.asarray(available, o.dtype)
    fracs = jnp.arange(1, num_sizes + 1, dtype=o.dtype) / num_sizes

    def direction(a: int):
        b = 1 - a
        sizes = fracs * avail[b] * o[b]
        fee = jax.vmap(
            lambda s: swap_fee_bps(
                usdg[a],
                usdg[b],
                s,
                target[a],
                target[b],
                stable_swap=stable_swap,
                swap_bps=swap_bps,
                tax_bps=tax_bps,
                dynamic=dynamic,
            )
        )(sizes)
        keep = 1.0 - fee.astype(o.dtype) / BASIS_POINTS
        profit = sizes * (keep * m[b] / o[b] - m[a] / o[a])
        k = jnp.argmax(profit)
        return profit[k], sizes[k], fee[k]

    p0, s0, f0 = direction(0)
    p1, s1, f1 = direction(1)
    use1 = p1 > p0
    profit = jnp.where(use1, p1, p0)
    exists = profit > 0
    size = jnp.where(exists, jnp.where(use1, s1, s0), 0.0)
    fee = jnp.where(use1, f1, f0)
    profit = jnp.where(exists, profit, 0.0)
    return OracleSwapArb(
        exists=exists,
        token_in=use1.astype(fee.dtype),
        size_usd=size,
        fee_bps=fee,
        profit=profit,
        lp_loss=profit,
        fee_paid=size * fee.astype(o.dtype) / BASIS_POINTS,
    )


# --------------------------------------------------------------------------- claims


class ClaimCheck(eqx.Module):
    """A measured quantity against a claim's bound, as printed and corrected."""

    value: Float[Array, ""]
    bound: Float[Array, ""]  # as printed
    holds: Bool[Array, ""]
    margin: Float[Array, ""]  # bound − value (≥ 0 when it holds)
    bound_corrected: Float[Array, ""]
    holds_corrected: Bool[Array, ""]
    margin_corrected: Float[Array, ""]


def _check(value, bound, corrected) -> ClaimCheck:
    value = jnp.asarray(value)
    bound = jnp.asarray(bound, value.dtype)
    corrected = jnp.asarray(corrected, value.dtype)
    return ClaimCheck(
        value=value,
        bound=bound,
        holds=value <= bound,
        margin=bound - value,
        bound_corrected=corrected,
        holds_corrected=value <= corrected,
        margin_corrected=corrected - value,
    )


def claim_3_1_bound(
    distance: Float[ArrayLike, ""],
    G: Float[ArrayLike, ""],
    mu: Float[ArrayLike, ""],
    constrained: bool = True,
) -> ClaimCheck:
    """Claim 3.1: ‖δ_F − δ_H‖ ≤ 2G/μ (≤ √G/μ when the constraint is inactive).

    G bounds ‖∇f‖² (squared). On a domain where that max is finite (it is not on Rⁿ: the
    gradient of a strongly concave f is unbounded) the proof's own steps give, with
    Cauchy–Schwarz, μ/2 ‖d‖² ≤ ∇f(δ_H)ᵀd ≤ √G ‖d‖, i.e. ‖d‖ ≤ 2√G/μ: the printed 2G/μ
    mixes G and √G and fails for G < 1/4 (a test exhibits it). The unconstrained bound √G/μ
    (from Polyak–Łojasiewicz) is right as printed. `constrained` is static.
    """
    G = jnp.asarray(G)
    mu = jnp.asarray(mu, G.dtype)
    if constrained:
        return _check(distance, 2.0 * G / mu, 2.0 * jnp.sqrt(G) / mu)
    return _check(distance, jnp.sqrt(G) / mu, jnp.sqrt(G) / mu)


def claim_3_2_bound(
    distance: Float[ArrayLike, ""],
    G: Float[ArrayLike, ""],
    mu: Float[ArrayLike, ""],
) -> ClaimCheck:
    """Claim 3.2: ‖δ_S − δ_H‖ ≤ 4G/μ, δ_S the maximiser of S(δ) = f(δ)·pᵀδ.

    The printed proof applies Claim 3.1 to δ_S, but 3.1 is about δ_H only. A correct
    argument: h(δ) = gᵀδ − μ/2‖δ‖² ≥ f(δ), so any δ with f(δ) ≥ 0 (in particular a profitable
    deposit-side δ_S) lies in {h ≥ 0}, the ball of centre g/μ = δ_H and radius ‖g‖/μ; the
    projection onto δ ≥ −R^A is non-expansive. Hence ‖δ_S − δ_H‖ ≤ ‖g‖/μ ≤ √G/μ (corrected,
    for f(δ_S) ≥ 0; with f(δ_S) < 0 and pᵀδ_S < 0 no bound of this kind exists, see
    `create_arbitrage`).
    """
    G = jnp.asarray(G)
    mu = jnp.asarray(mu, G.dtype)
    return _check(distance, 4.0 * G / mu, jnp.sqrt(G) / mu)


def claim_3_3_bound(
    gap: Float[ArrayLike, ""],
    G: Float[ArrayLike, ""],
    mu: Float[ArrayLike, ""],
    prices: Float[Array, " n"],
    C: Float[ArrayLike, ""] | None = None,
) -> ClaimCheck:
    """Claim 3.3: S(δ_S) − S(δ_F) ≤ (40 + 8/C)‖p‖₂ G³/μ², C ≤ minᵢ pᵢ (default: minᵢ pᵢ).

    The proof uses |f(δ)| ≤ G‖δ‖ (G as a Lipschitz constant, not a bound on ‖∇f‖² as in
    Claim 3.1) and 8G²/μ ≤ (8/‖p‖)‖p‖G³/μ², true only when G ≥ μ. Corrected, with G as in
    Claim 3.1 and f(δ_S) ≥ 0: f ≤ max h = ‖g‖²/2μ and ‖δ‖ ≤ 2‖g‖/μ on {f ≥ 0}, so
    |S(δ_S)|, |S(δ_F)| ≤ ‖p‖‖g‖³/μ² and the gap is at most 2‖p‖G^{3/2}/μ².
    """
    G = jnp.asarray(G)
    mu = jnp.asarray(mu, G.dtype)
    prices = jnp.asarray(prices, G.dtype)
    c = jnp.min(prices) if C is None else jnp.asarray(C, G.dtype)
    pn = _norm(prices)
    printed = (40.0 + 8.0 / c) * pn * G**3 / mu**2
    return _check(gap, printed, 2.0 * pn * G**1.5 / mu**2)


class Claim34(eqx.Module):
    """Claim 3.4 evaluated at one point: Δ = ∇_p V_new against (1/2 − f)·R."""

    delta: Float[Array, " n"]  # ∇_p V_new by autodiff
    bound: Float[Array, " n"]  # (1/2 − f)·R, as printed
    holds: Bool[Array, ""]  # Δ ≤ bound elementwise
    margin: Float[Array, ""]  # minᵢ (bound − Δ)ᵢ
    bound_corrected: Float[Array, " n"]  # (1/(1+F) − 8f/(1+F)² + f)·R
    holds_corrected: Bool[Array, ""]
    hypotheses: Bool[Array, ""]  # ∇_p F ≥ 8fR/pᵀR, F ≤ 1, ℓ ≤ R
    grad_hypothesis: Bool[Array, ""]
    discount: Float[Array, ""]  # F
    grad_discount: Float[Array, " n"]  # ∇_p F


def claim_3_4(
    F: Callable[[Float[Array, " n"]], Float[Array, ""]],
    prices: Float[Array, " n"],
    reserves: Float[Array, " n"],
    lent: Float[Array, " n"],
    fee: Float[ArrayLike, ""],
) -> Claim34:
    """Claim 3.4: if ∇_p F ≥ 8fR/pᵀR and F ≤ 1 then ∇_p V_new ≤ (1/2 − f)·∇_p V_old = (1/2 − f)R.

    `F` maps prices p to F(p, w*, R, δ) (a closure over w*, R, δ); V_new(p) = pᵀR/(1 + F(p))
    + f·pᵀℓ; Δ = jax.grad(V_new). The printed proof bounds R/(1 + F) by R/2 using F ≤ 1,
    which needs F ≥ 1 (F ≤ 1 gives R/(1 + F) ≥ R/2); with the gradient step, which does use
    F ≤ 1, the proof holds only at F = 1. From the same hypotheses (and R ≥ 0) the true bound
    is (1/(1 + F) − 8f/(1 + F)² + f)·R, which is ≈ (1 − 7f)R for small F, so the claim as
    printed fails for small discounts (a test exhibits one).
    """
    prices = jnp.asarray(prices)
    reserves = jnp.asarray(reserves, prices.dtype)
    lent = jnp.asarray(lent, prices.dtype)
    fee = jnp.asarray(fee, prices.dtype)

    def value_new(p):
        return _dot(p, reserves) / (1.0 + F(p)) + fee * _dot(p, lent)

    delta = jax.grad(value_new)(prices)
    disc, grad_disc = jax.value_and_grad(F)(prices)
    value = _dot(prices, reserves)
    grad_ok = jnp.all(grad_disc >= 8.0 * fee * reserves / value)
    hyp = grad_ok & (disc <= 1.0) & jnp.all(lent <= reserves)
    bound = (0.5 - fee) * reserves
    u = 1.0 / (1.0 + disc)
    corrected = (u - 8.0 * fee * u * u + fee) * reserves
    return Claim34(
        delta=delta,
        bound=bound,
        holds=jnp.all(delta <= bound),
        margin=jnp.min(bound - delta),
        bound_corrected=corrected,
        holds_corrected=jnp.all(delta <= corrected),
        hypotheses=hyp,
        grad_hypothesis=grad_ok,
        discount=disc,
        grad_discount=grad_disc,
    )
