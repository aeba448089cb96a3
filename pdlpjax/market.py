"""The perpetuals exchange: position cohorts, liquidation, funding, lending fees, trader flow.

Positions live in a fixed-size book: per risky market and side (0 long, 1 short) a ring of K
cohorts, each with size δ (tokens), entry price p0, margin c (numéraire), entry leverage
η = δ p0 / c and an open flag (Chitra et al. §2.1: a trade is (c, δ, η, p0)).

The pool is every trader's counterparty (GMX/JLP style). What a position borrows is what the
pool *reserves* for it: a long reserves δ tokens of its asset (its profit δ(p − p0)/p tokens
never exceeds them), a short reserves δ p0 numéraire (its profit δ(p0 − p) never exceeds it).
So settling a profit never makes a reserve negative, and the solvency requirement is
reserved ≤ `max_utilisation` · R per asset (R^A = R − reserved ≥ 0).

All functions are pure and unbatched; shapes use r = risky markets, K = cohorts per side.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._numerics import fixed_sum

__all__ = [
    "MarketParams",
    "Book",
    "SIGN",
    "empty_book",
    "side_sizes",
    "reserved",
    "unrealised_pnl",
    "open_interest",
    "liquidation_mask",
    "liquidation_weight",
    "settle",
    "funding_rate",
    "pay_funding",
    "charge_fees",
    "funding_arbitrage",
]

# Trades below this notional (numéraire) are not opened (see `open_cohorts`).
DUST_NOTIONAL = 1e-12

# +1 for longs, −1 for shorts: sign(η).
SIGN = jnp.array([1.0, -1.0])


class MarketParams(eqx.Module):
    """`[market]` dynamic params of one pool (see the config reference for units)."""

    initial_prices: Float[Array, " r"]
    funding_kappa: Float[Array, ""]  # κ of eq. 2, per step
    funding_cap: Float[Array, ""]  # |γ_L| ≤ cap, per step
    open_rate: Float[Array, " r"]  # new notional per step and side, fraction of pool value
    mean_holding: Float[Array, ""]  # steps; exits are geometric with p = 1 / mean_holding
    leverage: Float[Array, ""]  # median leverage of new trades
    leverage_vol: Float[Array, ""]  # sd of log leverage
    max_leverage: Float[Array, ""]  # collateral condition (eq. 1): p0 δ ≤ η_max c
    fee_elasticity: Float[Array, ""]  # demand × exp(−elasticity · annualised fee)
    momentum: Float[Array, ""]  # demand tilt per sd of last return
    noise_vol: Float[Array, ""]  # sd of log demand of noise traders
    arb_leverage: Float[Array, ""]  # leverage of the funding-rate arbitrageur (0: none)


class Book(eqx.Module):
    """Open positions of one pool, shape `(r, 2, K)` (market, side, cohort)."""

    size: Float[Array, "r 2 k"]
    entry: Float[Array, "r 2 k"]
    margin: Float[Array, "r 2 k"]
    leverage: Float[Array, "r 2 k"]
    opened_at: Int[Array, "r 2 k"]
    is_open: Bool[Array, "r 2 k"]


def empty_book(num_risky: int, num_cohorts: int, dtype) -> Book:
    """A book with no open positions."""
    z = jnp.zeros((num_risky, 2, num_cohorts), dtype)
    return Book(z, z, z, z, jnp.zeros(z.shape, jnp.int32), jnp.zeros(z.shape, bool))


def _open(book: Book, x: Array) -> Array:
    return jnp.where(book.is_open, x, 0.0)


def side_sizes(book: Book) -> Float[Array, "r 2"]:
    """Cumulative open size per market and side: (L, S) in tokens."""
    return fixed_sum(_open(book, book.size), axis=-1)


def reserved(book: Book) -> tuple[Float[Array, " r"], Float[Array, ""]]:
    """What the book borrows from the pool: long tokens per market, short numéraire in total."""
    long_tokens = fixed_sum(_open(book, book.size)[:, 0], axis=-1)
    short_value = fixed_sum(_open(book, book.size * book.entry)[:, 1])
    return long_tokens, short_value


def pnl(book: Book, prices: Float[Array, " r"]) -> Float[Array, "r 2 k"]:
    """Each cohort's unrealised PnL sign(η) δ (p − p0) (zero where closed)."""
    return _open(book, SIGN[None, :, None] * book.size * (prices[:, None, None] - book.entry))


def unrealised_pnl(book: Book, prices: Float[Array, " r"]) -> Float[Array, ""]:
    """Net unrealised trader PnL: what the pool would owe if every position closed now."""
    return fixed_sum(pnl(book, prices))


def open_interest(book: Book, prices: Float[Array, " r"]) -> Float[Array, ""]:
    """Notional of all open positions, Σ δ p (longs and shorts)."""
    return fixed_sum(_open(book, book.size) * prices[:, None, None])


def liquidation_mask(book: Book, prices: Float[Array, " r"]) -> Bool[Array, "r 2 k"]:
    """Open cohorts meeting the liquidation condition sign(η) δ (p0 − p) ≥ c (§2.1)."""
    loss = SIGN[None, :, None] * book.size * (book.entry - prices[:, None, None])
    return book.is_open & (loss >= book.margin)


def liquidation_weight(
    book: Book, prices: Float[Array, " r"], temperature: float
) -> Float[Array, "r 2 k"]:
    """Smooth mode: the fraction of each open cohort liquidated, sigmoid((loss − c)/(τ c)),
    which tends to `liquidation_mask` as τ → 0.

    Computed per unit of size (loss/δ and c/δ), which are O(price) whatever the cohort's
    size: with the plain ratio a cohort worn down to dust by partial liquidations has
    c² below the smallest float, and its gradient turns into 0 · inf = NaN.
    """
    size = jnp.where(book.size > 0, book.size, 1.0)
    unit_loss = SIGN[None, :, None] * (book.entry - prices[:, None, None])
    unit_margin = book.margin / size
    safe = jnp.where(unit_margin > 0, unit_margin, 1.0)
    weight = jax.nn.sigmoid((unit_loss - unit_margin) / (temperature * safe))
    return jnp.where(book.is_open & (book.size > 0), weight, 0.0)


class Settlement(eqx.Module):
    """Result of closing the cohorts in a mask at the current prices."""

    book: Book
    reserve_change: Float[Array, " n"]  # tokens per asset, numéraire last
    received: Float[Array, ""]  # value the pool took from traders' margins (≥ 0)
    paid: Float[Array, ""]  # value the pool paid to traders in profit (≥ 0)
    bad_debt: Float[Array, ""]  # losses beyond the margin, absorbed by the pool (≥ 0)
    count: Float[Array, ""]


def settle(
    book: Book, mask: Bool[Array, "r 2 k"] | Float[Array, "r 2 k"], prices: Float[Array, " r"]
) -> Settlement:
    """Close the cohorts in `mask` against the pool at `prices`.

    A trader's PnL π = sign(η) δ (p − p0). In profit, the pool pays π (a long in tokens of its
    asset, π/p of them, from the tokens reserved for it; a short in numéraire). At a loss the
    pool takes min(−π, c) from the margin in numéraire; the rest, max(−π − c, 0), is bad debt.
    A float `mask` (smooth mode) closes that fraction of each cohort: size and margin shrink
    by it, the cohort stays open, and the count adds the fractions.
    """
    if mask.dtype != jnp.bool_:
        return _settle_fraction(book, mask, prices)
    p = jnp.where(mask, pnl(book, prices), 0.0)
    margin = jnp.where(mask, book.margin, 0.0)
    book = eqx.tree_at(lambda b: b.is_open, book, book.is_open & ~mask)
    return _settlement(book, p, margin, prices, jnp.sum(mask).astype(prices.dtype))


def _settlement(
    book: Book,
    p: Float[Array, "r 2 k"],
    margin: Float[Array, "r 2 k"],
    prices: Float[Array, " r"],
    count: Float[Array, ""],
) -> Settlement:
    """The pool's side of closing positions with PnL `p` and margin `margin` (zero where
    nothing closes); `book` is the book after the closing."""
    gain = jnp.maximum(p, 0.0)
    taken = jnp.minimum(jnp.maximum(-p, 0.0), margin)
    bad = jnp.maximum(-p - margin, 0.0)
    long_tokens_paid = fixed_sum(gain[:, 0], axis=-1) / prices
    short_paid = fixed_sum(gain[:, 1])
    numeraire_in = fixed_sum(taken) - short_paid
    change = jnp.concatenate([-long_tokens_paid, numeraire_in[None]])
    return Settlement(
        book=book,
        reserve_change=change,
        received=fixed_sum(taken),
        paid=fixed_sum(gain),
        bad_debt=fixed_sum(bad),
        count=count,
    )


def _settle_fraction(
    book: Book, frac: Float[Array, "r 2 k"], prices: Float[Array, " r"]
) -> Settlement:
    p = pnl(book, prices) * frac
    margin = _open(book, book.margin) * frac
    # A cohort liquidated all but a sliver, or worn down below 1e-9 of the book's notional,
    # is closed: dust would pile up in the ring, and its size, squared in the gradient,
    # underflows (0 · inf = NaN).
    notional = _open(book, book.size * book.entry)
    closed = (frac > 1.0 - 1e-3) | (notional * (1.0 - frac) < 1e-9 * fixed_sum(notional))
    keep = jnp.where(closed, 0.0, 1.0 - frac)
    after = eqx.tree_at(
        lambda b: (b.size, b.margin, b.is_open),
        book,
        (book.size * keep, book.margin * keep, book.is_open & ~closed),
    )
    return _settlement(after, p, margin, prices, fixed_sum(frac))


def funding_rate(
    sizes: Float[Array, "r 2"],
    p_new: Float[Array, " r"],
    p_old: Float[Array, " r"],
    kappa: Float[Array, ""],
    cap: Float[Array, ""],
    smooth: bool = False,
) -> Float[Array, " r"]:
    """Linear funding rate γ_L = κ (L/S − p_{t+1}/p_t) (eq. 2), clamped to [−cap, cap]
    (`smooth`: cap · tanh(γ/cap), which has a gradient past the cap).

    γ > 0: longs pay shorts (the paper's worked example: L = 1000, S = 250 gives 3κ and "longs
    pay shorts"; §2.1's sentence before it states the opposite sign). Zero when either side is
    empty: there is no one to pay.
    """
    long_size, short_size = sizes[:, 0], sizes[:, 1]
    both = (long_size > 0) & (short_size > 0)
    ratio = long_size / jnp.where(short_size > 0, short_size, 1.0)
    gamma = kappa * (ratio - p_new / p_old)
    if smooth:
        safe_cap = jnp.where(cap > 0, cap, 1.0)
        capped = jnp.where(cap > 0, safe_cap * jnp.tanh(gamma / safe_cap), 0.0)
    else:
        capped = jnp.clip(gamma, -cap, cap)
    return jnp.where(both, capped, 0.0)


def pay_funding(
    book: Book, gamma: Float[Array, " r"], prices: Float[Array, " r"]
) -> tuple[Book, Float[Array, ""]]:
    """Pay funding between the sides of each market, pro rata (Appendix A step 3).

    Each cohort of the paying side pays |γ| δ p, at most its margin; the receiving side shares
    what was paid in proportion to size. Zero-sum between traders: the pool's value is unchanged.
    **Returns:** the book with updated margins, and the total paid.
    """
    payer = jnp.where(gamma > 0, 0, 1)  # side index that pays, per market
    side = jnp.arange(2)[None, :, None]
    is_payer = book.is_open & (side == payer[:, None, None])
    is_receiver = book.is_open & (side != payer[:, None, None])
    owed = jnp.abs(gamma)[:, None, None] * book.size * prices[:, None, None]
    paid = jnp.where(is_payer, jnp.minimum(owed, book.margin), 0.0)
    total = fixed_sum(paid, axis=(1, 2))  # per market
    recv_size = fixed_sum(jnp.where(is_receiver, book.size, 0.0), axis=(1, 2))
    share = (
        jnp.where(is_receiver, book.size, 0.0)
        / jnp.where(recv_size > 0, recv_size, 1.0)[:, None, None]
    )
    # No receiver: nothing is paid (funding_rate already returns 0 then).
    total = jnp.where(recv_size > 0, total, 0.0)
    paid = jnp.where((recv_size > 0)[:, None, None], paid, 0.0)
    margin = book.margin - paid + share * total[:, None, None]
    return eqx.tree_at(lambda b: b.margin, book, margin), fixed_sum(total)


def charge_fees(
    book: Book, prices: Float[Array, " r"], fee: Float[Array, ""]
) -> tuple[Book, Float[Array, ""]]:
    """Lending fee f per period on what each position borrows, paid from its margin (§2.2).

    Borrowed value: a long's reserved tokens at the current price (δ p), a short's reserved
    numéraire (δ p0). A margin smaller than the fee pays what it has.
    **Returns:** the book with updated margins, and the fees collected by the pool.
    """
    borrowed = jnp.stack(
        [book.size[:, 0] * prices[:, None], book.size[:, 1] * book.entry[:, 1]], axis=1
    )
    due = jnp.where(book.is_open, jnp.minimum(fee * borrowed, book.margin), 0.0)
    return eqx.tree_at(lambda b: b.margin, book, book.margin - due), fixed_sum(due)


def funding_arbitrage(
    sizes: Float[Array, "r 2"],
    gamma: Float[Array, " r"],
    p_new: Float[Array, " r"],
    p_old: Float[Array, " r"],
    fee: Float[Array, ""],
    temperature: float | None = None,
) -> Float[Array, "r 2"]:
    """Size the funding-rate arbitrageur opens on each market and side (eq. 3 and 4).

    The arbitrageur joins the receiving side with the size that brings the rate to zero: with
    shorts paying (γ < 0) a long ℓ = S p/p0 − L (eq. 3 is the case L = S = L0: ℓ = L0 (p/p0 − 1));
    with longs paying a short s = L p0/p − S. It opens only if the funding it would receive
    for one period covers the lending fee: ℓ/(L+ℓ) · |γ| · (payer size) · p ≥ f ℓ p, i.e.
    f (L + ℓ) ≤ |γ| S (eq. 4 in consistent units: eq. 4 as printed divides by L0 a second
    time, comparing a rate with an amount).
    """
    long_size, short_size = sizes[:, 0], sizes[:, 1]
    ratio = p_new / p_old
    want_long = jnp.maximum(short_size * ratio - long_size, 0.0)
    want_short = jnp.maximum(long_size / ratio - short_size, 0.0)
    if temperature is not None:  # smooth mode: the go/no-go decisions become weights
        cost_l, gain_l = fee * (long_size + want_long), -gamma * short_size
        cost_s, gain_s = fee * (short_size + want_short), gamma * long_size
        # Where both are 0 (an empty side) the scale is 1: a floor like 1e-30 would square
        # to 0 in float32 in the gradient (0 · inf = NaN).
        scale_l = jnp.abs(cost_l) + jnp.abs(gain_l)
        scale_s = jnp.abs(cost_s) + jnp.abs(gain_s)
        scale_l = jnp.where(scale_l > 0, scale_l, 1.0)
        scale_s = jnp.where(scale_s > 0, scale_s, 1.0)
        w_long = jax.nn.sigmoid((gain_l - cost_l) / (temperature * scale_l))
        w_short = jax.nn.sigmoid((gain_s - cost_s) / (temperature * scale_s))
        # As in `accept_trades`: no dust requests from the sigmoid's tails.
        w_long = jnp.where(w_long < 1e-6, 0.0, w_long)
        w_short = jnp.where(w_short < 1e-6, 0.0, w_short)
        return jnp.stack([w_long * want_long, w_short * want_short], axis=1)
    go_long = (gamma < 0) & (fee * (long_size + want_long) <= -gamma * short_size)
    go_short = (gamma > 0) & (fee * (short_size + want_short) <= gamma * long_size)
    return jnp.stack(
        [jnp.where(go_long, want_long, 0.0), jnp.where(go_short, want_short, 0.0)], axis=1
    )


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


def next_slots(book: Book) -> tuple[Int[Array, "r 2"], Bool[Array, "r 2"]]:
    """Where each market and side writes its next cohort: the first free slot, else the newest
    cohort, into which the new trade merges.

    Merging keeps every trader's PnL exact (Σ δ (p − p0) is linear: the merged entry price is
    the size-weighted mean) and what is reserved (Σ δ p0); it only pools the margins of the
    merged trades for liquidation, as one account holding both would. So K bounds the number
    of distinct cohorts, never the holding time. **Returns:** the slot, and whether it merges.
    """
    free = ~book.is_open
    any_free = jnp.any(free, axis=-1)
    first_free = jnp.argmax(free, axis=-1)
    newest = jnp.argmax(book.opened_at, axis=-1)
    slot = jnp.where(any_free, first_free, newest).astype(jnp.int32)
    return slot, ~any_free


class Acceptance(eqx.Module):
    """Trades after the collateral and solvency checks (all `(r, 2)`)."""

    size: Float[Array, "r 2"]
    margin: Float[Array, "r 2"]
    rejected: Float[Array, ""]


def accept_trades(
    requests: list[tuple[Float[Array, "r 2"], Float[Array, "r 2"]]],
    prices: Float[Array, " r"],
    reserves: Float[Array, " n"],
    book: Book,
    max_leverage: Float[Array, ""],
    max_utilisation: Float[Array, ""],
    temperature: float | None = None,
) -> Acceptance:
    """Check trade requests in order and keep the valid ones (Appendix A step 5).

    `requests` is a list of (notional, leverage) pairs, each `(r, 2)`, checked in list order,
    then market order, long before short. A request with notional > 0 is rejected whole if
    - its leverage breaks the collateral condition p0 δ ≤ η_max c (eq. 1), or
    - it would lift what is lent above `max_utilisation` of the reserves: long tokens of the
      market's asset, or (shorts of every market together) the numéraire.
    Rejected requests (notional > 0) are counted. In smooth mode (`temperature` τ) each
    check becomes a weight, sigmoid(headroom / (τ · scale)) with the cap or the leverage limit
    as scale, and that fraction of the request is accepted (the rest counts as rejected).
    """
    if temperature is not None:
        return _accept_fraction(
            requests, prices, reserves, book, max_leverage, max_utilisation, temperature
        )
    r = prices.shape[0]
    long_res, short_res = reserved(book)
    cap_long = max_utilisation * reserves[:r]
    cap_short = max_utilisation * reserves[r]
    size = jnp.zeros((r, 2), prices.dtype)
    margin = jnp.zeros((r, 2), prices.dtype)
    rejected = jnp.zeros((), prices.dtype)
    long_used = long_res
    short_used = short_res
    for notional, lev in requests:
        delta = notional / prices[:, None]
        wants = notional > 0
        collateral_ok = lev <= max_leverage
        # Longs: markets use different assets, so they are independent of each other.
        ok_long = wants[:, 0] & collateral_ok[:, 0] & (long_used + delta[:, 0] <= cap_long)
        long_used = long_used + jnp.where(ok_long, delta[:, 0], 0.0)
        # Shorts share the numéraire: check market by market, in order.
        oks = []
        for i in range(r):
            ok = wants[i, 1] & collateral_ok[i, 1] & (short_used + notional[i, 1] <= cap_short)
            short_used = short_used + jnp.where(ok, notional[i, 1], 0.0)
            oks.append(ok)
        ok_all = jnp.stack([ok_long, jnp.stack(oks)], axis=1)
        safe_lev = jnp.where(lev > 0, lev, 1.0)
        size = size + jnp.where(ok_all, delta, 0.0)
        # Multiply by the reciprocal: XLA rewrites x / broadcast(scalar) that way for a batch
        # of one pool but not for more, which would make results depend on the batch size.
        margin = margin + jnp.where(ok_all, notional * (1.0 / safe_lev), 0.0)
        rejected = rejected + jnp.sum(wants & ~ok_all).astype(prices.dtype)
    return Acceptance(size, margin, rejected)


def _accept_fraction(
    requests, prices, reserves, book, max_leverage, max_utilisation, temperature
) -> Acceptance:
    r = prices.shape[0]
    long_res, short_res = reserved(book)
    cap_long = max_utilisation * reserves[:r]
    cap_short = max_utilisation * reserves[r]
    scale_long = jnp.where(cap_long > 0, cap_long, 1.0)
    scale_short = jnp.where(cap_short > 0, cap_short, 1.0)
    size = jnp.zeros((r, 2), prices.dtype)
    margin = jnp.zeros((r, 2), prices.dtype)
    rejected = jnp.zeros((), prices.dtype)
    long_used, short_used = long_res, short_res
    for notional, lev in requests:
        delta = notional / prices[:, None]
        wants = (notional > 0).astype(prices.dtype)
        collateral = jax.nn.sigmoid((max_leverage - lev) / (temperature * max_leverage))
        w_long = (
            wants[:, 0]
            * collateral[:, 0]
            * jax.nn.sigmoid((cap_long - long_used - delta[:, 0]) / (temperature * scale_long))
        )
        long_used = long_used + w_long * delta[:, 0]
        ws = []
        for i in range(r):
            head = cap_short - short_used - notional[i, 1]
            w = wants[i, 1] * collateral[i, 1] * jax.nn.sigmoid(head / (temperature * scale_short))
            short_used = short_used + w * notional[i, 1]
            ws.append(w)
        w_all = jnp.stack([w_long, jnp.stack(ws)], axis=1)
        # Sigmoid tails would open dust cohorts (1e-150 of a request) whose size, squared in
        # the gradient, underflows: drop acceptances below one part in a million.
        w_all = jnp.where(w_all < 1e-6, 0.0, w_all)
        safe_lev = jnp.where(lev > 0, lev, 1.0)
        size = size + w_all * jnp.maximum(delta, 0.0)
        margin = margin + w_all * jnp.maximum(notional, 0.0) * (1.0 / safe_lev)
        rejected = rejected + jnp.sum(wants - w_all)
    return Acceptance(size, margin, rejected)


def open_cohorts(
    book: Book,
    slot: Int[Array, "r 2"],
    merge: Bool[Array, "r 2"],
    size: Float[Array, "r 2"],
    margin: Float[Array, "r 2"],
    prices: Float[Array, " r"],
    t: Int[Array, ""],
) -> tuple[Book, Float[Array, ""], Float[Array, ""]]:
    """Write one new cohort per market and side at `slot` (where its notional is at least
    `DUST_NOTIONAL`), merging
    into the open cohort there when `merge` (see `next_slots`).

    **Returns:** the book, the number of cohorts written and the number of those merged.
    """
    k = jnp.arange(book.size.shape[-1])
    # Trades under DUST_NOTIONAL numéraire are not written: they change no figure that
    # matters, and a cohort of, say, 1e-190 tokens (demand × exp(−elasticity·f·year) at a
    # high fee) has a size whose square underflows in the gradient (0 · inf = NaN).
    write = (k == slot[..., None]) & (size * prices[:, None] >= DUST_NOTIONAL)[..., None]
    merging = write & merge[..., None] & book.is_open
    old_size = jnp.where(merging, book.size, 0.0)
    old_margin = jnp.where(merging, book.margin, 0.0)
    new_size = old_size + size[..., None]
    # A safe divisor where nothing is written: 1/0 there would be masked out of the value
    # but turn the gradient into NaN (0 · inf).
    safe_size = jnp.where(write, new_size, 1.0)
    entry = (old_size * book.entry + size[..., None] * prices[:, None, None]) * (1.0 / safe_size)
    new_margin = old_margin + margin[..., None]
    lev = new_size * entry * (1.0 / jnp.where(write & (new_margin > 0), new_margin, 1.0))
    book = Book(
        size=jnp.where(write, new_size, book.size),
        entry=jnp.where(write, entry, book.entry),
        margin=jnp.where(write, new_margin, book.margin),
        leverage=jnp.where(write, lev, book.leverage),
        opened_at=jnp.where(write, t, book.opened_at),
        is_open=book.is_open | write,
    )
    return book, jnp.sum(write).astype(prices.dtype), jnp.sum(merging).astype(prices.dtype)
