"""Tests of experiments/calibrate_gamma.py (Schur damping γ fitted by gradient).

The end-to-end test runs the script in-process with `--quick` (2 block sizes × 4 ρ × 2 n,
200 + 200 replications); the later tests read its outputs and recompute what they check by
an independent path: the fine-grid validation curve through schur_damping's evaluator
(`pdlpjax.damped_hedge`) rather than the closed form the fit uses, and the finite
differences of the validation CE in NumPy. About 40 s on 2 cores.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pdlpjax as P

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "calibrate_gamma.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FINE = 101  # points of the independent fine grid (spacing 0.01)


def _load_script():
    spec = importlib.util.spec_from_file_location("calibrate_gamma", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


cg = _load_script()
sd = cg.sd  # experiments/schur_damping.py, as the script imports it


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrate_gamma") / "out"
    assert cg.main([str(cg.DEFAULT_CONFIG), "--out", str(out), "--quick", "--quiet"]) == 0
    with (out / "table.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    summary = json.loads((out / "summary.json").read_text())
    s, _ = cg.load_settings(cg.DEFAULT_CONFIG, quick=True)
    return out, rows, summary, s


def _cell(s, row: dict):
    m1, m2 = int(row["m1"]), int(row["m2"])
    return cg.Cell(s.blocks.index((m1, m2)), m1, m2, float(row["rho"]), int(row["n"]))


# --------------------------------------------------------------------------- end to end


def test_quick_run_writes_its_outputs(quick_run):
    out, rows, summary, s = quick_run
    for name in ("table.csv", "summary.json", "config.toml", "gamma_fit.png", "findings.md"):
        assert (out / name).is_file(), name
    assert (out / "gamma_fit.png").read_bytes()[:8] == PNG_MAGIC
    assert len(rows) == len(s.blocks) * len(s.rhos) * len(s.ns)
    for col in ("gamma_oracle", "gamma_grad", "mean_gamma_star"):
        assert col in rows[0]
    for r in rows:
        for m in ("grad", "star", "oracle"):
            lo, mid, hi = (float(r[f"regret_{m}{x}"]) for x in ("_lo", "", "_hi"))
            assert lo <= mid <= hi
        assert float(r["dregret_grad_star_lo"]) <= float(r["dregret_grad_star_hi"])
    text = (out / "findings.md").read_text()
    for heading in ("## Headline", "## 1. Per block size", "## 5. Gradient check"):
        assert heading in text
    assert summary["quick"] is True and summary["seed"] == s.seed
    assert summary["aggregates"]["all"]["cells"] == len(rows)
    # the closed form the fit uses reproduces schur_damping's evaluator on every replication
    assert summary["checks"]["max_rel_diff_grid"] < 1e-10
    assert summary["checks"]["max_rel_diff_star"] < 1e-10
    assert "--quick" in (out / "config.toml").read_text()


def test_unknown_key_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[fit]\nstep = 10\n")
    assert cg.main([str(cfg), "--out", str(tmp_path / "out"), "--quick"]) == 2
    assert "fit.step: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the fit


def test_fitted_gamma_is_strictly_inside_the_unit_interval(quick_run):
    _, rows, _, _ = quick_run
    gammas = np.array([float(r["gamma_grad"]) for r in rows])
    assert np.all((gammas > 0.0) & (gammas < 1.0)), gammas


def test_fit_reaches_the_validation_argmax_on_concave_interior_cells(quick_run):
    """On every cell the run flags as concave with an interior optimum (there must be one),
    the validation CE is recomputed on a 101-point grid through schur_damping's evaluator
    (damped_hedge, not the closed form): it is concave there too, its argmax is interior, and
    the fitted γ is within the oracle grid's spacing of it (the brief's bound; in fact within
    two fine-grid steps)."""
    _, rows, _, s = quick_run
    flagged = [r for r in rows if r["val_concave"] == "1" and r["val_interior"] == "1"]
    assert flagged, "no concave cell with an interior optimum in the quick grid"
    fine = np.linspace(0.0, 1.0, FINE)
    for r in flagged[:3]:
        cell = _cell(s, r)
        evaluate = sd.make_cell_evaluator(s.model._replace(gamma_grid=FINE), cell.m1, cell.m2)
        cov = cg.cell_covariance(s, cell)
        fig = jax.device_get(evaluate(cg.cell_samples(s, cell, 1), jnp.asarray(float(cell.n)), cov))
        curve = fig["conditional_ce_grid"].mean(axis=0) / float(r["ce_opt"])
        assert np.all(curve[:-2] - 2 * curve[1:-1] + curve[2:] <= 1e-10), r
        k = int(np.argmax(curve))
        assert 0 < k < FINE - 1, r
        gap = abs(float(r["gamma_grad"]) - fine[k])
        assert gap <= 1.0 / (s.gamma_grid - 1), (r, fine[k])
        assert gap <= 2.0 / (FINE - 1), (r, fine[k])


# --------------------------------------------------------------------------- the gradient


def _numpy_mean_ce(samples: np.ndarray, n: int, cov_true: np.ndarray, s, m1: int, g: float):
    """Mean CE of conditional damping at γ over the samples, in NumPy from the block formulas
    (Cotton eq. 3 and `damped_hedge`'s docstring): independent of both JAX paths."""
    shrunk = np.asarray(jax.vmap(lambda x: P.oas_shrinkage(x, float(n))[0])(samples))
    a, b, c = shrunk[:, :m1, :m1], shrunk[:, :m1, m1:], shrunk[:, m1:, m1:]
    p = cov_true.shape[0]
    w = s.fee * s.lent_fraction * s.delta * np.ones(p)
    w1, w2 = np.broadcast_to(w[:m1], (len(a), m1)), np.broadcast_to(w[m1:], (len(a), p - m1))

    def solve(m, v):
        return np.linalg.solve(m, v[..., None])[..., 0]

    bt = np.swapaxes(b, 1, 2)
    a_g = a - g * b @ np.linalg.solve(c, bt)
    c_g = c - g * bt @ np.linalg.solve(a, b)
    r1 = w1 - g * np.einsum("rij,rj->ri", b, solve(c, w2))
    r2 = w2 - g * np.einsum("rij,rj->ri", bt, solve(a, w1))
    x = np.concatenate([solve(a_g, r1), solve(c_g, r2)], axis=1) / s.risk_aversion
    lent = s.lent_fraction * s.delta * np.ones(p)
    ce = s.fee * x @ lent - 0.5 * s.risk_aversion * np.einsum("ri,ij,rj->r", x, cov_true, x)
    return float(ce.mean())


def test_gradient_matches_central_finite_differences(quick_run):
    """The run's own check (autodiff of the closed form and through damped_hedge against
    central differences of damped_hedge) passes its stated bound, 1e-6 relative; and, here,
    autodiff of the closed form against central differences of a NumPy evaluation on a 2+2
    cell (float64, h = 1e-5: truncation and rounding both ≈ 1e-10) within the same bound."""
    _, rows, summary, s = quick_run
    gc = summary["gradient_check"]
    assert gc["tolerance"] == 1e-6 and gc["passes"] and gc["max_rel_error"] < 1e-6
    assert len(gc["rows"]) >= 2

    r = next(r for r in rows if r["blocks"] == "2+2" and float(r["rho"]) == 0.3)
    cell = _cell(s, r)
    cov = cg.cell_covariance(s, cell)
    samples = cg.cell_samples(s, cell, 1)
    spec = cg.make_spectral(s.model, cell.m1, cell.m2)(samples, jnp.asarray(float(cell.n)))
    ce_opt = float(r["ce_opt"])
    h = 1e-5
    for g in (0.3, 0.6):
        ad = float(jax.grad(cg.mean_ce, argnums=1)(spec, g, jnp.asarray(cov), ce_opt, s.model))
        up, down = (
            _numpy_mean_ce(samples, cell.n, cov, s, cell.m1, g + d) / ce_opt for d in (h, -h)
        )
        fd = (up - down) / (2 * h)
        assert abs(ad - fd) <= 1e-6 * abs(fd), (g, ad, fd)
        value = float(cg.mean_ce(spec, g, jnp.asarray(cov), ce_opt, s.model))
        ref = _numpy_mean_ce(samples, cell.n, cov, s, cell.m1, g) / ce_opt
        assert value == pytest.approx(ref, rel=1e-10, abs=1e-12)
