"""P&L attribution (`pdlpjax.attribution`): the terms add up, and they mean what they say.

Per step, the LP terms are the LP wealth identity's terms (so `test_lp_identity` checks them
under every discount, swap arbitrage and the hedge, and `test_reference` checks each against
the NumPy reference). Here: the run totals add up in the results folder, the pool view's
trader term equals a cash-basis sum computed from the final book, and the record carries the
running terms.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jax
import jax.tree_util as jtu
import numpy as np
import pytest

import pdlpjax as P
from pdlpjax.attribution import LP_TERMS, POOL_TERMS

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.toml"
SMALL = [  # as tests/test_results.py, so the compiled programs are shared
    "simulation.num_pools=4",
    "simulation.num_steps=48",
    "simulation.chunk_length=24",
    "output.record_every=24",
]


def test_results_folder_attribution_adds_up(tmp_path):
    """summary.json, pools.csv and record.npz of a quickstart run (float32)."""
    cfg = P.load_config(QUICKSTART, SMALL)
    out = P.run_config(cfg, tmp_path / "run", quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    attr = summary["attribution"]
    assert not attr["hedged"]
    for view, terms in (("lp_return", LP_TERMS), ("pool_value", POOL_TERMS)):
        a = attr[view]
        assert list(a["terms"]) == list(terms)
        means = sum(a["terms"][t]["mean"] for t in terms)
        assert means == pytest.approx(a["total"]["mean"], abs=1e-6), view
        assert a["max_abs_residual"] < 1e-5, view
    lp = attr["lp_return"]
    assert lp["total"]["mean"] == pytest.approx(summary["metrics"]["total_return"]["mean"])
    assert lp["terms"]["fees"]["mean"] > 0 and lp["terms"]["inventory"]["sd"] > 0

    rows = list(csv.DictReader((out / "pools.csv").read_text().splitlines()))
    assert len(rows) == 4
    for r in rows:
        parts = sum(float(r[f"attr_{t}"]) for t in LP_TERMS)
        assert parts == pytest.approx(float(r["attr_total"]), abs=1e-5)

    with np.load(out / "record.npz") as f:
        rec = dict(f)
    for key in ("utilisation", "open_interest", "attribution", "attribution_terms"):
        assert key in rec, key
    assert rec["utilisation"].shape == (4, 2) and np.all(rec["utilisation"] > 0)
    assert np.all(rec["open_interest"] > 0)  # numéraire
    assert list(rec["attribution_terms"]) == list(LP_TERMS)
    last = rec["attribution"][:, -1, :]  # the running terms at the last step are the totals
    want = np.array([[float(r[f"attr_{t}"]) for t in LP_TERMS] for r in rows])
    np.testing.assert_allclose(last, want, rtol=1e-6, atol=1e-9)
    # The running total is the share price's path.
    p0 = rec["share_price"][:, :1] - rec["attribution"][:, :1, :].sum(-1)
    np.testing.assert_allclose(p0, 1.0, atol=1e-5)


def _final_state(*extra: str):
    with jax.enable_x64(True):
        cfg = P.load_config(
            QUICKSTART,
            [
                "simulation.num_pools=3",
                "simulation.num_steps=96",
                "simulation.chunk_length=0",
                "output.record_every=0",
                'simulation.dtype="float64"',
                "market.leverage=15.0",  # liquidations and bad debt within 96 steps
                *extra,
            ],
        )
        res = P.simulate(
            P.make_params(cfg), P.make_model(cfg), P.make_spec(cfg), seed=3, num_steps=96
        )
    return cfg, res.metrics, jtu.tree_map(np.asarray, res.state)


def test_pool_view_agrees_with_a_cash_basis_from_the_final_book():
    """Σ trader_pnl = exits' cash (received − paid) − the open book's unrealised PnL + the
    losses beyond margin (which the bad-debt term takes back), and the pool view's total is
    pᵀR − unrealised PnL at the end over the initial value: both computed here in NumPy from
    the final state, not from the step's running terms."""
    cfg, m, st = _final_state()
    v0 = cfg.pool.initial_value
    sign = np.array([1.0, -1.0])[None, :, None]
    prices = st.pool.prices
    r = prices.shape[1] - 1
    u_end = np.sum(
        np.where(
            st.book.is_open,
            sign * (st.book.size * prices[:, :r, None, None] - st.book.notional),
            0,
        ),
        axis=(1, 2, 3),
    )
    acc = st.accounts
    assert np.all(acc.liquidations > 0) and np.any(acc.bad_debt > 0), "a weak scenario"
    cash = acc.exit_received - acc.exit_paid - u_end + acc.bad_debt
    np.testing.assert_allclose(m["pool_trader_pnl"] * v0, cash, rtol=1e-9, atol=1e-6)
    final = np.sum(prices * st.pool.reserves, axis=1) - u_end
    np.testing.assert_allclose(m["pool_total"], final / v0 - 1.0, rtol=1e-9, atol=1e-12)
    parts = sum(m[f"pool_{t}"] for t in POOL_TERMS)
    np.testing.assert_allclose(parts, m["pool_total"], atol=1e-11)
    # LP view: the total is the share price's return, and the terms add up to it.
    np.testing.assert_allclose(m["attr_total"], m["total_return"], rtol=1e-12)
    np.testing.assert_allclose(sum(m[f"attr_{t}"] for t in LP_TERMS), m["attr_total"], atol=1e-11)
    assert np.all(m["attr_liquidated_margin"] > 0) and np.all(m["attr_bad_debt"] <= 0)


def test_passive_pool_has_only_inventory():
    _, m, _ = _final_state('pool.mode="passive"', "pool.rebalance=true")
    np.testing.assert_allclose(m["attr_inventory"], m["attr_total"], rtol=1e-12)
    for t in LP_TERMS[1:]:
        assert np.all(m[f"attr_{t}"] == 0), t
