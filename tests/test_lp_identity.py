"""The LP wealth identity (`simulate.lp_identity`, `simulate.hedged_lp_identity`).

The accounting identity works on AUM only, so it cannot see the share supply: a mint or burn
at the wrong price balances ΔAUM. The LP identity follows the initial LPs' wealth (share
price × the shares they hold) and the hedged LP's (that + the hedge's cash), and breaks.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import pdlpjax as P
import pdlpjax.twm as twm
from pdlpjax.attribution import HEDGE_TERMS, LP_TERMS, POOL_TERMS
from pdlpjax.pool import guard_names

S = importlib.import_module("pdlpjax.simulate")  # `pdlpjax.simulate` is also a function
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml"
STEPS = 48


def _config(*extra: str, pools: int = 2, steps: int = STEPS):
    return P.load_config(
        QUICKSTART,
        [
            f"simulation.num_pools={pools}",
            f"simulation.num_steps={steps}",
            "simulation.chunk_length=0",
            "output.record_every=0",
            'simulation.dtype="float64"',
            *extra,
        ],
    )


@pytest.mark.parametrize("discount", twm.DISCOUNTS)
def test_lp_identity_holds_under_every_discount(discount):
    """Every discount, with swap arbitrage, LP flows and the hedged LP, float64."""
    with jax.enable_x64(True):
        cfg = _config(
            f'pool.discount="{discount}"',
            "pool.swap_arbitrage=true",
            "pool.lp_flow_vol=1.0",
            "hedge.enabled=true",
        )
        res = P.simulate(
            P.make_params(cfg), P.make_model(cfg), P.make_spec(cfg), seed=0, num_steps=STEPS
        )
    m, acc = res.metrics, jtu.tree_map(np.asarray, res.state.accounts)
    assert res.masked.size == 0
    assert np.all(m["lp_identity_error"] < 1e-11), m["lp_identity_error"]
    assert np.all(m["identity_error"] < 1e-11)
    assert np.all(acc.invalid_code == 0)
    # The P&L attribution is these identities summed: its terms add up to each view's total.
    lp = [*(f"attr_{t}" for t in LP_TERMS), *(f"attr_{t}" for t in HEDGE_TERMS)]
    np.testing.assert_allclose(sum(m[k] for k in lp), m["attr_total"], rtol=1e-12, atol=1e-12)
    pool = sum(m[f"pool_{t}"] for t in POOL_TERMS)  # TWM inflows grow AUM ~1e5-fold here
    np.testing.assert_allclose(pool, m["pool_total"], rtol=1e-12, atol=1e-12)
    if discount != "none":
        assert np.all(m["attr_dilution"] <= 0)
    # Not vacuous: LP flows, swap arbitrage and the hedge all moved money.
    assert np.all(np.abs(acc.lp_flows) > 0)
    assert np.all(m["swap_loss"] > 0) and np.all(m["rebalances"] > 0)
    if discount in ("glp", "glp_axiomatic", "glp_smooth"):
        assert np.all(m["creations"] + m["redemptions"] > 0)
        assert np.all(m["dilution"] > 0)


def _pre_fix_settle(value, supply, value_in, f_create, value_out, f_redeem):
    """The mint this repo had before: at the pre-deposit share price, m = (1 + F)·v·S/V."""
    price = value / supply
    minted = (1.0 + f_create) * value_in / price
    burnt = value_out / ((1.0 + f_redeem) * price)
    return jnp.where(value_in > 0, minted, 0.0), jnp.where(value_out > 0, burnt, 0.0)


def _run_steps(cfg, steps: int):
    params = jtu.tree_map(lambda x: x[0], P.make_params(cfg))
    model, spec = P.make_model(cfg), P.make_spec(cfg)
    key = P.pool_keys(0, 1)[0][0]
    # A fresh jit per call: it traces whatever `twm_settle` / `hedge_step` are now.
    step = jax.jit(lambda s, t: P.step(s, params, model, spec, P.draw_noise(model, spec, key, t)))
    s = P.init_state(params, model, spec)
    for t in range(steps):
        s = step(s, jnp.int32(t))
    return s.accounts


def test_guard_fires_on_the_pre_fix_mint(monkeypatch):
    """With the old mint ΔAUM still balances, but the LP identity breaks and guard 16 fires."""
    monkeypatch.setattr(twm, "twm_settle", _pre_fix_settle)
    with jax.enable_x64(True):
        acc = _run_steps(_config('pool.discount="glp"', pools=1), 12)
    assert float(acc.creations) > 0
    assert float(acc.identity_error) < 1e-12  # the AUM identity cannot see it
    assert float(acc.lp_identity_error) > 1e-4  # simulation.identity_tolerance
    code = int(acc.invalid_code)
    assert code & 16 and not code & 8, code
    assert "LP wealth identity" in guard_names(code)


def test_guard_fires_on_a_hedge_cash_leak(monkeypatch):
    """The hedged part: cash that appears from nowhere (1% of the LP's wealth) breaks it."""
    real = S.hedge_step

    def leaky(state, *args, **kwargs):
        new = real(state, *args, **kwargs)
        return eqx.tree_at(lambda h: h.stats.value, new, new.stats.value * 1.01)

    monkeypatch.setattr(S, "hedge_step", leaky)
    with jax.enable_x64(True):
        acc = _run_steps(_config("hedge.enabled=true", pools=1), 2)
    assert float(acc.identity_error) < 1e-12
    np.testing.assert_allclose(float(acc.lp_identity_error), 0.01, rtol=0.05)
    assert int(acc.invalid_code) == 16
