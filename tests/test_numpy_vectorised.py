"""The NumPy baseline of the throughput benchmark (`benchmarks/numpy_vectorised.py`) is the
same model as the JAX step: on five pools with different params, fed the same draws, both
agree on every step (reserves, supply, book, accounts) to 1e-9 relative in float64."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.tree_util as jtu
import numpy as np
import pytest

import pdlpjax as P
from pdlpjax.config import config_from_dict

T = 200
POOLS = 5


def _load_baseline():
    """Import `benchmarks/numpy_vectorised.py` by path (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "numpy_vectorised.py"
    spec = importlib.util.spec_from_file_location("numpy_vectorised", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


nv = _load_baseline()


def busy_config(model: str):
    """Five busy pools with different params: liquidations, bad debt, funding, arbitrage,
    full rings (K = 4), rejections of both kinds and LP flows both ways."""
    return config_from_dict(
        {
            "name": "busy5",
            "market": {
                "assets": ["BTC", "ETH", "SOL"],
                "initial_prices": [60000.0, 3000.0, 140.0],
                "cohorts": 4,
                "funding_kappa": [0.002, 0.005, 0.01, 0.02, 0.0],
                "funding_cap": 0.05,
                "open_rate": [
                    [0.05, 0.04, 0.03],
                    [0.02, 0.05, 0.01],
                    [0.04] * 3,
                    [0.01] * 3,
                    [0.06, 0.0, 0.03],
                ],
                "mean_holding": [4.0, 6.0, 10.0, 3.0, 8.0],
                "leverage": [12.0, 8.0, 15.0, 5.0, 10.0],
                "leverage_vol": [0.6, 0.5, 0.7, 0.3, 0.8],
                "max_leverage": [25.0, 15.0, 30.0, 10.0, 20.0],
                "noise_vol": [0.7, 0.5, 1.0, 0.3, 0.9],
                "momentum": [0.3, -0.5, 1.0, 0.0, 0.5],
                "arb_leverage": [3.0, 2.0, 0.0, 5.0, 3.0],
            },
            "paths": {
                "model": model,
                "vols": [
                    [0.8, 1.0, 1.2],
                    [0.5, 0.7, 0.9],
                    [1.0, 1.0, 1.5],
                    [0.6, 0.8, 1.1],
                    [0.9, 1.2, 1.4],
                ],
                "drifts": [0.0, 0.1, -0.1],
                "correlation": [[1.0, 0.7, 0.5], [0.7, 1.0, 0.6], [0.5, 0.6, 1.0]],
                "jump_intensity": 15.0,
                "jump_mean": -0.05,
                "jump_vol": 0.1,
                "crash_intensity": 5.0,
            },
            "pool": {
                "target_weights": [0.2, 0.2, 0.2, 0.4],
                "fee": [1e-4, 5e-5, 2e-4, 1e-5, 3e-4],
                "max_utilisation": [0.3, 0.5, 0.9, 0.2, 0.6],
                "lp_flow_drift": [0.0, 1.0, -1.0, 0.0, 0.5],
                "lp_flow_vol": [1.0, 0.5, 2.0, 1.5, 0.8],
            },
            "simulation": {
                "num_pools": POOLS,
                "num_steps": T,
                "steps_per_year": 365.0,
                "dtype": "float64",
            },
        }
    )


def assert_close(name: str, got, want, rtol: float = 1e-9) -> None:
    """|got − want| ≤ rtol · max(|want|, 1e-3 · max |want|) elementwise, per pool."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    if want.size == 0:
        return
    axes = tuple(range(1, want.ndim))
    scale = np.max(np.abs(want), axis=axes, keepdims=True) if axes else np.max(np.abs(want))
    tol = rtol * np.maximum(np.abs(want), 1e-3 * scale)
    bad = np.abs(got - want) > tol
    assert not np.any(bad), f"{name}: NumPy {got[bad][:4]} vs JAX {want[bad][:4]}"


def compare(ns, js, t: int) -> None:
    """Every field the NumPy state keeps against the JAX state (converted to NumPy)."""
    where = f"step {t}: "
    np.testing.assert_array_equal(ns.t, js.t)
    assert_close(where + "prices", ns.prices, js.pool.prices)
    assert_close(where + "reserves", ns.reserves, js.pool.reserves)
    assert_close(where + "supply", ns.supply, js.pool.supply)
    np.testing.assert_array_equal(ns.book.is_open, js.book.is_open, err_msg=where + "is_open")
    live = ns.book.is_open
    for name in ("size", "entry", "margin", "leverage"):
        got = np.where(live, getattr(ns.book, name), 0.0)
        assert_close(where + name, got, np.where(live, getattr(js.book, name), 0.0))
    np.testing.assert_array_equal(ns.book.opened_at[live], js.book.opened_at[live])
    for name in nv.ACCOUNT_FIELDS:
        if name.startswith("identity_error"):
            continue
        assert_close(where + name, ns.accounts[name], getattr(js.accounts, name))
    assert np.all(ns.accounts["identity_error"] < 1e-12)


@pytest.mark.parametrize("model", ["gbm", "jump", "garch"])
def test_numpy_vectorised_matches_jax_step(model):
    """Every step of 5 pools × 200 steps, same draws, float64: NumPy state == JAX state."""
    cfg = busy_config(model)
    with jax.enable_x64(True):
        params, pmodel, spec = P.make_params(cfg), P.make_model(cfg), P.make_spec(cfg)
        keys, _ = P.pool_keys(0, POOLS)
        draw = jax.jit(jax.vmap(lambda k, t: P.draw_noise(pmodel, spec, k, t), (0, None)))
        jstep = jax.jit(jax.vmap(lambda s, p, n: P.step(s, p, pmodel, spec, n)))
        js = jax.vmap(lambda p: P.init_state(p, pmodel, spec))(params)
        nspec = nv.spec_from_pdlpjax(spec, model)
        nprm = nv.params_from_pdlpjax(params)
        ns = nv.init_state(nspec, nprm)
        for t in range(T):
            noise = draw(keys, t)
            js = jstep(js, params, noise)
            ns = nv.step(ns, nprm, nspec, nv.noise_from_pdlpjax(noise))
            compare(ns, jtu.tree_map(np.asarray, js), t)
    # The comparison is not vacuous: every mechanism fired in some pool.
    acc = ns.accounts
    for name in (
        "liquidations",
        "bad_debt",
        "funding_paid",
        "fees",
        "exits",
        "merged",
        "rejected",
        "opened",
    ):
        assert np.sum(acc[name]) > 0, name
    assert np.any(acc["lp_flows"] > 0) and np.any(acc["lp_flows"] < 0)
