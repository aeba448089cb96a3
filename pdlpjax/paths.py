"""Price path models, each a step-wise generator with injectable noise.

Every model has the same four pure, unbatched methods:
- `init(params) -> state`: the model's own state at t = 0 (GARCH variance, bootstrap or replay
  row index);
- `noise(key) -> noise`: one step's standard draws (normals, uniforms), which do not depend on
  the parameters, so common random numbers survive a change of parameters;
- `antithetic(noise) -> noise`: the mirrored draws (normals negated, uniforms kept);
- `step(state, params, noise) -> (state, log_returns)`: log returns of the risky assets
  over one step, shape `(num_risky,)`.

The simulation draws step t's noise from `jr.fold_in(pool_key, t)`; tests and callers may pass
their own noise instead. Parameters are annualised and `dt` (years per step) is static.
A numéraire asset (price 1) is not a path: the pool appends it.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._numerics import fixed_sum

__all__ = [
    "PathParams",
    "AbstractPathModel",
    "GBM",
    "MertonJump",
    "Garch",
    "Bootstrap",
    "Replay",
    "poisson_from_uniform",
]


class PathParams(eqx.Module):
    """Dynamic parameters of the price path models, one pool's worth (names as in `[paths]`).

    Vectors have shape `(num_risky,)`, `correlation` `(num_risky, num_risky)`; the rest are
    scalars. A model reads only the fields it uses.
    """

    drifts: Float[Array, " n"]
    vols: Float[Array, " n"]
    correlation: Float[Array, "n n"]
    jump_intensity: Float[Array, " n"]
    jump_mean: Float[Array, " n"]
    jump_vol: Float[Array, " n"]
    crash_intensity: Float[Array, ""]
    crash_mean: Float[Array, ""]
    crash_vol: Float[Array, ""]
    garch_alpha: Float[Array, " n"]
    garch_beta: Float[Array, " n"]
    block_length: Float[Array, ""]


def _correlate(params: PathParams, z: Float[Array, " n"]) -> Float[Array, " n"]:
    """L z with L the Cholesky factor of the correlation matrix.

    Written as an elementwise product and a row sum rather than a matmul so that the result
    for one pool is bitwise the same whatever the batch size (batched matmuls may reorder).
    """
    chol = jnp.linalg.cholesky(params.correlation)
    return fixed_sum(chol * z[None, :], axis=1)


def poisson_from_uniform(
    u: Float[Array, "*batch"], mean: Float[Array, "*batch"], max_count: int = 24
) -> Float[Array, "*batch"]:
    """Poisson(mean) counts by inverse CDF of uniforms `u`, truncated at `max_count`.

    Monotone in `mean` for fixed `u` (common random numbers across intensities). With the
    config's limit of one event per step on average, truncation at 24 events loses less than
    1e-20 of probability. Precision limit: a float32 uniform has steps of 2⁻²³, so an event
    probability per step below ~1e-5 is biased (−6% at 2e-6, none at all below 1e-7);
    use `dtype = "float64"` for rarer events per step.
    """
    k = jnp.arange(max_count, dtype=u.dtype)
    # log pmf(k) = k log m - m - log k!  ; cumulative via cumsum of pmf.
    logm = jnp.log(jnp.maximum(mean, jnp.finfo(u.dtype).tiny))[..., None]
    logpmf = k * logm - mean[..., None] - jnp.cumsum(jnp.log(jnp.maximum(k, 1.0)))
    cdf = jnp.cumsum(jnp.exp(logpmf), axis=-1)
    return jnp.sum(u[..., None] > cdf, axis=-1).astype(u.dtype)


class AbstractPathModel(eqx.Module):
    """Interface of a price path model (see the module docstring)."""

    num_risky: int = eqx.field(static=True)
    dt: float = eqx.field(static=True)
    dtype: str = eqx.field(static=True, default="float32")  # of the draws (and so the state)

    def init(self, params: PathParams):
        del params
        return ()

    def noise(self, key: PRNGKeyArray):
        raise NotImplementedError

    def antithetic(self, noise):
        raise NotImplementedError

    def step(self, state, params: PathParams, noise):
        raise NotImplementedError


class GBM(AbstractPathModel):
    """Correlated geometric Brownian motion.

    log(p_{t+1}/p_t) = (μ − σ²/2) dt + σ √dt (L z),  z ~ N(0, I),  L Lᵀ = correlation.
    """

    def noise(self, key: PRNGKeyArray) -> Float[Array, " n"]:
        return jr.normal(key, (self.num_risky,), self.dtype)

    def antithetic(self, noise):
        return -noise

    def step(self, state, params: PathParams, noise: Float[Array, " n"]):
        dt = self.dt
        x = (params.drifts - 0.5 * params.vols**2) * dt + params.vols * jnp.sqrt(dt) * _correlate(
            params, noise
        )
        return state, x


class JumpNoise(eqx.Module):
    """One step's draws for `MertonJump`."""

    z: Float[Array, " n"]
    u_jump: Float[Array, " n"]
    z_jump: Float[Array, " n"]
    u_crash: Float[Array, ""]
    z_crash: Float[Array, ""]


class MertonJump(AbstractPathModel):
    """Merton jump-diffusion with idiosyncratic jumps and a common crash factor.

    log return = GBM part − (λκ + λ_c κ_c) dt + Σ_{N jumps} Y + Σ_{N_c crashes} Y_c, with
    N ~ Poisson(λ dt) per asset, Y ~ N(m, s²), κ = E[e^Y] − 1; the crash count N_c and its size
    Y_c ~ N(m_c, s_c²) are shared by every risky asset. The compensators keep E[p_{t+1}/p_t] =
    e^{μ dt}, so `drifts` remain the expected arithmetic returns.
    """

    def noise(self, key: PRNGKeyArray) -> JumpNoise:
        k = jr.split(key, 5)
        n = self.num_risky
        return JumpNoise(
            z=jr.normal(k[0], (n,), self.dtype),
            u_jump=jr.uniform(k[1], (n,), self.dtype),
            z_jump=jr.normal(k[2], (n,), self.dtype),
            u_crash=jr.uniform(k[3], (), self.dtype),
            z_crash=jr.normal(k[4], (), self.dtype),
        )

    def antithetic(self, noise: JumpNoise) -> JumpNoise:
        return JumpNoise(noise.z * -1, noise.u_jump, -noise.z_jump, noise.u_crash, -noise.z_crash)

    def step(self, state, params: PathParams, noise: JumpNoise):
        dt = self.dt
        p = params
        kappa = jnp.exp(p.jump_mean + 0.5 * p.jump_vol**2) - 1.0
        kappa_c = jnp.exp(p.crash_mean + 0.5 * p.crash_vol**2) - 1.0
        n_jump = poisson_from_uniform(noise.u_jump, p.jump_intensity * dt)
        n_crash = poisson_from_uniform(noise.u_crash, p.crash_intensity * dt)
        # Sum of N iid normals: N m + sqrt(N) s z.
        jumps = n_jump * p.jump_mean + jnp.sqrt(n_jump) * p.jump_vol * noise.z_jump
        crash = n_crash * p.crash_mean + jnp.sqrt(n_crash) * p.crash_vol * noise.z_crash
        drift = (
            p.drifts - 0.5 * p.vols**2 - p.jump_intensity * kappa - p.crash_intensity * kappa_c
        ) * dt
        x = drift + p.vols * jnp.sqrt(dt) * _correlate(p, noise.z) + jumps + crash
        return state, x


class Garch(AbstractPathModel):
    """GARCH(1,1) volatility with correlated innovations, per asset.

    ε_t = √h_t (L z_t),  log return = μ dt − h_t/2 + ε_t,  h_{t+1} = ω + α ε_t² + β h_t, with
    ω = σ² dt (1 − α − β) so the unconditional per-step variance ω/(1−α−β) equals σ² dt.
    State: h, shape `(num_risky,)`, started at the unconditional variance.
    """

    def init(self, params: PathParams) -> Float[Array, " n"]:
        return params.vols**2 * self.dt

    def noise(self, key: PRNGKeyArray) -> Float[Array, " n"]:
        return jr.normal(key, (self.num_risky,), self.dtype)

    def antithetic(self, noise):
        return -noise

    def step(self, state: Float[Array, " n"], params: PathParams, noise: Float[Array, " n"]):
        h = state
        a, b = params.garch_alpha, params.garch_beta
        omega = params.vols**2 * self.dt * (1.0 - a - b)
        eps = jnp.sqrt(h) * _correlate(params, noise)
        x = params.drifts * self.dt - 0.5 * h + eps
        return omega + a * eps**2 + b * h, x


class BootstrapNoise(eqx.Module):
    """One step's draws for `Bootstrap`: restart test and new start, both U(0, 1)."""

    u_restart: Float[Array, ""]
    u_start: Float[Array, ""]


class Bootstrap(AbstractPathModel):
    """Stationary block bootstrap (Politis–Romano) of real log returns.

    Each step either continues the current block (next row, wrapping round) or, with
    probability 1/`block_length`, starts a new block at a uniform random row. A row is one
    date's cross-section of returns, so correlations between assets are kept.
    State: the current row index (−1 before the first step, which always starts a block).
    """

    returns: Float[Array, "T n"] = eqx.field(kw_only=True)

    def init(self, params: PathParams) -> Int[Array, ""]:
        del params
        return jnp.asarray(-1, dtype=jnp.int32)

    def noise(self, key: PRNGKeyArray) -> BootstrapNoise:
        k1, k2 = jr.split(key)
        return BootstrapNoise(jr.uniform(k1, (), self.dtype), jr.uniform(k2, (), self.dtype))

    def antithetic(self, noise):
        raise ValueError("antithetic sampling is not defined for the bootstrap")

    def step(self, state: Int[Array, ""], params: PathParams, noise: BootstrapNoise):
        num_rows = self.returns.shape[0]
        restart = (noise.u_restart * params.block_length < 1.0) | (state < 0)
        start = jnp.minimum((noise.u_start * num_rows).astype(jnp.int32), num_rows - 1)
        idx = jnp.where(restart, start, (state + 1) % num_rows)
        return idx, self.returns[idx].astype(noise.u_start.dtype)


class Replay(AbstractPathModel):
    """Historical replay: the data's own log returns in order, from row `start`, no resampling.

    `returns[k]` is the log return from close k to close k + 1, so step 1 returns
    log(close[start + 1] / close[start]) and after t steps prices are
    p₀ × close[start + t] / close[start], whatever `p₀` (`market.initial_prices`) is.
    Every pool replays the same path: there is no draw, and the parameters are not read.
    State: the data row whose close the prices stand at (`start` at t = 0).
    """

    returns: Float[Array, "T n"] = eqx.field(kw_only=True)
    start: int = eqx.field(static=True, kw_only=True, default=0)

    def init(self, params: PathParams) -> Int[Array, ""]:
        del params
        return jnp.asarray(self.start, dtype=jnp.int32)

    def noise(self, key: PRNGKeyArray) -> Float[Array, " 0"]:
        del key
        return jnp.zeros((0,), self.dtype)  # no draws: the path is the data's

    def antithetic(self, noise):
        raise ValueError("antithetic sampling is not defined for a replay")

    def step(self, state: Int[Array, ""], params: PathParams, noise):
        del params, noise
        return state + 1, self.returns[state].astype(self.dtype)
