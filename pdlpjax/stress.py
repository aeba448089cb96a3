"""`pdlpjax stress`: trader PnL ÷ pool value over a price-shock × open-interest-skew grid.

Risk reviews of GLP-style and single-token pools report how the traders' PnL, measured
against the pool, moves when prices jump and when the open interest is lopsided. This
module computes that view from the book a config's own simulation ends with:

1. **Starting book.** The config is simulated as `pdlpjax run` would (`simulate`), and every
   pool's *final* state (reserves, prices, open buckets) is the starting book. There is no
   burn-in option yet: the "pool after its warm-up" is the state after
   `simulation.num_steps` steps from an empty book. Pools masked after breaking a guard are
   left out.
2. **Grid.** A price shock s (a fraction: −0.5 is −50%) multiplies every risky price by
   1 + s at once (a common factor), or one asset's only (`asset`); the numéraire stays at 1.
   An open-interest skew k rescales each market's open book so that (L − S)/(L + S) = k in
   notional while L + S is kept: every bucket of a side has its size, notional, margin and
   count scaled by that side's factor (entry prices and leverage are kept). A market with an
   empty side cannot be skewed and is left as it is (counted). k = NaN means "as simulated" (no
   rescaling); the command puts that row first, labelled `sim`.
3. **Each cell** shocks the prices instantaneously (reserves unchanged) and reports per pool
   - `pnl_ratio`: net unrealised trader PnL (traders' view, `market.unrealised_pnl`) ÷ pool
     value pᵀR at the shocked prices (`pool.pool_value`): GMX's PnL-to-pool-value factor,
     here for the whole book against the whole pool. Positive: traders win, the pool owes.
     It is marked before liquidations, every open bucket at the shocked price;
   - `liquidated_count`: crowd-equivalents liquidated (`market.liquidate`: the members whose
     liquidation prices the shock reaches);
   - `liquidated_value`: their notional δ·p at the shocked prices ÷ pool value;
   - `bad_debt`: the losses past their margins (`market.liquidate`) ÷ pool value;
   - `adl`: `pnl_ratio` above a threshold. The engine has no auto-deleveraging: this is a
     threshold test on the ratio, not an ADL simulation.
   and per skew (prices do not change what a book reserves) whether the rescaled book
   reserves more than the pool holds (`over_reserved`): a skewed book is hypothetical, and
   the pool's solvency check might never have let it open.

`stress_grid` is the pure, vectorised core (one jitted program over shocks × skews × pools);
`stress_test` runs a config and writes the results folder: `stress.csv`, `stress.json`,
`config.toml` and one heatmap PNG per metric.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tomli_w
from jaxtyping import Array, Bool, Float

from . import _io, sanity
from .config import Config, ConfigError, config_hash, config_to_dict
from .market import Book, liquidate, reserved, side_sizes, unrealised_pnl
from .pool import pool_value

__all__ = [
    "StressGrid",
    "skew_book",
    "stress_grid",
    "stress_test",
    "DEFAULT_SHOCKS",
    "DEFAULT_SKEWS",
    "ADL_THRESHOLD",
]

DEFAULT_SHOCKS = tuple(round(x, 10) for x in np.linspace(-0.5, 0.5, 11))
DEFAULT_SKEWS = tuple(round(x, 10) for x in np.linspace(-0.8, 0.8, 9))

# The ADL threshold on trader PnL ÷ pool value. GMX v2 calls it MAX_PNL_FACTOR_FOR_ADL and
# sets it per market and side (gmx-io/gmx-synthetics, config/markets.ts, commit 00172c00):
# 45% in its hardhat (test) market config, beside maxPnlFactorForTraders 50% and
# minPnlFactorAfterAdl 40%; its production configs use higher values (baseMarketConfig 100%,
# synthetic markets 55% and 65%, single-token markets 95%). 0.45 is that test default, an
# assumption for a generic pool. GMX applies it to one side's PnL ÷ the value backing that
# side; here it is applied to the net PnL of the whole book ÷ pᵀR.
ADL_THRESHOLD = 0.45


class StressGrid(eqx.Module):
    """What `stress_grid` returns: s shocks, k skews, p pools, r risky markets.

    Ratios are fractions of the pool value pᵀR at the shocked prices.
    """

    pnl_ratio: Float[Array, "s k p"]  # net unrealised trader PnL / pᵀR
    liquidated_count: Float[Array, "s k p"]  # crowd-equivalents liquidated
    liquidated_value: Float[Array, "s k p"]  # their notional δ·p / pᵀR
    bad_debt: Float[Array, "s k p"]  # losses past their margins / pᵀR
    pool_value: Float[Array, "s p"]  # pᵀR at the shocked prices
    over_reserved: Bool[Array, "k p"]  # the rescaled book reserves more than the pool holds
    skewable: Bool[Array, "p r"]  # both sides of the market hold open positions


def skew_book(book: Book, skew: Float[Array, ""]) -> tuple[Book, Bool[Array, " r"]]:
    """Rescale one pool's open book so that every market's (L − S)/(L + S) equals `skew`.

    L and S are the open sizes of the two sides (in tokens, so in notional too: both sides of
    a market share its price); L + S is kept. Each side's buckets have `size`, `notional`,
    `margin` and `count` multiplied by the side's factor, so entry prices and leverage are
    unchanged. A market with an empty side is left as it is, and so is every market when
    `skew` is NaN.
    **Returns:** the book `(r, 2, K)` and whether each market could be skewed `(r,)`.
    """
    sizes = side_sizes(book)  # (r, 2)
    long_size, short_size = sizes[:, 0], sizes[:, 1]
    skewable = (long_size > 0) & (short_size > 0)
    total = long_size + short_size
    use = skewable & jnp.isfinite(skew)
    k = jnp.where(jnp.isfinite(skew), skew, 0.0)
    a_long = jnp.where(use, 0.5 * (1 + k) * total / jnp.where(use, long_size, 1.0), 1.0)
    a_short = jnp.where(use, 0.5 * (1 - k) * total / jnp.where(use, short_size, 1.0), 1.0)
    factor = jnp.stack([a_long, a_short], axis=1)[:, :, None]
    out = eqx.tree_at(
        lambda b: (b.size, b.notional, b.margin, b.count),
        book,
        (book.size * factor, book.notional * factor, book.margin * factor, book.count * factor),
    )
    return out, skewable


def _cell(prices, reserves, book: Book, shock, skew, asset: int | None):
    """One pool under one (shock, skew): the per-pool figures of `StressGrid`."""
    r = book.size.shape[0]
    if asset is None:
        factor = jnp.full((r,), 1.0 + shock, prices.dtype)
    else:
        factor = jnp.where(jnp.arange(r) == asset, 1.0 + shock, 1.0).astype(prices.dtype)
    risky = prices[:r] * factor
    shocked = jnp.concatenate([risky, prices[r:]])
    value = pool_value(shocked, reserves)
    book, _ = skew_book(book, skew)
    ratio = unrealised_pnl(book, risky) / value
    done = liquidate(book, risky)
    liq_value = done.notional
    long_tokens, short_value = reserved(book)
    lent = jnp.concatenate([long_tokens, short_value[None]]) if prices.shape[0] > r else long_tokens
    over = jnp.any(lent > reserves[: lent.shape[0]])
    return ratio, done.count, liq_value / value, done.bad_debt / value, value, over


@functools.partial(jax.jit, static_argnames="asset")
def _grid(prices, reserves, book, shocks, skews, asset):
    per_pool = jax.vmap(_cell, in_axes=(0, 0, 0, None, None, None))
    per_skew = jax.vmap(per_pool, in_axes=(None, None, None, None, 0, None))
    per_shock = jax.vmap(per_skew, in_axes=(None, None, None, 0, None, None))
    ratio, count, liq, bad, value, over = per_shock(prices, reserves, book, shocks, skews, asset)
    skewable = jax.vmap(lambda b: skew_book(b, jnp.zeros((), b.size.dtype))[1])(book)
    return StressGrid(ratio, count, liq, bad, value[:, 0], over[0], skewable)


def stress_grid(state, shocks, skews, *, asset: int | None = None) -> StressGrid:
    """Shock and skew a batch of pools; the vectorised core of `pdlpjax stress`.

    `state` is a batched `SimState` (or anything with `.pool`, a `PoolState` whose leaves have
    a leading pool axis p, prices and reserves `(p, n)`, and `.book`, a `Book` of
    `(p, r, 2, K)`), e.g. `simulate(...).state`. `shocks` `(s,)` are relative price moves
    (> −1), applied to every risky asset (`asset=None`) or to risky asset number `asset`
    only. `skews` `(k,)` are target (L − S)/(L + S) in [−1, 1] per market (`skew_book`);
    NaN keeps the book as simulated. Reserves and the numéraire's price do not move.
    One jitted program over s × k × p cells. **Returns:** a `StressGrid` (module docstring).
    """
    pool, book = state.pool, state.book
    prices, reserves = jnp.asarray(pool.prices), jnp.asarray(pool.reserves)
    if prices.ndim != 2 or book.size.ndim != 4:
        raise ValueError(
            f"stress_grid: expected a batched state (prices (p, n), book (p, r, 2, K)), got "
            f"prices {prices.shape} and book {book.size.shape}"
        )
    dtype = prices.dtype
    shocks = jnp.asarray(np.asarray(shocks, float), dtype)
    skews = jnp.asarray(np.asarray(skews, float), dtype)
    book = jax.tree.map(jnp.asarray, book)
    r = book.size.shape[1]
    if asset is not None and not 0 <= asset < r:
        raise ValueError(f"stress_grid: asset {asset} is not one of the {r} risky assets")
    return _grid(prices, reserves, book, shocks, skews, asset)


# ---------------------------------------------------------------------------- the command


def _check_grid(values, name: str, lo: float, hi: float, open_lo: bool) -> tuple[float, ...]:
    """`values` as floats, each finite and in [lo, hi] (or (lo, hi] with `open_lo`)."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"stress {name}: expected numbers, got {values!r}") from None
    if not out:
        raise ConfigError(f"stress {name}: expected at least one value")
    for v in out:
        if not np.isfinite(v) or v > hi or v < lo or (open_lo and v == lo):
            bound = f"({lo:g}, {hi:g}]" if open_lo else f"[{lo:g}, {hi:g}]"
            raise ConfigError(f"stress {name}: {v:g} is outside {bound}")
    return out


def _check_config(cfg: Config, asset: str | None) -> int | None:
    """The risky asset's index (None: all); a `ConfigError` for configs without one book."""
    if cfg.pools:
        raise ConfigError(
            "pdlpjax stress: configs with [[pools]] blocks are not supported yet (stress one "
            "pool over every asset: remove the [[pools]] tables)"
        )
    if cfg.pool.mode != "pdlp":
        raise ConfigError(
            f'pdlpjax stress: pool.mode = "{cfg.pool.mode}" has no traders, so no book to '
            'stress; use pool.mode = "pdlp"'
        )
    if asset is None:
        return None
    if asset in cfg.market.assets:
        return cfg.market.assets.index(asset)
    what = "is not an asset of this config"
    if asset == cfg.market.numeraire:
        what = "is the numéraire (its price is the unit)"
    raise ConfigError(
        f"stress --asset {asset}: {what}; name a risky asset ({', '.join(cfg.market.assets)})"
    )


def _start_summary(state, valid: np.ndarray) -> dict:
    """The starting book: skew, utilisation, open interest and PnL ratio (means over pools)."""
    size = np.asarray(state.book.size, float)[valid]
    entry_value = np.asarray(state.book.notional, float)[valid]
    is_open = np.asarray(state.book.is_open)[valid]
    prices = np.asarray(state.pool.prices, float)[valid]
    reserves = np.asarray(state.pool.reserves, float)[valid]
    r = size.shape[1]
    p = prices[:, :r]
    sides = np.where(is_open, size, 0.0).sum(-1)  # (p, r, 2) tokens
    total = sides.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        market_skew = (sides[..., 0] - sides[..., 1]) / total  # NaN where no open interest
        notional = sides * p[..., None]
        book_skew = (notional[..., 0].sum(-1) - notional[..., 1].sum(-1)) / notional.sum((1, 2))
    value = np.sum(prices * reserves, axis=-1)
    lent = (sides[..., 0] * p).sum(-1) + np.where(is_open, entry_value, 0.0)[:, :, 1].sum((1, 2))
    sign = np.array([1.0, -1.0])[:, None]
    pnl = np.where(is_open, sign * (size * p[..., None, None] - entry_value), 0)
    unskewable = int(np.sum((sides[..., 0] <= 0) | (sides[..., 1] <= 0)))

    def mean(x):
        x = x[np.isfinite(x)]
        return float(x.mean()) if x.size else None

    return {
        "skew_notional_mean": mean(book_skew),
        "skew_per_market_mean": [mean(market_skew[:, j]) for j in range(r)],
        "utilisation_mean": mean(lent / value),
        "open_interest_to_pool_value_mean": mean(notional.sum((1, 2)) / value),
        "pnl_ratio_mean": mean(pnl.sum((1, 2, 3)) / value),
        "unskewable_pool_markets": unskewable,
        "pool_markets": int(size.shape[0] * r),
    }


# CSV columns after shock and skew: (name, field of StressGrid, statistic).
_STATS = (
    ("pnl_ratio_mean", "pnl_ratio", "mean"),
    ("pnl_ratio_p95", "pnl_ratio", "p95"),
    ("bad_debt_mean", "bad_debt", "mean"),
    ("bad_debt_p95", "bad_debt", "p95"),
    ("liquidated_value_mean", "liquidated_value", "mean"),
    ("liquidated_value_p95", "liquidated_value", "p95"),
    ("liquidated_positions_mean", "liquidated_count", "mean"),
)

# Heatmaps: (column, scale, colour bar label, title).
_PLOTS = (
    ("pnl_ratio_mean", 1.0, "trader PnL / pool value pᵀR", "trader PnL ÷ pool value, mean"),
    ("pnl_ratio_p95", 1.0, "trader PnL / pool value pᵀR", "trader PnL ÷ pool value, 95th pct"),
    ("bad_debt_mean", 100.0, "bad debt, % of pool value", "bad debt ÷ pool value (%), mean"),
    (
        "liquidated_value_mean",
        100.0,
        "liquidated notional, % of pool value",
        "liquidated notional ÷ pool value (%), mean",
    ),
    (
        "liquidated_positions_mean",
        1.0,
        "liquidated crowds per pool",
        "liquidated crowds per pool, mean",
    ),
    ("adl_share", 100.0, "pools over the ADL threshold, %", "pools over the ADL threshold (%)"),
)


def _table(grid: StressGrid, valid: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Every column of stress.csv as an (s, k) array, over the valid pools."""
    out = {}
    for name, field, stat in _STATS:
        x = np.asarray(getattr(grid, field), float)[..., valid]
        out[name] = x.mean(-1) if stat == "mean" else np.percentile(x, 95, axis=-1)
    ratio = np.asarray(grid.pnl_ratio, float)[..., valid]
    out["adl_share"] = np.mean(ratio > threshold, axis=-1)
    over = np.asarray(grid.over_reserved)[:, valid].mean(-1)
    out["over_reserved_share"] = np.broadcast_to(over, ratio.shape[:2])
    return out


def _skew_label(k: float) -> str:
    return "sim" if not np.isfinite(k) else f"{k:g}"


def stress_test(
    cfg: Config,
    out_dir: str | Path | None = None,
    *,
    shocks=None,
    skews=None,
    asset: str | None = None,
    adl_threshold: float = ADL_THRESHOLD,
    quiet: bool = False,
) -> Path:
    """Simulate `cfg`, stress every pool's final book, and write the results folder.

    `shocks` (default −0.5, −0.4, …, 0.5) are relative price moves of every risky asset at
    once, or of `asset` (a risky asset's name) only; `skews` (default −0.8, −0.6, …, 0.8) are
    target open-interest skews (L − S)/(L + S) per market; the book as simulated is always
    added as a row `sim`. `adl_threshold` is the PnL-to-pool-value factor the ADL test
    compares with (`ADL_THRESHOLD`). The starting book is the config's state after
    `simulation.num_steps` steps: there is no burn-in option yet.

    Writes into `out_dir` (default `runs/<name>-stress-<time>`, or `output.dir`):
    `stress.csv` (one row per shock × skew cell: mean and 95th percentile over pools of the
    PnL ratio, bad debt and liquidated notional, both ÷ pool value; mean liquidated crowds;
    the share of pools over the ADL threshold; the share whose skewed book reserves more than
    the pool holds), `stress.json` (grid, settings, the starting book's summary, config hash),
    `config.toml` and, with `output.plots`, `stress_<column>.png` heatmaps over (shock, skew).
    **Returns:** the folder. Raises `ConfigError` for configs with `[[pools]]`, passive pools
    or an unknown `asset`, and `SimulationError` if a pool breaks a guard.
    """
    index = _check_config(cfg, asset)
    shocks = _check_grid(DEFAULT_SHOCKS if shocks is None else shocks, "shocks", -1.0, 10.0, True)
    skews = _check_grid(DEFAULT_SKEWS if skews is None else skews, "skews", -1.0, 1.0, False)
    if not np.isfinite(adl_threshold):
        raise ConfigError(f"stress --adl-threshold: expected a number, got {adl_threshold}")
    if cfg.simulation.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    from .build import make_model, make_params, make_spec
    from .results import SimulationError, prepare_out_dir, simulate_config, versions
    from .simulate import InvalidPoolError

    model = make_model(cfg)
    stem = dataclasses.replace(cfg, name=f"{cfg.name}-stress")
    out = prepare_out_dir(stem, out_dir)
    notes = sanity.config_warnings(cfg)
    sanity.emit(notes)
    _io.write_text(out / "config.toml", tomli_w.dumps(config_to_dict(cfg)))
    spec = dataclasses.replace(make_spec(cfg), record_every=0)  # the final state is enough
    wall0 = time.perf_counter()
    try:
        res = simulate_config(cfg, make_params(cfg), model, spec, quiet=quiet)
    except InvalidPoolError as err:
        raise SimulationError(
            f"pool {err.pool}, step {err.step}: a guard broke while simulating the starting "
            "book (pdlpjax run on this config writes a diagnostic snapshot; or set "
            'simulation.on_invalid = "mask")'
        ) from None
    num_pools = cfg.simulation.num_pools
    valid = np.ones(num_pools, bool)
    valid[res.masked] = False
    if not valid.any():
        raise SimulationError(f"all {num_pools} pools broke a guard: no book to stress")
    sim_s = time.perf_counter() - wall0

    grid_skews = (float("nan"), *skews)
    t0 = time.perf_counter()
    grid = jax.block_until_ready(stress_grid(res.state, shocks, grid_skews, asset=index))
    grid_s = time.perf_counter() - t0
    table = _table(grid, valid, adl_threshold)
    columns = [name for name, _, _ in _STATS] + ["adl_share", "over_reserved_share"]
    rows = [
        [f"{s:g}", _skew_label(k), int(valid.sum())]
        + [f"{float(table[c][i, j]):.10g}" for c in columns]
        for i, s in enumerate(shocks)
        for j, k in enumerate(grid_skews)
    ]
    _io.write_csv(out / "stress.csv", ["shock", "skew", "pools", *columns], rows)

    shocked = "every risky asset at once" if asset is None else f"{asset} only"
    start = _start_summary(res.state, valid)
    zero = int(np.argmin(np.abs(np.asarray(shocks))))
    headline = {
        f"shock {shocks[i]:g}, skew sim": {
            c: float(table[c][i, 0]) for c in ("pnl_ratio_mean", "bad_debt_mean", "adl_share")
        }
        for i in sorted({0, zero, len(shocks) - 1})
    }
    summary = {
        "name": cfg.name,
        "config_hash": config_hash(cfg),
        "pools": int(valid.sum()),
        "masked_pools": int(res.masked.size),
        "steps": cfg.simulation.num_steps,
        "seed": cfg.simulation.seed,
        "grid": {
            "shocks": list(shocks),
            "skews": ["sim", *skews],
            "shocked": shocked,
            "asset": asset,
            "shock_meaning": "risky prices times 1 + shock, instantaneous; reserves and the "
            "numéraire unchanged",
            "skew_meaning": "per market, sizes, notionals, margins and counts of each side "
            "rescaled so that "
            "(L - S)/(L + S) = skew in notional with L + S kept (leverage and entry prices "
            "kept); 'sim' = the book as simulated; markets with an empty side are left as "
            "they are",
        },
        "settings": {
            "adl_threshold": adl_threshold,
            "adl_note": "a threshold test of trader PnL / pool value against the threshold, "
            "not an ADL simulation (the engine has no auto-deleveraging)",
            "pnl_ratio": "net unrealised trader PnL (traders' view, before liquidations) / "
            "pool value p'R at the shocked prices (GMX's PnL-to-pool-value factor, for the "
            "whole book and pool)",
            "starting_book": "each pool's final state after simulation.num_steps steps of its "
            "own simulation (no burn-in option yet)",
        },
        "starting_book": start,
        "unskewable_pool_markets": start["unskewable_pool_markets"],
        "headline": headline,
        "columns": {
            "pnl_ratio_*": "trader PnL / pool value (fraction), mean and 95th percentile "
            "over pools",
            "bad_debt_*": "bad debt of the liquidated members / pool value (fraction)",
            "liquidated_value_*": "notional delta*p of the liquidated members / pool value",
            "liquidated_positions_mean": "liquidated crowds per pool",
            "adl_share": "share of pools with pnl_ratio > adl_threshold",
            "over_reserved_share": "share of pools whose rescaled book reserves more than "
            "the pool holds (a hypothetical book)",
        },
        "simulate_seconds": sim_s,
        "grid_seconds": grid_s,
        "versions": versions(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "warnings": notes,
    }
    _io.write_json(out / "stress.json", summary)

    if cfg.output.plots:
        _heatmaps(out, cfg, table, shocks, skews, shocked, int(valid.sum()), adl_threshold)
    if not quiet:
        sim0 = table["pnl_ratio_mean"][:, 0]
        print(
            f"[{cfg.name}] stress: {int(valid.sum())} pools x {len(shocks)} shocks x "
            f"{len(grid_skews)} skews ({shocked}); trader PnL / pool value, as simulated: "
            f"{sim0[0]:+.3f} at {shocks[0]:+.0%}, {sim0[-1]:+.3f} at {shocks[-1]:+.0%}; "
            f"{start['unskewable_pool_markets']} of {start['pool_markets']} pool-markets could "
            f"not be skewed; results in {out}",
            file=sys.stderr,
        )
    return out


def _heatmaps(out, cfg, table, shocks, skews, shocked, pools, threshold) -> None:
    """One heatmap per column over (shock, skew), the rescaled skews only (the `sim` row is
    in stress.csv)."""
    from . import plots

    xs = [100.0 * s for s in shocks]
    for column, scale, cbar, title in _PLOTS:
        values = scale * np.asarray(table[column])[:, 1:].T  # (skews, shocks)
        extra = f", threshold {threshold:g}" if column == "adl_share" else ""
        plots.heatmap(
            out / f"stress_{column}.png",
            values,
            xs,
            list(skews),
            "price shock, % of price",
            "open-interest skew (L−S)/(L+S)",
            f"{cfg.name}: {title}{extra}\n{pools} pools, shock to {shocked}; "
            "book after the config's simulation",
            cbar=cbar,
        )
