"""`pdlpjax sweep`: config checks, common random numbers, batching, resume, outputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import pdlpjax as P
from pdlpjax import cli
from pdlpjax import sweep as sweep_mod
from pdlpjax.config import ConfigError, config_from_dict

# One risky asset, few cohorts, 96 hourly steps: small enough to compile in seconds.
BASE = {
    "name": "sweep_test",
    "market": {
        "assets": ["BTC"],
        "initial_prices": [60000.0],
        "cohorts": 4,
        "open_rate": [0.002],
        "max_leverage": 20.0,
    },
    "paths": {"vols": [0.8], "correlation": [[1.0]]},
    "pool": {"target_weights": [0.5, 0.5], "fee": 5.0e-5},
    "hedge": {"enabled": True, "every": 6, "covariance": "window", "window": 24},
    "simulation": {"num_steps": 96, "progress": False},
    "output": {"plots": True},
    "sweep": {
        "params": {"pool.fee": [1.0e-5, 1.0e-4], "hedge.risk_aversion": [1.0, 10.0]},
        "replicates": 24,
    },
}


def _cfg(**changes) -> P.Config:
    raw = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        sec, key = dotted.split("__")
        raw.setdefault(sec, {})[key] = value
    return config_from_dict(raw)


def _rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    "params, expect",
    [
        ({"pool.mode": ["pdlp"]}, "sweep.params.pool.mode: expected the name of a dynamic field"),
        ({"fee": [0.1]}, "sweep.params.fee: expected the name of a dynamic field"),
        ({"pool.fee": {"uniform": [0.2, 0.1]}}, "pool.fee.uniform: expected [lo, hi] with lo < hi"),
        ({"pool.fee": {"loguniform": [0.0, 0.1]}}, "and lo > 0"),
        ({"pool.fee": {"grid": []}}, "pool.fee.grid: expected a non-empty list"),
        ({"pool.fee": 0.1}, "pool.fee: expected a list of values"),
        ({"pool.fee": [-1.0]}, "pool.fee.grid[0]"),
        ({"paths.vols": {"uniform": [0.1, 0.2]}}, "ranges are for scalar fields only"),
    ],
)
def test_bad_sweep_params_are_one_line_errors(params, expect):
    with pytest.raises(ConfigError) as err:
        _cfg(sweep__params=params)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_ranges_need_draws():
    with pytest.raises(ConfigError, match="need sweep.draws > 0"):
        _cfg(sweep__params={"pool.fee": {"uniform": [0.0, 1e-4]}})


def test_sweep_config_grid_and_common_random_numbers():
    run, combos = P.sweep_config(_cfg())
    assert run.simulation.num_pools == 4 * 24 and len(combos) == 4
    values, _ = P.resolve_dynamic(run)
    fee = values["pool"]["fee"]
    for g, combo in enumerate(combos):  # contiguous blocks, one per combination
        assert np.all(fee[g * 24 : (g + 1) * 24] == combo["pool.fee"])


def test_sweep_config_random_draws_are_seeded():
    cfg = _cfg(
        sweep__params={"pool.fee": {"loguniform": [1e-6, 1e-4]}, "hedge.risk_aversion": [1.0, 3.0]},
        sweep__draws=5,
        sweep__replicates=4,
    )
    run, combos = P.sweep_config(cfg)
    assert run.simulation.num_pools == 20 and len(combos) == 5
    fees = [c["pool.fee"] for c in combos]
    assert all(1e-6 <= f <= 1e-4 for f in fees) and len(set(fees)) == 5
    assert all(c["hedge.risk_aversion"] in (1.0, 3.0) for c in combos)
    assert P.sweep_config(cfg)[1] == combos  # same seed, same draws


def test_paired_difference_interval():
    rng = np.random.default_rng(0)
    common = rng.normal(size=400)
    a, b = common + 0.1 * rng.normal(size=400), common + 0.1 * rng.normal(size=400) - 0.05
    d = P.paired_difference(a, b)
    assert d["n"] == 400
    assert d["ci95"][0] < d["mean"] < d["ci95"][1]
    width = d["ci95"][1] - d["ci95"][0]
    unpaired = d["unpaired_ci95"][1] - d["unpaired_ci95"][0]
    assert width < 0.2 * unpaired  # the shared component cancels in pairs


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "full"
    P.run_sweep(_cfg(), out, quiet=True)
    return out


def test_sweep_writes_its_outputs(swept):
    rows = _rows(swept / "sweep.csv")
    assert len(rows) == 4
    for row in rows:
        for key in ("sharpe", "hedged_sharpe", "difference", "share_claim41_holds"):
            assert np.isfinite(float(row[key])), key
        assert (
            float(row["difference_lo"]) <= float(row["difference"]) <= float(row["difference_hi"])
        )
    summary = json.loads((swept / "summary.json").read_text())
    assert summary["pools"] == 96 and summary["combinations"] == 4
    assert {"sharpe_difference", "claim41_confusion", "metrics"} <= set(summary["table"][0])
    assert (swept / "sharpe_pool.fee_hedge.risk_aversion.png").stat().st_size > 1000
    assert len(_rows(swept / "pools.csv")) == 96
    assert not (swept / sweep_mod.SWEEP_CHECKPOINT).exists()


def test_paired_intervals_are_narrower_with_common_random_numbers(swept):
    """Replicate j of every combination sees the same market, so a difference between two
    combinations is paired: its interval is narrower than an unpaired one on the same pools,
    and the within-combination hedged − unhedged interval is narrower than unpaired too."""
    pools = _rows(swept / "pools.csv")
    sharpe = np.array([float(p["sharpe"]) for p in pools]).reshape(4, 24)
    replicate = np.array([int(p["replicate"]) for p in pools]).reshape(4, 24)
    assert np.all(replicate == np.arange(24))
    # Combinations 0 and 1 share the fee and differ in risk aversion, which does not touch
    # the pool: with common random numbers their unhedged Sharpe is identical pool by pool.
    assert np.array_equal(sharpe[0], sharpe[1])
    # Combinations 0 and 2 differ in the fee (and so in trader demand): paired by market.
    d = P.paired_difference(sharpe[2], sharpe[0])
    width = d["ci95"][1] - d["ci95"][0]
    unpaired = d["unpaired_ci95"][1] - d["unpaired_ci95"][0]
    assert width < 0.5 * unpaired, (width, unpaired)
    for row in _rows(swept / "sweep.csv"):
        paired = float(row["difference_hi"]) - float(row["difference_lo"])
        assert paired < float(row["unpaired_hi"]) - float(row["unpaired_lo"])


def test_batches_and_resume_give_the_same_results(swept, tmp_path, monkeypatch):
    """Two batches (the last padded), interrupted after the first and resumed: the same
    per-pool results as one batch."""
    cfg = _cfg(sweep__batch_pools=64)
    real_save = sweep_mod._save

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_mod, "_save", save_then_interrupt)
    out = tmp_path / "resumed"
    with pytest.raises(P.results.Interrupted, match="pdlpjax sweep --resume"):
        P.run_sweep(cfg, out, quiet=True)
    assert (out / sweep_mod.SWEEP_CHECKPOINT).exists()
    monkeypatch.setattr(sweep_mod, "_save", real_save)
    rc = cli.main(["sweep", "--resume", str(out), "--quiet"])
    assert rc == 0
    a, b = _rows(swept / "pools.csv"), _rows(out / "pools.csv")
    assert a == b


def test_cli_sweep_errors_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[sweep]\nparams = { "pool.fee" = { uniform = [0.0, 1.0e-4] } }\n')
    assert cli.main(["sweep", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sweep.draws" in err[0]
    cfg.write_text("[simulation]\nnum_pools = 4\n")
    assert cli.main(["sweep", str(cfg), "--quiet"]) == 2
    assert "sweep.params" in capsys.readouterr().err


def test_grids_of_the_config_multiply_the_sweep():
    """A grid the config sets on a key the sweep does not touch (here in [market]) is one
    more axis: every combination still gets `replicates` pools."""
    cfg = _cfg(market__fee_elasticity={"grid": [0.5, 2.0]})
    run, combos = P.sweep_config(cfg)
    assert len(combos) == 8 and run.simulation.num_pools == 8 * 24
    values, _ = P.resolve_dynamic(run)
    assert sorted(set(values["market"]["fee_elasticity"].tolist())) == [0.5, 2.0]


def test_block_configs_are_refused():
    raw = json.loads(json.dumps(BASE))
    raw["market"] = {"assets": ["BTC", "ETH"], "initial_prices": [60000.0, 3000.0]}
    raw["paths"] = {"vols": [0.8, 0.9], "correlation": [[1.0, 0.5], [0.5, 1.0]]}
    raw["pool"] = {"fee": 5.0e-5}
    raw["pools"] = [{"assets": ["BTC"]}, {"assets": ["ETH"]}]
    with pytest.raises(ConfigError, match=r"\[\[pools\]\] blocks cannot be swept"):
        P.sweep_config(config_from_dict(raw))
