"""Tests of the discount functions: GMX v1 fees, GLP eq. 11, smooth versions, surrogate.

Exact values are worked by hand in comments; smooth-vs-exact checks use float64
(`jax.enable_x64`) and grids with fixed seeds. Plain-Python references live here.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdlpjax.discount import (
    BASIS_POINTS,
    burn_fee_bps,
    discount_subgradient,
    glp_discount,
    glp_discount_axiomatic,
    glp_discount_smooth,
    gmx_discount,
    gmx_fee_bps,
    gmx_fee_bps_smooth,
    mint_fee_bps,
    quadratic_surrogate,
    swap_fee_bps,
)

# --------------------------------------------------------------------------- references


def ref_fee_bps(i, d, t, base, tax, inc, dynamic=True):
    """`VaultUtils.getFeeBasisPoints` in Python integers (unbounded, like uint256 here)."""
    if not dynamic or t == 0:
        return base
    n = i + d if inc else max(i - d, 0)
    d0, d1 = abs(i - t), abs(n - t)
    if d1 < d0:
        rebate = tax * d0 // t
        return 0 if rebate > base else base - rebate
    avg = min((d0 + d1) // 2, t)
    return base + tax * avg // t


def ref_fee_real(i, d, t, base, tax, inc):
    """The same formula in real numbers (no floors): the τ → 0 limit of the smooth fee."""
    i, d, t = (np.asarray(v, float) for v in (i, d, t))
    n = np.where(inc, i + d, np.maximum(i - d, 0.0))
    d0, d1 = np.abs(i - t), np.abs(n - t)
    improving = np.maximum(base - tax * d0 / t, 0.0)
    worsening = base + tax * np.minimum((d0 + d1) / 2, t) / t
    return np.where(d1 < d0, improving, worsening)


def ref_glp_g(wb, wa, ws, tax):
    """G_i of eq. 11, NumPy."""
    dev_b, dev_a = np.abs(wb - ws) / ws, np.abs(wa - ws) / ws
    g = np.where(np.abs(wa - ws) < np.abs(wb - ws), tax * dev_b, -0.5 * tax * (dev_b + dev_a))
    return np.where(wa == wb, 0.0, g)


# --------------------------------------------------------------------------- GMX fee table

# (I, Δ, T, base, tax, increment, dynamic, expected bps), each worked by hand.
FEE_TABLE = [
    # dynamic fees off: always the base.
    (100, 10, 1000, 25, 50, True, False, 25),
    # T = 0 (token with zero weight): the base.
    (100, 10, 0, 25, 50, True, True, 25),
    # rebate: N = 700, d0 = 400, d1 = 300 < d0; ⌊50·400/1000⌋ = 20; 25 − 20 = 5.
    (600, 100, 1000, 25, 50, True, True, 5),
    # rebate above base: d0 = 700, d1 = 600; ⌊50·700/1000⌋ = 35 > 25 → 0.
    (300, 100, 1000, 25, 50, True, True, 0),
    # rebate equal to base (withdrawal from an overweight token): N = 1300, d0 = 500, d1 = 300;
    # ⌊50·500/1000⌋ = 25, not > 25, so 25 − 25 = 0.
    (1500, 200, 1000, 25, 50, False, True, 0),
    # tax with the average capped at T: N = 6000, d0 = 0, d1 = 5000; ⌊5000/2⌋ = 2500 → T = 1000;
    # ⌊50·1000/1000⌋ = 50; 25 + 50 = 75.
    (1000, 5000, 1000, 25, 50, True, True, 75),
    # withdrawal larger than the balance: N = max(300 − 1000, 0) = 0, d0 = 700, d1 = 1000;
    # ⌊1700/2⌋ = 850; ⌊50·850/1000⌋ = ⌊42.5⌋ = 42; 25 + 42 = 67.
    (300, 1000, 1000, 25, 50, False, True, 67),
    # floor in the average: d0 = 0, d1 = 3; ⌊3/2⌋ = 1; ⌊50·1/1000⌋ = 0; fee 25.
    (1000, 3, 1000, 25, 50, True, True, 25),
    # floor in the tax: d1 = 79; ⌊79/2⌋ = 39; ⌊50·39/1000⌋ = ⌊1.95⌋ = 1; fee 26.
    (1000, 79, 1000, 25, 50, True, True, 26),
    # floor in the rebate: d0 = 39, d1 = 29; ⌊50·39/1000⌋ = ⌊1.95⌋ = 1; 25 − 1 = 24.
    (961, 10, 1000, 25, 50, True, True, 24),
    # crossing the target but ending closer: N = 1100, d0 = 200, d1 = 100; ⌊50·200/1000⌋ = 10 → 15.
    (800, 300, 1000, 25, 50, True, True, 15),
    # crossing to the mirror point: N = 1200, d1 = 200 = d0 is not "<": tax; avg 200 → 10 → 35.
    (800, 400, 1000, 25, 50, True, True, 35),
    # float amounts are floored to whole USDG: (600.9, 100.99, 1000.5) → (600, 100, 1000) → 5.
    (600.9, 100.99, 1000.5, 25, 50, True, True, 5),
    # stable-swap parameters (base 1, tax 5): d0 = 1000, d1 = 1500, avg 1250 → cap 1000;
    # ⌊5·1000/1000⌋ = 5; 1 + 5 = 6.
    (2000, 500, 1000, 1, 5, True, True, 6),
    # large amounts (50·125e6 overflows int32): N = 850e6, d0 = 100e6, d1 = 150e6,
    # avg 125e6; ⌊50·125e6/1e9⌋ = ⌊6.25⌋ = 6; 25 + 6 = 31.
    (900_000_000, 50_000_000, 1_000_000_000, 25, 50, False, True, 31),
    # large rebate: N = 900e6, d0 = 300e6, d1 = 200e6; ⌊50·300e6/700e6⌋ = ⌊21.43⌋ = 21 → 4.
    (1_000_000_000, 100_000_000, 700_000_000, 25, 50, False, True, 4),
    # exact multiples, where a float estimate of the ratio lands just below the integer:
    # d0 = 169,377,783, T = 564,592,610; 50·d0 = 8,468,889,150 = 15·T exactly → 25 − 15 = 10.
    (395_214_827, 1000, 564_592_610, 25, 50, True, True, 10),
    # d0 = 204,311,823, T = 340,519,705; 5·d0 = 1,021,559,115 = 3·T exactly → 25 − 3 = 22.
    (136_207_882, 1, 340_519_705, 25, 5, True, True, 22),
]


@pytest.mark.parametrize("x64", [False, True])
def test_gmx_fee_table(x64):
    with jax.enable_x64(x64):
        for i, d, t, base, tax, inc, dyn, want in FEE_TABLE:
            got = gmx_fee_bps(i, d, t, base, tax, inc, dyn)
            assert got.dtype == (jnp.int64 if x64 else jnp.int32)
            assert int(got) == want, (i, d, t, inc, dyn, int(got))
            if float(i).is_integer() and float(d).is_integer() and float(t).is_integer():
                assert ref_fee_bps(i, d, t, base, tax, inc, dyn) == want
        # the table as one jitted, vectorised call, amounts as integers (a float32 column
        # would round the 9-digit amounts before the floor: the documented float32 limit)
        cols = list(zip(*FEE_TABLE, strict=True))
        amounts = [np.floor(np.asarray(c, np.float64)).astype(np.int64) for c in cols[:5]]
        fn = jax.jit(jax.vmap(gmx_fee_bps))
        got = fn(*amounts, np.asarray(cols[5]), np.asarray(cols[6]))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(cols[7]))


@pytest.mark.parametrize("x64", [False, True])
def test_gmx_fee_matches_integer_reference_up_to_2_30(x64):
    rng = np.random.default_rng(7)
    m = 4000
    scale = rng.choice([10**3, 10**6, 2**30 - 1], size=m)
    i = (rng.random(m) * scale).astype(np.int64)
    d = (rng.random(m) * scale).astype(np.int64)
    t = (rng.random(m) * scale).astype(np.int64)
    t[::17] = 0
    tax = rng.choice([5, 50, 100, 10_000], size=m)
    base = rng.choice([1, 25, 30, 10_000], size=m)
    inc = rng.random(m) < 0.5
    want = [
        ref_fee_bps(*map(int, row[:5]), bool(row[5]))
        for row in zip(i, d, t, base, tax, inc, strict=True)
    ]
    with jax.enable_x64(x64):
        idt = jnp.int64 if x64 else jnp.int32
        args = [jnp.asarray(a, idt) for a in (i, d, t, base, tax)]
        got = jax.jit(gmx_fee_bps)(*args, jnp.asarray(inc))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_gmx_wrappers_use_gmx_defaults():
    # mint into an underweight token (I = 600, T = 1000, Δ = 100): rebate 20, 25 − 20 = 5.
    assert int(mint_fee_bps(600, 100, 1000)) == 5
    # burn from it: N = 500, d1 = 500 ≥ d0 = 400; avg 450; ⌊50·450/1000⌋ = 22; 25 + 22 = 47.
    assert int(burn_fee_bps(600, 100, 1000)) == 47
    assert int(mint_fee_bps(600, 100, 1000, dynamic=False)) == 25
    # swap 100 USDG: in-token I = 600 (fee 30 − 20 = 10), out-token I = 1400, T = 1000:
    # N = 1300, d0 = 400, d1 = 300 → 30 − 20 = 10. Both 10.
    assert int(swap_fee_bps(600, 1400, 100, 1000, 1000)) == 10
    # out-token underweight too (I = 700, N = 600, d0 = 300, d1 = 400): avg 350;
    # ⌊50·350/1000⌋ = 17; 30 + 17 = 47 > 10: the larger leg is paid.
    assert int(swap_fee_bps(600, 700, 100, 1000, 1000)) == 47
    # stable swap: base 1, tax 5. In-leg rebate ⌊5·400/1000⌋ = 2 > 1 → 0; out-leg
    # ⌊5·350/1000⌋ = 1 → 2. Larger is 2.
    assert int(swap_fee_bps(600, 700, 100, 1000, 1000, stable_swap=True)) == 2


# --------------------------------------------------------------------------- GLP, eq. 11

P2 = np.array([1.0, 1.0])
W2 = np.array([0.5, 0.5])  # Figure 2: two assets, target weight 0.5
R2 = np.array([0.6, 0.4])
BASE, TAX = 0.0025, 0.005  # GMX's 25 and 50 bps as fractions


def fig2_grid(num=61):
    d1 = np.linspace(-0.55, 4.0, num)
    d2 = np.linspace(-0.35, 4.0, num)
    return np.array(list(itertools.product(d1, d2)))


def test_glp_eq11_regions_at_figure_2():
    with jax.enable_x64(True):
        deltas = fig2_grid()
        F = jax.jit(jax.vmap(glp_discount, in_axes=(None, None, None, 0, None, None)))
        got = np.asarray(F(P2, W2, R2, deltas, BASE, TAX))
        # zero trade gives γ_b (the broken axiom F(0) = 0)
        assert float(glp_discount(P2, W2, R2, np.zeros(2), BASE, TAX)) == pytest.approx(BASE)

    wb = P2 * R2 / (P2 @ R2)
    dev_b = abs(wb[0] - 0.5) / 0.5  # 0.2 for both assets
    regions = {"toward": 0, "away": 0, "clipped": 0}
    for d, f in zip(deltas, got, strict=True):
        after = R2 + d
        wa = after / after.sum()
        dev_a = abs(wa[0] - 0.5) / 0.5
        if dev_a < dev_b:
            # toward target: base + rebate = 0.0025 + 0.005·0.2 = 0.0035 for every such trade
            assert f == pytest.approx(BASE + TAX * dev_b, rel=1e-9)
            regions["toward"] += 1
        else:
            taxed = BASE - 0.5 * TAX * (dev_b + dev_a)
            assert f == pytest.approx(max(taxed, 0.0), rel=1e-9, abs=1e-15)
            regions["away" if taxed > 0 else "clipped"] += 1
    assert all(v > 50 for v in regions.values()), regions
    assert got.min() >= 0.0  # eq. 11 never charges a fee


def test_glp_eq11_makes_creation_arbitrage_unbounded():
    # A deposit in the target mix moves both weights toward 0.5 from (0.6, 0.4): eq. 11 pays
    # γ_b + γ_t·0.2 = 0.35% on any size, so eq. 7's profit F·pᵀδ grows without bound.
    with jax.enable_x64(True):
        F = jax.jit(lambda d: glp_discount(P2, W2, R2, d, BASE, TAX))
        for size in [1.0, 10.0, 1000.0]:
            delta = np.array([0.5, 0.5]) * size
            assert float(F(delta)) == pytest.approx(0.0035)
            assert float(F(delta)) * (P2 @ delta) == pytest.approx(0.0035 * size)


def test_glp_axiomatic_variant():
    with jax.enable_x64(True):
        deltas = fig2_grid(41)
        Fa = jax.vmap(glp_discount_axiomatic, in_axes=(None, None, None, 0, None, None))
        got = np.asarray(Fa(P2, W2, R2, deltas, BASE, TAX))
        assert float(glp_discount_axiomatic(P2, W2, R2, np.zeros(2), BASE, TAX)) == 0.0
    wb = P2 * R2 / (P2 @ R2)
    for d, f in zip(deltas, got, strict=True):
        after = R2 + d
        wa = P2 * after / (P2 @ after)
        g = ref_glp_g(wb, wa, W2, TAX).max()
        fix = -max(0.0, BASE - g)  # eq. 11 with the signs fixed: −(GMX fee)
        assert f == pytest.approx(fix + BASE, abs=1e-15)  # F_fix(δ) − F_fix(0)
        toward = abs(wa[0] - 0.5) < abs(wb[0] - 0.5)
        assert (f > 0) == toward and (f < 0) == (not toward)


def test_glp_axiomatic_rebate_matches_gmx_fee():
    # A single-asset deposit that improves balance: eq. 11's rebate γ_t|w^b − w*|/w* is GMX's
    # tax·d0/T (d0/T = |I − T|/T = |w^b − w*|/w*), so min(γ_b, G) = (base − fee)/10⁴ up to
    # GMX's 1 bp floor.
    prices = np.array([2000.0, 1.0])
    reserves = np.array([150.0, 700_000.0])  # 300k vs 700k USDG, target 500k each
    for dep in [10.0, 50.0, 100.0, 150.0]:
        delta = np.array([dep, 0.0])
        with jax.enable_x64(True):
            fa = float(glp_discount_axiomatic(prices, W2, reserves, delta, 0.0025, 0.005))
        fee = int(mint_fee_bps(300_000, dep * 2000, 500_000))
        assert abs(fa - (25 - fee) / BASIS_POINTS) <= 1 / BASIS_POINTS


def test_gmx_discount():
    prices = np.array([2000.0, 1.0])
    reserves = np.array([150.0, 700_000.0])
    zero = float(gmx_discount(prices, W2, reserves, np.zeros(2)))
    assert zero == 0.0
    # pure deposit of 100k USD of the underweight asset: fee 25 − ⌊50·200k/500k⌋ = 5 bps,
    # so F·pᵀδ = −5e-4·100k = −50 (minus the fee paid).
    delta = np.array([50.0, 0.0])
    f = float(gmx_discount(prices, W2, reserves, delta))
    assert f * 100_000 == pytest.approx(-50.0, rel=1e-6)
    # mixed legs are weighted by gross value: 100k in (5 bps) and 100k of the overweight
    # asset out (N = 600k, d0 = 200k, d1 = 100k: 25 − 20 = 5 bps) → 5 bps.
    f2 = float(gmx_discount(prices, W2, reserves, np.array([50.0, -100_000.0])))
    assert f2 == pytest.approx(-5e-4, rel=1e-6)
    rng = np.random.default_rng(3)
    deltas = rng.normal(size=(200, 2)) * np.array([50.0, 1e5])
    all_f = jax.jit(jax.vmap(gmx_discount, in_axes=(None, None, None, 0)))(
        prices, W2, reserves, deltas
    )
    assert np.all(np.asarray(all_f) <= 0.0)  # GMX never pays a positive discount
    # the smooth fee at a small temperature agrees within GMX's 1 bp floor
    smooth = jax.jit(jax.vmap(lambda d: gmx_discount(prices, W2, reserves, d, temperature=1e-4)))
    np.testing.assert_allclose(smooth(deltas), all_f, atol=1.01e-4)


# --------------------------------------------------------------------------- smooth versions

LADDER = [3e-3, 1e-3, 3e-4, 1e-4, 3e-5]


def away_from_glp_kinks(prices, ws, reserves, deltas, margin=0.02):
    wb = prices * reserves / (prices @ reserves)
    keep = []
    for d in deltas:
        after = reserves + d
        wa = prices * after / (prices @ after)
        g = np.sort(ref_glp_g(wb, wa, ws, TAX))
        ok = (
            np.all(np.abs(np.abs(wa - ws) - np.abs(wb - ws)) > margin)
            and np.all(np.abs(wa - wb) > margin)
            and np.all(np.abs(wa - ws) > margin)
            and abs(BASE + g[-1]) > margin * TAX
        )
        keep.append(ok)
    return np.asarray(keep)


def test_glp_smooth_converges_monotonically():
    rng = np.random.default_rng(11)
    cases = [(P2, W2, R2, fig2_grid(41))]
    p3 = np.array([2.0, 1.0, 0.5])
    r3 = np.array([0.3, 0.5, 0.9])
    cases.append((p3, np.array([0.5, 0.3, 0.2]), r3, rng.uniform(-0.25, 1.5, size=(1500, 3))))
    with jax.enable_x64(True):
        for prices, ws, reserves, deltas in cases:
            deltas = deltas[away_from_glp_kinks(prices, ws, reserves, deltas)]
            assert len(deltas) > 200
            axes = (None, None, None, 0, None, None)
            exact = jax.jit(jax.vmap(glp_discount, in_axes=axes))(
                prices, ws, reserves, deltas, BASE, TAX
            )
            smooth = jax.jit(jax.vmap(glp_discount_smooth, in_axes=(*axes, None)))
            errs = [
                float(jnp.max(jnp.abs(smooth(prices, ws, reserves, deltas, BASE, TAX, t) - exact)))
                for t in LADDER
            ]
            assert all(a > b for a, b in itertools.pairwise(errs)), errs
            assert errs[-1] < 1e-6, errs


def test_gmx_smooth_converges_monotonically():
    rng = np.random.default_rng(5)
    t = 1.0e6
    x = rng.uniform(0.2, 2.5, size=3000)
    dx = rng.uniform(0.01, 2.0, size=3000)
    inc = rng.random(3000) < 0.5
    n = np.where(inc, x + dx, np.maximum(x - dx, 0))
    d0, d1 = np.abs(x - 1), np.abs(n - 1)
    m = 0.02
    keep = (
        (np.abs(d0 - d1) > m)
        & (d0 > m)
        & (d1 > m)
        & (np.abs(25 - 50 * d0) > 1.0)
        & (np.abs((d0 + d1) / 2 - 1) > m)
        & (inc | (np.abs(x - dx) > m))
    )
    i_amt, d_amt, inc = x[keep] * t, dx[keep] * t, inc[keep]
    real = ref_fee_real(i_amt, d_amt, t, 25.0, 50.0, inc)
    with jax.enable_x64(True):
        exact = np.asarray(gmx_fee_bps(i_amt, d_amt, t, 25, 50, inc))
        errs, to_exact = [], []
        for tau in LADDER:
            sm = np.asarray(gmx_fee_bps_smooth(i_amt, d_amt, t, 25.0, 50.0, inc, tau))
            errs.append(np.max(np.abs(sm - real)))
            to_exact.append(np.max(np.abs(sm - exact)))
    assert all(a > b for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] < 1e-2, errs
    assert to_exact[-1] < 1.0 + 1e-2  # floors: the exact fee is within 1 bp of the real one


def test_smooth_gradients_match_central_differences():
    rng = np.random.default_rng(2)
    h = 1e-6
    with jax.enable_x64(True):
        p3 = np.array([2.0, 1.0, 0.5])
        ws = np.array([0.5, 0.3, 0.2])
        r3 = np.array([0.3, 0.5, 0.9])
        tau = 1e-2

        @jax.jit
        def F(d, p):
            return glp_discount_smooth(p, ws, r3, d, BASE, TAX, tau)

        grad = jax.jit(jax.grad(F, argnums=(0, 1)))
        for d in rng.uniform(-0.2, 1.0, size=(20, 3)):
            gd, gp = grad(d, p3)
            eye = np.eye(3) * h
            fd_d = [(F(d + e, p3) - F(d - e, p3)) / (2 * h) for e in eye]
            fd_p = [(F(d, p3 + e) - F(d, p3 - e)) / (2 * h) for e in eye]
            np.testing.assert_allclose(gd, fd_d, rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(gp, fd_p, rtol=1e-5, atol=1e-9)
        # finite at the kinks of the exact function: δ = 0, and a weight on target
        for d in [np.zeros(3), np.array([0.0, 0.0, 0.1])]:
            gd, gp = grad(d, p3)
            assert np.all(np.isfinite(gd)) and np.all(np.isfinite(gp))
        # at δ = 0: F_τ(0) ≈ γ_b, and the gradient points toward w* (deposit the
        # underweight asset: w(p, R) = (0.39, 0.32, 0.29) against w* = (0.5, 0.3, 0.2))
        f0 = float(F(np.zeros(3), p3))
        assert abs(f0 - BASE) <= tau * TAX * (np.log(2) + np.log(3))
        gd, _ = grad(np.zeros(3), p3)
        assert gd[0] > 0 and gd[2] < 0

        @jax.jit
        def fee(args, inc):
            i, d, t = args
            return gmx_fee_bps_smooth(i, d, t, 25.0, 50.0, inc, 1e-2)

        gfee = jax.jit(jax.grad(fee))
        for i, d, inc in [(0.6, 0.1, True), (1.4, 0.3, False), (0.3, 2.0, False), (1.0, 0.0, True)]:
            args = np.array([i, d, 1.0]) * 1e6
            g = np.asarray(gfee(args, inc))
            assert np.all(np.isfinite(g))
            fd = [(fee(args + e, inc) - fee(args - e, inc)) / 2.0 for e in np.eye(3)]
            np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-12)


@jax.enable_x64(False)  # float32 even in an x64 CI job
def test_float32_jit_vmap_and_dtypes():
    deltas = fig2_grid(9).astype(np.float32)
    p, w, r = (a.astype(np.float32) for a in (P2, W2, R2))
    axes = (None, None, None, 0, None, None)
    for fn in (glp_discount, glp_discount_axiomatic):
        batched = jax.jit(jax.vmap(fn, in_axes=axes))(p, w, r, deltas, BASE, TAX)
        assert batched.dtype == jnp.float32
        single = jax.jit(fn)
        loop = np.array([single(p, w, r, d, BASE, TAX) for d in deltas])
        np.testing.assert_array_equal(np.asarray(batched), loop)
    sm = jax.jit(jax.vmap(glp_discount_smooth, in_axes=(*axes, None)))(
        p, w, r, deltas, BASE, TAX, 1e-3
    )
    assert sm.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(sm)))
    gd = jax.jit(jax.vmap(gmx_discount, in_axes=(None, None, None, 0)))(p * 1e5, w, r, deltas)
    assert gd.dtype == jnp.float32


# --------------------------------------------------------------------------- surrogate


def test_surrogate_bounds_strongly_concave_F_and_subgradient():
    with jax.enable_x64(True):
        g = jnp.array([0.3, -0.2, 0.1])
        mu = 2.0

        def F(d):  # μ-strongly concave (extra −log cosh is concave), F(0) = 0, ∇F(0) = g
            return g @ d - 0.5 * mu * d @ d - jnp.sum(jnp.log(jnp.cosh(d)))

        sub = jax.jit(lambda: discount_subgradient(F, 3))()
        np.testing.assert_allclose(sub, g, rtol=1e-12)
        fd = jax.jit(lambda: discount_subgradient(F, 3, eps=1e-7))()
        np.testing.assert_allclose(fd, g, atol=1e-6)
        h = quadratic_surrogate(sub, mu)
        np.testing.assert_allclose(h.argmax, g / mu)
        ds = np.random.default_rng(0).normal(size=(500, 3))
        gap = jax.jit(jax.vmap(lambda d: h(d) - F(d)))(ds)
        assert np.all(np.asarray(gap) >= -1e-12)
        # eq. 11 jumps at δ = 0, so forward differences grow like 1/ε: no subgradient.
        fglp = jax.jit(lambda d: glp_discount(P2, W2, R2, d, BASE, TAX))
        g1 = jax.jit(lambda: discount_subgradient(fglp, 2, eps=1e-4))()
        g2 = jax.jit(lambda: discount_subgradient(fglp, 2, eps=1e-6))()
        assert float(jnp.max(jnp.abs(g2))) > 50 * float(jnp.max(jnp.abs(g1)))
