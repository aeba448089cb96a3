"""Historical replay (`paths.replay_start`): the data's own returns, in order, on every pool.

Prices are checked against closes read straight from the CSV files with the `csv` module
(not through `pdlpjax.data`); config errors are checked in-process, before anything compiles.
"""

from __future__ import annotations

import csv
from pathlib import Path

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import pdlpjax as P
from pdlpjax.build import make_model, make_params, make_spec
from pdlpjax.config import ConfigError, config_from_dict, load_config
from pdlpjax.paths import Replay

ROOT = Path(__file__).resolve().parents[1]
HOURLY = ROOT.parent / "shared" / "data" / "misrori_binance_startegy"
ASSETS = ("BTC", "ETH", "SOL")


# --------------------------------------------------------------------------- helpers


def _daily_folder(folder: Path, closes: dict[str, list[float]], dates: list[str]) -> Path:
    """One `<ASSET>USDT_1d.csv` per asset with `timestamp,close` rows."""
    folder.mkdir(parents=True, exist_ok=True)
    for asset, values in closes.items():
        rows = "".join(f"{d},{float(c)!r}\n" for d, c in zip(dates, values, strict=True))
        (folder / f"{asset}USDT_1d.csv").write_text("timestamp,close\n" + rows)
    return folder


def _dates(start: str, days: int) -> list[str]:
    first = np.datetime64(start, "D")
    return [str(first + k) for k in range(days)]


def _synthetic(tmp_path: Path, days: int = 20, dates: list[str] | None = None) -> Path:
    dates = dates or _dates("2024-01-01", days)
    rng = np.random.default_rng(7)
    closes = {
        a: list(np.round(p0 * np.exp(np.cumsum(rng.normal(0, 0.05, len(dates)))), 6))
        for a, p0 in (("BTC", 40000.0), ("ETH", 2500.0))
    }
    return _daily_folder(tmp_path / "data", closes, dates)


def _cfg(folder: Path, **paths) -> dict:
    return {
        "market": {"assets": ["BTC", "ETH"], "numeraire": "USDC", "initial_prices": [1.0, 2.0]},
        "paths": {"model": "bootstrap", "data": str(folder), **paths},
        "simulation": {"num_pools": 4, "num_steps": 5, "steps_per_year": 365.0},
    }


def _with(raw: dict, section: str, **values) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    out[section].update(values)
    return out


def _csv_closes(folder: Path, asset: str) -> tuple[list[str], np.ndarray]:
    """(times as written, closes) of `asset`'s CSV, read with the csv module only."""
    (path,) = folder.glob(f"{asset}USDT*.csv")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    key = "date" if "date" in rows[0] else "timestamp"
    return [r[key] for r in rows], np.asarray([float(r["close"]) for r in rows])


# --------------------------------------------------------------------------- the model


def test_replay_model_plays_the_window_in_order_from_the_first_time_at_or_after(tmp_path):
    folder = _synthetic(tmp_path)
    cfg = config_from_dict(_cfg(folder, replay_start="2024-01-03 12:00"))
    model = make_model(cfg)
    assert isinstance(model, Replay)
    # 2024-01-03 12:00 falls between rows: the replay starts at 2024-01-04 (row 3).
    rows = {a: _csv_closes(folder, a)[1] for a in ("BTC", "ETH")}
    closes = np.stack([rows["BTC"], rows["ETH"]], axis=1)
    want = np.diff(np.log(closes[3:9]), axis=0)  # step k: close[3 + k] / close[3 + k - 1]
    np.testing.assert_allclose(np.asarray(model.returns), want, rtol=1e-6)

    params = jnp.zeros(())  # the replay reads no parameter
    state, got = model.init(params), []
    for t in range(5):
        noise = model.noise(jr.key(t))  # no draws: any key gives the same step
        state, x = model.step(state, params, noise)
        got.append(np.asarray(x))
        assert int(state) == t + 1
    np.testing.assert_array_equal(np.stack(got), np.asarray(model.returns))
    with pytest.raises(ValueError, match="antithetic"):
        model.antithetic(model.noise(jr.key(0)))


def test_without_replay_start_the_bootstrap_is_unchanged(tmp_path):
    """`replay_start = ""` (the default) keeps the resampling bootstrap over every return."""
    folder = _synthetic(tmp_path)
    model = make_model(config_from_dict(_cfg(folder)))
    assert type(model) is P.Bootstrap
    closes = np.stack([_csv_closes(folder, a)[1] for a in ("BTC", "ETH")], axis=1)
    np.testing.assert_allclose(np.asarray(model.returns), np.diff(np.log(closes), axis=0), 1e-6)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "start, match",
    [
        (
            "2023-12-31",
            r"paths\.replay_start: 2023-12-31 is outside the span .* 2024-01-01 \.\. "
            r"2024-01-20",
        ),
        ("2024-01-21", r"paths\.replay_start: 2024-01-21 is outside the span"),
        (
            "2024-01-17",
            r"simulation\.num_steps: expected at most 3, .*last time is "
            r"2024-01-20\), got 5",
        ),
        ("2024-01-20", r"simulation\.num_steps: expected at most 0"),
    ],
)
def test_replay_window_outside_the_data_is_refused(tmp_path, start, match):
    cfg = config_from_dict(_cfg(_synthetic(tmp_path), replay_start=start))
    with pytest.raises(ConfigError, match=match):
        make_model(cfg)


def test_replay_may_end_on_the_last_row(tmp_path):
    cfg = config_from_dict(_cfg(_synthetic(tmp_path), replay_start="2024-01-15"))
    assert make_model(cfg).returns.shape == (5, 2)


@pytest.mark.parametrize(
    "start",
    [
        "2022/05/05",
        "2022-5-5",
        "2022-13-01",
        "2022-02-30",
        "2022-05-05 25:00",
        "2022-05-05T12:00",
        "2022-05-05 12:00:00",
        "yesterday",
        " 2022-05-05",
    ],
)
def test_malformed_replay_start_is_refused(tmp_path, start):
    with pytest.raises(ConfigError, match=r'paths\.replay_start: expected a UTC date "YYYY-MM-DD"'):
        config_from_dict(_cfg(_synthetic(tmp_path), replay_start=start))


def test_malformed_replay_start_is_refused_even_where_ignored():
    raw = {"market": {"assets": ["BTC"]}, "paths": {"model": "gbm", "replay_start": "soon"}}
    with pytest.raises(ConfigError, match=r"paths\.replay_start"):
        config_from_dict(raw)


def test_replay_refuses_antithetic(tmp_path):
    raw = _cfg(_synthetic(tmp_path), replay_start="2024-01-02", antithetic=True)
    with pytest.raises(ConfigError, match=r"paths\.antithetic: not defined for a replay"):
        config_from_dict(raw)


def test_replay_checks_the_data_spacing(tmp_path):
    raw = _cfg(_synthetic(tmp_path), replay_start="2024-01-02")
    cfg = config_from_dict(_with(raw, "simulation", steps_per_year=8760.0))
    with pytest.raises(ConfigError, match=r"simulation\.steps_per_year: .* 365 steps per year"):
        make_model(cfg)


def test_replay_refuses_a_hole_only_inside_its_window(tmp_path):
    """A 10-day hole: the resampling bootstrap refuses the data; a replay refuses it only
    when its window crosses it, and replays the rows after it."""
    dates = _dates("2024-01-01", 10) + _dates("2024-01-20", 20)
    folder = _synthetic(tmp_path, dates=dates)
    with pytest.raises(ConfigError, match="hole"):
        make_model(config_from_dict(_cfg(folder)))
    crossing = config_from_dict(_cfg(folder, replay_start="2024-01-07"))
    with pytest.raises(
        ConfigError, match=r"paths\.replay_start: .* crosses a hole .* 2024-01-10 to 2024-01-20"
    ):
        make_model(crossing)
    after = make_model(config_from_dict(_cfg(folder, replay_start="2024-01-20")))
    closes = np.stack([_csv_closes(folder, a)[1] for a in ("BTC", "ETH")], axis=1)
    np.testing.assert_allclose(
        np.asarray(after.returns), np.diff(np.log(closes[10:16]), axis=0), rtol=1e-6
    )


def test_replay_keys_are_reported_when_ignored(tmp_path):
    folder = _synthetic(tmp_path)
    gbm = config_from_dict(
        {"market": {"assets": ["BTC"]}, "paths": {"model": "gbm", "replay_start": "2024-01-02"}}
    )
    assert gbm.warnings == ('paths.replay_start: set but ignored with paths.model = "gbm"',)
    replay = config_from_dict(
        _cfg(folder, replay_start="2024-01-02", block_length=5.0, allow_gaps=True)
    )
    assert replay.warnings == (
        "paths.block_length, paths.allow_gaps: set but ignored with "
        'paths.replay_start = "2024-01-02" (a replay)',
    )
    plain = config_from_dict(_cfg(folder, block_length=5.0))
    assert plain.warnings == ()


# --------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def hourly(tmp_path_factory) -> Path:
    """The shared hourly Binance folder, or (without it) synthetic hourly CSVs of its shape."""
    if HOURLY.is_dir():
        return HOURLY
    folder = tmp_path_factory.mktemp("hourly")
    times = np.datetime64("2022-05-09T00:00") + np.arange(24 * 5) * np.timedelta64(1, "h")
    rng = np.random.default_rng(3)
    for a, p0 in zip(ASSETS, (30000.0, 2000.0, 60.0), strict=True):
        closes = p0 * np.exp(np.cumsum(rng.normal(0, 0.01, times.size)))
        body = "".join(
            f"{str(t).replace('T', ' ')}:00,0,0,0,{c:.6f},0,{a}USDT\n"
            for t, c in zip(times, closes, strict=True)
        )
        (folder / f"{a}USDT_1h.csv").write_text("date,open,high,low,close,volume,ticker\n" + body)
    return folder


START, STEPS = "2022-05-11 00:00", 48


@pytest.fixture(scope="module")
def replay_run(hourly):
    """4 pools of the LUNA replay config for 48 hours from 2022-05-11 00:00, every step
    recorded."""
    cfg = load_config(
        ROOT / "configs" / "replay_2022_05.toml",
        [
            f'paths.data="{hourly}"',
            f'paths.replay_start="{START}"',
            "simulation.num_pools=4",
            f"simulation.num_steps={STEPS}",
            f"simulation.chunk_length={STEPS}",
            "output.record_every=1",
        ],
    )
    res = P.simulate(
        make_params(cfg),
        make_model(cfg),
        make_spec(cfg),
        seed=0,
        num_steps=STEPS,
        chunk_length=STEPS,
    )
    return cfg, res


def test_replayed_prices_are_the_csv_closes_on_every_pool(replay_run, hourly):
    cfg, res = replay_run
    expected = []
    times = None
    for a in ASSETS:
        t, c = _csv_closes(hourly, a)
        s = next(i for i, x in enumerate(t) if x >= START)  # ISO text sorts as time
        assert times is None or t[s : s + STEPS + 1] == times  # same hours in every file
        times = t[s : s + STEPS + 1]
        expected.append(c[s + 1 : s + STEPS + 1] / c[s])
    init = np.asarray(cfg.market.initial_prices)
    want = init * np.stack(expected, axis=1)  # (steps, risky)
    prices = np.asarray(res.record.prices, np.float64)  # (pools, steps, assets)
    assert prices.shape == (4, STEPS, 4)
    for pool in range(4):
        np.testing.assert_allclose(prices[pool, :, :3], want, rtol=2e-5)
        np.testing.assert_array_equal(prices[pool, :, 3], 1.0)  # the numéraire


def test_pools_share_the_path_but_not_the_traders(replay_run):
    _, res = replay_run
    prices = np.asarray(res.record.prices)
    np.testing.assert_array_equal(prices, np.broadcast_to(prices[:1], prices.shape))
    share = np.asarray(res.record.share_price)
    assert len({row.tobytes() for row in share}) == 4  # every pool's LP path its own
    opened = np.asarray(res.metrics["opened"])
    liquidations = np.asarray(res.metrics["liquidations"])
    assert len(set(opened.tolist())) > 1 or len(set(liquidations.tolist())) > 1
