"""Absurd results say so (issue 14): warnings on stderr and in summary.json, or refusals.

Most checks run before anything compiles, or on metrics, so these tests stub `simulate`
where a run is needed: nothing here compiles except `test_sharpe_needs_two_steps`.
"""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

import pdlpjax as P
from pdlpjax import sanity
from pdlpjax.build import bootstrap_returns
from pdlpjax.config import ConfigError, config_from_dict, config_to_dict, load_config
from pdlpjax.data import DataError
from pdlpjax.simulate import SimResult

simulate_mod = importlib.import_module("pdlpjax.simulate")
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHARED = ROOT.parent / "shared" / "data"
SMALL = {
    "market": {"assets": ["BTC"], "cohorts": 2},
    "simulation": {"num_pools": 4, "num_steps": 8, "progress": False},
    "output": {"plots": False},
}


def _raw(**sections) -> dict:
    raw = json.loads(json.dumps(SMALL))
    for name, table in sections.items():
        raw.setdefault(name, {}).update(table)
    return raw


# --------------------------------------------------------------------------- ignored keys


@pytest.mark.parametrize(
    "sections, keys, why",
    [
        (
            {"paths": {"jump_intensity": 2.0, "crash_mean": -0.3}},
            "paths.jump_intensity, paths.crash_mean",
            'paths.model = "gbm"',
        ),
        (
            {"paths": {"model": "jump", "garch_alpha": 0.1}},
            "paths.garch_alpha",
            'paths.model = "jump"',
        ),
        ({"paths": {"block_length": 5.0}}, "paths.block_length", 'paths.model = "gbm"'),
        (
            {"hedge": {"every": 6, "risk_aversion": 3.0}},
            "hedge.every, hedge.risk_aversion",
            "hedge.enabled = false",
        ),
        (
            {"hedge": {"enabled": True, "every": 4, "covariance": "ewma", "window": 24}},
            "hedge.window",
            'hedge.covariance = "ewma"',
        ),
        (
            {"hedge": {"enabled": True, "every": 4, "damping": 0.5}},
            "hedge.damping",
            "no [[pools]] blocks",
        ),
        (
            {"pool": {"discount_tax": 0.01, "twm_mu": 1.0}},
            "pool.discount_tax, pool.twm_mu",
            'pool.discount = "none"',
        ),
        (
            {"pool": {"discount": "glp", "discount_temperature": 0.01}},
            "pool.discount_temperature",
            'pool.discount = "glp"',
        ),
        ({"pool": {"swap_fee": 0.001}}, "pool.swap_fee", "pool.swap_arbitrage = false"),
        (
            {"pool": {"mode": "passive", "fee": 1e-4}, "market": {"leverage": 3.0}},
            "market.cohorts, market.leverage, pool.fee",
            'pool.mode = "passive"',
        ),
    ],
)
def test_ignored_keys_are_named(sections, keys, why):
    cfg = config_from_dict(_raw(**sections))
    assert cfg.warnings == (f"{keys}: set but ignored with {why}",)
    assert sanity.config_warnings(cfg)[0] == cfg.warnings[0]


@pytest.mark.parametrize(
    "key, value",
    [("smooth", True), ("smooth", False), ("temperature", 0.5), ("temperature", 0.05)],
)
def test_removed_relaxation_keys_are_refused(tmp_path, key, value):
    """`simulation.smooth` and `simulation.temperature` went with the relaxed book: setting
    either (to any value, in the file or with --set) is an error that says so, not a
    silently ignored key."""
    with pytest.raises(ConfigError, match=rf"^simulation\.{key}: removed: ") as err:
        config_from_dict(_raw(simulation={key: value}))
    assert "delete the key" in str(err.value)
    path = tmp_path / "c.toml"
    path.write_text('[market]\nassets = ["BTC"]\n')
    text = str(value).lower()
    with pytest.raises(ConfigError, match=rf"^simulation\.{key}: removed: "):
        load_config(path, [f"simulation.{key}={text}"])
    assert load_config(path).warnings == ()  # the file alone is fine


def test_ignored_keys_with_the_bootstrap(tmp_path):
    """`drifts` and `correlation` are ignored; `vols` still scales the traders' momentum in
    pdlp mode, and the model-covariance hedge reads `vols` and `correlation`."""
    paths = {"model": "bootstrap", "data": str(tmp_path), "vols": 0.9, "drifts": 0.1}
    paths["correlation"] = [[1.0]]
    cfg = config_from_dict(_raw(paths=paths))
    assert cfg.warnings == (
        'paths.drifts, paths.correlation: set but ignored with paths.model = "bootstrap"',
    )
    hedged = config_from_dict(
        _raw(paths=paths, hedge={"enabled": True, "covariance": "model", "every": 4})
    )
    assert hedged.warnings == ('paths.drifts: set but ignored with paths.model = "bootstrap"',)
    passive = config_from_dict(_raw(paths=paths, pool={"mode": "passive"}))
    assert any("paths.vols" in w for w in passive.warnings)


def test_ignored_swept_and_free_params():
    cfg = config_from_dict(
        _raw(
            sweep={"params": {"paths.jump_vol": [0.1, 0.2]}},
            calibrate={"params": {"pool.twm_cost": {"transform": "softplus", "init": 1e-6}}},
        )
    )
    assert "paths.jump_vol (swept): set but ignored with paths.model" in cfg.warnings[0]
    assert "pool.twm_cost (free): set but ignored with pool.discount" in cfg.warnings[1]


def test_only_keys_the_user_set_warn():
    """Defaults, and keys set to their default (as in a written config.toml), are silent."""
    assert config_from_dict(_raw()).warnings == ()
    assert config_from_dict(_raw(paths={"jump_intensity": 0.0})).warnings == ()
    cfg = config_from_dict(_raw(paths={"jump_intensity": 2.0}))
    again = config_from_dict(config_to_dict(cfg))  # every key written out
    assert again.warnings == cfg.warnings


@pytest.mark.parametrize(
    "name", ["quickstart", "hedged_sharpe", "calibrate_fee", "calibrate_hedge"]
)
def test_shipped_configs_do_not_warn(name):
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert sanity.config_warnings(cfg) == []


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("text", ["", "# nothing\n", 'name = "x"\n', "[simulation]\n"])
def test_empty_config_is_refused(tmp_path, text):
    path = tmp_path / "empty.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="sets no key"):
        load_config(path)
    assert load_config(path, ["simulation.num_pools=4"]).simulation.num_pools == 4


def test_one_step_is_refused():
    with pytest.raises(ConfigError, match=r"simulation.num_steps: expected at least 2"):
        config_from_dict(_raw(simulation={"num_steps": 1}))
    config_from_dict(_raw(simulation={"num_steps": 2}))


def test_sharpe_needs_two_steps():
    """The smallest run the config allows (2 steps) has a finite Sharpe ratio; 1 has none."""
    raw = _raw(pool={"mode": "passive"}, simulation={"num_pools": 2})
    cfg = config_from_dict(raw)
    params, model, spec = P.make_params(cfg), P.make_model(cfg), P.make_spec(cfg)
    two = P.simulate(params, model, spec, seed=0, num_steps=2)
    one = P.simulate(params, model, spec, seed=0, num_steps=1)
    assert np.all(np.isfinite(two.metrics["sharpe"]))
    assert np.all(np.isnan(one.metrics["sharpe"]))


def test_one_replicate_is_refused():
    cfg = config_from_dict(_raw(sweep={"params": {"pool.fee": [1e-5, 1e-4]}, "replicates": 1}))
    with pytest.raises(ConfigError, match="sweep.replicates: expected at least 2"):
        P.sweep_config(cfg)


# --------------------------------------------------------------------------- leverage


def test_leverage_above_cap_warns_before_compiling():
    cfg = config_from_dict(_raw(market={"leverage": {"grid": [5.0, 60.0]}, "max_leverage": 50.0}))
    (line,) = sanity.config_warnings(cfg)
    assert line.startswith("market.leverage: the median leverage of new trades is above")
    assert "in 2 of 4 pools (pool 2: 60 > 50)" in line
    assert sanity.config_warnings(config_from_dict(_raw(market={"leverage": 5.0}))) == []


# --------------------------------------------------------------------------- results


def _metrics(n: int = 4, **changes) -> dict:
    m = {
        "sharpe": np.linspace(0.1, 0.4, n),
        "total_return": np.full(n, 0.02),
        "opened": np.full(n, 100.0),
        "rejected": np.full(n, 1.0),
    }
    m.update({k: np.asarray(v, float) for k, v in changes.items()})
    return m


def test_sane_metrics_give_no_warning():
    assert sanity.result_warnings(_metrics()) == []


def test_growth_and_collapse_warn():
    found = sanity.result_warnings(_metrics(total_return=[0.1, 814000.0, -0.995, 0.0]))
    assert found == [
        "2 of 4 pools: the LP share price ended more than 100x above or below 1% of its "
        "start (worst: pool 1, 8.14e+05x its start); check the config"
    ]
    hedged = _metrics(hedged_total_return=[0.0, 0.0, -0.999, 0.0])
    (line,) = sanity.result_warnings(hedged)
    assert line.startswith("1 of 4 pools: the hedged LP ended") and "pool 2, 0.001x" in line


def test_rejections_warn():
    (line,) = sanity.result_warnings(_metrics(opened=[100, 0, 1, 0], rejected=[1, 500, 999, 0]))
    assert line.startswith("2 of 4 pools rejected more than 99% of their trades")
    assert "(worst: pool 1, 500 requests rejected, 0 crowds opened)" in line  # not pool 3


def test_masked_pools_warn():
    (line,) = sanity.result_warnings(_metrics(), masked=3)
    assert line.startswith("3 of 4 pools broke a guard and were masked")


def _fake_simulate(metrics: dict, masked=()):
    def fake(params, model, spec, **kw):
        n = next(iter(jax_leaves(params))).shape[0]
        m = {k: np.resize(v, n) for k, v in metrics.items()}
        return SimResult(None, m, None, 0.0, 0.01, masked=np.asarray(masked, int))

    return fake


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_run_lists_warnings_in_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        simulate_mod, "simulate", _fake_simulate(_metrics(total_return=[0.0, 814000.0, 0.0, 0.0]))
    )
    cfg = config_from_dict(_raw(paths={"jump_intensity": 1.0}))
    out = P.run_config(cfg, tmp_path / "run", quiet=True)
    warnings = json.loads((out / "summary.json").read_text())["warnings"]
    assert len(warnings) == 2
    assert warnings[0].startswith("paths.jump_intensity: set but ignored")
    assert "worst: pool 1, 8.14e+05x" in warnings[1]
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {w}" for w in warnings]


def test_run_without_warnings_has_an_empty_list(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(simulate_mod, "simulate", _fake_simulate(_metrics()))
    out = P.run_config(config_from_dict(_raw()), tmp_path / "run", quiet=True)
    assert json.loads((out / "summary.json").read_text())["warnings"] == []
    assert "warning" not in capsys.readouterr().err


def test_every_pool_masked_is_a_failure(tmp_path, monkeypatch):
    nan = _metrics(total_return=[np.nan] * 4, sharpe=[np.nan] * 4)
    monkeypatch.setattr(simulate_mod, "simulate", _fake_simulate(nan, masked=[0, 1, 2, 3]))
    cfg = config_from_dict(_raw(simulation={"on_invalid": "mask"}))
    with pytest.raises(P.results.SimulationError, match="all 4 pools broke a guard"):
        P.run_config(cfg, tmp_path / "run", quiet=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["masked_pools"]["count"] == 4 and summary["warnings"]


def test_sweep_shows_the_config_grid_and_warns(tmp_path, monkeypatch, capsys):
    """A base-config grid plus a sweep: the grid's key is a column, so no row looks like a
    duplicate; the growth warning reaches sweep's summary.json."""
    monkeypatch.setattr(
        simulate_mod, "simulate", _fake_simulate(_metrics(n=8, total_return=[0.0] * 7 + [-0.999]))
    )
    cfg = config_from_dict(
        _raw(
            market={"leverage": {"grid": [3.0, 5.0]}},
            sweep={"params": {"pool.fee": [1e-5, 1e-4]}, "replicates": 2},
        )
    )
    out = P.run_sweep(cfg, tmp_path / "sweep", quiet=True)
    with (out / "sweep.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:2] == ["pool.fee", "market.leverage"]
    keys = [tuple(r[:2]) for r in rows[1:]]
    assert len(keys) == 4 and len(set(keys)) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config_grid"] == ["market.leverage"]
    (line,) = summary["warnings"]
    assert "1 of 8 pools: the LP share price" in line and "pool 7" in line
    assert capsys.readouterr().err.count("warning: ") == 1


# --------------------------------------------------------------------------- data gaps


def _hourly(folder: Path, hole_days: float = 30.0, n: int = 200) -> Path:
    """BTC hourly closes with a hole of `hole_days` after row 100."""
    folder.mkdir(exist_ok=True)
    t0 = np.datetime64("2024-01-01T00:00:00")
    steps = np.arange(n).astype("timedelta64[h]")
    times = t0 + steps
    times[100:] += np.timedelta64(int(hole_days * 24), "h") - np.timedelta64(1, "h")
    closes = 60000.0 * np.exp(np.cumsum(np.full(n, 1e-3)))
    lines = ["timestamp,close"] + [f"{t},{c:.2f}" for t, c in zip(times, closes, strict=True)]
    (folder / "BTCUSDT_1h.csv").write_text("\n".join(lines) + "\n")
    return folder


def _bootstrap_cfg(folder: Path, **paths) -> P.Config:
    return config_from_dict(_raw(paths={"model": "bootstrap", "data": str(folder), **paths}))


def test_hole_in_the_data_is_refused_with_its_dates(tmp_path):
    cfg = _bootstrap_cfg(_hourly(tmp_path / "d"))
    with pytest.raises(DataError) as err:
        bootstrap_returns(cfg)
    text = str(err.value)
    assert (
        "1 hole(s) in the data longer than paths.max_gap = 6 times its spacing of 1 hours" in text
    )
    assert "2024-01-05T03:00:00 to 2024-02-04T03:00:00 (30 days, no row for BTC)" in text
    assert "paths.allow_gaps = true" in text and "\n" not in text


def test_allowed_hole_drops_the_return_across_it(tmp_path):
    folder = _hourly(tmp_path / "d")
    r = bootstrap_returns(_bootstrap_cfg(folder, allow_gaps=True))
    assert r.shape == (198, 1)  # 199 returns less the one across the hole
    np.testing.assert_allclose(r, 1e-3, rtol=1e-3)
    # A raised max_gap keeps it as one step (the user's call).
    assert bootstrap_returns(_bootstrap_cfg(folder, max_gap=1000.0)).shape == (199, 1)


def test_short_gaps_and_weekends_load(tmp_path):
    """A 5-hour maintenance gap (as in the shared hourly data) and stock-like daily data
    (weekends, a 4-day holiday weekend) are within the default max_gap."""
    assert (
        bootstrap_returns(_bootstrap_cfg(_hourly(tmp_path / "h", hole_days=5 / 24))).shape[0] == 199
    )
    days = np.arange(np.datetime64("2024-01-01"), np.datetime64("2024-04-01"))
    weekday = (days.astype("datetime64[D]").view("int64") - 4) % 7  # 0 = Monday
    keep = (weekday < 5) & (days != np.datetime64("2024-02-19"))  # a holiday Monday
    folder = tmp_path / "stock"
    folder.mkdir()
    rows = [f"{d},{100 + i}" for i, d in enumerate(days[keep])]
    (folder / "SPY.csv").write_text("date,close\n" + "\n".join(rows) + "\n")
    closes = P.load_closes(folder, ["SPY"])
    assert closes.holes is None and len(P.log_returns(closes)) == int(keep.sum()) - 1


@pytest.mark.parametrize(
    "folder, assets",
    [
        ("misrori_binance_startegy", ["BTC", "ETH", "SOL"]),
        ("yanniedog_binance-historical-OHLCV-data", ["BTC", "ETH", "SOL"]),
        ("silertrades_gravestone-data/1h", ["BTC", "ETH"]),
    ],
)
def test_shared_data_loads(folder, assets):
    """The shared data's largest holes (5 and 4 hours, hourly, 2021-08-13 and 2021-04-25)
    are within the default max_gap; a max_gap of 3 refuses the hourly set with its dates."""
    path = SHARED / folder
    if not path.is_dir():
        pytest.skip(f"no {path}")
    closes = P.load_closes(path, assets)
    assert closes.holes is None
    if folder.startswith("misrori"):
        with pytest.raises(DataError, match="2021-08-13T01:00:00 to 2021-08-13T06:00:00"):
            P.load_closes(path, assets, max_gap=3.0)


def test_calibrate_lists_warnings_in_summary(tmp_path, capsys):
    """A free param the settings ignore (the fee of a passive pool) is named in calibrate's
    summary.json and on stderr."""
    raw = _raw(
        pool={"mode": "passive"},
        simulation={"num_steps": 2, "num_pools": 2},
        calibrate={
            "params": {"pool.fee": {"transform": "sigmoid", "init": 1e-4, "lo": 0.0, "hi": 1e-3}},
            "target": "lp",
            "steps": 1,
            "batch_pools": 2,
            "validation_pools": 2,
        },
    )
    raw["market"] = {"assets": ["BTC"]}
    out = P.calibrate_config(config_from_dict(raw), tmp_path / "cal", quiet=True)
    (line,) = json.loads((out / "summary.json").read_text())["warnings"]
    assert line == 'pool.fee (free): set but ignored with pool.mode = "passive"'
    assert capsys.readouterr().err.strip() == f"warning: {line}"
