"""`gmx_fee_bps` against an integer transcription of GMX v1 `VaultUtils.getFeeBasisPoints`.

The fee must be exact at any pool size the engine meets (real GLP holds about 5e8 USDG), in
float32 mode (x64 off: no int64) as in float64 mode. The vectors span 1 to 1e12 USDG
log-uniformly, bps 0 to 500, both trade directions, targets from token weights, and the
edges where a fixed-width or floating-point version breaks: T = 0, trades across the target,
amounts at 2²⁴, 2³¹, 2³², 2⁵³, exact quotients (a·x = k·T) and withdrawals below zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdlpjax.discount import gmx_discount, gmx_fee_bps, mint_fee_bps, swap_fee_bps


def ref_fee_bps(i: int, d: int, t: int, base: int, tax: int, inc: bool, dynamic=True) -> int:
    """`getFeeBasisPoints` in Python integers (unbounded, like the contract's uint256)."""
    if not dynamic:
        return base
    n = i + d if inc else (0 if d > i else i - d)
    if t == 0:
        return base
    d0 = i - t if i > t else t - i
    d1 = n - t if n > t else t - n
    if d1 < d0:
        rebate = tax * d0 // t
        return 0 if rebate > base else base - rebate
    avg = (d0 + d1) // 2
    if avg > t:
        avg = t
    return base + tax * avg // t


def ref_column(i, d, t, base, tax, inc) -> np.ndarray:
    rows = zip(i, d, t, base, tax, inc, strict=True)
    return np.array([ref_fee_bps(*map(int, r[:5]), bool(r[5])) for r in rows], np.int64)


def log_uniform(rng, m, hi=1e12) -> np.ndarray:
    """Whole USDG amounts, log-uniform on [1, hi]."""
    return np.floor(np.exp(rng.uniform(0.0, np.log(hi), m))).astype(np.int64)


def random_vectors(seed=0, m=3000):
    """(I, Δ, T, base, tax, increment), int64 columns; T = total·weight/total weights."""
    rng = np.random.default_rng(seed)
    i = log_uniform(rng, m)
    d = log_uniform(rng, m)
    total = i + log_uniform(rng, m)  # USDG supply: this token plus the rest
    weights = rng.integers(1, 10_001, m)
    total_weights = weights + rng.integers(0, 50_001, m)
    t = total * weights // total_weights  # getTargetUsdgAmount, exact in int64 (< 2⁵⁷)
    # a third with an unrelated target of any size, so that I/T spans 1e-12..1e12
    other = rng.random(m) < 1 / 3
    t[other] = log_uniform(rng, int(other.sum()))
    base = rng.integers(0, 501, m)
    tax = rng.integers(0, 501, m)
    inc = rng.random(m) < 0.5
    return i, d, t, base, tax, inc


def edge_vectors():
    """Hand-made edges, as int64 columns (amounts up to 2⁵⁸ fit; each row is checked exactly)."""
    rows = []
    powers = [2**24, 2**31, 2**32, 2**53]
    for p in powers:
        for off in (-1, 0, 1):
            a = p + off
            # I at the boundary, small and crossing trades, both directions
            rows += [
                (a, 1, a // 3, 25, 50, True),
                (a, a, a // 3, 25, 50, False),  # withdraw everything: N = 0
                (a, a + 7, a // 3, 25, 50, False),  # below zero: N = max(I − Δ, 0) = 0
                (a // 3, a, a // 2, 25, 50, True),  # deposit across the target
                (a, 1, a, 25, 50, True),  # I = T: d0 = 0, never a rebate
                (1, a, a, 500, 500, True),  # far below target, deposit to beyond it
                (a, 3, 7, 30, 500, False),  # huge I over a tiny T: rebate saturates → 0
                (7, a, a + 1, 30, 500, True),
                (a, 2, 0, 25, 50, True),  # T = 0: the base
                (a, 2, 1, 25, 50, True),  # T = 1
            ]
    # exact quotients: tax·x = k·T at large T, plus x − 1 (quotient one lower), in both
    # branches. Rebate: x = d0 = T − I with a small deposit toward T. Tax: I = T, a
    # deposit Δ = 2x or 2x + 1 so that ⌊(d0 + d1)/2⌋ = x.
    rng = np.random.default_rng(1)
    for _ in range(60):
        tax = int(rng.integers(1, 501))
        u = int(np.exp(rng.uniform(0, np.log(1e12 / tax))))
        t = tax * u
        k = int(rng.integers(0, tax + 1))
        for x in (k * u, max(k * u - 1, 0)):
            rows.append((t - x, 1, t, 500, tax, True))
            rows.append((t + x, 1, t, 500, tax, False))
            rows.append((t, 2 * x, t, 25, tax, True))
            rows.append((t, 2 * x + 1, t, 25, tax, True))
            rows.append((t, 2 * x + 1, t, 25, tax, False))
    # ties d1 = d0 (not "<": the tax branch) and d1 = d0 − 1, at every scale
    for p in (1000, 10**6, 10**9, 10**12):
        rows += [(p - 100, 200, p, 25, 50, True), (p - 100, 199, p, 25, 50, True)]
    cols = [np.array(c, np.int64) for c in zip(*rows, strict=True)]
    cols[5] = cols[5].astype(bool)
    return cols


def as_float32_ints(col: np.ndarray) -> np.ndarray:
    """What float32 mode holds for an amount: its float32 rounding (an integer above 2²⁴)."""
    return col.astype(np.float32)


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("x64", [False, True])
def test_random_amounts_float_inputs(x64):
    """3,000 log-uniform vectors as the engine passes them: float arrays, jitted and vmapped."""
    i, d, t, base, tax, inc = random_vectors()
    fdt = np.float64 if x64 else np.float32
    i, d, t = (c.astype(fdt) for c in (i, d, t))  # float32 rounds above 2²⁴: the input
    want = ref_column(i, d, t, base, tax, inc)
    with jax.enable_x64(x64):
        fn = jax.jit(jax.vmap(gmx_fee_bps, in_axes=(0, 0, 0, 0, 0, 0)))
        got = fn(i, d, t, base.astype(np.int32), tax.astype(np.int32), inc)
        assert got.dtype == (jnp.int64 if x64 else jnp.int32)
    got = np.asarray(got, np.int64)
    np.testing.assert_array_equal(got, want, err_msg=f"max |error| {np.abs(got - want).max()}")
    # sanity on the draw: every magnitude and both branches of the formula are present
    assert i.min() < 10 and i.max() > 1e11 and t.max() > 1e11
    assert (want == 0).any() and (want > base).any() and ((want > 0) & (want < base)).any()


@pytest.mark.parametrize("x64", [False, True])
def test_edges_integer_inputs(x64):
    """Edge rows as NumPy int64, split exactly on the host even with x64 off."""
    i, d, t, base, tax, inc = edge_vectors()
    want = ref_column(i, d, t, base, tax, inc)
    with jax.enable_x64(x64):
        got = jax.jit(lambda: gmx_fee_bps(i, d, t, base, tax, inc))()
    np.testing.assert_array_equal(np.asarray(got, np.int64), want)


def test_edges_float32_inputs():
    """The same edges with amounts rounded to float32 (x64 off), as a float32 engine holds them."""
    i, d, t, base, tax, inc = edge_vectors()
    i, d, t = (as_float32_ints(c) for c in (i, d, t))
    want = ref_column(i, d, t, base, tax, inc)
    with jax.enable_x64(False):
        got = jax.jit(gmx_fee_bps)(i, d, t, base.astype(np.int32), tax.astype(np.int32), inc)
    np.testing.assert_array_equal(np.asarray(got, np.int64), want)


def test_real_glp_size_float32():
    """The cases from the issue: GLP-sized amounts in float32, where tax·amount > 2³¹."""
    rows = [
        # I = 1.4e9 far above T = 38, a withdrawal: the rebate saturates, the fee is 0
        # (the float32 code before the fix returned 2,103,188,026 bps).
        (1.4007675e9, 95637.0, 38.0, 80, 409, False, 0),
        # 5e8 USDG pool, a token at 1.2e8 against a 1.25e8 target, 1e6 mint: rebate
        # ⌊50·5e6/1.25e8⌋ = 2, fee 23.
        (1.2e8, 1e6, 1.25e8, 25, 50, True, 23),
        # a token 3e9 over a 1e9 target; burning 1e6 improves balance, rebate 100 > 25 → 0
        (3e9, 1e6, 1e9, 25, 50, False, 0),
        # a 1e12 deposit into an empty token with a 1e11 target: the tax caps at T → 75
        (0.0, 1e12, 1e11, 25, 50, True, 75),
    ]
    i, d, t, base, tax, inc, want = (np.array(c) for c in zip(*rows, strict=True))
    with jax.enable_x64(False):
        args = [c.astype(np.float32) for c in (i, d, t)] + [base, tax, inc]
        got = jax.jit(gmx_fee_bps)(*args)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_modes_agree_bit_for_bit():
    """x64 on and off give the same fees on the same (float32-representable) inputs."""
    i, d, t, base, tax, inc = random_vectors(seed=3, m=500)
    i, d, t = (as_float32_ints(c) for c in (i, d, t))
    out = []
    for x64 in (False, True):
        with jax.enable_x64(x64):
            out.append(np.asarray(jax.jit(gmx_fee_bps)(i, d, t, base, tax, inc), np.int64))
    np.testing.assert_array_equal(out[0], out[1])


# --------------------------------------------------------------------------- behaviour kept


def test_dynamic_off_no_target_and_invalid_amounts():
    """Dynamic off or T = 0 (T below one USDG floors to 0): the base. Negative and NaN
    amounts count as 0, amounts above 2⁵⁸ as 2⁵⁸ (documented)."""
    i = np.array([5e11, 5e11, 5.0, -5.0, np.nan, 2.0**70], np.float32)
    t = np.array([1e11, 0.0, 0.9, 100.0, 100.0, 100.0], np.float32)
    dyn = np.array([False, True, True, True, True, True])
    want = [25, 25, 25, *(ref_fee_bps(a, 10, 100, 25, 50, True) for a in (0, 0, 2**58))]
    with jax.enable_x64(False):
        fn = jax.jit(jax.vmap(gmx_fee_bps, in_axes=(0, None, 0, None, None, None, 0)))
        got = fn(i, np.float32(10.0), t, 25, 50, True, dyn)
    assert list(np.asarray(got)) == want


def test_float_bps_round_to_nearest():
    """Rates held as fractions come back from ·1e4 a hair below their integer (0.0007 →
    6.9999995 in float32, 0.0003 → 2.9999999999999996 in float64): the fee uses 7 and 3."""
    for x64, rate in ((False, np.float32(0.0007)), (True, 0.0003)):
        with jax.enable_x64(x64):
            bps = jnp.asarray(rate) * 1e4
            assert float(bps) < round(float(bps))
            want = round(float(bps))

            @jax.jit
            def fees(bps):
                off = dict(dynamic=False)
                return (
                    mint_fee_bps(600, 100, 1000, mint_burn_bps=bps, **off),
                    swap_fee_bps(600, 1400, 100, 1000, 1000, swap_bps=bps, **off),
                    # the discount as the engine builds it from fractions
                    gmx_discount(
                        jnp.ones(2),
                        jnp.full(2, 0.5),
                        jnp.full(2, 500.0),
                        jnp.array([10.0, 0.0]),
                        mint_burn_bps=bps,
                        tax_bps=bps,
                        **off,
                    ),
                )

            mint, swap, discount = fees(bps)
            assert int(mint) == want and int(swap) == want
            assert float(discount) == pytest.approx(-want / 1e4)
