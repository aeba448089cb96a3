"""The pdlpjax step vectorised over pools with plain NumPy (float64): the throughput baseline.

What it covers: exactly the features of the per-pool reference `tests/reference.py`, i.e.
- price paths: correlated GBM, Merton jumps with a common crash factor, GARCH(1,1);
- `pool.mode = "pdlp"` (oracle, liquidations with bad debt, funding between the sides with
  the eq. 2 rate, lending fees, LP deposits and withdrawals, random exits, trader demand,
  the funding-rate arbitrageur, the collateral and solvency checks, cohort rings that merge
  when full) and `"passive"` (with optional rebalancing);
- the accounting totals of `ref.ACCOUNT_FIELDS` and the identity check.
Not covered (as in the reference): target-weight arbitrage (`pool.discount` must be "none"),
swap arbitrage, the delta hedge, the bootstrap path model, antithetic draws, the online
return statistics (`SimState.stats`) and the numerical guard codes. So it does a little less
work per step than the JAX step; the throughput ratios it gives are, if anything, in the
baseline's favour.

Every array has a leading pool axis P: books are `(P, r, 2, K)` (market, side, cohort),
prices and reserves `(P, n)` with the numéraire last. There is no per-pool Python loop; the
only Python loops run over the small static axes where the order of checks matters (the
solvency check of shorts, which share the numéraire, goes market by market, as in
`pdlpjax.market.accept_trades`).

It consumes the same injected draws as the JAX step: a batched `pdlpjax.StepNoise` (leaves
with a leading pool axis) converted by `noise_from_pdlpjax`. A test
(`tests/test_numpy_vectorised.py`) checks it against the JAX step on the same draws to 1e-9,
so the baseline is the same model, not a simplified one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "SIGN",
    "ACCOUNT_FIELDS",
    "NpSpec",
    "NpParams",
    "NpBook",
    "NpNoise",
    "NpState",
    "spec_from_pdlpjax",
    "params_from_pdlpjax",
    "noise_from_pdlpjax",
    "init_state",
    "step",
    "aum",
    "state_nbytes",
]

# sign(η): +1 for longs, −1 for shorts; shape (2, 1) broadcasts against (..., 2, K).
SIGN = np.array([1.0, -1.0])[:, None]

# The running totals kept per pool (the same names as `pdlpjax.Accounts` and the reference).
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
    "identity_error",
    "identity_error_step",
)


@dataclass(frozen=True)
class NpSpec:
    """Static settings (mirrors `pdlpjax.SimSpec` plus the path model's name)."""

    num_risky: int
    num_cohorts: int
    steps_per_year: float
    path_model: str = "gbm"  # gbm | jump | garch
    mode: str = "pdlp"  # pdlp | passive
    rebalance: bool = False

    @property
    def dt(self) -> float:
        """Length of one step in years."""
        return 1.0 / self.steps_per_year


@dataclass
class NpParams:
    """Every dynamic param the step reads, float64 with a leading pool axis.

    Scalars are `(P,)`, per-asset vectors `(P, r)` (target weights `(P, n)`), the correlation
    `(P, r, r)`. `chol` is its Cholesky factor, computed once here rather than every step
    (what a NumPy programmer would do; the JAX step recomputes it inside the step).
    """

    initial_prices: np.ndarray
    funding_kappa: np.ndarray
    funding_cap: np.ndarray
    open_rate: np.ndarray
    mean_holding: np.ndarray
    leverage: np.ndarray
    leverage_vol: np.ndarray
    max_leverage: np.ndarray
    fee_elasticity: np.ndarray
    momentum: np.ndarray
    noise_vol: np.ndarray
    arb_leverage: np.ndarray
    initial_value: np.ndarray
    target_weights: np.ndarray
    fee: np.ndarray
    max_utilisation: np.ndarray
    lp_flow_drift: np.ndarray
    lp_flow_vol: np.ndarray
    drifts: np.ndarray
    vols: np.ndarray
    correlation: np.ndarray
    jump_intensity: np.ndarray
    jump_mean: np.ndarray
    jump_vol: np.ndarray
    crash_intensity: np.ndarray
    crash_mean: np.ndarray
    crash_vol: np.ndarray
    garch_alpha: np.ndarray
    garch_beta: np.ndarray
    chol: np.ndarray = dataclasses.field(default=None)  # type: ignore[assignment]


@dataclass
class NpBook:
    """All pools' positions, each field `(P, r, 2, K)` (as `pdlpjax.market.Book`)."""

    size: np.ndarray
    entry: np.ndarray
    margin: np.ndarray
    leverage: np.ndarray
    opened_at: np.ndarray
    is_open: np.ndarray


@dataclass
class NpNoise:
    """One step's draws for all pools, float64 with a leading pool axis.

    `path`: gbm/garch `(P, r)` normals; jump: a dict with `z`, `u_jump`, `z_jump` `(P, r)` and
    `u_crash`, `z_crash` `(P,)`.
    """

    path: Any
    u_exit: np.ndarray  # (P, r, 2, K)
    z_demand: np.ndarray  # (P, r, 2)
    z_leverage: np.ndarray  # (P, r, 2)
    z_flow: np.ndarray  # (P,)


@dataclass
class NpState:
    """All pools: step count, prices and reserves (numéraire last), LP supply, book, totals."""

    t: np.ndarray  # (P,) int
    prices: np.ndarray  # (P, n)
    reserves: np.ndarray  # (P, n)
    supply: np.ndarray  # (P,)
    book: NpBook
    accounts: dict  # name -> (P,)
    garch_h: np.ndarray | None = None  # (P, r), GARCH only


# --------------------------------------------------------------------------- conversions


def spec_from_pdlpjax(spec: Any, path_model: str) -> NpSpec:
    """The NumPy spec of a `pdlpjax.SimSpec` (refuses features this baseline lacks)."""
    if spec.discount != "none" or spec.swap_arbitrage or getattr(spec, "hedge", False):
        raise ValueError("numpy_vectorised covers no TWM discount, swap arbitrage or hedge")
    if not spec.has_numeraire or spec.antithetic:
        raise ValueError("numpy_vectorised needs a numéraire and no antithetic draws")
    return NpSpec(
        num_risky=spec.num_risky,
        num_cohorts=spec.num_cohorts,
        steps_per_year=spec.steps_per_year,
        path_model=path_model,
        mode=spec.mode,
        rebalance=spec.rebalance,
    )


def params_from_pdlpjax(params: Any) -> NpParams:
    """Batched `pdlpjax.Params` (leading pool axis, any array type) as float64 `NpParams`."""
    names = [f.name for f in dataclasses.fields(NpParams) if f.name != "chol"]
    values = {}
    for section in (params.market, params.pool, params.paths):
        for name in names:
            if hasattr(section, name):
                values[name] = np.array(getattr(section, name), dtype=np.float64)
    out = NpParams(**values)
    out.chol = np.linalg.cholesky(out.correlation)
    return out


def noise_from_pdlpjax(noise: Any) -> NpNoise:
    """A batched `pdlpjax.StepNoise` (leaves `(P, ...)`) as float64 `NpNoise`."""

    def get(x: Any) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    path = noise.path
    if hasattr(path, "u_jump"):
        path = {k: get(getattr(path, k)) for k in ("z", "u_jump", "z_jump", "u_crash", "z_crash")}
    else:
        path = get(path)
    return NpNoise(
        path=path,
        u_exit=get(noise.u_exit),
        z_demand=get(noise.z_demand),
        z_leverage=get(noise.z_leverage),
        z_flow=get(noise.z_flow),
    )


def init_state(spec: NpSpec, prm: NpParams) -> NpState:
    """Reserves at the target weights worth `initial_value`, no positions, share price 1."""
    num_pools = prm.initial_value.shape[0]
    prices = np.concatenate([prm.initial_prices, np.ones((num_pools, 1))], axis=1)
    reserves = prm.target_weights * prm.initial_value[:, None] / prices
    shape = (num_pools, spec.num_risky, 2, spec.num_cohorts)
    zero = np.zeros(shape)
    book = NpBook(
        size=zero,
        entry=zero,
        margin=zero,
        leverage=zero,
        opened_at=np.zeros(shape, np.int64),
        is_open=np.zeros(shape, bool),
    )
    garch_h = prm.vols**2 * spec.dt if spec.path_model == "garch" else None
    return NpState(
        t=np.zeros(num_pools, np.int64),
        prices=prices,
        reserves=reserves,
        supply=prm.initial_value.copy(),
        book=book,
        accounts={k: np.zeros(num_pools) for k in ACCOUNT_FIELDS},
        garch_h=garch_h,
    )


def state_nbytes(st: NpState) -> int:
    """Bytes of every array of the state (all pools)."""
    arrays = [st.t, st.prices, st.reserves, st.supply, *st.accounts.values()]
    arrays += [getattr(st.book, f.name) for f in dataclasses.fields(NpBook)]
    if st.garch_h is not None:
        arrays.append(st.garch_h)
    return int(sum(a.nbytes for a in arrays))


# --------------------------------------------------------------------------- helpers


def _b(x: np.ndarray) -> np.ndarray:
    """A per-pool `(P,)` or per-market `(P, r)` array broadcast against `(P, r, 2, K)`."""
    return x.reshape(x.shape + (1,) * (4 - x.ndim)) if x.ndim == 2 else x[:, None, None, None]


def _open(book: NpBook, x: np.ndarray) -> np.ndarray:
    return np.where(book.is_open, x, 0.0)


def _pnl(book: NpBook, pr: np.ndarray) -> np.ndarray:
    """Each cohort's unrealised PnL sign(η) δ (p − p0), zero where closed."""
    return _open(book, SIGN * book.size * (_b(pr) - book.entry))


def _unrealised(book: NpBook, pr: np.ndarray) -> np.ndarray:
    return _pnl(book, pr).sum(axis=(1, 2, 3))


def _reserved(book: NpBook) -> tuple[np.ndarray, np.ndarray]:
    """Long tokens per market `(P, r)`, short numéraire `(P,)`."""
    open_size = _open(book, book.size)
    return open_size[:, :, 0].sum(-1), (open_size[:, :, 1] * book.entry[:, :, 1]).sum((1, 2))


def _available(reserves: np.ndarray, book: NpBook) -> np.ndarray:
    long_tokens, short_value = _reserved(book)
    return reserves - np.concatenate([long_tokens, short_value[:, None]], axis=1)


def aum(st: NpState, num_risky: int) -> np.ndarray:
    """Pool value per pool: pᵀR − net unrealised trader PnL, `(P,)`."""
    value = (st.prices * st.reserves).sum(-1)
    return value - _unrealised(st.book, st.prices[:, :num_risky])


def _side_sizes(book: NpBook) -> np.ndarray:
    return _open(book, book.size).sum(-1)  # (P, r, 2)


def _settle(book: NpBook, mask: np.ndarray, pr: np.ndarray) -> tuple[NpBook, dict]:
    """Close the cohorts in `mask` at prices `pr` (see `pdlpjax.market.settle`)."""
    p = np.where(mask, SIGN * book.size * (_b(pr) - book.entry), 0.0)
    margin = np.where(mask, book.margin, 0.0)
    gain = np.maximum(p, 0.0)
    taken = np.minimum(np.maximum(-p, 0.0), margin)
    bad = np.maximum(-p - margin, 0.0)
    short_paid = gain[:, :, 1].sum((1, 2))
    received = taken.sum((1, 2, 3))
    change = np.concatenate([-gain[:, :, 0].sum(-1) / pr, (received - short_paid)[:, None]], axis=1)
    out = {
        "reserve_change": change,
        "received": received,
        "paid": gain.sum((1, 2, 3)),
        "bad_debt": bad.sum((1, 2, 3)),
        "count": mask.sum((1, 2, 3)).astype(np.float64),
    }
    return dataclasses.replace(book, is_open=book.is_open & ~mask), out


def _poisson(u: np.ndarray, mean: np.ndarray, max_count: int = 24) -> np.ndarray:
    """Poisson(mean) counts by inverse CDF (as `pdlpjax.paths.poisson_from_uniform`)."""
    k = np.arange(max_count, dtype=np.float64)
    logm = np.log(np.maximum(mean, np.finfo(np.float64).tiny))[..., None]
    logpmf = k * logm - mean[..., None] - np.cumsum(np.log(np.maximum(k, 1.0)))
    cdf = np.cumsum(np.exp(logpmf), axis=-1)
    return (u[..., None] > cdf).sum(-1).astype(np.float64)


def _log_returns(
    spec: NpSpec, prm: NpParams, noise: Any, garch_h: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Risky log returns `(P, r)` of one step, and the new GARCH variance."""
    dt = spec.dt
    z = noise["z"] if isinstance(noise, dict) else noise
    # L z per pool, as an elementwise product and a row sum (like `paths._correlate`).
    corr_z = (prm.chol * z[:, None, :]).sum(-1)
    if spec.path_model == "gbm":
        return (prm.drifts - 0.5 * prm.vols**2) * dt + prm.vols * math.sqrt(dt) * corr_z, garch_h
    if spec.path_model == "jump":
        kappa = np.exp(prm.jump_mean + 0.5 * prm.jump_vol**2) - 1.0
        kappa_c = np.exp(prm.crash_mean + 0.5 * prm.crash_vol**2) - 1.0
        n_jump = _poisson(noise["u_jump"], prm.jump_intensity * dt)
        n_crash = _poisson(noise["u_crash"], prm.crash_intensity * dt)
        jumps = n_jump * prm.jump_mean + np.sqrt(n_jump) * prm.jump_vol * noise["z_jump"]
        crash = n_crash * prm.crash_mean + np.sqrt(n_crash) * prm.crash_vol * noise["z_crash"]
        drift = (
            prm.drifts
            - 0.5 * prm.vols**2
            - prm.jump_intensity * kappa
            - (prm.crash_intensity * kappa_c)[:, None]
        ) * dt
        return drift + prm.vols * math.sqrt(dt) * corr_z + jumps + crash[:, None], garch_h
    if spec.path_model == "garch":
        a, b = prm.garch_alpha, prm.garch_beta
        omega = prm.vols**2 * dt * (1.0 - a - b)
        eps = np.sqrt(garch_h) * corr_z
        return prm.drifts * dt - 0.5 * garch_h + eps, omega + a * eps**2 + b * garch_h
    raise NotImplementedError(spec.path_model)


# --------------------------------------------------------------------------- the step


def step(st: NpState, prm: NpParams, spec: NpSpec, noise: NpNoise) -> NpState:
    """Advance every pool by one step with the given draws (returns a new state).

    The order and formulas are those of `pdlpjax.simulate.step` restricted to the covered
    features (module docstring): oracle, liquidations, funding, lending fees, LP flows,
    exits, new demand and the funding arbitrageur, acceptance, new cohorts, accounts.
    """
    r = spec.num_risky
    book = st.book
    p_old = st.prices
    aum_before = aum(st, r)

    # 1. Oracle.
    x, garch_h = _log_returns(spec, prm, noise.path, st.garch_h)
    p_new = np.concatenate([p_old[:, :r] * np.exp(x), p_old[:, r:]], axis=1)
    pr, pr_old = p_new[:, :r], p_old[:, :r]
    reserves, supply = st.reserves, st.supply
    inventory = ((p_new - p_old) * reserves).sum(-1)
    book_move = -(_unrealised(book, pr) - _unrealised(book, pr_old))
    zero = np.zeros_like(supply)
    fees = bad_debt = flow = funding = n_merged = n_open = n_rejected = zero
    liq = ex = {k: zero for k in ("received", "paid", "bad_debt", "count")}

    if spec.mode == "passive":
        if spec.rebalance:
            before = (p_new * reserves).sum(-1)
            reserves = prm.target_weights * before[:, None] / p_new
            inventory = inventory + (p_new * reserves).sum(-1) - before
    else:
        # 2. Liquidations: sign(η) δ (p0 − p) ≥ c on open cohorts.
        loss = SIGN * book.size * (book.entry - _b(pr))
        book, liq = _settle(book, book.is_open & (loss >= book.margin), pr)
        reserves = reserves + liq["reserve_change"]
        bad_debt = liq["bad_debt"]

        # 3. Funding γ = κ (L/S − p/p0), clipped, zero when a side is empty; γ > 0 longs pay.
        sizes = _side_sizes(book)
        long_size, short_size = sizes[..., 0], sizes[..., 1]
        both = (long_size > 0) & (short_size > 0)
        ratio = long_size / np.where(short_size > 0, short_size, 1.0)
        cap = prm.funding_cap[:, None]
        gamma = prm.funding_kappa[:, None] * (ratio - pr / pr_old)
        gamma = np.where(both, np.clip(gamma, -cap, cap), 0.0)
        payer = np.where(gamma > 0, 0, 1)[..., None, None]  # (P, r, 1, 1)
        side = np.arange(2)[:, None]
        is_payer = book.is_open & (side == payer)
        is_receiver = book.is_open & (side != payer)
        owed = _b(np.abs(gamma) * pr) * book.size
        paid = np.where(is_payer, np.minimum(owed, book.margin), 0.0)
        recv = np.where(is_receiver, book.size, 0.0)
        recv_size = recv.sum((2, 3))
        has_recv = recv_size > 0
        total = np.where(has_recv, paid.sum((2, 3)), 0.0)
        paid = np.where(has_recv[..., None, None], paid, 0.0)
        share = recv / _b(np.where(has_recv, recv_size, 1.0))
        margin = book.margin - paid + share * _b(total)
        funding = total.sum(-1)

        # 4. Lending fee on what each position borrows (long δ p, short δ p0), from margins.
        borrowed = np.stack(
            [book.size[:, :, 0] * pr[..., None], book.size[:, :, 1] * book.entry[:, :, 1]], axis=2
        )
        due = np.where(book.is_open, np.minimum(_b(prm.fee) * borrowed, margin), 0.0)
        book = dataclasses.replace(book, margin=margin - due)
        fees = due.sum((1, 2, 3))
        reserves = reserves + np.concatenate([np.zeros_like(x), fees[:, None]], axis=1)

        # 5. LP deposits (target weights) and withdrawals (from R^A, ≤ 99%) at the share price.
        value = (p_new * reserves).sum(-1) - _unrealised(book, pr)
        avail = np.maximum(_available(reserves, book), 0.0)
        avail_value = (p_new * avail).sum(-1)
        phi = prm.lp_flow_drift * spec.dt + prm.lp_flow_vol * math.sqrt(spec.dt) * noise.z_flow
        deposit = np.maximum(phi, 0.0) * value
        withdraw = np.minimum(np.maximum(-phi, 0.0) * value, 0.99 * avail_value)
        out_share = avail / np.where(avail_value > 0, avail_value, 1.0)[:, None]
        reserves = (
            reserves + deposit[:, None] * prm.target_weights / p_new - withdraw[:, None] * out_share
        )
        flow = deposit - withdraw
        supply = supply + flow / (value / supply)

        # 6a. Random exits (geometric holding times) settle against the pool.
        leaving = book.is_open & (noise.u_exit * _b(prm.mean_holding) < 1.0)
        book, ex = _settle(book, leaving, pr)
        reserves = reserves + ex["reserve_change"]
        bad_debt = bad_debt + ex["bad_debt"]

        # 6b. New demand: fee elasticity, momentum on the last return, noise traders.
        value = (p_new * reserves).sum(-1) - _unrealised(book, pr)
        sd = prm.vols * math.sqrt(spec.dt)
        z_ret = np.clip(x / np.where(sd > 0, sd, 1.0), -3.0, 3.0)
        elastic = np.exp(-prm.fee_elasticity * prm.fee * spec.steps_per_year)
        tilt = np.exp(prm.momentum[:, None, None] * z_ret[..., None] * SIGN[:, 0])
        nv = prm.noise_vol[:, None, None]
        lv = prm.leverage_vol[:, None, None]
        notional = (
            (prm.open_rate * (value * elastic)[:, None])[..., None]
            * tilt
            * np.exp(nv * noise.z_demand - 0.5 * nv**2)
        )
        lev = prm.leverage[:, None, None] * np.exp(lv * noise.z_leverage - 0.5 * lv**2)

        # 6c. The funding-rate arbitrageur joins the receiving side (eq. 3, 4).
        sizes = _side_sizes(book)
        long_size, short_size = sizes[..., 0], sizes[..., 1]
        growth = pr / pr_old
        want_long = np.maximum(short_size * growth - long_size, 0.0)
        want_short = np.maximum(long_size / growth - short_size, 0.0)
        f = prm.fee[:, None]
        go_long = (gamma < 0) & (f * (long_size + want_long) <= -gamma * short_size)
        go_short = (gamma > 0) & (f * (short_size + want_short) <= gamma * long_size)
        arb = np.stack(
            [np.where(go_long, want_long, 0.0), np.where(go_short, want_short, 0.0)], axis=-1
        )
        arb_on = (prm.arb_leverage > 0)[:, None, None]
        arb_notional = np.where(arb_on, arb * pr[..., None], 0.0)
        arb_lev = np.broadcast_to(prm.arb_leverage[:, None, None], arb.shape)

        # 6d. Collateral condition (eq. 1) and solvency, in request order, market order,
        # long before short; shorts of every market share the numéraire.
        long_used, short_used = _reserved(book)
        cap_long = prm.max_utilisation[:, None] * reserves[:, :r]
        cap_short = prm.max_utilisation * reserves[:, r]
        new_size = np.zeros_like(notional)
        new_margin = np.zeros_like(notional)
        max_lev = prm.max_leverage[:, None, None]
        for req_notional, req_lev in ((notional, lev), (arb_notional, arb_lev)):
            delta = req_notional / pr[..., None]
            wants = req_notional > 0
            ok_all = wants & (req_lev <= max_lev)
            ok_long = ok_all[..., 0] & (long_used + delta[..., 0] <= cap_long)
            long_used = long_used + np.where(ok_long, delta[..., 0], 0.0)
            ok_all[..., 0] = ok_long
            for i in range(r):  # sequential on purpose: each short uses what the last left
                ok = ok_all[:, i, 1] & (short_used + req_notional[:, i, 1] <= cap_short)
                short_used = short_used + np.where(ok, req_notional[:, i, 1], 0.0)
                ok_all[:, i, 1] = ok
            safe_lev = np.where(req_lev > 0, req_lev, 1.0)
            new_size = new_size + np.where(ok_all, delta, 0.0)
            new_margin = new_margin + np.where(ok_all, req_notional / safe_lev, 0.0)
            n_rejected = n_rejected + (wants & ~ok_all).sum((1, 2))

        # 6e. One new cohort per market and side: the first free slot, else merged into the
        # ring's newest cohort (size-weighted entry price, margins added).
        free = ~book.is_open
        any_free = free.any(-1)
        slot = np.where(any_free, free.argmax(-1), book.opened_at.argmax(-1))
        k = np.arange(spec.num_cohorts)
        write = (k == slot[..., None]) & (new_size * pr[:, :, None] >= 1e-12)[..., None]
        merging = write & ~any_free[..., None] & book.is_open
        old_size = np.where(merging, book.size, 0.0)
        size = old_size + new_size[..., None]
        entry = (old_size * book.entry + new_size[..., None] * _b(pr)) / np.where(write, size, 1.0)
        margin = np.where(merging, book.margin, 0.0) + new_margin[..., None]
        leverage = size * entry / np.where(margin > 0, margin, 1.0)
        book = NpBook(
            size=np.where(write, size, book.size),
            entry=np.where(write, entry, book.entry),
            margin=np.where(write, margin, book.margin),
            leverage=np.where(write, leverage, book.leverage),
            opened_at=np.where(write, st.t[:, None, None, None], book.opened_at),
            is_open=book.is_open | write,
        )
        n_open = write.sum((1, 2, 3)).astype(np.float64)
        n_merged = merging.sum((1, 2, 3)).astype(np.float64)

    # Accounting identity and running totals.
    new = NpState(st.t + 1, p_new, reserves, supply, book, dict(st.accounts), garch_h)
    aum_after = aum(new, r)
    terms = inventory + book_move + fees - bad_debt + flow
    violation = np.abs(aum_after - aum_before - terms) / np.maximum(np.abs(aum_before), 1e-30)
    long_tokens, short_value = _reserved(book)
    lent = (long_tokens * pr).sum(-1) + short_value
    acc = new.accounts
    for name, value in (
        ("inventory_pnl", inventory),
        ("book_pnl", book_move),
        ("fees", fees),
        ("bad_debt", bad_debt),
        ("lp_flows", flow),
        ("liquidated_margin", liq["received"]),
        ("exit_received", ex["received"]),
        ("exit_paid", ex["paid"]),
        ("funding_paid", funding),
        ("liquidations", liq["count"]),
        ("exits", ex["count"]),
        ("merged", n_merged),
        ("opened", n_open),
        ("rejected", n_rejected),
        ("utilisation_sum", lent / (p_new * reserves).sum(-1)),
        ("open_interest_sum", (_open(book, book.size) * _b(pr)).sum((1, 2, 3))),
        ("value_sum", aum_after),
    ):
        acc[name] = acc[name] + value
    worse = violation > acc["identity_error"]
    acc["identity_error"] = np.where(worse, violation, acc["identity_error"])
    acc["identity_error_step"] = np.where(worse, st.t, acc["identity_error_step"])
    return new
