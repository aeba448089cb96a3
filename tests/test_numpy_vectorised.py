"""The NumPy baseline of the throughput benchmark (`benchmarks/numpy_vectorised.py`) is the
same model as the JAX step: on five pools with different params, fed the same draws, both
agree on every step (reserves, supply, book, accounts) to 1e-9 relative in float64.

Its per-trade mode (`run(..., per_trade=True)`, the reference of `benchmarks/fidelity.py`)
is checked against the merge mode with room for every crowd, and its book formulas against
crowds of 100,000 discrete traders (`/work/checks/book_spec.md`)."""

from __future__ import annotations

import dataclasses
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
    full books (K = 4, so merges), rejections of both kinds, crowds with and without a
    spread of leverage, and LP flows both ways."""
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
                "leverage_spread": [0.5, 0.0, 0.9, 0.3, 0.7],
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


def assert_close(name: str, got, want, rtol: float = 1e-9, floor: float = 0.0) -> None:
    """|got − want| ≤ rtol · max(|want|, 1e-3 · max |want|, floor) elementwise, per pool."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    if want.size == 0:
        return
    axes = tuple(range(1, want.ndim))
    scale = np.max(np.abs(want), axis=axes, keepdims=True) if axes else np.max(np.abs(want))
    tol = rtol * np.maximum(np.maximum(np.abs(want), 1e-3 * scale), floor)
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
    for name in nv.BOOK_FIELDS:
        got = np.where(live, getattr(ns.book, name), 0.0)
        # A slope (entry price per unit of key) of crowds that entered at one price is
        # rounding noise around 0: compare it on the scale of 1.
        floor = 1.0 if name == "slope" else 0.0
        assert_close(where + name, got, np.where(live, getattr(js.book, name), 0.0), floor=floor)
    for name in nv.ACCOUNT_FIELDS:
        if name.startswith("identity_error"):
            continue
        assert_close(where + name, ns.accounts[name], getattr(js.accounts, name))
    assert np.all(ns.accounts["identity_error"] < 1e-12)


def _run_both(model: str, steps: int):
    """Both steps on the busy pools, compared after every step; the final NumPy state."""
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
        for t in range(steps):
            noise = draw(keys, t)
            js = jstep(js, params, noise)
            ns = nv.step(ns, nprm, nspec, nv.noise_from_pdlpjax(noise))
            compare(ns, jtu.tree_map(np.asarray, js), t)
    return ns


@pytest.mark.parametrize("model", ["gbm", "jump", "garch"])
def test_numpy_vectorised_matches_jax_step(model):
    """Every step of 5 pools × 200 steps, same draws, float64: NumPy state == JAX state"""
    ns = _run_both(model, T)
    # The comparison is not vacuous: every mechanism fired in some pool.
    acc = ns.accounts
    for name in (
        "liquidations",
        "liquidated_notional",
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


def test_a_bucket_rounded_up_to_whole_is_liquidated_with_its_whole_margin():
    """A long bucket (δ 1, n 100, c 10: q̄ = 90, a = 5) at the price where φ = 1 − 5e-7: φ
    becomes 1 and the bucket leaves with its whole margin c = 10 (bad debt 100 − 10 − x), in
    the baseline and in the engine alike (μ from the price would leave 2.5e-6 behind)."""
    from pdlpjax.market import Book, liquidate

    x = 95.0 - 10.0 * (1.0 - 5e-7)
    phi, d_l, n_l, c_l = nv.liquidate(1.0, 100.0, 10.0, 5.0, True, x, np.array(1.0))
    assert phi == 1.0 and c_l == 10.0
    bad = max(-((d_l * x - n_l) + c_l), 0.0)
    assert bad == pytest.approx(90.0 - x, rel=1e-12)
    with jax.enable_x64(True):
        one = np.ones((1, 2, 1))
        book = Book(
            size=one,
            notional=100.0 * one,
            margin=10.0 * one,
            spread=5.0 * one,
            count=one,
            slope=0.0 * one,
            is_open=np.array([[[True], [False]]]),
        )
        got = liquidate(jax.tree_util.tree_map(jax.numpy.asarray, book), jax.numpy.array([x]))
        assert float(got.bad_debt) == pytest.approx(bad, rel=1e-12)
        assert float(got.received) == pytest.approx(10.0, rel=1e-12)


def _numpy_setup(model: str = "gbm", seed: int = 1):
    """The busy pools' NumPy spec and params, and NumPy-drawn noise for T steps."""
    cfg = busy_config(model)
    with jax.enable_x64(True):
        params, spec = P.make_params(cfg), P.make_spec(cfg)
    nspec, nprm = nv.spec_from_pdlpjax(spec, model), nv.params_from_pdlpjax(params)
    rng = np.random.default_rng(seed)
    r = nspec.num_risky
    noise = [
        nv.NpNoise(
            path=rng.standard_normal((POOLS, r)),
            z_demand=rng.standard_normal((POOLS, r, 2)),
            z_leverage=rng.standard_normal((POOLS, r, 2)),
            z_flow=rng.standard_normal(POOLS),
        )
        for _ in range(T)
    ]
    return nspec, nprm, noise


def test_per_trade_is_merge_mode_with_room_for_every_crowd():
    """The per-trade book (grown on demand) equals the merge mode with K = 2 T + 2 slots,
    which never fills (at most two crowds per market and side and step): no merges, same
    reserves and totals to rounding (the books differ in width, so sums round differently),
    the same crowds written; with K = 4 the same draws merge."""
    nspec, nprm, noise = _numpy_setup()
    per_trade = nv.run(nspec, nprm, noise, T, per_trade=True)
    roomy = nv.run(dataclasses.replace(nspec, num_cohorts=2 * T + 2), nprm, noise, T)
    merging = nv.run(nspec, nprm, noise, T)
    assert np.all(per_trade.accounts["merged"] == 0) and np.all(roomy.accounts["merged"] == 0)
    assert np.all(merging.accounts["merged"] > 0)
    np.testing.assert_array_equal(per_trade.accounts["opened"], roomy.accounts["opened"])
    assert per_trade.book.size.shape[-1] > nspec.num_cohorts
    for name in nv.ACCOUNT_FIELDS:
        if not name.startswith("identity_error"):
            assert_close(name, per_trade.accounts[name], roomy.accounts[name], rtol=1e-12)
    assert_close("reserves", per_trade.reserves, roomy.reserves, rtol=1e-12)
    assert np.all(per_trade.accounts["identity_error"] < 1e-12)


def _members(rng, sign: float, count: int):
    """A crowd of `count` discrete traders entering at p0: margin fractions on a uniform grid
    over m̄(1 ± w), equal notional each; then a charge per unit of size (fees, funding)
    taken from every member alike. **Returns:** per-member size, notional, margin, key, and
    the bucket (δ, n, c, a) the spec gives the crowd."""
    p0, mbar, w = rng.uniform(50, 150), rng.uniform(0.02, 0.5), rng.uniform(0.05, 0.95)
    m = mbar * (1.0 + w * (2.0 * (np.arange(count) + 0.5) / count - 1.0))
    dn = np.full(count, rng.uniform(1.0, 1e4) / count)
    dd = dn / p0
    dc = dn * m - rng.uniform(-0.05, 0.05) * p0 * dd
    key = (dn - sign * dc) / dd
    return dd, dn, dc, key, (dd.sum(), dn.sum(), dc.sum(), p0 * mbar * w)


def test_liquidation_matches_discrete_members():
    """One bucket against 100,000 discrete members: the liquidated fraction, size, notional
    and margin (spec §Step order 1) are those of the members whose key the price crossed,
    to the grid's resolution; the remainder's mean key and half-width are the survivors'."""
    rng = np.random.default_rng(7)
    count = 100_000
    for _ in range(200):
        sign = float(rng.choice([1.0, -1.0]))
        dd, dn, dc, key, (size, notional, margin, a) = _members(rng, sign, count)
        assert nv.mean_key(size, notional, margin, sign) == pytest.approx(key.mean(), rel=1e-12)
        x = rng.uniform(key.min() - 0.1 * a, key.max() + 0.1 * a)
        phi, d_l, n_l, c_l = nv.liquidate(size, notional, margin, a, True, x, np.array(sign))
        hit = key >= x if sign > 0 else key <= x
        resolution = 2.0 / count
        assert abs(phi - dd[hit].sum() / size) <= resolution
        assert abs(d_l - dd[hit].sum()) <= resolution * size
        assert abs(n_l - dn[hit].sum()) <= resolution * notional
        if phi < 1.0:  # (φ > 1 − 1e-6 closes the bucket: its chunk is then all of it)
            assert abs(c_l - dc[hit].sum()) <= resolution * notional
        if 0.01 < phi < 0.99:
            rest = ~hit
            q_rest = nv.mean_key(size - d_l, notional - n_l, margin - c_l, sign)
            assert q_rest == pytest.approx(key[rest].mean(), abs=resolution * a)
            half = (key[rest].max() - key[rest].min()) / 2.0
            assert a * (1.0 - phi) == pytest.approx(half, abs=resolution * a)


def test_merge_keeps_the_members_key_moments():
    """Merging two buckets keeps the size-weighted mean and variance of their members' keys
    (a²/3 for a uniform bucket), and its slope is the size-weighted least-squares slope of
    the members' entry prices on their keys."""
    rng = np.random.default_rng(8)
    for _ in range(50):
        sign = float(rng.choice([1.0, -1.0]))
        crowds = [_members(rng, sign, 20_000) for _ in range(2)]
        buckets = [
            dict(
                zip(("size", "notional", "margin", "spread"), c[4], strict=True),
                count=1.0,
                slope=0.0,
            )
            for c in crowds
        ]
        merged = nv.merge_buckets(buckets[0], buckets[1], sign)
        dd = np.concatenate([c[0] for c in crowds])
        key = np.concatenate([c[3] for c in crowds])
        mean = (dd * key).sum() / dd.sum()
        var = (dd * (key - mean) ** 2).sum() / dd.sum()
        q = nv.mean_key(merged["size"], merged["notional"], merged["margin"], sign)
        assert q == pytest.approx(mean, rel=1e-12)
        # the grid's members are uniform to O(1/count²) in variance
        assert merged["spread"] ** 2 / 3.0 == pytest.approx(var, rel=1e-6)
        assert merged["count"] == 2.0
        entry = np.concatenate([c[1] / c[0] for c in crowds])
        cov = (dd * (key - mean) * (entry - (dd * entry).sum() / dd.sum())).sum() / dd.sum()
        assert merged["slope"] == pytest.approx(cov / var, rel=1e-6)
