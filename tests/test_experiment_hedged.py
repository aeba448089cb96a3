"""End-to-end test of experiments/hedged_sharpe.py on a tiny version of its sweep.

The tiny sweep keeps the experiment's config (quickstart pool, hedged LP) but runs 2 fees ×
2 risk aversions × 8 replicates for 48 steps; the test checks the written findings against
the sweep's own per-pool table, so the script's counting can fail the test.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "hedged_sharpe.py"
TINY = [
    "simulation.num_steps=48",
    "hedge.every=6",
    "sweep.replicates=8",
    'sweep.params={ "pool.fee" = [1.0e-5, 2.0e-4], "hedge.risk_aversion" = [0.03, 10.0] }',
]


def test_hedged_sharpe_experiment_writes_consistent_findings(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), str(ROOT / "configs" / "hedged_sharpe.toml")]
    cmd += ["--out", str(out)] + sum((["--set", s] for s in TINY), [])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    for name in ("sweep.csv", "summary.json", "pools.csv", "findings.md", "confusion.csv"):
        assert (out / name).is_file(), name
    with open(out / "pools.csv") as f:
        pools = list(csv.DictReader(f))
    assert len(pools) == 32
    holds = np.array([float(p["claim41_holds"]) > 0.5 for p in pools])
    beats = np.array([float(p["hedge_beats"]) > 0.5 for p in pools])
    with open(out / "confusion.csv") as f:
        rows = {(r["regime"], r["condition"]): r for r in csv.DictReader(f)}
    row = rows[("all", "claim41_holds")]
    assert int(row["holds_beats"]) == int(np.sum(holds & beats))
    assert int(row["fails_beats"]) == int(np.sum(~holds & beats))
    assert int(row["n"]) == 32
    verdicts = json.loads(done.stdout.strip().splitlines()[-1])
    assert sum(verdicts.values()) == 4
    findings = (out / "findings.md").read_text()
    assert f"{beats.mean():.1%} of 32" in findings
