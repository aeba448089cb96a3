"""Schur damping γ fitted by gradient, against γ*(ρ̂, n) and the grid oracle, cell by cell.

Run: ``python experiments/calibrate_gamma.py [configs/calibrate_gamma.toml] [--out DIR]
[--quick]``.

Issue "Gradient calibration", item 3. `experiments/schur_damping.py` compares ways of setting
the damping fraction γ of two partially merged pools (conditional damping: γ = 0 isolated,
γ = 1 merged) over cells (blocks m1+m2) × ρ × n, with CE evaluated exactly under the true Σ;
its oracle is the best of a 21-point γ grid by mean CE on validation replications. Here, in
every cell, γ is instead **fitted by gradient** on the same validation replications:

    γ = sigmoid(θ)   (`pdlpjax.calibrate.to_value`, `FreeParam("sigmoid", init)`),
    θ_c = argmax mean_i CE_{c,i}(γ)/CE*_c   (cell c, validation replication i),

by optax Adam (`pdlpjax.calibrate.make_optimizer`, `fit`), all cells at once: θ is a
(cells,) vector and the loss is −Σ_c (mean validation CE of cell c)/CE*_c, so each θ_c only
sees its own cell's gradient, and Adam, being elementwise, keeps the problems independent.
Dividing by CE*_c puts every cell on the same scale (Adam's ε is then equally negligible
everywhere). The result γ_grad is compared on the held-out test replications with the
rule γ*(ρ̂, n) (per replication, from its own Σ̂) and with the grid oracle γ_oracle:
|γ_grad − γ_oracle|, |γ* − γ_oracle|, and the regret 1 − CE/CE* of the three (CE* the
optimum with Σ known), with paired 95% intervals of regret(γ_grad) − regret(γ*).

**Shared with schur_damping.py** (imported, not copied): the model (`Model`, `outcomes`:
eq. 12's CE under the true Σ, `optimum`: CE*), the true Σ (`true_covariance`), the draws
(`draws`: the same keys, so with the same seed and config every cell sees exactly the
replications of the Schur run and γ_oracle and γ* reproduce its table), Σ̂ (`sample_covariance`
+ `estimate`, OAS by default), and the damped hedges of every grid γ and of γ*
(`make_cell_evaluator`), which give γ_oracle and the test CE of γ* and γ_oracle here too.

**The fitted objective in closed form.** One replication's CE is an explicit rational
function of γ. Whiten pool 1 by A = L_A L_Aᵀ and pool 2 by C = L_C L_Cᵀ (blocks of Σ̂) and
take the full SVD K = L_A⁻¹ B L_C⁻ᵀ = U S Vᵀ (singular values s padded with zeros). Then
A(γ) = L_A U diag(1 − γs²) Uᵀ L_Aᵀ and B C⁻¹ w₂ = L_A K L_C⁻¹ w₂, so with w = f∘ℓ,
α = Uᵀ L_A⁻¹ w₁ and β = Vᵀ L_C⁻¹ w₂ the conditional hedge's net exposure x = π + Δ is

    x₁(γ) = (1/γ_r) L_A⁻ᵀ U · (α − γ s∘β)/(1 − γ s²),
    x₂(γ) = (1/γ_r) L_C⁻ᵀ V · (β − γ s∘α)/(1 − γ s²),

and CE(γ) = f ℓᵀx − (γ_r/2) xᵀΣx. With s < 1 (Σ̂ positive definite) it is smooth on [0, 1].
Precomputing E = blockdiag(L_A⁻ᵀU, L_C⁻ᵀV)/γ_r and the numerators once per replication makes
each Adam step O(p²) per replication instead of two Cholesky factorisations forward and
backward (and keeps the batched LAPACK calls, which can deadlock on 2 cores, out of the
loop). It is not trusted blindly: every run compares it with `make_cell_evaluator`
(`pdlpjax.damped_hedge`) at every grid γ and at γ*, on every validation and test
replication (`summary.json` → `checks`).

**Gradient check.** On a few cells (`[check] fd_cells`) the derivative of the mean
validation CE in γ (autodiff of the closed form, as the fit uses it, and autodiff through
`pdlpjax.damped_hedge` directly) is compared with a central finite difference of the
`damped_hedge` evaluation, float64, step `fd_step`.

**Fit checks.** The validation CE of every cell is also evaluated on a fine γ grid
(`fine_grid` points); the table reports its argmax, whether the curve is concave on [0, 1]
and whether its optimum is interior, so the fit can be judged where its target is
well defined.

**Outputs** (``runs/calibrate_gamma-<timestamp>/`` by default): ``table.csv`` (one row per
cell), ``summary.json`` (config, aggregates, checks, fit history, versions, wall time),
``config.toml`` (copy), ``gamma_fit.png`` and ``findings.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import platform
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import matplotlib
import numpy as np
import optax

import pdlpjax as P
from pdlpjax import _io
from pdlpjax.calibrate import fit, from_value, make_optimizer, to_value
from pdlpjax.config import FreeParam

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.colors import LogNorm  # noqa: E402

# schur_damping.py is a script beside this one, not a package module: make it importable
# however this file is run (python experiments/…, pytest, importlib).
EXPERIMENTS = Path(__file__).resolve().parent
if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))
import schur_damping as sd  # noqa: E402

NAME = "calibrate_gamma"
ROOT = EXPERIMENTS.parent
DEFAULT_CONFIG = ROOT / "configs" / "calibrate_gamma.toml"
METHODS = ("grad", "star", "oracle")  # γ_grad, γ*(ρ̂, n), γ_oracle
METHOD_LABEL = {"grad": "γ_grad", "star": "γ*(ρ̂,n)", "oracle": "γ_oracle"}
SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adam", "adamw", "sgd")

# Defaults, mirrored (with comments) by configs/calibrate_gamma.toml. Model and simulation
# are schur_damping.py's defaults, so a default run sees the Schur run's replications.
DEFAULTS: dict = {
    "seed": 0,
    "model": {"fee": 0.0005, "risk_aversion": 0.1, "lent_fraction": 0.5, "delta": 1.0},
    "simulation": {
        "blocks": [[1, 1], [2, 5], [4, 4]],
        "rhos": [0.0, 0.1, 0.3, 0.5, 0.7, 0.9],
        "ns": [5, 10, 20, 50, 100, 250],
        "vol_pool1": 0.035,
        "vol_pool2": 0.06,
        "within_corr": 0.5,
        "test_reps": 3000,
        "validation_reps": 3000,
        "gamma_grid": 21,
        "estimator": "oas",
        "ridge": 1.0e-6,
    },
    "fit": {
        "optimizer": "adam",
        "learning_rate": 0.3,
        "steps": 300,
        "schedule": "constant",
        "final_fraction": 0.01,
        "init": 0.5,
        "clip_norm": 0.0,
    },
    "check": {
        "fine_grid": 201,
        "concavity_tolerance": 1.0e-10,
        "fd_cells": [["1+1", 0.3, 20], ["2+5", 0.1, 100], ["4+4", 0.5, 10]],
        "fd_gammas": [0.25, 0.5, 0.75],
        "fd_step": 1.0e-5,
        "fd_tolerance": 1.0e-6,
    },
}

# `--quick`: a tiny grid for the test (overrides the config's values).
QUICK: dict = {
    "simulation": {
        "blocks": [[1, 1], [2, 2]],
        "rhos": [0.0, 0.1, 0.3, 0.9],
        "ns": [10, 50],
        "test_reps": 200,
        "validation_reps": 200,
        "gamma_grid": 11,
    },
    "fit": {"steps": 200},
    "check": {"fine_grid": 101, "fd_cells": [["1+1", 0.3, 50], ["2+2", 0.9, 10]]},
}

ConfigError = sd.ConfigError


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Settings:
    """The resolved config as plain Python values."""

    seed: int
    fee: float
    risk_aversion: float
    lent_fraction: float
    delta: float
    blocks: tuple[tuple[int, int], ...]
    rhos: tuple[float, ...]
    ns: tuple[int, ...]
    vol_pool1: float
    vol_pool2: float
    within_corr: float
    test_reps: int
    validation_reps: int
    gamma_grid: int
    estimator: str
    ridge: float
    optimizer: str
    learning_rate: float
    steps: int
    schedule: str
    final_fraction: float
    init: float
    clip_norm: float
    fine_grid: int
    concavity_tolerance: float
    fd_cells: tuple[tuple[str, float, int], ...]
    fd_gammas: tuple[float, ...]
    fd_step: float
    fd_tolerance: float

    def __post_init__(self):
        if min(self.fee, self.risk_aversion, self.lent_fraction, self.delta) <= 0:
            raise ConfigError("model: fee, risk_aversion, lent_fraction and delta need > 0")
        if not self.blocks or any(len(b) != 2 or min(b) < 1 for b in self.blocks):
            raise ConfigError("simulation.blocks: need pairs [m1, m2] with m1, m2 ≥ 1")
        if len(set(self.blocks)) != len(self.blocks):
            raise ConfigError("simulation.blocks: need distinct pairs")
        if not self.rhos or any(not 0.0 <= r < 1.0 for r in self.rhos):
            raise ConfigError("simulation.rhos: need 0 ≤ ρ < 1 (Σ must be positive definite)")
        if not self.ns or any(n < 4 for n in self.ns):
            raise ConfigError("simulation.ns: need n ≥ 4")
        if min(self.vol_pool1, self.vol_pool2) <= 0:
            raise ConfigError("simulation.vol_pool*: need > 0")
        largest = max(max(b) for b in self.blocks)
        if not -1.0 / max(largest - 1, 1) < self.within_corr < 1.0:
            raise ConfigError("simulation.within_corr: need −1/(m − 1) < r < 1")
        if min(self.test_reps, self.validation_reps) < 2:
            raise ConfigError("simulation.*_reps: need ≥ 2")
        if self.gamma_grid < 2:
            raise ConfigError("simulation.gamma_grid: need ≥ 2 (γ = 0 and γ = 1)")
        if self.estimator not in sd.ESTIMATORS:
            raise ConfigError(f"simulation.estimator: need one of {sd.ESTIMATORS}")
        if self.ridge < 0:
            raise ConfigError("simulation.ridge: need ≥ 0")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"fit.optimizer: need one of {OPTIMIZERS}")
        if self.learning_rate <= 0 or self.steps < 1:
            raise ConfigError("fit.learning_rate: need > 0; fit.steps: need ≥ 1")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"fit.schedule: need one of {SCHEDULES}")
        if not 0.0 < self.final_fraction <= 1.0:
            raise ConfigError("fit.final_fraction: need 0 < fraction ≤ 1")
        if not 0.0 < self.init < 1.0:
            raise ConfigError("fit.init: need 0 < γ < 1 (the sigmoid never reaches 0 or 1)")
        if self.clip_norm < 0:
            raise ConfigError("fit.clip_norm: need ≥ 0 (0 = no clipping)")
        if self.fine_grid < 3:
            raise ConfigError("check.fine_grid: need ≥ 3")
        if self.concavity_tolerance < 0:
            raise ConfigError("check.concavity_tolerance: need ≥ 0")
        if any(not 0.0 < g < 1.0 for g in self.fd_gammas) or not self.fd_gammas:
            raise ConfigError("check.fd_gammas: need values in (0, 1)")
        if not 0.0 < self.fd_step < min(min(self.fd_gammas), 1 - max(self.fd_gammas)):
            raise ConfigError("check.fd_step: need 0 < h < distance of every fd γ to 0 and 1")
        if self.fd_tolerance <= 0:
            raise ConfigError("check.fd_tolerance: need > 0")

    @property
    def model(self) -> sd.Model:
        return sd.Model(
            self.fee,
            self.risk_aversion,
            self.lent_fraction,
            self.delta,
            self.estimator,
            self.ridge,
            self.gamma_grid,
        )

    @property
    def free(self) -> FreeParam:
        """γ = sigmoid(θ) ∈ (0, 1), starting at `init`."""
        return FreeParam("sigmoid", self.init, 0.0, 1.0)


def load_settings(path: str | Path, quick: bool = False) -> tuple[Settings, dict]:
    """Read a TOML config over `DEFAULTS` (and `QUICK` with `quick`); settings and the dict."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: {err}") from None
    cfg = sd._merge(DEFAULTS, raw)  # the Schur script's strict merge: unknown keys are errors
    if quick:
        cfg = sd._merge(cfg, QUICK)
    m, sim, f, c = cfg["model"], cfg["simulation"], cfg["fit"], cfg["check"]
    try:
        s = Settings(
            seed=int(cfg["seed"]),
            **sd.model_fields(m, sim),
            optimizer=str(f["optimizer"]),
            learning_rate=float(f["learning_rate"]),
            steps=int(f["steps"]),
            schedule=str(f["schedule"]),
            final_fraction=float(f["final_fraction"]),
            init=float(f["init"]),
            clip_norm=float(f["clip_norm"]),
            fine_grid=int(c["fine_grid"]),
            concavity_tolerance=float(c["concavity_tolerance"]),
            fd_cells=tuple((str(x[0]), float(x[1]), int(x[2])) for x in c["fd_cells"]),
            fd_gammas=tuple(float(g) for g in c["fd_gammas"]),
            fd_step=float(c["fd_step"]),
            fd_tolerance=float(c["fd_tolerance"]),
        )
    except (TypeError, ValueError, IndexError, KeyError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{path}: {err}") from None
    return s, cfg


# --------------------------------------------------------------------------- model


class Cell(NamedTuple):
    """One (block size, ρ, n) cell; `block` indexes `Settings.blocks` (and the draws' keys)."""

    block: int
    m1: int
    m2: int
    rho: float
    n: int

    @property
    def label(self) -> str:
        return f"{self.m1}+{self.m2}"


def cells_of(s: Settings) -> list[Cell]:
    """Every cell, in the Schur table's order (blocks, then ρ, then n)."""
    return [
        Cell(bi, m1, m2, rho, n)
        for bi, (m1, m2) in enumerate(s.blocks)
        for rho in s.rhos
        for n in s.ns
    ]


def cell_covariance(s: Settings, cell: Cell) -> np.ndarray:
    """The true Σ of a cell (schur_damping's construction: first canonical correlation ρ)."""
    return sd.true_covariance(cell.m1, cell.m2, cell.rho, s.vol_pool1, s.vol_pool2, s.within_corr)


def cell_samples(s: Settings, cell: Cell, split: int, z: np.ndarray | None = None) -> np.ndarray:
    """Sample covariances (reps, p, p) of a cell's replications (split 0 test, 1 validation).

    The Schur run's draws: Z from `sd.draws(seed, block, split, …)`, returns X = Z Lᵀ, the
    first n rows. Pass `z` to reuse the block's draws across cells.
    """
    p = cell.m1 + cell.m2
    if z is None:
        reps = s.test_reps if split == 0 else s.validation_reps
        z = sd.draws(s.seed, cell.block, split, reps, max(s.ns), p)
    chol = np.linalg.cholesky(cell_covariance(s, cell))
    return sd.sample_covariance(z[:, : cell.n] @ chol.T)


class Spectral(NamedTuple):
    """Per replication, what x(γ) = E·(num0 − γ·num1)/(1 − γ·ssq) needs (module docstring).

    Shapes (..., p) except `e` (..., p, p); `rho` (...) is ρ̂ = s₁, the first canonical
    correlation of Σ̂ (what `coupling_rho` returns, and γ* uses).
    """

    num0: jax.Array
    num1: jax.Array
    ssq: jax.Array
    e: jax.Array
    rho: jax.Array


def spectral(sample: jax.Array, n: jax.Array, model: sd.Model, m1: int) -> Spectral:
    """The γ-free part of the conditional damped hedge from one sample covariance."""
    cov = sd.estimate(sample, n, model)  # the same Σ̂ as the Schur run's rules
    p = cov.shape[0]
    m2 = p - m1
    q = min(m1, m2)
    a, b, c = P.split_blocks(cov, m1)
    la, lc = jnp.linalg.cholesky(a), jnp.linalg.cholesky(c)
    k = jsl.solve_triangular(la, b, lower=True)  # L_A⁻¹ B
    k = jsl.solve_triangular(lc, k.T, lower=True).T  # K = L_A⁻¹ B L_C⁻ᵀ
    u, s, vt = jnp.linalg.svd(k, full_matrices=True)
    w = model.fee * model.lent_fraction * model.delta * jnp.ones(p, cov.dtype)  # f∘ℓ
    alpha = u.T @ jsl.solve_triangular(la, w[:m1], lower=True)
    beta = vt @ jsl.solve_triangular(lc, w[m1:], lower=True)

    def pad(x, m):  # the first q entries of x, zeros after (K has q singular values)
        return jnp.zeros(m, cov.dtype).at[:q].set(x[:q])

    s1, s2 = pad(s, m1), pad(s, m2)
    e = jnp.zeros((p, p), cov.dtype)
    e = e.at[:m1, :m1].set(jsl.solve_triangular(la.T, u, lower=False))  # L_A⁻ᵀ U
    e = e.at[m1:, m1:].set(jsl.solve_triangular(lc.T, vt.T, lower=False))  # L_C⁻ᵀ V
    return Spectral(
        num0=jnp.concatenate([alpha, beta]),
        num1=jnp.concatenate([s1 * pad(beta, m1), s2 * pad(alpha, m2)]),
        ssq=jnp.concatenate([s1**2, s2**2]),
        e=e / model.risk_aversion,
        rho=s[0],
    )


def exposures(spec: Spectral, gamma: jax.Array) -> jax.Array:
    """Net exposures x = π + Δ (..., p) of the conditional damped hedge at γ (broadcasts
    against the replications' leading axes)."""
    g = jnp.asarray(gamma)[..., None]
    coef = (spec.num0 - g * spec.num1) / (1.0 - g * spec.ssq)
    return jnp.einsum("...ij,...j->...i", spec.e, coef)


def spectral_ce(spec: Spectral, gamma, cov_true, model: sd.Model) -> jax.Array:
    """Per-replication CE at γ under the true Σ (schur_damping's `outcomes`)."""
    return sd.outcomes(exposures(spec, gamma), cov_true, model)[0]


@functools.cache
def make_spectral(model: sd.Model, m1: int, m2: int):
    """Jitted (samples (R, p, p), n) → `Spectral` with a leading R axis, in LAPACK-safe
    chunks (`sd.lapack_safe_chunk`: big batched decompositions can hang jaxlib on 2 cores;
    one γ-free factorisation per replication, hence num_gammas = 1)."""
    chunk = sd.lapack_safe_chunk(m1, m2, 1)

    def run(samples, n):
        return jax.lax.map(lambda x: spectral(x, n, model, m1), samples, batch_size=chunk)

    return jax.jit(run)


def mean_ce(spec: Spectral, gamma, cov_true, ce_opt, model: sd.Model) -> jax.Array:
    """Mean CE over a cell's replications at γ, in units of CE* (the fit's objective)."""
    return jnp.mean(spectral_ce(spec, gamma, cov_true, model)) / ce_opt


@functools.cache
def make_block_functions(model: sd.Model):
    """Jitted functions of one block's stacked cells (leading axis C: cells, then R).

    `values(γ (C,), specs, covs, opts)` → mean validation CE/CE* per cell (C,);
    `per_rep(γ (C,), specs, covs, opts)` → CE/CE* per replication (C, R);
    `grad_gamma(γ (C,), …)` → d(mean CE/CE*)/dγ per cell (C,);
    `on_grid(grid (G,), …)` → mean CE/CE* (G, C), one γ of the grid at a time (memory).
    """

    def one(g, spec, cov, opt):
        return mean_ce(spec, g, cov, opt, model)

    cells = jax.vmap(one)

    def per_rep(g, specs, covs, opts):
        ce = jax.vmap(lambda gg, sp, cv: spectral_ce(sp, gg, cv, model))(g, specs, covs)
        return ce / opts[:, None]

    def on_grid(grid, specs, covs, opts):
        def at(g):
            return cells(jnp.full(opts.shape, g, opts.dtype), specs, covs, opts)

        return jax.lax.map(at, grid)

    grad_gamma = jax.vmap(jax.grad(one))
    return {
        "values": jax.jit(cells),
        "per_rep": jax.jit(per_rep),
        "grad_gamma": jax.jit(grad_gamma),
        "on_grid": jax.jit(on_grid),
    }


@functools.cache
def make_reference(model: sd.Model, m1: int, m2: int):
    """Jitted (γ, samples, n, Σ) → (mean CE, d mean CE/dγ) through `pdlpjax.damped_hedge`
    directly (conditional damping, as in schur_damping's `hedges`): the independent path
    the closed form and the finite differences are checked against."""
    chunk = sd.lapack_safe_chunk(m1, m2, 1)

    def one(sample, n, cov_true, g):
        cov = sd.estimate(sample, n, model)
        p = cov.shape[0]
        delta = jnp.full((p,), model.delta, cov.dtype)
        lent = model.lent_fraction * delta
        pi = P.damped_hedge(
            cov, m1, g, lent, delta, model.fee, model.risk_aversion, conditional=True
        )
        return sd.outcomes(pi + delta, cov_true, model)[0]

    def mean_fn(g, samples, n, cov_true):
        ce = jax.lax.map(lambda x: one(x, n, cov_true, g), samples, batch_size=chunk)
        return jnp.mean(ce)

    return jax.jit(jax.value_and_grad(mean_fn))


# --------------------------------------------------------------------------- simulation


def prepare(s: Settings, progress: bool = True) -> dict:
    """Per block: the Schur evaluator's figures (oracle, γ*), the closed form's precomputed
    validation and test data, and the check of the closed form against the evaluator."""
    model = s.model
    grid = np.linspace(0.0, 1.0, s.gamma_grid)
    blocks: list[dict] = []
    check = {"max_rel_diff_grid": 0.0, "max_rel_diff_star": 0.0, "max_abs_diff_rho": 0.0}
    t0 = time.perf_counter()
    done, total = 0, len(cells_of(s))
    for bi, (m1, m2) in enumerate(s.blocks):
        p = m1 + m2
        evaluate = sd.make_cell_evaluator(model, m1, m2)
        pre = make_spectral(model, m1, m2)
        z = {
            split: sd.draws(s.seed, bi, split, reps, max(s.ns), p)
            for split, reps in ((0, s.test_reps), (1, s.validation_reps))
        }
        cells = [c for c in cells_of(s) if c.block == bi]
        spec_val, spec_test, per_cell = [], [], []
        for cell in cells:
            cov = cell_covariance(s, cell)
            lent = np.full(p, s.lent_fraction * s.delta)
            best = sd.optimum(cov, lent, s.fee, s.risk_aversion)
            nn = jnp.asarray(float(cell.n))
            sv, st = (cell_samples(s, cell, split, z[split]) for split in (1, 0))
            fig_val = jax.device_get(evaluate(sv, nn, cov))
            fig_test = jax.device_get(evaluate(st, nn, cov))
            sp_val = jax.device_get(pre(sv, nn))
            sp_test = jax.device_get(pre(st, nn))
            # The closed form against the Schur evaluator, at every grid γ and at γ*.
            for sp, fig in ((sp_val, fig_val), (sp_test, fig_test)):
                ce_grid = np.asarray(
                    jax.vmap(lambda g, sp=sp, cov=cov: spectral_ce(sp, g, cov, model))(grid)
                ).T
                ref = fig["conditional_ce_grid"]
                check["max_rel_diff_grid"] = max(
                    check["max_rel_diff_grid"], float(np.max(np.abs(ce_grid - ref))) / best["ce"]
                )
                check["max_abs_diff_rho"] = max(
                    check["max_abs_diff_rho"], float(np.max(np.abs(sp.rho - fig["rho"])))
                )
            g_star = fig_test["conditional_gamma_star"][:, 0]  # γ*(ρ̂, n), the canonical rule
            ce_star_closed = np.asarray(spectral_ce(sp_test, g_star, cov, model))
            check["max_rel_diff_star"] = max(
                check["max_rel_diff_star"],
                float(np.max(np.abs(ce_star_closed - fig_test["conditional_ce_star"][:, 0])))
                / best["ce"],
            )
            # The oracle exactly as schur_damping.summarise_cell picks it.
            val_grid = fig_val["conditional_ce_grid"].mean(axis=0)
            k = int(np.argmax(val_grid))
            per_cell.append(
                {
                    "cell": cell,
                    "ce_opt": best["ce"],
                    "gamma_oracle": float(grid[k]),
                    "val_ce_oracle": float(val_grid[k]) / best["ce"],
                    "gamma_star": g_star,
                    "test_ce_star": fig_test["conditional_ce_star"][:, 0] / best["ce"],
                    "test_ce_oracle": fig_test["conditional_ce_grid"][:, k] / best["ce"],
                    "cov": cov,
                }
            )
            spec_val.append(sp_val)
            spec_test.append(sp_test)
            done += 1
            if progress:
                print(
                    f"[{NAME}] prepare {done}/{total}  blocks {m1}+{m2}  ρ {cell.rho:.1f}  "
                    f"n {cell.n:3d}  γ_oracle {per_cell[-1]['gamma_oracle']:.2f}  "
                    f"{time.perf_counter() - t0:6.1f} s",
                    file=sys.stderr,
                    flush=True,
                )

        def stack(specs):
            return Spectral(*(jnp.asarray(np.stack(f)) for f in zip(*specs, strict=True)))

        blocks.append(
            {
                "m1": m1,
                "m2": m2,
                "cells": per_cell,
                "val": stack(spec_val),
                "test": stack(spec_test),
                "covs": jnp.asarray(np.stack([c["cov"] for c in per_cell])),
                "opts": jnp.asarray([c["ce_opt"] for c in per_cell]),
            }
        )
    return {"blocks": blocks, "check": check}


def fit_gamma(s: Settings, blocks: list[dict], progress: bool = True) -> dict:
    """γ_grad of every cell: Adam on θ (cells,), γ = sigmoid(θ), maximising each cell's mean
    validation CE/CE*. **Returns:** θ, γ, the final validation values and the history."""
    model = s.model
    free = s.free
    fns = make_block_functions(model)
    sizes = [len(b["cells"]) for b in blocks]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    data = [(b["val"], b["covs"], b["opts"]) for b in blocks]

    def loss(theta, data):
        vals = [
            fns["values"](to_value(theta[offsets[i] : offsets[i + 1]], free), *d)
            for i, d in enumerate(data)
        ]
        v = jnp.concatenate(vals)
        # −Σ_c: cell c's CE depends on θ_c only, so ∂loss/∂θ_c is cell c's own gradient.
        return -jnp.sum(v), v

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    history: list[dict] = []
    latest: dict = {}

    def loss_and_grad(theta, step):
        (total, v), grad = grad_fn(theta, data)
        if not bool(jnp.all(jnp.isfinite(grad))):
            raise FloatingPointError(f"{NAME}: non-finite gradient at step {step}")
        latest["values"] = v
        return total, grad

    def record(step, theta, loss_value, grad):
        g = np.asarray(grad)
        history.append(
            {
                "step": step,
                "loss": float(loss_value),
                "max_abs_grad_theta": float(np.max(np.abs(g))),
                "mean_gamma": float(np.mean(np.asarray(to_value(theta, free)))),
            }
        )
        if progress and (step % 50 == 0 or step == s.steps - 1):
            print(
                f"[{NAME}] fit step {step + 1}/{s.steps}  loss {float(loss_value):.6g}  "
                f"max|∂/∂θ| {history[-1]['max_abs_grad_theta']:.2e}",
                file=sys.stderr,
                flush=True,
            )

    if s.schedule == "cosine":  # decay, so Adam's ±lr steps settle instead of oscillating
        lr = optax.cosine_decay_schedule(s.learning_rate, s.steps, alpha=s.final_fraction)
    else:
        lr = s.learning_rate
    theta0 = jnp.full(int(offsets[-1]), from_value(s.init, free), jnp.float64)
    theta = fit(
        loss_and_grad, theta0, make_optimizer(s.optimizer, lr, s.clip_norm), s.steps, record
    )
    gamma = np.asarray(to_value(theta, free))
    (_, values), _ = grad_fn(theta, data)
    grads = np.concatenate(
        [
            np.asarray(fns["grad_gamma"](jnp.asarray(gamma[offsets[i] : offsets[i + 1]]), *d))
            for i, d in enumerate(data)
        ]
    )
    return {
        "theta": np.asarray(theta),
        "gamma": gamma,
        "val_ce": np.asarray(values),
        "grad_gamma": grads,
        "offsets": offsets,
        "history": history,
    }


def fine_grid_scan(s: Settings, blocks: list[dict]) -> list[np.ndarray]:
    """Mean validation CE/CE* on `fine_grid` γ values, per block (G, C)."""
    fns = make_block_functions(s.model)
    fine = jnp.linspace(0.0, 1.0, s.fine_grid)
    return [np.asarray(fns["on_grid"](fine, b["val"], b["covs"], b["opts"])) for b in blocks]


def gradient_check(s: Settings, prep: dict) -> dict:
    """d(mean validation CE)/dγ on the `fd_cells`: autodiff of the closed form (the fit's
    gradient) and through `damped_hedge`, against a central finite difference of the
    `damped_hedge` path, float64; all in units of CE* per unit γ."""
    model = s.model
    fns = make_block_functions(model)
    labels = {f"{m1}+{m2}": bi for bi, (m1, m2) in enumerate(s.blocks)}
    wanted = [
        (labels[b], rho, n)
        for b, rho, n in s.fd_cells
        if b in labels and rho in s.rhos and n in s.ns
    ]
    if not wanted:  # a custom grid without the configured cells: the middle of the first block
        wanted = [(0, s.rhos[len(s.rhos) // 2], s.ns[len(s.ns) // 2])]
    rows = []
    h = s.fd_step
    for bi, rho, n in wanted:
        block = prep["blocks"][bi]
        j = next(
            i for i, c in enumerate(block["cells"]) if c["cell"].rho == rho and c["cell"].n == n
        )
        info = block["cells"][j]
        cell = info["cell"]
        reference = make_reference(model, cell.m1, cell.m2)
        samples = cell_samples(s, cell, 1)
        cov = jnp.asarray(info["cov"])
        nn = jnp.asarray(float(n))
        spec = jax.tree.map(lambda x, j=j: x[j : j + 1], block["val"])
        for g in s.fd_gammas:
            ad_fit = float(
                fns["grad_gamma"](
                    jnp.asarray([g]), spec, block["covs"][j : j + 1], block["opts"][j : j + 1]
                )[0]
            )
            value, ad_ref = reference(jnp.asarray(g), samples, nn, cov)
            up, _ = reference(jnp.asarray(g + h), samples, nn, cov)
            down, _ = reference(jnp.asarray(g - h), samples, nn, cov)
            fd = float(up - down) / (2 * h) / info["ce_opt"]
            ad_ref = float(ad_ref) / info["ce_opt"]
            scale = max(abs(fd), 1e-12)  # relative error; the floor only avoids 0/0
            rows.append(
                {
                    "blocks": cell.label,
                    "rho": rho,
                    "n": n,
                    "gamma": g,
                    "val_ce": float(value) / info["ce_opt"],
                    "grad_closed_form": ad_fit,
                    "grad_damped_hedge": ad_ref,
                    "finite_difference": fd,
                    "rel_err_closed_form": abs(ad_fit - fd) / scale,
                    "rel_err_damped_hedge": abs(ad_ref - fd) / scale,
                }
            )
    worst = max(max(r["rel_err_closed_form"], r["rel_err_damped_hedge"]) for r in rows)
    return {
        "step": h,
        "tolerance": s.fd_tolerance,
        "max_rel_error": worst,
        "passes": bool(worst < s.fd_tolerance),
        "rows": rows,
    }


def _interval(x: np.ndarray) -> tuple[float, float, float]:
    m = P.mean_ci(x)
    return m["mean"], m["ci95"][0], m["ci95"][1]


def build_rows(s: Settings, prep: dict, fitted: dict, fine: list[np.ndarray]) -> dict:
    """Table rows (one per cell) and the per-replication regret differences for pooling."""
    fns = make_block_functions(s.model)
    fine_g = np.linspace(0.0, 1.0, s.fine_grid)
    rows: list[dict] = []
    diffs: dict[str, list[np.ndarray]] = {"grad_star": [], "grad_oracle": []}
    for bi, block in enumerate(prep["blocks"]):
        lo, hi = fitted["offsets"][bi], fitted["offsets"][bi + 1]
        gamma = fitted["gamma"][lo:hi]
        test_grad = np.asarray(
            fns["per_rep"](jnp.asarray(gamma), block["test"], block["covs"], block["opts"])
        )
        curve = fine[bi]  # (G, C)
        for j, info in enumerate(block["cells"]):
            cell = info["cell"]
            ce = {
                "grad": test_grad[j],
                "star": info["test_ce_star"],
                "oracle": info["test_ce_oracle"],
            }
            c = curve[:, j]
            d2 = c[:-2] - 2.0 * c[1:-1] + c[2:]
            k = int(np.argmax(c))
            row = {
                "blocks": cell.label,
                "m1": cell.m1,
                "m2": cell.m2,
                "rho": cell.rho,
                "n": cell.n,
                "ce_opt": info["ce_opt"],
                "gamma_oracle": info["gamma_oracle"],
                "gamma_grad": float(gamma[j]),
                "mean_gamma_star": float(info["gamma_star"].mean()),
                "gamma_fine_argmax": float(fine_g[k]),
                "val_concave": bool(np.all(d2 <= s.concavity_tolerance)),
                "val_interior": bool(0 < k < len(fine_g) - 1),
                "abs_gap_grad": abs(float(gamma[j]) - info["gamma_oracle"]),
                "abs_gap_star": abs(float(info["gamma_star"].mean()) - info["gamma_oracle"]),
                "abs_gap_star_per_rep": float(
                    np.abs(info["gamma_star"] - info["gamma_oracle"]).mean()
                ),
                "val_ce_grad": float(fitted["val_ce"][lo + j]),
                "val_ce_oracle": info["val_ce_oracle"],
                "val_ce_fine_best": float(c[k]),
                "grad_at_fit": float(fitted["grad_gamma"][lo + j]),
            }
            for m in METHODS:  # regret against the known-Σ optimum, share of CE*
                mean, lo_ci, hi_ci = _interval(ce[m])
                row[f"regret_{m}"] = 1.0 - mean
                row[f"regret_{m}_lo"], row[f"regret_{m}_hi"] = 1.0 - hi_ci, 1.0 - lo_ci
            # regret(γ_grad) − regret(other) = CE(other) − CE(γ_grad), paired over replications
            for other in ("star", "oracle"):
                d = P.paired_difference(ce[other], ce["grad"])
                key = f"dregret_grad_{other}"
                row[key], (row[f"{key}_lo"], row[f"{key}_hi"]) = d["mean"], d["ci95"]
                diffs[f"grad_{other}"].append(ce[other] - ce["grad"])
            rows.append(row)
    return {"rows": rows, "diffs": {k: np.stack(v) for k, v in diffs.items()}}


def aggregates(
    rows: list[dict], diffs: dict[str, np.ndarray], blocks: list[str], fine_spacing: float
) -> dict:
    """Per block size and over all cells: mean gaps, mean regrets, pooled paired intervals.

    Pooling: within a block every cell uses the same test draws (common random numbers), so
    cells are not independent, but replication i's average over cells is independent of
    replication j's; the interval of that average over replications is valid (across blocks
    the draws are independent, so the same holds for the average over all cells).
    """
    out = {}
    for b in [*blocks, "all"]:
        idx = [i for i, r in enumerate(rows) if b == "all" or r["blocks"] == b]
        sel = [rows[i] for i in idx]
        a: dict = {"cells": len(sel)}
        for key in ("abs_gap_grad", "abs_gap_star", "abs_gap_star_per_rep"):
            a[f"mean_{key}"] = float(np.mean([r[key] for r in sel]))
            a[f"max_{key}"] = float(np.max([r[key] for r in sel]))
        for m in METHODS:
            a[f"mean_regret_{m}"] = float(np.mean([r[f"regret_{m}"] for r in sel]))
            a[f"median_regret_{m}"] = float(np.median([r[f"regret_{m}"] for r in sel]))
            a[f"max_regret_{m}"] = float(np.max([r[f"regret_{m}"] for r in sel]))
        # γ_grad against the oracle, split by where the validation optimum lies: at γ = 0 or
        # 1 the sigmoid can only approach it, in the interior it can sit on it.
        for part, inside in (("interior", True), ("boundary", False)):
            sub = [r for r in sel if r["val_interior"] == inside]
            a[f"cells_{part}"] = len(sub)
            a[f"cells_grad_worse_than_oracle_{part}"] = sum(
                r["dregret_grad_oracle_lo"] > 0 for r in sub
            )
            a[f"mean_dregret_grad_oracle_{part}"] = (
                float(np.mean([r["dregret_grad_oracle"] for r in sub])) if sub else float("nan")
            )
        for other in ("star", "oracle"):
            pooled = P.mean_ci(diffs[f"grad_{other}"][idx].mean(axis=0))
            a[f"dregret_grad_{other}"] = {"mean": pooled["mean"], "ci95": pooled["ci95"]}
            key = f"dregret_grad_{other}"
            a[f"cells_grad_better_than_{other}"] = sum(r[f"{key}_hi"] < 0 for r in sel)
            a[f"cells_grad_worse_than_{other}"] = sum(r[f"{key}_lo"] > 0 for r in sel)
        a["cells_fit_within_fine_spacing"] = sum(
            abs(r["gamma_grad"] - r["gamma_fine_argmax"]) <= fine_spacing for r in sel
        )
        a["max_abs_fit_minus_fine_argmax"] = float(
            np.max([abs(r["gamma_grad"] - r["gamma_fine_argmax"]) for r in sel])
        )
        a["min_val_ce_grad_minus_fine_best"] = float(
            np.min([r["val_ce_grad"] - r["val_ce_fine_best"] for r in sel])
        )
        a["cells_concave_interior"] = sum(r["val_concave"] and r["val_interior"] for r in sel)
        out[b] = a
    return out


# --------------------------------------------------------------------------- plot


def plot_gamma_fit(path: Path, rows: list[dict], blocks: list[str]) -> None:
    """γ_grad (dots) and γ_oracle (crosses) against mean γ*, coloured by n, per block size."""
    fig, axes = plt.subplots(
        1, len(blocks), figsize=(4.6 * len(blocks), 4.8), constrained_layout=True, squeeze=False
    )
    ns = sorted({r["n"] for r in rows})
    norm = LogNorm(min(ns), max(ns)) if len(ns) > 1 else matplotlib.colors.Normalize(0, 2 * ns[0])
    sc = None
    for ax, block in zip(axes[0], blocks, strict=True):
        sel = [r for r in rows if r["blocks"] == block]
        x = np.array([r["mean_gamma_star"] for r in sel])
        y_grad = np.array([r["gamma_grad"] for r in sel])
        y_oracle = np.array([r["gamma_oracle"] for r in sel])
        n = np.array([r["n"] for r in sel])
        ax.plot([0, 1], [0, 1], "--", color="0.5", lw=1, label="45° (γ = mean γ*)")
        ax.vlines(x, y_oracle, y_grad, color="0.75", lw=0.8, zorder=1)
        ax.scatter(x, y_oracle, c=n, cmap="viridis", norm=norm, marker="x", s=34, zorder=2,
                   label="γ_oracle (grid)")  # fmt: skip
        sc = ax.scatter(x, y_grad, c=n, cmap="viridis", norm=norm, s=30, edgecolors="k",
                        linewidths=0.4, zorder=3, label="γ_grad (Adam)")  # fmt: skip
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.set_aspect("equal")
        ax.set_xlabel("mean γ*(ρ̂, n) over test replications")
        ax.set_ylabel("fitted γ")
        ax.set_title(f"blocks {block}")
        ax.legend(fontsize=8, loc="lower right")
    fig.colorbar(sc, ax=axes[0].tolist(), label="n (returns per estimate)")
    fig.suptitle("γ fitted by gradient on the validation CE, against γ* and the grid oracle")
    _io.save_figure(path, fig)
    plt.close(fig)


# --------------------------------------------------------------------------- findings


def _f(x: float, d: int = 2) -> str:
    return "nan" if not np.isfinite(x) else f"{x:.{d}f}"


def _pct(x: float, d: int = 1) -> str:
    return "nan" if not np.isfinite(x) else f"{100 * x:.{d}f}%"


def _ci_pct(mean: float, ci: list[float], d: int = 2) -> str:
    return f"{_pct(mean, d)} [{_pct(ci[0], d)}, {_pct(ci[1], d)}]"


def _row_ci(r: dict, key: str, d: int) -> str:
    """A table row's paired difference `key` with its interval, as percentages."""
    return _ci_pct(r[key], [r[f"{key}_lo"], r[f"{key}_hi"]], d)


def _cell_name(r: dict) -> str:
    return f"{r['blocks']} ρ={r['rho']:g} n={r['n']}"


def write_findings(path: Path, s: Settings, res: dict, wall: float) -> None:
    """findings.md: the written result, every figure computed from this run."""
    rows, agg, blocks = res["rows"], res["aggregates"], res["blocks"]
    a = agg["all"]
    gc, chk = res["gradient_check"], res["checks"]
    spacing = 1.0 / (s.gamma_grid - 1)
    fine_spacing = 1.0 / (s.fine_grid - 1)
    negative = [r for r in rows if r["regret_oracle"] > 1.0]
    L = [
        "# Schur damping γ fitted by gradient: findings",
        "",
        f"Seed {s.seed}; {s.test_reps} test + {s.validation_reps} validation replications per "
        f"cell; blocks {', '.join(blocks)}; ρ ∈ {list(s.rhos)}; n ∈ {list(s.ns)} "
        f"({a['cells']} cells); oracle grid of {s.gamma_grid} γ values (spacing {spacing:g}); "
        f"estimator {s.estimator}; f = {s.fee:g}, γ_r = {s.risk_aversion:g}, "
        f"ℓ = {s.lent_fraction:g}·Δ. Fit: {s.optimizer} on θ (γ = sigmoid(θ), start "
        f"γ = {s.init:g}), learning rate {s.learning_rate:g} ({s.schedule}"
        + (f" decay to {s.final_fraction:g}×" if s.schedule == "cosine" else "")
        + f"), {s.steps} full-batch steps, all cells at once. Wall time {wall:.0f} s. Every "
        "number below is computed by `experiments/calibrate_gamma.py` from this run.",
        "",
        "γ_grad maximises each cell's mean validation CE over γ ∈ (0, 1) (continuous); "
        "γ_oracle maximises it over the grid (the same validation replications, the same "
        "draws as `experiments/schur_damping.py` with this seed); γ*(ρ̂, n) is computed per "
        "test replication from its own Σ̂ (mean over replications shown). Regret = 1 − "
        "CE/CE* on the test replications, CE* the optimum with Σ known, so even the oracle's "
        "regret is positive (the cost of estimating Σ at all; the Schur table's regret is "
        "this minus the oracle's).",
        "",
        "## Headline",
        "",
        "- **Distance to the oracle.** Mean |γ_grad − γ_oracle| "
        f"{_f(a['mean_abs_gap_grad'], 3)} (max {_f(a['max_abs_gap_grad'], 3)}) against mean "
        f"|mean γ* − γ_oracle| {_f(a['mean_abs_gap_star'], 3)} (max "
        f"{_f(a['max_abs_gap_star'], 3)}; per replication, mean |γ* − γ_oracle| "
        f"{_f(a['mean_abs_gap_star_per_rep'], 3)}); per block size γ_grad "
        + ", ".join(f"{b} {_f(agg[b]['mean_abs_gap_grad'], 3)}" for b in blocks)
        + ", γ* "
        + ", ".join(f"{b} {_f(agg[b]['mean_abs_gap_star'], 3)}" for b in blocks)
        + f". γ_grad is within the grid spacing ({spacing:g}) of γ_oracle in "
        f"{sum(r['abs_gap_grad'] <= spacing + 1e-12 for r in rows)} of {a['cells']} cells "
        f"(γ* in {sum(r['abs_gap_star'] <= spacing + 1e-12 for r in rows)}).",
        "- **Regret** (mean over cells, share of CE*; median in brackets): "
        + ", ".join(
            f"{METHOD_LABEL[m]} {_pct(a[f'mean_regret_{m}'], 2)} "
            f"({_pct(a[f'median_regret_{m}'], 2)})"
            for m in METHODS
        )
        + f". {len(negative)} cells have a negative test CE even at γ_oracle (regret "
        "above 100%: the tilt from a noisy Σ̂ costs more variance than the fee earns)"
        + (f", all with n ≤ {max(r['n'] for r in negative)}" if negative else "")
        + "; that estimation cost is common to the three rules, and the Schur table's regret "
        "is the difference to γ_oracle. regret(γ_grad) − regret(γ*), pooled over cells "
        "(paired over test replications): "
        f"{_ci_pct(a['dregret_grad_star']['mean'], a['dregret_grad_star']['ci95'])}; γ_grad "
        f"is significantly better than γ* in {a['cells_grad_better_than_star']} cells and "
        f"worse in {a['cells_grad_worse_than_star']}. Against the grid oracle: "
        f"{_ci_pct(a['dregret_grad_oracle']['mean'], a['dregret_grad_oracle']['ci95'], 3)} "
        f"(better in {a['cells_grad_better_than_oracle']}, worse in "
        f"{a['cells_grad_worse_than_oracle']} cells, "
        f"{a['cells_grad_worse_than_oracle_boundary']} of them among the "
        f"{a['cells_boundary']} whose validation optimum is γ = 0 or 1, which the sigmoid "
        "only approaches; mean difference there "
        f"{_pct(a['mean_dregret_grad_oracle_boundary'], 3)}, in the {a['cells_interior']} "
        f"interior cells {_pct(a['mean_dregret_grad_oracle_interior'], 3)}).",
    ]
    below = [r for r in rows if r["mean_gamma_star"] < r["gamma_oracle"] - 0.1]
    above = [r for r in rows if r["mean_gamma_star"] > r["gamma_oracle"] + 0.1]
    groups = {
        "γ* more than 0.1 below γ_oracle": below,
        "more than 0.1 above": above,
        "within 0.1": [r for r in rows if abs(r["mean_gamma_star"] - r["gamma_oracle"]) <= 0.1],
    }

    def share(group, test):
        return float(np.mean([test(r) for r in group])) if group else float("nan")

    def strong(r):
        return r["rho"] >= 0.3 and r["n"] <= 20

    def noise(r):
        return r["rho"] <= 0.1 and r["m1"] * r["m2"] > 1

    L.append(
        "- **Where γ_grad gains on γ*.** Mean regret(γ_grad) − regret(γ*) by where γ* "
        "misses the oracle: "
        + "; ".join(
            f"{name}: {len(g)} cells, {_pct(np.mean([r['dregret_grad_star'] for r in g]), 2)}"
            + (
                f" (mean ρ {np.mean([r['rho'] for r in g]):.2f}, mean n "
                f"{np.mean([r['n'] for r in g]):.0f})"
                if g
                else ""
            )
            for name, g in groups.items()
        )
        + f". Of the cells where γ* is too low, {_pct(share(below, strong), 0)} have ρ ≥ 0.3 "
        "and n ≤ 20 (γ* shrinks a real coupling as if it were noise); of those where it is "
        f"too high, {_pct(share(above, noise), 0)} have ρ ≤ 0.1 and blocks larger than 1+1 "
        "(the first canonical ρ̂ of noise is biased up there). γ_grad follows the oracle in "
        "both."
    )
    worst_gap = max(rows, key=lambda r: r["abs_gap_grad"])
    worst_d = min(rows, key=lambda r: r["dregret_grad_star"])  # γ_grad's largest gain
    L.append(
        "- **Where they differ most.** Largest |γ_grad − γ_oracle|: "
        f"{_cell_name(worst_gap)} (γ_grad {_f(worst_gap['gamma_grad'], 3)}, γ_oracle "
        f"{_f(worst_gap['gamma_oracle'])}; validation CE of γ_grad minus the oracle's "
        f"{_pct(worst_gap['val_ce_grad'] - worst_gap['val_ce_oracle'], 3)} of CE*). "
        "Largest gain of γ_grad over γ*: "
        f"{_cell_name(worst_d)} ({_pct(-worst_d['dregret_grad_star'], 2)} of CE*; mean γ* "
        f"{_f(worst_d['mean_gamma_star'])}, γ_grad {_f(worst_d['gamma_grad'])}, γ_oracle "
        f"{_f(worst_d['gamma_oracle'])})."
    )
    inner = [r for r in rows if r["val_interior"]]
    edge = [r for r in rows if not r["val_interior"]]

    def dev(r):
        return abs(r["gamma_grad"] - r["gamma_fine_argmax"])

    L.append(
        f"- **The fit.** Where the validation optimum (on {s.fine_grid} γ values) is interior "
        f"({len(inner)} cells), γ_grad is at most "
        + _f(max([dev(r) for r in inner] or [float("nan")]), 4)
        + " from it; where it is γ = 0 or 1 "
        f"({len(edge)} cells), γ = sigmoid(θ) can only approach it (θ → ±∞ while "
        "∂γ/∂θ = γ(1 − γ) vanishes, so Adam's steps shrink) and stops "
        + _f(max([dev(r) for r in edge] or [float("nan")]), 4)
        + " short at most. Validation CE given up against the best fine-grid value: at most "
        f"{_pct(max(0.0, -a['min_val_ce_grad_minus_fine_best']), 3)} of CE*. "
        f"{a['cells_concave_interior']} cells have a concave validation curve with an "
        "interior optimum."
    )
    L.append(
        f"- **Gradient check** (float64, central differences, h = {gc['step']:g}): largest "
        f"relative error {gc['max_rel_error']:.1e} over {len(gc['rows'])} (cell, γ) points "
        f"(bound {gc['tolerance']:g}: {'passes' if gc['passes'] else 'FAILS'}). The closed "
        "form matches `damped_hedge` (the Schur evaluator) to "
        f"{max(chk['max_rel_diff_grid'], chk['max_rel_diff_star']):.1e} of CE* on every "
        "replication."
    )
    L += [
        "",
        "## 1. Per block size",
        "",
        "Mean over cells (gaps: max in brackets; regrets: median in square brackets). "
        "Regrets as shares of CE*; Δ = regret(γ_grad) − "
        "regret(other), pooled paired 95% interval; better/worse = cells whose own paired "
        "interval excludes 0.",
        "",
        "| blocks | abs(γ_grad − γ_oracle) | abs(mean γ* − γ_oracle) | per-rep abs(γ* − γ_oracle) "
        "| regret γ_grad | regret γ* | regret γ_oracle | Δ vs γ* | better / worse than γ* "
        "| Δ vs γ_oracle | better / worse than γ_oracle |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in [*blocks, "all"]:
        g = agg[b]
        L.append(
            f"| {b} | {_f(g['mean_abs_gap_grad'], 3)} ({_f(g['max_abs_gap_grad'], 3)}) "
            f"| {_f(g['mean_abs_gap_star'], 3)} ({_f(g['max_abs_gap_star'], 3)}) "
            f"| {_f(g['mean_abs_gap_star_per_rep'], 3)} "
            + " ".join(
                f"| {_pct(g[f'mean_regret_{m}'], 2)} [{_pct(g[f'median_regret_{m}'], 2)}]"
                for m in METHODS
            )
            + f" | {_ci_pct(g['dregret_grad_star']['mean'], g['dregret_grad_star']['ci95'])} "
            f"| {g['cells_grad_better_than_star']} / {g['cells_grad_worse_than_star']} "
            f"| {_ci_pct(g['dregret_grad_oracle']['mean'], g['dregret_grad_oracle']['ci95'], 3)} "
            f"| {g['cells_grad_better_than_oracle']} / {g['cells_grad_worse_than_oracle']} |"
        )
    L += ["", "![γ_grad and γ_oracle against mean γ*](gamma_fit.png)", ""]
    L += ["## 2. Per cell: γ_grad / γ_oracle / mean γ*", ""]
    for b in blocks:
        sel = [r for r in rows if r["blocks"] == b]
        ns = sorted({r["n"] for r in sel})
        L += [f"blocks {b}:", "", "| ρ \\ n | " + " | ".join(str(n) for n in ns) + " |"]
        L.append("|---|" + "---|" * len(ns))
        for rho in sorted({r["rho"] for r in sel}):
            cells = {r["n"]: r for r in sel if r["rho"] == rho}
            L.append(
                f"| {rho:g} | "
                + " | ".join(
                    f"{_f(cells[n]['gamma_grad'])} / {_f(cells[n]['gamma_oracle'])} / "
                    f"{_f(cells[n]['mean_gamma_star'])}"
                    for n in ns
                )
                + " |"
            )
        L += ["", f"regret(γ_grad) − regret(γ*), % of CE*, blocks {b} (* = paired 95% "
              "interval excludes 0):", ""]  # fmt: skip
        L += ["| ρ \\ n | " + " | ".join(str(n) for n in ns) + " |", "|---|" + "---|" * len(ns)]
        for rho in sorted({r["rho"] for r in sel}):
            cells = {r["n"]: r for r in sel if r["rho"] == rho}

            def star(r):
                sig = r["dregret_grad_star_lo"] > 0 or r["dregret_grad_star_hi"] < 0
                return "*" if sig else ""

            L.append(
                f"| {rho:g} | "
                + " | ".join(
                    f"{100 * cells[n]['dregret_grad_star']:+.2f}{star(cells[n])}" for n in ns
                )
                + " |"
            )
        L.append("")
    L += [
        "## 3. Where γ_grad and γ* differ most",
        "",
        "Cells with the largest |regret(γ_grad) − regret(γ*)|:",
        "",
        "| cell | γ_grad | mean γ* | γ_oracle | regret γ_grad | regret γ* | regret γ_oracle "
        "| Δ [95% CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -abs(r["dregret_grad_star"]))[:8]:
        L.append(
            f"| {_cell_name(r)} | {_f(r['gamma_grad'])} | {_f(r['mean_gamma_star'])} "
            f"| {_f(r['gamma_oracle'])} | "
            + " | ".join(_pct(r[f"regret_{m}"], 2) for m in METHODS)
            + f" | {_row_ci(r, 'dregret_grad_star', 2)} |"
        )
    L += [
        "",
        "Cells where γ_grad is farthest from γ_oracle (the validation CE difference shows "
        "whether the curve is flat there):",
        "",
        "| cell | γ_grad | γ_oracle | fine-grid argmax | concave, interior | val CE γ_grad − "
        "γ_oracle | test Δ vs γ_oracle [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["abs_gap_grad"])[:8]:
        L.append(
            f"| {_cell_name(r)} | {_f(r['gamma_grad'], 3)} | {_f(r['gamma_oracle'])} "
            f"| {_f(r['gamma_fine_argmax'], 3)} | {'yes' if r['val_concave'] else 'no'}, "
            f"{'yes' if r['val_interior'] else 'no'} "
            f"| {_pct(r['val_ce_grad'] - r['val_ce_oracle'], 3)} | "
            f"{_row_ci(r, 'dregret_grad_oracle', 3)} |"
        )
    hist = res["fit"]["history"]
    L += [
        "",
        "## 4. The fit and its checks",
        "",
        f"- Loss (−Σ_c mean validation CE/CE*) from {hist[0]['loss']:.6g} to "
        f"{hist[-1]['loss']:.6g}; largest |∂loss/∂θ_c| at the last step "
        f"{hist[-1]['max_abs_grad_theta']:.1e}. At the fitted γ, |∂(val CE/CE*)/∂γ| is at "
        f"most {max(abs(r['grad_at_fit']) for r in rows if r['val_interior']):.1e} over the "
        "cells with an interior optimum (boundary cells keep a non-zero slope: γ_grad "
        "approaches 0 or 1 without reaching it; largest 1 − γ_grad there "
        + _f(max([1 - r["gamma_grad"] for r in rows if r["gamma_fine_argmax"] == 1.0] or [0]), 4)
        + ", largest γ_grad at a γ = 0 optimum "
        + _f(max([r["gamma_grad"] for r in rows if r["gamma_fine_argmax"] == 0.0] or [0]), 4)
        + ").",
        f"- Closed form vs `make_cell_evaluator` (`damped_hedge`), every replication: max "
        f"|ΔCE|/CE* {chk['max_rel_diff_grid']:.1e} over the grid γ, {chk['max_rel_diff_star']:.1e} "
        f"at γ*; max |Δρ̂| {chk['max_abs_diff_rho']:.1e}.",
        "- Concave validation curves: "
        f"{sum(r['val_concave'] for r in rows)} of {a['cells']} cells; interior optima: "
        f"{sum(r['val_interior'] for r in rows)}; both: {a['cells_concave_interior']}. On those "
        "the target is a unique interior maximum, and γ_grad is at most "
        + _f(
            max(
                [
                    abs(r["gamma_grad"] - r["gamma_fine_argmax"])
                    for r in rows
                    if r["val_concave"] and r["val_interior"]
                ]
                or [float("nan")]
            ),
            4,
        )
        + f" from the fine-grid argmax (grid spacing {spacing:g}, fine spacing "
        f"{fine_spacing:g}).",
        "",
        "## 5. Gradient check: d(mean validation CE/CE*)/dγ",
        "",
        "| cell | γ | val CE/CE* | closed form (autodiff) | damped_hedge (autodiff) | central FD "
        "| rel. err. closed form | rel. err. damped_hedge |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in gc["rows"]:
        L.append(
            f"| {r['blocks']} ρ={r['rho']:g} n={r['n']} | {r['gamma']:g} | {r['val_ce']:.6f} "
            f"| {r['grad_closed_form']:.10g} | {r['grad_damped_hedge']:.10g} "
            f"| {r['finite_difference']:.10g} | {r['rel_err_closed_form']:.1e} "
            f"| {r['rel_err_damped_hedge']:.1e} |"
        )
    _io.write_text(path, "\n".join(L) + "\n")


# --------------------------------------------------------------------------- main


TABLE_COLUMNS = (
    "blocks",
    "m1",
    "m2",
    "rho",
    "n",
    "ce_opt",
    "gamma_oracle",
    "gamma_grad",
    "mean_gamma_star",
    "regret_grad",
    "regret_star",
    "regret_oracle",
)


def run(s: Settings, progress: bool = True) -> dict:
    """The whole experiment in memory: rows, aggregates, checks, fit history."""
    blocks = [f"{m1}+{m2}" for m1, m2 in s.blocks]
    with jax.enable_x64(True):  # small, sometimes ill-conditioned matrices: float64
        prep = prepare(s, progress)
        fitted = fit_gamma(s, prep["blocks"], progress)
        fine = fine_grid_scan(s, prep["blocks"])
        gc = gradient_check(s, prep)
        built = build_rows(s, prep, fitted, fine)
    agg = aggregates(built["rows"], built["diffs"], blocks, 1.0 / (s.fine_grid - 1))
    return {
        "rows": built["rows"],
        "aggregates": agg,
        "blocks": blocks,
        "checks": prep["check"],
        "gradient_check": gc,
        "fit": {"history": fitted["history"], "theta": fitted["theta"]},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="TOML config")
    ap.add_argument("--out", help=f"results folder (default runs/{NAME}-<timestamp>)")
    ap.add_argument("--quick", action="store_true", help="tiny grid, few replications")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    try:
        s, cfg = load_settings(args.config, args.quick)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"{NAME}-{stamp}"

    res = run(s, progress=not args.quiet)
    rows = res["rows"]
    out.mkdir(parents=True, exist_ok=True)
    # table.csv: the brief's columns first, then the diagnostics and intervals.
    header = [*TABLE_COLUMNS, *(k for k in rows[0] if k not in TABLE_COLUMNS)]
    _io.write_csv(out / "table.csv", header, [[sd._cell(r[h]) for h in header] for r in rows])
    plot_gamma_fit(out / "gamma_fit.png", rows, res["blocks"])
    cfg_text = Path(args.config).read_text()
    if args.quick:
        cfg_text = "# command line: --quick (summary.json has the resolved config)\n" + cfg_text
    _io.write_text(out / "config.toml", cfg_text)
    wall = time.perf_counter() - t_start
    write_findings(out / "findings.md", s, res, wall)
    files = ["table.csv", "summary.json", "config.toml", "gamma_fit.png", "findings.md"]
    summary = {
        "experiment": NAME,
        "seed": s.seed,
        "quick": args.quick,
        "config": cfg,
        "aggregates": res["aggregates"],
        "checks": res["checks"],
        "gradient_check": res["gradient_check"],
        "fit": {
            "optimizer": s.optimizer,
            "learning_rate": s.learning_rate,
            "schedule": s.schedule,
            "steps": s.steps,
            "history": res["fit"]["history"][:: max(1, s.steps // 100)]
            + res["fit"]["history"][-1:],
        },
        "table": rows,
        "files": files,
        "versions": {**sd.versions(), "optax": optax.__version__},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "wall_seconds": round(wall, 2),
    }
    text = json.dumps(sd._plain(summary), indent=2, ensure_ascii=False, allow_nan=False)
    _io.write_text(out / "summary.json", text + "\n")
    if not args.quiet:
        a = res["aggregates"]["all"]
        print(
            f"{NAME}: mean |γ_grad − γ_oracle| {a['mean_abs_gap_grad']:.3f}, mean |γ* − "
            f"γ_oracle| {a['mean_abs_gap_star']:.3f}; regret γ_grad {a['mean_regret_grad']:.2%}, "
            f"γ* {a['mean_regret_star']:.2%}, γ_oracle {a['mean_regret_oracle']:.2%}",
            file=sys.stderr,
        )
    print(f"{NAME}: wall {wall:.1f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
