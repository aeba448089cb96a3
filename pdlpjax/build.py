"""From a validated `Config` to the simulation's inputs: params, path model and static spec."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from .config import SECTIONS, Config, ConfigError, replay_time, resolve_dynamic, specs
from .data import DataError, infer_steps_per_year, load_closes, log_returns, replay_row
from .hedge import HedgeParams
from .market import MarketParams
from .metrics import worst_capacity
from .paths import GBM, AbstractPathModel, Bootstrap, Garch, MertonJump, PathParams, Replay
from .pool import PoolParams
from .simulate import Params, SimSpec

__all__ = [
    "make_params",
    "make_model",
    "make_spec",
    "bootstrap_returns",
    "replay_returns",
    "make_block",
]


def make_params(cfg: Config) -> Params:
    """Every dynamic field as an array with a leading pool axis, in the config's dtype."""
    values, _ = resolve_dynamic(cfg)
    dtype = jnp.dtype(cfg.simulation.dtype)

    def section(cls, name):
        return cls(**{k: jnp.asarray(v, dtype) for k, v in values[name].items()})

    return Params(
        market=section(MarketParams, "market"),
        paths=section(PathParams, "paths"),
        pool=section(PoolParams, "pool"),
        hedge=_fixed_damping(cfg, section(HedgeParams, "hedge")),
    )


# `isolated` and `merged` are the fixed rule at γ = 0 and γ = 1. Running them as "fixed" with
# that γ as a value lets every fixed γ share one compiled program (a sweep over the rules,
# the tests), with the same numbers: the rule returns the value it is given.
FIXED_DAMPING = {"isolated": 0.0, "merged": 1.0}


def _fixed_damping(cfg: Config, hedge: HedgeParams) -> HedgeParams:
    gamma = FIXED_DAMPING.get(cfg.hedge.damping_rule)
    if gamma is None:
        return hedge
    return dataclasses.replace(hedge, damping=jnp.full_like(hedge.damping, gamma))


def bootstrap_returns(cfg: Config) -> np.ndarray:
    """Log returns `(T - 1, num_risky)` of the config's assets from `paths.data`.

    The data's spacing must match `simulation.steps_per_year` (within 1%): a daily file
    cannot drive hourly steps without rescaling, which would change its distribution.
    """
    closes = load_closes(
        cfg.paths.data,
        cfg.market.assets,
        max_gap=cfg.paths.max_gap,
        allow_gaps=cfg.paths.allow_gaps,
    )
    _check_spacing(cfg, closes)
    return log_returns(closes)


def replay_returns(cfg: Config) -> np.ndarray:
    """The log returns `(num_steps, num_risky)` that a replay (`paths.replay_start`) plays:
    row k is log(close[s + k + 1] / close[s + k]), s the first data row at or after the start.

    Holes longer than `paths.max_gap` are refused only inside this window (`replay_row`);
    the data's spacing must match `simulation.steps_per_year` as for the bootstrap.
    """
    closes = load_closes(
        cfg.paths.data, cfg.market.assets, max_gap=cfg.paths.max_gap, allow_gaps=True
    )
    _check_spacing(cfg, closes)
    num_steps = cfg.simulation.num_steps
    row = replay_row(closes, replay_time(cfg.paths.replay_start), num_steps, cfg.paths.data)
    window = closes.prices[row : row + num_steps + 1]
    return np.diff(np.log(window), axis=0)


def _check_spacing(cfg: Config, closes) -> None:
    spy = infer_steps_per_year(closes)
    if abs(spy / cfg.simulation.steps_per_year - 1.0) > 0.01:
        raise DataError(
            f"simulation.steps_per_year: the data in {cfg.paths.data} has {spy:g} steps per "
            f"year, expected it to equal simulation.steps_per_year = "
            f"{cfg.simulation.steps_per_year:g}"
        )


def make_model(cfg: Config, returns: np.ndarray | None = None) -> AbstractPathModel:
    """The `[paths]` model. For the bootstrap, `returns` (T, num_risky) defaults to the data;
    with `paths.replay_start`, to the replay's window (`replay_returns`), played from row 0."""
    n, dt, dtype = cfg.num_risky, cfg.dt, cfg.simulation.dtype
    match cfg.paths.model:
        case "gbm":
            return GBM(n, dt, dtype)
        case "jump":
            return MertonJump(n, dt, dtype)
        case "garch":
            return Garch(n, dt, dtype)
        case "bootstrap":
            if returns is None:
                replay = bool(cfg.paths.replay_start)
                returns = replay_returns(cfg) if replay else bootstrap_returns(cfg)
            if returns.ndim != 2 or returns.shape[1] != n:
                raise ConfigError(
                    f"paths.data: expected returns of shape (T, {n}), got {returns.shape}"
                )
            table = jnp.asarray(returns, jnp.dtype(dtype))
            if cfg.paths.replay_start:
                if returns.shape[0] < cfg.simulation.num_steps:
                    raise ConfigError(
                        f"simulation.num_steps: expected at most the replay's "
                        f"{returns.shape[0]} returns, got {cfg.simulation.num_steps}"
                    )
                return Replay(n, dt, dtype, returns=table)
            return Bootstrap(n, dt, dtype, returns=table)
    raise ConfigError(f"paths.model: unknown model {cfg.paths.model!r}")


def make_spec(cfg: Config) -> SimSpec:
    """The static settings of the step."""
    return SimSpec(
        num_risky=cfg.num_risky,
        has_numeraire=bool(cfg.market.numeraire),
        mode=cfg.pool.mode,
        num_cohorts=cfg.market.cohorts,
        rebalance=cfg.pool.rebalance,
        steps_per_year=float(cfg.simulation.steps_per_year),
        worst_capacity=worst_capacity(cfg.simulation.num_steps),
        record_every=cfg.output.record_every,
        antithetic=cfg.paths.antithetic,
        identity_tolerance=float(cfg.simulation.identity_tolerance),
        mask_invalid=cfg.simulation.on_invalid == "mask",
        discount=cfg.pool.discount,
        twm_steps=cfg.pool.twm_steps,
        swap_arbitrage=cfg.pool.swap_arbitrage,
        hedge=cfg.hedge.enabled,
        hedge_every=cfg.hedge.every,
        hedge_estimator=cfg.hedge.covariance,
        hedge_window=cfg.hedge.window,
        damping_rule="fixed" if cfg.hedge.damping_rule in FIXED_DAMPING else cfg.hedge.damping_rule,
        coupling=cfg.hedge.coupling,
    )


def make_block(cfg: Config, b: int) -> tuple[Params, SimSpec]:
    """Params and spec of `[[pools]]` block b: a pool over a subset of the market's assets.

    Per-asset `[market]` and `[hedge]` values are those of the block's assets, the target
    weights are the block's (default equal over its assets and the numéraire), and `[paths]`
    stays the whole market's: every block runs the same path model on the same draws, so the
    pools share one market. Traders draw from their own stream per block.
    """
    block = cfg.pools[b]
    idx = [cfg.market.assets.index(a) for a in block.assets]
    values, _ = resolve_dynamic(cfg)
    dtype = jnp.dtype(cfg.simulation.dtype)
    num_pools = cfg.simulation.num_pools

    def section(cls, name):
        out = {}
        for key, arr in values[name].items():
            spec = specs(SECTIONS[name])[key]
            if name != "paths" and spec.length == "risky":
                arr = arr[:, idx]
            out[key] = jnp.asarray(arr, dtype)
        return cls(**out)

    pool = section(PoolParams, "pool")
    m = len(idx) + 1
    w = block.target_weights or (1.0 / m,) * m
    pool = dataclasses.replace(
        pool, target_weights=jnp.asarray(np.broadcast_to(np.asarray(w), (num_pools, m)), dtype)
    )
    params = Params(
        market=section(MarketParams, "market"),
        paths=section(PathParams, "paths"),
        pool=pool,
        hedge=_fixed_damping(cfg, section(HedgeParams, "hedge")),
    )
    spec = dataclasses.replace(
        make_spec(cfg), num_risky=len(idx), market_assets=tuple(idx), stream=b + 1
    )
    return params, spec
