"""Tests of experiments/schur_damping.py (Schur damping across pools).

The end-to-end test runs the script in-process with `--quick` on synthetic closes written to
a temporary folder (the shared data is not needed); the later tests reuse its compiled
functions (same model, block sizes and batch shapes), which keeps the file well under a
minute on 2 cores.

At ρ = 0 the brief's "all rules agree in expectation" holds only in the limit n → ∞: with
the true Σ every rule gives the same hedge exactly, but with Σ̂ from n returns every γ > 0
adds the noise of B̂ C⁻¹ to the hedge, an expected CE cost of order 1/n that is many standard
errors from zero with thousands of paired replications. The test states and checks that:
exact agreement with Σ known, and an estimation cost that is negative and shrinks like 1/n.
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
SCRIPT = ROOT / "experiments" / "schur_damping.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK_REPS = 200  # the --quick replication count: batches of this size reuse its compiles


def _load_script():
    spec = importlib.util.spec_from_file_location("schur_damping", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


sd = _load_script()


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _synthetic_returns(num_days: int = 150, seed: int = 7) -> np.ndarray:
    """Correlated daily simple returns of three assets (1 + 2 pools), fixed seed."""
    rng = np.random.default_rng(seed)
    corr = np.array([[1.0, 0.6, 0.5], [0.6, 1.0, 0.4], [0.5, 0.4, 1.0]])
    vols = np.array([0.03, 0.05, 0.06])
    z = rng.standard_normal((num_days - 1, 3)) @ np.linalg.cholesky(corr).T
    return np.expm1(z * vols)


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    """A folder of <ASSET>USDT_1d.csv files shaped like ../shared/data's (timestamp, close)."""
    folder = tmp_path_factory.mktemp("closes")
    r = _synthetic_returns()
    prices = 100.0 * np.vstack([np.ones(3), np.cumprod(1.0 + r, axis=0)])
    days = np.arange(np.datetime64("2022-01-01"), np.datetime64("2022-01-01") + len(prices))
    for j, name in enumerate(("AAA", "BBB", "CCC")):
        lines = ["timestamp,open,high,low,close,volume"]
        lines += [f"{d},1,1,1,{p:.10g},1" for d, p in zip(days, prices[:, j], strict=True)]
        (folder / f"{name}USDT_1d.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def quick_settings(data_folder, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("cfg") / "quick.toml"
    cfg.write_text(
        f'seed = 0\ndata = "{data_folder}"\n[real]\npool1 = ["AAA"]\npool2 = ["BBB", "CCC"]\n'
    )
    s, _ = sd.load_settings(cfg, quick=True)
    return cfg, s


# --------------------------------------------------------------------------- end to end


def test_quick_run_writes_outputs_and_findings(quick_settings, tmp_path):
    cfg, s = quick_settings
    out = tmp_path / "out"
    assert sd.main([str(cfg), "--out", str(out), "--quick", "--quiet"]) == 0
    names = [
        "table.csv",
        "table_plain.csv",
        "real_table.csv",
        "summary.json",
        "config.toml",
        "gamma_gap.png",
        "sharpe_vs_gamma.png",
        "findings.md",
    ]
    for name in names:
        assert (out / name).is_file(), name
    for name in ("gamma_gap.png", "sharpe_vs_gamma.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name

    with (out / "table.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(s.blocks) * len(s.rhos) * len(s.ns)
    for r in rows:
        assert 0.0 <= float(r["gamma_oracle"]) <= 1.0
        assert 0.0 <= float(r["mean_gamma_star"]) <= 1.0
        assert 0.0 <= float(r["share_binary_merge"]) <= 1.0
        # the oracle's own paired difference is not a column; every other rule's is
        assert float(r["dce_merged_lo"]) <= float(r["dce_merged"]) <= float(r["dce_merged_hi"])
        assert float(r["ce_oracle_lo"]) <= float(r["ce_oracle"]) <= float(r["ce_oracle_hi"])
    with (out / "real_table.csv").open() as fh:
        real = list(csv.DictReader(fh))
    assert {(int(r["window"]), r["hedge"]) for r in real} == {
        (n, v) for n in s.windows for v in ("conditional", "plain")
    }

    text = (out / "findings.md").read_text()
    for heading in ("## Headline", "## 1. Does γ* track", "## 4. Mostly split", "## 6. Real"):
        assert heading in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True and summary["seed"] == 0
    assert summary["diagnostics"]["max_merged_gap_conditional"] < 1e-10
    assert summary["diagnostics"]["max_rho_construction_error"] < 1e-10
    assert summary["real"]["info"]["assets"] == ["AAA", "BBB", "CCC"]
    assert "--quick" in (out / "config.toml").read_text()


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'data = "{tmp_path / "nowhere"}"\n')
    assert sd.main([str(cfg), "--out", str(tmp_path / "out"), "--quick"]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_key_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[simulation]\nrhoss = [0.5]\n")
    assert sd.main([str(cfg), "--quick"]) == 2
    assert "simulation.rhoss: unknown key" in capsys.readouterr().err


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("m1, m2", [(1, 1), (2, 5), (4, 4), (3, 2)])
@pytest.mark.parametrize("rho", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_factor_construction_gives_the_first_canonical_correlation(m1, m2, rho):
    vol1, vol2, within = 0.035, 0.06, 0.5
    cov = sd.true_covariance(m1, m2, rho, vol1, vol2, within)
    assert np.linalg.eigvalsh(cov).min() > 0
    np.testing.assert_allclose(np.diag(cov), [vol1**2] * m1 + [vol2**2] * m2, rtol=1e-14)
    sigma = np.sqrt(np.diag(cov))
    corr = cov / np.outer(sigma, sigma)
    if m1 > 1:
        assert corr[0, 1] == pytest.approx(within, rel=1e-12)
    # the library's measure, and an independent one: singular values of A^-½ B C^-½
    assert float(P.coupling_rho(jnp.asarray(cov), m1)) == pytest.approx(rho, abs=1e-12)
    avg = float(P.coupling_rho(jnp.asarray(cov), m1, kind="average"))
    assert avg == pytest.approx(rho / np.sqrt(min(m1, m2)), abs=1e-12)

    def inv_sqrt(x):
        w, v = np.linalg.eigh(x)
        return v @ np.diag(w**-0.5) @ v.T

    a, b, c = cov[:m1, :m1], cov[:m1, m1:], cov[m1:, m1:]
    canon = np.linalg.svd(inv_sqrt(a) @ b @ inv_sqrt(c), compute_uv=False)
    np.testing.assert_allclose(canon, [rho] + [0.0] * (min(m1, m2) - 1), atol=1e-12)


@pytest.mark.parametrize("m1, m2", [(1, 1), (2, 5), (4, 4)])
@pytest.mark.parametrize("rho", [0.1, 0.5, 0.9])
def test_with_sigma_known_merged_is_optimal(m1, m2, rho):
    """Analytically: CE(x) = f ℓᵀx − (γ_r/2) xᵀΣx is concave with maximiser x* = (f/γ_r)Σ⁻¹ℓ
    (eq. 13, x = π + Δ); conditional damping at γ = 1 is exactly that hedge, so with the true
    Σ no γ on the grid beats γ = 1, and every γ < 1 is strictly worse when B ≠ 0."""
    s = sd.load_settings(sd.DEFAULT_CONFIG)[0]
    model = s.model
    cov = sd.true_covariance(m1, m2, rho, s.vol_pool1, s.vol_pool2, s.within_corr)
    p = m1 + m2
    delta = np.full(p, model.delta)
    lent = model.lent_fraction * delta
    grid = np.linspace(0.0, 1.0, 21)
    x = np.stack(
        [
            np.asarray(
                P.damped_hedge(
                    jnp.asarray(cov),
                    m1,
                    g,
                    jnp.asarray(lent),
                    jnp.asarray(delta),
                    model.fee,
                    model.risk_aversion,
                    conditional=True,
                )  # fmt: skip
            )
            + delta
            for g in grid
        ]
    )
    ce, _ = sd.outcomes(jnp.asarray(x), jnp.asarray(cov), model)
    ce = np.asarray(ce)
    best = sd.optimum(cov, lent, model.fee, model.risk_aversion)
    x_star = model.fee / model.risk_aversion * np.linalg.solve(cov, lent)
    np.testing.assert_allclose(x[-1], x_star, rtol=1e-10)
    assert ce[-1] == pytest.approx(best["ce"], rel=1e-10)
    assert np.all(ce[:-1] < ce[-1])
    # population_checks (run every experiment) finds the same
    pop = sd.population_checks(s, m1, m2, rho)
    assert pop["rho_construction"] == pytest.approx(rho, abs=1e-12)
    assert int(np.argmax(pop["ce_grid_true_sigma"])) == s.gamma_grid - 1


def _tiled(cov: np.ndarray, reps: int = QUICK_REPS) -> np.ndarray:
    return np.broadcast_to(cov, (reps, *cov.shape)).copy()


@pytest.mark.parametrize("m1, m2", [(1, 1), (2, 2)])
def test_oracle_is_merged_as_n_grows(quick_settings, m1, m2):
    """The experiment's own pipeline with Σ̂ → Σ (the true Σ as the 'sample', n = 10¹²: OAS
    shrinkage ~1/n vanishes): the oracle γ is 1 for every ρ > 0, and γ* → 1."""
    _, s = quick_settings
    evaluate = sd.make_cell_evaluator(s.model, m1, m2)
    grid = np.linspace(0.0, 1.0, s.gamma_grid)
    for rho in (0.3, 0.9):
        cov = sd.true_covariance(m1, m2, rho, s.vol_pool1, s.vol_pool2, s.within_corr)
        fig = jax.device_get(evaluate(_tiled(cov), jnp.asarray(1e12), cov))
        best = sd.optimum(cov, np.full(m1 + m2, s.lent_fraction * s.delta), s.fee, s.risk_aversion)
        row, _ = sd.summarise_cell(fig, fig, "conditional", grid, best)
        assert row["gamma_oracle"] == 1.0
        assert row["ce_merged"] == pytest.approx(best["ce"], rel=1e-9)
        assert row["mean_gamma_star"] == pytest.approx(1.0, abs=1e-9)


def test_rules_agree_at_rho_zero_up_to_a_vanishing_estimation_cost(quick_settings):
    """ρ = 0, blocks 1+1. Σ known: every rule's hedge is the same (B = 0), so all agree
    exactly. Σ̂ from n returns (common random numbers across rules): each rule's paired CE
    difference to the isolated rule is within 3 SE of zero or below it (γ > 0 can only add
    noise), and it shrinks like 1/n: from n = 50 to n = 500 by a factor between 4 and 25."""
    _, s = quick_settings
    m1 = m2 = 1
    cov = sd.true_covariance(m1, m2, 0.0, s.vol_pool1, s.vol_pool2, s.within_corr)
    evaluate = sd.make_cell_evaluator(s.model, m1, m2)
    best = sd.optimum(cov, np.full(2, s.lent_fraction * s.delta), s.fee, s.risk_aversion)

    exact = jax.device_get(evaluate(_tiled(cov), jnp.asarray(1e12), cov))
    ce = exact["conditional_ce_grid"]
    np.testing.assert_allclose(ce, ce[:, :1] * np.ones_like(ce), rtol=1e-9)
    np.testing.assert_allclose(exact["conditional_ce_star"][:, 0], ce[:, 0], rtol=1e-9)

    diffs = {}
    # 10 × 200 replications (each batch its own keys); n = 50 uses the first 50 of the 500
    # returns, so the two n share common random numbers.
    xs = [sd.draws(1234, b, 0, QUICK_REPS, 500, 2) @ np.linalg.cholesky(cov).T for b in range(10)]
    for n in (50, 500):
        parts = [
            jax.device_get(evaluate(sd.sample_covariance(x[:, :n]), jnp.asarray(n), cov))
            for x in xs
        ]
        fig = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        vals = sd.rule_values(fig, "conditional", 0, "ce")
        diffs[n] = {}
        for rule in ("merged", "binary", "gamma_star", "gamma_star_nm1", "gamma_star_avg"):
            d = P.paired_difference(vals[rule], vals["isolated"])
            se = (d["ci95"][1] - d["mean"]) / 1.96
            assert d["mean"] <= 3 * se, (n, rule, d)  # never significantly better
            diffs[n][rule] = d["mean"] / best["ce"]
    for rule in ("merged", "gamma_star"):
        assert diffs[50][rule] < 0  # the cost of trusting a noisy B̂ …
        ratio = diffs[50][rule] / diffs[500][rule]
        assert 4.0 < ratio < 25.0, (rule, diffs)  # … vanishes like 1/n


# --------------------------------------------------------------------------- real data


def test_walk_forward_uses_no_future_returns(quick_settings):
    """The hedge formed at date t is unchanged when every return after t is perturbed, and
    changes from t + 1 on (the estimate is the last n returns up to and including t)."""
    _, s = quick_settings
    r = _synthetic_returns()
    n, first = 10, max(s.windows) - 1  # the quick run's evaluation dates: its compile is reused
    t_all, base = sd.walk_forward(r, n, first, s.model, 1)
    t0 = int(t_all[len(t_all) // 2])
    bumped = r.copy()
    bumped[t0 + 1 :] += np.random.default_rng(1).normal(0.0, 0.05, bumped[t0 + 1 :].shape)
    t_again, moved = sd.walk_forward(bumped, n, first, s.model, 1)
    np.testing.assert_array_equal(t_all, t_again)
    past = t_all <= t0
    for variant in base:
        for key in ("x_grid", "x_star", "gamma_star", "rho", "merge"):
            np.testing.assert_array_equal(base[variant][key][past], moved[variant][key][past])
        assert not np.allclose(
            base[variant]["x_grid"][~past][0], moved[variant]["x_grid"][~past][0]
        )


def test_lapack_batches_stay_below_the_split_threshold():
    """The chunking that avoids jaxlib's batched-LAPACK deadlock on a 2-thread pool."""
    for m1, m2 in [(1, 1), (2, 5), (4, 4), (7, 7)]:
        for g in (3, 11, 21):
            chunk = sd.lapack_safe_chunk(m1, m2, g)
            m, p = max(m1, m2), m1 + m2
            assert chunk >= 1
            assert chunk * 5 * m**3 < sd.LAPACK_SPLIT_FLOPS  # eigh of a block
            assert chunk * p**3 / 3 < sd.LAPACK_SPLIT_FLOPS  # Cholesky of Σ̂
            assert chunk * g * m**3 / 3 < sd.LAPACK_SPLIT_FLOPS  # damped blocks over γ
