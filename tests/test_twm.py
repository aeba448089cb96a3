"""Target-weight arbitrage and swap arbitrage inside the step (DESIGN step 5)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import pdlpjax as P
from pdlpjax.simulate import _available
from pdlpjax.twm import twm_arbitrage, twm_settle

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml"


def _run(*extra: str, pools: int = 8, steps: int = 96):
    cfg = P.load_config(
        QUICKSTART,
        [
            f"simulation.num_pools={pools}",
            f"simulation.num_steps={steps}",
            "simulation.chunk_length=0",
            "output.record_every=0",
            *extra,
        ],
    )
    return P.simulate(
        P.make_params(cfg), P.make_model(cfg), P.make_spec(cfg), seed=0, num_steps=steps
    )


@pytest.fixture(scope="module")
def glp_run():
    return _run('pool.discount="glp_axiomatic"')


def test_gmx_fees_never_pay_an_arbitrageur():
    res = _run('pool.discount="gmx"')
    assert np.all(res.metrics["creations"] == 0) and np.all(res.metrics["redemptions"] == 0)


def test_glp_arbitrage_trades_and_keeps_the_identity(glp_run):
    m = glp_run.metrics
    assert np.all(m["creations"] + m["redemptions"] > 0)
    assert np.all(m["dilution"] > 0)
    assert np.all(m["identity_error"] < 1e-5)
    assert glp_run.masked.size == 0


def test_no_discount_no_arbitrage():
    m = _run().metrics
    assert np.all(m["creations"] == 0) and np.all(m["dilution"] == 0)


def test_one_action_dilutes_existing_lps_by_the_arbitrage_profit():
    """The shares that are not the arbitrageur's (S for a creation, S' for a redemption; S,
    S': supply before and after) lose exactly the profit the solver maximised, and that
    profit is the arbitrageur's real gain."""
    with jax.enable_x64(True):
        cfg = P.load_config(
            QUICKSTART,
            [
                "simulation.num_pools=1",
                "simulation.num_steps=40",
                "simulation.chunk_length=0",
                "output.record_every=0",
                'simulation.dtype="float64"',
                'pool.discount="glp_axiomatic"',
            ],
        )
        params = jtu.tree_map(lambda x: x[0], P.make_params(cfg))
        model, spec = P.make_model(cfg), P.make_spec(cfg)
        key = P.pool_keys(0, 1)[0][0]
        s = P.init_state(params, model, spec)
        step = jax.jit(
            lambda s, t: P.step(s, params, model, spec, P.draw_noise(model, spec, key, t))
        )
        acted = 0
        for t in range(40):
            s = step(s, jnp.int32(t))
            value = P.aum(s.pool, s.book, 3)
            tw = twm_arbitrage(
                "glp_axiomatic", s.pool, value, _available(s.pool, s.book, 3), params.pool, 10
            )
            if float(tw.created + tw.redeemed) == 0:
                continue
            acted += 1
            supply = float(s.pool.supply)
            new_supply = supply + float(tw.supply_change)
            before, after = float(value) / supply, (float(value) + float(tw.flow)) / new_supply
            held = min(supply, new_supply)  # the shares that are not the arbitrageur's
            lost = held * (before - after)
            np.testing.assert_allclose(lost, float(tw.profit), rtol=1e-9)
            # What the arbitrageur really gains: shares × post-trade price − what it paid.
            if float(tw.created):
                gain = (new_supply - supply) * after - float(tw.flow)
            else:
                gain = -float(tw.flow) - (supply - new_supply) * before
            np.testing.assert_allclose(gain, float(tw.profit), rtol=1e-9)
            assert float(tw.profit) > 0
        assert acted > 0


def test_swap_arbitrage_loss_and_fee_threshold():
    res = _run("pool.swap_arbitrage=true")
    assert np.all(res.metrics["swap_loss"] > 0)
    assert np.all(res.metrics["identity_error"] < 1e-5)
    free = _run("pool.swap_arbitrage=true", "pool.swap_fee=0.9", "pool.discount_tax=0.0")
    np.testing.assert_array_equal(free.metrics["swap_loss"], 0.0)


def test_mint_pays_the_paper_share_on_the_40_percent_deposit():
    """§3.3: a deposit v into a pool worth V buys (1 + F)·v / (V + v) of the pool after it.

    V = S = 10⁶ (share price 1), v = 4·10⁵ (40% of AUM), F·v = 1587. Then m/(S + m) =
    401587/1.4·10⁶, so m = S·q/(1 − q) = 401587·10⁶/998413 = 402225.3…, and m shares are
    worth exactly 401587 = (1 + F)·v after the deposit: the gain is F·v = 1587. The old mint
    at the pre-deposit price, m = (1 + F)·v·S/V = 401587, is worth 401587·1.4/1.401587 =
    401132.3…: a gain of 1132.3 while 1587 was reported.
    """
    with jax.enable_x64(True):
        V = S = jnp.float64(1e6)
        v, F = jnp.float64(4e5), jnp.float64(1587.0 / 4e5)
        zero = jnp.float64(0.0)
        minted, burnt = twm_settle(V, S, v, F, zero, zero)
        m = float(minted)
        assert float(burnt) == 0.0
        np.testing.assert_allclose(m, 401587e6 / 998413, rtol=1e-12)
        np.testing.assert_allclose(m / (1e6 + m), 401587.0 / 1.4e6, rtol=1e-12)
        gain = m * 1.4e6 / (1e6 + m) - 4e5
        np.testing.assert_allclose(gain, 1587.0, rtol=1e-9)
        old = 401587.0 * 1.4e6 / (1e6 + 401587.0) - 4e5  # the pre-fix mint
        np.testing.assert_allclose(old, 1132.3, atol=0.05)
        # Redemption (eq. 9): pᵀλ = 10⁵ with f = 1% burns σ = 10⁵/1.01 shares bought at 1.
        _, burnt = twm_settle(V, S, zero, zero, jnp.float64(1e5), jnp.float64(0.01))
        np.testing.assert_allclose(float(burnt), 1e5 / 1.01, rtol=1e-12)


def test_solver_profit_is_the_real_gain_of_a_40_percent_deposit():
    """eq. 11 as printed on a pool off its targets: the arbitrageur deposits its full capital
    (0.1 of AUM per asset, 40% in all) and the profit it maximised, F·v, is what its shares
    are worth after the deposit less v (float64, to 1e-9)."""
    with jax.enable_x64(True):
        cfg = P.load_config(QUICKSTART, ["simulation.num_pools=1", 'simulation.dtype="float64"'])
        params = jtu.tree_map(lambda x: x[0], P.make_params(cfg)).pool
        prices = jnp.array([93888.85, 3242.13, 139.44, 1.0])
        off = jnp.array([0.10, 0.05, 0.55, 0.30])  # value weights, targets 0.14/0.09/0.47/0.30
        pool = P.PoolState(prices, off * 1e6 / prices, jnp.float64(1e6))
        value = jnp.float64(1e6)
        tw = twm_arbitrage("glp", pool, value, pool.reserves, params, 10)
        assert float(tw.created) == 1.0
        v = float(tw.flow)
        np.testing.assert_allclose(v, 4e5, rtol=1e-6)  # every asset at its cap
        m = float(tw.supply_change)
        gain = m * (1e6 + v) / (1e6 + m) - v
        np.testing.assert_allclose(gain, float(tw.profit), rtol=1e-9)
