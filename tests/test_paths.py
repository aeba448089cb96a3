"""Statistical and exact tests of the price path models and of the data loader.

Monte Carlo checks use fixed keys and state their tolerance in standard errors (SE): an
estimate passes when it lies within `K` SE of the closed form. Sample statistics are computed
in float64 NumPy from the float32 draws. Helpers live here, not in a conftest.
"""

from __future__ import annotations

import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax import lax

import pdlpjax
from pdlpjax.paths import (
    GBM,
    Bootstrap,
    BootstrapNoise,
    Garch,
    JumpNoise,
    MertonJump,
    PathParams,
    poisson_from_uniform,
)

K = 3.0  # tolerance in standard errors for a single Monte Carlo comparison

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BINANCE_DAILY = DATA_DIR / "yanniedog_binance-historical-OHLCV-data"


# --------------------------------------------------------------------------- helpers


def make_params(n: int, **kw) -> PathParams:
    """PathParams for `n` risky assets: float32 arrays, scalars broadcast to vectors."""
    defaults = dict(
        drifts=0.0,
        vols=0.6,
        correlation=np.eye(n),
        jump_intensity=0.0,
        jump_mean=-0.05,
        jump_vol=0.1,
        crash_intensity=0.0,
        crash_mean=-0.2,
        crash_vol=0.05,
        garch_alpha=0.08,
        garch_beta=0.9,
        block_length=20.0,
    )
    defaults.update(kw)
    scalar = {"crash_intensity", "crash_mean", "crash_vol", "block_length"}
    out = {}
    for name, value in defaults.items():
        arr = np.asarray(value, dtype=np.float64)
        if name == "correlation":
            arr = np.broadcast_to(arr, (n, n))
        elif name not in scalar:
            arr = np.broadcast_to(arr, (n,))
        out[name] = jnp.asarray(arr, jnp.float32)
    return PathParams(**out)


# Module-level filter_jit functions: the model's static fields and `num` are static, arrays
# (params, noise, keys, bootstrap table) traced, so tests sharing a model and a sample size
# share one compile (threefry draws compile slowly on CPU).


@eqx.filter_jit
def _draw(model, key, num: int):
    return jax.vmap(model.noise)(jr.split(key, num))


@eqx.filter_jit
def _steps(model, params: PathParams, noise):
    state = model.init(params)
    return jax.vmap(lambda z: model.step(state, params, z)[1])(noise)


@eqx.filter_jit
def _scan_paths(model, params: PathParams, noise):
    def one(noise_path):
        def body(s, z):
            s, x = model.step(s, params, z)
            return s, (x, s)

        _, (xs, states) = lax.scan(body, model.init(params), noise_path)
        return xs, states

    return jax.vmap(one)(noise)


def draw_noise(model, key, num: int):
    """`num` independent draws of one step's noise: `vmap(model.noise)(split(key, num))`."""
    return _draw(model, key, num)


def one_step(model, params: PathParams, key, num: int):
    """`num` independent one-step draws: (noise batch, log returns (num, n) in float64)."""
    noise = _draw(model, key, num)
    return noise, np.asarray(_steps(model, params, noise), np.float64)


def path_noise(model, key, num_paths: int, num_steps: int):
    """Noise with leading axes (num_paths, num_steps), each step's from its own split key."""
    noise = _draw(model, key, num_paths * num_steps)
    return jax.tree_util.tree_map(lambda a: a.reshape(num_paths, num_steps, *a.shape[1:]), noise)


def run_paths(model, params: PathParams, noise):
    """Scan the model over time (axis 1), vmapped over paths (axis 0).

    **Returns:** `(x, states)`: log returns (P, T, n) in float64 and the state *after* each step.
    """
    xs, states = _scan_paths(model, params, noise)
    return np.asarray(xs, np.float64), np.asarray(states)


def within(est, truth, se, k: float = K) -> bool:
    return bool(np.all(np.abs(np.asarray(est) - np.asarray(truth)) < k * np.asarray(se)))


def ratio_and_se(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """mean(a)/mean(b) over independent units (paths) and its delta-method SE."""
    r = a.mean() / b.mean()
    se = (a - r * b).std(ddof=1) / (math.sqrt(len(a)) * abs(b.mean()))
    return float(r), float(se)


def poisson_ppf(u: float, mean: float) -> int:
    """Reference inverse CDF of Poisson(mean) in float64."""
    k, cdf = 0, math.exp(-mean)
    while u > cdf:
        k += 1
        cdf += math.exp(k * math.log(mean) - mean - math.lgamma(k + 1))
    return k


# --------------------------------------------------------------------------- GBM

GBM_CORR = np.array([[1.0, 0.6, -0.3], [0.6, 1.0, 0.2], [-0.3, 0.2, 1.0]])
GBM_VOLS = np.array([0.5, 0.8, 1.2])
GBM_DRIFTS = np.array([0.05, -0.1, 0.3])
GBM_DT = 1.0 / 52.0
GBM_MODEL = GBM(3, GBM_DT)


def test_gbm_step_is_closed_form_with_cholesky():
    """Exact: x = (μ − σ²/2) dt + σ √dt (L z) with L the Cholesky factor (lower)."""
    dt, model = GBM_DT, GBM_MODEL
    params = make_params(3, drifts=GBM_DRIFTS, vols=GBM_VOLS, correlation=GBM_CORR)
    noise, x = one_step(model, params, jr.key(7), 1_000)
    z = np.asarray(noise, np.float64)
    chol = np.linalg.cholesky(GBM_CORR)
    want = (GBM_DRIFTS - 0.5 * GBM_VOLS**2) * dt + GBM_VOLS * math.sqrt(dt) * (z @ chol.T)
    np.testing.assert_allclose(x, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_gbm_one_step_mean_covariance_correlation():
    """Mean (μ−σ²/2)dt, covariance σ_iσ_jρ_ij dt and correlation ρ_ij, each within 3 SE."""
    dt, model = GBM_DT, GBM_MODEL
    n_paths = 400_000
    params = make_params(3, drifts=GBM_DRIFTS, vols=GBM_VOLS, correlation=GBM_CORR)
    _, x = one_step(model, params, jr.key(1234), n_paths)

    mean_true = (GBM_DRIFTS - 0.5 * GBM_VOLS**2) * dt
    cov_true = np.outer(GBM_VOLS, GBM_VOLS) * GBM_CORR * dt
    # SE of a sample mean: σ √dt / √N.
    assert within(x.mean(0), mean_true, np.sqrt(np.diag(cov_true) / n_paths))
    # Gaussian SE of a sample covariance: √((Σ_ii Σ_jj + Σ_ij²) / N).
    cov = np.cov(x, rowvar=False)
    se_cov = np.sqrt((np.outer(np.diag(cov_true), np.diag(cov_true)) + cov_true**2) / n_paths)
    assert within(cov, cov_true, se_cov), (cov, cov_true)
    # SE of a sample correlation ≈ (1 − ρ²)/√N (off-diagonal entries only).
    corr = np.corrcoef(x, rowvar=False)
    off = np.triu_indices(3, k=1)
    se_corr = (1.0 - GBM_CORR**2) / math.sqrt(n_paths)
    assert within(corr[off], GBM_CORR[off], se_corr[off]), (corr, GBM_CORR)


# --------------------------------------------------------------------------- jumps


JUMP_DT = 1.0 / 52.0
JUMP_N = 200_000  # draws per jump test (one shared compile)
JUMP_MODEL = MertonJump(2, JUMP_DT)


@pytest.mark.parametrize("mean", [0.05, 0.5, 1.0, 3.0])
def test_poisson_from_uniform_mean_variance(mean):
    """Counts from U(0,1) have Poisson mean and variance, and P(N=0) = e^{-m}, within 3 SE."""
    n = 200_000
    u = jr.uniform(jr.fold_in(jr.key(1234), int(mean * 100)), (n,))
    counts = np.asarray(poisson_from_uniform(u, jnp.full((n,), mean, jnp.float32)), np.float64)
    assert within(counts.mean(), mean, math.sqrt(mean / n))
    # Poisson central 4th moment m(1 + 3m): SE of the sample variance √((m + 2m²)/N).
    assert within(counts.var(ddof=1), mean, math.sqrt((mean + 2 * mean**2) / n))
    p0 = math.exp(-mean)
    assert within((counts == 0).mean(), p0, math.sqrt(p0 * (1 - p0) / n))


def test_poisson_from_uniform_is_inverse_cdf_and_monotone_in_mean():
    """Exact inverse CDF (away from CDF jumps) and monotone non-decreasing in the mean."""
    u = np.concatenate([np.linspace(0.0, 1.0, 401)[:-1], [0.999, 0.99999]]).astype(np.float32)
    means = np.linspace(0.0, 6.0, 241).astype(np.float32)
    grid_u, grid_m = np.meshgrid(u, means)  # (means, u)
    counts = np.asarray(poisson_from_uniform(jnp.asarray(grid_u), jnp.asarray(grid_m)))
    assert counts.shape == (len(means), len(u))
    assert np.all(np.diff(counts, axis=0) >= 0), "not monotone in the mean for fixed u"
    assert np.all(counts[0] == 0), "mean 0 must give no events"
    assert np.all(counts[:, 0] == 0), "u = 0 must give no events"
    assert counts[-1, -1] > counts[-1, len(u) // 2] > 0
    checked = 0
    for i in range(0, len(means), 20):
        m = float(means[i])
        if m == 0.0:
            continue
        cdf = np.cumsum([math.exp(k * math.log(m) - m - math.lgamma(k + 1)) for k in range(40)])
        for j, uj in enumerate(u):
            if np.min(np.abs(cdf - float(uj))) > 1e-5:  # not at a float32-ambiguous boundary
                assert counts[i, j] == poisson_ppf(float(uj), m), (m, uj)
                checked += 1
    assert checked > 4000


@pytest.mark.slow
def test_merton_jump_counts_per_path_are_poisson():
    """Jumps per path over T steps ~ Poisson(λ dt T): mean and variance within 3 SE.

    With σ = 0, jump_vol = 0 and log jump size m, a step's log return is drift + N m, so the
    model's own counts are recovered exactly as (x − drift)/m.
    """
    dt, model = JUMP_DT, JUMP_MODEL
    n_paths, n_steps = 4_000, JUMP_N // 4_000
    lam = np.array([0.02, 0.3]) / dt  # 0.02 and 0.3 jumps per step
    jm = np.array([0.5, 0.25])
    params = make_params(2, vols=0.0, jump_intensity=lam, jump_mean=jm, jump_vol=0.0)
    # The model is stateless: one-step draws reshaped to (paths, steps) are paths.
    _, x = one_step(model, params, jr.key(1234), JUMP_N)
    x = x.reshape(n_paths, n_steps, 2)
    drift = -lam * (np.exp(jm) - 1.0) * dt
    n_float = (x - drift) / jm
    counts = np.rint(n_float)
    assert np.max(np.abs(n_float - counts)) < 1e-3
    assert counts.min() >= 0
    per_path = counts.sum(axis=1)  # (P, n)
    m = lam * dt * n_steps
    assert within(per_path.mean(0), m, np.sqrt(m / n_paths)), (per_path.mean(0), m)
    assert within(per_path.var(0, ddof=1), m, np.sqrt((m + 2 * m**2) / n_paths))


@pytest.mark.slow
def test_merton_compensator_keeps_expected_growth():
    """E[exp(log return)] = exp(μ dt) per asset within 3 SE, jumps and crashes included."""
    dt, n, model = JUMP_DT, JUMP_N, JUMP_MODEL
    drifts = np.array([0.1, -0.2])
    params = make_params(
        2,
        drifts=drifts,
        vols=[0.5, 0.7],
        correlation=[[1.0, 0.3], [0.3, 1.0]],
        jump_intensity=[20.0, 40.0],
        jump_mean=[-0.1, 0.05],
        jump_vol=[0.1, 0.2],
        crash_intensity=10.0,
        crash_mean=-0.2,
        crash_vol=0.1,
    )
    _, x = one_step(model, params, jr.key(1234), n)
    growth = np.exp(x)
    se = growth.std(0, ddof=1) / math.sqrt(n)
    assert within(growth.mean(0), np.exp(drifts * dt), se), (growth.mean(0), np.exp(drifts * dt))


def test_merton_crash_moves_all_assets_together():
    """Exact: with σ = 0 and no idiosyncratic jumps, every asset gets the same crash."""
    dt, n, model = JUMP_DT, JUMP_N, JUMP_MODEL
    lam_c = 10.0
    params = make_params(2, drifts=0.05, vols=0.0, crash_intensity=lam_c, crash_vol=0.1)
    _, x = one_step(model, params, jr.key(99), n)
    np.testing.assert_array_equal(x[:, 0], x[:, 1])
    # Steps without a crash sit exactly at the compensated drift; the others jump off it.
    kappa_c = math.exp(-0.2 + 0.5 * 0.1**2) - 1.0
    drift = (0.05 - lam_c * kappa_c) * dt
    hit = ~np.isclose(x[:, 0], drift, rtol=0, atol=1e-6)
    p = 1.0 - math.exp(-lam_c * dt)
    assert within(hit.mean(), p, math.sqrt(p * (1 - p) / n))


@pytest.mark.slow
def test_merton_common_crash_raises_cross_asset_correlation():
    """Crashes add λ_c dt (m_c² + s_c²) to every cross covariance; idiosyncratic jumps add 0."""
    dt, n, model = JUMP_DT, JUMP_N, JUMP_MODEL
    vols, rho = np.array([0.5, 0.7]), 0.2
    corr = [[1.0, rho], [rho, 1.0]]
    diff_cov = vols[0] * vols[1] * rho * dt

    def cross_cov(x):
        d = x - x.mean(0)
        prod = d[:, 0] * d[:, 1]
        return prod.mean(), prod.std(ddof=1) / math.sqrt(len(prod))

    lam_c, m_c, s_c = 10.0, -0.2, 0.1
    crash = make_params(
        2, vols=vols, correlation=corr, crash_intensity=lam_c, crash_mean=m_c, crash_vol=s_c
    )
    _, x = one_step(model, crash, jr.key(1234), n)
    cov, se = cross_cov(x)
    assert within(cov, diff_cov + lam_c * dt * (m_c**2 + s_c**2), se)
    corr_hat = np.corrcoef(x, rowvar=False)[0, 1]
    # Far above the diffusion correlation (the SE of a correlation is below 1/√N).
    assert corr_hat > rho + 20.0 / math.sqrt(n), corr_hat

    idio = make_params(
        2, vols=vols, correlation=corr, jump_intensity=20.0, jump_mean=-0.2, jump_vol=0.1
    )
    _, x = one_step(model, idio, jr.key(1235), n)
    cov, se = cross_cov(x)
    assert within(cov, diff_cov, se)
    assert np.corrcoef(x, rowvar=False)[0, 1] < rho  # idiosyncratic jumps dilute it


# --------------------------------------------------------------------------- GARCH

GARCH_VOLS = np.array([0.6, 1.0])
GARCH_ALPHA = np.array([0.1, 0.05])
GARCH_BETA = np.array([0.85, 0.9])
GARCH_DT = 1.0 / 365.0
GARCH_MODEL = Garch(2, GARCH_DT)


def garch_params() -> PathParams:
    return make_params(
        2,
        drifts=[0.2, 0.0],
        vols=GARCH_VOLS,
        correlation=[[1.0, 0.5], [0.5, 1.0]],
        garch_alpha=GARCH_ALPHA,
        garch_beta=GARCH_BETA,
    )


def test_garch_recursion_exact():
    """Exact: h_{t+1} = ω + α ε_t² + β h_t, x_t = μ dt − h_t/2 + ε_t, ε_t = √h_t (L z_t)."""
    dt, model, n_steps = GARCH_DT, GARCH_MODEL, 60
    params = garch_params()
    noise = path_noise(model, jr.key(3), 8, n_steps)
    x, states = run_paths(model, params, noise)
    z = np.asarray(noise[0], np.float64)
    chol = np.linalg.cholesky(np.array([[1.0, 0.5], [0.5, 1.0]]))
    mu = np.array([0.2, 0.0]) * dt
    omega = GARCH_VOLS**2 * dt * (1 - GARCH_ALPHA - GARCH_BETA)
    h = GARCH_VOLS**2 * dt
    for t in range(n_steps):
        eps = np.sqrt(h) * (chol @ z[t])
        np.testing.assert_allclose(x[0, t], mu - h / 2 + eps, rtol=1e-4, atol=1e-7)
        h = omega + GARCH_ALPHA * eps**2 + GARCH_BETA * h
        np.testing.assert_allclose(states[0, t], h, rtol=1e-4)


@pytest.fixture(scope="module")
def garch_returns() -> np.ndarray:
    """GARCH log returns (P, T, 2) from a fixed key, shared by the GARCH statistics tests."""
    model, n_paths, n_steps = GARCH_MODEL, 4_000, 250
    x, _ = run_paths(model, garch_params(), path_noise(model, jr.key(1234), n_paths, n_steps))
    return x


@pytest.mark.slow
def test_garch_unconditional_variance(garch_returns):
    """Var(x) = ω/(1−α−β) = σ² dt within 3 SE; SE from the per-path means (steps dependent).

    h_0 is the unconditional variance, so E[h_t] = σ² dt at every t. The −h/2 drift adds
    Var(h)/4 ≈ 0.3 (σ² dt)² ~ 1e-6 relative to σ² dt, far below one SE.
    """
    x = garch_returns
    dt = GARCH_DT
    sq = (x - x.mean(axis=(0, 1))) ** 2  # (P, T, n)
    per_path = sq.mean(axis=1)  # independent across paths
    est = per_path.mean(0)
    se = per_path.std(0, ddof=1) / math.sqrt(per_path.shape[0])
    assert within(est, GARCH_VOLS**2 * dt, se), (est, GARCH_VOLS**2 * dt, se)


@pytest.mark.slow
def test_garch_volatility_clustering(garch_returns):
    """Squared returns have positive lag-1 autocorrelation (> 3 SE, near the GARCH(1,1) value
    α(1−αβ−β²)/(1−2αβ−β²), within 3 SE); returns themselves have none (within 3 SE)."""
    x = garch_returns
    d = x - x.mean(axis=(0, 1))
    s = d**2
    s = s - s.mean(axis=(0, 1))
    for i in range(2):
        a, b = GARCH_ALPHA[i], GARCH_BETA[i]
        rho1_theory = a * (1 - a * b - b**2) / (1 - 2 * a * b - b**2)
        # Per-path sums of lagged products and of squares: a ratio over independent paths.
        num = (s[:, 1:, i] * s[:, :-1, i]).mean(1)
        den = (s[:, :, i] ** 2).mean(1)
        rho_sq, se_sq = ratio_and_se(num, den)
        assert rho_sq > K * se_sq, (i, rho_sq, se_sq)
        # And it matches the theoretical GARCH(1,1) value (E[ε⁸] < ∞ for these α, β).
        assert within(rho_sq, rho1_theory, se_sq), (i, rho_sq, rho1_theory, se_sq)

        num = (d[:, 1:, i] * d[:, :-1, i]).mean(1)
        den = (d[:, :, i] ** 2).mean(1)
        rho_x, se_x = ratio_and_se(num, den)
        assert within(rho_x, 0.0, se_x), (i, rho_x, se_x)
        assert rho_sq > rho_x + 10 * se_sq


# --------------------------------------------------------------------------- bootstrap


def synthetic_table(num_rows: int = 50, n: int = 3) -> np.ndarray:
    table = np.asarray(jr.normal(jr.key(5), (num_rows, n)) * 0.02, np.float32)
    assert len({r.tobytes() for r in table}) == num_rows  # rows distinct
    return table


def test_bootstrap_rows_exact_and_block_structure():
    """Every sample is an exact row (cross-section kept); a step continues to the next row
    (wrapping) with probability (1 − 1/L) + 1/(L T), within 3 SE."""
    table = synthetic_table()
    num_rows, L = table.shape[0], 4.0
    n_paths, n_steps = 2_000, 100
    model = Bootstrap(3, 1.0 / 365.0, returns=jnp.asarray(table))
    params = make_params(3, block_length=L)
    x, idx = run_paths(model, params, path_noise(model, jr.key(1234), n_paths, n_steps))
    rows = x.astype(np.float32).reshape(-1, 1, 3)
    hits = np.all(rows == table[None], axis=-1)  # (samples, rows): exact, whole cross-section
    assert np.all(hits.sum(1) == 1), "a sample is not an exact row of the table"
    np.testing.assert_array_equal(hits.argmax(1).reshape(idx.shape), idx)

    cont = (idx[:, 1:] == (idx[:, :-1] + 1) % num_rows).ravel()
    p = (1.0 - 1.0 / L) + 1.0 / (L * num_rows)
    assert within(cont.mean(), p, math.sqrt(p * (1 - p) / cont.size)), (cont.mean(), p)
    # Every row is visited about equally (stationary distribution uniform): loose check.
    freq = np.bincount(idx.ravel(), minlength=num_rows) / idx.size
    assert np.all(np.abs(freq - 1 / num_rows) < 0.25 / num_rows)


def test_bootstrap_deterministic_blocks_and_wrap():
    """First step always starts a block; no restart walks rows in order, wrapping round;
    block_length 1 restarts at floor(u_start T) every step."""
    table = synthetic_table(num_rows=10)
    model = Bootstrap(3, 1.0, returns=jnp.asarray(table))
    steps = 15
    u_start = np.linspace(0.763, 0.063, steps).astype(np.float32)  # away from k/10
    noise = BootstrapNoise(
        u_restart=jnp.full((1, steps), 0.5, jnp.float32),
        u_start=jnp.asarray(u_start)[None],
    )
    x, idx = run_paths(model, make_params(3, block_length=1e6), noise)
    np.testing.assert_array_equal(idx[0], (7 + np.arange(steps)) % 10)
    np.testing.assert_array_equal(x[0], table[idx[0]])
    _, idx = run_paths(model, make_params(3, block_length=1.0), noise)
    want = np.floor(u_start.astype(np.float64) * 10).astype(int)
    np.testing.assert_array_equal(idx[0], want)


@pytest.mark.slow
def test_bootstrap_reproduces_real_correlation():
    """On real daily BTC/ETH/SOL returns, bootstrap paths reproduce the data's correlation
    matrix and volatilities within 3 SE (SE from independent paths)."""
    if not BINANCE_DAILY.is_dir():
        pytest.skip(f"../shared/data not found: no folder {BINANCE_DAILY}")
    closes = pdlpjax.load_closes(BINANCE_DAILY, ("BTC", "ETH", "SOL"))
    returns = np.asarray(pdlpjax.log_returns(closes), np.float32)
    assert returns.shape[1] == 3 and returns.shape[0] > 1000
    truth = np.corrcoef(returns.astype(np.float64), rowvar=False)
    sd_truth = returns.astype(np.float64).std(0)

    n_paths, n_steps = 400, 2_000
    model = Bootstrap(3, 1.0 / 365.0, returns=jnp.asarray(returns))
    params = make_params(3, block_length=20.0)
    x, _ = run_paths(model, params, path_noise(model, jr.key(1234), n_paths, n_steps))
    per_path = np.stack([np.corrcoef(p, rowvar=False) for p in x])  # (P, 3, 3)
    est = per_path.mean(0)
    se = per_path.std(0, ddof=1) / math.sqrt(n_paths)
    off = np.triu_indices(3, k=1)
    assert within(est[off], truth[off], se[off]), (est, truth, se)
    sd = x.std(axis=1)  # (P, 3)
    assert within(sd.mean(0), sd_truth, sd.std(0, ddof=1) / math.sqrt(n_paths))


def test_bootstrap_antithetic_is_refused():
    model = Bootstrap(2, 1.0, returns=jnp.zeros((5, 2), jnp.float32))
    with pytest.raises(ValueError, match="antithetic"):
        model.antithetic(model.noise(jr.key(0)))


# --------------------------------------------------------------------------- antithetic


def test_antithetic_negates_normals_keeps_uniforms():
    key = jr.key(1234)
    for model, num in ((GBM_MODEL, 1_000), (GARCH_MODEL, 480)):
        z = draw_noise(model, key, num)
        np.testing.assert_array_equal(np.asarray(model.antithetic(z)), -np.asarray(z))
    model = JUMP_MODEL
    nz = draw_noise(model, key, JUMP_N)
    assert isinstance(nz, JumpNoise)
    az = model.antithetic(nz)
    for name in ("z", "z_jump", "z_crash"):
        np.testing.assert_array_equal(np.asarray(getattr(az, name)), -np.asarray(getattr(nz, name)))
    for name in ("u_jump", "u_crash"):
        np.testing.assert_array_equal(np.asarray(getattr(az, name)), np.asarray(getattr(nz, name)))


def test_gbm_antithetic_mirrors_diffusion_exactly():
    dt, model = GBM_DT, GBM_MODEL
    vols = jnp.asarray(GBM_VOLS, jnp.float32)
    # Drift μ = σ²/2 (same float32 ops as the model): zero drift term, so x' = −x bitwise.
    params = make_params(3, vols=GBM_VOLS, correlation=GBM_CORR)
    params = PathParams(**{**vars(params), "drifts": 0.5 * vols**2})
    noise = draw_noise(model, jr.key(1234), 1_000)
    x = np.asarray(_steps(model, params, noise))
    xa = np.asarray(_steps(model, params, model.antithetic(noise)))
    assert np.all(x != 0)
    np.testing.assert_array_equal(xa, -x)

    # With a drift, the pair averages to the drift term exactly up to float32 rounding.
    params = make_params(3, drifts=GBM_DRIFTS, vols=GBM_VOLS, correlation=GBM_CORR)
    x = np.asarray(_steps(model, params, noise), np.float64)
    xa = np.asarray(_steps(model, params, model.antithetic(noise)), np.float64)
    drift = (GBM_DRIFTS - 0.5 * GBM_VOLS**2) * dt
    np.testing.assert_allclose(x - drift, -(xa - drift), atol=1e-7)
    np.testing.assert_allclose((x + xa).mean(0) / 2, drift, atol=1e-7)


def test_garch_antithetic_same_variance_path_mirrored_shocks():
    dt, model = GARCH_DT, GARCH_MODEL
    params = garch_params()
    noise = path_noise(model, jr.key(1234), 8, 60)
    x, h = run_paths(model, params, noise)
    xa, ha = run_paths(model, params, model.antithetic(noise))
    np.testing.assert_array_equal(h, ha)  # h depends on ε² only
    h_before = np.concatenate([np.broadcast_to(GARCH_VOLS**2 * dt, (8, 1, 2)), h[:, :-1]], 1)
    centre = np.array([0.2, 0.0]) * dt - h_before / 2
    np.testing.assert_allclose(x - centre, -(xa - centre), atol=1e-7)


def test_merton_antithetic_same_jump_counts_mirrored_sizes():
    dt, model = JUMP_DT, JUMP_MODEL
    params = make_params(
        2, vols=0.0, jump_intensity=30.0, jump_mean=0.3, jump_vol=0.1, crash_intensity=5.0
    )
    noise = draw_noise(model, jr.key(1234), JUMP_N)
    x = np.asarray(_steps(model, params, noise), np.float64)
    xa = np.asarray(_steps(model, params, model.antithetic(noise)), np.float64)
    # x + x' = 2 (drift + N m + N_c m_c): the sizes' random parts cancel.
    centre = (x + xa) / 2
    n_jump = np.asarray(poisson_from_uniform(noise.u_jump, jnp.float32(30.0 * dt)))
    n_crash = np.asarray(poisson_from_uniform(noise.u_crash, jnp.float32(5.0 * dt)))
    kappa, kappa_c = math.exp(0.3 + 0.005) - 1, math.exp(-0.2 + 0.00125) - 1
    drift = (-30.0 * kappa - 5.0 * kappa_c) * dt
    want = drift + n_jump * 0.3 + n_crash[:, None] * -0.2
    np.testing.assert_allclose(centre, want, atol=1e-5)
    assert np.any(n_jump > 0) and np.any(n_crash > 0)


# --------------------------------------------------------------------------- data loader


def write(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def test_load_closes_aligns_folder_on_common_dates(tmp_path):
    write(
        tmp_path / "BTCUSDT_1d.csv",
        """
timestamp,open,close
2024-01-01,1,100
2024-01-02,1,101
2024-01-03,1,102
2024-01-04,1,103
2024-01-05,1,104
""",
    )
    write(
        tmp_path / "ETHUSDT_1d.csv",
        """
date,close,volume
2024-01-02,10,5
2024-01-03,11,5
2024-01-05,12,5
2024-01-06,13,5
""",
    )
    closes = pdlpjax.load_closes(tmp_path, ["BTC", "ETH"])
    assert closes.assets == ("BTC", "ETH")
    np.testing.assert_array_equal(
        closes.times, np.array(["2024-01-02", "2024-01-03", "2024-01-05"], "datetime64[s]")
    )
    np.testing.assert_array_equal(closes.prices, [[101, 10], [102, 11], [104, 12]])
    r = pdlpjax.log_returns(closes)
    np.testing.assert_allclose(r, np.diff(np.log([[101, 10], [102, 11], [104, 12]]), axis=0))


@pytest.mark.parametrize(
    "times",
    [
        ["1704067200000", "1704153600000", "1704240000000"],  # epoch milliseconds
        ["1704067200", "1704153600", "1704240000"],  # epoch seconds
        ["2024-01-01", "2024-01-02", "2024-01-03"],  # dates
        ["2024-01-01 00:00:00", "2024-01-02 00:00:00", "2024-01-03 00:00:00"],  # date-times
        ["2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z", "2024-01-03T00:00:00Z"],
    ],
)
def test_load_closes_time_formats(tmp_path, times):
    rows = "\n".join(f"{t},{p}" for t, p in zip(times, [1.0, 2.0, 4.0], strict=True))
    write(tmp_path / "BTC.csv", "timestamp,close\n" + rows)
    closes = pdlpjax.load_closes(tmp_path, ["BTC"])
    np.testing.assert_array_equal(
        closes.times, np.array(["2024-01-01", "2024-01-02", "2024-01-03"], "datetime64[s]")
    )
    np.testing.assert_array_equal(closes.prices[:, 0], [1.0, 2.0, 4.0])


def test_load_closes_long_form_with_ticker(tmp_path):
    path = write(
        tmp_path / "all.csv",
        """
date,ticker,close
2024-01-01,BTCUSDT,100
2024-01-01,ETHUSDT,10
2024-01-02,BTCUSDT,110
2024-01-02,ETHUSDT,11
2024-01-03,ETHUSDT,12
2024-01-03,BTCUSDT,120
2024-01-04,ETHUSDT,13
""",
    )
    closes = pdlpjax.load_closes(path, ["ETH", "BTC"])
    assert closes.assets == ("ETH", "BTC")
    np.testing.assert_array_equal(closes.prices, [[10, 100], [11, 110], [12, 120]])
    assert closes.times[-1] == np.datetime64("2024-01-03", "s")


def test_load_closes_wide_form(tmp_path):
    path = write(
        tmp_path / "wide.csv",
        """
Date,BTC,ETH,SOL
2024-01-01,100,10,1
2024-01-02,110,11,2
2024-01-03,120,12,3
""",
    )
    closes = pdlpjax.load_closes(path, ["SOL", "BTC"])
    np.testing.assert_array_equal(closes.prices, [[1, 100], [2, 110], [3, 120]])


@pytest.mark.parametrize(
    "text, match",
    [
        ("timestamp,price\n2024-01-01,1\n2024-01-02,2\n2024-01-03,3", "close"),
        ("timestamp,close\n2024-01-01,1\n2024-01-03,2\n2024-01-02,3", "sorted"),
        ("timestamp,close\n2024-01-01,1\n2024-01-02,2\n2024-01-02,3", "duplicate"),
        ("timestamp,close\n2024-01-01,1\n2024-01-02,0\n2024-01-03,3", "positive"),
        ("timestamp,close\n2024-01-01,1\n2024-01-02,-2\n2024-01-03,3", "positive"),
    ],
    ids=["missing-close", "unsorted", "duplicate", "zero-price", "negative-price"],
)
def test_load_closes_rejects_bad_files(tmp_path, text, match):
    write(tmp_path / "BTCUSDT_1d.csv", text)
    with pytest.raises(pdlpjax.DataError, match=match) as err:
        pdlpjax.load_closes(tmp_path, ["BTC"])
    assert "BTCUSDT_1d.csv" in str(err.value)
    assert isinstance(err.value, pdlpjax.ConfigError)


def test_load_closes_real_binance_folder():
    if not BINANCE_DAILY.is_dir():
        pytest.skip(f"../shared/data not found: no folder {BINANCE_DAILY}")
    closes = pdlpjax.load_closes(BINANCE_DAILY, ["BTC", "ETH", "SOL"])
    assert closes.prices.shape[1] == 3 and np.all(closes.prices > 0)
    assert np.all(np.diff(closes.times).astype(np.int64) > 0)
    # SOL lists last, so the common dates start at its first date.
    assert closes.times[0] >= np.datetime64("2020-01-01", "s")
    steps = np.diff(closes.times).astype(np.int64)
    assert np.median(steps) == 86400
