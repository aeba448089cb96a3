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
from pdlpjax.twm import twm_arbitrage

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
    """Existing LPs lose profit · S/S' of value: the arbitrageur's gain, shared with its own
    new shares (S, S': supply before and after)."""
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
            lost = supply * (before - after)
            np.testing.assert_allclose(lost, float(tw.profit) * supply / new_supply, rtol=1e-9)
            assert float(tw.profit) > 0
        assert acted > 0


def test_swap_arbitrage_loss_and_fee_threshold():
    res = _run("pool.swap_arbitrage=true")
    assert np.all(res.metrics["swap_loss"] > 0)
    assert np.all(res.metrics["identity_error"] < 1e-5)
    free = _run("pool.swap_arbitrage=true", "pool.swap_fee=0.9", "pool.discount_tax=0.0")
    np.testing.assert_array_equal(free.metrics["swap_loss"], 0.0)
