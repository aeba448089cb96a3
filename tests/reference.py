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
5. LP flow: φ = drift dt + vol √dt z of AUM; deposits at target weights, withdrawals from the
   available reserves R^A (capped at 99% of their value); shares at the share price.
6. Exits: the fraction h = clip(1/mean_holding, 0, 1) of every open bucket leaves and settles
   (deterministic; a and q̄ unchanged). Then trader demand and the funding arbitrageur
   (sized for profit: ℓ* = √(|γ| S L / f) − L, at most what brings L/S to p_t/p_{t−1}) send
   crowds of traders with margin fractions uniform on [m̄(1 − w), m̄(1 + w)], m̄ = 1/η;
   the collateral condition keeps the fraction a_c with m ≥ 1/η_max, the solvency cap the
   fraction a_s of the rest (requests in order). Each accepted crowd joins the K slots of
   its market and side, kept in ascending order of mean key: in a closed slot (the buckets
   between shift), else the cheapest neighbours in key order among the K buckets and the
   crowd (cost δ_i δ_j/(δ_i + δ_j) · ((q̄_i − q̄_j)² + (a_i − a_j)²)) merge.

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
    count (crowd-equivalents) and an open flag.
    """

    size: float = 0.0
    notional: float = 0.0
    margin: float = 0.0
    spread: float = 0.0
    count: float = 0.0
    is_open: bool = False

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
    """δ_i δ_j/(δ_i + δ_j) · ((q̄_i − q̄_j)² + (a_i − a_j)²)."""
    qi, qj = bi.mean_key(side), bj.mean_key(side)
    weight = bi.size * bj.size / (bi.size + bj.size)
    return weight * ((qi - qj) ** 2 + (bi.spread - bj.spread) ** 2)


def merge(bi: Bucket, bj: Bucket, side: int) -> Bucket:
    """One bucket holding both crowds: δ, n, c, count add; the keys' variance is the mixture's,
    v = (δ_i v_i + δ_j v_j)/δ + δ_i δ_j (q̄_i − q̄_j)²/δ² with v_k = a_k²/3, and a = √(3v)."""
    d = bi.size + bj.size
    qi, qj = bi.mean_key(side), bj.mean_key(side)
    vi, vj = bi.spread**2 / 3.0, bj.spread**2 / 3.0
    v = (bi.size * vi + bj.size * vj) / d + bi.size * bj.size * (qi - qj) ** 2 / d**2
    return Bucket(
        size=d,
        notional=bi.notional + bj.notional,
        margin=bi.margin + bj.margin,
        spread=math.sqrt(3.0 * v),
        count=bi.count + bj.count,
        is_open=True,
    )


def add_crowd(ring: list, crowd: Bucket, side: int) -> tuple[int, int]:
    """Write a crowd into K slots kept in ascending order of mean key q̄.

    Its place p is the first open slot whose key exceeds the crowd's (K if none). With a
    closed slot, the slots between p and the first closed one h shift one place towards h
    and the crowd takes p (h ≥ p) or p − 1 (h < p). With all K open, the K + 1 candidates in
    key order (the crowd at p) merge their cheapest neighbours (`merge_cost`, the first
    minimum) into one slot and the rest close up.

    **Returns:** (merges, whether two old buckets merged).
    """
    key = crowd.mean_key(side)
    k = len(ring)
    p = next((j for j, b in enumerate(ring) if b.is_open and b.mean_key(side) > key), k)
    holes = [j for j, b in enumerate(ring) if not b.is_open]
    if holes:
        h = holes[0]
        if h >= p:
            ring[p + 1 : h + 1] = ring[p:h]
            ring[p] = crowd
        else:
            ring[h : p - 1] = ring[h + 1 : p]
            ring[p - 1] = crowd
        return 0, 0
    line = ring[:p] + [crowd] + ring[p:]
    costs = [merge_cost(line[i], line[i + 1], side) for i in range(k)]
    i = min(range(k), key=lambda j: (costs[j], j))
    ring[:] = line[:i] + [merge(line[i], line[i + 1], side)] + line[i + 2 :]
    return 1, int(p not in (i, i + 1))


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
    """(δ_L, n_L, c_L) of the members liquidated at x: δ_L = φ δ, n_L = φ n, and with μ their
    mean key (long (max(x, q̄ − a) + q̄ + a)/2, short (q̄ − a + min(x, q̄ + a))/2)
    c_L = n_L − δ_L μ (long) or δ_L μ − n_L (short).

    φ = 1 liquidates every member (also when rounded up from 1 − φ < 1e-6): their mean key
    is then q̄ itself and c_L = c, the bucket's whole margin (the formula's max(x, q̄ − a)
    would leave out the members of the rounded-off sliver, whose margin would vanish).
    """
    if phi >= 1.0:
        return b.size, b.notional, b.margin
    q, a = b.mean_key(side), b.spread
    d, n = phi * b.size, phi * b.notional
    if side == LONG:
        mu = (max(x, q - a) + q + a) / 2.0
        return d, n, n - d * mu
    mu = (q - a + min(x, q + a)) / 2.0
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
        notional=b.notional * keep,
        margin=b.margin - c,
        spread=b.spread * keep,
        count=b.count * keep,
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

        # 5. LP deposits and withdrawals at the share price.
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
    terms = inventory + book_move + fees - bad_debt + flow
    violation = abs(aum_after - aum_before - terms) / max(abs(aum_before), 1e-30)
    # LP wealth identity: the initial LPs hold h = initial_value shares throughout (flows are
    # other LPs, minted and burnt at the share price), so their wealth h·AUM/supply moves by
    # their pro-rata share of what happened while they held h of `supply` shares: the market
    # terms before the flow over the opening supply, the exits' bad debt after it over the
    # closing supply. (No target-weight arbitrage here: `twm_settle` is checked on its own.)
    held = prm.initial_value
    wealth_before = held * aum_before / supply_before
    wealth_after = held * aum_after / st.supply
    share_before = held / supply_before
    share_after = held / st.supply
    expected = share_before * (inventory + book_move + fees - liq.bad_debt) - share_after * (
        ex.bad_debt
    )
    lp_violation = abs(wealth_after - wealth_before - expected) / max(abs(wealth_before), 1e-30)
    acc = st.accounts
    acc["inventory_pnl"] += inventory
    acc["book_pnl"] += book_move
    acc["fees"] += fees
    acc["bad_debt"] += bad_debt
    acc["lp_flows"] += flow
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


# --------------------------------------------------------------------------- views


def share_price(st: RefState, num_risky: int) -> float:
    return aum(st, num_risky) / st.supply


BOOK_FIELDS = ("size", "notional", "margin", "spread", "count", "is_open")


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
            is_open=bool(arrays["is_open"][i, s, k]),
        )
