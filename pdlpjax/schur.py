"""Schur damping between two pools (Cotton 2026) and Claim B.1 of Chitra et al. (2025, App. B).

Notation. The n risky assets are split into pool 1 (the first `m1`) and pool 2 (the other
m2 = n − m1), and the covariance is partitioned as

    Σ = [[A, B], [Bᵀ, C]],   A (m1, m1),  B (m1, m2),  C (m2, m2).

Schur complements are named in the *standard* way (Cotton 2026, eq. 2; Zhang 2005):

    Σ/C = A − B C⁻¹ Bᵀ   (pool 1's covariance conditional on pool 2, the pool-1 block of Σ⁻¹
                          inverted),
    Σ/A = C − Bᵀ A⁻¹ B   (pool 2's conditional covariance).

The Chitra paper (App. B) swaps the two names: its "Σ/A" is A − BC⁻¹Bᵀ. Everything here uses
the standard names except `claim_b1_chitra_notation`, which reads the claim in the paper's own.

The damped blocks (Cotton 2026, eq. 3) interpolate between the isolated pool (γ = 0) and the
merged one (γ = 1):

    A(γ) = A − γ B C⁻¹ Bᵀ = (1 − γ) A + γ Σ/C,   C(γ) = C − γ Bᵀ A⁻¹ B,

so both stay positive definite on γ ∈ [0, 1]. γ* (eq. 4) sets γ from the reliability of the
estimated coupling. The Schur fraction is called `damping`; the hedge's risk aversion (the
papers' other "γ") is `risk_aversion`.

Every function is pure JAX (jit/vmap/grad-able; `m1` and `kind` are static) and uses Cholesky
factors and triangular solves, never an explicit inverse.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jaxtyping import Array, Bool, Float

from .hedge import mean_variance_hedge

__all__ = [
    "split_blocks",
    "schur_complements",
    "damped_blocks",
    "gamma_star",
    "coupling_rho",
    "COUPLING_KINDS",
    "ClaimB1",
    "claim_b1",
    "claim_b1_chitra_notation",
    "damped_hedge",
    "merged_hedge",
]

COUPLING_KINDS = ("canonical", "average")


def split_blocks(
    cov: Float[Array, "n n"], m1: int
) -> tuple[Float[Array, "m1 m1"], Float[Array, "m1 m2"], Float[Array, "m2 m2"]]:
    """(A, B, C) of Σ = [[A, B], [Bᵀ, C]] (Chitra et al. App. B; Cotton eq. 1).

    `cov` is (n, n); A is (m1, m1), B (m1, m2), C (m2, m2) with m2 = n − m1.
    """
    return cov[:m1, :m1], cov[:m1, m1:], cov[m1:, m1:]


def _chol(x: Float[Array, "m m"]) -> Float[Array, "m m"]:
    return jnp.linalg.cholesky(x)


def _whiten(chol: Float[Array, "m m"], x: Float[Array, "m k"]) -> Float[Array, "m k"]:
    """L⁻¹ x for the lower Cholesky factor L."""
    return jsl.solve_triangular(chol, x, lower=True)


def _quadratic(chol: Float[Array, "m m"], b: Float[Array, "m k"]) -> Float[Array, "k k"]:
    """bᵀ M⁻¹ b for M = L Lᵀ, formed as WᵀW (W = L⁻¹ b) so it is exactly symmetric and PSD."""
    w = _whiten(chol, b)
    return w.T @ w


def _cross_terms(
    cov: Float[Array, "n n"], m1: int
) -> tuple[Float[Array, "m1 m1"], Float[Array, "m2 m2"]]:
    """(B C⁻¹ Bᵀ, Bᵀ A⁻¹ B): the variance each pool loses by conditioning on the other."""
    a, b, c = split_blocks(cov, m1)
    return _quadratic(_chol(c), b.T), _quadratic(_chol(a), b)


def schur_complements(
    cov: Float[Array, "n n"], m1: int
) -> tuple[Float[Array, "m1 m1"], Float[Array, "m2 m2"]]:
    """(Σ/C, Σ/A) = (A − B C⁻¹ Bᵀ, C − Bᵀ A⁻¹ B), standard names (Cotton eq. 2).

    Shapes (m1, m1) and (m2, m2). (Σ/C)⁻¹ is the pool-1 block of Σ⁻¹, (Σ/A)⁻¹ the pool-2 one.
    """
    return damped_blocks(cov, m1, 1.0)


def damped_blocks(
    cov: Float[Array, "n n"], m1: int, damping: Float[Array, ""]
) -> tuple[Float[Array, "m1 m1"], Float[Array, "m2 m2"]]:
    """(A(γ), C(γ)) = (A − γ B C⁻¹ Bᵀ, C − γ Bᵀ A⁻¹ B), Cotton eq. 3, with γ = `damping`.

    Shapes (m1, m1) and (m2, m2). A(0) = A, A(1) = Σ/C (Cotton Prop. 1). Positive definite for
    γ ∈ [0, 1] (a convex combination of A and Σ/C); beyond 1 it need not be, so γ is not
    clipped here and callers keep it in range. Differentiable in `damping` and `cov`.
    """
    a, _, c = split_blocks(cov, m1)
    bcb, bab = _cross_terms(cov, m1)
    return a - damping * bcb, c - damping * bab


def _is_concrete(x) -> bool:
    try:
        np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False
    return True


def gamma_star(rho: Float[Array, "*b"], n: Float[Array, "*b"]) -> Float[Array, "*b"]:
    """γ* = (n−2)ρ² / ((n−2)ρ² + (1−ρ²)), Cotton eq. 4: the reliability of a coupling ρ
    estimated from n returns, a James-Stein / Wiener signal-to-(signal+noise) ratio with
    signal ρ² and noise (1−ρ²)/(n−2).

    That noise is exactly the variance of the zero-intercept regression slope β̂ = Σxy/Σx² in
    correlation units for Gaussian returns (E[1/χ²_n] = 1/(n−2)), so γ* is then exactly the
    shrinkage c minimising E[(cβ̂ − β)²] = out-of-sample MSE of the slope. When the mean is
    estimated too (demeaned returns), the slope's variance is (1−ρ²)/(n−3) and the oracle is
    γ*(ρ, n−1); see tests/test_schur.py for the Monte Carlo check.

    `rho` and `n` broadcast. ρ = 0 gives 0 and |ρ| = 1 gives 1; ρ² is clipped to [0, 1] so a
    rounding excess in an estimated ρ cannot push γ* past 1. For n > 2 the denominator is at
    least min(n−2, 1) > 0, so there is no 0/0. n ≤ 2 has no residual degree of freedom:
    a concrete `n` (Python or NumPy number, or a concrete array) raises ValueError; a traced
    `n` gives NaN there (with finite gradients elsewhere) since it cannot raise under jit.
    """
    if _is_concrete(n) and np.any(np.asarray(n) <= 2):
        raise ValueError(f"gamma_star needs more than 2 returns (n > 2), got n = {n!r}")
    rho2 = jnp.clip(jnp.square(rho), 0.0, 1.0)
    valid = n > 2
    signal = jnp.where(valid, n - 2, 1.0) * rho2
    value = signal / (signal + (1.0 - rho2))
    return jnp.where(valid, value, jnp.nan)


def _whitened_cross(cov: Float[Array, "n n"], m1: int) -> Float[Array, "m1 m2"]:
    """K = L_A⁻¹ B L_C⁻ᵀ, whose singular values are the canonical correlations."""
    a, b, c = split_blocks(cov, m1)
    left = _whiten(_chol(a), b)  # L_A⁻¹ B
    return _whiten(_chol(c), left.T).T  # (L_C⁻¹ (L_A⁻¹ B)ᵀ)ᵀ


def coupling_rho(
    cov_or_returns: Float[Array, "n n"] | Float[Array, "t n"],
    m1: int,
    *,
    from_returns: bool = False,
    kind: str = "canonical",
) -> Float[Array, ""]:
    """The cross-pool coupling ρ to feed `gamma_star`, for blocks of any size.

    **Arguments:**
    - `cov_or_returns`: Σ (n, n), or with `from_returns=True` returns (t, n), whose sample
      covariance (demeaned, divisor t − 1) is used; it must be nonsingular (t > n).
    - `m1`: size of pool 1's block.
    - `kind`: one of `COUPLING_KINDS`.

    With K = L_A⁻¹ B L_C⁻ᵀ (A = L_A L_Aᵀ, C = L_C L_Cᵀ) the singular values of K are the
    canonical correlations ρ₁ ≥ ρ₂ ≥ … between the pools (Hotelling 1936), and in pool 1's
    whitened coordinates A(γ) becomes I − γ K Kᵀ, eigenvalues 1 − γρᵢ². So the canonical
    correlations are the whole of what damping acts on, and every measure below is invariant
    to rescaling (or any invertible recombination) of the assets within each pool.

    - "canonical" (default): ρ₁ = σ_max(K), the largest correlation between any portfolio of
      pool 1 and any portfolio of pool 2 — the direction the regression of pool-1 returns on
      pool-2 returns (B C⁻¹) exploits most, and the largest relative variance reduction
      (Σ/C ≽ (1 − ρ₁²) A). For 1+1 blocks it is |corr|. Preferable when m1 + m2 ≪ n and
      the coupling is concentrated in a few directions (a common factor).
    - "average": sqrt(tr(A⁻¹ B C⁻¹ Bᵀ) / min(m1, m2)) = sqrt(‖K‖²_F / min(m1, m2)), the root
      mean squared canonical correlation (Pillai's trace over min(m1, m2); Cramér &
      Nicewander 1979). Preferable when the coupling is spread over many directions, or
      when m1 + m2 is comparable with n: the sample ρ₁ is the maximum over many noisy
      directions and is biased upwards (towards 1 as m1 + m2 → n), which would over-merge
      through γ*; the average is far less inflated by that selection.
    """
    if kind not in COUPLING_KINDS:
        raise ValueError(f"kind must be one of {COUPLING_KINDS}, got {kind!r}")
    cov = jnp.cov(cov_or_returns, rowvar=False) if from_returns else cov_or_returns
    k = _whitened_cross(cov, m1)
    if kind == "canonical":
        return jnp.linalg.svd(k, compute_uv=False)[0]
    return jnp.sqrt(jnp.sum(jnp.square(k)) / min(k.shape))


class ClaimB1(NamedTuple):
    """Outcome of the binary merge rule (Chitra et al. Claim B.1): `passes` = both parts."""

    passes: Bool[Array, ""]
    own_block: Bool[Array, ""]  # first inequality (compares A)
    cross_block: Bool[Array, ""]  # second inequality (compares B)


def _sym_extremes(x: Float[Array, "m m"]) -> tuple[Float[Array, ""], Float[Array, ""]]:
    eig = jnp.linalg.eigvalsh(x)  # ascending; singular values of an SPD matrix
    return eig[0], eig[-1]


def _sigma_max(b: Float[Array, "m1 m2"]) -> Float[Array, ""]:
    return jnp.linalg.svd(b, compute_uv=False)[0]  # B is not square in general


def claim_b1(cov: Float[Array, "n n"], m1: int) -> ClaimB1:
    """Claim B.1 in standard notation, as Cotton (2026, Claim 1) states it: merge if

        σ_max(A) < σ_min(Σ/A)  and  σ_max(Bᵀ) < σ_min(Σ/C),

    with Σ/A = C − Bᵀ A⁻¹ B (m2, m2) and Σ/C = A − B C⁻¹ Bᵀ (m1, m1). σ are singular values
    (eigenvalues for the SPD blocks). A sufficient condition for the merged pool to hedge
    better (Chitra et al. eq. 15). `cov` is (n, n); returns scalar booleans.
    """
    a, b, _ = split_blocks(cov, m1)
    s_c, s_a = schur_complements(cov, m1)
    own = _sym_extremes(a)[1] < _sym_extremes(s_a)[0]
    cross = _sigma_max(b) < _sym_extremes(s_c)[0]
    return ClaimB1(passes=own & cross, own_block=own, cross_block=cross)


def claim_b1_chitra_notation(cov: Float[Array, "n n"], m1: int) -> ClaimB1:
    """Claim B.1 read in the Chitra paper's own names (App. B), where "Σ/A" := A − B C⁻¹ Bᵀ
    and "Σ/C" := C − Bᵀ A⁻¹ B: σ_min(Σ_X) > σ_max(A) and σ_min(Σ_Y) > σ_max(B), with
    Σ_X = "Σ/A" (its proof reduces the first to σ_max(A) < σ_min("Σ/A")) and Σ_Y = "Σ/C".

    The first part never holds: A − B C⁻¹ Bᵀ ≼ A (B C⁻¹ Bᵀ ≽ 0), so by Weyl
    σ_min(A − B C⁻¹ Bᵀ) ≤ σ_min(A) ≤ σ_max(A); `passes` is therefore always False. Kept to
    show that reading, next to `claim_b1`, in tests. `cov` is (n, n).
    """
    a, b, _ = split_blocks(cov, m1)
    x_chitra, y_chitra = schur_complements(cov, m1)  # A − BC⁻¹Bᵀ, C − BᵀA⁻¹B
    own = _sym_extremes(a)[1] < _sym_extremes(x_chitra)[0]
    cross = _sigma_max(b) < _sym_extremes(y_chitra)[0]
    return ClaimB1(passes=own & cross, own_block=own, cross_block=cross)


def damped_hedge(
    cov: Float[Array, "n n"],
    m1: int,
    damping: Float[Array, ""],
    lent: Float[Array, " n"],
    delta: Float[Array, " n"],
    fee: Float[Array, ""] | Float[Array, " n"],
    risk_aversion: Float[Array, ""],
    *,
    conditional: bool = False,
) -> Float[Array, " n"]:
    """Hedges of a partially merged pair of pools (Cotton §3): π (n,) = [π₁, π₂].

    Pool 1 hedges by eq. 13 of Chitra et al. against A(γ), pool 2 against C(γ) (no costs):
    π₁ = (1/γ_r) A(γ)⁻¹ (f∘ℓ)₁ − Δ₁, π₂ likewise with C(γ), via `mean_variance_hedge`.
    `fee` f is a scalar or per asset (n,) (e.g. each pool's fee repeated over its assets);
    it enters as f∘ℓ, so a scalar gives the usual (f/γ_r) Σ⁻¹ ℓ.

    At γ = 1 this plain form is not the merged hedge. By block inversion the pool-1 block of
    Σ⁻¹ℓ is (Σ/C)⁻¹(ℓ₁ − B C⁻¹ ℓ₂), whereas the damped pool uses (Σ/C)⁻¹ ℓ₁: it conditions its
    covariance on pool 2 but ignores what pool 2 lends. So at γ = 1
        π₁ − π₁^merged = (1/γ_r) (Σ/C)⁻¹ B C⁻¹ (f∘ℓ)₂,
        π₂ − π₂^merged = (1/γ_r) (Σ/A)⁻¹ Bᵀ A⁻¹ (f∘ℓ)₁.
    With `conditional=True` each pool also regresses out a fraction γ of the other's exposure,
    (f∘ℓ)₁ − γ B C⁻¹ (f∘ℓ)₂ and (f∘ℓ)₂ − γ Bᵀ A⁻¹ (f∘ℓ)₁, which gives the isolated hedges at
    γ = 0 and exactly `merged_hedge` at γ = 1; γ then shrinks the regression coefficient
    B C⁻¹ as well as the conditional covariance, the shrinkage γ* is derived for.
    Differentiable in `damping`, `cov`, `lent`, `fee` and `risk_aversion`.
    """
    a_g, c_g = damped_blocks(cov, m1, damping)
    weighted = fee * lent
    w1, w2 = weighted[:m1], weighted[m1:]
    if conditional:
        a, b, c = split_blocks(cov, m1)
        w1, w2 = (
            w1 - damping * (b @ jsl.cho_solve((_chol(c), True), w2)),
            w2 - damping * (b.T @ jsl.cho_solve((_chol(a), True), w1)),
        )
    # Fee folded into the exposure, so the solve's own fee is 1.
    pi1 = mean_variance_hedge(a_g, w1, delta[:m1], 1.0, risk_aversion)
    pi2 = mean_variance_hedge(c_g, w2, delta[m1:], 1.0, risk_aversion)
    return jnp.concatenate([pi1, pi2])


def merged_hedge(
    cov: Float[Array, "n n"],
    lent: Float[Array, " n"],
    delta: Float[Array, " n"],
    fee: Float[Array, ""] | Float[Array, " n"],
    risk_aversion: Float[Array, ""],
) -> Float[Array, " n"]:
    """The single merged pool's hedge, eq. 13 on the full Σ: π = (1/γ_r) Σ⁻¹ (f∘ℓ) − Δ, (n,).

    `fee` is a scalar or per asset (n,), as in `damped_hedge`.
    """
    return mean_variance_hedge(cov, fee * lent, delta, 1.0, risk_aversion)
