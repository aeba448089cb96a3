"""The simulation loop: key invariance, injected draws, no recompiles, online metrics."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import pdlpjax as P
from pdlpjax.config import config_from_dict
from pdlpjax.metrics import finalize_stats, init_stats, num_worst_for, update_stats, worst_capacity


def small_config(model: str = "gbm", num_pools: int = 8, num_steps: int = 30, **sim) -> P.Config:
    raw = {
        "name": "t",
        "market": {"assets": ["BTC", "ETH", "SOL"], "initial_prices": [90000.0, 3000.0, 140.0]},
        "paths": {
            "model": model,
            "vols": [0.6, 0.8, 1.1],
            "drifts": [0.05, 0.0, -0.1],
            "correlation": [[1.0, 0.8, 0.6], [0.8, 1.0, 0.65], [0.6, 0.65, 1.0]],
            "jump_intensity": 200.0,
            "crash_intensity": 50.0,
        },
        "pool": {"target_weights": [0.2, 0.2, 0.3, 0.3]},
        "simulation": {
            "num_pools": num_pools,
            "num_steps": num_steps,
            "steps_per_year": 8760.0,
            **sim,
        },
    }
    return config_from_dict(raw)


def run(cfg: P.Config, chunk_length: int = 0) -> P.SimResult:
    return P.simulate(
        P.make_params(cfg),
        P.make_model(cfg),
        P.make_spec(cfg),
        seed=cfg.simulation.seed,
        num_steps=cfg.simulation.num_steps,
        chunk_length=chunk_length,
    )


def pool_slice(tree, i: int):
    return jtu.tree_map(lambda x: np.asarray(x)[i], tree)


def assert_trees_equal(a, b) -> None:
    for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("model", ["gbm", "jump", "garch"])
def test_pool_result_independent_of_batch_size(model):
    """Pool i's final state and metrics are bitwise the same in batches of 1, 7, 131 and
    203 pools: none a multiple of 8, 16 or 64, and the last two span two and three blocks
    of `POOL_BLOCK` (128), with pools 5 and 130 in different blocks' partial tails."""
    results = {n: run(small_config(model, num_pools=n, num_steps=12)) for n in (1, 7, 131, 203)}
    for i, sizes in [(0, (1, 7, 131, 203)), (5, (7, 131, 203)), (130, (131, 203))]:
        ref = results[sizes[0]]
        for n in sizes[1:]:
            assert_trees_equal(pool_slice(ref.state, i), pool_slice(results[n].state, i))
            for k, v in ref.metrics.items():
                np.testing.assert_array_equal(v[i], results[n].metrics[k][i], err_msg=k)


def test_batch_size_invariance_comes_from_the_pool_block():
    """With `pool_block = 0` (one unpadded program per batch size) the invariance above
    rests on XLA rounding a partial vector like a full one, which fails on some CPUs; the
    blocked default runs every batch size through one executable (one trace)."""
    cfg = small_config(num_pools=3, num_steps=6)
    run(cfg)
    before = P.simulate.__globals__["trace_count"]()
    for n in (5, 77, 128):
        run(small_config(num_pools=n, num_steps=6))
    assert P.simulate.__globals__["trace_count"]() == before
    spec, params, model = P.make_spec(cfg), P.make_params(cfg), P.make_model(cfg)
    whole = P.simulate(params, model, spec, seed=0, num_steps=6, pool_block=0)
    assert P.simulate.__globals__["trace_count"]() > before
    np.testing.assert_allclose(
        np.asarray(whole.state.pool.reserves), np.asarray(run(cfg).state.pool.reserves), rtol=1e-5
    )


@pytest.mark.parametrize("model", ["gbm", "garch"])
def test_pool_result_independent_of_chunk_length(model):
    """Bitwise, because every chunk length runs the same executable (the trip count is
    traced and, without a record, nothing in the program depends on the chunk length)."""
    cfg = small_config(model, num_pools=4)
    results = [run(cfg, chunk_length=30)]
    before = P.simulate.__globals__["trace_count"]()
    results += [run(cfg, chunk_length=c) for c in (1, 7, 10)]
    assert P.simulate.__globals__["trace_count"]() == before
    for r in results[1:]:
        assert_trees_equal(results[0].state, r.state)
        for k in r.metrics:
            np.testing.assert_array_equal(results[0].metrics[k], r.metrics[k])


def test_records_independent_of_chunk_length():
    """With a record the chunk program's buffer has a row per block, so chunk lengths 10
    and 30 are two executables: they are promised to agree to rounding, not bitwise."""
    cfg = small_config(num_pools=3)
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, record_every=5))
    a, b = run(cfg, chunk_length=10), run(cfg, chunk_length=30)
    for x, y in zip(
        jtu.tree_leaves((a.state, a.record)), jtu.tree_leaves((b.state, b.record)), strict=True
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert a.record.share_price.shape == (3, 6)


def test_different_pools_get_different_paths():
    r = run(small_config(num_pools=4))
    prices = np.asarray(r.state.pool.prices)
    assert len({tuple(p) for p in prices}) == 4


def test_no_recompile_when_only_param_values_change():
    cfg = small_config(num_pools=4, num_steps=12)
    run(cfg)
    before = P.simulate.__globals__["trace_count"]()
    vol_cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, vols=[0.3, 0.4, 0.5]))
    fee_like = dataclasses.replace(
        vol_cfg, pool=dataclasses.replace(vol_cfg.pool, initial_value=5.0e5)
    )
    r = run(fee_like)
    assert P.simulate.__globals__["trace_count"]() == before
    # ... and the new values were used.
    assert np.asarray(r.state.pool.supply)[0] == pytest.approx(5.0e5)
    # Neither does another number of pools: they run in padded blocks of one program.
    run(small_config(num_pools=5, num_steps=12))
    assert P.simulate.__globals__["trace_count"]() == before
    # A static change (the number of cohorts) does recompile.
    cohorts = dataclasses.replace(cfg, market=dataclasses.replace(cfg.market, cohorts=8))
    run(cohorts)
    assert P.simulate.__globals__["trace_count"]() > before


def test_rollout_from_noise_matches_keyed_rollout():
    """Injecting the draws the keyed rollout would make reproduces it.

    The two are different programs (draws made inside the loop or passed in) and fuse
    differently, so they agree to rounding, not bitwise: compared in float64.
    """
    with jax.enable_x64(True):
        cfg = small_config("jump", num_pools=1, num_steps=20, dtype="float64")
        params = jtu.tree_map(lambda x: x[0], P.make_params(cfg))
        model, spec = P.make_model(cfg), P.make_spec(cfg)
        key = P.pool_keys(0, 1)[0][0]
        s0 = P.init_state(params, model, spec)
        keyed, _ = P.rollout(s0, params, model, spec, key, jnp.asarray(False), 20)
        noise = jax.vmap(lambda t: P.draw_noise(model, spec, key, t))(jnp.arange(20))
        injected, rec = P.rollout_from_noise(s0, params, model, spec, noise)
    for x, y in zip(jtu.tree_leaves(keyed), jtu.tree_leaves(injected), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-10, atol=1e-9)
    assert float(keyed.accounts.opened) > 0
    assert rec.share_price.shape == (20,)


def test_online_metrics_match_numpy_on_recorded_series():
    cfg = small_config(num_pools=6, num_steps=60)
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, record_every=1))
    with jax.enable_x64(True):
        cfg = dataclasses.replace(
            cfg, simulation=dataclasses.replace(cfg.simulation, dtype="float64")
        )
        r = run(cfg)
    sp = np.concatenate([np.ones((6, 1)), r.record.share_price], axis=1)
    ret = sp[:, 1:] / sp[:, :-1] - 1.0
    spy = cfg.simulation.steps_per_year
    np.testing.assert_allclose(r.metrics["ann_mean"], ret.mean(1) * spy, rtol=1e-9)
    np.testing.assert_allclose(r.metrics["ann_vol"], ret.std(1, ddof=1) * np.sqrt(spy), rtol=1e-9)
    np.testing.assert_allclose(
        r.metrics["sharpe"], ret.mean(1) * spy / (ret.std(1, ddof=1) * np.sqrt(spy)), rtol=1e-9
    )
    dd = 1.0 - sp / np.maximum.accumulate(sp, axis=1)
    np.testing.assert_allclose(r.metrics["max_drawdown"], dd.max(1), rtol=1e-9, atol=1e-15)
    m = num_worst_for(60)
    assert m == 3 and P.make_spec(cfg).worst_capacity == 16  # ceil(0.05 * 60) of a buffer
    worst = np.sort(ret, axis=1)[:, :m].mean(1)
    np.testing.assert_allclose(r.metrics["cvar_5"], worst, rtol=1e-9)
    np.testing.assert_allclose(r.metrics["total_return"], sp[:, -1] - 1.0, rtol=1e-9)


def test_passive_pool_value_and_rebalance():
    """Held reserves never change; rebalanced reserves stay at the target weights."""
    cfg = small_config(num_pools=3, num_steps=24)
    cfg = dataclasses.replace(cfg, pool=dataclasses.replace(cfg.pool, mode="passive"))
    held = run(cfg)
    r0 = (
        np.asarray(P.make_params(cfg).pool.target_weights)
        * 1.0e6
        / np.array([90000.0, 3000.0, 140.0, 1.0])
    )
    np.testing.assert_allclose(np.asarray(held.state.pool.reserves), r0, rtol=1e-6)
    reb = dataclasses.replace(cfg, pool=dataclasses.replace(cfg.pool, rebalance=True))
    out = run(reb)
    w = np.asarray(jax.vmap(P.weights)(out.state.pool.prices, out.state.pool.reserves))
    np.testing.assert_allclose(w, np.tile([0.2, 0.2, 0.3, 0.3], (3, 1)), rtol=1e-5)
    # Same prices (same keys), different value: rebalancing changed the LP outcome.
    np.testing.assert_array_equal(
        np.asarray(held.state.pool.prices), np.asarray(out.state.pool.prices)
    )
    assert not np.allclose(held.metrics["total_return"], out.metrics["total_return"])


def test_antithetic_pairs_mirror_diffusion():
    cfg = small_config(num_pools=4, num_steps=10)
    cfg = dataclasses.replace(
        cfg, paths=dataclasses.replace(cfg.paths, antithetic=True, drifts=0.0, vols=[0.6, 0.8, 1.1])
    )
    r = run(cfg)
    logp = np.log(np.asarray(r.state.pool.prices[:, :3]) / np.array([90000.0, 3000.0, 140.0]))
    drift = -0.5 * np.array([0.6, 0.8, 1.1]) ** 2 * 10 / 8760.0
    np.testing.assert_allclose(logp[0] - drift, -(logp[1] - drift), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(logp[2] - drift, -(logp[3] - drift), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("steps", [20, 60, 320, 321, 2000])
def test_cvar_buffer_keeps_the_exact_worst_five_percent(steps):
    """The buffer is a multiple of 16 (so short horizons share one program), and the CVaR
    averages exactly the worst ceil(0.05·steps) returns of a series, checked in NumPy."""
    rng = np.random.default_rng(steps)
    returns = rng.standard_normal(steps) * 0.01
    values = np.cumprod(1.0 + returns)
    cap = worst_capacity(steps)
    k = num_worst_for(steps)
    assert cap % 16 == 0 and k <= cap < k + 16
    with jax.enable_x64(True):
        stats = init_stats(jnp.asarray(1.0, jnp.float64), cap)
        step = jax.jit(update_stats)
        for v in values:
            stats = step(stats, jnp.asarray(v))
        got = float(finalize_stats(stats, 8760.0)["cvar_5"])
    simple = np.diff(np.concatenate([[1.0], values])) / np.concatenate([[1.0], values[:-1]])
    want = np.sort(simple)[:k].mean()
    np.testing.assert_allclose(got, want, rtol=1e-12)
