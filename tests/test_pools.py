"""`[[pools]]`: several pools over disjoint blocks of one market, and their Schur damping."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import pdlpjax as P
from pdlpjax.build import make_block
from pdlpjax.config import ConfigError, config_from_dict

BASE = {
    "name": "blocks",
    "market": {
        "assets": ["BTC", "ETH", "SOL", "LINK"],
        "initial_prices": [60000.0, 3000.0, 150.0, 15.0],
        "cohorts": 4,
    },
    "paths": {
        "vols": [0.6, 0.8, 1.1, 1.0],
        "correlation": [
            [1.0, 0.8, 0.6, 0.6],
            [0.8, 1.0, 0.65, 0.7],
            [0.6, 0.65, 1.0, 0.5],
            [0.6, 0.7, 0.5, 1.0],
        ],
    },
    "pools": [{"assets": ["BTC", "ETH"]}, {"assets": ["SOL", "LINK"]}],
    "hedge": {"enabled": True, "every": 12, "covariance": "window", "window": 24},
    "simulation": {"num_pools": 8, "num_steps": 96, "progress": False},
    "output": {"plots": False, "record_every": 12},
}


def _raw(**changes) -> dict:
    raw = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        sec, key = dotted.split("__")
        raw.setdefault(sec, {})[key] = value
    return raw


@pytest.mark.parametrize(
    "pools, expect",
    [
        ([{"assets": ["BTC"]}], "at least two"),
        ([{"assets": ["BTC"]}, {"assets": ["DOGE"]}], "'DOGE' is not in market.assets"),
        ([{"assets": ["BTC", "ETH"]}, {"assets": ["ETH"]}], "'ETH' is in two pools"),
        ([{"assets": []}, {"assets": ["ETH"]}], "pools[0].assets: expected a non-empty list"),
        ([{"assets": ["BTC"], "fee": 1}, {"assets": ["ETH"]}], "pools[0].fee: unknown key"),
        (
            [{"assets": ["BTC"], "target_weights": [0.5, 0.4]}, {"assets": ["ETH"]}],
            "sum to 1",
        ),
        (
            [{"assets": ["BTC"], "target_weights": [1.0]}, {"assets": ["ETH"]}],
            "expected 2 values",
        ),
        ({"assets": ["BTC"]}, "expected [[pools]] tables"),
    ],
)
def test_bad_pool_blocks_are_one_line_errors(pools, expect):
    raw = _raw()
    raw["pools"] = pools
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_blocks_round_trip_through_toml(tmp_path):
    cfg = config_from_dict(_raw())
    assert [b.assets for b in cfg.pools] == [("BTC", "ETH"), ("SOL", "LINK")]
    again = config_from_dict(P.config.config_to_dict(cfg))
    assert again == cfg


def _run_block(cfg, b):
    params, spec = make_block(cfg, b)
    return P.simulate(params, P.make_model(cfg), spec, seed=0, num_steps=96), spec


def test_blocks_share_one_market_and_not_their_traders():
    """Both blocks see the prices a single pool over all four assets sees (bitwise: one
    path model, one set of price draws), but their traders draw from their own streams."""
    cfg = config_from_dict(_raw())
    whole = config_from_dict({k: v for k, v in _raw().items() if k != "pools"})
    full = P.simulate(
        P.make_params(whole), P.make_model(whole), P.make_spec(whole), seed=0, num_steps=96
    )
    b0, _ = _run_block(cfg, 0)
    b1, _ = _run_block(cfg, 1)
    np.testing.assert_array_equal(b0.record.prices[..., :2], full.record.prices[..., :2])
    np.testing.assert_array_equal(b1.record.prices[..., :2], full.record.prices[..., 2:4])
    # Equal-sized blocks: without their own streams their trader draws would coincide.
    spec0, spec1 = make_block(cfg, 0)[1], make_block(cfg, 1)[1]
    key = P.pool_keys(0, 1)[0][0]
    n0 = P.draw_noise(P.make_model(cfg), spec0, key, jnp.asarray(3))
    n1 = P.draw_noise(P.make_model(cfg), spec1, key, jnp.asarray(3))
    np.testing.assert_array_equal(n0.path, n1.path)
    assert not np.array_equal(n0.z_demand, n1.z_demand)


@pytest.mark.parametrize(
    "rule, expect",
    [("isolated", 0.0), ("merged", 1.0), ("fixed", 0.3)],
)
def test_fixed_damping_rules(rule, expect):
    cfg = config_from_dict(_raw(hedge__damping_rule=rule, hedge__damping=0.3))
    for b in (0, 1):
        res, _ = _run_block(cfg, b)
        np.testing.assert_allclose(res.metrics["hedge_damping"], expect, rtol=1e-6)


def test_isolated_and_merged_are_the_fixed_rule_at_zero_and_one():
    """One compiled program for every fixed γ: the rules differ only in the value of γ."""
    specs, gammas = set(), []
    for rule in ("isolated", "merged", "fixed"):
        cfg = config_from_dict(_raw(hedge__damping_rule=rule, hedge__damping=0.3))
        params, spec = make_block(cfg, 0)
        specs.add(spec)
        gammas.append(float(params.hedge.damping[0]))
    assert len(specs) == 1 and gammas == pytest.approx([0.0, 1.0, 0.3])


def test_calibrate_refuses_to_fit_a_damping_the_rule_sets(tmp_path):
    raw = _raw(hedge__damping_rule="isolated")
    raw["calibrate"] = {"params": {"hedge.damping": {"transform": "sigmoid", "init": 0.5}}}
    with pytest.raises(ConfigError, match='damping_rule = "fixed"'):
        P.calibrate_config(config_from_dict(raw), tmp_path / "cal", quiet=True)


def test_gamma_star_rule_uses_the_estimated_coupling():
    """With the model's Σ (known exactly: n = 1e9) γ* is 1 for any coupling ρ > 0; with a
    24-return window it is γ*(ρ̂, 24) ∈ (0, 1), ρ̂ varying by pool."""
    cfg = config_from_dict(_raw(hedge__damping_rule="gamma_star", hedge__covariance="model"))
    res, _ = _run_block(cfg, 0)
    np.testing.assert_allclose(res.metrics["hedge_damping"], 1.0, atol=1e-6)
    cfg = config_from_dict(_raw(hedge__damping_rule="gamma_star"))
    res, _ = _run_block(cfg, 0)
    g = res.metrics["hedge_damping"]
    assert np.all((g > 0.3) & (g < 1.0)) and np.ptp(g) > 0


def test_binary_rule_follows_claim_b1_on_the_model_covariance():
    cfg = config_from_dict(_raw(hedge__damping_rule="binary", hedge__covariance="model"))
    res, _ = _run_block(cfg, 0)
    vols = np.asarray(BASE["paths"]["vols"])
    cov = np.asarray(BASE["paths"]["correlation"]) * np.outer(vols, vols) / 8760.0
    passes = float(P.claim_b1(jnp.asarray(cov), 2).passes)
    np.testing.assert_allclose(res.metrics["hedge_damping"], passes, atol=1e-6)


def test_run_writes_a_block_results_folder(tmp_path):
    cfg = config_from_dict(_raw(hedge__damping_rule="gamma_star"))
    out = P.run_config(cfg, tmp_path / "run", quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    assert [b["assets"] for b in summary["blocks"]] == [["BTC", "ETH"], ["SOL", "LINK"]]
    assert "hedged_sharpe" in summary["blocks"][0]["metrics"]
    for block in summary["blocks"]:  # each block's hedged LP return, term by term
        lp = block["attribution"]["lp_return"]
        assert block["attribution"]["hedged"] and "hedge_pnl" in lp["terms"]
        means = sum(t["mean"] for t in lp["terms"].values())
        assert means == pytest.approx(lp["total"]["mean"], abs=1e-6)
    rows = (out / "pools.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 8
