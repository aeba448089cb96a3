"""`pdlpjax stress`: the vectorised shock × skew grid against plain loops, and the command."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from pdlpjax import cli, skew_book, stress_grid
from pdlpjax.market import Book
from pdlpjax.pool import PoolState

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml"
TINY = [
    "simulation.num_pools=4",
    "simulation.num_steps=48",
    "simulation.chunk_length=48",
    "output.record_every=0",
]

# A hand-built book of two pools over two risky markets and a numéraire, K = 3 buckets, each
# one position (a bucket without spread, count 1): market 0 has longs (one closed) and a
# short; market 1 has longs only (its short side holds a closed bucket), so it cannot be
# skewed. A bucket's notional is size × entry price. No shocked price is within 1% of a
# liquidation price (checked in `_reference`), so float32 rounding cannot flip a liquidation.
SIZE = [[[2.0, 1.0, 3.0], [1.5, 0.0, 0.0]], [[20.0, 0.0, 0.0], [4.0, 0.0, 0.0]]]
ENTRY = [[[95.0, 110.0, 100.0], [105.0, 0.0, 0.0]], [[10.0, 0.0, 0.0], [11.0, 0.0, 0.0]]]
MARGIN = [[[40.0, 22.0, 10.0], [30.0, 0.0, 0.0]], [[40.0, 0.0, 0.0], [5.0, 0.0, 0.0]]]
OPEN = [[[True, True, False], [True, False, False]], [[True, False, False], [False] * 3]]
# Key half-widths for the skew test only (the grid test's reference needs spread 0).
SPREAD = [[[4.0, 2.5, 1.0], [3.0, 0.0, 0.0]], [[0.5, 0.0, 0.0], [0.25, 0.0, 0.0]]]
PRICES = [[100.0, 10.0, 1.0], [120.0, 9.0, 1.0]]
RESERVES = [[50.0, 400.0, 300.0], [40.0, 500.0, 2000.0]]
SHOCKS = [-0.5, -0.3, -0.1, 0.0, 0.2, 0.35]
SKEWS = [math.nan, -0.5, 0.0, 0.7]


def _hand_state(spread=None):
    size = np.array([SIZE, SIZE], np.float32)
    entry = np.array([ENTRY, ENTRY], np.float32)
    margin = np.array([MARGIN, MARGIN], np.float32)
    spread = np.zeros_like(size) if spread is None else np.array([spread, spread], np.float32)
    book = Book(
        size=jnp.asarray(size),
        notional=jnp.asarray(size * entry),
        margin=jnp.asarray(margin),
        spread=jnp.asarray(spread),
        count=jnp.asarray(np.where(size > 0, 1.0, 0.0).astype(np.float32)),
        slope=jnp.zeros(size.shape, jnp.float32),
        is_open=jnp.asarray(np.array([OPEN, OPEN])),
    )
    pool = PoolState(
        prices=jnp.asarray(PRICES, jnp.float32),
        reserves=jnp.asarray(RESERVES, jnp.float32),
        supply=jnp.ones(2, jnp.float32),
    )

    @dataclasses.dataclass
    class State:  # stress_grid reads only .pool and .book
        pool: PoolState
        book: Book

    return State(pool, book)


def _reference(pool: int, shock: float, skew: float, asset: int | None):
    """One cell by plain loops over buckets, in float64. Every bucket has spread 0, so the
    liquidation rule takes a bucket whole when its equity sign (δ p − n) + c ≤ 0, else none
    of it."""
    size = [[list(map(float, c)) for c in side] for side in SIZE]
    notional = [
        [[d * p0 for d, p0 in zip(dc, pc, strict=True)] for dc, pc in zip(ds, ps, strict=True)]
        for ds, ps in zip(SIZE, ENTRY, strict=True)
    ]
    margin = [[list(map(float, c)) for c in side] for side in MARGIN]
    count = [[[1.0 if d > 0 else 0.0 for d in c] for c in side] for side in SIZE]
    prices = list(PRICES[pool])
    reserves = RESERVES[pool]
    for m in range(2):
        if asset is None or asset == m:
            prices[m] *= 1 + shock
    value = sum(p * q for p, q in zip(prices, reserves, strict=True))
    for m in range(2):
        sides = [sum(size[m][s][j] for j in range(3) if OPEN[m][s][j]) for s in range(2)]
        if math.isnan(skew) or sides[0] == 0 or sides[1] == 0:
            continue
        total = sides[0] + sides[1]
        targets = [(1 + skew) / 2 * total, (1 - skew) / 2 * total]
        for s in range(2):  # size, notional, margin and count scale together
            a = targets[s] / sides[s]
            for field in (size, notional, margin, count):
                field[m][s] = [x * a for x in field[m][s]]
    pnl = liquidated = liq = bad = 0.0
    long_tokens, short_value = [0.0, 0.0], 0.0
    for m in range(2):
        for s, sign in ((0, 1.0), (1, -1.0)):
            for j in range(3):
                if not OPEN[m][s][j]:
                    continue
                d, n, c = size[m][s][j], notional[m][s][j], margin[m][s][j]
                if s == 0:
                    long_tokens[m] += d
                else:
                    short_value += n
                pi = sign * (d * prices[m] - n)
                assert abs(pi + c) > 1e-2 * c, "test book too close to a liquidation price"
                pnl += pi
                if pi + c <= 0:  # the whole bucket goes
                    liquidated += count[m][s][j]
                    liq += d * prices[m]
                    bad += max(-(pi + c), 0.0)
    over = long_tokens[0] > reserves[0] or long_tokens[1] > reserves[1] or short_value > reserves[2]
    return pnl / value, liquidated, liq / value, bad / value, value, over


@pytest.mark.parametrize("asset", [None, 1])
def test_grid_matches_a_loop_over_cohorts(asset):
    grid = stress_grid(_hand_state(), SHOCKS, SKEWS, asset=asset)
    assert grid.pnl_ratio.shape == (len(SHOCKS), len(SKEWS), 2)
    liquidated = bad_cells = 0
    for i, s in enumerate(SHOCKS):
        for j, k in enumerate(SKEWS):
            for p in range(2):
                ratio, count, liq, bad, value, over = _reference(p, s, k, asset)
                assert float(grid.pnl_ratio[i, j, p]) == pytest.approx(ratio, rel=1e-5, abs=1e-7)
                assert float(grid.liquidated_count[i, j, p]) == pytest.approx(
                    count, rel=1e-6, abs=0.0
                )
                assert float(grid.liquidated_value[i, j, p]) == pytest.approx(liq, rel=1e-5)
                assert float(grid.bad_debt[i, j, p]) == pytest.approx(bad, rel=1e-5, abs=1e-8)
                assert float(grid.pool_value[i, p]) == pytest.approx(value, rel=1e-6)
                assert bool(grid.over_reserved[j, p]) == over
                liquidated += count > 0
                bad_cells += bad > 0
    assert liquidated > 0 and bad_cells > 0  # the test exercises liquidations and bad debt
    # Market 1 has no open short: it cannot be skewed, in either pool.
    assert np.asarray(grid.skewable).tolist() == [[True, False], [True, False]]
    if asset is None:  # pool 0's short side needs 354.375 > 300 numéraire at skew -0.5
        assert np.asarray(grid.over_reserved)[:, 0].tolist() == [False, True, False, False]


def test_skew_keeps_total_sets_ratio_and_leverage():
    state = _hand_state(spread=SPREAD)
    book = jax_tree_index(state.book, 0)
    fields = ("size", "notional", "margin", "spread", "count", "is_open")
    open_ = np.asarray(OPEN)
    for k in (-0.8, -0.3, 0.0, 0.45, 0.8):
        out, skewable = skew_book(book, jnp.float32(k))
        size0 = np.where(OPEN, np.asarray(book.size), 0.0)
        size1 = np.where(OPEN, np.asarray(out.size), 0.0)
        before, after = size0.sum(-1), size1.sum(-1)  # (market, side)
        # market 0 (both sides open): L + S kept (notional: one price per market), skew = k
        assert after[0].sum() == pytest.approx(before[0].sum(), rel=1e-6)
        assert (after[0, 0] - after[0, 1]) / after[0].sum() == pytest.approx(k, abs=1e-6)
        assert not np.allclose(size1[0], size0[0])  # the skew did rescale market 0
        # market 1 (no open short): untouched
        for name in fields:
            np.testing.assert_array_equal(
                np.asarray(getattr(out, name))[1], np.asarray(getattr(book, name))[1]
            )
        assert np.asarray(skewable).tolist() == [True, False]
        # entry prices n/δ, margin fractions c/n (so leverage and the mean keys), and counts
        # per token kept; the keys' spread and the open flags are not touched
        for num, den in (("notional", "size"), ("margin", "notional"), ("count", "size")):
            r0 = np.asarray(getattr(book, num))[open_] / np.asarray(getattr(book, den))[open_]
            r1 = np.asarray(getattr(out, num))[open_] / np.asarray(getattr(out, den))[open_]
            np.testing.assert_allclose(r1, r0, rtol=1e-6, err_msg=f"{num}/{den}")
        np.testing.assert_array_equal(np.asarray(out.spread), np.asarray(book.spread))
        np.testing.assert_array_equal(np.asarray(out.is_open), np.asarray(book.is_open))
    same, _ = skew_book(book, jnp.float32(math.nan))  # NaN: as simulated
    for name in fields:
        np.testing.assert_array_equal(
            np.asarray(getattr(same, name)), np.asarray(getattr(book, name))
        )


def jax_tree_index(tree, i):
    import jax

    return jax.tree.map(lambda x: x[i], tree)


@pytest.fixture(scope="module")
def tiny_final_state():
    """The final state of the tiny config, simulated as `stress_test` does."""
    from pdlpjax.build import make_model, make_params, make_spec
    from pdlpjax.config import load_config
    from pdlpjax.simulate import simulate

    cfg = load_config(QUICKSTART, TINY)
    spec = dataclasses.replace(make_spec(cfg), record_every=0)
    res = simulate(
        make_params(cfg),
        make_model(cfg),
        spec,
        seed=cfg.simulation.seed,
        num_steps=cfg.simulation.num_steps,
        chunk_length=cfg.simulation.chunk_length,
    )
    return res.state


def _ratio_numpy(state) -> np.ndarray:
    """Σ sign (δ p − n) over open buckets ÷ pᵀR per pool, in float64 NumPy."""
    size = np.asarray(state.book.size, float)
    notional = np.asarray(state.book.notional, float)
    is_open = np.asarray(state.book.is_open)
    prices = np.asarray(state.pool.prices, float)
    reserves = np.asarray(state.pool.reserves, float)
    r = size.shape[1]
    sign = np.array([1.0, -1.0])[None, None, :, None]
    pnl = np.where(is_open, sign * (size * prices[:, :r, None, None] - notional), 0.0)
    return pnl.sum((1, 2, 3)) / (prices * reserves).sum(1)


def test_zero_shock_as_simulated_is_the_final_states_ratio(tiny_final_state):
    state = tiny_final_state
    assert np.asarray(state.book.is_open).any()  # the traders have open positions
    grid = stress_grid(state, [-0.2, 0.0, 0.3], [math.nan, 0.5])
    expected = _ratio_numpy(state)
    np.testing.assert_allclose(np.asarray(grid.pnl_ratio[1, 0]), expected, rtol=1e-4, atol=1e-7)
    # ... which is the gap between pᵀR and the engine's AUM, over pᵀR
    from pdlpjax.simulate import aum

    value = np.sum(np.asarray(state.pool.prices) * np.asarray(state.pool.reserves), axis=1)
    gap = np.array(
        [
            value[i] - float(aum(jax_tree_index(state.pool, i), jax_tree_index(state.book, i), 3))
            for i in range(value.size)
        ]
    )
    np.testing.assert_allclose(np.asarray(grid.pnl_ratio[1, 0]), gap / value, atol=1e-6)
    # skewing a book changes its ratio (at a shock): the skew row is not the sim row
    assert not np.allclose(np.asarray(grid.pnl_ratio[0, 0]), np.asarray(grid.pnl_ratio[0, 1]))


def test_cli_writes_the_stress_folder(tmp_path, tiny_final_state, capsys):
    out = tmp_path / "stress"
    argv = ["stress", str(QUICKSTART), *(x for s in TINY for x in ("--set", s))]
    assert cli.main([*argv, "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with open(out / "stress.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 11 * 10  # default shocks × (sim + 9 skews)
    assert [r["skew"] for r in rows[:10]] == ["sim", "-0.8", "-0.6", "-0.4", "-0.2", "0"] + [
        "0.2",
        "0.4",
        "0.6",
        "0.8",
    ]
    assert {r["shock"] for r in rows} == {f"{x:g}" for x in np.linspace(-0.5, 0.5, 11).round(10)}
    cell = next(r for r in rows if r["shock"] == "0" and r["skew"] == "sim")
    expected = _ratio_numpy(tiny_final_state)  # the same seed gives the same final books
    assert float(cell["pnl_ratio_mean"]) == pytest.approx(expected.mean(), rel=1e-4, abs=1e-7)
    assert float(cell["pnl_ratio_p95"]) == pytest.approx(
        np.percentile(expected, 95), rel=1e-4, abs=1e-7
    )
    for r in rows:
        assert 0.0 <= float(r["adl_share"]) <= 1.0
        assert float(r["bad_debt_mean"]) >= 0.0
    info = json.loads((out / "stress.json").read_text())
    assert info["grid"]["skews"][0] == "sim" and info["settings"]["adl_threshold"] == 0.45
    assert info["pools"] == 4 and len(info["config_hash"]) == 16
    book = info["starting_book"]
    assert 0.0 < book["utilisation_mean"] < 1.0 and -1.0 <= book["skew_notional_mean"] <= 1.0
    assert book["pool_markets"] == 12
    pngs = sorted(p.name for p in out.glob("stress_*.png"))
    assert len(pngs) == 6 and "stress_pnl_ratio_mean.png" in pngs
    assert (out / "config.toml").is_file()
    # one asset, a custom grid, into the same folder only with --overwrite
    custom = [*argv, "--out", str(out), "--quiet", "--asset", "SOL", "--shocks=-0.3,0.3"]
    assert cli.main([*custom, "--skews", "0"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert cli.main([*custom, "--skews", "0", "--overwrite"]) == 0
    with open(out / "stress.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["shock"], r["skew"]) for r in rows] == [
        ("-0.3", "sim"),
        ("-0.3", "0"),
        ("0.3", "sim"),
        ("0.3", "0"),
    ]
    assert json.loads((out / "stress.json").read_text())["grid"]["asset"] == "SOL"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--asset", "DOGE"], "stress --asset DOGE: is not an asset"),
        (["--asset", "USDC"], "is the numéraire"),
        (["--set", 'pool.mode="passive"'], 'pool.mode = "passive" has no traders'),
        (["--shocks=-0.5,x"], "--shocks: expected comma-separated numbers"),
        (["--shocks=-1"], "stress shocks: -1 is outside"),
        (["--skews", "0,1.5"], "stress skews: 1.5 is outside"),
    ],
)
def test_bad_input_exits_2(tmp_path, capsys, extra, message):
    argv = ["stress", str(QUICKSTART), "--out", str(tmp_path / "o"), "--quiet", *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not any((tmp_path / "o").glob("stress*"))


def test_pools_blocks_are_refused(tmp_path, capsys):
    path = tmp_path / "blocks.toml"
    path.write_text(
        QUICKSTART.read_text() + '\n[[pools]]\nassets = ["BTC"]\n[[pools]]\nassets = ["ETH", '
        '"SOL"]\n'
    )
    assert cli.main(["stress", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "[[pools]] blocks are not supported" in capsys.readouterr().err


def test_help_and_missing_config(capsys):
    with pytest.raises(SystemExit):
        cli.main(["stress", "-h"])
    out = capsys.readouterr().out
    assert "configs/quickstart.toml" in out and "--adl-threshold" in out
    assert "--resume" not in out and "--overwrite" in out
    assert cli.main(["stress"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "error: stress: expected a config file, e.g. pdlpjax stress configs/quickstart.toml"
    )
