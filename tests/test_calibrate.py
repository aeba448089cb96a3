"""`pdlpjax calibrate`: transforms, pathwise gradients against finite differences, the optax
loop on a known optimum, the results folder, vmapped problems against one-by-one runs, NaN
gradients and config errors.

Gradients are checked in float64 with common random numbers: the finite difference reruns the
same pools on the same draws at θ ± h, so it differentiates the same sample objective.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tomli_w

from pdlpjax import calibrate as C
from pdlpjax.build import make_block, make_model, make_params, make_spec
from pdlpjax.cli import main
from pdlpjax.config import ConfigError, FreeParam, config_from_dict
from pdlpjax.metrics import ReturnStats, num_worst_for
from pdlpjax.simulate import pool_keys

RTOL_GRAD = 0.02  # relative error allowed between the pathwise gradient and the FD


@pytest.fixture
def x64_restored():
    """`calibrate_config` switches float64 on globally for a float64 config: undo it after."""
    before = jax.config.jax_enable_x64
    yield
    jax.config.update("jax_enable_x64", before)


# --------------------------------------------------------------------------- 1. transforms

SIGMOID_BOUNDS = [(0.0, 1.0), (0.2, 0.7), (-3.0, 5.0), (1e-6, 2e-6)]


@pytest.mark.parametrize("lo, hi", SIGMOID_BOUNDS)
def test_sigmoid_from_value_inverts_to_value(lo, hi):
    p = FreeParam("sigmoid", 0.5 * (lo + hi), lo, hi)
    u = np.array([1e-12, 1e-9, 1e-6, 1e-3, 0.1, 0.5, 0.9, 1 - 1e-3, 1 - 1e-6, 1 - 1e-9])
    values = lo + (hi - lo) * u
    with jax.enable_x64(True):
        theta = np.array([C.from_value(v, p) for v in values])
        back = np.asarray(C.to_value(jnp.asarray(theta), p))
        assert np.all(np.isfinite(theta))
        np.testing.assert_allclose(back, values, rtol=1e-12, atol=1e-14 * (hi - lo))
        # and θ → value → θ, where the value still resolves θ (|θ| ≤ 10: 1 − u ≥ 4.5e-5)
        grid = np.linspace(-10.0, 10.0, 41)
        again = [C.from_value(float(v), p) for v in C.to_value(jnp.asarray(grid), p)]
        np.testing.assert_allclose(again, grid, atol=1e-8)


@pytest.mark.parametrize("lo, hi", SIGMOID_BOUNDS)
def test_sigmoid_values_stay_strictly_inside_bounds_float64(lo, hi):
    p = FreeParam("sigmoid", 0.5 * (lo + hi), lo, hi)
    with jax.enable_x64(True):
        theta = jnp.linspace(-30.0, 30.0, 601)
        v = np.asarray(C.to_value(theta, p))
        g = np.asarray(jax.vmap(jax.grad(lambda t: C.to_value(t, p)))(theta))
    assert v.dtype == np.float64
    assert np.all(v > lo) and np.all(v < hi)
    assert np.all(np.diff(v) >= 0)  # monotone
    assert np.all(np.isfinite(g)) and np.all(g > 0)


def test_sigmoid_values_stay_within_bounds_float32():
    """In float32 (the default dtype) sigmoid(θ) rounds to 1 for θ ≥ 16.75, so the value may
    land on a bound (documented in `to_value`), never beyond it."""
    p = FreeParam("sigmoid", 0.5, 0.0, 1.0)
    with jax.enable_x64(False):
        v = np.asarray(C.to_value(jnp.linspace(-30.0, 30.0, 61, dtype=jnp.float32), p))
    assert v.dtype == np.float32
    assert np.all(v >= 0.0) and np.all(v <= 1.0)
    assert np.all((v > 0.0) & (v < 1.0))[()] is np.False_  # it does reach hi: documented


@pytest.mark.parametrize("lo", [0.0, 0.5, -2.0, 1e-3])
def test_softplus_from_value_inverts_to_value(lo):
    p = FreeParam("softplus", lo + 1.0, lo)
    x = np.array([1e-10, 1e-6, 1e-3, 0.1, 1.0, 10.0, 30.0, 40.0, 700.0, 800.0, 1e5, 1e8, 1e12])
    values = lo + x
    with jax.enable_x64(True):
        theta = np.array([C.from_value(v, p) for v in values])
        back = np.asarray(C.to_value(jnp.asarray(theta), p))
    assert np.all(np.isfinite(theta))
    # large values: θ ≈ value − lo (softplus is the identity there; no exp overflow at 800)
    np.testing.assert_allclose(theta[x >= 40.0], x[x >= 40.0], rtol=1e-15)
    assert np.all(back > lo)
    # the value's x = value − lo is what the transform carries: relative error in x
    np.testing.assert_allclose(back - lo, values - lo, rtol=1e-9, atol=4e-16 * max(abs(lo), 1))
    np.testing.assert_allclose(back, values, rtol=1e-12)


def test_identity_transform_and_vectorised_to_value():
    p = FreeParam("identity", 0.3)
    values = [-1e6, -2.5, 0.0, 1e-300, 3.25, 1e300]
    assert [C.from_value(v, p) for v in values] == values
    with jax.enable_x64(True):
        np.testing.assert_array_equal(C.to_value(jnp.asarray(values), p), values)
        # batched θ (problems × params in calibrate) maps elementwise
        q = FreeParam("softplus", 1.0, 0.25)
        th = jnp.asarray([[C.from_value(0.5, q)], [C.from_value(4.0, q)]])
        np.testing.assert_allclose(C.to_value(th, q), [[0.5], [4.0]], rtol=1e-12)


# --------------------------------------------------------------------------- 2. gradients vs FD

NUM_POOLS, NUM_STEPS = 8, 120
OBJECTIVES = ("certainty_equivalent", "sharpe")

SINGLE = {
    "name": "cal_grad",
    "market": {
        "assets": ["BTC"],
        "initial_prices": [60000.0],
        "cohorts": 4,
        "open_rate": [0.002],
        "max_leverage": 20.0,
    },
    "paths": {"vols": [0.8], "correlation": [[1.0]]},
    "pool": {"target_weights": [0.5, 0.5], "fee": 5.0e-5},
    "hedge": {"enabled": True, "every": 6, "covariance": "window", "window": 24},
    "simulation": {
        "num_pools": NUM_POOLS,
        "num_steps": NUM_STEPS,
        "progress": False,
        "dtype": "float64",
    },
    "output": {"plots": False},
    "calibrate": {
        "params": {
            "hedge.risk_aversion": {"transform": "softplus", "init": 1.0},
            "pool.fee": {"transform": "sigmoid", "init": 5.0e-5, "lo": 0.0, "hi": 0.01},
        }
    },
}

BLOCKS = {
    "name": "cal_grad_blocks",
    "market": {"assets": ["BTC", "ETH"], "initial_prices": [60000.0, 3000.0], "cohorts": 4},
    "paths": {"vols": [0.6, 0.8], "correlation": [[1.0, 0.8], [0.8, 1.0]]},
    "pools": [{"assets": ["BTC"]}, {"assets": ["ETH"]}],
    "hedge": {
        "enabled": True,
        "every": 6,
        "covariance": "window",
        "window": 24,
        "damping_rule": "fixed",
    },
    "simulation": {
        "num_pools": NUM_POOLS,
        "num_steps": NUM_STEPS,
        "progress": False,
        "dtype": "float64",
    },
    "output": {"plots": False},
    "calibrate": {"params": {"hedge.damping": {"transform": "sigmoid", "init": 0.4}}},
}


def _objective_grad_fn(cfg, blocks):
    """jit(θ, w) -> ((w · objectives, objectives), ∂/∂θ): the calibrate loss's pieces
    (`_inject`, `_pool_stats`, `objective_value`), averaged over the blocks and pools. One
    compile serves both objectives (w picks one) and the finite differences (the aux)."""
    free = dict(cfg.calibrate.params)
    model = make_model(cfg)
    keys, flips = pool_keys(cfg.simulation.seed, NUM_POOLS)
    problem = np.zeros(NUM_POOLS, int)
    spy = float(cfg.simulation.steps_per_year)

    def objectives(theta):
        total = 0.0
        for params, spec in blocks:
            p = C._inject(params, free, theta, problem)
            stats = C._pool_stats(p, model, spec, keys, flips, NUM_STEPS, "hedged_lp")
            total = total + jnp.stack([C.objective_value(stats, k, spy) for k in OBJECTIVES])
        return jnp.mean(total / len(blocks), axis=1)

    def loss(theta, w):
        obj = objectives(theta)
        return jnp.dot(w, obj), obj

    return jax.jit(jax.value_and_grad(loss, has_aux=True)), free


def _measure(vg, theta0, j, steps):
    """Pathwise gradient and central FDs (each step h in θ) of every objective w.r.t. θ_j."""
    out = {"grad": [], "fd": {}}
    for i in range(len(OBJECTIVES)):
        w = jnp.zeros(len(OBJECTIVES)).at[i].set(1.0)
        (_, obj), g = vg(theta0, w)
        assert np.all(np.isfinite(np.asarray(obj)))
        out["grad"].append(float(g[0, j]))
    w = jnp.ones(len(OBJECTIVES))
    for h in steps:
        e = jnp.zeros_like(theta0).at[0, j].set(h)
        (_, up), _ = vg(theta0 + e, w)
        (_, down), _ = vg(theta0 - e, w)
        out["fd"][h] = list(np.asarray((up - down) / (2 * h)))
    return out


FEE = 5.0e-5
# pool.fee is fitted as lo + (hi − lo)·sigmoid(θ) on (0, 0.01): steps of a given fraction of
# the fee are these steps in θ (dfee/dθ = (hi − lo)·u(1 − u), u = fee/(hi − lo)).
DFEE_DTHETA = 0.01 * (FEE / 0.01) * (1.0 - FEE / 0.01)
FEE_STEPS = {
    name: h / DFEE_DTHETA
    for name, h in {"local": 1e-9, "1%": 0.01 * FEE, "5%": 0.05 * FEE, "20%": 0.2 * FEE}.items()
}


@pytest.fixture(scope="module")
def single_pool_gradients():
    """hedge.risk_aversion (softplus) and pool.fee (sigmoid on (0, 0.01), exact mode) of one
    hedged pool."""
    with jax.enable_x64(True):
        cfg = config_from_dict(SINGLE)
        vg, free = _objective_grad_fn(cfg, [(make_params(cfg), make_spec(cfg))])
        theta0 = jnp.asarray([[C.from_value(p.init, p) for p in free.values()]])
        return {
            "hedge.risk_aversion": _measure(vg, theta0, 0, [1e-3]),
            "pool.fee": _measure(vg, theta0, 1, list(FEE_STEPS.values())),
        }


@pytest.fixture(scope="module")
def block_gradients():
    """hedge.damping (sigmoid, damping_rule fixed) of two [[pools]] blocks on one market."""
    with jax.enable_x64(True):
        cfg = config_from_dict(BLOCKS)
        blocks = [make_block(cfg, b) for b in range(len(cfg.pools))]
        vg, free = _objective_grad_fn(cfg, blocks)
        theta0 = jnp.asarray([[C.from_value(p.init, p) for p in free.values()]])
        return {"hedge.damping": _measure(vg, theta0, 0, [1e-3])}


def _rel(g, fd):
    return abs(g - fd) / abs(fd)


# Measured (8 pools, 120 hourly steps, float64, seed 0), pathwise vs FD (h = 1e-3 in θ):
#   hedge.risk_aversion, certainty equivalent: 0.0380305 vs 0.0380305, rel. error 1.7e-7
#   hedge.risk_aversion, Sharpe:               0.327880  vs 0.327880,  rel. error 2.2e-8
# The hedge does not change the pool's path, so these are smooth and the agreement is to FD
# truncation error; 2% is the stated bound.
@pytest.mark.slow  # ~15-25 s: compiles the gradient of a 120-step hedged scan
@pytest.mark.parametrize("k", range(len(OBJECTIVES)), ids=OBJECTIVES)
def test_risk_aversion_gradient_matches_fd(single_pool_gradients, k):
    m = single_pool_gradients["hedge.risk_aversion"]
    g, fd = m["grad"][k], m["fd"][1e-3][k]
    assert np.isfinite(g) and abs(g) > 0
    assert _rel(g, fd) < RTOL_GRAD, (g, fd)


# Measured: hedge.damping (sigmoid, init 0.4, two 1-asset blocks, correlation 0.8), pathwise
# vs FD (h = 1e-3 in θ): certainty equivalent -0.00270692 vs -0.00270692, rel. error 8e-8;
# Sharpe -0.197624 vs -0.197624, rel. error 9e-8. The bound is 2%.
@pytest.mark.slow  # ~15-25 s: compiles the gradient of two block scans
@pytest.mark.parametrize("k", range(len(OBJECTIVES)), ids=OBJECTIVES)
def test_block_damping_gradient_matches_fd(block_gradients, k):
    m = block_gradients["hedge.damping"]
    g, fd = m["grad"][k], m["fd"][1e-3][k]
    assert np.isfinite(g) and abs(g) > 0
    assert _rel(g, fd) < RTOL_GRAD, (g, fd)


# pool.fee moves trade acceptance, liquidations and the funding arbitrageur. Since the
# crowd-bucket book (2026-12) each of these is continuous in the fee (partial liquidations
# of a crowd's spread of liquidation prices, capacity that is shared, the arbitrageur's
# profit-maximising size), so the pathwise gradient of the reported (exact) model is the
# derivative that finite differences across a few percent of the fee see.
# Measured (8 pools, 120 hourly steps, float64, seed 0), pathwise vs FD: see the asserts.
# Before (the book of discrete events): certainty equivalent +0.00928 vs −1.374 / −0.596 at
# h = 1% / 5% (opposite sign), Sharpe +0.654 vs −32.8 / −9.22.
@pytest.mark.slow
@pytest.mark.parametrize("k", range(len(OBJECTIVES)), ids=OBJECTIVES)
def test_fee_pathwise_gradient_matches_fd(single_pool_gradients, k):
    m = single_pool_gradients["pool.fee"]
    g = m["grad"][k]
    assert np.isfinite(g)
    for name in ("local", "1%", "5%"):
        fd = m["fd"][FEE_STEPS[name]][k]
        assert _rel(g, fd) < RTOL_GRAD, (name, g, fd)


def test_fee_gradient_is_finite_where_the_value_is():
    from pdlpjax.simulate import _draw, init_state, step

    raw = json.loads(json.dumps(SINGLE))
    raw["hedge"] = {"enabled": False}
    raw["simulation"]["num_pools"] = 1
    with jax.enable_x64(True):
        cfg = config_from_dict(raw)
        params, model, spec = make_params(cfg), make_model(cfg), make_spec(cfg)
        one = jax.tree_util.tree_map(lambda a: a[0], params)
        keys, flips = pool_keys(0, 1)

        def share_price(fee):
            p = eqx.tree_at(lambda q: q.pool.fee, one, fee)
            s = init_state(p, model, spec)
            s = step(s, p, model, spec, _draw(model, spec, keys[0], flips[0], s.t))
            return s.stats.value

        fee = jnp.asarray(0.05005)
        value, grad = jax.jit(jax.value_and_grad(share_price))(fee)
    assert np.isfinite(float(value))
    assert np.isfinite(float(grad)), float(grad)


# --------------------------------------------------------------------------- 3. known optimum

LAMBDA = 2.0
SIGMA = np.array([[0.04, 0.01, 0.0], [0.01, 0.09, 0.02], [0.0, 0.02, 0.16]])
W_STAR = np.array([0.5, 0.3, 0.2])
MU = LAMBDA * SIGMA @ W_STAR  # so that w* = Σ⁻¹μ/λ = W_STAR


def _quadratic_fit(p: FreeParam, mu, steps: int, lr: float):
    """Maximise μᵀw − (λ/2) wᵀΣw, w = to_value(θ, p), with `fit` and adam; every iterate's w."""
    sigma, mu = jnp.asarray(SIGMA), jnp.asarray(mu)

    def loss(theta):
        w = C.to_value(theta, p)
        return -(mu @ w - 0.5 * LAMBDA * w @ sigma @ w)

    vg = jax.jit(jax.value_and_grad(loss))
    seen = []
    theta0 = jnp.full(3, C.from_value(p.init, p))
    theta = C.fit(
        lambda th, s: vg(th),
        theta0,
        C.make_optimizer("adam", lr),
        steps,
        lambda s, th, loss_value, g: seen.append(np.asarray(C.to_value(th, p))),
    )
    return np.asarray(C.to_value(theta, p)), np.array(seen)


@pytest.mark.parametrize(
    "p",
    [FreeParam("identity", 0.0), FreeParam("softplus", 1.0, 0.0)],
    ids=["identity", "softplus"],
)
def test_fit_recovers_mean_variance_optimum(p):
    with jax.enable_x64(True):
        w, seen = _quadratic_fit(p, MU, steps=1500, lr=0.05)
    np.testing.assert_allclose(np.linalg.solve(SIGMA, MU) / LAMBDA, W_STAR, rtol=1e-12)
    assert len(seen) == 1500
    # measured: |w − w*| ≤ 3e-16 for both transforms (adam, lr 0.05, 1500 steps)
    np.testing.assert_allclose(w, W_STAR, atol=1e-6)
    if p.transform == "softplus":
        assert np.all(seen > p.lo)


def _box_optimum(lo, hi, mu, iters=20000):
    """The constrained maximiser over the box [lo, hi]³, by projected gradient (NumPy)."""
    w = np.full(3, 0.5 * (lo + hi))
    step = 1.0 / (LAMBDA * np.linalg.eigvalsh(SIGMA).max())
    for _ in range(iters):
        w = np.clip(w + step * (mu - LAMBDA * SIGMA @ w), lo, hi)
    return w


@pytest.mark.parametrize(
    "p, mu",
    [
        # w*₀ = 0.5 lies above hi = 0.4: the optimum is on the bound
        (FreeParam("sigmoid", 0.2, 0.0, 0.4), MU),
        # w*₂ < 0 below lo = 0: softplus can only approach it
        (FreeParam("softplus", 0.3, 0.0), LAMBDA * SIGMA @ np.array([0.5, 0.3, -0.2])),
    ],
    ids=["sigmoid-upper", "softplus-lower"],
)
def test_fit_with_optimum_on_a_bound_stays_inside(p, mu):
    hi = p.hi if p.transform == "sigmoid" else np.inf
    with jax.enable_x64(True):
        w, seen = _quadratic_fit(p, mu, steps=1500, lr=0.05)
    target = _box_optimum(p.lo, min(hi, 10.0), mu)
    assert np.all(seen > p.lo) and np.all(seen < hi)  # every iterate strictly inside
    assert np.all(w > p.lo) and np.all(w < hi)
    # the bound is approached, never reached: measured |w − w_box*| = 5.4e-4 (sigmoid, w₀ →
    # hi = 0.4) and 7.9e-4 (softplus, w₂ → lo = 0)
    np.testing.assert_allclose(w, target, atol=2e-3)


# --------------------------------------------------------------------------- 4-5. end to end

FEES = [2.0e-5, 1.0e-4]
TINY = {
    "name": "cal_tiny",
    "market": {
        "assets": ["BTC"],
        "initial_prices": [60000.0],
        "cohorts": 4,
        "open_rate": [0.002],
        "max_leverage": 20.0,
    },
    "paths": {"vols": [0.8], "correlation": [[1.0]]},
    "pool": {"target_weights": [0.5, 0.5], "fee": {"grid": FEES}},
    "hedge": {"enabled": True, "every": 6, "covariance": "window", "window": 24},
    "simulation": {"num_pools": 2, "num_steps": 48, "progress": False, "dtype": "float64"},
    "output": {"plots": True},
    "calibrate": {
        "params": {"hedge.risk_aversion": {"transform": "softplus", "init": 0.05, "lo": 0.01}},
        "objective": "certainty_equivalent",
        "learning_rate": 0.5,
        "steps": 4,
        "batch_pools": 4,
        "validation_pools": 6,
        "validate_every": 2,
    },
}


def _tiny(fee: float | None = None):
    """The 2-problem config (a grid of fees), or with `fee` a single problem without plots."""
    raw = json.loads(json.dumps(TINY))
    if fee is not None:
        raw["pool"]["fee"] = fee
        raw["output"]["plots"] = False
    return config_from_dict(raw)


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_problem_run(tmp_path_factory):
    before = jax.config.jax_enable_x64
    try:
        out = C.calibrate_config(_tiny(), tmp_path_factory.mktemp("cal") / "both", quiet=True)
    finally:
        jax.config.update("jax_enable_x64", before)
    return out


@pytest.mark.slow  # ~20 s: compiles the training gradient and the validation run
def test_calibrate_config_writes_results(two_problem_run):
    out = two_problem_run
    for name in ("calibration.csv", "summary.json", "calibration.png", "config.toml"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cal = TINY["calibrate"]
    p = FreeParam("softplus", 0.05, 0.01)
    rows = _csv(out / "calibration.csv")
    assert list(rows[0]) == [
        "step",
        "problem",
        "loss",
        "hedge.risk_aversion",
        "grad_norm",
        "validation",
    ]
    assert len(rows) == 2 * (cal["steps"] + 1)
    for r in rows:  # every value, every step and the fitted one, inside the transform's range
        v = float(r["hedge.risk_aversion"])
        assert np.isfinite(v) and v > p.lo, r
        step = int(r["step"])
        has_val = step % cal["validate_every"] == 0 or step == cal["steps"]
        assert (r["validation"] != "") == has_val, r
        if step < cal["steps"]:
            assert np.isfinite(float(r["loss"])) and float(r["grad_norm"]) > 0, r
    assert sorted({(int(r["step"]), int(r["problem"])) for r in rows}) == [
        (s, i) for s in range(cal["steps"] + 1) for i in range(2)
    ]
    start = [float(r["hedge.risk_aversion"]) for r in rows if r["step"] == "0"]
    np.testing.assert_allclose(start, 0.05, rtol=1e-7)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "certainty_equivalent" and summary["target"] == "hedged_lp"
    assert len(summary["problems"]) == len(FEES)  # one problem per grid combination
    assert [pr["grid"] for pr in summary["problems"]] == [{"pool.fee": f} for f in FEES]
    for i, pr in enumerate(summary["problems"]):
        assert pr["initial"] == {"hedge.risk_aversion": 0.05}
        fitted = pr["fitted"]["hedge.risk_aversion"]
        assert fitted > p.lo
        last = [r for r in rows if r["step"] == str(cal["steps"]) and r["problem"] == str(i)]
        np.testing.assert_allclose(float(last[0]["hedge.risk_aversion"]), fitted, rtol=1e-7)
        for key in ("validation", "validation_initial"):
            v = pr[key]
            lo, hi = v["ci95"]
            assert np.isfinite(v["mean"]) and lo <= v["mean"] <= hi and lo < hi
            assert v["n"] == cal["validation_pools"]
        np.testing.assert_allclose(float(last[0]["validation"]), pr["validation"]["mean"], 1e-7)


@pytest.mark.slow  # ~40 s: two more calibrations, each compiled for its own shapes
def test_vmapped_problems_equal_one_by_one(two_problem_run, tmp_path):
    """Each grid problem's trajectory equals its calibration alone (same training and
    validation draws by construction). Tolerances: calibration.csv holds 8 significant
    digits, compared at rtol 1e-7; summary.json's full-precision floats at rtol 1e-10."""
    both = _csv(two_problem_run / "calibration.csv")
    summary = json.loads((two_problem_run / "summary.json").read_text())
    cols = ("loss", "hedge.risk_aversion", "grad_norm", "validation")
    before = jax.config.jax_enable_x64
    try:
        for i, fee in enumerate(FEES):
            out = C.calibrate_config(_tiny(fee), tmp_path / f"alone{i}", quiet=True)
            alone = _csv(out / "calibration.csv")
            mine = [r for r in both if r["problem"] == str(i)]
            assert [r["step"] for r in alone] == [r["step"] for r in mine]
            for a, b in zip(alone, mine, strict=True):
                for c in cols:
                    if a[c] == "" or b[c] == "":
                        assert a[c] == b[c], (c, a, b)
                    else:
                        np.testing.assert_allclose(float(a[c]), float(b[c]), rtol=1e-7)
            one = json.loads((out / "summary.json").read_text())["problems"]
            assert len(one) == 1
            ref = summary["problems"][i]
            np.testing.assert_allclose(
                one[0]["fitted"]["hedge.risk_aversion"],
                ref["fitted"]["hedge.risk_aversion"],
                rtol=1e-10,
            )
            for key in ("validation", "validation_initial"):
                np.testing.assert_allclose(one[0][key]["mean"], ref[key]["mean"], rtol=1e-10)
                np.testing.assert_allclose(one[0][key]["ci95"], ref[key]["ci95"], rtol=1e-10)
    finally:
        jax.config.update("jax_enable_x64", before)


# --------------------------------------------------------------------------- cheap stand-in


def _fake_pool_stats(objective_of):
    """A stand-in for `_pool_stats` (no simulation, compiles in a blink): every pool's per-step
    mean return is `objective_of(params)`, with zero variance, so that the CE and Sharpe
    objectives see exactly it (× steps per year)."""

    def fake(params, model, spec, keys, flips, num_steps, target):
        mean = objective_of(params)
        n = mean.shape[0]
        zero = jnp.zeros_like(mean)
        one = jnp.ones_like(mean)
        return ReturnStats(
            count=jnp.full_like(mean, num_steps),
            mean=mean,
            m2=zero,
            initial_value=one,
            value=one,
            peak=one,
            max_drawdown=zero,
            worst_losses=jnp.zeros((n, num_worst_for(num_steps)), mean.dtype),
        )

    return fake


# --------------------------------------------------------------------------- 6. NaN gradients


def _nan_config(tmp_path: Path) -> Path:
    raw = json.loads(json.dumps(TINY))
    raw["pool"]["fee"] = 5.0e-5
    raw["output"]["plots"] = False
    raw["calibrate"] = {
        "params": {"hedge.risk_aversion": {"transform": "softplus", "init": 2.0}},
        "objective": "certainty_equivalent",
        "optimizer": "sgd",
        "learning_rate": 1.0e-4,
        "steps": 10,
        "batch_pools": 2,
        "validation_pools": 2,
    }
    path = tmp_path / "nan.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


# objective −√(γ_r − 1) per step: sgd on softplus θ walks γ_r from 2 below 1 at step 3,
# where the root is NaN.
_NAN_AT_STEP_2 = _fake_pool_stats(lambda p: -jnp.sqrt(p.hedge.risk_aversion - 1.0))


def test_nan_gradient_names_param_and_step(tmp_path, monkeypatch, x64_restored):
    from pdlpjax.config import load_config

    monkeypatch.setattr(C, "_pool_stats", _NAN_AT_STEP_2)
    cfg = load_config(_nan_config(tmp_path))
    with pytest.raises(C.CalibrationError) as err:
        C.calibrate_config(cfg, tmp_path / "out", quiet=True)
    msg = str(err.value)
    assert "hedge.risk_aversion" in msg and "step 3" in msg and "\n" not in msg, msg
    assert "not finite" in msg


def test_nan_gradient_cli_exits_3_with_one_line(tmp_path, monkeypatch, capsys, x64_restored):
    monkeypatch.setattr(C, "_pool_stats", _NAN_AT_STEP_2)
    rc = main(["calibrate", str(_nan_config(tmp_path)), "--out", str(tmp_path / "o"), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 3
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: calibrate:"), captured.err
    assert "hedge.risk_aversion" in lines[0] and "step 3" in lines[0]
    assert captured.out == ""


# --------------------------------------------------------------------------- problems coupled?


def test_clip_norm_keeps_problems_independent(tmp_path, monkeypatch, x64_restored):
    # per-step objective −fee·(γ_r − 2)²: the problem with the larger fee has the steeper loss
    fake = _fake_pool_stats(lambda p: -p.pool.fee * (p.hedge.risk_aversion - 2.0) ** 2)
    monkeypatch.setattr(C, "_pool_stats", fake)
    raw = json.loads(json.dumps(TINY))
    raw["output"]["plots"] = False
    raw["calibrate"] = {
        "params": {"hedge.risk_aversion": {"transform": "softplus", "init": 1.0}},
        "objective": "certainty_equivalent",
        "optimizer": "sgd",
        "learning_rate": 0.1,
        "clip_norm": 1.0,
        "steps": 3,
        "batch_pools": 2,
        "validation_pools": 2,
    }
    both = C.calibrate_config(config_from_dict(raw), tmp_path / "both", quiet=True)
    fitted_both = json.loads((both / "summary.json").read_text())["problems"]
    raw["pool"]["fee"] = FEES[0]
    alone = C.calibrate_config(config_from_dict(raw), tmp_path / "alone", quiet=True)
    fitted_alone = json.loads((alone / "summary.json").read_text())["problems"]
    np.testing.assert_allclose(
        fitted_both[0]["fitted"]["hedge.risk_aversion"],
        fitted_alone[0]["fitted"]["hedge.risk_aversion"],
        rtol=1e-10,
    )


# --------------------------------------------------------------------------- 7. config errors


def _raw_with(params=None, **calibrate):
    raw = json.loads(json.dumps(TINY))
    raw["pool"]["fee"] = 5.0e-5
    if params is not None:
        raw["calibrate"]["params"] = params
    raw["calibrate"].update(calibrate)
    return raw


@pytest.mark.parametrize(
    "params, expect",
    [
        (
            {"hedge.nope": {"init": 1.0}},
            "calibrate.params.hedge.nope: expected the name of a dynamic scalar field",
        ),
        (
            {"risk_aversion": {"init": 1.0}},
            "calibrate.params.risk_aversion: expected the name of a dynamic scalar field",
        ),
        (
            {"paths.vols": {"init": 0.5}},
            "calibrate.params.paths.vols: expected the name of a dynamic scalar field",
        ),
        (
            {"hedge.penalty": {"init": 0.1}},  # rank 1 (per asset): not calibratable
            "calibrate.params.hedge.penalty: expected the name of a dynamic scalar field",
        ),
        (
            {"hedge.every": {"init": 6}},  # static
            "calibrate.params.hedge.every: expected the name of a dynamic scalar field",
        ),
        (
            {"hedge.damping": {"transform": "sigmoid", "init": 1.5}},
            "calibrate.params.hedge.damping.init: expected lo < init < hi = (0, 1)",
        ),
        (
            {"hedge.damping": {"transform": "sigmoid", "init": 0.0}},
            "calibrate.params.hedge.damping.init: expected lo < init < hi",
        ),
        (
            {"hedge.risk_aversion": {"transform": "softplus", "init": 0.5, "lo": 0.5}},
            "calibrate.params.hedge.risk_aversion.init: expected init > lo = 0.5",
        ),
        (
            {"hedge.risk_aversion": {"transform": "softplus"}},
            "calibrate.params.hedge.risk_aversion.init: expected the initial value",
        ),
        (
            {"hedge.risk_aversion": {"transform": "exp", "init": 1.0}},
            "calibrate.params.hedge.risk_aversion.transform: expected one of sigmoid, "
            "softplus, identity",
        ),
        (
            {"hedge.risk_aversion": {"init": 1.0, "step": 0.1}},
            "calibrate.params.hedge.risk_aversion: expected { transform, init, lo, hi }",
        ),
        (
            {"hedge.risk_aversion": {"init": "1.0"}},
            "calibrate.params.hedge.risk_aversion.init: expected a finite number",
        ),
        (
            {"hedge.risk_aversion": {"init": float("nan")}},
            "calibrate.params.hedge.risk_aversion.init: expected a finite number",
        ),
        (
            {"hedge.damping": {"init": 2.0}},  # identity: init outside the field's range
            "calibrate.params.hedge.damping.init",
        ),
        ({}, "calibrate.params: expected a table"),
        ({"hedge.risk_aversion": 1.0}, "calibrate.params.hedge.risk_aversion: expected {"),
    ],
)
def test_bad_free_params_are_one_line_errors(params, expect):
    with pytest.raises(ConfigError) as err:
        config_from_dict(_raw_with(params))
    msg = str(err.value)
    assert expect in msg and "\n" not in msg, msg


def test_unknown_calibrate_key_is_one_line_error():
    with pytest.raises(ConfigError) as err:
        config_from_dict(_raw_with(lr=0.1))
    msg = str(err.value)
    assert msg.startswith("calibrate.lr: unknown key") and "\n" not in msg, msg


@pytest.mark.parametrize(
    "key, value, expect",
    [
        ("objective", "sortino", "calibrate.objective"),
        ("target", "pool", "calibrate.target"),
        ("optimizer", "lbfgs", "calibrate.optimizer"),
        ("learning_rate", 0.0, "calibrate.learning_rate"),
        ("steps", 0, "calibrate.steps"),
        ("validation_pools", 1, "calibrate.validation_pools"),
    ],
)
def test_bad_calibrate_settings_are_one_line_errors(key, value, expect):
    with pytest.raises(ConfigError) as err:
        config_from_dict(_raw_with(**{key: value}))
    msg = str(err.value)
    assert msg.startswith(expect) and "\n" not in msg, msg


def _fails_before_writing(cfg, tmp_path, expect):
    out = tmp_path / "never"
    with pytest.raises(ConfigError) as err:
        C.calibrate_config(cfg, out, quiet=True)
    msg = str(err.value)
    assert expect in msg and "\n" not in msg, msg
    assert not out.exists()  # refused before the results folder (and any compile)


def test_hedged_target_without_hedge_errors(tmp_path, x64_restored):
    raw = _raw_with()
    raw["hedge"]["enabled"] = False
    _fails_before_writing(
        config_from_dict(raw), tmp_path, 'calibrate.target: "hedged_lp" needs hedge.enabled'
    )


def test_free_key_that_is_a_grid_axis_errors(tmp_path, x64_restored):
    raw = _raw_with()
    raw["hedge"]["risk_aversion"] = {"grid": [0.5, 2.0]}
    _fails_before_writing(
        config_from_dict(raw),
        tmp_path,
        "calibrate.params.hedge.risk_aversion: is also a grid axis of the config",
    )


def test_no_free_params_errors(tmp_path, x64_restored):
    raw = _raw_with()
    del raw["calibrate"]["params"]
    _fails_before_writing(config_from_dict(raw), tmp_path, "calibrate.params: name at least one")


def test_config_error_cli_exits_2(tmp_path, capsys):
    raw = _raw_with({"paths.vols": {"init": 0.5}})
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(raw))
    rc = main(["calibrate", str(path), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: calibrate.params.paths")


@pytest.mark.parametrize(
    "param",
    [
        {"hedge.damping": {"transform": "sigmoid", "init": 0.5, "lo": 0.0, "hi": 5.0}},
        {"hedge.risk_aversion": {"transform": "softplus", "init": 1.0, "lo": -1.0}},
    ],
    ids=["sigmoid-hi-above-range", "softplus-lo-below-range"],
)
def test_transform_range_outside_field_range_errors(param):
    with pytest.raises(ConfigError):
        config_from_dict(_raw_with(param))


@pytest.mark.parametrize("long_size,short_size,gamma", [(0.0, 0.0, 0.0), (10.0, 30.0, -1e-4)])
def test_funding_arbitrage_gradient_is_finite_in_float32(long_size, short_size, gamma):
    """The arbitrageur's profit-maximising size √(|γ|SL/f) − L: its fee gradient is finite in
    float32 on an empty book (the √ is taken only where its argument is positive) and equals
    the closed form −½√(|γ|SL) f^(−3/2) where it trades."""
    from pdlpjax.market import funding_arbitrage

    sizes = jnp.array([[long_size, short_size]], jnp.float32)
    gamma = jnp.array([gamma], jnp.float32)
    p_new, p_old = jnp.array([101.0], jnp.float32), jnp.array([100.0], jnp.float32)

    def total(fee):
        return funding_arbitrage(sizes, gamma, p_new, p_old, fee).sum()

    fee = jnp.float32(5e-5)
    g = float(jax.grad(total)(fee))
    assert np.isfinite(g)
    size = float(total(fee))
    if size > 0:
        expected = -0.5 * np.sqrt(abs(float(gamma[0])) * short_size * long_size) * 5e-5**-1.5
        assert size == pytest.approx(np.sqrt(1e-4 * 300 / 5e-5) - 10.0, rel=1e-5)
        assert g == pytest.approx(expected, rel=1e-4)
