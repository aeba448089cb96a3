"""The pdlpjax step vectorised over pools with plain NumPy (float64): the throughput baseline
and, with `per_trade=True`, the per-trade reference of the position book.

What it covers: exactly the features of the per-pool reference `tests/reference.py`, i.e.
- price paths: correlated GBM, Merton jumps with a common crash factor, GARCH(1,1);
- `pool.mode = "pdlp"` with the crowd-bucket book of `/work/checks/book_spec.md` (oracle,
  liquidations of the members past their liquidation price with bad debt, funding between the
  sides at the eq. 2 rate, lending fees, LP deposits and withdrawals, deterministic
  fractional exits, trader demand, the profit-maximising funding-rate arbitrageur, the
  collateral-fraction and capacity-sharing acceptance, and K buckets per market and side that
  merge their cheapest candidate pair when full) and `"passive"` (with optional rebalancing);
- the accounting totals of `ACCOUNT_FIELDS` and the identity check.
Not covered (the loop reference, `tests/reference.py`, covers the first): target-weight
arbitrage (`pool.discount` must be "none"), swap arbitrage, the delta hedge, the bootstrap
path model, antithetic draws, the online return statistics (`SimState.stats`) and the
numerical guard codes. So it does a little less work per step than the JAX step; the
throughput ratios it gives are, if anything, in the baseline's favour.

The book (spec §Buckets). A request on (market, side) is a *crowd* of traders entering at
the step's price p, their margin fractions m uniform on [m̄(1 − w), m̄(1 + w)] (m̄ = 1 /
leverage, w = `leverage_spread`), so their liquidation prices ("keys", long p(1 − m), short
p(1 + m)) are uniform. A bucket holds size δ (tokens), entry notional n = Σ δ p0, margin c,
the half-width a of its members' keys (taken as uniform on [q̄ − a, q̄ + a], mean key
q̄ = (n ∓ c)/δ), a count (crowd-equivalents) and an open flag. Liquidations close the
fraction of members whose key the price crossed; funding and fees are charged per unit of
size (funding at most a bucket's margin, fees uncapped); a fixed fraction 1/mean_holding of
every bucket exits each step.
- merge mode (default): K slots per (market, side), open buckets in ascending order of mean
  key. A crowd takes its place in the order (the buckets up to the first closed slot
  shift); with all K open, the crowd and a bucket, or two neighbouring buckets, with the
  least cost(i, j) = δ_i δ_j / (δ_i + δ_j) · ((q̄_i − q̄_j)² + (a_i − a_j)² +
  (p̄_i − p̄_j)²) (p̄ = n/δ, the mean entry price) merge
  (moments kept).
- `per_trade=True` (`run(..., per_trade=True)`, or `NpSpec.per_trade`): the book never
  merges. It grows (by `GROW` slots) whenever a crowd finds no closed slot, so every accepted
  crowd keeps its own bucket: the per-trade reference the merge mode is measured against
  (`benchmarks/fidelity.py`). Within a crowd the uniform-key assumption is exact: partial
  liquidation leaves a uniform sub-interval, and exits, funding and fees act on every member
  alike.

Every array has a leading pool axis P: books are `(P, r, 2, K)` (market, side, bucket),
prices and reserves `(P, n)` with the numéraire last. There is no per-pool Python loop; the
only Python loops run over the small static axes where the order matters (the solvency check
of shorts, which share the numéraire, goes market by market; the demand crowd is added to the
book before the arbitrageur's).

It consumes the same injected draws as the JAX step: a batched `pdlpjax.StepNoise` (leaves
with a leading pool axis) converted by `noise_from_pdlpjax`. A test
(`tests/test_numpy_vectorised.py`) checks the merge mode against the JAX step on the same
draws to 1e-9, so the baseline is the same model, not a simplified one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "SIGN",
    "ACCOUNT_FIELDS",
    "BOOK_FIELDS",
    "DUST_NOTIONAL",
    "CLOSE_TOLERANCE",
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
    "run",
    "aum",
    "mean_key",
    "liquidate",
    "merge_buckets",
    "state_nbytes",
]

# sign(η): +1 for longs, −1 for shorts; shape (2, 1) broadcasts against (..., 2, K).
SIGN = np.array([1.0, -1.0])[:, None]

# Crowds whose accepted notional is below this (numéraire) are not written to the book.
DUST_NOTIONAL = 1e-12
# A liquidation that would leave less than this fraction of a bucket closes all of it.
CLOSE_TOLERANCE = 1e-6
# Slots the per-trade book adds when a crowd finds none closed.
GROW = 32

# The running totals kept per pool (the same names as `pdlpjax.Accounts` and the reference).
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
    "identity_error",
    "identity_error_step",
)

# The float fields of a bucket (`pdlpjax.market.Book` has these and `is_open`).
BOOK_FIELDS = ("size", "notional", "margin", "spread", "count", "slope")


@dataclass(frozen=True)
class NpSpec:
    """Static settings (mirrors `pdlpjax.SimSpec` plus the path model's name).

    `num_cohorts` is K, the slots per market and side (the initial capacity when
    `per_trade`, which never merges and grows the book instead)."""

    num_risky: int
    num_cohorts: int
    steps_per_year: float
    path_model: str = "gbm"  # gbm | jump | garch
    mode: str = "pdlp"  # pdlp | passive
    rebalance: bool = False
    per_trade: bool = False

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
    leverage_spread: np.ndarray
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
    """All pools' buckets, each field `(P, r, 2, K)` (as `pdlpjax.market.Book`).

    Closed slots hold zeros in every float field."""

    size: np.ndarray  # δ, tokens
    notional: np.ndarray  # n = Σ δ p0, numéraire
    margin: np.ndarray  # c, numéraire (may go slightly negative: charges are not capped)
    spread: np.ndarray  # a, half-width of the members' liquidation prices
    count: np.ndarray  # crowd-equivalents
    slope: np.ndarray  # β: entry price ≈ n/δ + β (key − q̄) over the members (0: one crowd)
    is_open: np.ndarray  # bool


@dataclass
class NpNoise:
    """One step's draws for all pools, float64 with a leading pool axis.

    `path`: gbm/garch `(P, r)` normals; jump: a dict with `z`, `u_jump`, `z_jump` `(P, r)` and
    `u_crash`, `z_crash` `(P,)`.
    """

    path: Any
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


def spec_from_pdlpjax(spec: Any, path_model: str, per_trade: bool = False) -> NpSpec:
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
        per_trade=per_trade,
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
        z_demand=get(noise.z_demand),
        z_leverage=get(noise.z_leverage),
        z_flow=get(noise.z_flow),
    )


def _empty_book(shape: tuple[int, ...]) -> NpBook:
    z = np.zeros(shape)
    return NpBook(z, z, z, z, z, z, np.zeros(shape, bool))


def init_state(spec: NpSpec, prm: NpParams) -> NpState:
    """Reserves at the target weights worth `initial_value`, no positions, share price 1."""
    num_pools = prm.initial_value.shape[0]
    prices = np.concatenate([prm.initial_prices, np.ones((num_pools, 1))], axis=1)
    reserves = prm.target_weights * prm.initial_value[:, None] / prices
    book = _empty_book((num_pools, spec.num_risky, 2, spec.num_cohorts))
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


# --------------------------------------------------------------------------- the book


def _b(x: np.ndarray) -> np.ndarray:
    """A per-pool `(P,)` or per-market `(P, r)` array broadcast against `(P, r, 2, K)`."""
    return x.reshape(x.shape + (1,) * (4 - x.ndim)) if x.ndim == 2 else x[:, None, None, None]


def _safe(x: np.ndarray) -> np.ndarray:
    """x where it is not 0, else 1 (a divisor for masked-out entries)."""
    return np.where(x != 0, x, 1.0)


def mean_key(size, notional, margin, sign=SIGN) -> np.ndarray:
    """Mean liquidation price q̄ of a bucket: long (n − c)/δ, short (n + c)/δ (0 if δ = 0)."""
    return (notional - sign * margin) / _safe(size)


def _pnl(book: NpBook, pr: np.ndarray) -> np.ndarray:
    """Each bucket's unrealised PnL π = sign (δ p − n) (zero where closed: fields are 0)."""
    return SIGN * (book.size * _b(pr) - book.notional)


def _unrealised(book: NpBook, pr: np.ndarray) -> np.ndarray:
    return _pnl(book, pr).sum(axis=(1, 2, 3))


def _reserved(book: NpBook) -> tuple[np.ndarray, np.ndarray]:
    """Long tokens per market `(P, r)` (Σ δ), short numéraire `(P,)` (Σ n)."""
    return book.size[:, :, 0].sum(-1), book.notional[:, :, 1].sum((1, 2))


def _available(reserves: np.ndarray, book: NpBook) -> np.ndarray:
    long_tokens, short_value = _reserved(book)
    return reserves - np.concatenate([long_tokens, short_value[:, None]], axis=1)


def aum(st: NpState, num_risky: int) -> np.ndarray:
    """Pool value per pool: pᵀR − net unrealised trader PnL, `(P,)`."""
    value = (st.prices * st.reserves).sum(-1)
    return value - _unrealised(st.book, st.prices[:, :num_risky])


def _settle(dx: np.ndarray, nx: np.ndarray, cx: np.ndarray, pr: np.ndarray) -> dict:
    """Settle closing chunks (δ_x, n_x, c_x) `(P, r, 2, K)` at prices `pr` (zeros: nothing).

    π = sign (δ_x p − n_x); the pool pays gain = max(π, 0) (a long in tokens, gain/p of them;
    a short in numéraire), takes c − max(π + c, 0) + gain from the margin, and absorbs
    bad = max(−(π + c), 0)."""
    pi = SIGN * (dx * _b(pr) - nx)
    gain = np.maximum(pi, 0.0)
    equity = pi + cx
    taken = cx - np.maximum(equity, 0.0) + gain
    bad = np.maximum(-equity, 0.0)
    received = taken.sum((1, 2, 3))
    short_paid = gain[:, :, 1].sum((1, 2))
    change = np.concatenate([-gain[:, :, 0].sum(-1) / pr, (received - short_paid)[:, None]], axis=1)
    return {
        "reserve_change": change,
        "received": received,
        "paid": gain.sum((1, 2, 3)),
        "bad_debt": bad.sum((1, 2, 3)),
    }


def liquidate(
    size, notional, margin, spread, is_open, x, sign=SIGN, slope=0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The liquidated fraction φ of each bucket at price `x` (broadcast against the book) and
    the liquidated chunk (δ_L, n_L, c_L) (spec §Step order 1).

    Members' keys are uniform on [q̄ − a, q̄ + a]; a long member is liquidated when x ≤ its
    key, a short when x ≥ it: long φ = clip((q̄ + a − x) / 2a, 0, 1), short φ = clip((x − q̄ + a)
    / 2a, 0, 1) (a = 0: all or nothing). φ > 1 − 1e-6 closes the bucket (φ = 1, with its whole
    margin). Otherwise, with μ the mean key of the liquidated members, their entry notional is
    n_L = δ_L (n/δ + β (μ − q̄)) (β the slope; within [0, n]) and their margin: long
    n_L − δ_L μ, short δ_L μ − n_L."""
    q = mean_key(size, notional, margin, sign)
    a = spread
    wide = a > 0
    two_a = np.where(wide, 2.0 * a, 1.0)
    is_long = sign > 0
    frac = np.where(is_long, q + a - x, x - q + a) / two_a
    edge = np.where(is_long, q >= x, q <= x).astype(np.float64)
    phi = np.where(wide, np.clip(frac, 0.0, 1.0), edge)
    phi = np.where(is_open, phi, 0.0)
    phi = np.where(is_open & (1.0 - phi < CLOSE_TOLERANCE), 1.0, phi)
    mu = np.where(
        is_long, (np.maximum(x, q - a) + q + a) / 2.0, (q - a + np.minimum(x, q + a)) / 2.0
    )
    d_l = phi * size
    n_l = np.clip(phi * notional + d_l * slope * (mu - q), 0.0, notional)  # as the engine
    c_l = np.where(is_long, n_l - d_l * mu, d_l * mu - n_l)
    # A bucket closed whole gives its whole notional and margin (where φ was rounded up to 1,
    # μ from the price would leave a sliver behind), as the engine and the loop reference do.
    whole = (phi >= 1.0) | ~wide
    n_l = np.where(whole, phi * notional, n_l)
    c_l = np.where(phi >= 1.0, margin, c_l)
    return phi, d_l, n_l, c_l


def merge_buckets(b1: dict, b2: dict, sign) -> dict:
    """Merge two buckets (dicts of `BOOK_FIELDS`): δ, n, c and count add; the keys' mean is
    the size-weighted mean and their variance (a²/3 for a uniform) the mixture's variance,
    a = √(3 v)."""
    d1, d2 = b1["size"], b2["size"]
    d = d1 + d2
    q1 = mean_key(d1, b1["notional"], b1["margin"], sign)
    q2 = mean_key(d2, b2["notional"], b2["margin"], sign)
    sd = _safe(d)
    v1, v2 = b1["spread"] ** 2 / 3.0, b2["spread"] ** 2 / 3.0
    v = (d1 * v1 + d2 * v2) / sd + d1 * d2 * (q1 - q2) ** 2 / (sd * sd)
    # The slope of entry price on key: the mixture's covariance over its variance.
    p1, p2 = b1["notional"] / _safe(d1), b2["notional"] / _safe(d2)
    cov = (d1 * b1["slope"] * v1 + d2 * b2["slope"] * v2) / sd + d1 * d2 * (q1 - q2) * (p1 - p2) / (
        sd * sd
    )
    return {
        "size": d,
        "notional": b1["notional"] + b2["notional"],
        "margin": b1["margin"] + b2["margin"],
        "spread": np.sqrt(3.0 * v),
        "count": b1["count"] + b2["count"],
        "slope": np.where(v > 0, cov / np.where(v > 0, v, 1.0), 0.0),
    }


def _grow(book: NpBook, extra: int) -> NpBook:
    """The book with `extra` closed slots appended to every row (per-trade mode)."""
    pad = [(0, 0)] * 3 + [(0, extra)]
    return NpBook(*(np.pad(getattr(book, f.name), pad) for f in dataclasses.fields(NpBook)))


def _shifted(x: np.ndarray, step: int, fill) -> np.ndarray:
    """x[..., j − step] at slot j (step ±1; `fill` where that runs off the end)."""
    out = np.full_like(x, fill)
    if step > 0:
        out[..., 1:] = x[..., :-1]
    else:
        out[..., :-1] = x[..., 1:]
    return out


def _pair_cost(b1: dict, b2: dict, sign) -> np.ndarray:
    """δ_1 δ_2 / (δ_1 + δ_2) · ((q̄_1 − q̄_2)² + (a_1 − a_2)² + (p̄_1 − p̄_2)²), p̄ = n/δ."""
    d1, d2 = b1["size"], b2["size"]
    q1 = mean_key(d1, b1["notional"], b1["margin"], sign)
    q2 = mean_key(d2, b2["notional"], b2["margin"], sign)
    e1, e2 = b1["notional"] / _safe(d1), b2["notional"] / _safe(d2)
    gaps = (q1 - q2) ** 2 + (b1["spread"] - b2["spread"]) ** 2 + (e1 - e2) ** 2
    return d1 * d2 / _safe(d1 + d2) * gaps


def _into_hole(x: np.ndarray, c: np.ndarray, place: np.ndarray, hole: np.ndarray, fill):
    """`c` at its place in order, into slot `hole`: the slots between shift one towards the
    hole, and `c` takes `place` (hole ≥ place) or `place − 1` (hole < place)."""
    slots = np.arange(x.shape[-1])
    right = hole >= place
    from_left = right & (slots > place) & (slots <= hole)  # takes x[j − 1]
    from_right = ~right & (slots >= hole) & (slots < place - 1)  # takes x[j + 1]
    moved = np.where(
        from_left, _shifted(x, 1, fill), np.where(from_right, _shifted(x, -1, fill), x)
    )
    return np.where(np.where(right, slots == place, slots == place - 1), c[..., None], moved)


def _first_above(keys: np.ndarray, is_open: np.ndarray, key: np.ndarray) -> np.ndarray:
    """The first open slot whose key exceeds `key` (the number of slots if none)."""
    slots = np.arange(keys.shape[-1])
    return np.where(is_open & (keys > key[..., None]), slots, keys.shape[-1]).min(-1)[..., None]


def _insert(
    book: NpBook, crowd: dict, write: np.ndarray, per_trade: bool
) -> tuple[NpBook, np.ndarray]:
    """Add one crowd per (pool, market, side) where `write` (spec §Step order 6), keeping the
    open buckets in ascending order of mean key.

    With a closed slot, the crowd's place p is the first open slot whose key exceeds its own
    (K if none); the buckets between p and the first closed slot h shift one slot towards h
    and the crowd takes p (h ≥ p) or p − 1 (h < p). With all K open, the cheapest (first
    minimum) of these candidates merges, cost δ_i δ_j / (δ_i + δ_j) · ((q̄_i − q̄_j)² +
    (a_i − a_j)² + (p̄_i − p̄_j)²) (p̄ = n/δ): the crowd with bucket j (j = 0..K−1, into slot
    j), then neighbours j, j + 1 (j = 0..K−2, into slot j; the rest close up and the crowd
    takes its place in the K − 1 buckets left).
    `per_trade`: never merge; grow the book instead.
    **Returns:** the book and the merges per pool."""
    if per_trade and np.any(write & ~(~book.is_open).any(-1)):
        book = _grow(book, GROW)
    closed = ~book.is_open
    any_closed = closed.any(-1)
    k = book.size.shape[-1]
    slots = np.arange(k)
    sign = SIGN[None, None, :, 0]  # (1, 1, 2) against (P, r, 2)
    fields = {f: getattr(book, f) for f in BOOK_FIELDS}
    keys = mean_key(book.size, book.notional, book.margin, sign[..., None])
    crowd_key = mean_key(crowd["size"], crowd["notional"], crowd["margin"], sign)
    place = _first_above(keys, book.is_open, crowd_key)
    hole = closed.argmax(-1)[..., None]
    placing = (write & any_closed)[..., None]
    full = write & ~any_closed
    out = {}
    for f in BOOK_FIELDS + ("is_open",):
        x = book.is_open if f == "is_open" else fields[f]
        c = np.ones(write.shape, bool) if f == "is_open" else crowd[f]
        fill = False if f == "is_open" else 0.0
        out[f] = np.where(placing, _into_hole(x, c, place, hole, fill), x)
    merged = np.zeros(book.size.shape[0])
    if np.any(full):
        s3 = sign[..., None]
        one = {f: crowd[f][..., None] for f in BOOK_FIELDS}
        left = {f: fields[f][..., :-1] for f in BOOK_FIELDS}
        right_ = {f: fields[f][..., 1:] for f in BOOK_FIELDS}
        cost = np.concatenate([_pair_cost(fields, one, s3), _pair_cost(left, right_, s3)], -1)
        best = cost.argmin(-1)[..., None]
        joins = best < k
        j = best - k
        with_crowd = merge_buckets(fields, one, s3)
        pairs = merge_buckets(left, right_, s3)
        closed_up = {
            f: np.where(
                slots < j,
                fields[f],
                np.where(
                    slots == j,
                    np.concatenate([pairs[f], pairs[f][..., :1]], -1),
                    _shifted(fields[f], -1, 0.0),
                ),
            )
            for f in BOOK_FIELDS
        }
        rest_open = np.broadcast_to(slots < k - 1, keys.shape)
        rest_keys = mean_key(closed_up["size"], closed_up["notional"], closed_up["margin"], s3)
        rest_place = _first_above(rest_keys, rest_open, crowd_key)
        last = np.full_like(rest_place, k - 1)
        at_full = full[..., None]
        for f in BOOK_FIELDS:
            joined = np.where(slots == best, with_crowd[f], fields[f])
            inserted = _into_hole(closed_up[f], crowd[f], rest_place, last, 0.0)
            out[f] = np.where(at_full, np.where(joins, joined, inserted), out[f])
        merged = full.sum((1, 2)).astype(np.float64)
    return NpBook(**{f: out[f] for f in BOOK_FIELDS}, is_open=out["is_open"]), merged


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


def _crowds(
    notional: np.ndarray, lev: np.ndarray, prm: NpParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Collateral check (eq. 1) of crowds `(P, r, 2)`: the fraction a_c of members with
    leverage ≤ η_max (margin fraction m ≥ m_min = 1/η_max) and the kept members' margin
    fractions [m_lo, m_hi]."""
    mbar = 1.0 / np.where(lev > 0, lev, 1.0)
    w = prm.leverage_spread[:, None, None]
    m_min = (1.0 / prm.max_leverage)[:, None, None]
    m_hi = mbar * (1.0 + w)
    spread = np.where(w > 0, (m_hi - m_min) / _safe(2.0 * w * mbar), 0.0)
    a_c = np.where(w > 0, np.clip(spread, 0.0, 1.0), (mbar >= m_min).astype(np.float64))
    m_lo = np.maximum(mbar * (1.0 - w), m_min)
    return a_c, m_lo, m_hi


def _use(used: np.ndarray, ask: np.ndarray, share: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """What is lent after accepting `share` of `ask`: used + ask · share, except that a
    request cut short (share < 1) leaves the cap exactly full, max(used, cap), which is the
    same in exact arithmetic. used + headroom would leave a rounding residue of about 1e-16 of
    the cap that the next request would take as a crowd of ~1e-11 numéraire (above
    `DUST_NOTIONAL`), written or not depending on the last bit."""
    return np.where((ask > 0) & (share < 1.0), np.maximum(used, cap), used + ask * share)


def _arbitrage(
    sizes: np.ndarray, gamma: np.ndarray, pr: np.ndarray, pr_old: np.ndarray, fee: np.ndarray
) -> np.ndarray:
    """The funding arbitrageur's size per market and side `(P, r, 2)`, sized for profit (spec
    §The funding arbitrageur): with shorts paying it opens a long of clip(√(|γ| S L / f) − L,
    0, S p/p0 − L); with longs paying a short of clip(√(γ L S / f) − S, 0, L p0/p − S)."""
    long_size, short_size = sizes[..., 0], sizes[..., 1]
    ratio = pr / pr_old
    want_long = np.maximum(short_size * ratio - long_size, 0.0)
    want_short = np.maximum(long_size / ratio - short_size, 0.0)
    f = fee[:, None]
    has_fee = f > 0
    best = np.sqrt(np.abs(gamma) * short_size * long_size / np.where(has_fee, f, 1.0))
    best_long = np.where(has_fee, best - long_size, np.inf)
    best_short = np.where(has_fee, best - short_size, np.inf)
    arb_long = np.where(gamma < 0, np.clip(best_long, 0.0, want_long), 0.0)
    arb_short = np.where(gamma > 0, np.clip(best_short, 0.0, want_short), 0.0)
    return np.stack([arb_long, arb_short], axis=-1)


def step(st: NpState, prm: NpParams, spec: NpSpec, noise: NpNoise) -> NpState:
    """Advance every pool by one step with the given draws (returns a new state).

    The order is that of `pdlpjax.simulate.step` restricted to the covered features (module
    docstring): oracle, liquidations, funding, lending fees, LP flows, exits, new demand and
    the funding arbitrageur, acceptance, the crowds added to the book, accounts.
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
    n_liq = liq_notional = n_exits = zero
    liq = ex = {k: zero for k in ("received", "paid", "bad_debt")}

    if spec.mode == "passive":
        if spec.rebalance:
            before = (p_new * reserves).sum(-1)
            reserves = prm.target_weights * before[:, None] / p_new
            inventory = inventory + (p_new * reserves).sum(-1) - before
    else:
        xb = _b(pr)
        # 2. Liquidations: the members whose liquidation price the new price crossed.
        phi, d_l, n_l, c_l = liquidate(
            book.size, book.notional, book.margin, book.spread, book.is_open, xb, slope=book.slope
        )
        liq = _settle(d_l, n_l, c_l, pr)
        reserves = reserves + liq["reserve_change"]
        bad_debt = liq["bad_debt"]
        n_liq = (phi * book.count).sum((1, 2, 3))
        liq_notional = (d_l * xb).sum((1, 2, 3))
        shut = phi >= 1.0
        keep = np.where(shut, 0.0, 1.0 - phi)
        book = NpBook(
            size=book.size * keep,
            notional=np.where(shut, 0.0, book.notional - n_l),
            margin=np.where(shut, 0.0, book.margin - c_l),
            spread=book.spread * keep,
            count=book.count * keep,
            slope=np.where(shut, 0.0, book.slope),
            is_open=book.is_open & ~shut,
        )

        # 3. Funding γ = κ (L/S − p/p0), clipped, zero when a side is empty; γ > 0 longs pay
        # |γ| δ p per bucket (at most its margin), shared by the receivers pro rata.
        sizes = book.size.sum(-1)  # (P, r, 2)
        long_size, short_size = sizes[..., 0], sizes[..., 1]
        both = (long_size > 0) & (short_size > 0)
        ratio = long_size / np.where(short_size > 0, short_size, 1.0)
        cap = prm.funding_cap[:, None]
        gamma = prm.funding_kappa[:, None] * (ratio - pr / pr_old)
        gamma = np.where(both, np.clip(gamma, -cap, cap), 0.0)
        payer = np.where(gamma > 0, 0, 1)[..., None, None]  # (P, r, 1, 1)
        side = np.arange(2)[:, None]
        is_payer = side == payer
        owed = _b(np.abs(gamma)) * book.size * xb
        paid = np.where(is_payer, np.minimum(owed, np.maximum(book.margin, 0.0)), 0.0)
        recv = np.where(is_payer, 0.0, book.size)
        recv_size = recv.sum((2, 3))
        has_recv = recv_size > 0
        total = np.where(has_recv, paid.sum((2, 3)), 0.0)
        paid = np.where(has_recv[..., None, None], paid, 0.0)
        share = recv / _b(np.where(has_recv, recv_size, 1.0))
        margin = book.margin - paid + share * _b(total)
        funding = total.sum(-1)

        # 4. Lending fee f on what each bucket borrows (long δ p, short n), from its margin,
        # at most all of it.
        borrowed = np.concatenate([book.size[:, :, :1] * xb, book.notional[:, :, 1:]], axis=2)
        due = np.minimum(_b(prm.fee) * borrowed, np.maximum(margin, 0.0))  # at most c
        book = dataclasses.replace(book, margin=margin - due)
        fees = due.sum((1, 2, 3))
        reserves = reserves + np.concatenate([np.zeros_like(x), fees[:, None]], axis=1)

        # 5. LP deposits (target weights) and withdrawals (from R^A, ≤ 99%) at the share price.
        value = (p_new * reserves).sum(-1) - _unrealised(book, pr)
        avail = np.maximum(_available(reserves, book), 0.0)
        avail_value = (p_new * avail).sum(-1)
        phi_flow = prm.lp_flow_drift * spec.dt + prm.lp_flow_vol * math.sqrt(spec.dt) * noise.z_flow
        deposit = np.maximum(phi_flow, 0.0) * value
        withdraw = np.minimum(np.maximum(-phi_flow, 0.0) * value, 0.99 * avail_value)
        out_share = avail / np.where(avail_value > 0, avail_value, 1.0)[:, None]
        reserves = (
            reserves + deposit[:, None] * prm.target_weights / p_new - withdraw[:, None] * out_share
        )
        flow = deposit - withdraw
        supply = supply + flow / (value / supply)

        # 6a. Exits: the fraction h = 1/mean_holding of every bucket leaves (no draws).
        h = _b(np.clip(1.0 / prm.mean_holding, 0.0, 1.0))
        ex = _settle(h * book.size, h * book.notional, h * book.margin, pr)
        reserves = reserves + ex["reserve_change"]
        bad_debt = bad_debt + ex["bad_debt"]
        n_exits = (h * book.count).sum((1, 2, 3))
        stay = 1.0 - h
        gone = book.is_open & (stay <= 0.0)  # mean_holding = 1: everyone leaves
        book = NpBook(
            size=book.size * stay,
            notional=book.notional * stay,
            margin=book.margin * stay,
            spread=np.where(gone, 0.0, book.spread),
            count=book.count * stay,
            slope=np.where(gone, 0.0, book.slope),
            is_open=book.is_open & ~gone,
        )

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

        # 6c. The funding-rate arbitrageur joins the receiving side, sized for profit.
        arb = _arbitrage(book.size.sum(-1), gamma, pr, pr_old, prm.fee)
        arb_on = (prm.arb_leverage > 0)[:, None, None]
        arb_notional = np.where(arb_on, arb * pr[..., None], 0.0)
        arb_lev = np.broadcast_to(prm.arb_leverage[:, None, None], arb.shape)

        # 6d. Collateral fraction (eq. 1) and capacity shares (solvency), in request order,
        # market order, long before short; shorts of every market share the numéraire.
        long_used, short_used = _reserved(book)
        cap_long = prm.max_utilisation[:, None] * reserves[:, :r]
        cap_short = prm.max_utilisation * reserves[:, r]
        accepted = []
        for req_notional, req_lev in ((notional, lev), (arb_notional, arb_lev)):
            a_c, m_lo, m_hi = _crowds(req_notional, req_lev, prm)
            kept = req_notional * a_c
            a_s = np.zeros_like(kept)
            ask = kept[..., 0] / pr
            head = np.maximum(cap_long - long_used, 0.0)
            a_s[..., 0] = np.where(ask > 0, np.clip(head / _safe(ask), 0.0, 1.0), 0.0)
            long_used = _use(long_used, ask, a_s[..., 0], cap_long)
            for i in range(r):  # sequential on purpose: each short uses what the last left
                ask = kept[:, i, 1]
                head = np.maximum(cap_short - short_used, 0.0)
                a_s[:, i, 1] = np.where(ask > 0, np.clip(head / _safe(ask), 0.0, 1.0), 0.0)
                short_used = _use(short_used, ask, a_s[:, i, 1], cap_short)
            took = kept * a_s
            n_rejected = n_rejected + np.where(req_notional > 0, 1.0 - a_c * a_s, 0.0).sum((1, 2))
            prc = pr[..., None]
            crowd = {
                "size": took / prc,
                "notional": took,
                "margin": took * (m_lo + m_hi) / 2.0,
                "spread": prc * (m_hi - m_lo) / 2.0,
                "count": a_c * a_s,
                "slope": np.zeros_like(took),  # one entry price
            }
            accepted.append((crowd, took >= DUST_NOTIONAL))

        # 6e. The crowds join the book, the demand crowd first, then the arbitrageur's.
        for crowd, write in accepted:
            book, merges = _insert(book, crowd, write, spec.per_trade)
            n_open = n_open + write.sum((1, 2)).astype(np.float64)
            n_merged = n_merged + merges

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
        ("liquidated_notional", liq_notional),
        ("exit_received", ex["received"]),
        ("exit_paid", ex["paid"]),
        ("funding_paid", funding),
        ("liquidations", n_liq),
        ("exits", n_exits),
        ("merged", n_merged),
        ("opened", n_open),
        ("rejected", n_rejected),
        ("utilisation_sum", lent / (p_new * reserves).sum(-1)),
        ("open_interest_sum", (book.size * _b(pr)).sum((1, 2, 3))),
        ("value_sum", aum_after),
    ):
        acc[name] = acc[name] + value
    worse = violation > acc["identity_error"]
    acc["identity_error"] = np.where(worse, violation, acc["identity_error"])
    acc["identity_error_step"] = np.where(worse, st.t, acc["identity_error_step"])
    return new


def run(
    spec: NpSpec,
    prm: NpParams,
    noise: Callable[[int], NpNoise] | Sequence[NpNoise],
    num_steps: int,
    *,
    per_trade: bool = False,
    state: NpState | None = None,
) -> NpState:
    """Run `num_steps` steps from `state` (default: `init_state`) with step t's draws
    `noise(t)` (or `noise[t]`). `per_trade=True`: the book never merges (every accepted crowd
    keeps its own bucket; the book grows as needed), the per-trade reference."""
    if per_trade:
        spec = dataclasses.replace(spec, per_trade=True)
    st = init_state(spec, prm) if state is None else state
    draw = noise if callable(noise) else noise.__getitem__
    for t in range(num_steps):
        st = step(st, prm, spec, draw(t))
    return st
