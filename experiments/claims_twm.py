"""Claims 3.1-3.4 of Chitra et al. §3 (target-weight arbitrage) on thousands of random pools.

Run: ``python experiments/claims_twm.py configs/claims_twm.toml [--out DIR] [--states N]``.

Each state (pool) i is drawn from ``jr.fold_in(jr.key(seed), i)``, so the first N states of
a run do not depend on the number of states. A state has n assets (n − 1 risky assets and
the numéraire, price 1, last): prices p (log-uniform), pool value pᵀR (log-uniform), current
weights w(p, R) and target weights w* (Dirichlet; w* floored since eq. 11 divides by w*),
available reserves R^A = u ⊙ R (u uniform per asset, lent ℓ = R − R^A) and a lending fee f.

**Which discount each claim is evaluated on, and why.**

- *Claims 3.1-3.3* need f(0) = 0 and μ-strong concavity. No GLP discount meets both: eq. 11
  as printed (`glp_discount`) gives F(0) = γ_b and the axiomatic repair is piecewise, and
  neither is concave; the smooth eq. 11 minus μ/2‖δ‖² is concave only where μ beats its
  curvature (≈ γ_t/τ² near δ = 0), which can be checked on samples only. So they are
  evaluated on the *GLP-anchored model* f(δ) = gᵀδ − μ/2‖δ‖² − κ Σᵢ sᵢ² log cosh(δᵢ/sᵢ)
  (`P.quadratic_surrogate` plus a concave, non-quadratic term), with g = ∇F_τ(0) the
  subgradient of the smooth eq. 11 at the state (`P.discount_subgradient` of
  `P.glp_discount_smooth`: it points toward w*). f(0) = 0 and ∇f(0) = g exactly, and f is
  μ-strongly concave on all of Rⁿ, so the claims' hypotheses hold by construction (checked:
  the largest Hessian eigenvalue ≤ −μ at 0, δ_H, δ_F and both δ_S); the log cosh term
  (curvature κ ≤ κ_max·μ, width sᵢ = scale·Rᵢ) makes δ_F ≠ δ_H so the claims are not
  trivial. μ = m/(pᵀR)² with m drawn: this keeps δ_H/R scale-free, so the pool value only
  changes units. The printed bounds 2G/μ and 4G/μ are not dimensionally consistent (G/μ is
  a pure number, a distance is not), so whether they hold depends on those units: they hold
  for small pools and fail for large ones; the corrected bounds (2√G/μ, √G/μ, 2‖p‖G^{3/2}/μ²)
  are consistent.
- *Claim 3.4* needs ∇_p F ≥ 8fR/pᵀR. No weight-based discount (eq. 11, its smooth and
  axiomatic variants, the GMX fee) can meet it when f > 0: F depends on p only through
  w(p, ·), which is invariant under p → tp, so pᵀ∇_p F = 0 (Euler) while pᵀ(8fR/pᵀR) = 8f.
  The main row therefore uses the simplest family that can meet it, the value-dependent
  F(p) = F₀ + c·f·log(pᵀR/p₀ᵀR) (∇_p F = c·f·R/pᵀR: the hypothesis holds iff c ≥ 8), with
  F₀ ∈ [0, 1] and c drawn; a second row evaluates the smooth eq. 11 at the state's rebate-side
  arbitrage trade δ_S⁺, where the hypothesis never holds (pᵀ∇_p F ≈ 0 is reported).

**The true optima, and how they are found** (float64 throughout).

- δ_H = max(g/μ, −R^A): the surrogate optimum, projected (as `P.create_arbitrage` does; the
  unprojected g/μ may be infeasible, and then f(δ_H) ≤ f(δ_F), which the proof uses, fails).
- δ_F = argmax f s.t. δ ≥ −R^A: the model is separable, so δ_F is exact: each coordinate's
  root of fᵢ′ is bracketed in [gᵢ/(μ + κ), gᵢ/μ] and bisected (``bisection_steps``), then
  clipped at −R^A (the KKT residual is reported). The constraint is *inactive* when no
  coordinate is clipped; then Claim 3.1's √G/μ bound applies.
- δ_S = argmax S(δ) = f(δ)·pᵀδ s.t. δ ≥ −R^A (eq. 7, not concave): brute force plus the
  solver. S is evaluated at ``random_points`` uniform points of a box that holds every
  profitable trade (lo = −R^A; hi = max((g + ‖g‖)/μ, pᵀR^A/p): {f ≥ 0} lies in the ball of
  centre δ_H and radius ‖g‖/μ, and a profitable withdrawal has pᵀδ < 0), then
  `P.create_arbitrage` (``arb_steps`` steps) is run from g/μ (the paper's method), from
  three points on the bisector of ĝ and p̂ where S > 0 is guaranteed (from the zero trade
  the solver would stay at the saddle δ = 0), from the 2ⁿ − 1 vertices of the withdrawal
  box [−R^A, 0] and from the ``refine_top`` best samples (a start is passed as g = μ·start:
  the solver starts at max(g/μ, −R^A)). The best result is the global δ_S; summary.json
  reports how often the best sample beat it (never, in the default run) and how often the
  paper's single start g/μ reaches δ_S⁺.
  Eq. 7 also pays *withdrawals* when F < 0 (F·pᵀδ > 0), and S grows like ‖δ‖³ there, so the
  global δ_S is often a withdrawal far from δ_H. Claims 3.2-3.3 are therefore reported twice:
  for the global δ_S, and for δ_S⁺ = the best result with f(δ) ≥ 0 (the rebate side, the
  paper's intended regime and the corrected bounds' hypothesis f(δ_S) ≥ 0).
- G = max ‖∇f‖² over the smallest box holding {0, δ_H, δ_F} (Claim 3.1) or {0, δ_H, δ_F,
  δ_S} (3.2-3.3); the max over Rⁿ is infinite. For the separable model ‖∇f‖² is a sum of
  per-coordinate squares of monotone functions, so the max is exact at the box's ends.

**Outputs** (``runs/claims_twm-<timestamp>/`` by default): ``claims.csv`` (one row per claim
and variant: states, states where the hypotheses held (printed / corrected), share where the
printed / corrected bound held among them, median and worst ratio measured/bound, ≤ 1 when
the bound holds), ``states.csv`` (per-state figures), ``summary.json`` (table, seed, resolved
config, diagnostics, versions, machine, wall seconds), ``config.toml`` (copy),
``glp_heatmap.png`` (eq. 11 at the paper's Figure 2 setting, as printed and axiomatic) and
``margins_3_{1,2,3,4}.png`` (histogram of log₁₀(measured/bound) and a scatter against G or F).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as _dt
import io
import itertools
import json
import math
import os
import platform
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib
import numpy as np
from jax import lax

import pdlpjax as P

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

NAME = "claims_twm"
RATIO_FLOOR = 1e-6  # plots only: ratios at or below it (including ≤ 0) are drawn at it

# Defaults, mirrored (with comments) by configs/claims_twm.toml. A config file may give any
# subset; unknown keys are an error.
DEFAULTS: dict = {
    "seed": 0,
    "num_states": 4096,
    "chunk_size": 512,
    "pool": {
        "num_assets": 4,
        "price_range": [0.5, 2.0],
        "value_range": [0.1, 10.0],
        "weight_concentration": 2.0,
        "target_concentration": 5.0,
        "target_floor": 0.05,
        "available_range": [0.05, 0.6],
        "fee_range": [0.001, 0.05],
    },
    "glp": {"base": 0.0025, "tax": 0.005, "temperature": 0.02},
    "model": {"mu_range": [0.1, 2.0], "kappa_range": [0.0, 2.0], "scale": 0.1},
    "claim_3_4": {"discount_range": [0.0, 1.0], "slope_range": [4.0, 16.0]},
    "solver": {
        "arb_steps": 200,
        "random_points": 1024,
        "refine_top": 4,
        "bisection_steps": 100,
    },
    "heatmap": {
        "prices": [1.0, 1.0],
        "reserves": [1.5, 1.0],
        "target_weight": 0.5,
        "delta_range": [-1.0, 1.0],
        "grid": 201,
    },
}


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range (one line)."""


# --------------------------------------------------------------------------- config


def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        path = f"{where}{k}"
        if k not in base:
            raise ConfigError(f"{path}: unknown key")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{path}: expected a table")
            out[k] = _merge(base[k], v, path + ".")
        else:
            out[k] = v
    return out


@dataclass(frozen=True)
class Settings:
    """The resolved config as plain Python numbers (static under jit: one compile per run)."""

    seed: int
    num_states: int
    chunk_size: int
    num_assets: int
    price_range: tuple[float, float]
    value_range: tuple[float, float]
    weight_concentration: float
    target_concentration: float
    target_floor: float
    available_range: tuple[float, float]
    fee_range: tuple[float, float]
    base: float
    tax: float
    temperature: float
    mu_range: tuple[float, float]
    kappa_range: tuple[float, float]
    scale: float
    discount_range: tuple[float, float]
    slope_range: tuple[float, float]
    arb_steps: int
    random_points: int
    refine_top: int
    bisection_steps: int
    heat_prices: tuple[float, float]
    heat_reserves: tuple[float, float]
    heat_target: float
    heat_range: tuple[float, float]
    heat_grid: int

    def __post_init__(self):
        def rng(name, r, lo=-math.inf, positive=False):
            if len(r) != 2 or not (lo <= r[0] <= r[1]) or (positive and r[0] <= 0):
                raise ConfigError(f"{name}: need {lo} ≤ low ≤ high (got {list(r)})")

        if not 2 <= self.num_assets <= 8:
            raise ConfigError("pool.num_assets: need 2 ≤ n ≤ 8 (2ⁿ − 1 solver starts)")
        if self.num_states < 1 or self.chunk_size < 1:
            raise ConfigError("num_states, chunk_size: need ≥ 1")
        rng("pool.price_range", self.price_range, positive=True)
        rng("pool.value_range", self.value_range, positive=True)
        rng("pool.available_range", self.available_range, lo=0.0)
        if self.available_range[1] > 1.0:
            raise ConfigError("pool.available_range: R^A ≤ R needs high ≤ 1")
        rng("pool.fee_range", self.fee_range, positive=True)
        if self.fee_range[1] >= 0.5:
            raise ConfigError("pool.fee_range: need f < 1/2")
        if self.weight_concentration <= 0 or self.target_concentration <= 0:
            raise ConfigError("pool.*_concentration: need > 0")
        if not 0 <= self.target_floor < 1 / self.num_assets:
            raise ConfigError("pool.target_floor: need 0 ≤ floor < 1/n")
        if not (0 < self.base < 1 and 0 < self.tax < 1 and self.temperature > 0):
            raise ConfigError("glp: need 0 < base, tax < 1 and temperature > 0")
        rng("model.mu_range", self.mu_range, positive=True)
        rng("model.kappa_range", self.kappa_range, lo=0.0)
        if self.scale <= 0:
            raise ConfigError("model.scale: need > 0")
        rng("claim_3_4.discount_range", self.discount_range, lo=0.0)
        rng("claim_3_4.slope_range", self.slope_range, lo=0.0)
        if min(self.arb_steps, self.random_points, self.refine_top, self.bisection_steps) < 1:
            raise ConfigError("solver: all counts need ≥ 1")
        if self.refine_top > self.random_points:
            raise ConfigError("solver.refine_top: need ≤ random_points")
        if self.heat_grid < 3 or not 0 < self.heat_target < 1:
            raise ConfigError("heatmap: need grid ≥ 3 and 0 < target_weight < 1")
        rng("heatmap.delta_range", self.heat_range)


def load_settings(path: str | Path, num_states: int | None = None) -> tuple[Settings, dict]:
    """Read a TOML config over `DEFAULTS`; returns the settings and the resolved dict."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: {err}") from None
    cfg = _merge(DEFAULTS, raw)
    if num_states is not None:
        cfg["num_states"] = num_states
    pool, glp, model, c34, sol, heat = (
        cfg[k] for k in ("pool", "glp", "model", "claim_3_4", "solver", "heatmap")
    )
    try:
        s = Settings(
            seed=int(cfg["seed"]),
            num_states=int(cfg["num_states"]),
            chunk_size=int(cfg["chunk_size"]),
            num_assets=int(pool["num_assets"]),
            price_range=tuple(map(float, pool["price_range"])),
            value_range=tuple(map(float, pool["value_range"])),
            weight_concentration=float(pool["weight_concentration"]),
            target_concentration=float(pool["target_concentration"]),
            target_floor=float(pool["target_floor"]),
            available_range=tuple(map(float, pool["available_range"])),
            fee_range=tuple(map(float, pool["fee_range"])),
            base=float(glp["base"]),
            tax=float(glp["tax"]),
            temperature=float(glp["temperature"]),
            mu_range=tuple(map(float, model["mu_range"])),
            kappa_range=tuple(map(float, model["kappa_range"])),
            scale=float(model["scale"]),
            discount_range=tuple(map(float, c34["discount_range"])),
            slope_range=tuple(map(float, c34["slope_range"])),
            arb_steps=int(sol["arb_steps"]),
            random_points=int(sol["random_points"]),
            refine_top=int(sol["refine_top"]),
            bisection_steps=int(sol["bisection_steps"]),
            heat_prices=tuple(map(float, heat["prices"])),
            heat_reserves=tuple(map(float, heat["reserves"])),
            heat_target=float(heat["target_weight"]),
            heat_range=tuple(map(float, heat["delta_range"])),
            heat_grid=int(heat["grid"]),
        )
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{path}: {err}") from None
    return s, cfg


# --------------------------------------------------------------------------- one state


def _log_uniform(key, lo, hi, shape=()):
    return jnp.exp(jr.uniform(key, shape, minval=math.log(lo), maxval=math.log(hi)))


def draw_state(key, s: Settings) -> dict:
    """One random pool; all arrays shape `(n,)`, numéraire last (price 1)."""
    n = s.num_assets
    k = jr.split(key, 12)
    prices = jnp.concatenate([_log_uniform(k[0], *s.price_range, (n - 1,)), jnp.ones(1)])
    value = _log_uniform(k[1], *s.value_range)
    w = jr.dirichlet(k[2], jnp.full((n,), s.weight_concentration))
    reserves = w * value / prices
    wt = jr.dirichlet(k[3], jnp.full((n,), s.target_concentration))
    wt = s.target_floor + (1.0 - n * s.target_floor) * wt
    avail = reserves * jr.uniform(
        k[4], (n,), minval=s.available_range[0], maxval=s.available_range[1]
    )
    m = _log_uniform(k[6], *s.mu_range)
    mu = m / value**2
    return {
        "prices": prices,
        "value": value,
        "reserves": reserves,
        "target": wt,
        "avail": avail,
        "lent": reserves - avail,
        "fee": _log_uniform(k[5], *s.fee_range),
        "m": m,
        "mu": mu,
        "kappa_rel": jr.uniform(k[7], minval=s.kappa_range[0], maxval=s.kappa_range[1]),
        "F0": jr.uniform(k[8], minval=s.discount_range[0], maxval=s.discount_range[1]),
        "slope": jr.uniform(k[9], minval=s.slope_range[0], maxval=s.slope_range[1]),
        "key_bf": k[10],
    }


def _norm(x):
    return jnp.sqrt(jnp.sum(x * x))


def _logcosh(x):
    return jnp.logaddexp(x, -x) - math.log(2.0)


def _box_G(grad_f, points):
    """max ‖∇f‖² over the box hull of `points` (k, n): exact for a separable concave f."""
    lo, hi = jnp.min(points, 0), jnp.max(points, 0)
    return jnp.sum(jnp.maximum(grad_f(lo) ** 2, grad_f(hi) ** 2))


def evaluate_state(key, index, s: Settings) -> dict:
    """All claim figures for state `index` (scalars; see the module docstring)."""
    st = draw_state(jr.fold_in(key, index), s)
    n = s.num_assets
    p, R, wt, avail, mu = st["prices"], st["reserves"], st["target"], st["avail"], st["mu"]
    kappa = st["kappa_rel"] * mu
    width = s.scale * R

    def glp(prices, delta):
        return P.glp_discount_smooth(prices, wt, R, delta, s.base, s.tax, s.temperature)

    # ---- Claims 3.1-3.3: the GLP-anchored, μ-strongly concave model f
    g = P.discount_subgradient(lambda d: glp(p, d), n, p.dtype)
    surrogate = P.quadratic_surrogate(g, mu)

    def f(d):
        return surrogate(d) - kappa * jnp.sum(width**2 * _logcosh(d / width))

    def S(d):
        return f(d) * jnp.dot(p, d)

    grad_f = jax.grad(f)

    # δ_F: exact per-coordinate bisection (f′ᵢ decreasing), then the bound −R^A.
    a0, b0 = g / (mu + kappa), g / mu
    lo, hi = jnp.minimum(a0, b0), jnp.maximum(a0, b0)

    def bisect(_, ab):
        a, b = ab
        mid = 0.5 * (a + b)
        up = grad_f(mid) > 0
        return jnp.where(up, mid, a), jnp.where(up, b, mid)

    lo, hi = lax.fori_loop(0, s.bisection_steps, bisect, (lo, hi))
    root = 0.5 * (lo + hi)
    d_f = jnp.maximum(root, -avail)
    active = jnp.any(root <= -avail)
    kkt = _norm(d_f - jnp.maximum(d_f + grad_f(d_f) / (mu + kappa), -avail))

    # δ_S: brute-force samples + multi-start create_arbitrage.
    gn = _norm(g)
    box_lo = -avail
    box_hi = jnp.maximum((g + gn) / mu, jnp.dot(p, avail) / p)
    u = jr.uniform(st["key_bf"], (s.random_points, n))
    samples = box_lo + (box_hi - box_lo) * u
    sample_S = jax.vmap(S)(samples)
    sample_S = jnp.where(jnp.isnan(sample_S), -jnp.inf, sample_S)
    top_S, top_i = lax.top_k(sample_S, s.refine_top)
    # Along the bisector d of ĝ and p̂ (the top eigenvector of sym(g pᵀ)), f(td) ≥ t·gᵀd −
    # (μ + κ)t²/2 > 0 for 0 < t < 2t*, t* = gᵀd/(μ + κ), and pᵀd > 0: there S > 0.
    bis = g / jnp.where(gn > 0, gn, 1.0) + p / _norm(p)
    bis = bis / _norm(bis)
    bis = bis * jnp.maximum(jnp.dot(g, bis), 0.0) / (mu + kappa)
    masks = np.array(list(itertools.product([0.0, 1.0], repeat=n))[1:])  # 2ⁿ − 1 vertices
    starts = jnp.concatenate(
        [
            (g / mu)[None],
            jnp.stack([0.5 * bis, bis, 1.5 * bis]),
            -jnp.asarray(masks) * avail,
            samples[top_i],
        ]
    )
    res = jax.vmap(
        lambda x0: P.create_arbitrage(f, p, avail, mu, num_steps=s.arb_steps, g=mu * x0)
    )(starts)
    trades = jnp.concatenate([res.trade, jnp.zeros((1, n))])
    profits = jnp.concatenate([res.profit, jnp.zeros(1)])
    profits = jnp.where(jnp.isnan(profits), -jnp.inf, profits)
    k_glob = jnp.argmax(profits)
    f_tr = jax.vmap(f)(trades)
    k_plus = jnp.argmax(jnp.where(f_tr >= 0, profits, -jnp.inf))
    d_glob, d_plus = trades[k_glob], trades[k_plus]
    d_h = res.surrogate[0]  # max(g/μ, −R^A)
    S_glob, S_plus, S_f = S(d_glob), S(d_plus), S(d_f)

    # Hypotheses: f(0) = 0 and λ_max(∇²f) ≤ −μ at the points the claims use.
    pts = jnp.stack([jnp.zeros(n), d_h, d_f, d_glob, d_plus])
    lam = jax.vmap(lambda x: jnp.linalg.eigvalsh(jax.hessian(f)(x))[-1])(pts)
    hyp = (f(jnp.zeros(n)) == 0) & jnp.all(lam <= -mu * (1.0 - 1e-9)) & jnp.isfinite(gn)

    out: dict = {}

    def put(prefix, check, hyp_p, hyp_c, driver):
        out[prefix + "_ratio_p"] = check.value / check.bound
        out[prefix + "_ratio_c"] = check.value / check.bound_corrected
        out[prefix + "_holds_p"] = check.holds
        out[prefix + "_holds_c"] = check.holds_corrected
        out[prefix + "_hyp_p"] = hyp_p
        out[prefix + "_hyp_c"] = hyp_c
        out[prefix + "_driver"] = driver

    G31 = _box_G(grad_f, jnp.stack([jnp.zeros(n), d_h, d_f]))
    dist31 = _norm(d_f - d_h)
    put("c31", P.claim_3_1_bound(dist31, G31, mu), hyp, hyp, G31)
    put(
        "c31u",
        P.claim_3_1_bound(dist31, G31, mu, constrained=False),
        hyp & ~active,
        hyp & ~active,
        G31,
    )
    for tag, d_s, S_s in (("plus", d_plus, S_plus), ("glob", d_glob, S_glob)):
        G_s = _box_G(grad_f, jnp.stack([jnp.zeros(n), d_h, d_f, d_s]))
        hyp_c = hyp & (f(d_s) >= 0)
        put(f"c32{tag}", P.claim_3_2_bound(_norm(d_s - d_h), G_s, mu), hyp, hyp_c, G_s)
        put(f"c33{tag}", P.claim_3_3_bound(S_s - S_f, G_s, mu, p), hyp, hyp_c, G_s)

    # ---- Claim 3.4: value-dependent F (hypotheses can hold) and the smooth eq. 11 (never).
    v0 = jnp.dot(p, R)

    def F_value(prices):
        return st["F0"] + st["slope"] * st["fee"] * jnp.log(jnp.dot(prices, R) / v0)

    for tag, F in (("c34", F_value), ("c34glp", lambda prices: glp(prices, d_plus))):
        c = P.claim_3_4(F, p, R, st["lent"], st["fee"])
        out[tag + "_ratio_p"] = jnp.max(c.delta / c.bound)
        out[tag + "_ratio_c"] = jnp.max(c.delta / c.bound_corrected)
        out[tag + "_holds_p"] = c.holds
        out[tag + "_holds_c"] = c.holds_corrected
        out[tag + "_hyp_p"] = c.hypotheses
        out[tag + "_hyp_c"] = c.hypotheses
        out[tag + "_driver"] = c.discount
        # pᵀ∇_pF over the 8f the gradient hypothesis needs (summed against p): ≥ 1 to hold
        out[tag + "_euler"] = jnp.dot(p, c.grad_discount) / (8.0 * st["fee"])

    out.update(
        value=st["value"],
        m=st["m"],
        mu=mu,
        kappa_rel=st["kappa_rel"],
        fee=st["fee"],
        F0=st["F0"],
        slope=st["slope"],
        g_norm=gn,
        dist_FH=dist31,
        active=active,
        kkt_F=kkt,
        S_local=profits[0],
        S_plus=S_plus,
        S_glob=S_glob,
        S_best_sample=top_S[0],
        glob_withdrawal=jnp.dot(p, d_glob) < 0,
        glob_f_negative=f(d_glob) < 0,
        local_reached_plus=profits[0] >= S_plus - 1e-9 * jnp.maximum(1.0, jnp.abs(S_plus)),
        brute_force_ok=top_S[0] <= S_glob + 1e-12 * jnp.maximum(1.0, jnp.abs(S_glob)),
    )
    return out


# --------------------------------------------------------------------------- the table

DISCOUNTS = {
    "model": "Claims 3.1-3.3: f(δ) = gᵀδ − μ/2‖δ‖² − κ Σ sᵢ² log cosh(δᵢ/sᵢ), "
    "g = ∇ glp_discount_smooth(0); μ-strongly concave on Rⁿ, f(0) = 0",
    "value-dependent": "Claim 3.4: F(p) = F₀ + c·f·log(pᵀR/p₀ᵀR); gradient hypothesis iff c ≥ 8",
    "glp_smooth": "Claim 3.4: glp_discount_smooth (eq. 11 as printed, smoothed) at δ = δ_S⁺; "
    "weight-based, so pᵀ∇_pF = 0 and the gradient hypothesis cannot hold for f > 0",
}

# (claim, variant, bound: printed; corrected, discount, state-figure prefix, scatter x-axis)
_B32 = "‖δ_S − δ_H‖ ≤ 4G/μ; corrected √G/μ (needs f(δ_S) ≥ 0)"
_B33 = "S(δ_S) − S(δ_F) ≤ (40 + 8/C)‖p‖G³/μ²; corrected 2‖p‖G^1.5/μ² (needs f(δ_S) ≥ 0)"
_B34 = "Δ ≤ (1/2 − f)R; corrected (u − 8fu² + f)R, u = 1/(1 + F)"
ROWS = [
    ("3.1", "constrained", "‖δ_F − δ_H‖ ≤ 2G/μ; corrected 2√G/μ", "model", "c31", "G"),
    ("3.1", "constraint inactive", "‖δ_F − δ_H‖ ≤ √G/μ (both)", "model", "c31u", "G"),
    ("3.2", "δ_S⁺ (rebate side, f ≥ 0)", _B32, "model", "c32plus", "G"),
    ("3.2", "δ_S = global argmax of eq. 7", _B32, "model", "c32glob", "G"),
    ("3.3", "δ_S⁺ (rebate side, f ≥ 0)", _B33, "model", "c33plus", "G"),
    ("3.3", "δ_S = global argmax of eq. 7", _B33, "model", "c33glob", "G"),
    ("3.4", "value-dependent F", _B34, "value-dependent", "c34", "F"),
    ("3.4", "eq. 11 (smooth) at δ_S⁺", _B34, "glp_smooth", "c34glp", "F"),
]


def _share(holds, mask):
    k = int(mask.sum())
    return float(holds[mask].mean()) if k else float("nan")


def _stats(x):
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    return float(np.median(x)), float(np.max(x))


def claims_table(figs: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for claim, variant, bound, discount, pre, _ in ROWS:
        hp, hc = figs[pre + "_hyp_p"].astype(bool), figs[pre + "_hyp_c"].astype(bool)
        rp, rc = figs[pre + "_ratio_p"], figs[pre + "_ratio_c"]
        med_p, worst_p = _stats(rp[hp])
        med_c, worst_c = _stats(rc[hc])
        rows.append(
            {
                "claim": claim,
                "variant": variant,
                "bound": bound,
                "discount": discount,
                "states": int(hp.size),
                "hypotheses_held": int(hp.sum()),
                "corrected_hypotheses_held": int(hc.sum()),
                "share_printed_held": _share(figs[pre + "_holds_p"].astype(bool), hp),
                "share_corrected_held": _share(figs[pre + "_holds_c"].astype(bool), hc),
                "share_printed_held_all_states": float(figs[pre + "_holds_p"].mean()),
                "share_corrected_held_all_states": float(figs[pre + "_holds_c"].mean()),
                "median_ratio_printed": med_p,
                "worst_ratio_printed": worst_p,
                "median_ratio_corrected": med_c,
                "worst_ratio_corrected": worst_c,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    def pct(x):
        return "   n/a" if not math.isfinite(x) else f"{100 * x:5.1f}%"

    def num(x):
        return "      n/a" if not math.isfinite(x) else f"{x:9.4g}"

    head = (
        f"{'claim':5} {'variant':28} {'hyp p':>9} {'hyp c':>5} {'printed':>7} {'corr.':>7}"
        f" {'p (all)':>7} {'med p':>9} {'worst p':>9} {'med c':>9} {'worst c':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        v = r["variant"][:28]
        lines.append(
            f"{r['claim']:5} {v:28} {r['hypotheses_held']:>4}/{r['states']:<4}"
            f" {r['corrected_hypotheses_held']:>5}"
            f" {pct(r['share_printed_held']):>7} {pct(r['share_corrected_held']):>7}"
            f" {pct(r['share_printed_held_all_states']):>7}"
            f" {num(r['median_ratio_printed'])} {num(r['worst_ratio_printed'])}"
            f" {num(r['median_ratio_corrected'])} {num(r['worst_ratio_corrected'])}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- files


def _atomic_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_csv(path: Path, header: list[str], rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    _atomic_bytes(path, buf.getvalue().encode())


def _save_png(path: Path, fig) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    _atomic_bytes(path, buf.getvalue())


def _cell(x) -> str:
    if isinstance(x, (bool, np.bool_)):
        return str(int(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{float(x):.6g}"


def _plain(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None  # strict JSON
    return x


def versions() -> dict:
    def v(mod):
        return getattr(mod, "__version__", "unknown")

    return {
        "pdlpjax": P.__version__,
        "jax": jax.__version__,
        "numpy": np.__version__,
        "matplotlib": matplotlib.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jaxlib": v(getattr(jax, "lib", None)),  # jax.lib carries jaxlib's version
    }


# --------------------------------------------------------------------------- plots


def plot_heatmap(path: Path, s: Settings) -> None:
    """Eq. 11 (as printed) and its axiomatic repair over deposits δ, two assets, w* = w_t."""
    p = jnp.asarray(s.heat_prices)
    R = jnp.asarray(s.heat_reserves)
    wt = jnp.asarray([s.heat_target, 1.0 - s.heat_target])
    axis = np.linspace(*s.heat_range, s.heat_grid)
    D1, D2 = np.meshgrid(axis, axis, indexing="xy")
    deltas = jnp.asarray(np.stack([D1.ravel(), D2.ravel()], 1))

    def both(d):
        return (
            P.glp_discount(p, wt, R, d, s.base, s.tax),
            P.glp_discount_axiomatic(p, wt, R, d, s.base, s.tax),
        )

    printed, axiom = (np.asarray(a).reshape(D1.shape) for a in jax.jit(jax.vmap(both))(deltas))
    feasible = (np.asarray(R)[0] + D1 > 0) & (np.asarray(R)[1] + D2 > 0)
    w1 = np.where(feasible, p[0] * (R[0] + D1) / (p[0] * (R[0] + D1) + p[1] * (R[1] + D2)), np.nan)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    panels = (
        (printed, "eq. 11 as printed: max(0, γ_b + maxᵢ Gᵢ)", "viridis", None),
        (axiom, "axiomatic: min(γ_b, maxᵢ Gᵢ), F(0) = 0", "RdBu", "div"),
    )
    ext = (axis[0], axis[-1], axis[0], axis[-1])
    for ax, (z, title, cmap, kind) in zip(axes, panels, strict=True):
        zb = np.where(feasible, z * 1e4, np.nan)
        norm = None
        if kind == "div":
            lo, hi = np.nanmin(zb), np.nanmax(zb)
            norm = TwoSlopeNorm(0.0, min(lo, -1e-9), max(hi, 1e-9))
        im = ax.imshow(zb, origin="lower", extent=ext, cmap=cmap, norm=norm, aspect="auto")
        ax.contour(D1, D2, w1, levels=[s.heat_target], colors="k", linewidths=1.0)
        ax.plot([0], [0], "k+", ms=10)
        ax.set_title(title)
        ax.set_xlabel("δ₁ (asset 1 deposited)")
        ax.set_ylabel("δ₂ (asset 2 deposited)")
        fig.colorbar(im, ax=ax, label="F (basis points)")
    fig.suptitle(
        f"GLP discount, two assets, w* = {s.heat_target}, p = {list(s.heat_prices)}, "
        f"R = {list(s.heat_reserves)}, γ_b = {s.base}, γ_t = {s.tax} (black line: w = w*)"
    )
    _save_png(path, fig)


def plot_margins(out: Path, figs: dict[str, np.ndarray]) -> list[str]:
    names = []
    for claim in ("3.1", "3.2", "3.3", "3.4"):
        rows = [r for r in ROWS if r[0] == claim]
        fig, (ax_h, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
        for _, variant, _, _, pre, _ in rows:
            for kind, style in (("p", "-"), ("c", "--")):
                mask = figs[f"{pre}_hyp_{kind}"].astype(bool)
                note = ""
                if not mask.any():  # e.g. eq. 11 for Claim 3.4: show every state
                    mask, note = np.ones_like(mask), " (hyp. never hold; all states)"
                r = figs[f"{pre}_ratio_{kind}"][mask]
                r = r[np.isfinite(r)]
                if r.size == 0:
                    continue
                lr = np.log10(np.clip(r, RATIO_FLOOR, None))
                kind_name = "printed" if kind == "p" else "corrected"
                label = f"{variant} – {kind_name}{note}"
                ax_h.hist(lr, bins=60, histtype="step", linestyle=style, label=label)
        ax_h.axvline(0.0, color="k", lw=0.8)
        ax_h.set_xlabel(
            "log₁₀(measured / bound)   (≤ 0: the bound held; ratios ≤ 10⁻⁶ or ≤ 0 at −6)"
        )
        ax_h.set_ylabel("states (where the hypotheses held)")
        ax_h.legend(fontsize=7)
        _, variant, bound, _, pre, drv = rows[0]
        x = figs[pre + "_driver"]
        for kind, mark in (("p", "o"), ("c", "x")):
            mask = figs[f"{pre}_hyp_{kind}"].astype(bool)
            y = np.clip(figs[f"{pre}_ratio_{kind}"][mask], RATIO_FLOOR, None)
            label = "printed" if kind == "p" else "corrected"
            ax_s.scatter(x[mask], y, s=4, marker=mark, alpha=0.5, label=label)
        ax_s.axhline(1.0, color="k", lw=0.8)
        ax_s.set_xlabel("G (max ‖∇f‖² on the box)" if drv == "G" else "F at p₀")
        ax_s.set_ylabel("measured / bound (hypotheses held; floored at 10⁻⁶)")
        if drv == "G":
            ax_s.set_xscale("log")
        ax_s.set_yscale("log")
        ax_s.legend(fontsize=8)
        ax_s.set_title(f"{variant}\n{bound}", fontsize=9)
        fig.suptitle(f"Claim {claim}")
        name = f"margins_{claim.replace('.', '_')}.png"
        _save_png(out / name, fig)
        names.append(name)
    return names


# --------------------------------------------------------------------------- main


def run(s: Settings, progress=True) -> tuple[dict[str, np.ndarray], float]:
    """Evaluate every state in jitted, vmapped chunks; returns the per-state figures."""
    key = jr.key(s.seed)
    batch = jax.jit(jax.vmap(lambda i: evaluate_state(key, i, s)))
    chunk = min(s.chunk_size, s.num_states)
    parts: list[dict] = []
    t0 = time.perf_counter()
    compile_s = 0.0
    for start in range(0, s.num_states, chunk):
        idx = jnp.arange(start, start + chunk)  # the last chunk is padded, then cut
        t = time.perf_counter()
        part = jax.device_get(jax.block_until_ready(batch(idx)))
        if start == 0:
            compile_s = time.perf_counter() - t
        stop = min(start + chunk, s.num_states)
        parts.append({k: np.asarray(v)[: stop - start] for k, v in part.items()})
        if progress:
            el = time.perf_counter() - t0
            if stop > chunk:  # the rate after the first chunk, which includes the compile
                eta = f"ETA {(el - compile_s) / (stop - chunk) * (s.num_states - stop):6.1f} s"
            else:
                eta = "(first chunk includes the compile)"
            print(
                f"[{NAME}] {stop}/{s.num_states} states  {el:6.1f} s  {eta}",
                file=sys.stderr,
                flush=True,
            )
    figs = {k: np.concatenate([pt[k] for pt in parts]) for k in parts[0]}
    return figs, compile_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="TOML config (see configs/claims_twm.toml)")
    ap.add_argument("--out", help="results folder (default runs/claims_twm-<timestamp>)")
    ap.add_argument("--states", type=int, help="override num_states")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    try:
        s, cfg = load_settings(args.config, args.states)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"{NAME}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)

    with jax.enable_x64(True):
        figs, compile_s = run(s, progress=not args.quiet)
        plot_heatmap(out / "glp_heatmap.png", s)
    rows = claims_table(figs)
    pngs = ["glp_heatmap.png", *plot_margins(out, figs)]

    header = list(rows[0])
    text_cols = ("claim", "variant", "bound", "discount")
    _write_csv(
        out / "claims.csv",
        header,
        [[r[h] if h in text_cols else _cell(r[h]) for h in header] for r in rows],
    )
    keys = sorted(figs)
    _write_csv(
        out / "states.csv",
        ["state", *keys],
        ([i, *(_cell(figs[k][i]) for k in keys)] for i in range(s.num_states)),
    )
    cfg_text = Path(args.config).read_text()
    if args.states is not None:
        cfg_text = (
            f"# command line: --states {args.states} (summary.json has the resolved config)\n"
            + cfg_text
        )
    _atomic_bytes(out / "config.toml", cfg_text.encode())

    n = s.num_states
    diagnostics = {
        "share_constraint_active_at_delta_F": float(figs["active"].mean()),
        "max_kkt_residual_delta_F": float(figs["kkt_F"].max()),
        "share_global_delta_S_is_withdrawal": float(figs["glob_withdrawal"].mean()),
        "share_global_delta_S_has_negative_discount": float(figs["glob_f_negative"].mean()),
        "share_solver_from_delta_H_reaches_delta_S_plus": float(figs["local_reached_plus"].mean()),
        "share_brute_force_samples_not_better_than_delta_S": float(figs["brute_force_ok"].mean()),
        "max_abs_pT_gradF_over_8f_glp": float(np.nanmax(np.abs(figs["c34glp_euler"]))),
        "share_claim_3_4_glp_gradient_hypothesis": float(figs["c34glp_hyp_p"].mean()),
    }
    wall = time.perf_counter() - t_start
    summary = {
        "experiment": NAME,
        "seed": s.seed,
        "num_states": n,
        "claims": [{k: _plain(v) for k, v in r.items()} for r in rows],
        "discounts": DISCOUNTS,
        "diagnostics": diagnostics,
        "config": cfg,
        "files": ["claims.csv", "states.csv", "summary.json", "config.toml", *pngs],
        "versions": versions(),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "device": str(jax.devices()[0]),
        },
        "compile_seconds": round(compile_s, 2),
        "wall_seconds": round(wall, 2),
    }
    _atomic_bytes(
        out / "summary.json",
        (json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode(),
    )

    print(format_table(rows))
    print(
        f"\n{n} states, seed {s.seed}, n = {s.num_assets} assets; wall {wall:.1f} s "
        f"(first chunk incl. compile {compile_s:.1f} s); results in {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
