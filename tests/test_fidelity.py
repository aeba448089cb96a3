"""Fidelity of the K-bucket book, the cheap version of `benchmarks/fidelity.py`: the engine
(K = 16, merging buckets when full) against the per-trade reference (the NumPy book that
never merges, `benchmarks/numpy_vectorised.py` with `per_trade=True`) on the same draws, 32
pools × 120 hourly steps of the quickstart and of its stress version (vols × 2, leverage 20),
float64. Per metric: |mean paired difference| ≤ max(2% · |reference mean|, 2 SE). And K = 64
moves utilisation and fee income by at most 3% from K = 16."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

POOLS, STEPS = 32, 120
SCENARIOS = ("quickstart", "stress")


def _load_fidelity():
    """Import `benchmarks/fidelity.py` by path (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity.py"
    spec = importlib.util.spec_from_file_location("fidelity", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fid = _load_fidelity()

# Known misses, (scenario, metric) -> why. A merged bucket spreads its members' liquidation
# prices uniformly over the mixture's mean ± √3 sd, which puts some of them further past a
# price gap than the crowds it holds were: bad debt +2.2% (SE 0.8%) here, +1.88% (SE 0.08%,
# within the 2% of the issue) at 256 pools × 720 steps. And it counts a liquidated fraction
# of its size as that fraction of its crowds, which over-counts where a small crowd sits at
# the crossed end: liquidations (crowd-equivalents, not a metric the issue lists) +2.3%
# here and at full size. Before the bucket slope of entry price on key (`market.Book.slope`)
# the liquidated margin missed by −4.9% here (−6.2% at full size); now −0.9% at full size.
KNOWN_MISSES = {
    ("quickstart", "bad_debt"): "a merged bucket's uniform keys reach further past a gap",
    ("quickstart", "liquidations"): "a merged bucket counts crowds in proportion to size",
}


@functools.cache
def _runs(scenario: str) -> tuple[dict, dict, dict]:
    """Per-pool metrics of the per-trade reference, the engine at K = 16 and at K = 64."""
    cfg = fid.make_config(scenario, POOLS, STEPS, 16)
    noise = fid.draws(cfg)
    reference, info = fid.run_reference(cfg, noise, per_trade=True)
    assert info["merged"] == 0 and info["identity_error"] < 1e-12
    engine16 = fid.run_jax_steps(cfg, noise)
    engine64 = fid.run_jax_steps(fid.make_config(scenario, POOLS, STEPS, 64), noise)
    return reference, engine16, engine64


def _cases():
    for scenario in SCENARIOS:
        for metric in fid.METRICS:
            why = KNOWN_MISSES.get((scenario, metric))
            marks = [pytest.mark.xfail(reason=why, strict=True)] if why else []
            yield pytest.param(scenario, metric, marks=marks, id=f"{scenario}-{metric}")


@pytest.mark.parametrize(("scenario", "metric"), list(_cases()))
def test_engine_matches_per_trade_reference(scenario, metric):
    """|engine mean − reference mean| ≤ max(2% · |reference mean|, 2 SE of the paired
    difference), pool by pool on the same draws."""
    reference, engine16, _ = _runs(scenario)
    row = fid.compare(engine16, reference)[metric]
    assert np.isfinite(row["engine_mean"]) and np.isfinite(row["reference_mean"])
    assert row["pass"], (
        f"{scenario} {metric}: engine {row['engine_mean']:.6g} vs per-trade "
        f"{row['reference_mean']:.6g} ({row['rel_diff']:+.2%}, SE {row['se_paired']:.3g})"
    )


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_more_buckets_barely_move_utilisation_and_fees(scenario):
    """K = 64 instead of 16 moves time-average utilisation and fee income by ≤ 3%."""
    _, engine16, engine64 = _runs(scenario)
    moves = fid.k_moves({16: engine16, 64: engine64})
    for metric in ("utilisation", "fees"):
        move = moves[metric]["64"]["rel_move"]
        assert abs(move) <= fid.K_GOAL, f"{scenario} {metric}: K 16 -> 64 moves it {move:+.2%}"


def test_the_reference_is_not_vacuous():
    """The scenarios exercise what is compared: liquidations with bad debt and fees, and a
    reference book that keeps many more buckets than K = 16."""
    for scenario in SCENARIOS:
        reference, engine16, _ = _runs(scenario)
        for metric in ("liquidations", "liquidated_margin", "bad_debt", "fees"):
            assert np.mean(reference[metric]) > 0, (scenario, metric)
