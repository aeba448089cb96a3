"""The perpetuals exchange: the position book, liquidation, funding, lending fees, trader flow.

**Crowds.** A trade request on one market and side (Chitra et al. §2.1: a trade is
(c, δ, η, p0)) is a *crowd* of traders who enter at the same price p0 with margin fractions
m = c/(δ p0) spread uniformly on [m̄(1 − w), m̄(1 + w)] around m̄ = 1/η (w =
`leverage_spread`). A member's liquidation price ("key") is q = p0(1 − m) for a long,
p0(1 + m) for a short, so a crowd's keys are uniform on an interval.

**Buckets.** The book holds, per risky market and side (0 long, 1 short), K buckets. A bucket
carries its members' summed size δ (tokens), entry notional n = Σ δ p0, margin c, the
half-width a of their keys (taken as uniform on [q̄ − a, q̄ + a]; the mean key q̄ = (n − c)/δ
for longs, (n + c)/δ for shorts, is carried by the sums) and a count of crowd-equivalents.
One crowd is represented exactly:
- fees and funding move every member's margin by the same amount per token, so they shift
  the keys together;
- exits take the same fraction 1/mean_holding of every member (the expected exits of a crowd);
- a price crossing into the keys liquidates the members beyond it, and the rest stays
  uniform.
So liquidations are partial, continuous in the price and in every parameter: the pathwise
gradient needs no relaxation. Only merging is an approximation. The buckets of a side are
kept in ascending order of mean key, so the book is an adaptive histogram over liquidation
prices; when all K are open, the new crowd joins the bucket, or two neighbouring buckets
merge, whichever is nearest in key, spread and entry price (a Ward-style cost), and the
merged bucket keeps the pair's mean key, key variance and the slope of entry price on key.
Adding a crowd costs O(K).

The pool is every trader's counterparty (GMX/JLP style). What a position borrows is what the
pool *reserves* for it: a long reserves δ tokens of its asset (its profit δ(p − p0)/p tokens
never exceeds them), a short reserves n = δ p0 numéraire (its profit δ(p0 − p) never exceeds
it). So settling a profit never makes a reserve negative, and the solvency requirement is
reserved ≤ `max_utilisation` · R per asset (R^A = R − reserved ≥ 0).

All functions are pure and unbatched; shapes use r = risky markets, K = buckets per side.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Float

from ._numerics import fixed_sum

__all__ = [
    "MarketParams",
    "Book",
    "Crowd",
    "Settlement",
    "SIGN",
    "DUST_NOTIONAL",
    "empty_book",
    "side_sizes",
    "reserved",
    "mean_key",
    "pnl",
    "unrealised_pnl",
    "open_interest",
    "liquidation_fraction",
    "liquidate",
    "leave",
    "settle_chunk",
    "funding_rate",
    "pay_funding",
    "charge_fees",
    "funding_arbitrage",
    "trader_demand",
    "accept_trades",
    "add_crowd",
]

# Accepted crowds below this notional (numéraire) are not written (see `add_crowd`).
DUST_NOTIONAL = 1e-12

# A liquidation that leaves less than this fraction of a bucket closes it whole: dust would
# hold a slot, and its size, squared in the gradient, underflows (0 · inf = NaN).
CLOSE_BELOW = 1e-6

# +1 for longs, −1 for shorts: sign(η).
SIGN = jnp.array([1.0, -1.0])


class MarketParams(eqx.Module):
    """`[market]` dynamic params of one pool (see the config reference for units)."""

    initial_prices: Float[Array, " r"]
    funding_kappa: Float[Array, ""]  # κ of eq. 2, per step
    funding_cap: Float[Array, ""]  # |γ_L| ≤ cap, per step
    open_rate: Float[Array, " r"]  # new notional per step and side, fraction of pool value
    mean_holding: Float[Array, ""]  # steps; the fraction 1/mean_holding of the book leaves
    leverage: Float[Array, ""]  # median leverage of new crowds
    leverage_vol: Float[Array, ""]  # sd of log leverage, crowd to crowd
    leverage_spread: Float[Array, ""]  # w: margin fractions within a crowd on m̄(1 ± w)
    max_leverage: Float[Array, ""]  # collateral condition (eq. 1): p0 δ ≤ η_max c
    fee_elasticity: Float[Array, ""]  # demand × exp(−elasticity · annualised fee)
    momentum: Float[Array, ""]  # demand tilt per sd of last return
    noise_vol: Float[Array, ""]  # sd of log demand of noise traders
    arb_leverage: Float[Array, ""]  # leverage of the funding-rate arbitrageur (0: none)


class Book(eqx.Module):
    """Open positions of one pool, shape `(r, 2, K)` (market, side, bucket)."""

    size: Float[Array, "r 2 k"]  # δ, tokens
    notional: Float[Array, "r 2 k"]  # n = Σ δ p0, numéraire
    margin: Float[Array, "r 2 k"]  # c, numéraire
    spread: Float[Array, "r 2 k"]  # a: keys uniform on [q̄ − a, q̄ + a], price units
    count: Float[Array, "r 2 k"]  # crowd-equivalents (1 per crowd, shrinking as it leaves)
    # β: the members' entry price against their key, p0 ≈ n/δ + β (q − q̄) (the least-squares
    # line; 0 for one crowd, which entered at one price). Merging crowds that entered at
    # different prices makes it non-zero; liquidation takes the crossed keys' entry notional.
    slope: Float[Array, "r 2 k"]
    is_open: Bool[Array, "r 2 k"]


def empty_book(num_risky: int, num_buckets: int, dtype) -> Book:
    """A book with no open positions."""
    z = jnp.zeros((num_risky, 2, num_buckets), dtype)
    return Book(z, z, z, z, z, z, jnp.zeros(z.shape, bool))


def _open(book: Book, x: Array) -> Array:
    return jnp.where(book.is_open, x, 0.0)


def _safe(x: Array, ok: Array) -> Array:
    """`x` where `ok`, else 1: a divisor whose masked-out lanes keep gradients finite."""
    return jnp.where(ok, x, 1.0)


def side_sizes(book: Book) -> Float[Array, "r 2"]:
    """Open size per market and side: (L, S) in tokens."""
    return fixed_sum(_open(book, book.size), axis=-1)


def reserved(book: Book) -> tuple[Float[Array, " r"], Float[Array, ""]]:
    """What the book borrows from the pool: long tokens per market, short numéraire in total."""
    long_tokens = fixed_sum(_open(book, book.size)[:, 0], axis=-1)
    short_value = fixed_sum(_open(book, book.notional)[:, 1])
    return long_tokens, short_value


def mean_key(book: Book) -> Float[Array, "r 2 k"]:
    """Each bucket's mean liquidation price q̄: (n − c)/δ for longs, (n + c)/δ for shorts."""
    signed = book.notional - SIGN[None, :, None] * book.margin
    return signed / _safe(book.size, book.is_open & (book.size > 0))


def pnl(book: Book, prices: Float[Array, " r"]) -> Float[Array, "r 2 k"]:
    """Each bucket's unrealised PnL sign(η) (δ p − n) (zero where closed)."""
    return _open(book, SIGN[None, :, None] * (book.size * prices[:, None, None] - book.notional))


def unrealised_pnl(book: Book, prices: Float[Array, " r"]) -> Float[Array, ""]:
    """Net unrealised trader PnL: what the pool would owe if every position closed now."""
    return fixed_sum(pnl(book, prices))


def open_interest(book: Book, prices: Float[Array, " r"]) -> Float[Array, ""]:
    """Notional of all open positions, Σ δ p (longs and shorts)."""
    return fixed_sum(_open(book, book.size) * prices[:, None, None])


def liquidation_fraction(book: Book, prices: Float[Array, " r"]) -> Float[Array, "r 2 k"]:
    """The fraction φ of each bucket whose members meet the liquidation condition
    sign(η) δ (p0 − p) ≥ c (§2.1) at `prices`: the keys at or beyond p.

    Long: φ = clip((q̄ + a − p)/(2a), 0, 1); short: clip((p − q̄ + a)/(2a), 0, 1); a bucket
    without spread is liquidated whole or not at all. A remainder below `CLOSE_BELOW` is
    liquidated with it.
    """
    x = prices[:, None, None]
    q = mean_key(book)
    a = book.spread
    spread = a > 0
    half = _safe(2.0 * a, spread)
    beyond = SIGN[None, :, None] * (q - x)  # > 0: the mean key is crossed
    frac = jnp.where(spread, jnp.clip((beyond + a) / half, 0.0, 1.0), (beyond >= 0).astype(x.dtype))
    frac = jnp.where(frac > 1.0 - CLOSE_BELOW, 1.0, frac)
    return jnp.where(book.is_open, frac, 0.0)


class Settlement(eqx.Module):
    """The pool's side of closing part of the book at the current prices."""

    book: Book  # what remains
    reserve_change: Float[Array, " n"]  # tokens per asset, numéraire last
    received: Float[Array, ""]  # value the pool took from traders' margins
    paid: Float[Array, ""]  # value the pool paid to traders in profit (≥ 0)
    bad_debt: Float[Array, ""]  # losses beyond the margin, absorbed by the pool (≥ 0)
    count: Float[Array, ""]  # crowd-equivalents closed
    notional: Float[Array, ""]  # Σ δ p of what closed, at the current prices


def settle_chunk(
    size: Float[Array, "r 2 k"],
    notional: Float[Array, "r 2 k"],
    margin: Float[Array, "r 2 k"],
    prices: Float[Array, " r"],
) -> tuple[Float[Array, " n"], Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
    """Close positions (δ, n, c) against the pool at `prices` (zero where nothing closes).

    With PnL π = sign(η)(δ p − n) and equity π + c, the trader leaves with max(π + c, 0). The
    pool pays gain = max(π, 0) (a long in tokens of its asset, gain/p of them; a short in
    numéraire), takes c − max(π + c, 0) + gain in numéraire (min(−π, c) for a loss within a
    non-negative margin) and absorbs bad debt max(−(π + c), 0).
    **Returns:** the reserve change (tokens per asset, numéraire last), received, paid, bad
    debt.
    """
    p = SIGN[None, :, None] * (size * prices[:, None, None] - notional)
    gain = jnp.maximum(p, 0.0)
    taken = margin - jnp.maximum(p + margin, 0.0) + gain
    bad = jnp.maximum(-(p + margin), 0.0)
    long_tokens_paid = fixed_sum(gain[:, 0], axis=-1) / prices
    numeraire_in = fixed_sum(taken) - fixed_sum(gain[:, 1])
    change = jnp.concatenate([-long_tokens_paid, numeraire_in[None]])
    return change, fixed_sum(taken), fixed_sum(gain), fixed_sum(bad)


def _close(
    book: Book,
    frac: Array,
    chunk_notional: Array,
    chunk_margin: Array,
    keep_spread: Array,
    prices: Array,
) -> Settlement:
    """Close the fraction `frac` of each bucket (entry notional `chunk_notional` and margin
    `chunk_margin` go with it); the rest keeps spread `keep_spread` and its slope."""
    frac = jnp.where(book.is_open, frac, 0.0)
    size = book.size * frac
    notional = jnp.where(book.is_open, chunk_notional, 0.0)
    chunk_margin = jnp.where(book.is_open, chunk_margin, 0.0)
    change, received, paid, bad = settle_chunk(size, notional, chunk_margin, prices)
    keep = 1.0 - frac
    still = book.is_open & (frac < 1.0)
    after = Book(
        size=jnp.where(still, book.size * keep, 0.0),
        notional=jnp.where(still, book.notional - notional, 0.0),
        margin=jnp.where(still, book.margin - chunk_margin, 0.0),
        spread=jnp.where(still, keep_spread, 0.0),
        count=jnp.where(still, book.count * keep, 0.0),
        slope=jnp.where(still, book.slope, 0.0),
        is_open=still,
    )
    return Settlement(
        book=after,
        reserve_change=change,
        received=received,
        paid=paid,
        bad_debt=bad,
        count=fixed_sum(book.count * frac),
        notional=fixed_sum(size * prices[:, None, None]),
    )


def liquidate(book: Book, prices: Float[Array, " r"]) -> Settlement:
    """Liquidate the members whose keys the prices reached (§2.1, Appendix A step 2).

    The liquidated members' keys are uniform on the crossed end of [q̄ − a, q̄ + a], with
    mean μ. Their entry notional is n_L = δ_L (n/δ + β (μ − q̄)), within [0, n] (slope β: in a
    merged bucket the crossed keys belong to crowds that entered at other prices), their
    margin n_L − δ_L μ (long) or δ_L μ − n_L (short), so each one's loss beyond its margin,
    sign(η)(μ − p) per token, is bad debt. The rest keeps keys uniform on the uncrossed part:
    mean q̄ ∓ aφ, half-width a(1 − φ), and the same slope.
    """
    frac = liquidation_fraction(book, prices)
    x = prices[:, None, None]
    q, a = mean_key(book), book.spread
    long_mu = 0.5 * (jnp.maximum(x, q - a) + q + a)
    short_mu = 0.5 * (q - a + jnp.minimum(x, q + a))
    mu = jnp.stack([long_mu[:, 0], short_mu[:, 1]], axis=1)
    size = book.size * frac
    # The line can leave [0, n] only for a bucket merged from far-apart entry prices; a
    # chunk's notional outside it would leave a negative one behind.
    notional = jnp.clip(book.notional * frac + size * book.slope * (mu - q), 0.0, book.notional)
    margin = SIGN[None, :, None] * (notional - size * mu)
    # A bucket closed whole gives its whole notional and margin: where φ was rounded up to 1
    # the formulas would use the price and leave a sliver behind. Without spread it is the
    # same.
    whole = (frac >= 1.0) | (a <= 0)
    notional = jnp.where(whole, book.notional * frac, notional)
    margin = jnp.where(whole, book.margin * frac, margin)
    return _close(book, frac, notional, margin, a * (1.0 - frac), prices)


def leave(book: Book, fraction: Float[Array, ""], prices: Float[Array, " r"]) -> Settlement:
    """Exits: the same fraction of every member of every bucket closes at `prices` (the
    expected exits of a crowd whose traders each leave with probability `fraction` per step).
    Keys and spreads are unchanged."""
    frac = jnp.broadcast_to(fraction, book.size.shape)
    return _close(book, frac, book.notional * frac, book.margin * frac, book.spread, prices)


def funding_rate(
    sizes: Float[Array, "r 2"],
    p_new: Float[Array, " r"],
    p_old: Float[Array, " r"],
    kappa: Float[Array, ""],
    cap: Float[Array, ""],
) -> Float[Array, " r"]:
    """Linear funding rate γ_L = κ (L/S − p_{t+1}/p_t) (eq. 2), clamped to [−cap, cap].

    γ > 0: longs pay shorts (the paper's worked example: L = 1000, S = 250 gives 3κ and "longs
    pay shorts"; §2.1's sentence before it states the opposite sign). Zero when either side is
    empty: there is no one to pay.
    """
    long_size, short_size = sizes[:, 0], sizes[:, 1]
    both = (long_size > 0) & (short_size > 0)
    ratio = long_size / _safe(short_size, short_size > 0)
    gamma = kappa * (ratio - p_new / p_old)
    return jnp.where(both, jnp.clip(gamma, -cap, cap), 0.0)


def pay_funding(
    book: Book, gamma: Float[Array, " r"], prices: Float[Array, " r"]
) -> tuple[Book, Float[Array, ""]]:
    """Pay funding between the sides of each market, pro rata (Appendix A step 3).

    Each bucket of the paying side pays |γ| δ p from its margin, at most the margin; the
    receiving side shares what was paid in proportion to size. Zero-sum between traders: the
    pool never pays funding. (The cap binds only when one step's funding exceeds a bucket's
    whole margin, |γ| > c/(δ p): never at the quickstart's cap of 0.1% a step.)
    **Returns:** the book with updated margins, and the total paid.
    """
    payer = jnp.where(gamma > 0, 0, 1)  # side index that pays, per market
    side = jnp.arange(2)[None, :, None]
    is_payer = book.is_open & (side == payer[:, None, None])
    is_receiver = book.is_open & (side != payer[:, None, None])
    recv_size = fixed_sum(jnp.where(is_receiver, book.size, 0.0), axis=(1, 2))
    # No receiver: nothing is paid (funding_rate already returns 0 then).
    rate = jnp.where(recv_size > 0, jnp.abs(gamma), 0.0)
    owed = rate[:, None, None] * book.size * prices[:, None, None]
    paid = jnp.where(is_payer, jnp.minimum(owed, jnp.maximum(book.margin, 0.0)), 0.0)
    total = fixed_sum(paid, axis=(1, 2))  # per market
    per_token = total / _safe(recv_size, recv_size > 0)
    received = jnp.where(is_receiver, book.size * per_token[:, None, None], 0.0)
    margin = book.margin - paid + received
    return eqx.tree_at(lambda b: b.margin, book, margin), fixed_sum(total)


def charge_fees(
    book: Book, prices: Float[Array, " r"], fee: Float[Array, ""]
) -> tuple[Book, Float[Array, ""]]:
    """Lending fee f per period on what each position borrows, paid from its margin (§2.2).

    Borrowed value: a long's reserved tokens at the current price (δ p), a short's reserved
    numéraire (n), at most the margin (see `pay_funding`).
    **Returns:** the book with updated margins, and the fees collected by the pool.
    """
    borrowed = jnp.stack([book.size[:, 0] * prices[:, None], book.notional[:, 1]], axis=1)
    due = _open(book, jnp.minimum(fee * borrowed, jnp.maximum(book.margin, 0.0)))
    return eqx.tree_at(lambda b: b.margin, book, book.margin - due), fixed_sum(due)


def funding_arbitrage(
    sizes: Float[Array, "r 2"],
    gamma: Float[Array, " r"],
    p_new: Float[Array, " r"],
    p_old: Float[Array, " r"],
    fee: Float[Array, ""],
) -> Float[Array, "r 2"]:
    """Size the funding-rate arbitrageur opens on each market and side (eq. 3 and 4).

    With shorts paying (γ < 0), a long of size ℓ would receive ℓ/(L + ℓ) · |γ| S p for one
    period and pay the lending fee f ℓ p: its profit is largest at ℓ* = √(|γ| S L / f) − L,
    positive exactly when f L < |γ| S (eq. 4 at ℓ → 0, in consistent units: eq. 4 as printed
    divides by L0 a second time). It opens clip(ℓ*, 0, S p/p0 − L): never more than the size
    that brings the rate to zero (eq. 3 is the case L = S = L0: ℓ = L0 (p/p0 − 1)). With longs
    paying, a short s* = √(γ L S / f) − S, at most L p0/p − S. A fee of 0 opens the cap.
    Sized this way (rather than all-or-nothing at eq. 3's size) the arbitrageur's position is
    continuous in the fee and the rate.
    """
    long_size, short_size = sizes[:, 0], sizes[:, 1]
    ratio = p_new / p_old
    want_long = jnp.maximum(short_size * ratio - long_size, 0.0)
    want_short = jnp.maximum(long_size / ratio - short_size, 0.0)
    priced = fee > 0
    safe_fee = _safe(fee, priced)
    pay_l = jnp.maximum(-gamma, 0.0) * short_size * long_size / safe_fee
    pay_s = jnp.maximum(gamma, 0.0) * long_size * short_size / safe_fee
    # √ at 0 has an infinite derivative: take it where the argument is positive only.
    root_l = jnp.sqrt(_safe(pay_l, pay_l > 0)) * (pay_l > 0)
    root_s = jnp.sqrt(_safe(pay_s, pay_s > 0)) * (pay_s > 0)
    best_l = jnp.where(priced, root_l - long_size, jnp.where(gamma < 0, jnp.inf, 0.0))
    best_s = jnp.where(priced, root_s - short_size, jnp.where(gamma > 0, jnp.inf, 0.0))
    go_long = jnp.where(gamma < 0, jnp.clip(best_l, 0.0, want_long), 0.0)
    go_short = jnp.where(gamma > 0, jnp.clip(best_s, 0.0, want_short), 0.0)
    return jnp.stack([go_long, go_short], axis=1)


def trader_demand(
    params: MarketParams,
    pool_value: Float[Array, ""],
    last_return_z: Float[Array, " r"],
    fee: Float[Array, ""],
    steps_per_year: float,
    z_demand: Float[Array, "r 2"],
    z_leverage: Float[Array, "r 2"],
) -> tuple[Float[Array, "r 2"], Float[Array, "r 2"]]:
    """New trader demand per market and side: notional (numéraire) and leverage.

    notional = open_rate · pool value · exp(−elasticity · f · steps_per_year)   (fee elasticity)
               · exp(± momentum · z)                 (momentum: longs after a rise, shorts after
                                                      a fall; z = last log return in sds, ±3)
               · exp(noise_vol · ε − noise_vol²/2)   (noise traders, mean one)
    leverage = leverage · exp(leverage_vol · ε' − leverage_vol²/2).
    """
    elastic = jnp.exp(-params.fee_elasticity * fee * steps_per_year)
    z = jnp.clip(last_return_z, -3.0, 3.0)
    tilt = jnp.exp(params.momentum * z[:, None] * SIGN[None, :])
    noise = jnp.exp(params.noise_vol * z_demand - 0.5 * params.noise_vol**2)
    notional = (params.open_rate * pool_value * elastic)[:, None] * tilt * noise
    lev = params.leverage * jnp.exp(params.leverage_vol * z_leverage - 0.5 * params.leverage_vol**2)
    return notional, lev


class Crowd(eqx.Module):
    """Accepted crowds, one per market and side (all `(r, 2)`; zero where none)."""

    size: Float[Array, "r 2"]  # δ, tokens
    notional: Float[Array, "r 2"]  # δ p0
    margin: Float[Array, "r 2"]  # the members' summed margin
    spread: Float[Array, "r 2"]  # half-width of their keys, price units
    count: Float[Array, "r 2"]  # the accepted fraction of the request


class Acceptance(eqx.Module):
    """Trades after the collateral and solvency checks: one `Crowd` per request."""

    crowds: list[Crowd]
    rejected: Float[Array, ""]  # Σ over requests with notional > 0 of the fraction refused


def _fill(ask: Array, headroom: Array) -> Array:
    """The fraction of `ask` that fits in `headroom`: min(headroom/ask, 1), 0 when full.

    The ratio is formed only where the ask exceeds a positive headroom: elsewhere a tiny ask
    (demand at a prohibitive fee) would square to 0 in the gradient (0 · inf = NaN).
    """
    partial = (headroom > 0) & (ask > headroom)
    return jnp.where(
        partial, headroom / _safe(ask, partial), jnp.where(ask > headroom, 0.0, 1.0)
    ) * (ask > 0)


def _use(used: Array, ask: Array, share: Array, cap: Array) -> Array:
    """What is lent after accepting `share` of `ask`: a request cut short leaves the cap
    exactly full (used + headroom would leave a rounding residue that a later request
    could take as dust)."""
    return jnp.where((ask > 0) & (share < 1.0), jnp.maximum(used, cap), used + ask * share)


def accept_trades(
    requests: list[tuple[Float[Array, "r 2"], Float[Array, "r 2"]]],
    prices: Float[Array, " r"],
    reserves: Float[Array, " n"],
    book: Book,
    max_leverage: Float[Array, ""],
    max_utilisation: Float[Array, ""],
    spread: Float[Array, ""],
) -> Acceptance:
    """Check trade requests in order and accept what passes (Appendix A step 5).

    `requests` is a list of (notional, leverage) pairs, each `(r, 2)`, checked in list order,
    then market order, long before short. Each is a crowd whose margin fractions are uniform
    on m̄(1 ± w), m̄ = 1/leverage, w = `spread`.
    - Collateral condition (eq. 1), p0 δ ≤ η_max c: members with m < 1/η_max are refused,
      the fraction a_c = clip((m̄(1 + w) − 1/η_max)/(2 w m̄), 0, 1) passes.
    - Solvency: what is lent may not exceed `max_utilisation` of the reserves (long tokens of
      the market's asset; shorts of every market together, the numéraire). The request takes
      what headroom is left, a fraction a_s of it, spread evenly over its members (a pool
      filling up accepts part of the flow).
    The refused fraction 1 − a_c a_s of each request with notional > 0 is counted.
    """
    r = prices.shape[0]
    long_res, short_res = reserved(book)
    cap_long = max_utilisation * reserves[:r]
    cap_short = max_utilisation * reserves[r]
    long_used, short_used = long_res, short_res
    floor = 1.0 / max_leverage
    crowds = []
    rejected = jnp.zeros((), prices.dtype)
    for notional, lev in requests:
        wants = notional > 0
        m_mid = 1.0 / _safe(lev, lev > 0)
        hi = m_mid * (1.0 + spread)
        width = 2.0 * spread * m_mid
        collateral = jnp.where(
            width > 0,
            jnp.clip((hi - floor) / _safe(width, width > 0), 0.0, 1.0),
            (m_mid >= floor).astype(prices.dtype),
        )
        lo = jnp.maximum(m_mid * (1.0 - spread), floor)
        kept = jnp.where(wants, notional, 0.0) * collateral
        ask_long = kept[:, 0] / prices
        share_long = _fill(ask_long, cap_long - long_used)
        long_used = _use(long_used, ask_long, share_long, cap_long)
        shares = []
        for i in range(r):  # shorts share the numéraire: market by market, in order
            ask = kept[i, 1]
            share = _fill(ask, cap_short - short_used)
            short_used = _use(short_used, ask, share, cap_short)
            shares.append(share)
        share = jnp.stack([share_long, jnp.stack(shares)], axis=1)
        accepted = kept * share
        fraction = collateral * share
        rejected = rejected + fixed_sum(jnp.where(wants, 1.0 - fraction, 0.0))
        crowds.append(
            Crowd(
                size=accepted / prices[:, None],
                notional=accepted,
                margin=accepted * 0.5 * (lo + hi),
                spread=jnp.maximum(prices[:, None] * 0.5 * (hi - lo), 0.0),
                count=jnp.where(wants, fraction, 0.0),
            )
        )
    return Acceptance(crowds, rejected)


def _shift_right(x: Array, fill) -> Array:
    """x[..., j − 1] at slot j (`fill` at slot 0)."""
    return jnp.concatenate([jnp.full_like(x[..., :1], fill), x[..., :-1]], -1)


def _shift_left(x: Array, fill) -> Array:
    """x[..., j + 1] at slot j (`fill` at the last slot)."""
    return jnp.concatenate([x[..., 1:], jnp.full_like(x[..., :1], fill)], -1)


def _merge_pair(left: tuple[Array, ...], right: tuple[Array, ...]) -> tuple[Array, tuple]:
    """Pairs of buckets, elementwise (each a tuple δ, n, c, a, count, β, q̄ of broadcastable
    arrays): the Ward cost of merging them, δ_i δ_j/(δ_i + δ_j) · ((q̄_i − q̄_j)² +
    (a_i − a_j)² + (p̄_i − p̄_j)²) (the detail lost in key, spread and mean entry price
    p̄ = n/δ, all in price units: a liquidation's margin depends on all three), and the
    merged fields (δ, n, c and counts add; the keys' variance is the mixture's,
    v = (δ_i v_i + δ_j v_j)/δ + δ_i δ_j (q̄_i − q̄_j)²/δ², v = a²/3, a = √(3v); the slope is
    the mixture's covariance of entry price and key over v, cov = (δ_i β_i v_i +
    δ_j β_j v_j)/δ + δ_i δ_j (q̄_i − q̄_j)(p̄_i − p̄_j)/δ²)."""
    s_i, n_i, c_i, a_i, k_i, b_i, q_i = left
    s_j, n_j, c_j, a_j, k_j, b_j, q_j = right
    total = s_i + s_j
    safe_total = _safe(total, total > 0)
    p_i = n_i / _safe(s_i, s_i > 0)
    p_j = n_j / _safe(s_j, s_j > 0)
    cost = s_i * s_j / safe_total * ((q_i - q_j) ** 2 + (a_i - a_j) ** 2 + (p_i - p_j) ** 2)
    var = (s_i * a_i**2 + s_j * a_j**2) / (3.0 * safe_total) + s_i * s_j * (q_i - q_j) ** 2 / (
        safe_total**2
    )
    cov = (s_i * b_i * a_i**2 + s_j * b_j * a_j**2) / (3.0 * safe_total) + s_i * s_j * (
        q_i - q_j
    ) * (p_i - p_j) / safe_total**2
    merged = (
        total,
        n_i + n_j,
        c_i + c_j,
        jnp.sqrt(3.0 * _safe(var, var > 0)) * (var > 0),
        k_i + k_j,
        cov / _safe(var, var > 0) * (var > 0),
    )
    return cost, merged


def _insert(x: Array, c: Array, place: Array, hole: Array, fill) -> Array:
    """Write `c` at its place in order along the last axis, into the slot `hole`: the slots
    between `place` and `hole` shift one slot towards the hole, and `c` takes `place`
    (hole ≥ place) or `place − 1` (hole < place). `place`, `hole`: `(..., 1)`."""
    slots = jnp.arange(x.shape[-1])
    right = hole >= place
    moved = jnp.where(
        right,
        jnp.where((slots > place) & (slots <= hole), _shift_right(x, fill), x),
        jnp.where((slots >= hole) & (slots < place - 1), _shift_left(x, fill), x),
    )
    return jnp.where(jnp.where(right, slots == place, slots == place - 1), c[..., None], moved)


def _place(book_keys: Array, is_open: Array, key: Array) -> Array:
    """The first open slot whose key exceeds `key` (the number of slots if none), `(..., 1)`."""
    slots = jnp.arange(book_keys.shape[-1])
    above = is_open & (book_keys > key[..., None])
    return jnp.min(jnp.where(above, slots, book_keys.shape[-1]), axis=-1)[..., None]


def add_crowd(
    book: Book, crowd: Crowd, prices: Float[Array, " r"]
) -> tuple[Book, Float[Array, ""], Float[Array, ""]]:
    """Write one accepted crowd per market and side into the book (where its notional is at
    least `DUST_NOTIONAL`), keeping the open buckets in ascending order of mean key q̄.

    - With a closed slot, the crowd takes its place in the order: p, the first open slot
      whose key exceeds its own (K if none). The buckets between p and the first closed
      slot h shift one slot towards h (right when h ≥ p, then the crowd takes slot p; left
      when h < p, then it takes slot p − 1).
    - With all K open, the cheapest of 2K − 1 candidate merges happens (the first minimum
      of the Ward cost, `_merge_pair`): the crowd with bucket j (into slot j, j = 0..K−1),
      or neighbours j and j + 1 (into slot j, j = 0..K−2; the rest close up and the crowd
      takes its place among the K − 1 left). The candidate set does not change when the
      crowd's key passes a bucket's, so a small change of a parameter changes the choice
      only where two costs tie (merging only neighbours *of the crowd* flipped it whenever
      its place moved, which biased the pathwise gradient in leverage by 12%). A merge
      adds δ, n, c and counts (so every trader's PnL, what is reserved and the mean key stay
      exact) and keeps the pair's key variance and the slope of entry price on key.
    Finding the merge costs O(K), not the (K + 1)²/2 pairs of every bucket with every
    other. Fees and funding shift every key of a side by the same amount per token, so the
    order holds between steps; where a partial liquidation or a short's fee (on entry
    notional) reorders two buckets, only the choice of pair is affected, never a balance.
    Closed slots hold zeros (`_close` writes them so).
    **Returns:** the book, the number of crowds written and the number of merges.
    """
    k = book.size.shape[-1]
    write = crowd.notional >= DUST_NOTIONAL  # (r, 2)
    # A dust crowd is dropped before any arithmetic: its size, squared in the gradient of
    # its key, would underflow (0 · inf = NaN) even where its lanes are masked out.
    crowd = jtu.tree_map(lambda x: jnp.where(write, x, 0.0), crowd)
    keys = mean_key(book)
    crowd_key = (crowd.notional - SIGN[None, :] * crowd.margin) / _safe(crowd.size, crowd.size > 0)
    slots = jnp.arange(k)
    free = ~book.is_open
    any_free = jnp.any(free, axis=-1)
    place = _place(keys, book.is_open, crowd_key)
    hole = jnp.argmax(free, axis=-1)[..., None]
    old = (book.size, book.notional, book.margin, book.spread, book.count, book.slope)
    # A crowd entered at one price: slope 0.
    fresh = (crowd.size, crowd.notional, crowd.margin, crowd.spread, crowd.count, 0.0 * crowd.size)
    # All K open. Candidates: the crowd with each bucket (K), and each pair of neighbours in
    # the book (K − 1). The set does not change when the crowd's key passes a bucket's, so
    # a small change of a parameter changes the choice only where two costs tie.
    crowd_cost, with_crowd = _merge_pair(
        (*old, keys), tuple(f[..., None] for f in (*fresh, crowd_key))
    )
    pair_cost, pairs = _merge_pair(
        tuple(x[..., :-1] for x in (*old, keys)), tuple(x[..., 1:] for x in (*old, keys))
    )
    lowest = jnp.argmin(jnp.concatenate([crowd_cost, pair_cost], -1), axis=-1)[..., None]
    joins = lowest < k  # the crowd joins bucket `lowest`
    pair = lowest - k  # else buckets pair, pair + 1 merge into slot `pair` and the rest close up
    # Both merges are aligned with the slots (bucket j's with the crowd, and neighbours j and
    # j + 1 into slot j), so no gather is needed.
    closed = [
        jnp.where(slots < pair, o, jnp.where(slots == pair, m, _shift_left(o, 0.0)))
        for o, m in zip(old, (jnp.concatenate([x, x[..., :1]], -1) for x in pairs), strict=True)
    ]
    closed_open = slots < k - 1
    closed_place = _place(mean_key(Book(*closed, is_open=closed_open)), closed_open, crowd_key)
    # One insertion serves both cases: the crowd into the first closed slot of the book, or
    # into the last slot of the book closed up after a pair merged.
    placing = (write & any_free)[..., None]
    merging = (write & ~any_free)[..., None]
    base_place = jnp.where(placing, place, closed_place)
    base_hole = jnp.where(placing, hole, k - 1)
    inserted = [
        _insert(jnp.where(placing, o, x), f, base_place, base_hole, 0.0)
        for o, x, f in zip(old, closed, fresh, strict=True)
    ]
    new = [
        jnp.where(
            merging & joins, jnp.where(slots == lowest, m, o), jnp.where(write[..., None], i, o)
        )
        for o, m, i in zip(old, with_crowd, inserted, strict=True)
    ]
    is_open = jnp.where(
        placing, _insert(book.is_open, jnp.ones_like(write), place, hole, False), book.is_open
    )
    book = Book(*new, is_open=is_open)
    return book, fixed_sum(write.astype(prices.dtype)), fixed_sum(merging.astype(prices.dtype))
