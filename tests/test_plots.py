"""Plots: every PNG is written, and the labels say what is drawn, in which unit."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest

import pdlpjax as P
from pdlpjax import calibrate as C
from pdlpjax import plots
from pdlpjax import sweep as sweep_mod
from pdlpjax.config import config_from_dict

NAN = float("nan")
TERMS = {
    "inventory": (-0.031, -0.05, -0.012),
    "trader_pnl": (0.012, 0.004, 0.02),
    "fees": (0.021, 0.019, 0.023),
    "bad_debt": (-0.0008, -0.0012, -0.0004),
    "swap_arbitrage": (0.0, NAN, NAN),
}


def _png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_step_length_and_axis_labels_carry_units():
    assert plots.step_length(8760) == "1 h"
    assert plots.step_length(365) == "1 day"
    assert plots.step_length(1000) == "1/1000 year"
    assert plots.axis_label("pool.fee") == "pool.fee (per step = 1 h)"
    assert plots.axis_label("pool.fee", 365) == "pool.fee (per step = 1 day)"
    assert plots.axis_label("hedge.every", 8760) == "hedge.every (steps of 1 h)"
    assert plots.axis_label("paths.vols") == "paths.vols (annualised)"
    assert plots.axis_label("no.such_key") == "no.such_key"


@pytest.mark.parametrize(
    "terms, total",
    [
        (TERMS, (0.0012, -0.01, 0.012)),
        ({k: (0.0, 0.0, 0.0) for k in TERMS}, (0.0, 0.0, 0.0)),
        ({k: (v[0], NAN, NAN) for k, v in TERMS.items()}, (0.0012, NAN, NAN)),
    ],
    ids=["normal", "all_zero", "nan_intervals"],
)
def test_attribution_chart_writes_a_png(tmp_path, terms, total):
    plots.attribution_chart(tmp_path / "a.png", terms, total, "attribution")
    assert _png(tmp_path / "a.png") and (tmp_path / "a.png").stat().st_size > 1000


def test_attribution_chart_labels():
    fig = plots._draw_attribution(TERMS, (0.0012, -0.01, 0.012), "t", unit="% of initial LP value")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "% of initial LP value"
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["inventory", "trader pnl", "fees", "bad debt", "swap arbitrage", "total"]
    texts = _texts(ax)
    assert "-3.10%" in texts and "+2.10%" in texts and "+0.12%" in texts  # in percent
    bars = ax.patches[: len(TERMS) + 1]
    # The waterfall: each term starts where the last ended; the total starts at 0.
    assert bars[1].get_y() == pytest.approx(-3.1) and bars[1].get_height() == pytest.approx(1.2)
    assert bars[-1].get_y() == 0 and bars[-1].get_height() == pytest.approx(0.12)
    gain, loss = bars[1].get_facecolor(), bars[0].get_facecolor()
    assert gain != loss and bars[3].get_facecolor() == loss
    plt.close(fig)


def test_attribution_chart_states_a_residual():
    terms = {"inventory": (0.02, NAN, NAN), "fees": (0.01, NAN, NAN)}
    fig = plots._draw_attribution(terms, (0.035, NAN, NAN), "t")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("residual +0.50%" in t for t in legend)
    fig = plots._draw_attribution(terms, (0.03, NAN, NAN), "t")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert not any("residual" in t for t in legend)
    plt.close("all")


def test_sharpe_pair(tmp_path):
    u = np.array([0.0, 1.0, 2.0, NAN])
    h = np.array([0.5, 1.5, 1.0, 3.0])
    plots.sharpe_pair(tmp_path / "s.png", u, h, "pairs")
    assert _png(tmp_path / "s.png")
    fig = plots._draw_sharpe_pair(u, h, "pairs")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "unhedged LP Sharpe (annualised)"
    assert ax.get_ylabel() == "hedged LP Sharpe (annualised)"
    box = _texts(ax)[0]
    assert "3 pools" in box and "above y = x: 66.7%" in box
    assert "mean hedged − unhedged: +0" in box and "95% interval" in box
    plots.sharpe_pair(tmp_path / "empty.png", [NAN], [1.0], "none finite")
    assert _png(tmp_path / "empty.png")
    plt.close("all")


def test_fan_chart_units_and_overlay(tmp_path):
    rng = np.random.default_rng(0)
    t = np.arange(11.0)
    v = 1 + 0.01 * rng.normal(size=(20, 11)).cumsum(axis=1)
    plots.fan_chart(tmp_path / "f.png", t, v, "fan")  # the old positional call
    assert _png(tmp_path / "f.png")
    fig = plots._draw_fan(t, v, "fan", overlay=[(t, v + 0.1, "hedged LP")], xlabel="hours")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "LP share price (numéraire per share)"
    assert ax.get_xlabel() == "hours"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert np.allclose(lines["hedged LP (median)"].get_ydata(), np.median(v + 0.1, axis=0))
    plt.close(fig)


def test_heatmap_marks_and_note(tmp_path):
    values = np.array([[0.1, -0.2], [0.3, NAN]])
    marks = np.array([[False, True], [True, False]])
    plots.heatmap(tmp_path / "h.png", values, [1, 2], [3, 4], "x", "y", "t")  # old call
    assert _png(tmp_path / "h.png")
    fig = plots._draw_heatmap(values, [1, 2], [3, 4], "x", "y", "title", marks=marks, note="avg")
    ax = fig.axes[0]
    assert _texts(ax) == ["0.10", "-0.20*", "0.30*", "–"]
    assert "avg" in ax.get_title() and "* bold, boxed: 95% interval excludes 0" in ax.get_title()
    assert fig._suptitle.get_text() == "title"
    assert "annualised" in fig.axes[1].get_ylabel()  # the colour bar
    plt.close(fig)
    with pytest.raises(ValueError, match="marks has shape"):
        plots._draw_heatmap(values, [1, 2], [3, 4], "x", "y", "t", marks=np.ones((1, 2)))


SWEEP = {
    "name": "plot_sweep",
    "market": {"assets": ["BTC"], "initial_prices": [60000.0], "cohorts": 4},
    "paths": {"vols": [0.8], "correlation": [[1.0]]},
    "pool": {"target_weights": [0.5, 0.5]},
    "hedge": {"enabled": True, "every": 6, "covariance": "window", "window": 24},
    "simulation": {"num_steps": 24, "progress": False},
    "sweep": {
        "params": {
            "pool.fee": [1.0e-5, 1.0e-4],
            "hedge.risk_aversion": [1.0, 10.0],
            "paths.vols": [[0.5], [1.0]],
        },
        "replicates": 8,
    },
}


def test_sweep_heatmap_averages_and_marks(tmp_path, monkeypatch):
    """The heatmap cell is the mean over its combinations (here the two vols) of the paired
    differences, replicate by replicate; a cell is marked when its interval excludes 0."""
    cfg = config_from_dict(json.loads(json.dumps(SWEEP)))
    _, combos = P.sweep_config(cfg)
    reps = 8
    rng = np.random.default_rng(1)
    sharpe = rng.normal(size=len(combos) * reps)
    diff = rng.normal(scale=0.01, size=(len(combos), reps))
    diff -= diff.mean(axis=1, keepdims=True)  # every combination's mean difference 0 ...
    for g, c in enumerate(combos):  # ... but fee 1e-4, risk aversion 10: +1
        if c["pool.fee"] == 1.0e-4 and c["hedge.risk_aversion"] == 10.0:
            diff[g] += 1.0
    metrics = {"sharpe": sharpe, "hedged_sharpe": sharpe + diff.ravel()}
    metrics |= {k: np.zeros_like(sharpe) for k in ("claim41_holds", "hedge_beats")}
    table = sweep_mod._table(metrics, combos, reps)
    seen = {}
    monkeypatch.setattr(plots, "heatmap", lambda path, *a, **kw: seen.update(a=a, kw=kw))
    sweep_mod._heatmaps(tmp_path, cfg, combos, table, metrics=metrics, reps=reps)
    grid, xs, ys, xlabel, ylabel = seen["a"][:5]
    assert xs == [1.0e-5, 1.0e-4] and ys == [1.0, 10.0]
    assert np.allclose(grid, [[0, 0], [0, 1]], atol=1e-9)
    assert seen["kw"]["marks"].tolist() == [[False, False], [False, True]]
    assert xlabel == "pool.fee (per step = 1 h)"
    assert ylabel == "hedge.risk_aversion (γ_r, dimensionless)"
    note = seen["kw"]["note"]
    assert "mean over 16 pools per cell" in note and "2 settings of paths.vols" in note


def test_calibration_png_labels(tmp_path, monkeypatch):
    raw = json.loads(json.dumps(SWEEP))
    del raw["sweep"]
    raw["pool"]["fee"] = {"grid": [1.0e-5, 1.0e-4]}
    raw["calibrate"] = {
        "params": {"hedge.risk_aversion": {"transform": "softplus", "init": 0.05, "lo": 0.01}},
        "objective": "sharpe",
        "steps": 4,
        "validate_every": 2,
    }
    cfg = config_from_dict(raw)
    rows = []
    for s in range(4):
        for i in range(2):
            rows.append(
                [s, i, f"{-0.1 * s - i}", f"{0.05 + 0.01 * s}", "0.1", f"{s}" * (s % 2 == 0)]
            )
    rows += [[4, i, "", "0.09", "", "2.5"] for i in range(2)]
    figs = []
    monkeypatch.setattr(C._io, "save_figure", lambda path, fig: figs.append(fig))
    combos = [{"pool.fee": 1e-5}, {"pool.fee": 1e-4}]
    C._plots(tmp_path, cfg, rows, ["hedge.risk_aversion"], 2, combos)
    (fig,) = figs
    obj, param = fig.axes
    assert obj.get_ylabel() == "hedged LP Sharpe (annualised)"
    assert param.get_ylabel() == "hedge.risk_aversion (γ_r, dimensionless)"
    assert "maximising" in fig._suptitle.get_text()
    validation = [line for line in obj.get_lines() if line.get_marker() == "o"]
    assert len(validation) == 2  # one per problem: steps 0, 2 and the fitted values at 4
    assert validation[0].get_xdata().tolist() == [0, 2, 4]
    assert validation[0].get_ydata().tolist() == [0.0, 2.0, 2.5]
    legend = [t.get_text() for t in obj.get_legend().get_texts()]
    assert any(t.startswith("validation") for t in legend) and "pool.fee=0.0001" in legend
    plt.close(fig)
