"""End-to-end test of experiments/calibrate_fee.py in its `--quick` version.

The quick run keeps the experiment's config (quickstart pool, gradient fit of pool.fee and
a grid, both on the reported model: there is no smooth mode any more) but runs 48 steps, 3
Adam steps on 4 markets, a 6-fee grid on 8 markets and 16 held-out markets (about a minute
and a half, most of it compiling). The tests check the numbers in summary.json against
fee_grid.csv, calibrate_config's own summary and each other, not the wording of findings.md.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "calibrate_fee.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrate_fee") / "run"
    cmd = [sys.executable, str(SCRIPT), str(ROOT / "configs" / "calibrate_fee.toml")]
    done = subprocess.run(
        cmd + ["--quick", "--out", str(out)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_quick_run_writes_its_outputs(quick_run):
    for name in ("fee_grid.csv", "summary.json", "sharpe_vs_fee.png", "findings.md"):
        assert (quick_run / name).is_file(), name
    for name in ("calibration.csv", "summary.json", "config.toml"):
        assert (quick_run / "calibration" / name).is_file(), name
    assert (quick_run / "grid" / "pools.csv").is_file()
    assert (quick_run / "sharpe_vs_fee.png").stat().st_size > 10_000


def test_fitted_fee_lies_inside_the_transform_range(quick_run):
    summary = json.loads((quick_run / "summary.json").read_text())
    fit = summary["fits"]["sharpe"]["1"]
    assert summary["fee_lo"] < fit["f_grad"] < summary["fee_hi"]
    # and it is calibrate_config's own fitted value
    own = json.loads((quick_run / "calibration" / "summary.json").read_text())
    assert own["problems"][0]["fitted"]["pool.fee"] == fit["f_grad"]
    assert own["objective"] == "sharpe" and own["target"] == "lp"
    assert fit["validation"] == own["problems"][0]["validation"]
    assert fit["validation_initial"] == own["problems"][0]["validation_initial"]
    # the pathwise gradient of the reported model moves the fee (it is finite and non-zero)
    assert fit["f_grad"] != fit["f_init"]
    lo, hi = fit["last_iterates"]["min"], fit["last_iterates"]["max"]
    assert summary["fee_lo"] <= lo <= fit["last_iterates"]["mean"] <= hi <= summary["fee_hi"]


def test_summary_agrees_with_the_grid_csv(quick_run):
    with open(quick_run / "fee_grid.csv") as f:
        rows = [r for r in csv.DictReader(f) if float(r["elasticity"]) == 1.0]
    fees = np.array([float(r["fee"]) for r in rows])
    sharpe = np.array([float(r["sharpe"]) for r in rows])
    assert len(rows) == 6 and np.all(np.diff(fees) > 0)
    best = int(np.argmax(sharpe))
    lo, hi = float(rows[best]["sharpe_lo"]), float(rows[best]["sharpe_hi"])
    within = [f for f, s in zip(fees, sharpe, strict=True) if lo <= s <= hi]

    summary = json.loads((quick_run / "summary.json").read_text())
    grid = summary["grid"]["1"]
    assert grid["f_grid"] == pytest.approx(fees[best], rel=1e-9)
    assert grid["sharpe"]["mean"] == pytest.approx(sharpe[best], rel=1e-8)
    np.testing.assert_allclose(grid["within_interval"], within, rtol=1e-9)
    assert float(rows[best]["sharpe_minus_best"]) == 0.0
    assert grid["sharpe"]["ci95"] == pytest.approx([lo, hi], rel=1e-8)
    assert grid["f_grid"] in grid["not_paired_worse"]
    assert summary["grid_fees"] == pytest.approx(list(fees), rel=1e-9)


def test_heldout_check_is_paired_and_has_no_smooth_mode(quick_run):
    summary = json.loads((quick_run / "summary.json").read_text())
    assert "temperature" not in summary and summary["dtype"] == "float64"
    ev = summary["heldout"]["1"]
    assert set(ev) == {"grad", "grid", "grad_minus_grid"}  # the smooth-vs-exact bias is gone
    n = summary["eval_pools"]
    assert n == 16 and ev["grad"]["n"] == ev["grid"]["n"] == ev["grad_minus_grid"]["n"] == n
    d = ev["grad_minus_grid"]
    assert d["mean"] == pytest.approx(ev["grad"]["mean"] - ev["grid"]["mean"], abs=1e-9)
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    # pairing on the same markets: the paired interval is far narrower than the unpaired one
    assert d["ci95"][1] - d["ci95"][0] < 0.1 * (d["unpaired_ci95"][1] - d["unpaired_ci95"][0])
    for x in (ev["grad"], ev["grid"], d):
        assert np.all(np.isfinite([x["mean"], *x["ci95"]]))
