"""The JAX step against the plain NumPy reference (`tests/reference.py`) on the same draws,
the paper's worked examples (Chitra et al. §2.1, Appendix A), the crowd-bucket book's rules
(liquidation, exits, settlement, acceptance, merging, the arbitrageur's size) by hand, by
brute force over a crowd's members and against the JAX functions, rejections, and
invariants."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
import reference as ref

import pdlpjax as P
from pdlpjax import market
from pdlpjax.config import config_from_dict

T = 300  # steps of the busy run

# A small, busy pool: high leverage and jumps (partial and full liquidations, bad debt), κ
# large enough for funding to move margins (some below zero) and to pay the arbitrageur, a
# low utilisation cap (partial and full solvency rejections), leverage draws whose crowds
# cross max_leverage (partial and full collateral rejections), short holding times (large
# exits) and K = 4 buckets (full books merge, crowd into bucket and bucket pairs), and LP
# flows both ways.
BUSY = {
    "name": "busy",
    "market": {
        "assets": ["BTC", "ETH"],
        "initial_prices": [60000.0, 3000.0],
        "cohorts": 4,
        "funding_kappa": 0.01,
        "funding_cap": 0.05,
        "open_rate": [0.05, 0.04],
        "mean_holding": 6.0,
        "leverage": 12.0,
        "leverage_vol": 0.6,
        "leverage_spread": 0.5,
        "max_leverage": 25.0,
        "noise_vol": 0.7,
        "arb_leverage": 3.0,
    },
    "paths": {
        "model": "jump",
        "vols": [0.8, 1.0],
        "drifts": [0.0, 0.1],
        "correlation": [[1.0, 0.7], [0.7, 1.0]],
        "jump_intensity": 15.0,
        "jump_mean": -0.05,
        "jump_vol": 0.1,
        "crash_intensity": 5.0,
    },
    "pool": {
        "target_weights": [0.3, 0.3, 0.4],
        "fee": 1.0e-4,
        "max_utilisation": 0.3,
        "lp_flow_vol": 1.0,
    },
    "simulation": {"num_pools": 1, "num_steps": T, "steps_per_year": 365.0, "dtype": "float64"},
}

ACCOUNT_TOTALS = tuple(f for f in ref.ACCOUNT_FIELDS if "identity_error" not in f)
BOOK_FLOATS = ("size", "notional", "margin", "spread", "count", "slope")


def one_pool(raw: dict):
    """Config dict -> (pool 0's params, path model, spec, reference spec and params)."""
    cfg = config_from_dict(raw)
    params = jtu.tree_map(lambda x: x[0], P.make_params(cfg))
    model, spec = P.make_model(cfg), P.make_spec(cfg)
    rspec = ref.RefSpec(
        num_risky=spec.num_risky,
        num_cohorts=spec.num_cohorts,
        steps_per_year=spec.steps_per_year,
        path_model=cfg.paths.model,
        mode=spec.mode,
        has_numeraire=spec.has_numeraire,
        rebalance=spec.rebalance,
        discount=spec.discount,
        twm_steps=spec.twm_steps,
    )
    return params, model, spec, rspec, ref.params_from_pdlpjax(params)


def book_dict(book) -> dict:
    """A `Book`'s fields as NumPy arrays, by name."""
    return {name: np.asarray(getattr(book, name)) for name in ref.BOOK_FIELDS}


def to_numpy(tree):
    return jtu.tree_map(np.asarray, tree)


def at(tree, t: int):
    return jtu.tree_map(lambda x: x[t], tree)


def assert_close(name: str, got, want, rtol: float = 1e-9) -> None:
    """|got − want| ≤ rtol · max(|want|, 1e-3 · max |want|) elementwise (float64)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, name
    if want.size == 0:
        return
    floor = 1e-3 * np.max(np.abs(want))
    tol = rtol * np.maximum(np.abs(want), floor)
    bad = np.abs(got - want) > tol
    assert not np.any(bad), f"{name}: reference {got[bad][:4]} vs JAX {want[bad][:4]} (rtol {rtol})"


@pytest.fixture(scope="module")
def busy():
    """The busy pool run through the JAX step (every state kept) and through the reference."""
    with jax.enable_x64(True):
        params, model, spec, rspec, rparams = one_pool(BUSY)
        key = P.pool_keys(0, 1)[0][0]
        s0 = P.init_state(params, model, spec)

        noise_fn = jax.jit(lambda t: P.draw_noise(model, spec, key, t))
        step_fn = jax.jit(lambda s, p, n: P.step(s, p, model, spec, n))
        states, noises, s = [], [], s0
        for t in range(T):
            n = noise_fn(t)
            s = step_fn(s, params, n)
            states.append(to_numpy(s))
            noises.append(to_numpy(n))
    states = jtu.tree_map(lambda *xs: np.stack(xs), *states)
    noise = jtu.tree_map(lambda *xs: np.stack(xs), *noises)

    ref_states = []
    st = ref.init_ref_state(rspec, rparams)
    for t in range(T):
        st = ref.step(st, rparams, rspec, ref.noise_from_pdlpjax(noise, t))
        ref_states.append(st)
    return dict(
        params=params,
        model=model,
        spec=spec,
        rspec=rspec,
        rparams=rparams,
        s0=s0,
        states=states,
        noise=noise,
        ref=ref_states,
        step_fn=step_fn,
    )


def compare_state(st: ref.RefState, js, r: int, t: int) -> None:
    """Field-by-field comparison of a reference state with one JAX `SimState` (NumPy)."""
    where = f"step {t}: "
    assert st.t == int(js.t)
    assert_close(where + "prices", st.prices, js.pool.prices)
    assert_close(where + "reserves", st.reserves, js.pool.reserves)
    assert_close(where + "supply", st.supply, js.pool.supply)
    book = ref.book_arrays(st)
    np.testing.assert_array_equal(book["is_open"], js.book.is_open, err_msg=where + "is_open")
    live = book["is_open"]
    for name in BOOK_FLOATS:
        assert_close(where + name, book[name][live], np.asarray(getattr(js.book, name))[live])
    jaum = np.sum(js.pool.prices * js.pool.reserves) - np.sum(
        np.where(
            js.book.is_open,
            np.array([1.0, -1.0])[None, :, None]
            * (js.book.size * js.pool.prices[:r, None, None] - js.book.notional),
            0.0,
        )
    )
    assert_close(where + "share price", ref.share_price(st, r), jaum / js.pool.supply)
    for name in ACCOUNT_TOTALS:
        assert_close(where + name, st.accounts[name], getattr(js.accounts, name))
    assert st.accounts["identity_error"] < 1e-12
    assert float(js.accounts.identity_error) < 1e-12
    # The LP wealth identity, computed independently by each (flows, liquidations, exits).
    assert st.accounts["lp_identity_error"] < 1e-12
    assert float(js.accounts.lp_identity_error) < 1e-12


def test_jax_step_matches_reference_every_step(busy):
    r = busy["spec"].num_risky
    for t in range(T):
        compare_state(busy["ref"][t], at(busy["states"], t), r, t)


def test_busy_run_exercises_every_event(busy):
    """The comparison above is not vacuous: every mechanism fired in the run."""
    ev = busy["ref"][-1].events
    # Fees and funding are paid at most from the margin (since 648a9c6), so a margin goes
    # below zero only through a merged bucket's partial liquidation: rare, not required.
    for name in ref.EVENT_FIELDS:
        if name != "negative_margins":
            assert ev[name] > 0, name
    # Partial liquidations, not only whole buckets.
    assert ev["full_liquidations"] < ev["liquidations"]
    acc = at(busy["states"], T - 1).accounts
    assert float(acc.merged) == ev["merged"]
    assert float(acc.opened) == ev["opened"]
    assert float(acc.rejected) == pytest.approx(
        ev["rejected_collateral"] + ev["rejected_solvency"], rel=1e-12
    )
    # Crowd-equivalents: a fraction of a bucket per liquidation and exit.
    assert 0 < float(acc.liquidations) < ev["liquidations"]
    assert 0 < float(acc.exits) < ev["exits"]
    assert float(acc.liquidated_notional) > 0
    assert float(acc.funding_paid) > 0 and float(acc.bad_debt) > 0


def test_rollout_from_noise_matches_step_and_reference(busy):
    """`rollout_from_noise` on the same draws: same final state, and its per-step record
    agrees with the reference."""
    spec, model, r = busy["spec"], busy["model"], busy["spec"].num_risky
    with jax.enable_x64(True):
        final, rec = jax.jit(lambda s, p, n: P.rollout_from_noise(s, p, model, spec, n))(
            busy["s0"], busy["params"], jtu.tree_map(jnp.asarray, busy["noise"])
        )
        final, rec = to_numpy(final), to_numpy(rec)
    compare_state(busy["ref"][-1], final, r, T - 1)
    for t in (0, 1, T // 2, T - 1):
        st = busy["ref"][t]
        assert_close(f"record {t} share price", ref.share_price(st, r), rec.share_price[t])
        assert_close(f"record {t} prices", st.prices, rec.prices[t])
        assert_close(f"record {t} reserves", st.reserves, rec.reserves[t])
    oi = [a.accounts["open_interest_sum"] for a in busy["ref"]]
    assert_close("record open interest", np.diff(oi, prepend=0.0), rec.open_interest)
    util = [a.accounts["utilisation_sum"] for a in busy["ref"]]
    assert_close("record utilisation", np.diff(util, prepend=0.0), rec.utilisation, rtol=1e-8)


@pytest.mark.parametrize(
    "model,rebalance", [("garch", True), ("gbm", False)], ids=["garch-rebalance", "gbm-hold"]
)
def test_passive_mode_matches_reference(model, rebalance):
    raw = {
        "market": {"assets": ["BTC", "ETH", "SOL"], "initial_prices": [60000.0, 3000.0, 140.0]},
        "paths": {
            "model": model,
            "vols": [0.6, 0.8, 1.1],
            "drifts": [0.05, 0.0, -0.1],
            "correlation": [[1.0, 0.8, 0.6], [0.8, 1.0, 0.65], [0.6, 0.65, 1.0]],
        },
        "pool": {"mode": "passive", "rebalance": rebalance, "target_weights": [0.2, 0.2, 0.3, 0.3]},
        "simulation": {"num_pools": 1, "num_steps": 40, "steps_per_year": 365.0},
    }
    raw["simulation"]["dtype"] = "float64"
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        params, pmodel, spec, rspec, rparams = one_pool(raw)
        # Injected draws (only the path's matter in passive mode).
        noise = P.StepNoise(
            path=jnp.asarray(rng.standard_normal((40, 3))),
            z_demand=jnp.asarray(rng.standard_normal((40, 3, 2))),
            z_leverage=jnp.asarray(rng.standard_normal((40, 3, 2))),
            z_flow=jnp.asarray(rng.standard_normal(40)),
        )
        s0 = P.init_state(params, pmodel, spec)
        final, rec = to_numpy(
            jax.jit(lambda s, p, n: P.rollout_from_noise(s, p, pmodel, spec, n))(s0, params, noise)
        )
        noise = to_numpy(noise)
    st = ref.init_ref_state(rspec, rparams)
    for t in range(40):
        st = ref.step(st, rparams, rspec, ref.noise_from_pdlpjax(noise, t))
        assert_close(f"step {t} prices", st.prices, rec.prices[t])
        assert_close(f"step {t} reserves", st.reserves, rec.reserves[t])
        assert_close(f"step {t} share price", ref.share_price(st, 3), rec.share_price[t])
    for name in ("inventory_pnl", "value_sum", "utilisation_sum"):
        assert_close(name, st.accounts[name], getattr(final.accounts, name))
    assert float(final.accounts.identity_error) < 1e-12
    if model == "garch":
        assert_close("garch variance", st.garch_h, final.path)


# --------------------------------------------------------------------------- worked examples


def jax_book(**fields) -> market.Book:
    """A `market.Book` from nested lists (float64; `is_open` bool; slope 0 if not given)."""
    out = {}
    fields.setdefault("slope", np.zeros(np.shape(fields["size"])))
    for name in ref.BOOK_FIELDS:
        dtype = bool if name == "is_open" else jnp.float64
        out[name] = jnp.asarray(np.asarray(fields[name]), dtype)
    return market.Book(**out)


def one_bucket_book(b: ref.Bucket, side: int) -> dict:
    """Book fields `(1, 2, 1)` holding `b` on `side` (the other side closed)."""
    fields = {}
    for name in ref.BOOK_FIELDS:
        v = np.zeros((1, 2, 1), bool if name == "is_open" else np.float64)
        v[0, side, 0] = getattr(b, name)
        fields[name] = v
    return fields


def test_funding_rate_worked_example():
    """§2.1: L = 1000, S = 250 at p = p0 = 2000 gives γ_L = 3κ, and longs pay shorts."""
    kappa = 1e-3
    owed = 3 * kappa * 1000.0 * 2000.0
    with jax.enable_x64(True):
        gamma = market.funding_rate(
            jnp.array([[1000.0, 250.0]]),
            jnp.array([2000.0]),
            jnp.array([2000.0]),
            jnp.asarray(kappa),
            jnp.asarray(1.0),
        )
        np.testing.assert_allclose(np.asarray(gamma), [3 * kappa], rtol=1e-15)
        assert ref.funding_rate(1000.0, 250.0, 2000.0, 2000.0, kappa, 1.0) == pytest.approx(
            3 * kappa, rel=1e-15
        )
        # Longs pay: one long bucket of 1000 and one short of 250. The long's margin (1000)
        # is below what it owes (6000): it pays its whole margin, and the short gets that.
        fields = dict(
            size=[[[1000.0], [250.0]]],
            notional=[[[2e6], [5e5]]],
            margin=[[[1000.0], [1e6]]],
            spread=[[[0.0], [0.0]]],
            count=[[[1.0], [1.0]]],
            is_open=[[[True], [True]]],
        )
        book, paid = market.pay_funding(jax_book(**fields), gamma, jnp.array([2000.0]))
        np.testing.assert_allclose(float(paid), 1000.0, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(book.margin)[0, :, 0], [0.0, 1e6 + 1000.0])
        # With margin to spare (10,000), the whole 6000 owed is paid.
        rich = dict(fields, margin=[[[1e4], [1e6]]])
        book, paid = market.pay_funding(jax_book(**rich), gamma, jnp.array([2000.0]))
        np.testing.assert_allclose(float(paid), owed, rtol=1e-12)
        np.testing.assert_allclose(
            np.asarray(book.margin)[0, :, 0], [1e4 - owed, 1e6 + owed], rtol=1e-12
        )
    st = ref.RefState(0, np.zeros(2), np.zeros(2), 1.0, [[[ref.Bucket()], [ref.Bucket()]]])
    ref.set_book(st, {k: np.asarray(v) for k, v in fields.items()})
    assert ref.pay_funding(st.book[0], 3 * kappa, 2000.0) == pytest.approx(1000.0, rel=1e-15)
    assert st.book[0][ref.LONG][0].margin == 0.0
    assert st.book[0][ref.SHORT][0].margin == pytest.approx(1e6 + 1000.0, rel=1e-15)


def test_lending_fee_is_capped_at_the_margin():
    """Fee f on the borrowed value, long f δ p, short f n, from the margin, at most all of it."""
    fee, price = 0.01, 2500.0
    fields = dict(
        size=[[[4.0], [4.0]]],
        notional=[[[8000.0], [8000.0]]],
        margin=[[[50.0], [2000.0]]],
        spread=[[[10.0], [10.0]]],
        count=[[[1.0], [1.0]]],
        is_open=[[[True], [True]]],
    )
    want_due = [50.0, fee * 8000.0]  # f δ p = 100 is more than the long's 50; 80
    with jax.enable_x64(True):
        book, due = market.charge_fees(jax_book(**fields), jnp.array([price]), jnp.asarray(fee))
        np.testing.assert_allclose(float(due), sum(want_due), rtol=1e-14)
        np.testing.assert_allclose(np.asarray(book.margin)[0, :, 0], [0.0, 1920.0], rtol=1e-14)
    st = ref.RefState(0, np.zeros(2), np.zeros(2), 1.0, [[[ref.Bucket()], [ref.Bucket()]]])
    ref.set_book(st, {k: np.asarray(v) for k, v in fields.items()})
    for s in (ref.LONG, ref.SHORT):
        b = st.book[0][s][0]
        assert ref.charge_fee(b, s, price, fee) == pytest.approx(want_due[s], rel=1e-15)
    assert [st.book[0][s][0].margin for s in (0, 1)] == pytest.approx([0.0, 1920.0])


def test_liquidation_worked_example():
    """§2.1: c = 2000, η = 4, p0 = 2000 liquidates at p = 1500.

    The paper states δ = 1 ETH, but also a notional δ p0 of 8000 USD and liquidation at
    p0 (1 − 1/η) = 1500 for a position saturating eq. 1: both need δ = η c / p0 = 4. With
    δ = 1 the condition δ (p0 − p) ≥ c would give p ≤ 0. (It also prints "$1,5000".)
    We test the consistent reading δ = 4, as a bucket without spread (a = 0): one key,
    q̄ = (n − c)/δ = (8000 − 2000)/4 = 1500, liquidated whole or not at all.
    """
    delta, c, p0 = 4.0, 2000.0, 2000.0
    assert delta * p0 == 8000.0 and delta * p0 <= 4 * c  # eq. 1, saturated
    assert p0 - c / 1.0 == 0.0  # the δ = 1 reading: liquidation price 0
    long = ref.Bucket(delta, delta * p0, c, 0.0, 1.0, True)
    assert long.mean_key(ref.LONG) == 1500.0
    with jax.enable_x64(True):
        book = jax_book(**one_bucket_book(long, ref.LONG))
        for p, want in [(1500.0, 1.0), (1500.01, 0.0), (1400.0, 1.0), (2500.0, 0.0)]:
            got = float(market.liquidation_fraction(book, jnp.array([p]))[0, 0, 0])
            assert got == want, p
            assert ref.liquidated_fraction(long, ref.LONG, p) == want
    # The short mirror: q̄ = (n + c)/δ = 2500.
    short = ref.Bucket(delta, delta * p0, c, 0.0, 1.0, True)
    assert short.mean_key(ref.SHORT) == 2500.0
    assert ref.liquidated_fraction(short, ref.SHORT, 2500.0) == 1.0
    assert ref.liquidated_fraction(short, ref.SHORT, 2499.99) == 0.0


# --------------------------------------------------------------------------- crowd buckets

# A fresh crowd: notional 10000 at p0 = 2000, leverage 5, spread w = 0.5: margin fractions
# uniform on [0.1, 0.3] (mean 0.2), δ = 5, n = 10000, c = 2000. Long keys p0 (1 − m) on
# [1400, 1800] (q̄ = 1600, a = 200); short keys p0 (1 + m) on [2200, 2600] (q̄ = 2400).
CROWD = dict(notional=10000.0, price=2000.0, leverage=5.0, w=0.5)

# Prices inside the key range and what the bucket formulas give there, by hand:
# φ = 150/400 = 0.375 (long (q̄ + a − x)/2a, short (x − q̄ + a)/2a); liquidated δ_L = 1.875,
# n_L = 3750; their mean key μ = (x + 1800)/2 = 1725 (long), (2200 + x)/2 = 2275 (short);
# c_L = n_L − δ_L μ = 3750 − 3234.375 = 515.625 (long), δ_L μ − n_L = 4265.625 − 3750 (short);
# PnL π_L = ±(δ_L x − n_L) = −656.25 both; the pool takes c_L; bad debt −(π_L + c_L) = 140.625.
# Remainder: δ 3.125, n 6250, c 1484.375, count 0.625, a' = a (1 − φ) = 125 and
# q̄' = q̄ ∓ a φ = 1525 (long: (6250 − 1484.375)/3.125) or 2475 (short: (6250 + 1484.375)/3.125).
HAND = {
    ref.LONG: dict(x=1650.0, key=1600.0, phi=0.375, mu=1725.0, new_key=1525.0),
    ref.SHORT: dict(x=2350.0, key=2400.0, phi=0.375, mu=2275.0, new_key=2475.0),
}


def fresh_crowd(side: int) -> ref.Bucket:
    c = CROWD
    mbar = 1.0 / c["leverage"]
    a_c, m_lo, m_hi = ref.collateral_fraction(mbar, c["w"], 0.0)
    assert (a_c, m_lo, m_hi) == pytest.approx((1.0, 0.1, 0.3), rel=1e-15)
    return ref.new_crowd(c["notional"] * a_c, c["price"], m_lo, m_hi, a_c)


def crowd_members(side: int, num: int = 100_000) -> dict:
    """The same crowd as `num` equal members, each with its own margin fraction (midpoints
    of [0.1, 0.3]) and so its own key p0 (1 ∓ m)."""
    c = CROWD
    mbar = 1.0 / c["leverage"]
    m = mbar * (1 - c["w"]) + (np.arange(num) + 0.5) / num * 2 * c["w"] * mbar
    notional = np.full(num, c["notional"] / num)
    return dict(
        size=notional / c["price"],
        notional=notional,
        margin=m * notional,
        key=c["price"] * (1.0 - ref.SIGN[side] * m),
    )


@pytest.mark.parametrize("side", [ref.LONG, ref.SHORT], ids=["long", "short"])
def test_partial_liquidation_of_a_crowd_bucket(side):
    """A crowd bucket at a price inside its key range: φ, c_L, PnL, bad debt and the
    remainder (q̄' = q̄ ∓ aφ, a' = a(1 − φ)) by hand; the same as 100,000 members each
    liquidated on its own key; and the JAX `market.liquidate`."""
    hand = HAND[side]
    x = hand["x"]
    b = fresh_crowd(side)
    assert (b.size, b.notional, b.margin, b.spread, b.count) == pytest.approx(
        (5.0, 10000.0, 2000.0, 200.0, 1.0)
    )
    assert b.mean_key(side) == pytest.approx(hand["key"], rel=1e-15)
    phi = ref.liquidated_fraction(b, side, x)
    assert phi == pytest.approx(hand["phi"], rel=1e-14)
    d, n, c = ref.liquidated_chunk(b, side, x, phi)
    assert (d, n) == pytest.approx((1.875, 3750.0), rel=1e-14)
    c_hand = 3750.0 - 1.875 * hand["mu"] if side == ref.LONG else 1.875 * hand["mu"] - 3750.0
    assert c_hand == 515.625
    assert c == pytest.approx(c_hand, rel=1e-12)
    pnl = ref.SIGN[side] * (d * x - n)
    assert pnl == pytest.approx(-656.25, rel=1e-12)

    # Through the step's path: settle and keep the remainder.
    st = ref.RefState(0, np.array([x, 1.0]), np.array([100.0, 1e6]), 1.0, [[[], []]])
    st.book[0][side].append(b)
    st.book[0][1 - side].append(ref.Bucket())
    out = ref._Settled()
    assert ref.liquidate(st, 0, side, 0, x, out, 1) == phi
    assert out.received == pytest.approx(515.625, rel=1e-12)
    assert out.bad_debt == pytest.approx(140.625, rel=1e-12)
    assert out.paid == 0.0
    assert out.count == pytest.approx(0.375, rel=1e-14)
    assert out.notional == pytest.approx(1.875 * x, rel=1e-14)
    np.testing.assert_allclose(st.reserves, [100.0, 1e6 + 515.625], rtol=1e-15)
    rest = st.book[0][side][0]
    assert rest.is_open
    assert (rest.size, rest.notional, rest.margin, rest.count) == pytest.approx(
        (3.125, 6250.0, 1484.375, 0.625), rel=1e-12
    )
    assert rest.spread == pytest.approx(200.0 * (1 - phi), rel=1e-14)
    assert rest.spread == pytest.approx(125.0, rel=1e-14)
    assert rest.mean_key(side) == pytest.approx(hand["key"] - ref.SIGN[side] * 200.0 * phi)
    assert rest.mean_key(side) == pytest.approx(hand["new_key"], rel=1e-12)

    # Brute force: every member on its own key (long: key ≥ x, short: key ≤ x).
    mem = crowd_members(side)
    hit = mem["key"] >= x if side == ref.LONG else mem["key"] <= x
    m_pnl = ref.SIGN[side] * (mem["size"] * x - mem["notional"])
    m_bad = np.maximum(-(m_pnl + mem["margin"]), 0.0)
    assert hit.mean() == pytest.approx(phi, rel=1e-4)
    assert mem["margin"][hit].sum() == pytest.approx(c, rel=1e-4)
    assert m_pnl[hit].sum() == pytest.approx(pnl, rel=1e-4)
    assert m_bad[hit].sum() == pytest.approx(out.bad_debt, rel=1e-4)
    assert np.all(mem["margin"][hit] + m_pnl[hit] <= 1e-9)  # all of them under water
    kept = mem["key"][~hit]
    assert kept.mean() == pytest.approx(rest.mean_key(side), rel=1e-4)
    assert (kept.max() - kept.min()) / 2 == pytest.approx(rest.spread, rel=1e-4)
    assert mem["margin"][~hit].sum() == pytest.approx(rest.margin, rel=1e-4)

    # The JAX engine on the same bucket.
    with jax.enable_x64(True):
        out_j = market.liquidate(jax_book(**one_bucket_book(b, side)), jnp.array([x]))
    assert float(out_j.received) == pytest.approx(515.625, rel=1e-12)
    assert float(out_j.bad_debt) == pytest.approx(140.625, rel=1e-12)
    assert float(out_j.paid) == 0.0
    assert float(out_j.count) == pytest.approx(0.375, rel=1e-12)
    assert float(out_j.notional) == pytest.approx(1.875 * x, rel=1e-12)
    np.testing.assert_allclose(np.asarray(out_j.reserve_change), [0.0, 515.625], rtol=1e-12)
    after = ref.book_arrays(st)
    for name in ref.BOOK_FIELDS:
        got = np.asarray(getattr(out_j.book, name))[0, side, 0]
        if name == "is_open":
            assert bool(got) == after[name][0, side, 0]
        else:
            assert float(got) == pytest.approx(after[name][0, side, 0], rel=1e-12), name


@pytest.mark.parametrize("side", [ref.LONG, ref.SHORT], ids=["long", "short"])
def test_liquidation_edges(side):
    """Past the whole key range the bucket closes (μ = q̄, all its margin taken, bad debt
    δ |q̄ − x|); before it nothing happens; within 1e-6 of the far end φ rounds up to 1."""
    b = fresh_crowd(side)
    q, a, sign = 1600.0 if side == 0 else 2400.0, 200.0, ref.SIGN[side]
    cases = [
        (q - sign * 300.0, 1.0),  # beyond q̄ ∓ a: everyone
        (q + sign * 201.0, 0.0),  # short of q̄ ± a: no one
        (q - sign * a * (1 - 2e-7), 1.0),  # 1 − φ = 1e-7 < 1e-6: rounded up
        (q - sign * a * (1 - 4e-6), 1.0 - 2e-6),  # 1 − φ = 2e-6: kept
    ]
    for x, want in cases:
        phi = ref.liquidated_fraction(b, side, x)
        assert phi == pytest.approx(want, rel=1e-9, abs=1e-12), x
        with jax.enable_x64(True):
            book = jax_book(**one_bucket_book(b, side))
            got = float(market.liquidation_fraction(book, jnp.array([x]))[0, side, 0])
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), x
    # Everyone: μ = q̄, c_L = c, bad debt δ |q̄ − x| = 5 · 300.
    x = q - sign * 300.0
    d, n, c = ref.liquidated_chunk(b, side, x, 1.0)
    assert (d, n, c) == pytest.approx((5.0, 10000.0, 2000.0), rel=1e-14)
    st = ref.RefState(0, np.array([x, 1.0]), np.array([100.0, 1e6]), 1.0, [[[], []]])
    st.book[0][side].append(b)
    st.book[0][1 - side].append(ref.Bucket())
    out = ref._Settled()
    ref.liquidate(st, 0, side, 0, x, out, 1)
    assert not st.book[0][side][0].is_open
    assert out.received == pytest.approx(2000.0, rel=1e-14)
    assert out.bad_debt == pytest.approx(1500.0, rel=1e-12)
    assert out.count == 1.0
    # Rounded up: every member is liquidated, so the slot closes with all its margin taken
    # (μ = q̄, not the formula's (x + q̄ ± a)/2 over the members past x).
    x = q - sign * a * (1 - 2e-7)
    st = ref.RefState(0, np.array([x, 1.0]), np.array([100.0, 1e6]), 1.0, [[[], []]])
    st.book[0][side].append(b)
    st.book[0][1 - side].append(ref.Bucket())
    out = ref._Settled()
    ref.liquidate(st, 0, side, 0, x, out, 1)
    assert not st.book[0][side][0].is_open
    assert out.count == 1.0
    assert out.received == pytest.approx(2000.0, rel=1e-14)
    assert out.bad_debt == pytest.approx(5.0 * a * (1 - 2e-7), rel=1e-9)
    # The JAX engine on every case: the same settlement and remainder.
    for x, _want in cases:
        st = ref.RefState(0, np.array([x, 1.0]), np.array([100.0, 1e6]), 1.0, [[[], []]])
        st.book[0][side].append(b)
        st.book[0][1 - side].append(ref.Bucket())
        out = ref._Settled()
        ref.liquidate(st, 0, side, 0, x, out, 1)
        with jax.enable_x64(True):
            got = market.liquidate(jax_book(**one_bucket_book(b, side)), jnp.array([x]))
        for name in ("received", "bad_debt", "count", "notional"):
            want = getattr(out, name)
            assert float(getattr(got, name)) == pytest.approx(want, rel=1e-12, abs=1e-12), name
        assert bool(got.book.is_open[0, side, 0]) == st.book[0][side][0].is_open


def test_exits_take_a_fraction_of_every_bucket():
    """h = 1/mean_holding of every bucket leaves: (hδ, hn, hc) settles at p, the rest scales
    by 1 − h with a and q̄ unchanged. A long in profit is paid in tokens."""
    b = fresh_crowd(ref.LONG)  # δ 5, n 10000, c 2000, a 200, q̄ 1600
    h, price = ref.exit_fraction(4.0), 2100.0
    assert h == 0.25
    assert ref.exit_fraction(1.0) == 1.0 and ref.exit_fraction(0.5) == 1.0
    st = ref.RefState(0, np.array([price, 1.0]), np.array([100.0, 1e6]), 1.0, [[[b], []]])
    st.book[0][ref.SHORT].append(ref.Bucket())
    out = ref._Settled()
    ref.exit_bucket(st, 0, ref.LONG, 0, h, price, out, 1)
    # π = 1.25 · 2100 − 2500 = 125 > 0: paid 125/2100 tokens; nothing taken, no bad debt.
    assert out.paid == pytest.approx(125.0, rel=1e-12)
    assert out.received == pytest.approx(0.0, abs=1e-12) and out.bad_debt == 0.0
    assert out.count == 0.25
    np.testing.assert_allclose(st.reserves, [100.0 - 125.0 / 2100.0, 1e6], rtol=1e-15)
    rest = st.book[0][ref.LONG][0]
    assert (rest.size, rest.notional, rest.margin, rest.spread, rest.count) == pytest.approx(
        (3.75, 7500.0, 1500.0, 200.0, 0.75), rel=1e-14
    )
    assert rest.mean_key(ref.LONG) == pytest.approx(1600.0, rel=1e-14)
    with jax.enable_x64(True):
        out_j = market.leave(
            jax_book(**one_bucket_book(b, ref.LONG)), jnp.asarray(h), jnp.array([price])
        )
    assert float(out_j.paid) == pytest.approx(125.0, rel=1e-12)
    assert float(out_j.count) == pytest.approx(0.25, rel=1e-12)
    np.testing.assert_allclose(
        np.asarray(out_j.reserve_change), [-125.0 / 2100.0, 0.0], rtol=1e-12, atol=1e-12
    )
    for name in ("size", "notional", "margin", "spread", "count"):
        got = float(np.asarray(getattr(out_j.book, name))[0, 0, 0])
        assert got == pytest.approx(getattr(rest, name), rel=1e-12), name


def test_settlement_of_a_chunk():
    """taken = c − max(π + c, 0) + gain, bad = max(−(π + c), 0): a loss within the margin, a
    loss beyond it, a gain, and a gain on a negative margin (which a partial liquidation of
    a merged bucket can leave)."""
    cases = [  # (side, δ, n, c, p) -> (gain, taken, bad)
        ((ref.LONG, 1.0, 100.0, 30.0, 80.0), (0.0, 20.0, 0.0)),
        ((ref.SHORT, 1.0, 100.0, 30.0, 150.0), (0.0, 30.0, 20.0)),
        ((ref.SHORT, 2.0, 200.0, 30.0, 90.0), (20.0, 0.0, 0.0)),
        ((ref.LONG, 1.0, 100.0, -5.0, 103.0), (3.0, -2.0, 2.0)),
    ]
    for (side, d, n, c, p), (gain, taken, bad) in cases:
        st = ref.RefState(0, np.array([p, 1.0]), np.array([10.0, 1000.0]), 1.0, [])
        out = ref._Settled()
        ref.settle_chunk(st, 0, side, d, n, c, p, out, 1)
        assert (out.paid, out.received, out.bad_debt) == pytest.approx((gain, taken, bad))
        tokens = gain / p if side == ref.LONG else 0.0
        cash = taken - (gain if side == ref.SHORT else 0.0)
        np.testing.assert_allclose(st.reserves, [10.0 - tokens, 1000.0 + cash], rtol=1e-15)
        # The pool's value moves by −bad: it loses the position's PnL π and gains what it
        # took less what it paid.
        pi = ref.SIGN[side] * (d * p - n)
        assert -gain + taken + pi == pytest.approx(-bad, abs=1e-12)


def test_merge_rule_hand_computed():
    """K = 3 long buckets in ascending key order and a crowd: with a closed slot the crowd
    takes its place in the order; with none, the cheapest of the crowd with a bucket and two
    neighbouring buckets (cost δ_i δ_j/(δ_i + δ_j) ((q̄_i − q̄_j)² + (a_i − a_j)² +
    (p̄_i − p̄_j)²), first minimum) merges; the merged spread from the mixture's variance,
    also against a discretisation. The JAX engine on the same cases."""

    def bucket(d, key, a):  # long: n = 2000 δ, c = n − δ q̄ so that (n − c)/δ = q̄ exactly
        return ref.Bucket(d, 2000.0 * d, 2000.0 * d - d * key, a, 1.0, True)

    ring = [bucket(1.0, 1000.0, 10.0), bucket(2.0, 1020.0, 20.0), bucket(1.0, 1500.0, 10.0)]
    near = bucket(1.0, 1490.0, 12.0)
    # Every entry price is 2000. The crowd with each bucket: 0.5(490² + 2²), ⅔(470² + 8²),
    # 0.5(10² + 2²) = 52; neighbours: ⅔(20² + 10²) = 333.3, ⅔(480² + 10²): the crowd joins
    # the bucket at 1500.
    assert ref.merge_cost(ring[2], near, ref.LONG) == pytest.approx(52.0, rel=1e-12)
    assert ref.merge_cost(ring[0], ring[1], ref.LONG) == pytest.approx(1000.0 / 3, rel=1e-12)
    book = list(ring)
    assert ref.add_crowd(book, near, ref.LONG) == (1, 0)
    m = book[2]
    # δ 2, q̄ 1495; v = (100/3 + 144/3)/2 + 1·1·10²/2² = 40.667 + 25 → a = √(3v) = √197.
    assert (m.size, m.notional, m.count) == (2.0, 4000.0, 2.0)
    assert m.mean_key(ref.LONG) == pytest.approx(1495.0, rel=1e-14)
    assert m.spread == pytest.approx(math.sqrt(197.0), rel=1e-12)
    assert book[:2] == ring[:2]

    # A crowd far above every bucket: 1000 and 1020 (333.3) merge into slot 0, the rest close
    # up and the crowd takes its place, the last slot.
    far = bucket(1.0, 3000.0, 12.0)
    book = list(ring)
    assert ref.add_crowd(book, far, ref.LONG) == (1, 1)
    m = book[0]
    # δ 3, q̄ (1000 + 2·1020)/3; v = (100/3 + 2·400/3)/3 + 1·2·20²/3² = 100 + 88.89.
    v = (1 * 100 / 3 + 2 * 400 / 3) / 3 + 2 * 400 / 9
    assert v == pytest.approx(188.8889, rel=1e-6)
    assert m.mean_key(ref.LONG) == pytest.approx(3040.0 / 3, rel=1e-14)
    assert m.spread == pytest.approx(math.sqrt(3 * v), rel=1e-12)
    assert m.spread == pytest.approx(23.8048, rel=1e-5)
    assert (m.size, m.margin) == (3.0, ring[0].margin + ring[1].margin)
    assert book[1] == ring[2] and book[2] == far
    # Discretised: keys uniform over each bucket in proportion to size.
    grid = (np.arange(100_000) + 0.5) / 100_000 * 2 - 1
    keys = np.concatenate([1000.0 + 10.0 * grid, 1020.0 + 20.0 * grid])
    weights = np.concatenate([np.full(100_000, 1.0), np.full(100_000, 2.0)])
    mean = np.average(keys, weights=weights)
    var = np.average((keys - mean) ** 2, weights=weights)
    assert m.spread == pytest.approx(math.sqrt(3 * var), rel=1e-6)

    # A tie: (990, 1000) and (1000, 1010) both cost 0.5·10² = 50, and the first merges.
    tied = [bucket(1.0, 990.0, 0.0), bucket(1.0, 1000.0, 0.0), bucket(1.0, 1010.0, 0.0)]
    book = list(tied)
    assert ref.add_crowd(book, far, ref.LONG) == (1, 1)
    assert book[0].mean_key(ref.LONG) == pytest.approx(995.0) and book[1:] == [tied[2], far]
    # A closed slot takes the crowd, whatever the costs, and the order holds: left of the
    # crowd's place (the buckets between shift left) and right of it (they shift right).
    with_gap = [ring[0], ref.Bucket(), ring[2]]
    assert ref.add_crowd(with_gap, near, ref.LONG) == (0, 0)
    assert with_gap == [ring[0], near, ring[2]]
    gap_last = [ring[0], ring[2], ref.Bucket()]
    middle = bucket(1.0, 1200.0, 5.0)
    assert ref.add_crowd(gap_last, middle, ref.LONG) == (0, 0)
    assert gap_last == [ring[0], middle, ring[2]]
    gap_first = [ref.Bucket(), ring[0], ring[2]]
    assert ref.add_crowd(gap_first, far, ref.LONG) == (0, 0)
    assert gap_first == [ring[0], ring[2], far]

    # The JAX engine on the same cases, one market each (K = 3); the crowds on the long side
    # but for a short mirror (keys reflected, q̄ → 4000 − q̄, so in reverse order).
    def short(b):
        key = 4000.0 - b.mean_key(ref.LONG)
        return ref.Bucket(b.size, b.notional, b.size * key - b.notional, b.spread, 1.0, b.is_open)

    books = [
        list(ring),
        list(ring),
        list(tied),
        [short(b) for b in reversed(ring)],
        [ring[0], ref.Bucket(), ring[2]],
        [ring[0], ring[2], ref.Bucket()],
        [ref.Bucket(), ring[0], ring[2]],
    ]
    crowds = [near, far, far, short(far), near, middle, far]
    sides = [ref.LONG] * 3 + [ref.SHORT] + [ref.LONG] * 3
    m_count = len(books)
    st = ref.RefState(0, np.ones(m_count + 1), np.ones(m_count + 1), 1.0, [])
    st.book = [[[], []] for _ in range(m_count)]
    for i in range(m_count):
        st.book[i][sides[i]] = books[i]
        st.book[i][1 - sides[i]] = [ref.Bucket() for _ in range(3)]
    arrays = ref.book_arrays(st)
    crowd_fields = {
        n: np.zeros((m_count, 2)) for n in ("size", "notional", "margin", "spread", "count")
    }
    for i in range(m_count):
        for n in crowd_fields:
            crowd_fields[n][i, sides[i]] = getattr(crowds[i], n)
    merges = 0
    for i in range(m_count):
        merges += ref.add_crowd(st.book[i][sides[i]], crowds[i], sides[i])[0]
    want = ref.book_arrays(st)
    # The short mirror: the crowd (key 1000) goes first; 2980 and 3000 (cost 333.3) merge.
    assert want["size"][3, 1].tolist() == [1.0, 1.0, 3.0]
    with jax.enable_x64(True):
        crowd = market.Crowd(**{n: jnp.asarray(v) for n, v in crowd_fields.items()})
        got, written, merged = market.add_crowd(
            jax_book(**arrays), crowd, jnp.full(m_count, 2000.0)
        )
    assert float(written) == m_count and float(merged) == merges == 4
    np.testing.assert_array_equal(np.asarray(got.is_open), want["is_open"])
    for name in BOOK_FLOATS:
        np.testing.assert_allclose(np.asarray(getattr(got, name)), want[name], rtol=1e-12)


def test_merge_choice_does_not_jump_when_the_crowd_passes_a_bucket():
    """Buckets at keys 1000 (entry 2000), 1500 (entry 3000) and 1520 (entry 2000), and a
    crowd entering at 2000 with key 1500 ∓ 1e-7: whichever side of the middle bucket's key
    it falls, the cheapest merge is the crowd with the bucket at 1520 (cost 0.5·20² = 200,
    against 0.5·1000² with the middle one). Merging only the crowd's neighbours in key
    order would join it to the bucket at 1000 below 1500 and to 1520 above: a jump that
    the pathwise gradient cannot see. The engine agrees."""

    def bucket(key, entry):  # long, δ = 1: n = entry, c = n − q̄
        return ref.Bucket(1.0, entry, entry - key, 10.0, 1.0, True)

    ring = [bucket(1000.0, 2000.0), bucket(1500.0, 3000.0), bucket(1520.0, 2000.0)]
    books = []
    for eps in (-1e-7, 1e-7):
        book = list(ring)
        assert ref.add_crowd(book, bucket(1500.0 + eps, 2000.0), ref.LONG) == (1, 0)
        books.append(book)
        assert book[:2] == ring[:2]
        with jax.enable_x64(True):
            st = ref.RefState(0, np.ones(2), np.ones(2), 1.0, [[list(ring), []]])
            st.book[0][1] = [ref.Bucket() for _ in range(3)]
            arrays = ref.book_arrays(st)
            c = bucket(1500.0 + eps, 2000.0)
            crowd = market.Crowd(
                **{
                    n: jnp.asarray([[getattr(c, n), 0.0]])
                    for n in ("size", "notional", "margin", "spread", "count")
                }
            )
            got, _, merged = market.add_crowd(jax_book(**arrays), crowd, jnp.array([2000.0]))
        assert float(merged) == 1.0
        for name in BOOK_FLOATS:
            want = [getattr(b, name) for b in book]
            np.testing.assert_allclose(np.asarray(getattr(got, name))[0, 0], want, rtol=1e-12)
    for a, b in zip(books[0], books[1], strict=True):
        assert a.size == b.size and a.notional == b.notional
        assert a.margin == pytest.approx(b.margin, rel=1e-9)


def test_arbitrageur_size_maximises_its_profit():
    """ℓ* = √(|γ| S L / f) − L maximises ℓ/(L+ℓ) |γ| S − f ℓ (per unit price), capped at
    eq. 3's size S·ratio − L; the mirror for a short; none when it would not pay."""
    fee = 1e-4
    L, S = 100.0, 300.0
    star = math.sqrt(1e-4 * S * L / fee) - L  # = √30000 − 100 ≈ 73.2
    assert star == pytest.approx(73.2051, rel=1e-5)
    assert ref.arbitrage_sizes(L, S, -1e-4, 1.0, fee) == pytest.approx((star, 0.0), rel=1e-14)

    def profit(ell, gamma, payer, own):
        return ell / (own + ell) * abs(gamma) * payer - fee * ell

    grid = np.linspace(0.0, 200.0, 200_001)  # 0.001 apart
    best = grid[np.argmax(profit(grid, -1e-4, S, L))]
    assert abs(best - star) <= 1e-3
    assert profit(star, -1e-4, S, L) >= profit(grid, -1e-4, S, L).max() - 1e-15
    # Longs pay: the mirror, s* = √(γ L S / f) − S.
    assert ref.arbitrage_sizes(S, L, 1e-4, 1.0, fee) == pytest.approx((0.0, star), rel=1e-14)
    # A large rate: the optimum (≈ 1632) is past eq. 3's size S·ratio − L = 230, where it stops;
    # the profit still rises there.
    capped = ref.arbitrage_sizes(L, S, -1e-2, 1.1, fee)
    assert capped == pytest.approx((230.0, 0.0), rel=1e-14)
    grid = np.linspace(0.0, 230.0, 23_001)
    assert grid[np.argmax(profit(grid, -1e-2, S, L))] == 230.0
    # A small rate: ℓ* = √30 − 100 < 0, no trade; no rate, no trade; no fee: eq. 3's size.
    assert ref.arbitrage_sizes(L, S, -1e-7, 1.0, fee) == (0.0, 0.0)
    assert ref.arbitrage_sizes(L, S, 0.0, 1.0, fee) == (0.0, 0.0)
    assert ref.arbitrage_sizes(L, S, -1e-4, 1.0, 0.0) == (200.0, 0.0)

    with jax.enable_x64(True):
        sizes = jnp.array([[L, S], [S, L], [L, S], [L, S], [L, S]])
        gamma = jnp.array([-1e-4, 1e-4, -1e-2, -1e-7, 0.0])
        p_new = jnp.array([1.0, 1.0, 1.1, 1.0, 1.0])
        got = market.funding_arbitrage(sizes, gamma, p_new, jnp.ones(5), jnp.asarray(fee))
    sz, g, p = np.asarray(sizes), np.asarray(gamma), np.asarray(p_new)
    want = [ref.arbitrage_sizes(sz[i, 0], sz[i, 1], g[i], p[i], fee) for i in range(5)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def test_crowd_acceptance_hand_computed():
    """Collateral fraction a_c and capacity share a_s, requests in order, shorts of every
    market sharing the numéraire.

    max_leverage 12.5 (m ≥ 0.08), w = 0.5, max_utilisation 0.5, reserves (10, 1000, 1000):
    - market 0 long, 1000 at leverage 10: m on [0.05, 0.15], a_c = 0.07/0.1 = 0.7 (m on
      [0.08, 0.15]); asks 7 tokens of 5: a_s = 5/7; accepted 500 (δ 5, c 500·0.115,
      a = 100·0.035, count 0.5);
    - market 0 short, 400 at leverage 5: m on [0.1, 0.3], a_c = 1; 400 of 500 numéraire;
    - market 1 long, 100 at leverage 20: m on [0.025, 0.075] < 0.08: a_c = 0;
    - market 1 short, 300 at leverage 4: a_c = 1, 100 numéraire left: a_s = 1/3;
    - then the arbitrageur, market 0 short 50 at leverage 3: no room, a_s = 0.
    Rejected: 0.5 + 0 + 1 + 2/3 + 1.
    """
    prices = np.array([100.0, 50.0, 1.0])
    reserves = np.array([10.0, 1000.0, 1000.0])
    demand_n = np.array([[1000.0, 400.0], [100.0, 300.0]])
    demand_lev = np.array([[10.0, 5.0], [20.0, 4.0]])
    arb_n = np.array([[0.0, 50.0], [0.0, 0.0]])
    arb_lev = np.full((2, 2), 3.0)
    prm = ref.RefParams(
        **{name: 0.0 for name in ref.RefParams.__dataclass_fields__},
    )
    prm.max_leverage, prm.leverage_spread, prm.max_utilisation = 12.5, 0.5, 0.5
    book = [[[ref.Bucket()], [ref.Bucket()]] for _ in range(2)]
    events = {k: 0 for k in ref.EVENT_FIELDS}

    def req(n, lev):
        return {(i, s): (n[i, s], lev[i, s]) for i in range(2) for s in (0, 1)}

    crowds, rejected = ref.accept_requests(
        [("demand", req(demand_n, demand_lev)), ("arb", req(arb_n, arb_lev))],
        prices,
        reserves,
        book,
        prm,
        events,
    )
    assert rejected == pytest.approx(0.5 + 1 + 2 / 3 + 1, rel=1e-14)
    assert events["rejected_collateral"] == pytest.approx(0.3 + 1.0)
    assert events["rejected_solvency"] == pytest.approx(0.7 * 2 / 7 + 2 / 3 + 1.0)
    assert events["arb_requests"] == 1 and events["arb_opened"] == 0
    assert crowds[1, 0] == [] and len(crowds[0, 1]) == 1
    want = {  # (δ, n, c, a, count)
        (0, 0): (5.0, 500.0, 500.0 * 0.115, 100.0 * 0.035, 0.5),
        (0, 1): (4.0, 400.0, 400.0 * 0.2, 100.0 * 0.1, 1.0),
        (1, 1): (2.0, 100.0, 100.0 * 0.25, 50.0 * 0.125, 1 / 3),
    }
    for (i, s), fields in want.items():
        (b,) = crowds[i, s]
        got = (b.size, b.notional, b.margin, b.spread, b.count)
        assert got == pytest.approx(fields, rel=1e-12), (i, s)
    # Without spread (w = 0) eq. 1 is all or nothing: leverage 10 passes at max 10.
    assert ref.collateral_fraction(1 / 10.0, 0.0, 1 / 10.0)[0] == 1.0
    assert ref.collateral_fraction(1 / 10.000001, 0.0, 1 / 10.0)[0] == 0.0

    with jax.enable_x64(True):
        ok = market.accept_trades(
            [
                (jnp.asarray(demand_n), jnp.asarray(demand_lev)),
                (jnp.asarray(arb_n), jnp.asarray(arb_lev)),
            ],
            jnp.asarray(prices[:2]),
            jnp.asarray(reserves),
            market.empty_book(2, 1, jnp.float64),
            jnp.asarray(12.5),
            jnp.asarray(0.5),
            jnp.asarray(0.5),
        )
    assert float(ok.rejected) == pytest.approx(rejected, rel=1e-12)
    demand_crowd, arb_crowd = ok.crowds
    for name, k in (("size", 0), ("notional", 1), ("margin", 2), ("spread", 3), ("count", 4)):
        want_arr = np.zeros((2, 2))
        for key, fields in want.items():
            want_arr[key] = fields[k]
        np.testing.assert_allclose(np.asarray(getattr(demand_crowd, name)), want_arr, rtol=1e-12)
        if name != "spread":  # (a crowd of nothing has no spread to speak of)
            np.testing.assert_allclose(np.asarray(getattr(arb_crowd, name)), 0.0, atol=1e-12)


def test_no_room_left_after_a_binding_cap():
    """A request that meets a full cap is rejected whole (a_s = 0, nothing written), also
    when the cap was filled by the request before it: that one accepted exactly the headroom,
    so what is used is the cap, and cap − used is 0, not a rounding residue.

    256 random pools, one market: demand asks 1.1 to 5 times the long and short caps, then
    the arbitrageur asks for more of both. The JAX step runs compiled, as in `simulate`.
    """
    rng = np.random.default_rng(0)
    num = 256
    prices = rng.uniform(100.0, 60000.0, (num, 1))
    reserves = np.stack([rng.uniform(1.0, 100.0, num), rng.uniform(1e4, 1e6, num)], axis=1)
    demand = np.zeros((num, 1, 2))
    demand[:, 0, 0] = 0.3 * reserves[:, 0] * prices[:, 0] * rng.uniform(1.1, 5.0, num)
    demand[:, 0, 1] = 0.3 * reserves[:, 1] * rng.uniform(1.1, 5.0, num)
    arb = rng.uniform(1e3, 1e5, (num, 1, 2))
    lev = np.full((1, 2), 3.0)
    prm = ref.RefParams(**{name: 0.0 for name in ref.RefParams.__dataclass_fields__})
    prm.max_leverage, prm.leverage_spread, prm.max_utilisation = 25.0, 0.5, 0.3
    for k in range(num):
        crowds, rejected = ref.accept_requests(
            [
                ("demand", {(0, s): (demand[k, 0, s], 3.0) for s in (0, 1)}),
                ("arb", {(0, s): (arb[k, 0, s], 3.0) for s in (0, 1)}),
            ],
            np.append(prices[k], 1.0),
            reserves[k],
            [[[ref.Bucket()], [ref.Bucket()]]],
            prm,
            {name: 0 for name in ref.EVENT_FIELDS},
        )
        assert [len(crowds[0, s]) for s in (0, 1)] == [1, 1]  # the demand's, none of the arb's
        for s in (0, 1):
            assert crowds[0, s][0].count < 1
        assert rejected > 2.0  # the arbitrageur's two requests, whole

    def accept(p, r, d, a):
        out = market.accept_trades(
            [(d, jnp.asarray(lev)), (a, jnp.asarray(lev))],
            p,
            r,
            market.empty_book(1, 1, p.dtype),
            jnp.asarray(25.0),
            jnp.asarray(0.3),
            jnp.asarray(0.5),
        )
        return out.crowds[1].notional, out.crowds[1].count

    with jax.enable_x64(True):
        notional, count = jax.jit(jax.vmap(accept))(prices, reserves, demand, arb)
    notional, count = np.asarray(notional), np.asarray(count)
    leaked = int(np.sum(notional >= market.DUST_NOTIONAL))
    assert leaked == 0, (
        f"{leaked} of {2 * num} requests written after a full cap: notional up to "
        f"{notional.max():.3g}, count up to {count.max():.3g}"
    )


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize("reason", ["solvency", "collateral"])
def test_rejected_trade_changes_nothing_but_the_counter(busy, reason):
    """A request that breaks solvency (no room under max_utilisation = 0) or the collateral
    condition (every member over max_leverage) is rejected whole and counted; the state is
    otherwise bitwise the one where no demand arrives at all."""
    t = 120
    params = busy["params"]
    with jax.enable_x64(True):
        s = jtu.tree_map(jnp.asarray, at(busy["states"], t - 1))
        assert int(np.sum(np.asarray(s.book.is_open))) > 0
        n = jtu.tree_map(jnp.asarray, at(busy["noise"], t))
        # Same dtypes and shapes as `params`, so the compiled step is reused.
        m = params.market
        none = eqx.tree_at(lambda p: p.market.open_rate, params, jnp.zeros_like(m.open_rate))
        none = eqx.tree_at(lambda p: p.market.leverage_vol, none, jnp.zeros_like(m.leverage_vol))
        if reason == "solvency":  # no capacity at all: a_s = 0 (the arbitrageur's too)
            cap = jnp.zeros_like(params.pool.max_utilisation)
            none = eqx.tree_at(lambda p: p.pool.max_utilisation, none, cap)
            rate = jnp.full_like(m.open_rate, 0.05)
            bad = eqx.tree_at(lambda p: p.market.open_rate, none, rate)
        else:  # leverage 100: m on [0.005, 0.015] < 1/25, a_c = 0
            rate = jnp.full_like(m.open_rate, 1e-4)
            bad = eqx.tree_at(lambda p: p.market.open_rate, none, rate)
            bad = eqx.tree_at(lambda p: p.market.leverage, bad, jnp.full_like(m.leverage, 100.0))
        a = to_numpy(busy["step_fn"](s, none, n))
        b = to_numpy(busy["step_fn"](s, bad, n))
    r = busy["spec"].num_risky
    assert float(b.accounts.rejected) - float(a.accounts.rejected) == pytest.approx(2 * r)
    b_full = b
    b = eqx.tree_at(lambda x: x.accounts.rejected, b, a.accounts.rejected)
    for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # The reference agrees, and names the reason.
    st = ref.init_ref_state(busy["rspec"], busy["rparams"])
    st.t, st.prices = t, np.array(s.pool.prices)
    st.reserves, st.supply = np.array(s.pool.reserves), float(s.pool.supply)
    ref.set_book(st, book_dict(s.book))
    st.accounts = {name: float(getattr(s.accounts, name)) for name in ref.ACCOUNT_FIELDS}
    rn = ref.noise_from_pdlpjax(to_numpy(n))
    ra = ref.step(st, ref.params_from_pdlpjax(none), busy["rspec"], rn)
    rb = ref.step(st, ref.params_from_pdlpjax(bad), busy["rspec"], rn)
    diff = rb.events[f"rejected_{reason}"] - ra.events[f"rejected_{reason}"]
    assert diff == pytest.approx(2 * r)
    assert rb.accounts["rejected"] - ra.accounts["rejected"] == pytest.approx(2 * r)
    np.testing.assert_array_equal(rb.reserves, ra.reserves)
    for name, x in ref.book_arrays(rb).items():
        np.testing.assert_array_equal(x, ref.book_arrays(ra)[name])
    compare_state(rb, b_full, r, t)


# --------------------------------------------------------------------------- invariants


def random_config(rng: np.random.Generator, num_pools: int, dtype: str, model: str, K: int):
    """Per-pool random dynamic params (one compile per static shape)."""

    def u(lo, hi):
        return [float(v) for v in rng.uniform(lo, hi, num_pools)]

    lev = u(2.0, 20.0)
    spread = u(0.0, 0.9)
    spread[0] = 0.0  # one pool without spread: buckets liquidated whole
    return config_from_dict(
        {
            "market": {
                "assets": ["BTC", "ETH", "SOL"],
                "initial_prices": [60000.0, 3000.0, 140.0],
                "cohorts": K,
                "funding_kappa": u(0.0, 0.02),
                "funding_cap": u(0.001, 0.05),
                "open_rate": [
                    [float(x) for x in rng.uniform(0.0, 0.05, 3)] for _ in range(num_pools)
                ],
                "mean_holding": u(1.0, 30.0),
                "leverage": lev,
                "leverage_vol": u(0.0, 1.0),
                "leverage_spread": spread,
                "max_leverage": [max(x, 1.0) * 2.0 for x in lev],
                "momentum": u(-1.0, 1.0),
                "noise_vol": u(0.0, 1.5),
                "arb_leverage": u(0.0, 4.0),
            },
            "paths": {
                "model": model,
                "vols": [[float(x) for x in rng.uniform(0.2, 1.5, 3)] for _ in range(num_pools)],
                "drifts": [[float(x)] * 3 for x in u(-0.5, 0.5)],
                "correlation": [[1.0, 0.8, 0.6], [0.8, 1.0, 0.65], [0.6, 0.65, 1.0]],
                "jump_intensity": [[float(x)] * 3 for x in u(0.0, 30.0)],
                "crash_intensity": u(0.0, 10.0),
            },
            "pool": {
                "target_weights": [0.2, 0.2, 0.3, 0.3],
                "fee": u(0.0, 1e-3),
                "max_utilisation": u(0.05, 0.95),
                "lp_flow_drift": u(-2.0, 2.0),
                "lp_flow_vol": u(0.0, 2.0),
            },
            "simulation": {
                "num_pools": num_pools,
                "num_steps": 240,
                "steps_per_year": 365.0,
                "dtype": dtype,
                "seed": int(rng.integers(1000)),
            },
            "output": {"record_every": 4},
        }
    )


@pytest.mark.parametrize(
    "dtype,model,K,seed",
    [("float32", "jump", 4, 0), ("float64", "garch", 8, 1)],
    ids=["f32-jump-K4", "f64-garch-K8"],
)
def test_invariants_over_random_configs(dtype, model, K, seed):
    """Reserves ≥ 0, R^A ≥ 0 (lent ≤ reserves), the accounting identity and no NaN."""
    rng = np.random.default_rng(seed)
    cfg = random_config(rng, 12, dtype, model, K)
    tol = 1e-5 if dtype == "float32" else 1e-10
    with jax.enable_x64(dtype == "float64"):
        out = P.simulate(
            P.make_params(cfg),
            P.make_model(cfg),
            P.make_spec(cfg),
            seed=cfg.simulation.seed,
            num_steps=cfg.simulation.num_steps,
        )
    state, rec = to_numpy(out.state), out.record
    for leaf in jtu.tree_leaves(state) + jtu.tree_leaves(rec):
        assert not np.any(np.isnan(np.asarray(leaf, np.float64)))
    scale = np.max(np.abs(state.pool.reserves), axis=-1, keepdims=True)
    assert np.all(rec.reserves >= -tol * np.max(np.abs(rec.reserves)))
    assert np.all(state.pool.reserves >= -tol * scale)
    open_size = np.where(state.book.is_open, state.book.size, 0.0)
    long_tokens = open_size[:, :, 0].sum(-1)
    short_value = np.where(state.book.is_open, state.book.notional, 0.0)[:, :, 1].sum((-1, -2))
    avail = state.pool.reserves - np.concatenate([long_tokens, short_value[:, None]], axis=1)
    assert np.all(avail >= -tol * scale), avail.min()
    assert np.all(state.accounts.identity_error < tol), state.accounts.identity_error.max()
    assert np.all(out.metrics["identity_error"] < tol)
    assert np.all(out.metrics["lp_identity_error"] < tol)
    assert np.all(state.pool.supply > 0) and np.all(rec.share_price > 0)
    # Open buckets are well formed; counts are crowd-equivalents.
    live = state.book.is_open
    assert np.all(state.book.size[live] > 0) and np.all(state.book.notional[live] > 0)
    assert np.all(state.book.spread[live] >= 0) and np.all(state.book.count[live] > 0)
    assert np.all(state.accounts.rejected >= 0) and np.all(state.accounts.exits > 0)
    # The runs were not idle.
    assert state.accounts.opened.sum() > 0 and state.accounts.liquidations.sum() > 0


def test_twm_settlement_matches_reference():
    """Target-weight trades of a glp run (eq. 11 as printed), float64: the shares the JAX step
    mints and burns and the dilution it reports match the reference's §3.3 / eq. 9
    settlement (`ref.twm_settle`, with F from its own eq. 11, `ref.glp_discount`), and the
    dilution is the arbitrageur's real gain."""
    from pdlpjax.simulate import _available
    from pdlpjax.twm import twm_arbitrage

    raw = {**BUSY, "pool": {**BUSY["pool"], "discount": "glp"}}
    with jax.enable_x64(True):
        params, model, spec, _, _ = one_pool(raw)
        key = P.pool_keys(0, 1)[0][0]
        step = jax.jit(
            lambda s, t: P.step(s, params, model, spec, P.draw_noise(model, spec, key, t))
        )
        r, pp = spec.num_risky, params.pool

        @jax.jit  # one compile, not 30 op-by-op solver runs
        def trade(s):
            value = P.aum(s.pool, s.book, r)
            tw = twm_arbitrage("glp", s.pool, value, _available(s.pool, s.book, r), pp, 10)
            return value, tw

        s = P.init_state(params, model, spec)
        kinds = set()
        for t in range(30):
            s = step(s, jnp.int32(t))
            value, tw = trade(s)
            if float(tw.created + tw.redeemed) == 0:
                continue
            p, res = np.asarray(s.pool.prices), np.asarray(s.pool.reserves)
            change = np.asarray(tw.reserve_change)
            w, base, tax = (
                np.asarray(pp.target_weights),
                float(pp.discount_base),
                float(pp.discount_tax),
            )
            F = ref.glp_discount(p, w, res, change, base, tax)
            deposit = float(p @ np.maximum(change, 0.0))
            withdrawal = float(p @ np.maximum(-change, 0.0))
            want = ref.twm_settle(
                float(value),
                float(s.pool.supply),
                deposit if float(tw.created) else 0.0,
                F,
                withdrawal if float(tw.redeemed) else 0.0,
                F,
            )
            assert_close(
                f"step {t} supply change", want["minted"] - want["burnt"], tw.supply_change
            )
            assert_close(f"step {t} dilution", want["gain"], tw.profit)
            kinds.add("create" if float(tw.created) else "redeem")
        assert "create" in kinds


# --------------------------------------------------------------------------- target weights

T_TWM = 100  # steps of the glp run (creations and redemptions both happen)
T_GMX = 40  # steps of the gmx run (GMX fees never pay: nothing trades)
# The solver's pick must earn at least (1 − this) of the brute-force optimum.
TWM_OPTIMUM_RTOL = 0.01


def twm_run(kind: str, steps: int) -> dict:
    """BUSY with the target-weight arbitrage on (`pool.discount = kind`), run through the
    JAX step (every state kept) and through the reference on the same draws, in float64."""
    raw = {**BUSY, "pool": {**BUSY["pool"], "discount": kind}}
    with jax.enable_x64(True):
        params, model, spec, rspec, rparams = one_pool(raw)
        key = P.pool_keys(0, 1)[0][0]
        noise_fn = jax.jit(lambda t: P.draw_noise(model, spec, key, t))
        step_fn = jax.jit(lambda s, p, n: P.step(s, p, model, spec, n))
        s = P.init_state(params, model, spec)
        states, noises = [], []
        for t in range(steps):
            n = noise_fn(t)
            s = step_fn(s, params, n)
            states.append(to_numpy(s))
            noises.append(to_numpy(n))
    states = jtu.tree_map(lambda *xs: np.stack(xs), *states)
    noise = jtu.tree_map(lambda *xs: np.stack(xs), *noises)
    ref_states, st = [], ref.init_ref_state(rspec, rparams)
    for t in range(steps):
        st = ref.step(st, rparams, rspec, ref.noise_from_pdlpjax(noise, t))
        ref_states.append(st)
    return dict(kind=kind, params=params, spec=spec, rparams=rparams, states=states, ref=ref_states)


@pytest.fixture(scope="module")
def twm_glp():
    return twm_run("glp", T_TWM)


@pytest.fixture(scope="module")
def twm_gmx():
    return twm_run("gmx", T_GMX)


@pytest.mark.parametrize("kind", ["glp", "gmx"])
def test_twm_step_matches_reference_every_step(kind, request):
    """The JAX step with target-weight arbitrage (step 5: creation eq. 7 or redemption eq. 10
    priced by the discount F, eq. 11 "glp" or GMX fees "gmx") against the reference step,
    whose solver is written independently, on the same draws: state, book and accounts
    (twm_flows, dilution, creations, redemptions, share_dilution included) to 1e-9 at every
    step, and both identities to 1e-12.

    glp (eq. 11 as printed, F ≥ γ_b > 0 on any trade moving a weight toward w*) pays both
    ways: the run has creations and redemptions. GMX fees are never negative, so F ≤ 0 and
    neither eq. 7 nor eq. 10 can profit: the gmx run must not trade at all (both solvers
    still run every step; `test_twm_discount_derivatives_match_autodiff` checks what they
    see, F and its derivatives)."""
    run = request.getfixturevalue(f"twm_{kind}")
    r = run["spec"].num_risky
    for t in range(len(run["ref"])):
        compare_state(run["ref"][t], at(run["states"], t), r, t)
    acc = run["ref"][-1].accounts
    if kind == "glp":
        assert acc["creations"] > 0 and acc["redemptions"] > 0
        assert acc["dilution"] > 0 and acc["share_dilution"] < 0
    else:
        assert acc["creations"] == acc["redemptions"] == acc["dilution"] == 0


# Pool states (prices, reserves, share supply, AUM, R^A; BTC, ETH, numéraire) after steps 3,
# 9, ..., 97 of the BUSY run with pool.discount = "glp" (commit 6d89693), to 10 digits: fixed
# here, so that the optimality checks do not move with the book's trajectory.
TWM_STATES = {
    3: (
        (61006.01424, 3066.676422, 1.0),
        (4.15254007, 84.01296184, 344744.696),
        841440.8097,
        856875.2894,
        (2.906778049, 71.2006397, 241321.2872),
    ),
    9: (
        (57196.29883, 2946.597999, 1.0),
        (6.81689432, 138.6470204, 518074.7424),
        1336250.258,
        1315127.942,
        (5.059769539, 105.1048604, 362652.3197),
    ),
    19: (
        (65600.56716, 4109.496763, 1.0),
        (6.688479743, 120.7229556, 516712.5902),
        1302698.365,
        1435285.481,
        (4.68193582, 92.03588891, 361698.8132),
    ),
    29: (
        (52147.41795, 4156.87266, 1.0),
        (20.5479184, 290.2556925, 1446445.689),
        3653865.055,
        3678758.905,
        (14.69981314, 209.9443671, 1012511.982),
    ),
    49: (
        (76623.9035, 4908.824411, 1.0),
        (8.857063522, 134.7466691, 972326.2063),
        1996462.283,
        2267549.027,
        (5.676743271, 85.67635298, 658251.8881),
    ),
    71: (
        (132833.8071, 11043.28349, 1.0),
        (8.834466725, 106.554485, 1249648.83),
        2186203.527,
        3472195.113,
        (4.445420039, 63.28263711, 823290.1554),
    ),
    76: (
        (136680.5383, 12251.30762, 1.0),
        (2.491024071, 28.30225075, 499191.1452),
        694274.7256,
        1121422.883,
        (0.7271646446, 12.29273919, 327847.1563),
    ),
    97: (
        (169994.4222, 15913.85872, 1.0),
        (2.514309221, 26.9133471, 583944.0738),
        785902.5218,
        1426915.567,
        (1.874021559, 20.41042253, 408760.8516),
    ),
}
_TWM_POINTS: dict = {}


def jax_twm(kind: str, params, spec):
    """Jitted (pool, AUM, R^A) → (`twm_arbitrage`'s result, each solver's trade and profit),
    the solvers set up as `twm_arbitrage` sets them up."""
    from pdlpjax.arbitrage import create_arbitrage, redeem_arbitrage
    from pdlpjax.discount import discount_subgradient
    from pdlpjax.twm import discount_function, twm_arbitrage

    pp, steps = params.pool, spec.twm_steps

    @jax.jit
    def solve(pool, value, avail):
        picked = twm_arbitrage(kind, pool, value, avail, pp, steps)
        p = pool.prices
        scale = jnp.maximum(value, jnp.finfo(p.dtype).tiny)
        F = discount_function(kind, p, pool.reserves, pp)

        def F_x(x):
            return F(x * (scale / p))

        n = p.shape[0]
        g_in = discount_subgradient(F_x, n, p.dtype, eps=1e-3)
        g_out = -discount_subgradient(lambda x: F_x(-x), n, p.dtype, eps=1e-3)
        cap = jnp.broadcast_to(pp.twm_capital, p.shape)
        ones = jnp.ones_like(p) * scale
        room = jnp.minimum(jnp.maximum(avail, 0.0) * p / scale, cap)
        c = create_arbitrage(F_x, ones, jnp.zeros_like(p), pp.twm_mu, steps, g=g_in, upper=cap)
        rd = redeem_arbitrage(F_x, ones, room, pp.twm_mu, steps, g=g_out)
        return picked, (c.trade, c.profit, rd.trade, rd.profit)

    return solve


def twm_point(kind: str, t: int) -> dict:
    """`TWM_STATES[t]` under the discount `kind` (BUSY's other settings): the JAX solvers'
    results, the reference's (`ref.twm_trade`) and the brute-force optimum
    (`ref.twm_brute_force`), cached."""
    if (kind, t) in _TWM_POINTS:
        return _TWM_POINTS[kind, t]
    prices, reserves, supply, value, avail = (np.asarray(a, np.float64) for a in TWM_STATES[t])
    raw = {**BUSY, "pool": {**BUSY["pool"], "discount": kind}}
    with jax.enable_x64(True):
        params, _, spec, _, rprm = one_pool(raw)
        if ("solve", kind) not in _TWM_POINTS:
            _TWM_POINTS["solve", kind] = jax_twm(kind, params, spec)
        pool = P.PoolState(jnp.asarray(prices), jnp.asarray(reserves), jnp.asarray(supply))
        out = _TWM_POINTS["solve", kind](pool, jnp.asarray(value), jnp.asarray(avail))
        picked, solvers = to_numpy(out)
    args = (kind, prices, reserves)
    mine = ref.twm_trade(*args, float(supply), float(value), avail, rprm, spec.twm_steps)
    brute = ref.twm_brute_force(*args, float(value), avail, rprm, points=21, refine=3000)
    _TWM_POINTS[kind, t] = dict(
        value=float(value), picked=picked, solvers=solvers, ref=mine, brute=brute
    )
    return _TWM_POINTS[kind, t]


def twm_xfail(reason: str):
    """A known shortfall of the solver: it must fail (strict), for the reason given."""
    return pytest.mark.xfail(strict=True, reason=reason)


TWM_PICK_XFAIL = (
    "the pick earns {:.1%} of the brute-force optimum: eq. 11 as printed jumps where an "
    "asset's weight stops moving toward w* (past the mirror of its deviation), the gradient "
    "is 0 on a rebate branch, so the ascent runs to the capital cap; the optimum deposits a "
    "little less of one asset and keeps its rebate"
)


@pytest.mark.parametrize(
    "kind,t",
    [
        ("glp", 9),
        ("glp", 19),
        ("glp", 29),
        ("glp", 49),
        ("glp", 71),
        ("glp", 76),
        ("gmx", 9),
        ("gmx", 49),
        ("gmx", 97),
        pytest.param("glp", 3, marks=twm_xfail(TWM_PICK_XFAIL.format(0.9505))),
        pytest.param("glp", 97, marks=twm_xfail(TWM_PICK_XFAIL.format(0.9657))),
    ],
)
def test_twm_pick_near_brute_force_optimum(kind, t):
    """Optimality of the target-weight arbitrage, independently of the solver: on the pool
    state `TWM_STATES[t]`, the profit of the trade `twm_arbitrage` picks (creation eq. 7 or
    redemption eq. 10, discount eq. 11) is at least 99% (tolerance `TWM_OPTIMUM_RTOL` = 1%) of
    the best found by `ref.twm_brute_force` (a 21-point grid per asset over each box of value
    fractions, [0, twm_capital]³ and [0, min(R^A p/AUM, twm_capital)]³, then 3000 random
    refinements; no gradients). The reference's solver agrees with both JAX solvers (profits
    to 1e-9, trades to 1e-6) and with the pick. gmx: no trade can profit (F ≤ 0), none is made.

    Of the 8 glp states the pick is within 1% on 6: after steps 3 and 97 it is materially
    below (95.0%, 96.6%: xfail, strict)."""
    pt = twm_point(kind, t)
    picked, (c_trade, c_profit, r_trade, r_profit) = pt["picked"], pt["solvers"]
    mine, value = pt["ref"], pt["value"]
    assert_close(f"state {t} create profit", mine["create_profit"], c_profit)
    assert_close(f"state {t} redeem profit", mine["redeem_profit"], r_profit)
    # At an interior optimum the profit is flat to first order, so rounding can move the
    # trade by up to about √ε (seen: 3e-8) while the profits agree to 1e-15.
    assert_close(f"state {t} create trade", mine["create_trade"], c_trade, rtol=1e-6)
    assert_close(f"state {t} redeem trade", mine["redeem_trade"], r_trade, rtol=1e-6)
    assert_close(f"state {t} pick", mine["gain"], picked.profit)
    assert (mine["created"], mine["redeemed"]) == (float(picked.created), float(picked.redeemed))
    best = max(pt["brute"]["create"][0], pt["brute"]["redeem"][0])
    if kind == "gmx":
        assert best == 0.0 and float(picked.created + picked.redeemed) == 0
        return
    assert float(picked.created + picked.redeemed) == 1
    got = float(picked.profit)
    assert got >= (1.0 - TWM_OPTIMUM_RTOL) * best, (
        f"state {t}: the pick earns {got / value:.6e} of AUM, brute force {best / value:.6e} "
        f"({got / best:.2%})"
    )


TWM_SOLVER_XFAIL = (
    "the {} solver alone earns {:.1%} of the brute-force optimum of its box: the jumps of "
    "eq. 11 (see the pick's xfail)"
)
_SOLVER_SHORT = {  # (side, state): the solver's share of the brute-force optimum
    ("create", 3): 0.9505,
    ("create", 29): 0.9462,
    ("create", 71): 0.6765,
    ("create", 97): 0.9657,
    ("redeem", 3): 0.9822,
    ("redeem", 19): 0.9787,
    ("redeem", 49): 0.9648,
    ("redeem", 76): 0.8413,
}


@pytest.mark.parametrize(
    "side,t",
    [
        pytest.param(
            side,
            t,
            marks=[twm_xfail(TWM_SOLVER_XFAIL.format(side, _SOLVER_SHORT[side, t]))]
            if (side, t) in _SOLVER_SHORT
            else [],
        )
        for side in ("create", "redeem")
        for t in TWM_STATES
    ],
)
def test_twm_each_solver_near_brute_force_optimum(side, t):
    """Each solver on its own box (glp, `TWM_STATES[t]`): the profit of the creation (eq. 7)
    or redemption (eq. 10) solver is at least 99% (tolerance `TWM_OPTIMUM_RTOL` = 1%) of
    `ref.twm_brute_force`'s best on the same box.

    Each is within 1% on 4 of the 8 states; the others are xfail (strict), worst: creation
    67.6% (state 71), redemption 84.1% (state 76). The pick is better than either (6 of 8,
    `test_twm_pick_near_brute_force_optimum`): the other side is often the optimum."""
    pt = twm_point("glp", t)
    c_trade, c_profit, r_trade, r_profit = pt["solvers"]
    got = float(c_profit if side == "create" else r_profit)
    best = pt["brute"][side][0]
    assert got >= (1.0 - TWM_OPTIMUM_RTOL) * best, (
        f"state {t}: the {side} solver earns {got / pt['value']:.6e} of AUM, brute force "
        f"{best / pt['value']:.6e} ({got / best:.2%})"
    )


@pytest.mark.parametrize("kind", ["glp", "gmx"])
def test_twm_discount_derivatives_match_autodiff(kind, request):
    """The reference's F (eq. 11 as printed; GMX fees, integer bps with floors) and its
    gradient and Hessian in value fractions (`ref.discount_jet`, by hand) against the JAX
    F and jax.grad / jax.hessian, at random trades of both signs (deposits and withdrawals,
    each up to twm_capital of AUM) on pool states of the run: to 1e-9."""
    from pdlpjax.twm import discount_function

    run = request.getfixturevalue(f"twm_{kind}")
    pp, prm = run["params"].pool, run["rparams"]

    @jax.jit
    def jet(p, res, value, x):
        F = discount_function(kind, p, res, pp)

        def F_x(y):
            return F(y * (value / p))

        return F_x(x), jax.grad(F_x)(x), jax.hessian(F_x)(x)

    rng = np.random.default_rng(1)
    fees = set()
    for t in (0, 10, 20, 30):
        js = at(run["states"], t)
        p, res = js.pool.prices, js.pool.reserves
        value = float(ref.aum(run["ref"][t], run["spec"].num_risky))
        to_tokens = value / p
        for _ in range(5):
            x = rng.uniform(-prm.twm_capital, prm.twm_capital, p.shape)
            with jax.enable_x64(True):
                want = to_numpy(jet(*(jnp.asarray(a) for a in (p, res, value, x))))
            got = ref.discount_jet(
                kind,
                p,
                prm.target_weights,
                res,
                x * to_tokens,
                p * to_tokens,
                prm.discount_base,
                prm.discount_tax,
            )
            value_f = ref.twm_discount(
                kind, p, prm.target_weights, res, x * to_tokens, prm.discount_base, prm.discount_tax
            )
            where = f"{kind} step {t} x {x}: "
            assert_close(where + "F", got[0], want[0])
            assert_close(where + "F (value)", value_f, want[0])
            assert_close(where + "gradient", got[1], want[1])
            assert_close(where + "Hessian", got[2], want[2])
            fees.add(round(float(want[0]), 6))
    assert len(fees) > 1  # not one constant F
