"""End-to-end test of experiments/claims_twm.py on a tiny config (64 states, 3 assets).

The tiny config puts Claim 3.4 on the known counterexample setting (F₀ = 0.01, c = 9: the
hypotheses hold, Δ ≈ (1/1.01 − 9f/1.01² + fℓ/R)R > (1/2 − f)R), so the printed bound must
fail in every state and the corrected one hold; Claim 3.1's corrected bound 2√G/μ is a
theorem on the strongly concave model, so it must hold wherever its hypotheses do.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "claims_twm.py"

TINY = """
seed = 0
num_states = 64
chunk_size = 64
[pool]
num_assets = 3
[solver]
arb_steps = 60
random_points = 128
refine_top = 2
bisection_steps = 60
[claim_3_4]
discount_range = [0.01, 0.01]
slope_range = [9.0, 9.0]
[heatmap]
grid = 31
"""

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_script():
    spec = importlib.util.spec_from_file_location("claims_twm", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_claims_experiment_end_to_end(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(cfg), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3.1" in proc.stdout and "wall" in proc.stdout

    for name in ("claims.csv", "states.csv", "summary.json", "config.toml"):
        assert (out / name).is_file(), name
    pngs = ["glp_heatmap.png", *(f"margins_3_{k}.png" for k in range(1, 5))]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name

    with (out / "claims.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["claim"] for r in rows} == {"3.1", "3.2", "3.3", "3.4"}
    for r in rows:
        assert int(r["states"]) == 64
        assert 0 <= int(r["hypotheses_held"]) <= 64
        assert 0.0 <= float(r["share_printed_held_all_states"]) <= 1.0
        for col, hyp in (
            ("share_printed_held", "hypotheses_held"),
            ("share_corrected_held", "corrected_hypotheses_held"),
        ):
            share = float(r[col])
            if int(r[hyp]) > 0:
                assert 0.0 <= share <= 1.0, (r["claim"], r["variant"], col)
            else:
                assert math.isnan(share)

    by = {(r["claim"], r["variant"]): r for r in rows}
    c31 = by["3.1", "constrained"]
    assert int(c31["hypotheses_held"]) == 64  # the model is μ-strongly concave by construction
    assert float(c31["share_corrected_held"]) >= 0.99
    c34 = by["3.4", "value-dependent F"]
    assert int(c34["hypotheses_held"]) == 64
    assert float(c34["share_printed_held"]) == 0.0  # the counterexample: printed bound fails
    assert float(c34["share_corrected_held"]) == 1.0
    glp = by["3.4", "eq. 11 (smooth) at δ_S⁺"]
    assert int(glp["hypotheses_held"]) == 0  # weight-based: pᵀ∇_pF = 0 < 8f

    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 0 and summary["num_states"] == 64
    assert summary["config"]["pool"]["num_assets"] == 3
    assert summary["wall_seconds"] > 0 and summary["versions"]["jax"]
    assert len(summary["claims"]) == len(rows)
    assert summary["diagnostics"]["max_kkt_residual_delta_F"] < 1e-10
    with (out / "states.csv").open() as fh:
        assert sum(1 for _ in fh) == 65


def test_claims_experiment_rejects_unknown_keys(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[pool]\nnum_asets = 3\n")
    assert _load_script().main([str(cfg), "--out", str(tmp_path / "out")]) == 2
    assert "pool.num_asets: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
