"""Warnings about results that cannot be what the user meant (issue 14).

Each is one line, printed on stderr as `warning: ...` and listed in `summary.json` under
`warnings`. `config_warnings` runs before anything compiles: keys the chosen settings ignore
(`config.ignored_keys`) and a median leverage above the leverage cap. `result_warnings` runs
on the per-pool metrics: pools whose LP share price (or the hedged LP's wealth) ended more
than 100× above or below 1% of its start, pools that rejected more than 99% of their trades,
and masked pools.
"""

from __future__ import annotations

import sys

import numpy as np

from .config import Config, resolve_dynamic

__all__ = [
    "config_warnings",
    "result_warnings",
    "emit",
    "GROWTH_LIMITS",
    "REJECTED_LIMIT",
]

GROWTH_LIMITS = (0.01, 100.0)  # final / initial value outside this is reported
REJECTED_LIMIT = 0.99  # share of trades rejected above this is reported


def config_warnings(cfg: Config) -> list[str]:
    """Warnings decidable from the config alone (cheap: no data, no compile)."""
    out = list(cfg.warnings)
    if cfg.pool.mode == "pdlp":
        values, _ = resolve_dynamic(cfg)
        lev = values["market"]["leverage"]
        cap = values["market"]["max_leverage"]
        over = lev > cap
        if np.any(over):
            i = int(np.argmax(lev / cap))
            out.append(
                f"market.leverage: the median leverage of new trades is above "
                f"market.max_leverage in {int(np.sum(over))} of {lev.size} pools (pool {i}: "
                f"{lev[i]:g} > {cap[i]:g}), so most trades will be rejected"
            )
    return out


def _growth(metrics: dict, key: str, who: str) -> str | None:
    if key not in metrics:
        return None
    factor = 1.0 + np.asarray(metrics[key], float)
    lo, hi = GROWTH_LIMITS
    bad = np.isfinite(factor) & ((factor > hi) | (factor < lo))
    if not np.any(bad):
        return None
    size = np.abs(np.log(np.maximum(factor, 1e-300)))
    i = int(np.argmax(np.where(bad, size, -np.inf)))
    return (
        f"{int(np.sum(bad))} of {factor.size} pools: the {who} ended more than {hi:g}x above "
        f"or below {lo:.0%} of its start (worst: pool {i}, {factor[i]:.4g}x its start); "
        "check the config"
    )


def _rejections(metrics: dict) -> str | None:
    if "opened" not in metrics or "rejected" not in metrics:
        return None
    opened = np.asarray(metrics["opened"], float)
    rejected = np.asarray(metrics["rejected"], float)
    # `opened` counts crowds written (one per request that got anything) and `rejected` the
    # refused fractions of requests, so rejected / (opened + rejected) is about the share of
    # requested traders refused.
    tried = opened + rejected
    share = np.where(tried > 0, rejected / np.where(tried > 0, tried, 1.0), 0.0)
    bad = np.isfinite(share) & (share > REJECTED_LIMIT)
    if not np.any(bad):
        return None
    i = int(np.argmax(np.where(bad, share, -np.inf)))
    return (
        f"{int(np.sum(bad))} of {share.size} pools rejected more than {REJECTED_LIMIT:.0%} of "
        f"their trades (worst: pool {i}, {rejected[i]:.0f} requests rejected, "
        f"{opened[i]:.0f} crowds opened); check "
        "market.leverage against market.max_leverage, and pool.max_utilisation"
    )


def result_warnings(metrics: dict, masked: int = 0) -> list[str]:
    """Warnings about per-pool `metrics` (arrays over pools; masked pools are NaN).

    **Arguments:**
    - `metrics`: the run's metrics, each of shape `(num_pools,)`.
    - `masked`: how many pools broke a guard and were masked.
    """
    num_pools = next(iter(metrics.values())).size if metrics else 0
    out = []
    if masked:
        out.append(
            f"{masked} of {num_pools} pools broke a guard and were masked (left out of every "
            "metric; summary.json lists them under masked_pools)"
        )
    for key, who in (("total_return", "LP share price"), ("hedged_total_return", "hedged LP")):
        line = _growth(metrics, key, who)
        if line:
            out.append(line)
    line = _rejections(metrics)
    if line:
        out.append(line)
    return out


def emit(warnings: list[str]) -> None:
    """Print each warning as one `warning: ...` line on stderr (even with --quiet)."""
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr, flush=True)
