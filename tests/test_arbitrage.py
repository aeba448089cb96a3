"""Tests of the arbitrage solvers, swap arbitrage and the paper's Claims 3.1-3.4.

Solvers are compared with brute force on dense 2-D grids (float64). Claim checks use
explicit examples; where a claim as printed fails, the test shows the failure and that the
corrected bound holds.
"""

from __future__ import annotations

import functools as ft

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdlpjax.arbitrage import (
    claim_3_1_bound,
    claim_3_2_bound,
    claim_3_3_bound,
    claim_3_4,
    create_arbitrage,
    redeem_arbitrage,
    swap_arbitrage_oracle,
    swap_arbitrage_uniswap,
    uniswap_fee_bound,
)
from pdlpjax.discount import glp_discount_smooth

MU = 2.0
CURV = 0.5  # weight of the extra concave term Σ log cosh δ_i
PRICES = np.array([1.0, 2.0])


def make_F(g, xp=jnp):
    """μ-strongly concave F with F(0) = 0 and ∇F(0) = g (quadratic − Σ log cosh)."""

    def F(d):
        d0, d1 = d[0], d[1]
        quad = g[0] * d0 + g[1] * d1 - 0.5 * MU * (d0 * d0 + d1 * d1)
        return quad - CURV * (xp.log(xp.cosh(d0)) + xp.log(xp.cosh(d1)))

    return F


def grad_F_np(g, d0, d1):
    return g[0] - MU * d0 - CURV * np.tanh(d0), g[1] - MU * d1 - CURV * np.tanh(d1)


def grid(lo, hi, num=2001):
    x = np.linspace(lo[0], hi[0], num)
    y = np.linspace(lo[1], hi[1], num)
    return np.meshgrid(x, y, indexing="ij"), np.array([x[1] - x[0], y[1] - y[0]])


def argmax2(values, X, Y):
    i = np.unravel_index(np.argmax(values), values.shape)
    return np.array([X[i], Y[i]]), values[i]


# --------------------------------------------------------------------------- creation, eq. 7


@pytest.mark.parametrize(
    "g, available",
    [
        (np.array([0.3, -0.1]), np.array([0.05, 0.05])),  # interior optimum
        (np.array([0.3, -0.4]), np.array([0.05, 0.02])),  # δ_2 ≥ −R^A_2 active
    ],
)
def test_create_matches_brute_force(g, available):
    with jax.enable_x64(True):
        res = jax.jit(lambda: create_arbitrage(make_F(g), PRICES, available, MU))()
    (X, Y), step = grid(-available, np.array([0.4, 0.3]))
    S = make_F(g, np)(np.stack([X, Y])) * (PRICES[0] * X + PRICES[1] * Y)
    d_grid, s_grid = argmax2(S, X, Y)
    trade = np.asarray(res.trade)
    assert np.all(trade >= -available)  # feasible
    assert float(res.profit) >= s_grid - 1e-12  # at least as good as the grid
    assert np.all(np.abs(trade - d_grid) <= step)  # and at the grid's optimum
    assert float(res.profit) == pytest.approx(float(make_F(g, np)(trade) * PRICES @ trade))
    # Claim 3.1's bound holds between the solver and the brute-force optimum of S
    G = float(np.max(np.add(*(np.square(grad_F_np(g, X, Y))))))
    assert claim_3_1_bound(np.linalg.norm(trade - d_grid), G, MU).holds
    if g[1] == -0.4:
        assert trade[1] == pytest.approx(-available[1])


def test_create_recovers_from_a_poor_step_size():
    # The line search carries the accepted scale on (×4 per step at most), so an initial step
    # ~7000 times below the default 1/‖∇²S‖_F ≈ 7 still converges within 30 steps.
    g = np.array([0.3, -0.1])
    available = np.array([0.05, 0.05])
    with jax.enable_x64(True):
        res = jax.jit(
            lambda: create_arbitrage(make_F(g), PRICES, available, MU, num_steps=30, step_size=1e-3)
        )()
    assert float(res.profit) == pytest.approx(0.0027353, rel=1e-4)


def test_create_global_optimum_is_full_withdrawal_for_large_pools():
    # Eq. 7 rewards withdrawals with F < 0, and F·pᵀδ grows like ‖δ‖³ toward −R^A: with
    # R^A = (2, 2) the global maximum is the full withdrawal, far from the solver's local one.
    g = np.array([0.3, -0.1])
    available = np.array([2.0, 2.0])
    with jax.enable_x64(True):
        F = make_F(g)
        res = jax.jit(lambda: create_arbitrage(F, PRICES, available, MU))()
        corner = float(F(-available) * (PRICES @ -available))
    assert float(res.profit) == pytest.approx(0.0027353, rel=1e-4)
    assert corner > 1000 * float(res.profit)  # ≈ 46.8 (≈ 50.4 for the purely quadratic F)


def test_create_solver_vmaps_and_float32():
    gs = np.array([[0.3, -0.1], [0.2, 0.1], [-0.1, 0.25], [0.0, 0.0]])
    available = np.array([0.05, 0.05])

    def solve(g):
        return create_arbitrage(make_F(g), PRICES, available, MU, num_steps=60)

    with jax.enable_x64(False):  # float32 even in an x64 CI job
        out32 = jax.jit(jax.vmap(solve))(gs.astype(np.float32))
    assert out32.trade.dtype == jnp.float32
    with jax.enable_x64(True):
        out64 = jax.jit(jax.vmap(solve))(gs)
        single = jax.jit(solve)
        loop = [single(g) for g in gs]
    np.testing.assert_allclose(np.asarray(out32.profit), np.asarray(out64.profit), rtol=1e-3)
    np.testing.assert_allclose(
        np.asarray(out64.profit), [float(r.profit) for r in loop], rtol=1e-12
    )
    # g = 0: δ_H = 0 is optimal (F ≤ 0), no trade
    assert float(out64.profit[-1]) == 0.0 and np.all(np.asarray(out64.trade[-1]) == 0.0)
    assert np.all(np.asarray(out64.profit) >= np.asarray(out64.surrogate_profit) - 1e-15)


# --------------------------------------------------------------------------- redemption, eq. 10


@pytest.mark.parametrize("available", [np.array([0.2, 0.2]), np.array([0.2, 0.04])])
def test_redeem_matches_brute_force(available):
    g = np.array([0.3, -0.1])  # f(λ) = F(−λ) > 0 for small λ_2 > 0
    with jax.enable_x64(True):
        res = jax.jit(lambda: redeem_arbitrage(make_F(g), PRICES, available, MU))()
    (X, Y), step = grid(np.zeros(2), available)
    f = make_F(g, np)(-np.stack([X, Y]))
    obj = (PRICES[0] * X + PRICES[1] * Y) * f / (1 + f)
    lam_grid, v_grid = argmax2(obj, X, Y)
    lam = np.asarray(res.trade)
    assert np.all(lam >= 0) and np.all(lam <= available)
    assert float(res.profit) >= v_grid - 1e-12
    assert np.all(np.abs(lam - lam_grid) <= step)
    # surrogate start: λ_H = clip(−g/μ, 0, R^A)
    np.testing.assert_allclose(res.surrogate, np.clip(-g / MU, 0, available))
    if available[1] == 0.04:
        assert lam[1] == pytest.approx(0.04)
    else:  # interior: with λ_1 = 0, pᵀλ·f ≈ 2λ(0.1λ − 1.25λ²), maximal at λ_2 ≈ 0.053
        assert 0.045 < lam[1] < 0.06 and lam[0] == 0.0


# --------------------------------------------------------------------------- swaps


@pytest.mark.parametrize("price", [2.5, 3.7, 1.2])  # p₀ = R₁/R₂ = 2: up, far up, down
def test_uniswap_arbitrage(price):
    r1, r2 = 100.0, 50.0
    with jax.enable_x64(True):
        arb = swap_arbitrage_uniswap(r1, r2, price)

        def G(x):
            return r2 * x / (r1 + x)

        slope = jax.grad(G)(arb.x_star)
    assert float(slope) == pytest.approx(1.0 / price, rel=1e-12)  # G'(x*) = 1/p
    xs = np.linspace(-0.9 * r1, 3 * r1, 400_001)
    brute = np.max(price * r2 * xs / (r1 + xs) - xs)
    assert float(arb.profit) == pytest.approx(brute, rel=1e-8)
    paper = r1 + price * r2 - 2 * np.sqrt(price * r1 * r2)  # the paper's LP loss
    assert float(arb.lp_loss) == pytest.approx(paper, rel=1e-12)
    assert float(arb.divergence_loss) == pytest.approx(paper, rel=1e-10)
    assert float(arb.profit) == pytest.approx(float(arb.lp_loss), rel=1e-12)
    assert (float(arb.x_star) > 0) == (price > r1 / r2)


def test_uniswap_fee_bound():
    r1, l0, b = 100.0, 500.0, 1.5
    with jax.enable_x64(True):
        tight, paper = (float(v) for v in uniswap_fee_bound(r1, l0, b))
        ratios = np.linspace(1.0001, b, 200)
        loss = np.asarray(
            jax.vmap(lambda p: swap_arbitrage_uniswap(r1, r1 / 2, p).lp_loss)(2 * ratios)
        )
    assert paper >= tight
    ell = l0 * (ratios - 1)  # eq. 3
    lp_profit = tight * ell - loss
    assert np.all(lp_profit >= -1e-12)  # LPs profitable at the tight fee...
    assert lp_profit[-1] == pytest.approx(0.0, abs=1e-9)  # ...and it binds at p/p₀ = B
    assert paper == pytest.approx(tight * (np.sqrt(b) + 1) ** 2)


def test_oracle_swap_threshold_and_dynamic_fee():
    usdg = np.array([5e5, 5e5])
    target = np.array([5e5, 5e5])
    available = np.array([100.0, 4e5])  # 100 ETH (200k USD), 400k USD
    oracle = np.array([2000.0, 1.0])
    phi = 30 / 1e4
    threshold = 1 / (1 - phi)  # market/oracle ratio above which buying ETH pays (flat fee)
    cases = [
        (1.0, False),
        (1.001, False),
        (threshold * 0.9999, False),
        (threshold * 1.0001, True),
        (0.996, True),
        (0.998, False),
    ]
    # float64: the profit is s·((1 − φ)·ratio − 1), a difference of numbers near 1
    with jax.enable_x64(True):
        flat = jax.jit(ft.partial(swap_arbitrage_oracle, dynamic=False))
        arbs = [
            flat(oracle, np.array([2000.0 * r, 1.0]), usdg, target, available) for r, _ in cases
        ]
    for (ratio, exists), arb in zip(cases, arbs, strict=True):
        assert bool(arb.exists) == exists, ratio
        assert int(arb.fee_bps) == 30
        if exists:
            assert int(arb.token_in) == (1 if ratio > 1 else 0)
            size = float(arb.size_usd)
            # input of size s: profit s((1 − φ)·m_out/o_out − m_in/o_in)
            edge = (1 - phi) * ratio - 1 if ratio > 1 else (1 - phi) - ratio
            assert float(arb.profit) == pytest.approx(size * edge, rel=1e-5)
            assert float(arb.lp_loss) == float(arb.profit)
    # dynamic fees on a balanced pool: buying 200k of ETH with USD moves both tokens away
    # from target: I = 5e5, d1 = 2e5, avg 1e5, ⌊50·1e5/5e5⌋ = 10 → 40 bps at the full size.
    market = np.array([2030.0, 1.0])
    arb = jax.jit(swap_arbitrage_oracle)(oracle, market, usdg, target, available)
    assert int(arb.fee_bps) == 40 and float(arb.size_usd) == pytest.approx(2e5)
    assert float(arb.profit) == pytest.approx(2e5 * (0.996 * 1.015 - 1), rel=1e-5)
    assert float(arb.fee_paid) == pytest.approx(2e5 * 40e-4, rel=1e-5)
    # jit + vmap over market prices
    ms = np.stack([np.linspace(1900, 2100, 9), np.ones(9)], axis=1)
    batched = jax.jit(jax.vmap(swap_arbitrage_oracle, in_axes=(None, 0, None, None, None)))(
        oracle, ms, usdg, target, available
    )
    assert np.asarray(batched.exists).tolist() == [True] * 4 + [False] + [True] * 4


# --------------------------------------------------------------------------- claims 3.1-3.3


def relevant_G(g, points, num=401):
    """max ‖∇f‖² over the smallest box holding `points` (where the claims' points live)."""
    lo, hi = points.min(0), points.max(0)
    (X, Y), _ = grid(lo, hi, num)
    gx, gy = grad_F_np(g, X, Y)
    return float(np.max(gx * gx + gy * gy))


def measured_claim_quantities(g, available):
    with jax.enable_x64(True):
        res = jax.jit(lambda: create_arbitrage(make_F(g), PRICES, available, MU, num_steps=200))()
    scale = float(np.linalg.norm(g))
    (X, Y), _ = grid(-available, np.array([0.4, 0.3]) * scale / 0.316)
    f = make_F(g, np)(np.stack([X, Y]))
    S = f * (PRICES[0] * X + PRICES[1] * Y)
    d_s, s_s = argmax2(S, X, Y)
    d_f, _ = argmax2(f, X, Y)
    d_h = np.asarray(res.surrogate)
    s_f = float(make_F(g, np)(d_f) * PRICES @ d_f)
    G = relevant_G(g, np.stack([np.zeros(2), d_h, d_f, d_s]))
    return d_h, d_f, d_s, s_s - s_f, G


def test_claims_3_1_to_3_3_large_gradient_hold_as_printed():
    d_h, d_f, d_s, gap, G = measured_claim_quantities(np.array([0.3, -0.1]), np.full(2, 0.05))
    checks = [
        claim_3_1_bound(np.linalg.norm(d_f - d_h), G, MU),
        claim_3_2_bound(np.linalg.norm(d_s - d_h), G, MU),
        claim_3_3_bound(gap, G, MU, PRICES),
    ]
    for c in checks:
        assert bool(c.holds) and bool(c.holds_corrected)


def test_claims_3_1_to_3_3_fail_as_printed_for_small_gradients():
    # Same F with g ten times smaller: distances scale like ‖g‖, the printed bounds like
    # ‖g‖² (3.1, 3.2) and ‖g‖⁶ (3.3), so they fail; the corrected ones scale correctly.
    d_h, d_f, d_s, gap, G = measured_claim_quantities(np.array([0.03, -0.01]), np.full(2, 0.005))
    c31 = claim_3_1_bound(np.linalg.norm(d_f - d_h), G, MU)
    c32 = claim_3_2_bound(np.linalg.norm(d_s - d_h), G, MU)
    c33 = claim_3_3_bound(gap, G, MU, PRICES)
    assert not bool(c31.holds) and bool(c31.holds_corrected)
    assert not bool(c32.holds) and bool(c32.holds_corrected)
    assert not bool(c33.holds) and bool(c33.holds_corrected)
    # the unconstrained 3.1 bound √G/μ is right as printed
    assert bool(claim_3_1_bound(np.linalg.norm(d_f - d_h), G, MU, constrained=False).holds)


def test_claim_3_1_one_dimensional_counterexample():
    # f(δ) = −δ²/2 − min(δ, 0)²/2 − 0.1δ: 1-strongly concave, f(0) = 0, g = −0.1, δ_H = −0.1;
    # f'(δ) = −2δ − 0.1 for δ < 0, so δ_F = −0.05. On [−0.1, 0] max |f'|² = 0.01 = G.
    # ‖δ_F − δ_H‖ = 0.05 > 2G/μ = 0.02, but ≤ 2√G/μ = 0.2 and ≤ √G/μ = 0.1.
    c = claim_3_1_bound(0.05, 0.01, 1.0)
    assert not bool(c.holds) and float(c.margin) == pytest.approx(-0.03)
    assert bool(c.holds_corrected) and float(c.bound_corrected) == pytest.approx(0.2)


# --------------------------------------------------------------------------- claim 3.4


def test_claim_3_4_gradient_matches_central_differences():
    with jax.enable_x64(True):
        ws = jnp.array([0.5, 0.3, 0.2])
        reserves = jnp.array([0.3, 0.5, 0.9])
        delta = jnp.array([0.1, -0.05, 0.2])
        lent = 0.4 * reserves
        fee = 0.01

        def F(p):
            return glp_discount_smooth(p, ws, reserves, delta, 0.0025, 0.005, 1e-2)

        @jax.jit
        def value_new(p):
            return p @ reserves / (1 + F(p)) + fee * p @ lent

        p0 = jnp.array([2.0, 1.0, 0.5])
        res = jax.jit(lambda p: claim_3_4(F, p, reserves, lent, fee))(p0)
        h = 1e-6
        fd = [(value_new(p0 + e) - value_new(p0 - e)) / (2 * h) for e in jnp.eye(3) * h]
        np.testing.assert_allclose(res.delta, fd, rtol=1e-7)


def test_claim_3_4_fails_for_small_discounts_and_holds_at_F_equal_1():
    fee = 0.01
    reserves = jnp.array([1.0, 2.0])
    prices = jnp.array([3.0, 1.0])
    lent = 0.5 * reserves
    v0 = float(prices @ reserves)

    def make(level):  # ∇_p F = 9fR/pᵀR ≥ 8fR/pᵀR, F(p₀) = level
        return lambda p: level + 9 * fee * jnp.log(p @ reserves / v0)

    with jax.enable_x64(True):
        small = jax.jit(lambda p: claim_3_4(make(0.01), p, reserves, lent, fee))(prices)
        one = jax.jit(lambda p: claim_3_4(make(1.0), p, reserves, lent, fee))(prices)
    # hypotheses hold, yet Δ ≈ (1/1.01 − 0.09/1.01² + 0.005)R ≈ 0.907R > 0.49R
    assert bool(small.hypotheses) and not bool(small.holds)
    np.testing.assert_allclose(
        small.delta, (1 / 1.01 - 9 * fee / 1.01**2 + fee * 0.5) * reserves, rtol=1e-12
    )
    assert bool(small.holds_corrected)
    # at F = 1: Δ = R/2 − (9/4)fR + fℓ = (0.5 − 0.0225 + 0.005)R ≤ 0.49R
    assert bool(one.hypotheses) and bool(one.holds) and bool(one.holds_corrected)


def test_ascent_gradient_is_finite_when_the_hessian_is_zero():
    """θ·Σx³ + Σx has a zero Hessian at x = 0 (6θx), so the initial step 1/‖∇²‖ falls back
    to 1. Its gradient once came out NaN (0 · inf through the guarded 1/√(Σ H²)), which made
    every pathwise gradient of a pool with a discount NaN. The step size carries no gradient
    now: the value at the box's corner x* = (1, 1) is 2θ + 2, so d/dθ = 2."""
    from pdlpjax.arbitrage import _projected_ascent

    def value(theta):
        objective = lambda x: theta * jnp.sum(x**3) + jnp.sum(x)  # noqa: E731
        project = lambda x: jnp.clip(x, 0.0, 1.0)  # noqa: E731
        x, v, _ = _projected_ascent(objective, project, jnp.zeros(2), 8, None)
        return v

    with jax.enable_x64(True):
        g = jax.grad(value)(jnp.asarray(0.3))
    assert np.isfinite(float(g))
    assert float(g) == pytest.approx(2.0)
