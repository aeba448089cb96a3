"""Pathwise gradients of the exact model against central finite differences (a cheap version
of `benchmarks/gradients.py`, whose functions it uses).

One BTC/USDC pool config, 8 pools × 48 hourly steps in float64. Every param θ enters as θ₀·λ
and both derivatives are taken in λ at 1 with common random numbers (the same pool keys, so
the same draws, at every λ): `jax.vjp` through the scan of `simulate.step` for the pathwise
gradient of the outputs, and (F(1 + h) − F(1 − h)) / 2h for the finite difference, from the
same compiled program.

The book has K = 2·48 + 1 buckets per side: at most two crowds (the demand's and the funding
arbitrageur's) open per side and step, so a slot is always free and no merge happens. The
merge is the one discrete choice left in the book (the cheapest pair is an argmin): when two
pair costs cross as θ moves, the book is partitioned differently and later liquidations jump
(`benchmarks/gradients.py` measures that on the quickstart, where the book merges every step).
Without merges every event is continuous, so the gradient must match the FD at a finite
h = 1e-4 as well as locally (h = 1e-6).

Measured here (seed 0), relative error of the pathwise gradient of the LP's return against
the FD at h = 1e-2 / 3e-3 / 1e-3 / 3e-4 / 1e-4: below 5e-4 at every h for pool.fee,
market.mean_holding, market.funding_kappa and market.open_rate; market.leverage 0.245 /
0.143 / 0.091 / <5e-4 / <5e-4 and market.leverage_spread 0.080 / 0.038 / 0.023 / <5e-4 /
<5e-4. The error of those two falls with h, as the kinks of a continuous, piecewise smooth
function make it (the clips of liquidation and acceptance; a jump would make it grow as h
falls), and their derivatives are small (−6.4e-7 and 2.9e-6 in λ, against 4.3e-5 for the
fee), so a few pools' kinks are a large part of them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdlpjax.config import config_from_dict

# ~25-40 s on 2 CPU cores, most of it compiling the gradient of the scan (once).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NUM_STEPS = 48
STEPS_H = (1e-4, 1e-6)  # relative finite-difference steps: a finite one and a local one
RTOL = 0.05

RAW = {
    "name": "gradients",
    "market": {
        "assets": ["BTC"],
        "initial_prices": [60000.0],
        "cohorts": 2 * NUM_STEPS + 1,  # never full: no merges
        "open_rate": [0.002],
        "max_leverage": 20.0,
    },
    "paths": {"vols": [0.8], "correlation": [[1.0]]},
    "pool": {"target_weights": [0.5, 0.5], "fee": 5.0e-5},
    "simulation": {"num_pools": 8, "num_steps": NUM_STEPS, "progress": False, "dtype": "float64"},
    "output": {"plots": False},
}

# Asserted to agree with the FD (on the LP's total return); the rest only to be finite.
MATCHED = [
    "pool.fee",
    "market.leverage",
    "market.mean_holding",
    "market.funding_kappa",
    "market.open_rate",
    "market.leverage_spread",
]
FINITE_ONLY = [
    "market.funding_cap",
    "market.fee_elasticity",
    "market.momentum",
    "market.max_leverage",
    "pool.max_utilisation",
]
NAMES = MATCHED + FINITE_ONLY


def _benchmark():
    path = ROOT / "benchmarks" / "gradients.py"
    spec = importlib.util.spec_from_file_location("benchmark_gradients", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def measured():
    """Outputs (LP return, utilisation, fee income, hedged return) and their Jacobian in λ
    at λ = 1, and the central FDs of the LP return for each matched param at each h."""
    G = _benchmark()
    with jax.enable_x64(True):
        cfg = config_from_dict(RAW)
        outputs, _ = G.output_fn(cfg, NAMES, checkpoint=False)  # short: store residuals

        def value_and_jacobian(lam):
            y, vjp = jax.vjp(outputs, lam)
            return y, jax.vmap(vjp)(jnp.eye(y.shape[0], dtype=y.dtype))[0]

        fn = jax.jit(value_and_jacobian)
        lam0 = jnp.ones(len(NAMES), jnp.float64)
        value, jac = (np.asarray(x) for x in fn(lam0))
        fd = {}
        for h in STEPS_H:
            for j, name in enumerate(MATCHED):
                step = jnp.zeros_like(lam0).at[j].set(h)
                up, _ = fn(lam0 + step)
                down, _ = fn(lam0 - step)
                fd[name, h] = float((up[0] - down[0]) / (2 * h))
    return {"value": value, "jac": jac, "fd": fd}


def test_every_gradient_is_finite(measured):
    assert np.all(np.isfinite(measured["value"]))
    outputs = ("lp_return", "utilisation", "fee_income")
    bad = [
        (NAMES[j], out)
        for out, row in zip(outputs, measured["jac"][:3], strict=True)
        for j in range(len(NAMES))
        if not np.isfinite(row[j])
    ]
    assert not bad, bad


@pytest.mark.parametrize("h", STEPS_H)
@pytest.mark.parametrize("name", MATCHED)
def test_pathwise_gradient_matches_fd(measured, name, h):
    j = NAMES.index(name)
    g, fd = float(measured["jac"][0, j]), measured["fd"][name, h]
    assert fd != 0.0, name
    assert abs(g - fd) / abs(fd) < RTOL, (name, h, g, fd)
