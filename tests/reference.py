"""A slow, plain NumPy (float64) reference of one pool step, written from the documented model.

This is deliberately *not* a transliteration of the vectorised JAX step: it walks markets,
sides and book slots with explicit Python loops and keeps one `Bucket` object per slot. It
follows the position book's specification ("crowd buckets", book v2), the docstrings of
`pdlpjax.simulate.step` for what the book does not touch (paths, LP flows), and DESIGN.md:

1. Oracle: p_t = p_{t−1} · exp(log return) per risky asset (numéraire stays at 1).
2. Liquidations: a bucket holds a crowd whose liquidation prices ("keys") are uniform on
   [q̄ − a, q̄ + a] (mean key q̄ = (n − c)/δ long, (n + c)/δ short). At the new price x the
   fraction φ of members past their key (long: q ≥ x, short: q ≤ x; φ = 1 when 1 − φ < 1e-6)
   is liquidated with margin c_L = ±(n_L − δ_L μ), μ their mean key; the pool takes the margin
   (taken), pays any gain and absorbs max(−(π + c), 0) as bad debt. The remainder keeps
   δ, n, count times 1 − φ, margin c − c_L and half-width a(1 − φ).
3. Funding: γ = clip(κ (L/S − p_t/p_{t−1}), ±cap), zero when a side is empty; γ > 0 longs
   pay, γ < 0 shorts pay; each paying bucket pays |γ| δ p, at most its margin; receivers
   share the market's total pro rata by size.
4. Lending fee: f · borrowed per bucket (long: δ p, short: n), at most its margin, to the
   numéraire.
5. Target-weight arbitrage (discount "glp" or "gmx"; `twm_trade`): the more profitable of a
   creation (eq. 7) and a redemption (eq. 10) priced by F (eq. 11, or GMX fees), found by
   projected gradient ascent from the surrogate optimum g/μ, if it beats twm_cost × AUM.
   Then the LP flow: φ = drift dt + vol √dt z of AUM; deposits at target weights,
   withdrawals from the available reserves R^A (capped at 99% of their value); shares at the
   share price.
6. Exits: the fraction h = clip(1/mean_holding, 0, 1) of every open bucket leaves and settles
   (deterministic; a and q̄ unchanged). Then trader demand and the funding arbitrageur
   (sized for profit: ℓ* = √(|γ| S L / f) − L, at most what brings L/S to p_t/p_{t−1}) send
   crowds of traders with margin fractions uniform on [m̄(1 − w), m̄(1 + w)], m̄ = 1/η;
   the collateral condition keeps the fraction a_c with m ≥ 1/η_max, the solvency cap the
   fraction a_s of the rest (requests in order). Each accepted crowd joins the K slots of
   its market and side, kept in ascending order of mean key: in a closed slot (the buckets
   between shift), else the cheapest of the crowd with any bucket and two neighbouring
   buckets (cost δ_i δ_j/(δ_i + δ_j) · ((q̄_i − q̄_j)² + (a_i − a_j)² + (p̄_i − p̄_j)²), p̄ = n/δ
   the mean entry price) merge.

The reference consumes the same injected draws as the JAX step (a `StepNoise` whose leaves
were converted to NumPy) and keeps the same state, so the two compare field by field. Besides
the engine's accounting totals it counts events the engine does not break down (rejections by
reason, funding payments, arbitrage trades, partial and full liquidations).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LONG, SHORT = 0, 1
SIGN = {LONG: 1.0, SHORT: -1.0}

# A crowd whose accepted notional is below this (numéraire) is not written.
DUST_NOTIONAL = 1e-12
# A liquidation that would leave less than this fraction of a bucket closes it.
LIQUIDATION_CLOSE = 1e-6

ACCOUNT_FIELDS = (
    "inventory_pnl",
    "book_pnl",
    "fees",
    "bad_debt",
    "lp_flows",
    # Target-weight arbitrage (spec.discount != "none"): assets in − out, the arbitrageurs'
    # gain (the LPs' dilution), and the number of creations and redemptions.
    "twm_flows",
    "dilution",
    "creations",
    "redemptions",
    "liquidated_margin",
    "liquidated_notional",
    "exit_received",
    "exit_paid",
    "funding_paid",
    "liquidations",
    "exits",
    "merged",
    "opened",
    "rejected",
    "utilisation_sum",
    "open_interest_sum",
    "value_sum",
    # The LP's P&L attribution per share (signed; `pdlpjax.attribution.LP_TERMS`).
    "share_inventory",
    "share_trader_pnl",
    "share_fees",
    "share_liquidated_margin",
    "share_bad_debt",
    "share_dilution",
    "share_swap_arbitrage",
    "identity_error",
    "identity_error_step",
    "lp_identity_error",  # the LP wealth identity (see `step`)
)

EVENT_FIELDS = (
    "liquidations",  # buckets hit by a liquidation (φ > 0)
    "full_liquidations",  # of which closed (φ = 1)
    "bad_debt_events",
    "funding_payments",  # (market, step) pairs where a nonzero amount of funding changed hands
    "fee_payments",
    "negative_margins",  # buckets whose margin went below zero
    "exits",  # bucket-steps with a fraction leaving
    "merged",  # merges (crowd into a bucket, or two buckets to make room for the crowd)
    "pair_merges",  # of which two old buckets merged and the crowd took a slot of its own
    "rejected_collateral",  # crowd-equivalents rejected by eq. 1 (1 − a_c per request)
    "rejected_solvency",  # crowd-equivalents rejected by the cap (a_c (1 − a_s) per request)
    "partial_collateral",  # requests with 0 < a_c < 1
    "partial_solvency",  # requests with 0 < a_s < 1
    "arb_requests",
    "arb_opened",
    "opened",
    "lp_deposits",
    "lp_withdrawals",
)


@dataclass
class Bucket:
    """One book slot: a crowd of traders on one market and side.

    size δ (tokens), entry notional n = Σ δ p0 (numéraire), margin c (numéraire, may be
    negative), half-width a of the members' liquidation prices (uniform on [q̄ − a, q̄ + a]),
    count (crowd-equivalents), the slope β of the members' entry prices on their keys
    (p0 ≈ n/δ + β (q − q̄); 0 for one crowd) and an open flag.
    """

    size: float = 0.0
    notional: float = 0.0
    margin: float = 0.0
    spread: float = 0.0
    count: float = 0.0
    is_open: bool = False
    slope: float = 0.0

    def mean_key(self, side: int) -> float:
        """q̄: long (n − c)/δ, short (n + c)/δ."""
        return (self.notional - SIGN[side] * self.margin) / self.size

    def pnl(self, side: int, price: float) -> float:
        """Unrealised PnL π = SIGN (δ p − n)."""
        return SIGN[side] * (self.size * price - self.notional)


@dataclass
class RefSpec:
    """The static settings the reference needs (mirrors `pdlpjax.SimSpec` + the path model)."""

    num_risky: int
    num_cohorts: int
    steps_per_year: float
    path_model: str = "gbm"  # gbm | jump | garch
    mode: str = "pdlp"
    has_numeraire: bool = True
    rebalance: bool = False
    discount: str = "none"  # TWM discount F: none | glp | gmx (`TWM_DISCOUNTS`)
    twm_steps: int = 10  # projected gradient ascent steps of the TWM solvers

    @property
    def dt(self) -> float:
        return 1.0 / self.steps_per_year


@dataclass
class RefParams:
    """Every dynamic param the step reads, as float64 NumPy values (one pool)."""

    # market
    initial_prices: np.ndarray
    funding_kappa: float
    funding_cap: float
    open_rate: np.ndarray
    mean_holding: float
    leverage: float
    leverage_vol: float
    leverage_spread: float
    max_leverage: float
    fee_elasticity: float
    momentum: float
    noise_vol: float
    arb_leverage: float
    # pool
    initial_value: float
    target_weights: np.ndarray
    fee: float
    max_utilisation: float
    lp_flow_drift: float
    lp_flow_vol: float
    # paths
    drifts: np.ndarray
    vols: np.ndarray
    correlation: np.ndarray
    jump_intensity: np.ndarray
    jump_mean: np.ndarray
    jump_vol: np.ndarray
    crash_intensity: float
    crash_mean: float
    crash_vol: float
    garch_alpha: np.ndarray
    garch_beta: np.ndarray
    # target-weight arbitrage (pool; read only when spec.discount != "none")
    discount_base: float = 0.0  # γ_b of eq. 11 (GMX: mint/burn fee)
    discount_tax: float = 0.0  # γ_t of eq. 11 (GMX: tax)
    twm_mu: float = 0.5  # surrogate modulus μ, value fractions of AUM
    twm_capital: float = 0.1  # arbitrageur's capital per asset, fraction of AUM
    twm_cost: float = 0.0  # the arbitrageur acts when its profit > this × AUM


def params_from_pdlpjax(params: Any) -> RefParams:
    """Read one pool's `pdlpjax.Params` (any array type) into float64 NumPy values."""

    def grab(section: Any, name: str) -> Any:
        v = np.asarray(getattr(section, name), dtype=np.float64)
        return float(v) if v.ndim == 0 else v.copy()

    values = {}
    for section in (params.market, params.pool, params.paths):
        for name in RefParams.__dataclass_fields__:
            if hasattr(section, name):
                values[name] = grab(section, name)
    return RefParams(**values)


@dataclass
class RefNoise:
    """One step's draws as float64 NumPy: the path's, then the market's."""

    path: Any  # gbm/garch: z (r,); jump: dict with z, u_jump, z_jump, u_crash, z_crash
    z_demand: np.ndarray  # (r, 2)
    z_leverage: np.ndarray  # (r, 2)
    z_flow: float


def noise_from_pdlpjax(noise: Any, t: int | None = None) -> RefNoise:
    """Convert a `pdlpjax.StepNoise` (stacked over time when `t` is given) to `RefNoise`."""

    def get(x: Any) -> np.ndarray:
        a = np.asarray(x, dtype=np.float64)
        return a if t is None else a[t]

    path = noise.path
    if hasattr(path, "u_jump"):
        path = {k: get(getattr(path, k)) for k in ("z", "u_jump", "z_jump", "u_crash", "z_crash")}
    else:
        path = get(path)
    return RefNoise(
        path=path,
        z_demand=get(noise.z_demand),
        z_leverage=get(noise.z_leverage),
        z_flow=float(get(noise.z_flow)),
    )


@dataclass
class RefState:
    """One pool: prices and reserves (numéraire last), LP supply, the book, the totals."""

    t: int
    prices: np.ndarray
    reserves: np.ndarray
    supply: float
    book: list  # book[market][side][k] -> Bucket
    accounts: dict = field(default_factory=dict)
    events: dict = field(default_factory=dict)
    garch_h: np.ndarray | None = None


# --------------------------------------------------------------------------- paths


def _cholesky_times(corr: np.ndarray, z: np.ndarray) -> np.ndarray:
    """L z with L L^T = corr, L lower triangular (computed here by the textbook recursion)."""
    n = corr.shape[0]
    chol = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1):
            s = corr[i, j] - sum(chol[i, m] * chol[j, m] for m in range(j))
            chol[i, j] = math.sqrt(s) if i == j else s / chol[j, j]
    return np.array([sum(chol[i, j] * z[j] for j in range(i + 1)) for i in range(n)])


def poisson_count(u: float, mean: float, max_count: int = 24) -> int:
    """Poisson(mean) by inverse CDF: the number of k < max_count with u > P(N ≤ k)."""
    cdf, pmf, count = 0.0, math.exp(-mean), 0
    for k in range(max_count):
        if k > 0:
            pmf *= mean / k
        cdf += pmf
        if u > cdf:
            count += 1
    return count


def log_returns(
    spec: RefSpec, prm: RefParams, path_noise: Any, garch_h: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Risky log returns of one step (formulas of the `pdlpjax.paths` docstrings)."""
    dt, r = spec.dt, spec.num_risky
    if spec.path_model == "gbm":
        corr_z = _cholesky_times(prm.correlation, path_noise)
        x = np.array(
            [
                (prm.drifts[i] - 0.5 * prm.vols[i] ** 2) * dt
                + prm.vols[i] * math.sqrt(dt) * corr_z[i]
                for i in range(r)
            ]
        )
        return x, garch_h
    if spec.path_model == "jump":
        nz = path_noise
        corr_z = _cholesky_times(prm.correlation, nz["z"])
        kappa_c = math.exp(prm.crash_mean + 0.5 * prm.crash_vol**2) - 1.0
        n_crash = poisson_count(float(nz["u_crash"]), prm.crash_intensity * dt)
        crash = n_crash * prm.crash_mean + math.sqrt(n_crash) * prm.crash_vol * float(nz["z_crash"])
        x = np.zeros(r)
        for i in range(r):
            kappa = math.exp(prm.jump_mean[i] + 0.5 * prm.jump_vol[i] ** 2) - 1.0
            n_jump = poisson_count(float(nz["u_jump"][i]), prm.jump_intensity[i] * dt)
            jumps = (
                n_jump * prm.jump_mean[i] + math.sqrt(n_jump) * prm.jump_vol[i] * nz["z_jump"][i]
            )
            drift = (
                prm.drifts[i]
                - 0.5 * prm.vols[i] ** 2
                - prm.jump_intensity[i] * kappa
                - prm.crash_intensity * kappa_c
            ) * dt
            x[i] = drift + prm.vols[i] * math.sqrt(dt) * corr_z[i] + jumps + crash
        return x, garch_h
    if spec.path_model == "garch":
        h = garch_h
        corr_z = _cholesky_times(prm.correlation, path_noise)
        x, h_new = np.zeros(r), np.zeros(r)
        for i in range(r):
            a, b = prm.garch_alpha[i], prm.garch_beta[i]
            omega = prm.vols[i] ** 2 * dt * (1.0 - a - b)
            eps = math.sqrt(h[i]) * corr_z[i]
            x[i] = prm.drifts[i] * dt - 0.5 * h[i] + eps
            h_new[i] = omega + a * eps**2 + b * h[i]
        return x, h_new
    raise NotImplementedError(spec.path_model)


# --------------------------------------------------------------------------- pool helpers


def init_ref_state(spec: RefSpec, prm: RefParams) -> RefState:
    """Reserves at the target weights worth `initial_value`, no positions, share price 1."""
    prices = [float(p) for p in prm.initial_prices]
    if spec.has_numeraire:
        prices.append(1.0)
    prices = np.array(prices)
    reserves = np.array(
        [prm.target_weights[j] * prm.initial_value / prices[j] for j in range(len(prices))]
    )
    book = [
        [[Bucket() for _ in range(spec.num_cohorts)] for _side in (LONG, SHORT)]
        for _ in range(spec.num_risky)
    ]
    h = None
    if spec.path_model == "garch":
        h = np.array([prm.vols[i] ** 2 * spec.dt for i in range(spec.num_risky)])
    return RefState(
        t=0,
        prices=prices,
        reserves=reserves,
        supply=prm.initial_value,
        book=book,
        accounts={k: 0.0 for k in ACCOUNT_FIELDS},
        events={k: 0 for k in EVENT_FIELDS},
        garch_h=h,
    )


def buckets(book: list):
    """Yield (market, side, k, bucket) over every slot."""
    for i, market in enumerate(book):
        for s, ring in enumerate(market):
            for k, b in enumerate(ring):
                yield i, s, k, b


def unrealised(book: list, prices: np.ndarray) -> float:
    """Net unrealised trader PnL, Σ SIGN (δ p − n) over open buckets."""
    total = 0.0
    for i, s, _k, b in buckets(book):
        if b.is_open:
            total += b.pnl(s, prices[i])
    return total


def portfolio_value(prices: np.ndarray, reserves: np.ndarray) -> float:
    return float(sum(prices[j] * reserves[j] for j in range(len(prices))))


def aum(st: RefState, num_risky: int) -> float:
    """pᵀR − net unrealised trader PnL."""
    return portfolio_value(st.prices, st.reserves) - unrealised(st.book, st.prices)


def lent(book: list, num_risky: int) -> tuple[list[float], float]:
    """Reserved by the book: long tokens Σ δ per market, short numéraire Σ n over all markets."""
    long_tokens = [0.0] * num_risky
    short_value = 0.0
    for i, s, _k, b in buckets(book):
        if not b.is_open:
            continue
        if s == LONG:
            long_tokens[i] += b.size
        else:
            short_value += b.notional
    return long_tokens, short_value


def available(st: RefState, num_risky: int) -> np.ndarray:
    """R^A = R − reserved (long tokens per risky asset; short numéraire)."""
    long_tokens, short_value = lent(st.book, num_risky)
    out = st.reserves.copy()
    for i in range(num_risky):
        out[i] -= long_tokens[i]
    out[num_risky] -= short_value
    return out


def side_size(book: list, i: int, s: int) -> float:
    return sum(b.size for b in book[i][s] if b.is_open)


def funding_rate(L: float, S: float, p: float, p0: float, kappa: float, cap: float) -> float:
    """γ_L = κ (L/S − p/p0) (eq. 2) clamped to ±cap; zero when a side is empty.

    γ > 0: longs pay shorts (as in the paper's worked example and §2.3.1).
    """
    if not (L > 0 and S > 0):
        return 0.0
    gamma = kappa * (L / S - p / p0)
    return min(max(gamma, -cap), cap)


# --------------------------------------------------------------------------- crowds


def collateral_fraction(mbar: float, w: float, m_min: float) -> tuple[float, float, float]:
    """Eq. 1 on a crowd with margin fractions m uniform on [m̄(1 − w), m̄(1 + w)].

    Members with leverage 1/m > η_max (m < m_min = 1/η_max) are rejected.
    **Returns:** the fraction kept a_c and the kept members' range [m_lo, m_hi].
    """
    m_hi = mbar * (1.0 + w)
    if w > 0:
        a_c = min(max((m_hi - m_min) / (2.0 * w * mbar), 0.0), 1.0)
    else:
        a_c = 1.0 if mbar >= m_min else 0.0
    m_lo = max(mbar * (1.0 - w), m_min)
    return a_c, m_lo, m_hi


def solvency_fraction(headroom: float, ask: float) -> float:
    """a_s = clip(headroom / ask, 0, 1), headroom clipped at 0; ask = 0 gives 0."""
    if not ask > 0:
        return 0.0
    return min(max(headroom, 0.0) / ask, 1.0)


def new_crowd(accepted: float, price: float, m_lo: float, m_hi: float, count: float) -> Bucket:
    """The bucket of an accepted crowd of notional A entering at `price`: δ = A/p, n = A,
    c = A (m_lo + m_hi)/2, key half-width a = p (m_hi − m_lo)/2."""
    return Bucket(
        size=accepted / price,
        notional=accepted,
        margin=accepted * (m_lo + m_hi) / 2.0,
        spread=price * (m_hi - m_lo) / 2.0,
        count=count,
        is_open=True,
    )


def merge_cost(bi: Bucket, bj: Bucket, side: int) -> float:
    """δ_i δ_j/(δ_i + δ_j) · ((q̄_i − q̄_j)² + (a_i − a_j)² + (p̄_i − p̄_j)²), p̄ = n/δ."""
    qi, qj = bi.mean_key(side), bj.mean_key(side)
    weight = bi.size * bj.size / (bi.size + bj.size)
    entry_gap = bi.notional / bi.size - bj.notional / bj.size
    return weight * ((qi - qj) ** 2 + (bi.spread - bj.spread) ** 2 + entry_gap**2)


def merge(bi: Bucket, bj: Bucket, side: int) -> Bucket:
    """One bucket holding both crowds: δ, n, c, count add; the keys' variance is the mixture's,
    v = (δ_i v_i + δ_j v_j)/δ + δ_i δ_j (q̄_i − q̄_j)²/δ² with v_k = a_k²/3, and a = √(3v);
    the slope is the mixture's covariance of entry price and key over v,
    (δ_i β_i v_i + δ_j β_j v_j)/δ + δ_i δ_j (q̄_i − q̄_j)(n_i/δ_i − n_j/δ_j)/δ²."""
    d = bi.size + bj.size
    qi, qj = bi.mean_key(side), bj.mean_key(side)
    vi, vj = bi.spread**2 / 3.0, bj.spread**2 / 3.0
    v = (bi.size * vi + bj.size * vj) / d + bi.size * bj.size * (qi - qj) ** 2 / d**2
    entry_gap = bi.notional / bi.size - bj.notional / bj.size
    cov = (bi.size * bi.slope * vi + bj.size * bj.slope * vj) / d + bi.size * bj.size * (
        qi - qj
    ) * entry_gap / d**2
    return Bucket(
        size=d,
        notional=bi.notional + bj.notional,
        margin=bi.margin + bj.margin,
        spread=math.sqrt(3.0 * v),
        count=bi.count + bj.count,
        slope=cov / v if v > 0 else 0.0,
        is_open=True,
    )


def add_crowd(ring: list, crowd: Bucket, side: int) -> tuple[int, int]:
    """Write a crowd into K slots kept in ascending order of mean key q̄.

    With a closed slot: the crowd's place p is the first open slot whose key exceeds the
    crowd's (K if none); the slots between p and the first closed one h shift one place
    towards h and the crowd takes p (h ≥ p) or p − 1 (h < p). With all K open, the cheapest
    (`merge_cost`; the first minimum) of these candidates merges: the crowd with bucket j
    (j = 0..K−1, in slot j), then neighbours j and j + 1 (j = 0..K−2, into slot j; the rest
    close up and the crowd takes its place in the K − 1 buckets left).

    **Returns:** (merges, whether two old buckets merged).
    """
    key = crowd.mean_key(side)
    k = len(ring)
    holes = [j for j, b in enumerate(ring) if not b.is_open]
    if holes:
        p = next((j for j, b in enumerate(ring) if b.is_open and b.mean_key(side) > key), k)
        h = holes[0]
        if h >= p:
            ring[p + 1 : h + 1] = ring[p:h]
            ring[p] = crowd
        else:
            ring[h : p - 1] = ring[h + 1 : p]
            ring[p - 1] = crowd
        return 0, 0
    costs = [merge_cost(ring[j], crowd, side) for j in range(k)]
    costs += [merge_cost(ring[j], ring[j + 1], side) for j in range(k - 1)]
    best = min(range(len(costs)), key=lambda i: (costs[i], i))
    if best < k:
        ring[best] = merge(ring[best], crowd, side)
        return 1, 0
    j = best - k
    rest = ring[:j] + [merge(ring[j], ring[j + 1], side)] + ring[j + 2 :]
    p = next((i for i, b in enumerate(rest) if b.mean_key(side) > key), len(rest))
    ring[:] = rest[:p] + [crowd] + rest[p:]
    return 1, 1


def arbitrage_sizes(L: float, S: float, gamma: float, ratio: float, fee: float):
    """The funding arbitrageur's long and short size (tokens), sized for profit (eq. 3, 4).

    Shorts pay (γ < 0): a long ℓ earns ℓ/(L + ℓ) |γ| S p and pays f ℓ p per period, maximal at
    ℓ* = √(|γ| S L / f) − L, opened as clip(ℓ*, 0, max(S·ratio − L, 0)) (f = 0: the cap).
    Longs pay (γ > 0): s* = √(γ L S / f) − S, clipped to [0, max(L/ratio − S, 0)].
    """
    want_long = max(S * ratio - L, 0.0)
    want_short = max(L / ratio - S, 0.0)
    if gamma < 0:
        star = want_long if fee == 0 else math.sqrt(-gamma * S * L / fee) - L
        return min(max(star, 0.0), want_long), 0.0
    if gamma > 0:
        star = want_short if fee == 0 else math.sqrt(gamma * L * S / fee) - S
        return 0.0, min(max(star, 0.0), want_short)
    return 0.0, 0.0


def pay_funding(market: list, gamma: float, price: float) -> float:
    """Funding of one market (eq. 2): every open bucket of the paying side (γ > 0 longs,
    γ < 0 shorts) pays |γ| δ p from its margin, at most the margin; the receiving side's open
    buckets share the total in proportion to δ. No receiver: nothing is paid.
    `market` is `book[i]` (two rings). **Returns:** the total paid."""
    if gamma == 0.0:
        return 0.0
    payer = LONG if gamma > 0 else SHORT
    receiver = 1 - payer
    recv_size = sum(b.size for b in market[receiver] if b.is_open)
    if recv_size <= 0:
        return 0.0
    total = 0.0
    for b in market[payer]:
        if b.is_open:
            pay = min(abs(gamma) * b.size * price, max(b.margin, 0.0))
            b.margin -= pay
            total += pay
    for b in market[receiver]:
        if b.is_open:
            b.margin += total * (b.size / recv_size)
    return total


def charge_fee(b: Bucket, side: int, price: float, fee: float) -> float:
    """Lending fee f on what an open bucket borrows (long δ p, short n), from its margin, at
    most the margin. **Returns:** the fee (0 for a closed slot)."""
    if not b.is_open:
        return 0.0
    due = min(fee * (b.size * price if side == LONG else b.notional), max(b.margin, 0.0))
    b.margin -= due
    return due


def accept_requests(
    requests: list,
    prices: np.ndarray,
    reserves: np.ndarray,
    book: list,
    prm: RefParams,
    events: dict,
) -> tuple[dict, float]:
    """Appendix A step 5 on crowds: `requests` is a list of (kind, {(i, s): (N, η)}), checked
    in list order, then market order, long before short.

    Collateral (eq. 1) keeps the fraction a_c of a crowd (members with m ≥ 1/η_max); the
    solvency cap accepts the fraction a_s = clip(headroom / ask, 0, 1) of what is kept: long
    tokens N a_c / p against max_utilisation · R_i − used_long_i, short numéraire N a_c
    (all markets together) against max_utilisation · R_numéraire − used_short. `used` starts at
    what the book reserves and grows with each accepted crowd. A request with N > 0 adds
    1 − a_c a_s to the rejections. **Returns:** the accepted crowds per (i, s), in request
    order (those under DUST_NOTIONAL dropped), and the rejections.
    """
    r = len(book)
    long_used, short_used = lent(book, r)
    long_cap = [prm.max_utilisation * reserves[i] for i in range(r)]
    short_cap = prm.max_utilisation * reserves[r]
    m_min = 1.0 / prm.max_leverage
    w = prm.leverage_spread
    crowds = {(i, s): [] for i in range(r) for s in (LONG, SHORT)}
    rejected = 0.0
    for kind, wanted in requests:
        for i in range(r):
            for s in (LONG, SHORT):
                notional, lev = wanted[i, s]
                if not notional > 0:
                    continue
                if kind == "arb":
                    events["arb_requests"] += 1
                a_c, m_lo, m_hi = collateral_fraction(1.0 / lev, w, m_min)
                kept = notional * a_c
                if s == LONG:
                    a_s = solvency_fraction(long_cap[i] - long_used[i], kept / prices[i])
                else:
                    a_s = solvency_fraction(short_cap - short_used, kept)
                accepted = kept * a_s
                # used grows by what was accepted. A binding cap (an ask with a_s < 1)
                # accepts exactly the headroom (none if used is already past the cap), so
                # used is then max(used, cap): set it so, and the requests after it see no
                # room at all, not a rounding residue of cap − used.
                binding = kept > 0 and a_s < 1
                if s == LONG and binding:
                    long_used[i] = max(long_used[i], long_cap[i])
                elif s == LONG:
                    long_used[i] += accepted / prices[i]
                elif binding:
                    short_used = max(short_used, short_cap)
                else:
                    short_used += accepted
                rejected += 1.0 - a_c * a_s
                events["rejected_collateral"] += 1.0 - a_c
                events["rejected_solvency"] += a_c * (1.0 - a_s)
                events["partial_collateral"] += int(0 < a_c < 1)
                events["partial_solvency"] += int(0 < a_s < 1)
                if accepted >= DUST_NOTIONAL:
                    crowds[i, s].append(new_crowd(accepted, prices[i], m_lo, m_hi, a_c * a_s))
                    if kind == "arb":
                        events["arb_opened"] += 1
    return crowds, rejected


# --------------------------------------------------------------------------- settlement


class _Settled:
    def __init__(self) -> None:
        self.received = 0.0
        self.paid = 0.0
        self.bad_debt = 0.0
        self.count = 0.0  # crowd-equivalents
        self.notional = 0.0  # liquidations: Σ φ δ x
        self.buckets = 0  # buckets touched
        self.closed = 0  # of which closed


def settle_chunk(
    st: RefState,
    i: int,
    side: int,
    size: float,
    notional: float,
    margin: float,
    price: float,
    out: _Settled,
    num_risky: int,
) -> None:
    """Settle a closing chunk (δ_x, n_x, c_x) against the pool at `price`.

    π = SIGN (δ_x p − n_x); the pool pays gain = max(π, 0) (a long in tokens, gain/p of them;
    a short in numéraire), takes c − max(π + c, 0) + gain in numéraire, and the shortfall
    max(−(π + c), 0) is bad debt.
    """
    pi = SIGN[side] * (size * price - notional)
    gain = max(pi, 0.0)
    taken = margin - max(pi + margin, 0.0) + gain
    bad = max(-(pi + margin), 0.0)
    if side == LONG:
        st.reserves[i] -= gain / price
    else:
        st.reserves[num_risky] -= gain
    st.reserves[num_risky] += taken
    out.received += taken
    out.paid += gain
    out.bad_debt += bad


def liquidated_fraction(b: Bucket, side: int, x: float) -> float:
    """φ: the fraction of an open bucket's members past their key at price x.

    long φ = clip((q̄ + a − x)/(2a), 0, 1), short φ = clip((x − q̄ + a)/(2a), 0, 1);
    a = 0: long 1[q̄ ≥ x], short 1[q̄ ≤ x]. φ is rounded up to 1 when 1 − φ < 1e-6.
    """
    if not b.is_open:
        return 0.0
    q, a = b.mean_key(side), b.spread
    if a > 0:
        raw = (q + a - x) / (2.0 * a) if side == LONG else (x - q + a) / (2.0 * a)
        phi = min(max(raw, 0.0), 1.0)
    elif side == LONG:
        phi = 1.0 if q >= x else 0.0
    else:
        phi = 1.0 if q <= x else 0.0
    if 1.0 - phi < LIQUIDATION_CLOSE:
        phi = 1.0
    return phi


def liquidated_chunk(b: Bucket, side: int, x: float, phi: float) -> tuple[float, float, float]:
    """(δ_L, n_L, c_L) of the members liquidated at x: with μ their mean key (long
    (max(x, q̄ − a) + q̄ + a)/2, short (q̄ − a + min(x, q̄ + a))/2), δ_L = φ δ,
    n_L = δ_L (n/δ + β (μ − q̄)) (kept within [0, n]) and c_L = n_L − δ_L μ (long) or
    δ_L μ − n_L (short).

    φ = 1 liquidates every member (also when rounded up from 1 − φ < 1e-6): their mean key
    is then q̄ itself and c_L = c, the bucket's whole margin (the formula's max(x, q̄ − a)
    would leave out the members of the rounded-off sliver, whose margin would vanish).
    """
    if phi >= 1.0:
        return b.size, b.notional, b.margin
    q, a = b.mean_key(side), b.spread
    d = phi * b.size
    if side == LONG:
        mu = (max(x, q - a) + q + a) / 2.0
        n = min(max(phi * b.notional + d * b.slope * (mu - q), 0.0), b.notional)
        return d, n, n - d * mu
    mu = (q - a + min(x, q + a)) / 2.0
    n = min(max(phi * b.notional + d * b.slope * (mu - q), 0.0), b.notional)
    return d, n, d * mu - n


def liquidate(
    st: RefState, i: int, side: int, k: int, x: float, out: _Settled, num_risky: int
) -> float:
    """Liquidate slot k's members past their key at price x; returns φ."""
    b = st.book[i][side][k]
    phi = liquidated_fraction(b, side, x)
    if phi <= 0:
        return 0.0
    d, n, c = liquidated_chunk(b, side, x, phi)
    settle_chunk(st, i, side, d, n, c, x, out, num_risky)
    out.count += phi * b.count
    out.notional += phi * b.size * x
    out.buckets += 1
    keep = 1.0 - phi
    st.book[i][side][k] = Bucket(
        size=b.size * keep,
        notional=b.notional - n,
        margin=b.margin - c,
        spread=b.spread * keep,
        count=b.count * keep,
        slope=b.slope if phi < 1.0 else 0.0,
        is_open=phi < 1.0,
    )
    out.closed += int(phi >= 1.0)
    return phi


def exit_fraction(mean_holding: float) -> float:
    """h = clip(1/mean_holding, 0, 1) (a mean holding of 0 reads as 1/0 = ∞ → 1)."""
    if mean_holding == 0:
        return 1.0
    return min(max(1.0 / mean_holding, 0.0), 1.0)


def exit_bucket(
    st: RefState, i: int, side: int, k: int, h: float, price: float, out: _Settled, num_risky: int
) -> None:
    """The fraction h of slot k leaves: (hδ, hn, hc) settles, the rest scales by 1 − h (a and
    q̄ unchanged); h = 1 empties, and so closes, the slot."""
    b = st.book[i][side][k]
    if not (b.is_open and h > 0):
        return
    settle_chunk(st, i, side, h * b.size, h * b.notional, h * b.margin, price, out, num_risky)
    out.count += h * b.count
    out.buckets += 1
    keep = 1.0 - h
    st.book[i][side][k] = Bucket(
        size=b.size * keep,
        notional=b.notional * keep,
        margin=b.margin * keep,
        spread=b.spread,
        count=b.count * keep,
        slope=b.slope if h < 1.0 else 0.0,
        is_open=h < 1.0,
    )
    out.closed += int(h >= 1.0)


# --------------------------------------------------------------------------- the step


def step(st: RefState, prm: RefParams, spec: RefSpec, noise: RefNoise) -> RefState:
    """One step of one pool (returns a new state; `st` is not modified)."""
    st = copy.deepcopy(st)
    r, K = spec.num_risky, spec.num_cohorts
    num = r  # index of the numéraire
    p_old = st.prices.copy()
    aum_before = aum(st, r)
    supply_before = st.supply

    # 1. Oracle.
    x, st.garch_h = log_returns(spec, prm, noise.path, st.garch_h)
    p_new = p_old.copy()
    for i in range(r):
        p_new[i] = p_old[i] * math.exp(x[i])
    inventory = sum((p_new[j] - p_old[j]) * st.reserves[j] for j in range(len(p_new)))
    book_move = -(unrealised(st.book, p_new) - unrealised(st.book, p_old))
    st.prices = p_new
    fees = bad_debt = flow = 0.0
    liq = _Settled()
    ex = _Settled()
    funding_total = 0.0
    n_merged = n_open = 0
    n_rejected = 0.0
    twm = {"flow": 0.0, "gain": 0.0, "created": 0, "redeemed": 0}  # no target-weight trade
    supply_held = supply_before  # shares not the TWM arbitrageur's after its trade

    if spec.mode == "passive":
        if spec.rebalance:
            value = portfolio_value(p_new, st.reserves)
            new_r = np.array([prm.target_weights[j] * value / p_new[j] for j in range(len(p_new))])
            inventory += portfolio_value(p_new, new_r) - value
            st.reserves = new_r
    else:
        # 2. Liquidations at the new prices, bucket by bucket.
        for i in range(r):
            for s in (LONG, SHORT):
                for k in range(K):
                    liquidate(st, i, s, k, p_new[i], liq, r)
        bad_debt += liq.bad_debt
        st.events["liquidations"] += liq.buckets
        st.events["full_liquidations"] += liq.closed
        st.events["bad_debt_events"] += int(liq.bad_debt > 0)

        # 3. Funding between the sides, on what survived; at most each payer's margin.
        gammas = []
        for i in range(r):
            L, S = side_size(st.book, i, LONG), side_size(st.book, i, SHORT)
            gamma = funding_rate(L, S, p_new[i], p_old[i], prm.funding_kappa, prm.funding_cap)
            gammas.append(gamma)
            total = pay_funding(st.book[i], gamma, p_new[i])
            funding_total += total
            st.events["funding_payments"] += int(total > 0)

        # 4. Lending fee on what each bucket borrows (long δ p, short n), at most its margin.
        for i, s, _k, b in buckets(st.book):
            due = charge_fee(b, s, p_new[i], prm.fee)
            fees += due
            st.events["fee_payments"] += int(due > 0)
            st.events["negative_margins"] += int(b.is_open and b.margin < 0)
        st.reserves[num] += fees

        # 5a. Target-weight arbitrage: a creation (eq. 7) or a redemption (eq. 10) priced by
        # the discount F, at the AUM and R^A after fees; the existing LPs (S for a creation,
        # S − σ for a redemption) pay the arbitrageur's gain through dilution.
        if spec.discount != "none":
            twm = twm_trade(
                spec.discount,
                p_new,
                st.reserves,
                st.supply,
                aum(st, r),
                available(st, r),
                prm,
                spec.twm_steps,
            )
            st.reserves = st.reserves + twm["reserve_change"]
            st.supply += twm["supply_change"]
            supply_held = min(supply_before, st.supply)

        # 5b. LP deposits and withdrawals at the share price.
        value = aum(st, r)
        avail = [max(a, 0.0) for a in available(st, r)]
        avail_value = sum(p_new[j] * avail[j] for j in range(len(avail)))
        phi = prm.lp_flow_drift * spec.dt + prm.lp_flow_vol * math.sqrt(spec.dt) * noise.z_flow
        deposit = max(phi, 0.0) * value
        withdraw = min(max(-phi, 0.0) * value, 0.99 * avail_value)
        for j in range(len(st.reserves)):
            st.reserves[j] += deposit * prm.target_weights[j] / p_new[j]
            if avail_value > 0:
                st.reserves[j] -= withdraw * avail[j] / avail_value
        flow = deposit - withdraw
        price_per_share = value / st.supply
        st.supply += flow / price_per_share
        st.events["lp_deposits"] += int(deposit > 0)
        st.events["lp_withdrawals"] += int(withdraw > 0)

        # 6a. Deterministic exits: the fraction h of every open bucket.
        h = exit_fraction(prm.mean_holding)
        for i in range(r):
            for s in (LONG, SHORT):
                for k in range(K):
                    exit_bucket(st, i, s, k, h, p_new[i], ex, r)
        st.events["exits"] += ex.buckets
        bad_debt += ex.bad_debt
        st.events["bad_debt_events"] += int(ex.bad_debt > 0)

        # 6b. New demand (fee elasticity, momentum, noise traders).
        value = aum(st, r)
        elastic = math.exp(-prm.fee_elasticity * prm.fee * spec.steps_per_year)
        demand = {}
        for i in range(r):
            sd = prm.vols[i] * math.sqrt(spec.dt)
            z = x[i] / sd if sd > 0 else x[i]
            z = min(max(z, -3.0), 3.0)
            for s in (LONG, SHORT):
                notional = (
                    prm.open_rate[i]
                    * value
                    * elastic
                    * math.exp(prm.momentum * z * SIGN[s])
                    * math.exp(prm.noise_vol * noise.z_demand[i, s] - 0.5 * prm.noise_vol**2)
                )
                lev = prm.leverage * math.exp(
                    prm.leverage_vol * noise.z_leverage[i, s] - 0.5 * prm.leverage_vol**2
                )
                demand[i, s] = (notional, lev)

        # 6c. The funding-rate arbitrageur joins the receiving side, sized for profit.
        arb = {}
        for i in range(r):
            L, S = side_size(st.book, i, LONG), side_size(st.book, i, SHORT)
            ratio = p_new[i] / p_old[i]
            arb[i, LONG] = arb[i, SHORT] = (0.0, prm.arb_leverage)
            if prm.arb_leverage <= 0:
                continue
            want = arbitrage_sizes(L, S, gammas[i], ratio, prm.fee)
            for s in (LONG, SHORT):
                arb[i, s] = (want[s] * p_new[i], prm.arb_leverage)

        # 6d. Collateral fraction a_c and capacity share a_s, in request order.
        crowds, n_rejected = accept_requests(
            [("demand", demand), ("arb", arb)], p_new, st.reserves, st.book, prm, st.events
        )

        # 6e. Write the crowds, demand first: the first closed slot, else the cheapest merge.
        for i in range(r):
            for s in (LONG, SHORT):
                for crowd in crowds[i, s]:
                    merged, pair = add_crowd(st.book[i][s], crowd, s)
                    n_merged += merged
                    st.events["pair_merges"] += pair
                    n_open += 1
        st.events["opened"] += n_open

    # Accounting identity and running totals.
    aum_after = aum(st, r)
    terms = inventory + book_move + fees - bad_debt + flow + twm["flow"]
    violation = abs(aum_after - aum_before - terms) / max(abs(aum_before), 1e-30)
    # LP wealth identity: the initial LPs hold h = initial_value shares throughout (flows are
    # other LPs, minted and burnt at the share price), so their wealth h·AUM/supply moves by
    # their pro-rata share of what happened while they held h of `supply` shares: the market
    # terms before the flow over the opening supply, the exits' bad debt after it over the
    # closing supply. The target-weight arbitrageur's gain (`twm_settle`) is paid by the
    # shares not its own after its trade (`supply_held`).
    held = prm.initial_value
    wealth_before = held * aum_before / supply_before
    wealth_after = held * aum_after / st.supply
    share_before = held / supply_before
    share_after = held / st.supply
    expected = (
        share_before * (inventory + book_move + fees - liq.bad_debt)
        - held / supply_held * twm["gain"]
        - share_after * ex.bad_debt
    )
    lp_violation = abs(wealth_after - wealth_before - expected) / max(abs(wealth_before), 1e-30)
    acc = st.accounts
    acc["inventory_pnl"] += inventory
    acc["book_pnl"] += book_move
    acc["fees"] += fees
    acc["bad_debt"] += bad_debt
    acc["lp_flows"] += flow
    acc["twm_flows"] += twm["flow"]
    acc["dilution"] += twm["gain"]
    acc["creations"] += twm["created"]
    acc["redemptions"] += twm["redeemed"]
    acc["liquidated_margin"] += liq.received
    acc["liquidated_notional"] += liq.notional
    acc["exit_received"] += ex.received
    acc["exit_paid"] += ex.paid
    acc["funding_paid"] += funding_total
    acc["liquidations"] += liq.count
    acc["exits"] += ex.count
    acc["merged"] += n_merged
    st.events["merged"] += n_merged
    acc["opened"] += n_open
    acc["rejected"] += n_rejected
    long_tokens, short_value = lent(st.book, r)
    lent_value = sum(long_tokens[i] * p_new[i] for i in range(r)) + short_value
    acc["utilisation_sum"] += lent_value / portfolio_value(p_new, st.reserves)
    acc["open_interest_sum"] += sum(
        b.size * p_new[i] for i, _s, _k, b in buckets(st.book) if b.is_open
    )
    acc["value_sum"] += aum_after
    # Attribution: the LP identity's terms per share. A liquidation's seized margin is split
    # out of the book's mark-to-market change; bad debt of liquidations is shared by the
    # opening supply, that of exits (after the LP flow) by the closing one.
    acc["share_inventory"] += inventory / supply_before
    acc["share_trader_pnl"] += (book_move - liq.received) / supply_before
    acc["share_fees"] += fees / supply_before
    acc["share_liquidated_margin"] += liq.received / supply_before
    acc["share_bad_debt"] -= liq.bad_debt / supply_before + ex.bad_debt / st.supply
    acc["share_dilution"] -= twm["gain"] / supply_held
    if violation > acc["identity_error"]:
        acc["identity_error"] = violation
        acc["identity_error_step"] = float(st.t)
    acc["lp_identity_error"] = max(acc["lp_identity_error"], lp_violation)
    st.t += 1
    return st


# --------------------------------------------------------------------------- target weights


def glp_discount(
    prices: np.ndarray,
    target: np.ndarray,
    reserves: np.ndarray,
    delta: np.ndarray,
    base: float,
    tax: float,
) -> float:
    """Eq. 11 as printed, F = max(0, γ_b + max_i G_i(w(p, R), w(p, R + δ), w*)), by loops."""
    n = len(prices)
    before = [prices[i] * reserves[i] for i in range(n)]
    after = [prices[i] * (reserves[i] + delta[i]) for i in range(n)]
    vb, va = sum(before), sum(after)
    best = -math.inf
    for i in range(n):
        wb, wa = before[i] / vb, after[i] / va
        db, da = abs(wb - target[i]) / target[i], abs(wa - target[i]) / target[i]
        if wa == wb:
            g = 0.0
        elif abs(wa - target[i]) < abs(wb - target[i]):
            g = tax * db
        else:
            g = -tax / 2.0 * (db + da)
        best = max(best, g)
    return max(0.0, base + best)


def twm_settle(
    value: float,
    supply: float,
    deposit: float,
    f_create: float,
    withdrawal: float,
    f_redeem: float,
) -> dict[str, float]:
    """Shares minted and burnt by a target-weight trade, and the arbitrageur's real gain.

    Creation (Chitra et al. §3.3): depositing assets worth v into a pool worth V buys the
    fraction (1 + F)·v / (V + v) of the pool after the deposit, so with q that fraction the
    new shares m satisfy m = q·(S + m), i.e. m = S·q / (1 − q). Redemption (eq. 9): assets
    worth pᵀλ = (1 + f)·(σ/S)·V cost σ shares. The gain is what the arbitrageur holds after
    the trade at the post-trade share price, less what it paid: m·P' − v for a creation,
    pᵀλ − σ·V/S for a redemption (it buys the σ shares at V/S).
    """
    out = {"minted": 0.0, "burnt": 0.0, "gain": 0.0}
    if deposit > 0:
        q = (1.0 + f_create) * deposit / (value + deposit)
        m = supply * q / (1.0 - q)
        out["minted"] = m
        out["gain"] += m * (value + deposit) / (supply + m) - deposit
    if withdrawal > 0:
        sigma = withdrawal / (1.0 + f_redeem) / value * supply
        out["burnt"] = sigma
        out["gain"] += withdrawal - sigma * value / supply
    return out


# The discounts whose target-weight arbitrage the reference step covers.
TWM_DISCOUNTS = ("glp", "gmx")
# The ascent's line search tries these multiples of its step size at every step.
TWM_STEP_SCALES = tuple(2.0**k for k in range(-6, 3))
# g = ∇F(0) by one-sided differences over this value fraction of AUM per asset.
TWM_EPS = 1e-3
# GMX fees: whole-USDG amounts are clipped to [0, 2⁵⁸], fee quotients to 2¹⁵ − 1 bps.
GMX_MAX_USDG = 2**58
GMX_MAX_BPS = 2**15 - 1


def _no_discount(kind: str) -> NotImplementedError:
    return NotImplementedError(
        f"the reference's target-weight arbitrage covers the discounts {TWM_DISCOUNTS}, not "
        f"{kind!r} (add its F, gradient and Hessian to `twm_discount` and `discount_jet`)"
    )


def gmx_fee_bps(
    usdg: float, size: float, target: float, base_bps: float, tax_bps: float, increment: bool
) -> int:
    """GMX v1 `getFeeBasisPoints` on Python integers: the fee (bps) of one mint or burn.

    I (`usdg`), Δ (`size`) and T (`target`) are floored to whole USDG, in [0, 2⁵⁸] (NaN → 0);
    bps are rounded to integers. N = I + Δ for a deposit, max(I − Δ, 0) for a withdrawal;
    d0 = |I − T|, d1 = |N − T|. If d1 < d0 (towards the target) the fee is
    max(base − ⌊tax·d0/T⌋, 0), else base + ⌊tax·min(⌊(d0 + d1)/2⌋, T)/T⌋; T = 0: the base.
    """

    def whole(a: float) -> int:
        if not a > 0:  # NaN or ≤ 0
            return 0
        return GMX_MAX_USDG if a >= GMX_MAX_USDG else int(math.floor(a))

    i_amt, d_amt, t_amt = whole(usdg), whole(size), whole(target)
    base = int(round(base_bps))
    tax = min(max(int(round(tax_bps)), 0), GMX_MAX_BPS)
    if t_amt == 0:
        return base
    nxt = i_amt + d_amt if increment else max(i_amt - d_amt, 0)
    d0, d1 = abs(i_amt - t_amt), abs(nxt - t_amt)
    if d1 < d0:
        return max(base - min(tax * d0 // t_amt, GMX_MAX_BPS), 0)
    return base + min(tax * min((d0 + d1) // 2, t_amt) // t_amt, GMX_MAX_BPS)


def gmx_discount(
    prices: np.ndarray,
    target: np.ndarray,
    reserves: np.ndarray,
    delta: np.ndarray,
    base: float,
    tax: float,
) -> float:
    """GMX v1 mint/burn fees as a discount (Chitra et al. §3.6), by loops.

    Each asset is its own mint (p_i δ_i ≥ 0) or burn of size |p_i δ_i|, with I_i = p_i R_i and
    T_i = w*_i pᵀR; F = −Σ_i fee_i |p_i δ_i| / (10⁴ Σ_i |p_i δ_i|) (0 at δ = 0), the fees of
    `gmx_fee_bps` at base γ_b and tax γ_t (fractions). F ≤ 0: it never pays an arbitrageur.
    """
    n = len(prices)
    usdg = [prices[i] * reserves[i] for i in range(n)]
    total = sum(usdg)
    trade = [prices[i] * delta[i] for i in range(n)]
    gross = sum(abs(t) for t in trade)
    if not gross > 0:
        return 0.0
    paid = 0.0
    for i in range(n):
        fee = gmx_fee_bps(
            usdg[i], abs(trade[i]), target[i] * total, base * 1e4, tax * 1e4, trade[i] >= 0
        )
        paid += fee * abs(trade[i])
    return -paid / (1e4 * gross)


def twm_discount(
    kind: str,
    prices: np.ndarray,
    target: np.ndarray,
    reserves: np.ndarray,
    delta: np.ndarray,
    base: float,
    tax: float,
) -> float:
    """F(p, w*, R, δ) of the kind named (δ in tokens): "glp" eq. 11 as printed, "gmx" fees."""
    if kind == "glp":
        return glp_discount(prices, target, reserves, delta, base, tax)
    if kind == "gmx":
        return gmx_discount(prices, target, reserves, delta, base, tax)
    raise _no_discount(kind)


def discount_jet(
    kind: str,
    prices: np.ndarray,
    target: np.ndarray,
    reserves: np.ndarray,
    delta: np.ndarray,
    k: np.ndarray,
    base: float,
    tax: float,
) -> tuple[float, np.ndarray, np.ndarray]:
    """F (eq. 11 or GMX fees) at δ and its gradient and Hessian in value fractions x, by hand.

    δ_i = x_i · AUM/p_i, so ∂(p_i δ_i)/∂x_i = `k`_i (= AUM up to rounding). Where F is
    piecewise smooth the derivatives are those of the active piece, taken as automatic
    differentiation takes them at a kink: |y|' = 1 at y = 0; a max averages the gradients of
    the tied entries (½ each for max(·, 0) at 0); branches and integer fees have none.

    eq. 11: only a tax branch G_i = −γ_t/2 (|w^b_i − w*_i| + |w^a_i − w*_i|)/w*_i moves with
    δ, through w^a_i = a_i/A (a = p ⊙ (R + δ), A = Σ a): ∂w^a_i/∂x_j = k_j(1[i=j] − w^a_i)/A,
    ∂²w^a_i/∂x_j∂x_l = −k_j k_l (1[i=j] + 1[i=l] − 2 w^a_i)/A². GMX: with s = |p ⊙ δ|,
    F = −Σ f_i s_i/(10⁴ Σ s) for fixed fees f, ∂F/∂s_j = (−f_j − 10⁴F)/(10⁴ Σ s) and
    ∂²F/∂s_j∂s_l = (f_j + f_l + 2·10⁴F)/(10⁴ (Σ s)²); at δ = 0, F = −Σ f_i s_i/10⁴.
    **Returns:** (F, ∇F shape `(n,)`, ∇²F shape `(n, n)`).
    """
    n = len(prices)
    eye = np.eye(n)
    if kind == "glp":
        before = np.array([prices[i] * reserves[i] for i in range(n)])
        after = np.array([prices[i] * (reserves[i] + delta[i]) for i in range(n)])
        vb, va = sum(before), sum(after)
        wb, wa = before / vb, after / va
        g, dg, d2g = np.zeros(n), np.zeros((n, n)), np.zeros((n, n, n))
        for i in range(n):
            db = abs(wb[i] - target[i]) / target[i]
            da = abs(wa[i] - target[i]) / target[i]
            if wa[i] == wb[i]:
                continue
            if abs(wa[i] - target[i]) < abs(wb[i] - target[i]):
                g[i] = tax * db
                continue
            g[i] = -0.5 * tax * (db + da)
            c = -0.5 * tax * (1.0 if wa[i] - target[i] >= 0 else -1.0) / target[i]
            for j in range(n):
                dg[i, j] = c * k[j] * (eye[i, j] - wa[i]) / va
                for m in range(n):
                    d2g[i, j, m] = -c * k[j] * k[m] * (eye[i, j] + eye[i, m] - 2 * wa[i]) / va**2
        top = [i for i in range(n) if g[i] == max(g)]
        z = base + max(g)
        weight = (1.0 if z > 0 else 0.5 if z == 0 else 0.0) / len(top)
        return max(z, 0.0), weight * dg[top].sum(0), weight * d2g[top].sum(0)
    if kind == "gmx":
        usdg = [prices[i] * reserves[i] for i in range(n)]
        total = sum(usdg)
        trade = np.array([prices[i] * delta[i] for i in range(n)])
        size = np.abs(trade)
        fee = np.array(
            [
                float(
                    gmx_fee_bps(
                        usdg[i], size[i], target[i] * total, base * 1e4, tax * 1e4, trade[i] >= 0
                    )
                )
                for i in range(n)
            ]
        )
        ds = np.where(trade >= 0, 1.0, -1.0) * k  # ∂s_i/∂x_i
        gross = float(np.sum(size))
        if not gross > 0:
            return -float(np.sum(fee * size)) / 1e4, -fee / 1e4 * ds, np.zeros((n, n))
        F = -float(np.sum(fee * size)) / (1e4 * gross)
        dF = (-fee - 1e4 * F) / (1e4 * gross)
        d2F = (fee[:, None] + fee[None, :] + 2e4 * F) / (1e4 * gross**2)
        return F, dF * ds, d2F * np.outer(ds, ds)
    raise _no_discount(kind)


def twm_ascent(
    objective, project, x0: np.ndarray, num_steps: int
) -> tuple[np.ndarray, float, float]:
    """Projected gradient ascent from the surrogate start `x0` (Chitra et al. §3.3).

    `objective`(x, derivatives) → (value, gradient, Hessian). The first step size is
    η = 1/‖∇²(x0)‖_F (1 when that is 0 or not finite). The incumbent is x0 if its value is
    positive, else the zero trade (value 0). Each of `num_steps` steps tries
    project(x + η·s·∇) for s in `TWM_STEP_SCALES`, moves to the best (the first of equals, NaN
    counting as −∞) if it beats the incumbent and carries η·s on, else shrinks η by 2⁶.
    **Returns:** (best x, its value, the value at x0).
    """
    v0, _, hess = objective(x0)
    sq = float(np.sum(hess * hess))
    eta = 1.0 / math.sqrt(sq) if math.isfinite(sq) and sq > 0 else 1.0
    x, v = (x0.copy(), v0) if v0 > 0 else (np.zeros_like(x0), 0.0)
    for _ in range(num_steps):
        grad = objective(x)[1]
        grad = np.where(np.isfinite(grad), grad, 0.0)
        best, best_k, best_x = -math.inf, 0, None
        for kk, s in enumerate(TWM_STEP_SCALES):
            cand = project(x + (eta * s) * grad)
            val = objective(cand, False)[0]
            val = -math.inf if math.isnan(val) else val
            if best_x is None or val > best:
                best, best_k, best_x = val, kk, cand
        if best > v:
            x, v, eta = best_x, best, eta * TWM_STEP_SCALES[best_k]
        else:
            eta *= TWM_STEP_SCALES[0]
    return x, v, v0


def twm_objectives(
    kind: str,
    prices: np.ndarray,
    reserves: np.ndarray,
    value: float,
    prm: RefParams,
):
    """The arbitrageur's profits in value fractions x = p ⊙ δ / AUM, with their derivatives.

    Creation, eq. 7: S(x) = F(δ)·pᵀδ with δ = x·AUM/p (pᵀδ = AUM·Σx). Redemption, eq. 10:
    R(λ) = pᵀλ·f/(1 + f), f = F(−λ) (−∞ where 1 + f ≤ 0). **Returns:** (creation, redemption,
    F of x, to_tokens): the first two map (x, derivatives=True) to (value, gradient,
    Hessian), the last two None without derivatives.
    """
    n = len(prices)
    scale = max(value, np.finfo(np.float64).tiny)
    to_tokens = scale / prices
    k = prices * to_tokens
    w, base, tax = prm.target_weights, prm.discount_base, prm.discount_tax

    def F_x(x: np.ndarray) -> float:
        return twm_discount(kind, prices, w, reserves, x * to_tokens, base, tax)

    def create(x: np.ndarray, derivatives: bool = True):
        F = F_x(x)
        total = float(np.sum(scale * x))  # pᵀδ
        if not derivatives:
            return F * total, None, None
        _, dF, d2F = discount_jet(kind, prices, w, reserves, x * to_tokens, k, base, tax)
        one = np.ones(n)
        hess = d2F * total + scale * (np.outer(dF, one) + np.outer(one, dF))
        return F * total, dF * total + F * scale, hess

    def redeem(lam: np.ndarray, derivatives: bool = True):
        f = F_x(-lam)
        total = float(np.sum(scale * lam))  # pᵀλ
        den = 1.0 + f
        if not den > 0:
            return -math.inf, np.zeros(n), np.full((n, n), np.nan)
        r, r1, r2 = f / den, 1.0 / den**2, -2.0 / den**3  # f/(1 + f) and its derivatives
        if not derivatives:
            return total * r, None, None
        _, dF, d2F = discount_jet(kind, prices, w, reserves, -lam * to_tokens, k, base, tax)
        df = -dF  # ∂f/∂λ; ∂²f/∂λ² = ∇²F (two sign flips)
        one = np.ones(n)
        hess = scale * r1 * (np.outer(one, df) + np.outer(df, one)) + total * (
            r2 * np.outer(df, df) + r1 * d2F
        )
        return total * r, scale * r * one + total * r1 * df, hess

    return create, redeem, F_x, to_tokens


def twm_trade(
    kind: str,
    prices: np.ndarray,
    reserves: np.ndarray,
    supply: float,
    value: float,
    available: np.ndarray,
    prm: RefParams,
    num_steps: int,
) -> dict[str, Any]:
    """One step of target-weight arbitrage on one pool (DESIGN step 5; Chitra et al. §3.3).

    The arbitrageur solves, in value fractions x of AUM, creation (eq. 7: deposit δ ≥ 0, each
    x_i ≤ twm_capital, for shares worth (1 + F(δ))·pᵀδ) and redemption (eq. 10: take
    0 ≤ λ ≤ R^A, each at most twm_capital of AUM, for shares worth pᵀλ/(1 + F(−λ))), F the
    discount (eq. 11 "glp" or GMX fees "gmx"). Each starts at the surrogate optimum δ_H = g/μ
    (λ_H = −g/μ for redemption), g the one-sided differences of F at 0 over `TWM_EPS` of AUM
    per asset (forward for a deposit, backward for a withdrawal), projected on its box, and is
    refined by `twm_ascent` for `num_steps` steps. The more profitable trade is done if its
    profit exceeds twm_cost × AUM (a creation wins ties; it must bring assets in), settled by
    `twm_settle`. **Returns:** reserve_change (tokens), supply_change, flow (pᵀδ − pᵀλ), gain
    (the arbitrageur's, = the LPs' dilution), created, redeemed (0/1), and each solver's
    trade and profit.
    """
    n = len(prices)
    scale = max(value, np.finfo(np.float64).tiny)
    create, redeem, F_x, to_tokens = twm_objectives(kind, prices, reserves, value, prm)
    zero = np.zeros(n)
    f0 = F_x(zero)
    eye = np.eye(n) * TWM_EPS
    g_in = np.array([(F_x(eye[i]) - f0) / TWM_EPS for i in range(n)])
    g_out = np.array([-(F_x(-eye[i]) - f0) / TWM_EPS for i in range(n)])
    cap = np.full(n, prm.twm_capital)
    room = np.minimum(np.maximum(available, 0.0) * prices / scale, cap)

    def box_create(x: np.ndarray) -> np.ndarray:
        return np.minimum(np.maximum(x, 0.0), cap)

    def box_redeem(lam: np.ndarray) -> np.ndarray:
        return np.minimum(np.maximum(lam, 0.0), room)

    mu = prm.twm_mu
    x_c, profit_c, _ = twm_ascent(create, box_create, box_create(g_in / mu), num_steps)
    x_r, profit_r, _ = twm_ascent(redeem, box_redeem, box_redeem(-g_out / mu), num_steps)
    threshold = prm.twm_cost * scale
    c_ok = profit_c > threshold and float(np.sum(x_c)) > 0
    r_ok = profit_r > threshold
    do_create = c_ok and (not r_ok or profit_c >= profit_r)
    do_redeem = r_ok and not do_create
    delta = x_c * to_tokens if do_create else zero
    lam = x_r * to_tokens if do_redeem else zero
    value_in = sum(prices[i] * delta[i] for i in range(n))
    value_out = sum(prices[i] * lam[i] for i in range(n))
    w, base, tax = prm.target_weights, prm.discount_base, prm.discount_tax
    f_create = twm_discount(kind, prices, w, reserves, delta, base, tax) if do_create else 0.0
    f_redeem = twm_discount(kind, prices, w, reserves, -lam, base, tax) if do_redeem else 0.0
    settled = twm_settle(value, supply, value_in, f_create, value_out, f_redeem)
    return {
        "reserve_change": delta - lam,
        "supply_change": settled["minted"] - settled["burnt"],
        "flow": value_in - value_out,
        "gain": settled["gain"],
        "created": int(do_create),
        "redeemed": int(do_redeem),
        "create_trade": x_c,
        "create_profit": profit_c,
        "redeem_trade": x_r,
        "redeem_profit": profit_r,
    }


def twm_brute_force(
    kind: str,
    prices: np.ndarray,
    reserves: np.ndarray,
    value: float,
    available: np.ndarray,
    prm: RefParams,
    points: int = 21,
    refine: int = 3000,
    seed: int = 0,
) -> dict[str, tuple[float, np.ndarray]]:
    """The best creation (eq. 7) and redemption (eq. 10) profits by brute force, no gradients.

    Each box of value fractions (creation [0, twm_capital]ⁿ, redemption [0, min(R^A p/AUM,
    twm_capital)] per asset) is searched on a grid of `points` per axis, then by `refine`
    random points around the incumbent, in a radius that halves whenever 100 draws in a row
    fail to improve (from a tenth of the box) and, half of the time, on the box's faces.
    Creations must bring assets in (Σx > 0). **Returns:** {"create": (profit, x), "redeem":
    (profit, λ)}, the zero trade (profit 0) when nothing beats it.
    """
    n = len(prices)
    create, redeem, _, _ = twm_objectives(kind, prices, reserves, value, prm)
    cap = np.full(n, prm.twm_capital)
    room = np.minimum(np.maximum(available, 0.0) * prices / max(value, 1e-300), cap)
    rng = np.random.default_rng(seed)
    return {
        "create": _box_search(create, cap, True, points, refine, rng),
        "redeem": _box_search(redeem, room, False, points, refine, rng),
    }


def _box_search(
    objective, hi: np.ndarray, deposit: bool, points: int, refine: int, rng: np.random.Generator
) -> tuple[float, np.ndarray]:
    """`twm_brute_force` on one box [0, hi]: (best value, its x); (0, 0) if none is positive."""
    n = len(hi)
    best, best_x = 0.0, np.zeros(n)

    def value(x: np.ndarray) -> float:
        if deposit and not np.sum(x) > 0:
            return -math.inf
        return objective(x, False)[0]

    axes = [np.linspace(0.0, h, points) for h in hi]
    for x in np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, n):
        val = value(x)
        if val > best:
            best, best_x = val, x
    radius, misses = 0.1 * hi, 0
    for _ in range(refine):
        x = np.clip(best_x + radius * rng.uniform(-1.0, 1.0, n), 0.0, hi)
        if rng.uniform() < 0.5:  # snap one coordinate to a face of the box
            i = rng.integers(n)
            x[i] = hi[i] if rng.uniform() < 0.5 else 0.0
        val = value(x)
        if val > best:
            best, best_x, misses = val, x, 0
            continue
        misses += 1
        if misses >= 100:
            radius, misses = radius / 2.0, 0
    return best, best_x


# --------------------------------------------------------------------------- views


def share_price(st: RefState, num_risky: int) -> float:
    return aum(st, num_risky) / st.supply


BOOK_FIELDS = ("size", "notional", "margin", "spread", "count", "is_open", "slope")


def book_arrays(st: RefState) -> dict[str, np.ndarray]:
    """The book as `(r, 2, K)` arrays, named as `pdlpjax.Book`'s fields."""
    out = {}
    for name in BOOK_FIELDS:
        out[name] = np.array(
            [[[getattr(b, name) for b in ring] for ring in market] for market in st.book]
        )
    return out


def set_book(st: RefState, arrays: dict[str, np.ndarray]) -> None:
    """Overwrite the reference book from `(r, 2, K)` arrays (e.g. a JAX `Book`)."""
    for i, s, k, _b in buckets(st.book):
        st.book[i][s][k] = Bucket(
            size=float(arrays["size"][i, s, k]),
            notional=float(arrays["notional"][i, s, k]),
            margin=float(arrays["margin"][i, s, k]),
            spread=float(arrays["spread"][i, s, k]),
            count=float(arrays["count"][i, s, k]),
            slope=float(arrays["slope"][i, s, k]) if "slope" in arrays else 0.0,
            is_open=bool(arrays["is_open"][i, s, k]),
        )
