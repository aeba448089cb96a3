"""Tests of Schur damping (Cotton 2026) and Claim B.1 (Chitra et al. 2025, App. B).

All in float64. NumPy's explicit inverse is used here only as an independent reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from pdlpjax.hedge import mean_variance_hedge
from pdlpjax.schur import (
    claim_b1,
    claim_b1_chitra_notation,
    coupling_rho,
    damped_blocks,
    damped_hedge,
    gamma_star,
    merged_hedge,
    schur_complements,
    split_blocks,
)

SIZES = [(1, 1), (2, 3), (4, 4)]
SEEDS = [0, 1, 2]


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def random_spd(seed: int, n: int) -> np.ndarray:
    """A random well-but-not-too-well conditioned SPD matrix with non-trivial coupling."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n + 2)) * rng.uniform(0.5, 2.0, size=(n, 1))
    return x @ x.T / (n + 2) + 0.05 * np.eye(n)


def np_blocks(cov: np.ndarray, m1: int):
    return cov[:m1, :m1], cov[:m1, m1:], cov[m1:, m1:]


# --------------------------------------------------------------------------- damped blocks


@pytest.mark.parametrize("m1, m2", SIZES)
@pytest.mark.parametrize("seed", SEEDS)
def test_damped_block_endpoints_and_definiteness(seed, m1, m2):
    cov = random_spd(seed, m1 + m2)
    a, b, c = np_blocks(cov, m1)
    inv = np.linalg.inv
    s_c = a - b @ inv(c) @ b.T
    s_a = c - b.T @ inv(a) @ b
    got_a, got_b, got_c = split_blocks(jnp.asarray(cov), m1)
    np.testing.assert_array_equal(got_a, a)
    np.testing.assert_array_equal(got_b, b)
    np.testing.assert_array_equal(got_c, c)
    sc, sa = schur_complements(jnp.asarray(cov), m1)
    np.testing.assert_allclose(sc, s_c, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sa, s_a, rtol=1e-10, atol=1e-12)
    # the pool-1 block of Σ⁻¹ is (Σ/C)⁻¹, the pool-2 block (Σ/A)⁻¹
    np.testing.assert_allclose(inv(cov)[:m1, :m1], inv(np.asarray(sc)), rtol=1e-9)
    np.testing.assert_allclose(inv(cov)[m1:, m1:], inv(np.asarray(sa)), rtol=1e-9)

    blocks = jax.jit(jax.vmap(damped_blocks, in_axes=(None, None, 0)), static_argnums=1)
    grid = np.linspace(0.0, 1.0, 11)
    a_g, c_g = blocks(jnp.asarray(cov), m1, jnp.asarray(grid))
    np.testing.assert_allclose(a_g[0], a, rtol=1e-12)
    np.testing.assert_allclose(c_g[0], c, rtol=1e-12)
    np.testing.assert_allclose(a_g[-1], s_c, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c_g[-1], s_a, rtol=1e-10, atol=1e-12)
    for k, g in enumerate(grid):
        np.testing.assert_allclose(a_g[k], (1 - g) * a + g * s_c, rtol=1e-10, atol=1e-12)
        assert np.linalg.eigvalsh(np.asarray(a_g[k])).min() > 0
        assert np.linalg.eigvalsh(np.asarray(c_g[k])).min() > 0


def test_damped_blocks_differentiable_in_cov():
    cov = random_spd(3, 5)
    rng = np.random.default_rng(4)
    e = rng.normal(size=(5, 5))
    e = e + e.T  # symmetric direction, so Σ stays a covariance

    def f(t):
        a_g, c_g = damped_blocks(jnp.asarray(cov) + t * e, 2, 0.6)
        return jnp.sum(a_g * a_g) + jnp.sum(c_g)

    h = 1e-5
    fd = (f(h) - f(-h)) / (2 * h)
    assert float(jax.grad(f)(0.0)) == pytest.approx(float(fd), rel=1e-6)


# --------------------------------------------------------------------------- γ*


def test_gamma_star_values():
    assert float(gamma_star(0.0, 10)) == 0.0
    assert float(gamma_star(1.0, 10)) == 1.0
    assert float(gamma_star(-1.0, 3)) == 1.0
    # 8·0.09 / (8·0.09 + 0.91) = 0.72 / 1.63
    assert float(gamma_star(0.3, 10)) == pytest.approx(0.72 / 1.63, rel=1e-14)
    assert float(gamma_star(-0.3, 10)) == pytest.approx(0.72 / 1.63, rel=1e-14)
    for rho in (0.01, 0.3, -0.7):
        assert float(gamma_star(rho, 1e9)) == pytest.approx(1.0, abs=1e-4)
    # monotone in ρ² and n
    assert float(gamma_star(0.3, 10)) < float(gamma_star(0.3, 20)) < float(gamma_star(0.5, 20))
    np.testing.assert_allclose(
        gamma_star(jnp.array([0.0, 0.3]), jnp.array([10.0, 10.0])), [0.0, 0.72 / 1.63]
    )


@pytest.mark.parametrize("n", [2, 1, 2.0, np.float64(0.5), np.array([10, 2])])
def test_gamma_star_rejects_too_few_returns(n):
    with pytest.raises(ValueError, match="n > 2"):
        gamma_star(0.3, n)


def test_gamma_star_traced_n_gives_nan_below_three():
    out = jax.jit(gamma_star)(jnp.array([0.3, 0.3, 0.0]), jnp.array([10.0, 2.0, 1.0]))
    assert float(out[0]) == pytest.approx(0.72 / 1.63)
    assert np.isnan(out[1]) and np.isnan(out[2])
    grad = jax.grad(lambda r: jax.jit(gamma_star)(r, 10.0))(0.3)
    # d/dρ of 8ρ²/(8ρ² + 1 − ρ²) = 16ρ / (7ρ² + 1)²
    assert float(grad) == pytest.approx(16 * 0.3 / (7 * 0.09 + 1) ** 2, rel=1e-12)


def test_gamma_star_is_the_optimal_slope_shrinkage_monte_carlo():
    """γ* is the Wiener ratio β²/(β² + Var β̂) of a regression slope estimated from n returns,
    i.e. the c minimising the out-of-sample MSE E[(cβ̂ − β)²], whose minimiser is
    c = β E[β̂] / E[β̂²]. Its noise term (1−ρ²)/(n−2) is exact for the slope through the
    origin (known zero mean, Σx² ~ χ²_n, E[1/χ²_n] = 1/(n−2)). With the mean estimated
    (demeaned returns, Σ(x−x̄)² ~ χ²_{n−1}) the variance is (1−ρ²)/(n−3), so the oracle is
    γ*(ρ, n−1), and γ*(ρ, n) over-states it.

    Figures (key 20260, 200k samples of n = 10, ρ = 0.3, SE from 50 batches):
      zero-mean slope: empirical 0.4426 ± 0.0010, γ*(0.3, 10) = 0.4417 (0.9 SE);
      demeaned slope:  empirical 0.4097 ± 0.0010, γ*(0.3, 10) = 0.4417 (31 SE off),
                       γ*(0.3, 9) = 0.4091 (0.6 SE).
    """
    rho, n, reps, num_batches = 0.3, 10, 200_000, 50
    z = jr.normal(jr.key(20260), (2, reps, n))
    x = z[0]
    y = rho * x + np.sqrt(1 - rho**2) * z[1]  # unit variances, so β = ρ
    slope0 = jnp.sum(x * y, 1) / jnp.sum(x * x, 1)
    xc = x - jnp.mean(x, 1, keepdims=True)
    yc = y - jnp.mean(y, 1, keepdims=True)
    slope1 = jnp.sum(xc * yc, 1) / jnp.sum(xc * xc, 1)

    def optimal_shrinkage(slope):
        s = np.asarray(slope).reshape(num_batches, -1)
        per_batch = rho * s.mean(1) / np.square(s).mean(1)
        est = rho * s.mean() / np.square(s).mean()
        return est, per_batch.std(ddof=1) / np.sqrt(num_batches)

    formula = float(gamma_star(rho, n))
    est0, se0 = optimal_shrinkage(slope0)
    est1, se1 = optimal_shrinkage(slope1)
    assert 0.0005 < se0 < 0.003 and 0.0005 < se1 < 0.003  # the SE is itself sane
    assert abs(est0 - formula) < 3 * se0
    assert abs(est1 - float(gamma_star(rho, n - 1))) < 3 * se1
    assert formula - est1 > 10 * se1  # the finding: demeaning costs one more return


# --------------------------------------------------------------------------- coupling ρ


def test_coupling_rho_is_abs_corr_for_single_assets():
    for corr in (0.4, -0.65, 0.0):
        s = np.array([2.0, 0.3])
        cov = np.outer(s, s) * np.array([[1.0, corr], [corr, 1.0]])
        assert float(coupling_rho(jnp.asarray(cov), 1)) == pytest.approx(abs(corr), abs=1e-14)
        assert float(coupling_rho(jnp.asarray(cov), 1, kind="average")) == pytest.approx(
            abs(corr), abs=1e-14
        )


def equicorrelated(m1: int, m2: int, a: float, c: float, rho: float) -> np.ndarray:
    """Within-pool correlations a and c, every cross correlation b. B = b11ᵀ is rank one, so the
    only nonzero canonical correlation is that of the two equal-weight portfolios,
    b·sqrt(m1 m2 / ((1 + (m1−1)a)(1 + (m2−1)c))); b is chosen to make it `rho`."""
    b = rho / np.sqrt(m1 * m2 / ((1 + (m1 - 1) * a) * (1 + (m2 - 1) * c)))
    n = m1 + m2
    cov = np.full((n, n), b)
    cov[:m1, :m1] = a
    cov[m1:, m1:] = c
    np.fill_diagonal(cov, 1.0)
    return cov


@pytest.mark.parametrize("m1, m2", [(2, 3), (4, 4)])
def test_coupling_rho_equicorrelated_and_scale_invariant(m1, m2):
    rho = 0.55
    cov = equicorrelated(m1, m2, 0.3, 0.6, rho)
    assert np.linalg.eigvalsh(cov).min() > 0
    got = coupling_rho(jnp.asarray(cov), m1)
    assert float(got) == pytest.approx(rho, rel=1e-12)
    avg = coupling_rho(jnp.asarray(cov), m1, kind="average")
    assert float(avg) == pytest.approx(rho / np.sqrt(min(m1, m2)), rel=1e-12)
    scale = np.random.default_rng(7).uniform(0.01, 50.0, size=m1 + m2)
    scaled = jnp.asarray(cov * np.outer(scale, scale))
    assert float(coupling_rho(scaled, m1)) == pytest.approx(rho, rel=1e-10)
    assert float(coupling_rho(scaled, m1, kind="average")) == pytest.approx(float(avg), rel=1e-10)


def test_coupling_rho_from_returns_and_bad_kind():
    cov = random_spd(5, 5)
    returns = np.random.default_rng(8).multivariate_normal(np.full(5, 0.1), cov, size=60)
    sample = np.cov(returns, rowvar=False)
    for kind in ("canonical", "average"):
        direct = coupling_rho(jnp.asarray(sample), 2, kind=kind)
        via = coupling_rho(jnp.asarray(returns), 2, from_returns=True, kind=kind)
        assert float(via) == pytest.approx(float(direct), rel=1e-10)
    # first canonical correlation: the best correlation of any two portfolios, so ≥ any pair
    corr = sample / np.sqrt(np.outer(np.diag(sample), np.diag(sample)))
    assert float(coupling_rho(jnp.asarray(sample), 2)) >= np.abs(corr[:2, 2:]).max()
    with pytest.raises(ValueError, match="kind"):
        coupling_rho(jnp.asarray(cov), 2, kind="rv")


# --------------------------------------------------------------------------- Claim B.1


def test_claim_b1_hand_built_cases():
    def cov2(a, b, c):
        return jnp.array([[a, b], [b, c]])

    # Σ/A = 4 − 0.05²/0.1 = 3.975 > σ_max(A) = 0.1; Σ/C = 0.1 − 0.05²/4 = 0.0994 > 0.05
    res = claim_b1(cov2(0.1, 0.05, 4.0), 1)
    assert bool(res.passes) and bool(res.own_block) and bool(res.cross_block)
    # σ_max(A) = 5 > Σ/A = 4 − 0.0005: first part fails, second (0.05 < 4.9994) holds
    res = claim_b1(cov2(5.0, 0.05, 4.0), 1)
    assert not bool(res.passes) and not bool(res.own_block) and bool(res.cross_block)
    # Σ/A = 4 − 0.25/0.1 = 1.5 > 0.1 holds; σ_max(B) = 0.5 > Σ/C = 0.1 − 0.25/4 = 0.0375 fails
    res = claim_b1(cov2(0.1, 0.5, 4.0), 1)
    assert not bool(res.passes) and bool(res.own_block) and not bool(res.cross_block)
    # 2+3 with a non-square B: σ_max(B) = 0.02·sqrt(6) ≈ 0.049
    cov = np.zeros((5, 5))
    cov[:2, :2] = 0.1 * np.eye(2)
    cov[2:, 2:] = 4.0 * np.eye(3)
    cov[:2, 2:] = 0.02
    cov[2:, :2] = 0.02
    assert bool(claim_b1(jnp.asarray(cov), 2).passes)
    cov[:2, 2:] = cov[2:, :2] = 0.08  # σ_max(B) ≈ 0.196 > σ_min(Σ/C) ≈ 0.1 − 0.0096
    res = claim_b1(jnp.asarray(cov), 2)
    assert bool(res.own_block) and not bool(res.cross_block)
    # the Chitra-notation reading fails on the very matrix that passes above
    assert not bool(claim_b1_chitra_notation(cov2(0.1, 0.05, 4.0), 1).passes)


def test_claim_b1_chitra_notation_never_passes():
    # Proof: BC⁻¹Bᵀ = (L_C⁻¹Bᵀ)ᵀ(L_C⁻¹Bᵀ) ≽ 0, so A − BC⁻¹Bᵀ ≼ A and, by Weyl's inequality,
    # λ_min(A − BC⁻¹Bᵀ) ≤ λ_min(A) ≤ λ_max(A): "σ_min(Σ/A) > σ_max(A)" in the paper's names
    # (Σ/A := A − BC⁻¹Bᵀ) is impossible, even with B = 0.
    check = jax.jit(jax.vmap(claim_b1_chitra_notation, in_axes=(0, None)), static_argnums=1)
    rng = np.random.default_rng(11)
    for m1, m2 in SIZES:
        n = m1 + m2
        mats = []
        for _ in range(200):
            x = rng.normal(size=(n, n + 1)) * rng.uniform(0.01, 10.0, size=(n, 1))
            mats.append(x @ x.T + 1e-3 * np.eye(n))
        mats.append(np.diag(np.r_[np.full(m1, 0.1), np.full(m2, 5.0)]))  # B = 0, A = 0.1 I
        res = check(jnp.asarray(np.stack(mats)), m1)
        assert not np.any(res.own_block)
        assert not np.any(res.passes)
    # whereas the standard-notation rule passes on the B = 0, A = 0.1 I case
    passing = claim_b1(jnp.asarray(np.diag([0.1, 0.1, 5.0])), 2)
    assert bool(passing.passes)


# --------------------------------------------------------------------------- hedges

RISK_AVERSION = 2.5
FEE = 0.03


def hedge_inputs(seed: int, n: int):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(random_spd(seed, n)),
        jnp.asarray(rng.uniform(0.5, 2.0, n)),
        jnp.asarray(rng.uniform(-1.0, 1.0, n)),
    )


@pytest.mark.parametrize("m1, m2", [(1, 1), (2, 3)])
def test_damped_hedge_endpoints(m1, m2):
    cov, lent, delta = hedge_inputs(21, m1 + m2)
    a, b, c = np_blocks(np.asarray(cov), m1)
    l1, l2 = np.asarray(lent[:m1]), np.asarray(lent[m1:])
    merged = merged_hedge(cov, lent, delta, FEE, RISK_AVERSION)
    np.testing.assert_allclose(
        merged, mean_variance_hedge(cov, lent, delta, FEE, RISK_AVERSION), rtol=1e-12
    )
    isolated = np.r_[
        mean_variance_hedge(jnp.asarray(a), lent[:m1], delta[:m1], FEE, RISK_AVERSION),
        mean_variance_hedge(jnp.asarray(c), lent[m1:], delta[m1:], FEE, RISK_AVERSION),
    ]
    for cond in (False, True):
        got = damped_hedge(cov, m1, 0.0, lent, delta, FEE, RISK_AVERSION, conditional=cond)
        np.testing.assert_allclose(got, isolated, rtol=1e-12, atol=1e-14)
    full = damped_hedge(cov, m1, 1.0, lent, delta, FEE, RISK_AVERSION, conditional=True)
    np.testing.assert_allclose(full, merged, rtol=0, atol=1e-10)
    # plain form at γ = 1: off by the lent exposure of the other pool, through B
    inv = np.linalg.inv
    k = FEE / RISK_AVERSION
    term = np.r_[
        k * inv(a - b @ inv(c) @ b.T) @ b @ inv(c) @ l2,
        k * inv(c - b.T @ inv(a) @ b) @ b.T @ inv(a) @ l1,
    ]
    assert np.abs(term).max() > 1e-3  # the cross term is not negligible here
    plain = damped_hedge(cov, m1, 1.0, lent, delta, FEE, RISK_AVERSION)
    np.testing.assert_allclose(np.asarray(plain) - np.asarray(merged), term, rtol=1e-9)


def test_damped_hedge_per_asset_fee():
    m1, n = 2, 5
    cov, lent, delta = hedge_inputs(22, n)
    fee = jnp.asarray(np.r_[np.full(m1, 0.02), np.full(n - m1, 0.05)])  # one fee per pool
    ref = np.linalg.solve(np.asarray(cov), np.asarray(fee * lent)) / RISK_AVERSION - delta
    np.testing.assert_allclose(merged_hedge(cov, lent, delta, fee, RISK_AVERSION), ref, rtol=1e-10)
    full = damped_hedge(cov, m1, 1.0, lent, delta, fee, RISK_AVERSION, conditional=True)
    np.testing.assert_allclose(full, ref, rtol=0, atol=1e-10)
    scalar = damped_hedge(cov, m1, 0.4, lent, delta, FEE, RISK_AVERSION)
    vector = damped_hedge(cov, m1, 0.4, lent, delta, jnp.full(n, FEE), RISK_AVERSION)
    np.testing.assert_allclose(scalar, vector, rtol=1e-13)


@pytest.mark.parametrize("conditional", [False, True])
def test_damped_hedge_gradient_matches_finite_differences(conditional):
    m1, n = 2, 5
    cov, lent, delta = hedge_inputs(23, n)
    w = jnp.asarray(np.random.default_rng(24).normal(size=n))

    def f(g):
        pi = damped_hedge(cov, m1, g, lent, delta, FEE, RISK_AVERSION, conditional=conditional)
        return w @ pi

    h = 1e-5
    for g in (0.2, 0.5, 0.9):
        ad = float(jax.jit(jax.grad(f))(g))
        fd = float((f(g + h) - f(g - h)) / (2 * h))
        assert abs(ad - fd) < 1e-6 * abs(fd)
    jac = jax.jacfwd(
        lambda g: damped_hedge(cov, m1, g, lent, delta, FEE, RISK_AVERSION, conditional=True)
    )(0.5)
    assert jac.shape == (n,) and np.all(np.isfinite(jac))


def test_damped_hedge_vmaps_over_damping():
    m1, n = 2, 5
    cov, lent, delta = hedge_inputs(25, n)
    grid = jnp.linspace(0.0, 1.0, 7)

    def one(g):
        return damped_hedge(cov, m1, g, lent, delta, FEE, RISK_AVERSION, conditional=True)

    batched = jax.jit(jax.vmap(one))(grid)
    assert batched.shape == (7, n)
    loop = np.stack([np.asarray(jax.jit(one)(g)) for g in grid])
    np.testing.assert_allclose(batched, loop, rtol=1e-12, atol=1e-14)
    grads = jax.jit(jax.vmap(jax.grad(lambda g: jnp.sum(one(g)))))(grid)
    assert grads.shape == (7,) and np.all(np.isfinite(grads))
