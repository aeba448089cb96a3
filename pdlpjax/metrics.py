"""LP return statistics accumulated online inside the scan, and batch summaries.

`ReturnStats` is updated once per step with the LP share price's simple return; nothing of
length `num_steps` is stored. The 5% CVaR keeps the largest losses seen so far in a
buffer of `worst_capacity(num_steps)` ≥ ceil(0.05 · num_steps) (replace-the-smallest,
O(capacity) per step) and averages the worst ceil(0.05 · count) of them at the end, so it
is the exact empirical CVaR of the per-step returns, not an approximation. The capacity is
rounded up to a multiple of 16 so that the compiled programs depend on the horizon only in
steps of 320: runs of up to 320 steps share one state shape.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ._numerics import fixed_sum

__all__ = [
    "ReturnStats",
    "init_stats",
    "update_stats",
    "finalize_stats",
    "num_worst_for",
    "worst_capacity",
    "mean_ci",
    "CVAR_LEVEL",
]

CVAR_LEVEL = 0.05


def num_worst_for(num_steps: int, level: float = CVAR_LEVEL) -> int:
    """How many worst returns the CVaR at `level` averages over `num_steps` returns."""
    return max(1, math.ceil(level * num_steps))


def worst_capacity(num_steps: int) -> int:
    """Length of the CVaR buffer for a horizon of `num_steps`: `num_worst_for(num_steps)`
    rounded up to a multiple of 16 (see the module docstring)."""
    return 16 * -(-num_worst_for(num_steps) // 16)


def _num_worst(count: Float[Array, "*b"]) -> Int[Array, "*b"]:
    """`num_worst_for(count)` in integer arithmetic: ceil(5·n / 100), at least 1 (equal to
    the float formula for every n below 10⁵, checked)."""
    n = count.astype(jnp.int32)
    return jnp.maximum((5 * n + 99) // 100, 1)


class ReturnStats(eqx.Module):
    """Welford mean/variance, running peak and drawdown, and the worst returns (one pool)."""

    count: Float[Array, ""]
    mean: Float[Array, ""]
    m2: Float[Array, ""]
    initial_value: Float[Array, ""]
    value: Float[Array, ""]
    peak: Float[Array, ""]
    max_drawdown: Float[Array, ""]
    worst_losses: Float[Array, " m"]  # the m largest −return so far, unordered; −inf = empty


def init_stats(value: Float[Array, ""], num_worst: int) -> ReturnStats:
    """Empty statistics for a series starting at `value` (a share price)."""
    zero = jnp.zeros_like(value)
    return ReturnStats(
        count=zero,
        mean=zero,
        m2=zero,
        initial_value=value,
        value=value,
        peak=value,
        max_drawdown=zero,
        worst_losses=jnp.full((num_worst,), -jnp.inf, dtype=value.dtype),
    )


def update_stats(stats: ReturnStats, value: Float[Array, ""]) -> ReturnStats:
    """Add one step: the share price moved from `stats.value` to `value`."""
    r = value / stats.value - 1.0
    count = stats.count + 1.0
    delta = r - stats.mean
    mean = stats.mean + delta / count
    m2 = stats.m2 + delta * (r - mean)
    peak = jnp.maximum(stats.peak, value)
    drawdown = 1.0 - value / peak
    i = jnp.argmin(stats.worst_losses)
    worst = stats.worst_losses.at[i].set(jnp.maximum(stats.worst_losses[i], -r))
    return ReturnStats(
        count=count,
        mean=mean,
        m2=m2,
        initial_value=stats.initial_value,
        value=value,
        peak=peak,
        max_drawdown=jnp.maximum(stats.max_drawdown, drawdown),
        worst_losses=worst,
    )


def finalize_stats(stats: ReturnStats, steps_per_year: float) -> dict[str, Array]:
    """Per-pool metrics (works on batched stats: every leaf has a leading pool axis).

    **Returns:** dict of arrays: `ann_mean` (mean simple return × steps per year), `ann_vol`
    (sd × √steps per year), `sharpe` (ann_mean / ann_vol, risk-free rate 0, NaN when the vol
    is 0), `max_drawdown` (fraction of the running peak), `cvar_5` (mean of the worst 5% of
    per-step returns, a return, so negative is a loss), `total_return`.
    """
    var = stats.m2 / jnp.maximum(stats.count - 1.0, 1.0)
    ann_mean = stats.mean * steps_per_year
    ann_vol = jnp.sqrt(var * steps_per_year)
    sharpe = jnp.where(ann_vol > 0, ann_mean / jnp.where(ann_vol > 0, ann_vol, 1.0), jnp.nan)
    # The worst ceil(0.05 · count) of the buffer (largest losses first; −inf = empty).
    losses = -jnp.sort(-stats.worst_losses, axis=-1)
    rank = jnp.arange(losses.shape[-1])
    use = jnp.isfinite(losses) & (rank < _num_worst(stats.count)[..., None])
    n_used = jnp.maximum(jnp.sum(use, axis=-1), 1)
    cvar = -fixed_sum(jnp.where(use, losses, 0.0), axis=-1) / n_used
    return {
        "ann_mean": ann_mean,
        "ann_vol": ann_vol,
        "sharpe": sharpe,
        "max_drawdown": stats.max_drawdown,
        "cvar_5": cvar,
        "total_return": stats.value / stats.initial_value - 1.0,
    }


def mean_ci(x: np.ndarray, z: float = 1.96) -> dict[str, float | list[float] | int]:
    """Mean of finite values with a normal-approximation 95% interval (mean ± z·sd/√n).

    **Returns:** `{"mean", "ci95": [lo, hi], "sd", "median", "n"}`; `n` counts finite values.
    """
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return {
            "mean": float("nan"),
            "ci95": [float("nan")] * 2,
            "sd": float("nan"),
            "median": float("nan"),
            "n": 0,
        }
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if n > 1 else 0.0
    half = z * sd / math.sqrt(n)
    return {
        "mean": mean,
        "ci95": [mean - half, mean + half],
        "sd": sd,
        "median": float(np.median(x)),
        "n": n,
    }
