"""Discount functions F(p, w*, R, δ) of a target-weight mechanism (Chitra et al. §3.1, §3.6).

An LP who changes the reserves by δ gets (1 + F) times the pro-rata value of what they bring:
F > 0 is a discount (a rebate), F < 0 a fee. The paper asks of F: F(p, w*, R, 0) = 0,
concavity in δ, and a maximum at trades reaching w*. This module has:

- `glp_discount`: eq. 11 exactly as printed, and `glp_discount_axiomatic`, a repair that
  meets F(0) = 0 (eq. 11 gives γ_b at δ = 0; see its docstring for the two sign slips).
- `gmx_fee_bps`: GMX v1 `VaultUtils.getFeeBasisPoints` in integer basis points with floor
  division, its mint/burn/swap wrappers, and `gmx_discount`, the fee as a discount −fee/10⁴.
- `glp_discount_smooth`, `gmx_fee_bps_smooth`: relaxations with a temperature τ (|·|, max,
  branches and clips smoothed; no floors) with finite gradients everywhere; they tend to the
  exact functions (without floors) as τ → 0 away from kinks.
- `quadratic_surrogate` h(δ) = gᵀδ − μ/2 ‖δ‖² and `discount_subgradient` g ∈ ∂F(0) (§3.3).

All functions are pure and unbatched (n = number of assets), jit- and vmap-able, and work in
float32 and float64. The integer fee is exact, and the same bit for bit with x64 on or off,
for whole USDG amounts up to 2⁵⁸ (about 2.9e17) and bps up to 32,767: it computes in pairs
of 30-bit int32 limbs (no int64 needed), with one float32 estimate of the final quotient
corrected by exact integer tests (see `_mul_div_floor`).
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._numerics import fixed_sum

__all__ = [
    "BASIS_POINTS",
    "TAX_BPS",
    "STABLE_TAX_BPS",
    "MINT_BURN_BPS",
    "SWAP_BPS",
    "STABLE_SWAP_BPS",
    "glp_g",
    "glp_discount",
    "glp_discount_axiomatic",
    "glp_discount_smooth",
    "gmx_fee_bps",
    "gmx_fee_bps_smooth",
    "mint_fee_bps",
    "burn_fee_bps",
    "swap_fee_bps",
    "gmx_discount",
    "QuadraticSurrogate",
    "quadratic_surrogate",
    "discount_subgradient",
]

# GMX v1 defaults (gmx-contracts fee script; VaultUtils): basis points, 1 bp = 1e-4.
BASIS_POINTS = 10_000
TAX_BPS = 50
STABLE_TAX_BPS = 5
MINT_BURN_BPS = 25
SWAP_BPS = 30
STABLE_SWAP_BPS = 1


# --------------------------------------------------------------------------- helpers


def _int_dtype():
    """int64 under x64, else int32 (JAX has no int64 without x64)."""
    return jax.dtypes.canonicalize_dtype(jnp.int64)


def _float_dtype():
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _to_bps(x: ArrayLike) -> Int[Array, "*b"]:
    """Integer basis points: round a float to the nearest integer, keep an integer.

    Rounding, not flooring: a rate held as a fraction comes back from `rate * 1e4` a hair
    below its integer about 6% of the time (0.0007 → 6.9999995 in float32, 0.0003 →
    2.9999999999999996 in float64), and a floor would charge one basis point less.
    """
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        x = jnp.round(x)
    return x.astype(_int_dtype())


# Exact integer arithmetic on USDG amounts without int64 (x64 off), used in both modes so
# that they agree bit for bit. A nonnegative integer below 2⁶⁰ is a pair (lo, hi) of int32
# limbs of 30 bits. Amounts are clipped to [0, 2⁵⁸], so every intermediate (I + Δ ≤ 2⁵⁹,
# d0 + d1 < 2⁶⁰) fits, and a sum of two limbs plus a carry stays below 2³¹.
_BITS = 30
_MASK = (1 << _BITS) - 1
_HALF_BITS = 15  # products are formed on 15-bit pieces: (2¹⁵ − 1)·2¹⁵ < 2³⁰
_HALF_MASK = (1 << _HALF_BITS) - 1
_MAX_AMOUNT = 2**58  # about 2.9e17 USDG
_MAX_BPS = (1 << _HALF_BITS) - 1  # 32,767 bps: tax is clipped to [0, this]

Limbs = tuple[Array, Array]


def _limbs(x: ArrayLike) -> Limbs:
    """Split an amount into (lo, hi): floor a float, clip to [0, 2⁵⁸] (NaN → 0), exactly.

    Python and NumPy integers are split on the host in int64, so amounts above 2³¹ survive
    x64 being off. Floats are split in their own dtype: for an integer-valued float t,
    h = ⌊t·2⁻³⁰⌋ and t − 2³⁰·h (its low 30 bits, a subset of its significand) are exact.
    """
    if isinstance(x, int | np.integer) or (
        isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.integer)
    ):
        v = np.asarray(np.clip(np.asarray(x, dtype=object), 0, _MAX_AMOUNT), np.int64)
        return jnp.asarray(v & _MASK, jnp.int32), jnp.asarray(v >> _BITS, jnp.int32)
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        if jnp.finfo(x.dtype).bits < 32:
            x = x.astype(jnp.float32)
        x = jnp.floor(x)
        x = jnp.minimum(jnp.where(x >= 0, x, 0), float(_MAX_AMOUNT))  # NaN, x < 0 → 0
        hi = jnp.floor(x * 2.0**-_BITS)
        return (x - hi * 2.0**_BITS).astype(jnp.int32), hi.astype(jnp.int32)
    if x.dtype == jnp.bool_ or jnp.iinfo(x.dtype).bits < 32:
        x = x.astype(jnp.int32)
    x = jnp.maximum(x, 0)
    if jnp.iinfo(x.dtype).bits <= _BITS + 2:  # int32, uint32: at most 2 bits above lo
        return (x & _MASK).astype(jnp.int32), (x >> _BITS).astype(jnp.int32)
    x = jnp.minimum(x, _MAX_AMOUNT)
    return (x & _MASK).astype(jnp.int32), (x >> _BITS).astype(jnp.int32)


def _add(x: Limbs, y: Limbs) -> Limbs:
    lo = x[0] + y[0]
    return lo & _MASK, x[1] + y[1] + (lo >> _BITS)


def _sub(x: Limbs, y: Limbs) -> tuple[Limbs, Array]:
    """x − y and a flag x < y (then the limbs are meaningless)."""
    lo = x[0] - y[0]
    hi = x[1] - y[1] + (lo >> _BITS)  # arithmetic shift: the borrow is −1 or 0
    return (lo & _MASK, hi), hi < 0


def _less(x: Limbs, y: Limbs) -> Array:
    return (x[1] < y[1]) | ((x[1] == y[1]) & (x[0] < y[0]))


def _where(c: Array, x: Limbs, y: Limbs) -> Limbs:
    return jnp.where(c, x[0], y[0]), jnp.where(c, x[1], y[1])


def _abs_diff(x: Limbs, y: Limbs) -> Limbs:
    lt = _less(x, y)
    return _sub(_where(lt, y, x), _where(lt, x, y))[0]


def _half(x: Limbs) -> Limbs:
    """⌊x/2⌋: the low bit of hi becomes the top bit of lo."""
    return (x[0] >> 1) | ((x[1] & 1) << (_BITS - 1)), x[1] >> 1


def _to_float32(x: Limbs) -> Array:
    """x in float32, within three roundings (relative error below 2⁻²²)."""
    return x[1].astype(jnp.float32) * 2.0**_BITS + x[0].astype(jnp.float32)


def _pieces(x: Limbs) -> tuple[Array, Array, Array, Array]:
    """x as four 15-bit pieces, least significant first."""
    lo, hi = x
    return lo & _HALF_MASK, lo >> _HALF_BITS, hi & _HALF_MASK, hi >> _HALF_BITS


def _at_least(a: Array, x: tuple, e: Array, c: tuple) -> Array:
    """a·x ≥ e·c, exactly, for int32 factors 0 ≤ a, e ≤ 2¹⁵ and x, c as 15-bit pieces.

    a·x − e·c is summed piece by piece with a signed carry (each term in (−2³⁰, 2³⁰), the
    carry below 2¹⁶ in size): the value is ≥ 0 iff the final carry is.
    """
    carry = 0
    for xi, ci in zip(x, c, strict=True):
        carry = (a * xi - e * ci + carry) >> _HALF_BITS  # arithmetic shift: a floor
    return jnp.asarray(carry) >= 0


def _mul_div_floor(a: Array, x: Limbs, c: Limbs) -> Array:
    """min(⌊a·x/c⌋, 2¹⁵ − 1) for int32 0 ≤ a < 2¹⁵ and limbs x ≥ 0, c > 0, exactly; int32.

    A float32 estimate of a·x/c (relative error under 2⁻²⁰: x and c each within 2⁻²², a
    division and a product) is off by less than 0.04 while the quotient is below 2¹⁵, so its
    floor e is the quotient or one off. The exact tests a·x ≥ e·c and a·x ≥ (e + 1)·c
    (`_at_least`; no product is formed whole) correct it. A quotient of 2¹⁵ − 1 or more (a
    rebate far above any base fee) is returned as 2¹⁵ − 1.
    """
    est = a.astype(jnp.float32) * (_to_float32(x) / _to_float32(c))
    e = jnp.clip(jnp.floor(est), 0, _MAX_BPS).astype(jnp.int32)
    xp, cp = _pieces(x), _pieces(c)
    low = ~_at_least(a, xp, e, cp)  # a·x < e·c: e is one too high
    high = _at_least(a, xp, e + 1, cp)  # a·x ≥ (e + 1)·c: one too low
    return jnp.minimum(e - low.astype(jnp.int32) + high.astype(jnp.int32), _MAX_BPS)


def _soft_abs(x: Array, tau: ArrayLike) -> Array:
    """√(x² + τ²): |x| ≤ it ≤ |x| + τ, smooth at 0."""
    return jnp.sqrt(x * x + tau * tau)


def _soft_relu(x: Array, tau: ArrayLike) -> Array:
    """τ·softplus(x/τ): max(x, 0) ≤ it ≤ max(x, 0) + τ log 2."""
    return tau * jax.nn.softplus(x / tau)


def _safe_weights(prices: Float[Array, " n"], reserves: Float[Array, " n"]) -> Float[Array, " n"]:
    """w(p, R) = p ⊙ R / pᵀR (§3.1), with an empty pool mapped to 0 instead of NaN."""
    v = prices * reserves
    total = fixed_sum(v)
    return v * (1.0 / jnp.where(total != 0, total, 1.0))


# --------------------------------------------------------------------------- GLP, eq. 11


def glp_g(
    w_before: Float[Array, " n"],
    w_after: Float[Array, " n"],
    target_weights: Float[Array, " n"],
    tax: Float[ArrayLike, ""],
) -> Float[Array, " n"]:
    """The piecewise G_i(w^b, w^a, w*) of eq. 11, per asset.

    0 if w^a_i = w^b_i; γ_t |w^b_i − w*_i|/w*_i (a rebate) if |w^a_i − w*_i| < |w^b_i − w*_i|;
    else −γ_t/2 (|w^b_i − w*_i| + |w^a_i − w*_i|)/w*_i (a tax). Shape `(n,)`.
    """
    dev_b = jnp.abs(w_before - target_weights) / target_weights
    dev_a = jnp.abs(w_after - target_weights) / target_weights
    toward = jnp.abs(w_after - target_weights) < jnp.abs(w_before - target_weights)
    g = jnp.where(toward, tax * dev_b, -0.5 * tax * (dev_b + dev_a))
    return jnp.where(w_after == w_before, jnp.zeros_like(g), g)


def glp_discount(
    prices: Float[Array, " n"],
    target_weights: Float[Array, " n"],
    reserves: Float[Array, " n"],
    delta: Float[Array, " n"],
    base: Float[ArrayLike, ""],
    tax: Float[ArrayLike, ""],
) -> Float[Array, ""]:
    """GLP discount, eq. 11 as printed: F = max(0, γ_b + max_i G_i(w(p, R), w(p, R + δ), w*)).

    **Arguments:** `prices`, `target_weights` (w*, sums to 1), `reserves` (R), `delta` (the
    LP's change to the reserves), all shape `(n,)`; `base` (γ_b) and `tax` (γ_t) scalars.
    **Returns:** F, a scalar.

    As printed this breaks the paper's own axiom F(p, w*, R, 0) = 0: at δ = 0 every G_i is 0,
    so F = γ_b > 0. It is also never negative (the outer max(0, ·)), so it never charges a
    fee, and it is bounded below by γ_b on every trade that moves a weight toward w*: creation
    arbitrage (eq. 7) is then unbounded along a deposit at the target mix. See
    `glp_discount_axiomatic` for a version with F(0) = 0.
    """
    w_b = _safe_weights(prices, reserves)
    w_a = _safe_weights(prices, reserves + delta)
    g = glp_g(w_b, w_a, target_weights, tax)
    return jnp.maximum(base + jnp.max(g), 0.0)


def glp_discount_axiomatic(
    prices: Float[Array, " n"],
    target_weights: Float[Array, " n"],
    reserves: Float[Array, " n"],
    delta: Float[Array, " n"],
    base: Float[ArrayLike, ""],
    tax: Float[ArrayLike, ""],
) -> Float[Array, ""]:
    """Eq. 11 with its signs fixed and measured from the zero trade: F = min(γ_b, max_i G_i).

    GMX charges fee = max(base − rebate, 0) on a trade that improves balance and base + tax
    on one that does not (`gmx_fee_bps`). With G_i = +rebate or −tax as in eq. 11, that fee
    is max(0, γ_b − max_i G_i), so the discount it implies is F_fix = −max(0, γ_b − max_i G_i).
    Eq. 11 prints max(0, γ_b + max_i G_i): the sign of γ_b and the outer sign are flipped.
    F_fix(0) = −γ_b: the base fee is a flat charge every trade pays, not part of the
    target-weight incentive, so we remove it: F = F_fix(δ) − F_fix(0) = min(γ_b, max_i G_i).

    Properties: F(0) = 0 (the paper's first axiom); F > 0 for trades that move some weight
    toward w* (the rebate, capped at γ_b as GMX floors the fee at 0); F < 0 (the tax,
    uncapped) for trades that move every weight away. It is not concave, and its argmax is
    not unique (the rebate depends on w^b only), so the other two axioms cannot hold for any
    function of this piecewise form. The other simple repair, F_printed(δ) − F_printed(0) =
    max(−γ_b, max_i G_i), was rejected: it caps the *tax* at γ_b, so a trade far from target
    pays no more than a small one, which is the reverse of GMX.

    Arguments and return as `glp_discount`.
    """
    w_b = _safe_weights(prices, reserves)
    w_a = _safe_weights(prices, reserves + delta)
    g = glp_g(w_b, w_a, target_weights, tax)
    return jnp.minimum(jnp.max(g), base)


def glp_discount_smooth(
    prices: Float[Array, " n"],
    target_weights: Float[Array, " n"],
    reserves: Float[Array, " n"],
    delta: Float[Array, " n"],
    base: Float[ArrayLike, ""],
    tax: Float[ArrayLike, ""],
    temperature: Float[ArrayLike, ""],
) -> Float[Array, ""]:
    """Smooth eq. 11 (as printed): F_τ → `glp_discount` as τ → 0 away from kinks.

    The temperature τ is in weight units. Relaxations: |x| → √(x² + τ²) (error ≤ τ); the
    branch |w^a − w*| < |w^b − w*| → a sigmoid of the difference over τ; max_i →
    τ_F·logsumexp(·/τ_F) (error ≤ τ_F log n) and max(0, ·) → τ_F·softplus(·/τ_F) (error
    ≤ τ_F log 2), with τ_F = τ·γ_t, since a weight change of τ moves G by about γ_t·τ/w*.
    The "w^a = w^b → 0" case needs no gate: at δ = 0 the branch weight is exactly 1/2 and
    the blend ½·rebate − ½·tax = ½γ_t dev_b − ½γ_t dev_b is 0, so F_τ(0) ≈ γ_b. The blend
    also gives ∇_δ F_τ(0) ≈ γ_t dev_b/(2τ)·∇(|w^b − w*| − |w^a − w*|): a subgradient that
    points toward w* (eq. 11 itself has none), which `discount_subgradient` can use.
    Gradients are finite everywhere (τ > 0). Kinks of the exact function (where the error
    does not vanish with τ): δ = 0, |w^a − w*| = |w^b − w*|, γ_b + max G = 0, and ties in the
    max (error τ_F log k for k tied assets).

    Arguments as `glp_discount`, plus `temperature` (τ > 0). **Returns:** a scalar.
    """
    w_b = _safe_weights(prices, reserves)
    w_a = _safe_weights(prices, reserves + delta)
    abs_b = _soft_abs(w_b - target_weights, temperature)
    abs_a = _soft_abs(w_a - target_weights, temperature)
    toward = jax.nn.sigmoid((abs_b - abs_a) / temperature)
    dev_b = abs_b / target_weights
    dev_a = abs_a / target_weights
    g = toward * tax * dev_b - (1.0 - toward) * 0.5 * tax * (dev_b + dev_a)
    tau_f = temperature * tax
    g_max = tau_f * jax.nn.logsumexp(g / tau_f)
    return _soft_relu(base + g_max, tau_f)


# --------------------------------------------------------------------------- GMX v1 fees


def gmx_fee_bps(
    initial_amount: ArrayLike,
    delta: ArrayLike,
    target_amount: ArrayLike,
    base_bps: ArrayLike,
    tax_bps: ArrayLike,
    increment: Bool[ArrayLike, "*b"],
    dynamic: Bool[ArrayLike, ""] = True,
) -> Int[Array, "*b"]:
    """GMX v1 `VaultUtils.getFeeBasisPoints`, in integer basis points with floor division.

    With `dynamic` off or T = 0 the fee is the base. Else, with I the token's USDG amount,
    Δ ≥ 0 the trade size, N = I + Δ (`increment`) or max(I − Δ, 0), d0 = |I − T| and
    d1 = |N − T|: if d1 < d0 (the trade improves balance) the fee is max(base − ⌊tax·d0/T⌋, 0),
    else base + ⌊tax·min(⌊(d0 + d1)/2⌋, T)/T⌋.

    **Arguments:** `initial_amount` (I), `delta` (Δ ≥ 0), `target_amount` (T): USDG amounts,
    floored to whole USDG (the contract keeps 18 decimals; whole units change a fee by at most
    1 bp near a floor boundary). `base_bps`, `tax_bps`: integers; float bps are rounded to
    the nearest integer (a rate × 1e4 can land a hair below it). `increment`: True for a
    deposit (mint, or the token going into a swap). All broadcast elementwise.
    **Returns:** the fee in bps, int64 under x64, else int32.

    **Exactness:** equal to the integer formula (the contract's uint256 arithmetic) for every
    amount in [0, 2⁵⁸] whole USDG (about 2.9e17) and bps in [0, 32767], in float32 and
    float64 modes alike, with identical results in both. The inputs are taken as given: a
    float32 amount above 2²⁴ has already been rounded to a float32 value (relative spacing
    2⁻²³ to 2⁻²⁴: 32 USDG at 5e8) before it gets here, and that value's integer is used.
    Python and NumPy integers are split on the host without loss even with x64 off (a NumPy
    int64 passed as a `jax.jit` argument is wrapped to int32 by JAX first). Out of range:
    negative or NaN amounts count as 0, amounts above 2⁵⁸ as 2⁵⁸, tax above 32,767 bps as
    32,767.
    """
    i_amt, d_amt, t_amt = _limbs(initial_amount), _limbs(delta), _limbs(target_amount)
    base = _to_bps(base_bps)
    tax = jnp.clip(_to_bps(tax_bps), 0, _MAX_BPS).astype(jnp.int32)
    below, under = _sub(i_amt, d_amt)
    next_amt = _where(increment, _add(i_amt, d_amt), _where(under, (0, 0), below))
    has_target = (t_amt[0] != 0) | (t_amt[1] != 0)
    one = (jnp.where(has_target, t_amt[0], 1), t_amt[1])  # T, or 1 where T = 0
    d0 = _abs_diff(i_amt, t_amt)
    d1 = _abs_diff(next_amt, t_amt)
    improves = _less(d1, d0)
    avg = _half(_add(d0, d1))
    capped = _where(_less(t_amt, avg), t_amt, avg)
    # One division serves both branches: ⌊tax·d0/T⌋ (rebate) or ⌊tax·min(avg, T)/T⌋ (tax).
    k = _mul_div_floor(tax, _where(improves, d0, capped), one).astype(base.dtype)
    fee = jnp.where(improves, jnp.maximum(base - k, 0), base + k)
    return jnp.where(jnp.asarray(dynamic) & has_target, fee, base)


def gmx_fee_bps_smooth(
    initial_amount: Float[ArrayLike, "*b"],
    delta: Float[ArrayLike, "*b"],
    target_amount: Float[ArrayLike, "*b"],
    base_bps: Float[ArrayLike, "*b"],
    tax_bps: Float[ArrayLike, "*b"],
    increment: Bool[ArrayLike, "*b"],
    temperature: Float[ArrayLike, ""],
    dynamic: Bool[ArrayLike, ""] = True,
) -> Float[Array, "*b"]:
    """Smooth float `gmx_fee_bps`: no floors, smooth |·|, max, min and branch.

    Work in units of the target: x = I/T, y = N/T, so τ is dimensionless (a fraction of the
    target amount). |·| → √(·² + τ²); max(I − Δ, 0) → τ-softplus; the branch d1 < d0 →
    sigmoid((d0 − d1)/τ); max(base − rebate, 0) → softplus at τ·tax bps; min(avg, 1) → a
    softplus-min. As τ → 0 this tends, away from kinks (d0 = d1, I = T, N = T, rebate = base,
    avg = T, I = Δ on a withdrawal), to the real-valued formula; it differs from the exact
    integer fee by less than 1 bp from the floors plus O(τ). **Returns:** float bps.
    """
    i_amt = jnp.asarray(initial_amount)
    fdt = i_amt.dtype if jnp.issubdtype(i_amt.dtype, jnp.floating) else _float_dtype()
    i_amt = i_amt.astype(fdt)
    d_amt = jnp.asarray(delta, fdt)
    t_amt = jnp.asarray(target_amount, fdt)
    base = jnp.asarray(base_bps, fdt)
    tax = jnp.asarray(tax_bps, fdt)
    tau = jnp.asarray(temperature, fdt)
    has_target = t_amt > 0
    safe_t = jnp.where(has_target, t_amt, 1.0)
    x = i_amt / safe_t
    dx = d_amt / safe_t
    y = jnp.where(increment, x + dx, _soft_relu(x - dx, tau))
    d0 = _soft_abs(x - 1.0, tau)
    d1 = _soft_abs(y - 1.0, tau)
    tau_bps = tau * tax
    improving = _soft_relu(base - tax * d0, tau_bps)
    avg = 0.5 * (d0 + d1)
    capped = avg - _soft_relu(avg - 1.0, tau)  # min(avg, 1)
    worsening = base + tax * capped
    s = jax.nn.sigmoid((d0 - d1) / tau)
    fee = s * improving + (1.0 - s) * worsening
    return jnp.where(jnp.asarray(dynamic) & has_target, fee, base)


def mint_fee_bps(
    usdg_amount: ArrayLike,
    usdg_delta: ArrayLike,
    target_amount: ArrayLike,
    *,
    mint_burn_bps: ArrayLike = MINT_BURN_BPS,
    tax_bps: ArrayLike = TAX_BPS,
    dynamic: Bool[ArrayLike, ""] = True,
) -> Int[Array, "*b"]:
    """GLP mint with a token (`getBuyUsdgFeeBasisPoints`): base = mint/burn, the token increments.

    GMX uses `taxBasisPoints` here for stablecoins too (the stable tax is for swaps only).
    """
    return gmx_fee_bps(
        usdg_amount, usdg_delta, target_amount, mint_burn_bps, tax_bps, True, dynamic
    )


def burn_fee_bps(
    usdg_amount: ArrayLike,
    usdg_delta: ArrayLike,
    target_amount: ArrayLike,
    *,
    mint_burn_bps: ArrayLike = MINT_BURN_BPS,
    tax_bps: ArrayLike = TAX_BPS,
    dynamic: Bool[ArrayLike, ""] = True,
) -> Int[Array, "*b"]:
    """GLP burn into a token (`getSellUsdgFeeBasisPoints`): base = mint/burn, token decrements."""
    return gmx_fee_bps(
        usdg_amount, usdg_delta, target_amount, mint_burn_bps, tax_bps, False, dynamic
    )


def swap_fee_bps(
    usdg_in: ArrayLike,
    usdg_out: ArrayLike,
    usdg_delta: ArrayLike,
    target_in: ArrayLike,
    target_out: ArrayLike,
    *,
    stable_swap: Bool[ArrayLike, ""] = False,
    swap_bps: ArrayLike = SWAP_BPS,
    stable_swap_bps: ArrayLike = STABLE_SWAP_BPS,
    tax_bps: ArrayLike = TAX_BPS,
    stable_tax_bps: ArrayLike = STABLE_TAX_BPS,
    dynamic: Bool[ArrayLike, ""] = True,
) -> Int[Array, "*b"]:
    """Swap fee (`getSwapFeeBasisPoints`): the larger of the two legs' fees.

    The token in increments by `usdg_delta`, the token out decrements by it. A swap between
    two stablecoins (`stable_swap`) uses the stable base (1 bp) and stable tax (5 bp).
    """
    base = jnp.where(stable_swap, _to_bps(stable_swap_bps), _to_bps(swap_bps))
    tax = jnp.where(stable_swap, _to_bps(stable_tax_bps), _to_bps(tax_bps))
    fee_in = gmx_fee_bps(usdg_in, usdg_delta, target_in, base, tax, True, dynamic)
    fee_out = gmx_fee_bps(usdg_out, usdg_delta, target_out, base, tax, False, dynamic)
    return jnp.maximum(fee_in, fee_out)


def gmx_discount(
    prices: Float[Array, " n"],
    target_weights: Float[Array, " n"],
    reserves: Float[Array, " n"],
    delta: Float[Array, " n"],
    *,
    mint_burn_bps: ArrayLike = MINT_BURN_BPS,
    tax_bps: ArrayLike = TAX_BPS,
    dynamic: Bool[ArrayLike, ""] = True,
    temperature: float | Float[Array, ""] | None = None,
) -> Float[Array, ""]:
    """GMX v1 mint/burn fees as a discount F(p, w*, R, δ) = −fee/10⁴.

    Each asset is a separate GLP mint (δ_i > 0) or burn (δ_i < 0) of USDG size |p_i δ_i|,
    with I_i = p_i R_i and T_i = w*_i pᵀR (`getTargetUsdgAmount` with pᵀR as USDG supply);
    amounts are in whole numéraire units. Across assets the fee is **value-weighted by gross
    traded value**: F = −Σ_i fee_i |p_i δ_i| / (10⁴ Σ_i |p_i δ_i|), so for a pure deposit
    F·pᵀδ is minus the total fee paid, as eq. 7 needs. F = 0 at δ = 0 by convention; along
    any direction F tends to −(a positive fee) as δ → 0, so F is discontinuous at 0 and has
    no (sub)gradient there. GMX fees are never negative, so F ≤ 0: the real mechanism never
    pays a positive discount, and creation arbitrage (eq. 7) with deposits is never
    profitable against it alone. `temperature` None uses the exact integer fee; a float
    uses `gmx_fee_bps_smooth` at that temperature. **Returns:** a scalar.
    """
    usdg = prices * reserves
    target = target_weights * fixed_sum(usdg)
    trade = prices * delta
    size = jnp.abs(trade)
    increment = trade >= 0
    if temperature is None:
        fee = gmx_fee_bps(usdg, size, target, mint_burn_bps, tax_bps, increment, dynamic)
        fee = fee.astype(size.dtype)
    else:
        fee = gmx_fee_bps_smooth(
            usdg, size, target, mint_burn_bps, tax_bps, increment, temperature, dynamic
        )
    gross = fixed_sum(size)
    safe = jnp.where(gross > 0, gross, 1.0)
    return -fixed_sum(fee * size) / (BASIS_POINTS * safe)


# --------------------------------------------------------------------------- surrogate


class QuadraticSurrogate(eqx.Module):
    """h(δ) = gᵀδ − μ/2 ‖δ‖² (§3.3), an upper bound on a μ-strongly concave F with F(0) = 0.

    Its maximiser is δ_H = g/μ (the paper writes "δ_H = min_δ h(δ)"; it means argmax).
    """

    g: Float[Array, " n"]
    mu: Float[Array, ""]

    def __call__(self, delta: Float[Array, " n"]) -> Float[Array, ""]:
        return fixed_sum(self.g * delta) - 0.5 * self.mu * fixed_sum(delta * delta)

    @property
    def argmax(self) -> Float[Array, " n"]:
        """δ_H = g/μ, shape `(n,)`."""
        return self.g / self.mu


def quadratic_surrogate(g: Float[ArrayLike, " n"], mu: Float[ArrayLike, ""]) -> QuadraticSurrogate:
    """The surrogate h for subgradient `g` ∈ ∂F(0) and strong-concavity modulus `mu`."""
    g = jnp.asarray(g)
    return QuadraticSurrogate(g=g, mu=jnp.asarray(mu, g.dtype))


def discount_subgradient(
    F: Callable[[Float[Array, " n"]], Float[Array, ""]],
    num_assets: int,
    dtype=None,
    *,
    eps: float | None = None,
) -> Float[Array, " n"]:
    """g = ∇_δ F at δ = 0, for F: δ ↦ discount (a closure over p, w*, R).

    With `eps` None, g = jax.grad(F)(0): right for a smooth F (`glp_discount_smooth`, a
    strongly concave model F). With `eps` > 0, one-sided forward differences
    (F(ε e_i) − F(0))/ε, for a black-box or piecewise F (the paper's arbitrageur only
    queries F). For eq. 11 and the GMX fee, F jumps at δ = 0 (the zero-trade case and the
    base fee), so the difference grows like (jump)/ε and is no subgradient; use a smooth F
    (whose gradient at 0 then grows like 1/τ, the same jump seen at temperature τ).
    **Returns:** shape `(num_assets,)`.
    """
    zero = jnp.zeros((num_assets,), dtype)
    if eps is None:
        return jax.grad(F)(zero)
    f0 = F(zero)
    basis = jnp.eye(num_assets, dtype=zero.dtype) * eps
    return (jax.vmap(F)(basis) - f0) / eps
