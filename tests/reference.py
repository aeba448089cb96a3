"""A slow, plain NumPy (float64) reference of one pool step, written from the documented model.

This is deliberately *not* a transliteration of the vectorised JAX step: it walks markets,
sides and cohorts with explicit Python loops and keeps one `Cohort` object per ring slot. It
follows the docstrings of `pdlpjax.simulate.step` and of the market/pool functions it calls
(`settle`, `funding_rate`, `pay_funding`, `charge_fees`, `lp_flow`, `next_slots`,
`accept_trades`, `trader_demand`, `funding_arbitrage`, `open_cohorts`) and DESIGN.md:

1. Oracle: p_{t+1} = p_t · exp(log return) per risky asset (numéraire stays at 1).
2. Liquidations: an open cohort with sign(η) δ (p0 − p) ≥ c closes; the pool takes
   min(loss, c) of its margin and absorbs max(loss − c, 0) as bad debt.
3. Funding: γ = clip(κ (L/S − p_{t+1}/p_t), ±cap), zero when a side is empty; γ > 0 longs
   pay, γ < 0 shorts pay; each payer pays min(|γ| δ p, c); receivers share pro rata by size.
4. Lending fee: min(f · borrowed, c) per cohort (long: δ p, short: δ p0), to the numéraire.
5. LP flow: φ = drift dt + vol √dt z of AUM; deposits at target weights, withdrawals from the
   available reserves R^A (capped at 99% of their value); shares at the share price.
6. Exits (u < 1/mean_holding) settle; then trader demand and the funding arbitrageur's
   requests are checked (collateral condition, solvency) in order and written as one new
   cohort per market and side, merged into the ring's newest cohort when the ring is full.

The reference consumes the same injected draws as the JAX step (a `StepNoise` whose leaves
were converted to NumPy) and keeps the same state, so the two compare field by field. Besides
the engine's accounting totals it counts events the engine does not break down (rejections by
reason, funding payments, arbitrage trades).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LONG, SHORT = 0, 1
SIGN = {LONG: 1.0, SHORT: -1.0}

ACCOUNT_FIELDS = (
    "inventory_pnl",
    "book_pnl",
    "fees",
    "bad_debt",
    "lp_flows",
    "liquidated_margin",
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
    "liquidations",
    "bad_debt_events",
    "funding_payments",  # (market, step) pairs where a nonzero amount of funding changed hands
    "fee_payments",
    "random_exits",  # exits by the geometric holding time
    "merged",  # new trades merged into a full ring's newest cohort
    "rejected_collateral",
    "rejected_solvency",
    "arb_requests",
    "arb_opened",
    "opened",
    "lp_deposits",
    "lp_withdrawals",
)


@dataclass
class Cohort:
    """One ring slot: size δ (tokens), entry price p0, margin c, leverage η, opening step."""

    size: float = 0.0
    entry: float = 0.0
    margin: float = 0.0
    leverage: float = 0.0
    opened_at: int = 0
    is_open: bool = False


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
    u_exit: np.ndarray  # (r, 2, K)
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
        u_exit=get(noise.u_exit),
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
    book: list  # book[market][side][k] -> Cohort
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
        [[Cohort() for _ in range(spec.num_cohorts)] for _side in (LONG, SHORT)]
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


def cohorts(book: list):
    """Yield (market, side, k, cohort) over every slot."""
    for i, market in enumerate(book):
        for s, ring in enumerate(market):
            for k, c in enumerate(ring):
                yield i, s, k, c


def unrealised(book: list, prices: np.ndarray) -> float:
    total = 0.0
    for i, s, _k, c in cohorts(book):
        if c.is_open:
            total += SIGN[s] * c.size * (prices[i] - c.entry)
    return total


def portfolio_value(prices: np.ndarray, reserves: np.ndarray) -> float:
    return float(sum(prices[j] * reserves[j] for j in range(len(prices))))


def aum(st: RefState, num_risky: int) -> float:
    """pᵀR − net unrealised trader PnL."""
    return portfolio_value(st.prices, st.reserves) - unrealised(st.book, st.prices)


def lent(book: list, num_risky: int) -> tuple[list[float], float]:
    """Reserved by the book: long tokens per market, short numéraire δ p0 over all markets."""
    long_tokens = [0.0] * num_risky
    short_value = 0.0
    for i, s, _k, c in cohorts(book):
        if not c.is_open:
            continue
        if s == LONG:
            long_tokens[i] += c.size
        else:
            short_value += c.size * c.entry
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
    return sum(c.size for c in book[i][s] if c.is_open)


def funding_rate(L: float, S: float, p: float, p0: float, kappa: float, cap: float) -> float:
    """γ_L = κ (L/S − p/p0) (eq. 2) clamped to ±cap; zero when a side is empty.

    γ > 0: longs pay shorts (as in the paper's worked example and §2.3.1).
    """
    if not (L > 0 and S > 0):
        return 0.0
    gamma = kappa * (L / S - p / p0)
    return min(max(gamma, -cap), cap)


def collateral_ok(leverage: float, max_leverage: float) -> bool:
    """Eq. 1, p0 δ ≤ η_max c: a trade of notional p0 δ with margin c = p0 δ / η passes iff
    η ≤ η_max."""
    return leverage <= max_leverage


def is_liquidatable(c: Cohort, side: int, price: float) -> bool:
    """The liquidation condition sign(η) δ (p0 − p) ≥ c on an open cohort."""
    return c.is_open and SIGN[side] * c.size * (c.entry - price) >= c.margin


class _Settled:
    def __init__(self) -> None:
        self.received = 0.0
        self.paid = 0.0
        self.bad_debt = 0.0
        self.count = 0


def close_cohort(
    st: RefState, i: int, side: int, c: Cohort, price: float, out: _Settled, num_risky: int
) -> None:
    """Settle one cohort against the pool at `price` and mark it closed."""
    pnl = SIGN[side] * c.size * (price - c.entry)
    if pnl > 0:
        out.paid += pnl
        if side == LONG:
            st.reserves[i] -= pnl / price  # paid in tokens of the asset
        else:
            st.reserves[num_risky] -= pnl
    else:
        loss = -pnl
        taken = min(loss, c.margin)
        st.reserves[num_risky] += taken
        out.received += taken
        out.bad_debt += max(loss - c.margin, 0.0)
    out.count += 1
    c.is_open = False


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
    n_merged = n_open = n_rejected = 0

    if spec.mode == "passive":
        if spec.rebalance:
            value = portfolio_value(p_new, st.reserves)
            new_r = np.array([prm.target_weights[j] * value / p_new[j] for j in range(len(p_new))])
            inventory += portfolio_value(p_new, new_r) - value
            st.reserves = new_r
    else:
        # 2. Liquidations at the new prices.
        for i, s, _k, c in cohorts(st.book):
            if is_liquidatable(c, s, p_new[i]):
                close_cohort(st, i, s, c, p_new[i], liq, r)
        bad_debt += liq.bad_debt
        st.events["liquidations"] += liq.count
        st.events["bad_debt_events"] += int(liq.bad_debt > 0)

        # 3. Funding between the sides, on the positions that survived.
        gammas = []
        for i in range(r):
            L, S = side_size(st.book, i, LONG), side_size(st.book, i, SHORT)
            gamma = funding_rate(L, S, p_new[i], p_old[i], prm.funding_kappa, prm.funding_cap)
            gammas.append(gamma)
            if gamma == 0.0:
                continue
            payer = LONG if gamma > 0 else SHORT
            receiver = 1 - payer
            recv_size = side_size(st.book, i, receiver)
            if recv_size <= 0:
                continue
            total = 0.0
            for c in st.book[i][payer]:
                if c.is_open:
                    pay = min(abs(gamma) * c.size * p_new[i], c.margin)
                    c.margin -= pay
                    total += pay
            for c in st.book[i][receiver]:
                if c.is_open:
                    c.margin += total * (c.size / recv_size)
            funding_total += total
            st.events["funding_payments"] += int(total > 0)

        # 4. Lending fee on what each position borrows.
        for i, s, _k, c in cohorts(st.book):
            if c.is_open:
                borrowed = c.size * p_new[i] if s == LONG else c.size * c.entry
                due = min(prm.fee * borrowed, c.margin)
                c.margin -= due
                fees += due
                st.events["fee_payments"] += int(due > 0)
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

        # 6a. Random exits.
        for i in range(r):
            for s in (LONG, SHORT):
                ring = st.book[i][s]
                leaving = [
                    k
                    for k in range(K)
                    if ring[k].is_open and noise.u_exit[i, s, k] < 1.0 / prm.mean_holding
                ]
                for k in leaving:
                    close_cohort(st, i, s, ring[k], p_new[i], ex, r)
                st.events["random_exits"] += len(leaving)
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

        # 6c. The funding-rate arbitrageur joins the receiving side (eq. 3, 4).
        arb = {}
        for i in range(r):
            L, S = side_size(st.book, i, LONG), side_size(st.book, i, SHORT)
            ratio = p_new[i] / p_old[i]
            gamma = gammas[i]
            arb[i, LONG] = arb[i, SHORT] = (0.0, prm.arb_leverage)
            if prm.arb_leverage <= 0:
                continue
            if gamma < 0:  # shorts pay: a long that brings L/S to p/p0
                want = max(S * ratio - L, 0.0)
                if prm.fee * (L + want) <= -gamma * S:
                    arb[i, LONG] = (want * p_new[i], prm.arb_leverage)
            elif gamma > 0:  # longs pay: a short
                want = max(L / ratio - S, 0.0)
                if prm.fee * (S + want) <= gamma * L:
                    arb[i, SHORT] = (want * p_new[i], prm.arb_leverage)

        # 6d. Collateral condition and solvency, in request order; market order; long, short.
        long_used, short_used = lent(st.book, r)
        long_cap = [prm.max_utilisation * st.reserves[i] for i in range(r)]
        short_cap = prm.max_utilisation * st.reserves[num]
        new_size = {(i, s): 0.0 for i in range(r) for s in (LONG, SHORT)}
        new_margin = dict(new_size)
        for kind, requests in (("demand", demand), ("arb", arb)):
            for i in range(r):
                for s in (LONG, SHORT):
                    notional, lev = requests[i, s]
                    if not notional > 0:
                        continue
                    if kind == "arb":
                        st.events["arb_requests"] += 1
                    delta = notional / p_new[i]
                    if not collateral_ok(lev, prm.max_leverage):
                        st.events["rejected_collateral"] += 1
                        n_rejected += 1
                        continue
                    if s == LONG:
                        ok = long_used[i] + delta <= long_cap[i]
                    else:
                        ok = short_used + notional <= short_cap
                    if not ok:
                        st.events["rejected_solvency"] += 1
                        n_rejected += 1
                        continue
                    if s == LONG:
                        long_used[i] += delta
                    else:
                        short_used += notional
                    new_size[i, s] += delta
                    new_margin[i, s] += notional / lev
                    if kind == "arb":
                        st.events["arb_opened"] += 1

        # 6e. One new cohort per market and side (if its notional is at least 1e-12): the
        # first free slot, else merged into the ring's newest cohort (size-weighted entry
        # price, margins added).
        for i in range(r):
            for s in (LONG, SHORT):
                if not new_size[i, s] * p_new[i] >= 1e-12:  # market.DUST_NOTIONAL
                    continue
                ring = st.book[i][s]
                size, margin = new_size[i, s], new_margin[i, s]
                free = [k for k in range(K) if not ring[k].is_open]
                if free:
                    slot, entry = free[0], p_new[i]
                else:
                    slot = max(range(K), key=lambda k: (ring[k].opened_at, -k))  # noqa: B023
                    old = ring[slot]
                    entry = (old.size * old.entry + size * p_new[i]) / (old.size + size)
                    size, margin = old.size + size, old.margin + margin
                    n_merged += 1
                ring[slot] = Cohort(
                    size=size,
                    entry=entry,
                    margin=margin,
                    leverage=size * entry / margin,
                    opened_at=st.t,
                    is_open=True,
                )
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
    h = prm.initial_value
    wealth_before = h * aum_before / supply_before
    wealth_after = h * aum_after / st.supply
    share_before = h / supply_before
    share_after = h / st.supply
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
        c.size * p_new[i] for i, _s, _k, c in cohorts(st.book) if c.is_open
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


def book_arrays(st: RefState) -> dict[str, np.ndarray]:
    """The book as `(r, 2, K)` arrays, named as `pdlpjax.Book`'s fields."""
    out = {}
    for name in ("size", "entry", "margin", "leverage", "opened_at", "is_open"):
        out[name] = np.array(
            [[[getattr(c, name) for c in ring] for ring in market] for market in st.book]
        )
    return out


def set_book(st: RefState, arrays: dict[str, np.ndarray]) -> None:
    """Overwrite the reference book from `(r, 2, K)` arrays (e.g. a JAX `Book`)."""
    for i, s, k, c in cohorts(st.book):
        c.size = float(arrays["size"][i, s, k])
        c.entry = float(arrays["entry"][i, s, k])
        c.margin = float(arrays["margin"][i, s, k])
        c.leverage = float(arrays["leverage"][i, s, k])
        c.opened_at = int(arrays["opened_at"][i, s, k])
        c.is_open = bool(arrays["is_open"][i, s, k])
