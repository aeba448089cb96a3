"""The JAX step against the plain NumPy reference (`tests/reference.py`) on the same draws,
the paper's worked examples (Chitra et al. §2.1, Appendix A), rejections, and invariants."""

from __future__ import annotations

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

# A small, busy pool: high leverage and jumps (liquidations, bad debt), κ large enough for
# funding to move margins and to pay the arbitrageur, a low utilisation cap (solvency
# rejections), leverage draws that cross max_leverage (collateral rejections), short holding
# times (random exits) and K = 4 cohorts (full rings merge), and LP flows both ways.
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
BOOK_FLOATS = ("size", "entry", "margin", "leverage")


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
    )
    return params, model, spec, rspec, ref.params_from_pdlpjax(params)


def book_dict(book) -> dict:
    """A `Book`'s fields as NumPy arrays, by name."""
    names = ("size", "entry", "margin", "leverage", "opened_at", "is_open")
    return {name: np.asarray(getattr(book, name)) for name in names}


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
    np.testing.assert_array_equal(book["opened_at"][live], js.book.opened_at[live])
    jaum = np.sum(js.pool.prices * js.pool.reserves) - np.sum(
        np.where(
            js.book.is_open,
            np.array([1.0, -1.0])[None, :, None]
            * js.book.size
            * (js.pool.prices[:r, None, None] - js.book.entry),
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
    for name in (
        "liquidations",
        "bad_debt_events",
        "funding_payments",
        "fee_payments",
        "random_exits",
        "merged",
        "rejected_collateral",
        "rejected_solvency",
        "arb_opened",
        "lp_deposits",
        "lp_withdrawals",
    ):
        assert ev[name] > 0, name
    acc = at(busy["states"], T - 1).accounts
    assert float(acc.liquidations) == ev["liquidations"]
    assert float(acc.merged) == ev["merged"]
    assert float(acc.exits) == ev["random_exits"]
    assert float(acc.rejected) == ev["rejected_collateral"] + ev["rejected_solvency"]
    assert float(acc.opened) == ev["opened"]
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
            u_exit=jnp.asarray(rng.uniform(size=(40, 3, 2, spec.num_cohorts))),
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


def test_funding_rate_worked_example():
    """§2.1: L = 1000, S = 250 at p = p0 = 2000 gives γ_L = 3κ, and longs pay shorts."""
    kappa = 1e-3
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
        # Longs pay: one long cohort of 1000 and one short of 250, margins 1e6 each.
        book = market.Book(
            size=jnp.array([[[1000.0], [250.0]]]),
            entry=jnp.full((1, 2, 1), 2000.0),
            margin=jnp.full((1, 2, 1), 1e6),
            leverage=jnp.ones((1, 2, 1)),
            opened_at=jnp.zeros((1, 2, 1), jnp.int32),
            is_open=jnp.ones((1, 2, 1), bool),
        )
        book, paid = market.pay_funding(book, gamma, jnp.array([2000.0]))
        owed = 3 * kappa * 1000.0 * 2000.0
        np.testing.assert_allclose(float(paid), owed, rtol=1e-12)
        np.testing.assert_allclose(
            np.asarray(book.margin)[0, :, 0], [1e6 - owed, 1e6 + owed], rtol=1e-12
        )


def test_liquidation_worked_example():
    """§2.1: c = 2000, η = 4, p0 = 2000 liquidates at p = 1500.

    The paper states δ = 1 ETH, but also a notional δ p0 of 8000 USD and liquidation at
    p0 (1 − 1/η) = 1500 for a position saturating eq. 1: both need δ = η c / p0 = 4. With
    δ = 1 the condition δ (p0 − p) ≥ c would give p ≤ 0. (It also prints "$1,5000".)
    We test the consistent reading δ = 4.
    """
    delta, c, p0 = 4.0, 2000.0, 2000.0
    assert delta * p0 == 8000.0 and delta * p0 <= 4 * c  # eq. 1, saturated
    assert p0 - c / 1.0 == 0.0  # the δ = 1 reading: liquidation price 0
    with jax.enable_x64(True):
        book = market.Book(
            size=jnp.full((1, 2, 1), delta),
            entry=jnp.full((1, 2, 1), p0),
            margin=jnp.full((1, 2, 1), c),
            leverage=jnp.full((1, 2, 1), 4.0),
            opened_at=jnp.zeros((1, 2, 1), jnp.int32),
            is_open=jnp.array([[[True], [False]]]),
        )
        for p, want in [(1500.0, True), (1500.01, False), (1400.0, True), (2500.0, False)]:
            got = bool(market.liquidation_mask(book, jnp.array([p]))[0, 0, 0])
            assert got is want, p
            assert ref.is_liquidatable(ref.Cohort(delta, p0, c, 4.0, 0, True), ref.LONG, p) is want
    # The short mirror: liquidated at p0 + c/δ = 2500.
    short = ref.Cohort(delta, p0, c, 4.0, 0, True)
    assert ref.is_liquidatable(short, ref.SHORT, 2500.0)
    assert not ref.is_liquidatable(short, ref.SHORT, 2499.99)


def test_collateral_condition_rejects_over_max_leverage():
    """Eq. 1, p0 δ ≤ η_max c: a request above max leverage is rejected, at it accepted."""
    with jax.enable_x64(True):
        book = market.empty_book(2, 2, jnp.float64)
        reserves = jnp.array([100.0, 1000.0, 1e6])
        prices = jnp.array([2000.0, 100.0])
        notional = jnp.full((2, 2), 1000.0)
        lev = jnp.array([[10.0, 10.000001], [9.0, 50.0]])
        ok = market.accept_trades(
            [(notional, lev)], prices, reserves, book, jnp.asarray(10.0), jnp.asarray(0.9)
        )
        np.testing.assert_array_equal(np.asarray(ok.size) > 0, [[True, False], [True, False]])
        assert float(ok.rejected) == 2.0
        np.testing.assert_allclose(np.asarray(ok.margin)[:, 0], [100.0, 1000.0 / 9.0])
        np.testing.assert_allclose(np.asarray(ok.size)[:, 0], [0.5, 10.0])
    assert ref.collateral_ok(10.0, 10.0) and not ref.collateral_ok(10.000001, 10.0)


def test_liquidation_set_on_hand_built_book():
    """Appendix A's liquidatable sets ℓ_L, ℓ_S on a hand-built book of two markets.

    Market 0 at p = 1800 (entries 2000): longs lose 200 per token, shorts gain.
    Market 1 at p = 110 (entries 100): shorts lose 10 per token, longs gain.
    """
    size = [
        [[1.0, 2.0, 10.0, 1.0], [3.0, 1.0, 0.0, 0.0]],
        [[5.0, 1.0, 0.0, 0.0], [4.0, 2.0, 1.0, 9.0]],
    ]
    margin = [
        # long: loss 200 (==c, liquidated), 400 (<c=500, safe), 2000 (>c=300, bad debt 1700),
        # closed cohort (would qualify but is not open)
        [[200.0, 500.0, 300.0, 1.0], [10.0, 10.0, 0.0, 0.0]],
        # market 1, long gains (safe); shorts lose 40 (c=40, liquidated), 20 (c=25, safe),
        # 10 (c=5, bad debt 5), 90 (c=100, safe)
        [[1.0, 1.0, 0.0, 0.0], [40.0, 25.0, 5.0, 100.0]],
    ]
    is_open = [
        [[True, True, True, False], [True, True, False, False]],
        [[True, True, False, False], [True, True, True, True]],
    ]
    entry = [[[2000.0] * 4] * 2, [[100.0] * 4] * 2]
    prices = np.array([1800.0, 110.0])
    expected = np.zeros((2, 2, 4), bool)
    expected[0, 0, 0] = expected[0, 0, 2] = True
    expected[1, 1, 0] = expected[1, 1, 2] = True
    with jax.enable_x64(True):
        book = market.Book(
            size=jnp.array(size),
            entry=jnp.array(entry),
            margin=jnp.array(margin),
            leverage=jnp.ones((2, 2, 4)),
            opened_at=jnp.zeros((2, 2, 4), jnp.int32),
            is_open=jnp.array(is_open),
        )
        mask = np.asarray(market.liquidation_mask(book, jnp.asarray(prices)))
        np.testing.assert_array_equal(mask, expected)
        out = market.settle(book, jnp.asarray(mask), jnp.asarray(prices))
        # The pool takes each liquidated margin; the gap beyond it is bad debt.
        assert float(out.received) == pytest.approx(200.0 + 300.0 + 40.0 + 5.0)
        assert float(out.bad_debt) == pytest.approx(1700.0 + 5.0)
        assert float(out.paid) == 0.0 and float(out.count) == 4.0
        np.testing.assert_allclose(np.asarray(out.reserve_change), [0.0, 0.0, 545.0])
        np.testing.assert_array_equal(np.asarray(out.book.is_open), np.array(is_open) & ~expected)
    got = np.zeros((2, 2, 4), bool)
    for i in range(2):
        for s in range(2):
            for k in range(4):
                c = ref.Cohort(
                    size[i][s][k], entry[i][s][k], margin[i][s][k], 1.0, 0, is_open[i][s][k]
                )
                got[i, s, k] = ref.is_liquidatable(c, s, prices[i])
    np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize("reason", ["solvency", "collateral"])
def test_rejected_trade_changes_nothing_but_the_counter(busy, reason):
    """A request that breaks solvency (demand far above max_utilisation) or the collateral
    condition is rejected and counted; the state is otherwise bitwise the one where no
    demand arrives at all."""
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
        if reason == "solvency":  # notional 50× the pool value, far above max_utilisation
            rate = jnp.full_like(m.open_rate, 50.0)
            bad = eqx.tree_at(lambda p: p.market.open_rate, none, rate)
        else:  # a small trade at leverage 100 > max_leverage = 25
            rate = jnp.full_like(m.open_rate, 1e-4)
            bad = eqx.tree_at(lambda p: p.market.open_rate, none, rate)
            bad = eqx.tree_at(lambda p: p.market.leverage, bad, jnp.full_like(m.leverage, 100.0))
        a = to_numpy(busy["step_fn"](s, none, n))
        b = to_numpy(busy["step_fn"](s, bad, n))
    r = busy["spec"].num_risky
    assert float(b.accounts.rejected) - float(a.accounts.rejected) == 2 * r
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
    assert rb.events[f"rejected_{reason}"] - ra.events[f"rejected_{reason}"] == 2 * r
    assert rb.accounts["rejected"] - ra.accounts["rejected"] == 2 * r
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
    short_value = (open_size[:, :, 1] * state.book.entry[:, :, 1]).sum((-1, -2))
    avail = state.pool.reserves - np.concatenate([long_tokens, short_value[:, None]], axis=1)
    assert np.all(avail >= -tol * scale), avail.min()
    assert np.all(state.accounts.identity_error < tol), state.accounts.identity_error.max()
    assert np.all(out.metrics["identity_error"] < tol)
    assert np.all(out.metrics["lp_identity_error"] < tol)
    assert np.all(state.pool.supply > 0) and np.all(rec.share_price > 0)
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
