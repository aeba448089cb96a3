"""Typed experiment configuration: load TOML, apply `section.key=value` overrides, validate.

A config is a tree of frozen dataclasses, one per TOML section. Every field carries a `Spec`
saying whether it is *static* (a Python value that fixes shapes, counts or control flow; a new
value means a new compile) or *dynamic* (a float leaf of the parameter pytree; it may differ per
pool and may be differentiated; a new value never recompiles).

A dynamic field may be given three ways:
- one value shared by every pool: `vols = [0.6, 0.8]`;
- one value per pool, a list one level deeper than the field: `fee = [0.001, 0.002, ...]`
  (exactly `simulation.num_pools` entries), `vols = [[0.6, 0.8], [0.5, 0.9], ...]`;
- a grid: `fee = { grid = [0.001, 0.002] }` or `fee = { linspace = [0.0, 0.01, 5] }`. All grid
  fields combine as a Cartesian product; the pools are split into equal contiguous blocks, one
  block per combination (`num_pools` must be a multiple of the number of combinations).

All checks run before anything is compiled; a failure raises `ConfigError` whose message is one
line naming the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ConfigError",
    "Config",
    "MarketConfig",
    "PathsConfig",
    "PoolConfig",
    "SimulationConfig",
    "OutputConfig",
    "HedgeConfig",
    "SweepConfig",
    "PoolBlock",
    "CalibrateConfig",
    "FreeParam",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "config_hash",
    "resolve_dynamic",
    "apply_overrides",
    "PATH_MODELS",
    "replay_time",
]

PATH_MODELS = ("gbm", "jump", "garch", "bootstrap")
COVARIANCE_ESTIMATORS = ("model", "window", "ewma", "shrinkage")
DAMPING_RULES = ("fixed", "gamma_star", "binary", "isolated", "merged")


class ConfigError(ValueError):
    """A config (or its data) is invalid. `str(err)` is one line naming the key."""

    def __init__(self, message: str) -> None:
        # User text (keys, paths) may hold line breaks; keep the message on one line.
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


@dataclass(frozen=True)
class Spec:
    """How one config field is checked and used.

    `rank` is the rank of one pool's value (0 scalar, 1 vector, 2 matrix); `length` names
    what a vector's length must match: "risky" (the risky assets) or "assets" (all assets,
    the numéraire included). `broadcast` lets a scalar stand for a constant vector.
    """

    kind: str = "static"  # "static" | "dynamic"
    type: type = float
    rank: int = 0
    length: str | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | None = None
    broadcast: bool = False
    optional: bool = False  # None allowed (means "use the documented default")
    doc: str = ""


def _f(default: Any, **kw: Any) -> Any:
    return field(default=default, metadata={"spec": Spec(**kw)})


def _dyn(default: Any, **kw: Any) -> Any:
    return field(default=default, metadata={"spec": Spec(kind="dynamic", type=float, **kw)})


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class MarketConfig:
    """`[market]`: the assets traded and the pool's numéraire."""

    assets: tuple = _f(("BTC", "ETH"), type=str, rank=1, doc="names of the risky assets")
    numeraire: str = _f(
        "USDC", type=str, doc='name of a stable numéraire asset with price 1 ("" for none)'
    )
    initial_prices: Any = _dyn(
        1.0,
        rank=1,
        length="risky",
        lo=0.0,
        lo_open=True,
        broadcast=True,
        doc="price of each risky asset at t=0, in numéraire",
    )
    cohorts: int = _f(
        16, type=int, lo=1, hi=4096, doc="K, position buckets per market and side (the book)"
    )
    funding_kappa: Any = _dyn(1.0e-4, lo=0.0, doc="κ of the funding rate (eq. 2), per step")
    funding_cap: Any = _dyn(1.0e-3, lo=0.0, hi=1.0, doc="cap on |funding rate| per step")
    open_rate: Any = _dyn(
        0.001,
        rank=1,
        length="risky",
        lo=0.0,
        hi=1.0,
        broadcast=True,
        doc="new notional per step and side, fraction of pool value, per market",
    )
    mean_holding: Any = _dyn(
        48.0, lo=1.0, doc="mean holding time in steps (1/mean_holding of the book exits per step)"
    )
    leverage: Any = _dyn(5.0, lo=1.0, doc="median leverage of new crowds of traders")
    leverage_vol: Any = _dyn(0.5, lo=0.0, hi=5.0, doc="sd of log leverage, crowd to crowd")
    leverage_spread: Any = _dyn(
        0.5,
        lo=0.0,
        hi=1.0,
        hi_open=True,
        doc="w: within a crowd, margin fractions are uniform on (1 ± w)/leverage",
    )
    max_leverage: Any = _dyn(50.0, lo=1.0, doc="collateral condition (eq. 1): leverage cap")
    fee_elasticity: Any = _dyn(1.0, lo=0.0, doc="demand × exp(−elasticity × fee × steps_per_year)")
    momentum: Any = _dyn(0.3, lo=-5.0, hi=5.0, doc="log-demand tilt per sd of the last return")
    noise_vol: Any = _dyn(0.5, lo=0.0, hi=5.0, doc="sd of log demand of noise traders")
    arb_leverage: Any = _dyn(
        3.0, lo=0.0, doc="leverage of the funding-rate arbitrageur (0: no arbitrageur)"
    )


@dataclass(frozen=True)
class PathsConfig:
    """`[paths]`: the price path model (annualised parameters; per step via dt)."""

    model: str = _f("gbm", type=str, choices=PATH_MODELS, doc="gbm | jump | garch | bootstrap")
    drifts: Any = _dyn(
        0.0,
        rank=1,
        length="risky",
        lo=-5.0,
        hi=5.0,
        broadcast=True,
        doc="annualised expected arithmetic return per asset",
    )
    vols: Any = _dyn(
        0.6,
        rank=1,
        length="risky",
        lo=0.0,
        hi=10.0,
        broadcast=True,
        doc="annualised volatility per asset",
    )
    correlation: Any = _dyn(
        None,
        rank=2,
        length="risky",
        lo=-1.0,
        hi=1.0,
        optional=True,
        doc="correlation matrix of the diffusion (default identity)",
    )
    jump_intensity: Any = _dyn(
        0.0,
        rank=1,
        length="risky",
        lo=0.0,
        broadcast=True,
        doc="idiosyncratic jumps per year (model = jump)",
    )
    jump_mean: Any = _dyn(
        -0.05, rank=1, length="risky", lo=-5.0, hi=5.0, broadcast=True, doc="mean log jump size"
    )
    jump_vol: Any = _dyn(
        0.1, rank=1, length="risky", lo=0.0, hi=5.0, broadcast=True, doc="sd of log jump size"
    )
    crash_intensity: Any = _dyn(0.0, lo=0.0, doc="common crash events per year (all assets)")
    crash_mean: Any = _dyn(-0.2, lo=-5.0, hi=5.0, doc="mean log size of a common crash")
    crash_vol: Any = _dyn(0.05, lo=0.0, hi=5.0, doc="sd of log size of a common crash")
    garch_alpha: Any = _dyn(
        0.08,
        rank=1,
        length="risky",
        lo=0.0,
        hi=1.0,
        broadcast=True,
        doc="GARCH(1,1) ARCH coefficient (model = garch)",
    )
    garch_beta: Any = _dyn(
        0.9,
        rank=1,
        length="risky",
        lo=0.0,
        hi=1.0,
        broadcast=True,
        doc="GARCH(1,1) persistence coefficient",
    )
    block_length: Any = _dyn(20.0, lo=1.0, doc="mean block length in steps (model = bootstrap)")
    data: str = _f("", type=str, doc="bootstrap source: a folder of per-asset CSVs or one CSV")
    max_gap: float = _f(
        6.0,
        lo=1.0,
        doc="bootstrap: longest gap between consecutive data times, in multiples of the data's "
        "median spacing; a longer hole is refused (or dropped with allow_gaps)",
    )
    allow_gaps: bool = _f(
        False,
        type=bool,
        doc="bootstrap: drop the return across each hole longer than max_gap instead of "
        "refusing the data",
    )
    replay_start: str = _f(
        "",
        type=str,
        doc="bootstrap: replay the data's returns in order from the first time at or after this "
        'UTC date ("YYYY-MM-DD" or "YYYY-MM-DD HH:MM"), the same path for every pool; "" '
        "resamples",
    )
    antithetic: bool = _f(False, type=bool, doc="pair pools 2k, 2k+1 with negated normals")


@dataclass(frozen=True)
class PoolConfig:
    """`[pool]`: the pool: its assets at t=0, lending fee, limits, LP flows."""

    mode: str = _f(
        "pdlp",
        type=str,
        choices=("pdlp", "passive"),
        doc="pdlp: full dynamics (§2.2); passive: an LP portfolio, no traders",
    )
    initial_value: Any = _dyn(1.0e6, lo=0.0, lo_open=True, doc="pool value at t=0, numéraire")
    target_weights: Any = _dyn(
        None,
        rank=1,
        length="assets",
        lo=0.0,
        hi=1.0,
        optional=True,
        doc="target weight per asset, numéraire last (default equal)",
    )
    rebalance: bool = _f(False, type=bool, doc="passive pool: reset to target weights each step")
    fee: Any = _dyn(
        5.0e-5, lo=0.0, hi=1.0, hi_open=True, doc="lending fee f per step on borrowed value"
    )
    max_utilisation: Any = _dyn(
        0.9, lo=0.0, hi=1.0, lo_open=True, doc="solvency: lent ≤ this fraction of each reserve"
    )
    lp_flow_drift: Any = _dyn(
        0.0, lo=-100.0, hi=100.0, doc="net LP deposits, fraction of AUM per year"
    )
    discount: str = _f(
        "none",
        type=str,
        choices=("none", "glp", "glp_axiomatic", "glp_smooth", "gmx"),
        doc="discount function F of the target-weight arbitrage (none: no TWM arbitrage)",
    )
    discount_base: Any = _dyn(0.0025, lo=0.0, hi=1.0, doc="γ_b of eq. 11 (GMX: mint/burn fee)")
    discount_tax: Any = _dyn(0.005, lo=0.0, hi=1.0, doc="γ_t of eq. 11 (GMX: tax)")
    discount_temperature: Any = _dyn(
        1.0e-3, lo=0.0, lo_open=True, doc="temperature of glp_smooth (weight units)"
    )
    twm_mu: Any = _dyn(
        0.5, lo=0.0, lo_open=True, doc="surrogate modulus μ (δ_H = g/μ), in value fractions of AUM"
    )
    twm_capital: Any = _dyn(0.1, lo=0.0, doc="TWM arbitrageur's capital per asset, fraction of AUM")
    twm_cost: Any = _dyn(1.0e-6, lo=0.0, doc="TWM arbitrage acts when profit > this × AUM")
    twm_steps: int = _f(10, type=int, lo=1, hi=1000, doc="projected gradient steps of the solvers")
    swap_arbitrage: bool = _f(
        False, type=bool, doc="stale-oracle swap arbitrage against GMX swap fees (§2.3.2)"
    )
    swap_fee: Any = _dyn(0.003, lo=0.0, hi=1.0, doc="GMX base swap fee (fraction)")
    lp_flow_vol: Any = _dyn(0.0, lo=0.0, hi=100.0, doc="sd of LP flows, fraction of AUM per √year")


@dataclass(frozen=True)
class HedgeConfig:
    """`[hedge]`: an LP holding the pool's initial shares delta-hedges with perpetuals (§4)."""

    enabled: bool = _f(False, type=bool, doc="simulate the hedged LP beside the unhedged one")
    every: int = _f(24, type=int, lo=1, doc="rebalance the hedge every N steps")
    covariance: str = _f(
        "window",
        type=str,
        choices=COVARIANCE_ESTIMATORS,
        doc="Σ estimator: model (the path model's Σ, an oracle) | window | ewma | "
        "shrinkage (OAS of the window)",
    )
    window: int = _f(168, type=int, lo=2, hi=100000, doc="returns kept for window/shrinkage")
    risk_aversion: Any = _dyn(
        1.0, lo=0.0, lo_open=True, doc="γ_r of eq. 12 (value units, dimensionless)"
    )
    penalty: Any = _dyn(
        0.0,
        rank=1,
        length="risky",
        lo=0.0,
        broadcast=True,
        doc="c of eq. 12, quadratic rebalancing penalty (value units); 0 gives eq. 13",
    )
    cost: Any = _dyn(
        0.0005,
        rank=1,
        length="risky",
        lo=0.0,
        hi=1.0,
        broadcast=True,
        doc="charge per unit of traded notional when the hedge rebalances (taker fee)",
    )
    ewma_halflife: Any = _dyn(168.0, lo=0.0, lo_open=True, doc="EWMA half-life in steps")
    damping_rule: str = _f(
        "fixed",
        type=str,
        choices=DAMPING_RULES,
        doc="with [[pools]]: how each pool's Schur damping γ is set at a rebalance: fixed "
        "(hedge.damping) | gamma_star (γ*(ρ̂, n)) | binary (Claim B.1 on Σ̂) | isolated (0) | "
        "merged (1)",
    )
    damping: Any = _dyn(
        0.0, lo=0.0, hi=1.0, doc="Schur damping fraction γ for damping_rule = fixed"
    )
    coupling: str = _f(
        "canonical",
        type=str,
        choices=("canonical", "average"),
        doc="ρ̂ for gamma_star: first canonical correlation | RMS canonical correlation",
    )


@dataclass(frozen=True)
class SimulationConfig:
    """`[simulation]`: sizes, time grid, randomness, precision."""

    num_pools: int = _f(256, type=int, lo=1, doc="pools simulated together")
    num_steps: int = _f(720, type=int, lo=1, doc="time steps")
    steps_per_year: float = _f(8760.0, lo=0.0, lo_open=True, doc="8760 hourly, 365 daily")
    chunk_length: int = _f(0, type=int, lo=0, doc="steps per compiled chunk (0: whole run)")
    seed: int = _f(0, type=int, lo=0, doc="root PRNG seed")
    dtype: str = _f("float32", type=str, choices=("float32", "float64"), doc="float precision")
    progress: bool = _f(True, type=bool, doc="print progress between chunks")
    devices: Any = _f(
        1,
        type=int,
        lo=0,
        choices=("all",),
        doc='shard the pools over N devices; "all" (or 0): every visible device that divides '
        "num_pools",
    )
    identity_tolerance: float = _f(
        1.0e-4, lo=0.0, doc="largest relative accounting-identity violation allowed"
    )
    on_invalid: str = _f(
        "stop",
        type=str,
        choices=("stop", "mask"),
        doc="a pool breaking a guard (NaN, negative reserve, over-lent, identity) stops the "
        "run, or is frozen, counted and left out of the metrics",
    )


@dataclass(frozen=True)
class OutputConfig:
    """`[output]`: what the results folder holds."""

    dir: str = _f("", type=str, doc='results folder (default "runs/<name>-<timestamp>")')
    record_every: int = _f(
        0,
        type=int,
        lo=0,
        doc="record share price, prices, reserves every N steps (0: none; the fan chart needs it)",
    )
    plots: bool = _f(True, type=bool, doc="write PNG plots")
    checkpoint_every: int = _f(
        1, type=int, lo=0, doc="write a resumable checkpoint every N chunks (0: never)"
    )


@dataclass(frozen=True)
class SweepConfig:
    """`[sweep]`: what `pdlpjax sweep` varies (ignored by `pdlpjax run`).

    `params` maps dynamic keys to the values they take: `"pool.fee" = [0.0, 1e-5]` or a grid
    spec (`{ grid = [...] }`, `{ linspace = [a, b, n] }`) for a Cartesian grid; with `draws` >
    0, `{ uniform = [a, b] }` or `{ loguniform = [a, b] }` ranges (or value lists) are sampled
    `draws` times instead. Every combination runs `replicates` pools, and replicate j of every
    combination sees the same random draws (common random numbers), so differences between
    combinations are paired.
    """

    params: Any = _f(
        None,
        type=dict,
        optional=True,
        doc='table "section.key" = values: a list, {grid}, {linspace}, or with draws '
        "{uniform = [a, b]} / {loguniform = [a, b]}",
    )
    replicates: int = _f(64, type=int, lo=1, doc="pools per combination (common random numbers)")
    draws: int = _f(0, type=int, lo=0, doc="0: the full grid; N: N random combinations")
    batch_pools: int = _f(
        4096, type=int, lo=1, doc="most pools per compiled batch (the sweep runs in batches)"
    )


@dataclass(frozen=True)
class CalibrateConfig:
    """`[calibrate]`: what `pdlpjax calibrate` fits by gradient (ignored by `run`/`sweep`).

    `params` maps dynamic scalar keys to `{ transform = "sigmoid" | "softplus" | "identity",
    init = x, lo = a, hi = b }` (sigmoid maps onto (lo, hi), default (0, 1); softplus onto
    (lo, ∞), default lo = 0). Every grid combination of the config is an independent problem;
    all are fitted at once, vmapped in one compiled program.
    """

    params: Any = _f(
        None,
        type=dict,
        optional=True,
        doc='table "section.key" = { transform, init, lo, hi }: the free params',
    )
    objective: str = _f(
        "sharpe",
        type=str,
        choices=("sharpe", "certainty_equivalent", "cvar"),
        doc="maximise the Sharpe ratio | mean − ce_risk_aversion/2 · variance (annualised) | "
        "mean return + cvar_weight · CVaR(5%)",
    )
    target: str = _f(
        "hedged_lp", type=str, choices=("hedged_lp", "lp"), doc="whose returns: hedged LP or LP"
    )
    ce_risk_aversion: float = _f(2.0, lo=0.0, doc="risk aversion of the certainty equivalent")
    cvar_weight: float = _f(1.0, lo=0.0, doc="weight of the 5% CVaR in the cvar objective")
    optimizer: str = _f("adam", type=str, choices=("adam", "adamw", "sgd"), doc="optax optimiser")
    learning_rate: float = _f(0.05, lo=0.0, lo_open=True, doc="step size (in transformed units)")
    clip_norm: float = _f(0.0, lo=0.0, doc="clip the gradient's global norm to this (0: no clip)")
    steps: int = _f(50, type=int, lo=1, doc="optimisation steps")
    batch_pools: int = _f(32, type=int, lo=1, doc="training pools per problem per step")
    fresh_paths: bool = _f(
        True, type=bool, doc="new training markets every step (false: one fixed training set)"
    )
    validation_pools: int = _f(
        256, type=int, lo=2, doc="held-out pools per problem (common random numbers)"
    )
    validate_every: int = _f(10, type=int, lo=1, doc="validation score every N steps")


SECTIONS: dict[str, type] = {
    "market": MarketConfig,
    "paths": PathsConfig,
    "pool": PoolConfig,
    "hedge": HedgeConfig,
    "simulation": SimulationConfig,
    "output": OutputConfig,
    "sweep": SweepConfig,
    "calibrate": CalibrateConfig,
}
TOP_LEVEL = ("name", "description")
ARRAYS = ("pools",)  # arrays of tables: [[pools]]


@dataclass(frozen=True)
class PoolBlock:
    """One `[[pools]]` entry: a pool over a subset of `market.assets` (disjoint from the other
    pools'), all sharing one price model. `target_weights` lists its assets then the
    numéraire (default equal)."""

    assets: tuple
    target_weights: tuple | None = None

    def to_toml(self) -> dict:
        out: dict[str, Any] = {"assets": list(self.assets)}
        if self.target_weights is not None:
            out["target_weights"] = list(self.target_weights)
        return out


@dataclass(frozen=True)
class Config:
    """A validated config. Sections are attributes: `cfg.paths.vols`."""

    name: str = "config"
    description: str = ""
    market: MarketConfig = field(default_factory=MarketConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    hedge: HedgeConfig = field(default_factory=HedgeConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    pools: tuple = ()  # `[[pools]]` blocks; empty: one pool over every asset
    # One line per key the user set that the chosen settings ignore (`ignored_keys`); not
    # part of the config's value (equality, hash, config.toml).
    warnings: tuple = field(default=(), compare=False)

    @property
    def num_risky(self) -> int:
        return len(self.market.assets)

    @property
    def num_assets(self) -> int:
        return self.num_risky + (1 if self.market.numeraire else 0)

    @property
    def asset_names(self) -> tuple[str, ...]:
        extra = (self.market.numeraire,) if self.market.numeraire else ()
        return tuple(self.market.assets) + extra

    @property
    def dt(self) -> float:
        """Length of one step in years."""
        return 1.0 / self.simulation.steps_per_year


def specs(section_cls: type) -> dict[str, Spec]:
    """The `Spec` of every field of a section dataclass."""
    return {f.name: f.metadata["spec"] for f in dataclasses.fields(section_cls)}


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML file, apply `section.key=value` overrides, validate.

    The config's name defaults to the file's stem.
    """
    path = Path(path)
    if path.is_dir():
        hint = f"; did you mean {path / 'config.toml'}?" if (path / "config.toml").is_file() else ""
        raise ConfigError(f"{path}: is a folder, not a config file (expected a .toml file{hint})")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: malformed TOML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    raw.setdefault("name", path.stem)
    raw = apply_overrides(raw, overrides)
    if not raw.get("pools") and not any(raw.get(name) for name in SECTIONS):
        # An empty (or truncated) file would silently run every default.
        raise ConfigError(
            f"{path}: the config sets no key (it would run every default); set at least one, "
            "e.g. start from configs/quickstart.toml"
        )
    return config_from_dict(raw, base_dir=path.parent)


def _parse_value(text: str) -> Any:
    """A TOML value (`0.5`, `[1, 2]`, `true`, `"x"`), or the bare text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Return a copy of `raw` with each `section.key=value` override set (value in TOML)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        lhs, rhs = item.split("=", 1)
        lhs = lhs.strip()
        parts = lhs.split(".")
        if len(parts) == 1 and parts[0] in TOP_LEVEL:
            out[parts[0]] = _parse_value(rhs.strip())
            continue
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        section, key = parts
        if section not in SECTIONS:
            raise ConfigError(
                f"--set {lhs}: unknown section [{section}]; expected one of {', '.join(SECTIONS)}"
            )
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise ConfigError(f"[{section}]: expected a table")
        out[section][key] = _parse_value(rhs.strip())
    return out


def config_from_dict(raw: dict, base_dir: str | Path | None = None) -> Config:
    """Validate a plain dict (as from TOML) into a `Config`.

    `base_dir` resolves a relative `paths.data` (the config file's folder, then the working
    directory).
    """
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a table at top level")
    for key, value in raw.items():
        if key in ARRAYS:
            continue
        if key in TOP_LEVEL:
            if not isinstance(value, str):
                raise ConfigError(f"{key}: expected a string, got {_show(value)}")
        elif key not in SECTIONS:
            raise ConfigError(
                f"unknown section [{key}]; expected one of {', '.join(SECTIONS)}"
                if isinstance(value, dict)
                else f"{key}: unknown top-level key; expected a section "
                f"({', '.join(SECTIONS)}) or one of {', '.join(TOP_LEVEL)}"
            )
    _check_name(raw.get("name", "config"))
    sections = {}
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}]: expected a table, got {_show(table)}")
        sections[name] = _build_section(name, cls, table)
    pools = _check_pools(raw.get("pools", []))
    cfg = Config(
        name=raw.get("name", "config"),
        description=raw.get("description", ""),
        pools=pools,
        **sections,
    )
    if base_dir is not None and cfg.paths.data:
        cfg = _resolve_data_path(cfg, Path(base_dir))
    _check_cross(cfg)
    return dataclasses.replace(cfg, warnings=ignored_keys(cfg, raw))


# The [paths] keys each model reads; the others are ignored by it.
_DIFFUSION = ("drifts", "vols", "correlation", "antithetic")
_JUMPS = ("jump_intensity", "jump_mean", "jump_vol", "crash_intensity", "crash_mean", "crash_vol")
MODEL_KEYS = {
    "gbm": _DIFFUSION,
    "jump": _DIFFUSION + _JUMPS,
    "garch": _DIFFUSION + ("garch_alpha", "garch_beta"),
    "bootstrap": ("block_length", "data", "max_gap", "allow_gaps", "replay_start"),
}
# A replay reads neither: it has no blocks, and refuses a hole in its window (`data.replay_row`).
_REPLAY_IGNORES = ("block_length", "allow_gaps")
_TWM_KEYS = ("discount_base", "discount_tax", "discount_temperature", "twm_mu", "twm_capital")
_TWM_KEYS += ("twm_cost", "twm_steps")
_PASSIVE_KEYS = {"market": ("assets", "numeraire", "initial_prices")}
_PASSIVE_KEYS["pool"] = ("mode", "initial_value", "target_weights", "rebalance")


def ignored_because(cfg: Config, section: str, key: str) -> str | None:
    """Why the settings of `cfg` ignore `section.key` (e.g. `paths.model = "gbm"`), or None
    when it is used."""
    p, h, pool = cfg.paths, cfg.hedge, cfg.pool
    if section in _PASSIVE_KEYS and pool.mode == "passive" and key not in _PASSIVE_KEYS[section]:
        return 'pool.mode = "passive"'
    if section == "paths" and key != "model" and key not in MODEL_KEYS[p.model]:
        # Whatever the path model, the traders' momentum scales the last return by `vols`,
        # and a hedge with the model's covariance reads `vols` and `correlation`.
        model_cov = h.enabled and h.covariance == "model"
        if not (key == "vols" and (pool.mode == "pdlp" or model_cov)):
            if not (key == "correlation" and model_cov):
                return f'paths.model = "{p.model}"'
    if section == "paths" and p.model == "bootstrap" and p.replay_start:
        if key in _REPLAY_IGNORES:
            return f'paths.replay_start = "{p.replay_start}" (a replay)'
    if section == "hedge" and key != "enabled":
        if not h.enabled:
            return "hedge.enabled = false"
        if key == "window" and h.covariance not in ("window", "shrinkage"):
            return f'hedge.covariance = "{h.covariance}"'
        if key == "ewma_halflife" and h.covariance != "ewma":
            return f'hedge.covariance = "{h.covariance}"'
        if key in ("damping_rule", "damping", "coupling") and not cfg.pools:
            return "no [[pools]] blocks"
        if key == "damping" and h.damping_rule != "fixed":
            return f'hedge.damping_rule = "{h.damping_rule}"'
        if key == "coupling" and h.damping_rule != "gamma_star":
            return f'hedge.damping_rule = "{h.damping_rule}"'
    if section == "pool":
        if key in _TWM_KEYS and pool.discount == "none":
            if not (key == "discount_tax" and pool.swap_arbitrage):  # GMX swap fees use it
                return 'pool.discount = "none"'
        if key == "discount_temperature" and pool.discount != "glp_smooth":
            return f'pool.discount = "{pool.discount}"'
        if key == "swap_fee" and not pool.swap_arbitrage:
            return "pool.swap_arbitrage = false"
        if key == "rebalance" and pool.mode != "passive":
            return f'pool.mode = "{pool.mode}"'
    return None


def ignored_keys(cfg: Config, raw: dict) -> tuple[str, ...]:
    """One line per reason naming the keys the user set (in `raw`, to a value other than the
    default; or as a swept or free param) that `cfg`'s settings ignore.

    Keys equal to their default are left out, so a written-out `config.toml` (every key)
    warns only about what the user had set.
    """
    found: dict[str, list[str]] = {}
    for sec_name, cls in SECTIONS.items():
        table = raw.get(sec_name)
        if not isinstance(table, dict) or sec_name in ("sweep", "calibrate"):
            continue
        section = getattr(cfg, sec_name)
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key in table:
            if key in defaults and getattr(section, key) != defaults[key]:
                why = ignored_because(cfg, sec_name, key)
                if why:
                    found.setdefault(why, []).append(f"{sec_name}.{key}")
    for what, params in (("swept", cfg.sweep.params), ("free", cfg.calibrate.params)):
        for name in params or {}:
            sec_name, key = name.split(".")
            why = ignored_because(cfg, sec_name, key)
            if why:
                found.setdefault(why, []).append(f"{name} ({what})")
    return tuple(f"{', '.join(keys)}: set but ignored with {why}" for why, keys in found.items())


_UNSAFE_NAME_CHARS = '/\\:*?"<>|'


def _check_name(name: str) -> None:
    """`name` becomes the folder `runs/<name>-<time>`: one plain folder name, inside `runs/`."""
    bad = sorted({c for c in name if c in _UNSAFE_NAME_CHARS or ord(c) < 32 or ord(c) == 127})
    if bad:
        why = "it holds " + " ".join(map(repr, bad))
    elif name.strip() in ("", ".", ".."):
        why = "an empty or dot name"
    elif name != name.strip():
        why = "leading or trailing spaces"
    else:
        return
    raise ConfigError(
        f"name: {name!r} cannot name a results folder ({why}); use letters, digits, spaces "
        "and . _ - (the name defaults to the config file's stem)"
    )


def key_rows(section: str | None = None) -> list[dict[str, str]]:
    """The configuration reference: one row per key of every section (or of `section`),
    with `section`, `key`, `kind`, `default`, `range` and `meaning`, from each field's `Spec`.

    `pdlpjax keys` prints it and the README's tables are checked against it.
    """
    if section is not None and section not in SECTIONS:
        raise ConfigError(
            f"keys: unknown section {section!r}; expected one of {', '.join(SECTIONS)}"
        )
    rows = []
    for name, cls in SECTIONS.items():
        if section is not None and name != section:
            continue
        for f in dataclasses.fields(cls):
            spec: Spec = f.metadata["spec"]
            kind = spec.kind
            if spec.kind == "dynamic" and spec.rank:
                kind += ", per asset" if spec.rank == 1 else ", matrix"
            rows.append(
                {
                    "section": name,
                    "key": f.name,
                    "kind": kind,
                    "default": _default_text(name, f.name, f.default),
                    "range": _range_text(spec),
                    "meaning": spec.doc,
                }
            )
    return rows


_NONE_DEFAULTS = {"paths.correlation": "identity", "pool.target_weights": "equal"}


def _default_text(section: str, key: str, value: Any) -> str:
    if value is None:
        return _NONE_DEFAULTS.get(f"{section}.{key}", "none")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, tuple):
        return "[" + ", ".join(_default_text(section, key, v) for v in value) + "]"
    return repr(value)


def _range_text(spec: Spec) -> str:
    """Allowed values in interval notation (`[0, 1]`, `(0, ∞)`), or the choices."""
    if spec.type is str and spec.choices:
        return " | ".join(spec.choices)
    if spec.type not in (int, float) or (spec.lo is None and spec.hi is None):
        return ""
    lo = "−∞" if spec.lo is None else f"{spec.lo:g}"
    hi = "∞" if spec.hi is None else f"{spec.hi:g}"
    text = f"{'(' if spec.lo_open or spec.lo is None else '['}{lo}, {hi}"
    text += ")" if spec.hi_open or spec.hi is None else "]"
    if spec.choices:
        text += " or " + " | ".join(f'"{c}"' for c in spec.choices)
    return text


def _check_pools(items: Any) -> tuple:
    """`[[pools]]`: a list of tables with `assets` (strings) and optional `target_weights`."""
    if not isinstance(items, list):
        raise ConfigError("pools: expected [[pools]] tables (an array of tables)")
    blocks = []
    for i, item in enumerate(items):
        where = f"pools[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a table")
        unknown = set(item) - {"assets", "target_weights"}
        if unknown:
            raise ConfigError(
                f"{where}.{sorted(unknown)[0]}: unknown key; expected assets, target_weights"
            )
        assets = item.get("assets")
        if (
            not isinstance(assets, list)
            or not assets
            or not all(isinstance(a, str) for a in assets)
        ):
            raise ConfigError(f"{where}.assets: expected a non-empty list of asset names")
        weights = item.get("target_weights")
        if weights is not None:
            spec = Spec(kind="dynamic", lo=0.0, hi=1.0)
            if not isinstance(weights, list):
                raise ConfigError(f"{where}.target_weights: expected a list of numbers")
            weights = tuple(_check_scalar(f"{where}.target_weights", spec, w) for w in weights)
        blocks.append(PoolBlock(tuple(assets), weights))
    return tuple(blocks)


def _check_blocks(cfg: Config) -> None:
    if not cfg.pools:
        return
    names = list(cfg.market.assets)
    seen: set = set()
    if len(cfg.pools) < 2:
        raise ConfigError("pools: expected at least two [[pools]] blocks (or none)")
    for i, block in enumerate(cfg.pools):
        for a in block.assets:
            if a not in names:
                raise ConfigError(f"pools[{i}].assets: {a!r} is not in market.assets {names}")
            if a in seen:
                raise ConfigError(f"pools[{i}].assets: {a!r} is in two pools (must be disjoint)")
            seen.add(a)
        w = block.target_weights
        if w is not None:
            if len(w) != len(block.assets) + 1:
                raise ConfigError(
                    f"pools[{i}].target_weights: expected {len(block.assets) + 1} values "
                    "(its assets, then the numéraire)"
                )
            if abs(sum(w) - 1.0) > 1e-6:
                raise ConfigError(
                    f"pools[{i}].target_weights: expected weights that sum to 1, got {sum(w):.6g}"
                )
    if not cfg.market.numeraire:
        raise ConfigError("pools: [[pools]] need a market.numeraire (each pool holds one)")
    if cfg.pool.mode != "pdlp":
        raise ConfigError('pools: [[pools]] need pool.mode = "pdlp"')


_REPLAY_FORMATS = ("%Y-%m-%d", "%Y-%m-%d %H:%M")


def replay_time(text: str) -> np.datetime64 | None:
    """`paths.replay_start` as a UTC `datetime64[s]`, or None when empty (no replay).

    Raises `ConfigError` unless it is "YYYY-MM-DD" or "YYYY-MM-DD HH:MM" and a real date.
    """
    if not text:
        return None
    for fmt in _REPLAY_FORMATS:
        try:
            when = _dt.datetime.strptime(text, fmt)
        except ValueError:
            continue
        if when.strftime(fmt) == text:  # zero-padded fields only: "2022-5-5" is refused
            return np.datetime64(when, "s")
    raise ConfigError(
        f'paths.replay_start: expected a UTC date "YYYY-MM-DD" or "YYYY-MM-DD HH:MM" '
        f'(e.g. "2022-05-05" or "2022-05-05 12:00"), got {_show(text)}; "" turns replay off'
    )


def _resolve_data_path(cfg: Config, base_dir: Path) -> Config:
    p = Path(cfg.paths.data).expanduser()
    if not p.is_absolute() and not p.exists() and (base_dir / p).exists():
        p = base_dir / p
    return dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, data=str(p)))


# Keys of earlier versions, with what replaced them.
_NO_RELAXATION = (
    "since 2026-12 the position book is continuous in exact mode (crowds with a spread of "
    "liquidation prices, fractional exits and acceptance), so gradients need no relaxation; "
    "delete the key"
)
REMOVED_KEYS = {
    "simulation.smooth": _NO_RELAXATION,
    "simulation.temperature": _NO_RELAXATION,
}


def _build_section(name: str, cls: type, table: dict) -> Any:
    known = specs(cls)
    values = {}
    for key, value in table.items():
        if f"{name}.{key}" in REMOVED_KEYS:
            raise ConfigError(f"{name}.{key}: removed: {REMOVED_KEYS[f'{name}.{key}']}")
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key; expected one of {', '.join(known)}")
        spec = known[key]
        if spec.type is dict:
            check = _check_free_params if name == "calibrate" else _check_sweep_params
            values[key] = check(f"{name}.{key}", value)
            continue
        check = _check_dynamic if spec.kind == "dynamic" else _check_static
        values[key] = check(f"{name}.{key}", spec, value)
    return cls(**values)


@dataclass(frozen=True)
class Range:
    """A sampling range of a swept scalar: uniform or log-uniform on [lo, hi]."""

    lo: float
    hi: float
    log: bool = False

    def to_toml(self) -> dict:
        return {"loguniform" if self.log else "uniform": [self.lo, self.hi]}

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.log:
            return np.exp(rng.uniform(np.log(self.lo), np.log(self.hi), n))
        return rng.uniform(self.lo, self.hi, n)


@dataclass(frozen=True)
class FreeParam:
    """A parameter fitted by `pdlpjax calibrate`: value = lo + (hi − lo)·sigmoid(θ),
    lo + softplus(θ), or θ."""

    transform: str = "identity"
    init: float = 0.0
    lo: float = 0.0
    hi: float = 1.0

    def to_toml(self) -> dict:
        return {"transform": self.transform, "init": self.init, "lo": self.lo, "hi": self.hi}


TRANSFORMS = ("sigmoid", "softplus", "identity")


def _check_free_params(key: str, table: Any) -> dict:
    """`[calibrate] params`: dynamic scalar keys with a transform and an initial value."""
    if not isinstance(table, dict) or not table:
        raise ConfigError(f'{key}: expected a table like {{ "hedge.damping" = {{ init = 0.5 }} }}')
    out = {}
    for name, value in table.items():
        where = f"{key}.{name}"
        parts = name.split(".")
        section = SECTIONS.get(parts[0]) if len(parts) == 2 else None
        spec = specs(section).get(parts[1]) if section is not None else None
        if spec is None or spec.kind != "dynamic" or spec.rank != 0:
            raise ConfigError(f"{where}: expected the name of a dynamic scalar field (section.key)")
        if not isinstance(value, dict) or not set(value) <= {"transform", "init", "lo", "hi"}:
            raise ConfigError(f"{where}: expected {{ transform, init, lo, hi }} (init required)")
        transform = value.get("transform", "identity")
        if transform not in TRANSFORMS:
            raise ConfigError(f"{where}.transform: expected one of {', '.join(TRANSFORMS)}")
        nums = {}
        for k in ("init", "lo", "hi"):
            if k in value:
                v = value[k]
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                    raise ConfigError(f"{where}.{k}: expected a finite number, got {_show(v)}")
                nums[k] = float(v)
        if "init" not in nums:
            raise ConfigError(f"{where}.init: expected the initial value")
        lo, hi = nums.get("lo", 0.0), nums.get("hi", 1.0)
        init = nums["init"]
        if transform == "sigmoid" and not lo < init < hi:
            raise ConfigError(f"{where}.init: expected lo < init < hi = ({lo:g}, {hi:g})")
        if transform == "softplus" and not init > lo:
            raise ConfigError(f"{where}.init: expected init > lo = {lo:g}")
        _check_scalar(f"{where}.init", spec, init)
        # The transform must keep every value inside the field's own range.
        if transform == "sigmoid":
            if spec.lo is not None and lo < spec.lo:
                raise ConfigError(f"{where}.lo: expected at least {name}'s minimum {spec.lo:g}")
            if spec.hi is not None and hi > spec.hi:
                raise ConfigError(f"{where}.hi: expected at most {name}'s maximum {spec.hi:g}")
            if not lo < hi:
                raise ConfigError(f"{where}: expected lo < hi")
        elif transform == "softplus":
            if spec.hi is not None:
                raise ConfigError(
                    f"{where}.transform: {name} has a maximum ({spec.hi:g}): use sigmoid"
                )
            if spec.lo is not None and lo < spec.lo:
                raise ConfigError(f"{where}.lo: expected at least {name}'s minimum {spec.lo:g}")
        elif spec.lo is not None or spec.hi is not None:
            raise ConfigError(
                f"{where}.transform: {name} is bounded: use sigmoid or softplus, not identity"
            )
        out[name] = FreeParam(transform, init, lo, hi)
    return out


def _check_sweep_params(key: str, table: Any) -> dict:
    """`[sweep] params`: each entry names a dynamic field; values become a `Grid` or `Range`."""
    if not isinstance(table, dict) or not table:
        raise ConfigError(f'{key}: expected a table like {{ "pool.fee" = [0.0, 1e-5] }}')
    out = {}
    for name, value in table.items():
        where = f"{key}.{name}"
        parts = name.split(".")
        section = SECTIONS.get(parts[0]) if len(parts) == 2 else None
        spec = specs(section).get(parts[1]) if section is not None else None
        if spec is None or spec.kind != "dynamic":
            raise ConfigError(f"{where}: expected the name of a dynamic field, as section.key")
        if isinstance(value, list):
            value = {"grid": value}
        if isinstance(value, dict) and set(value) in ({"uniform"}, {"loguniform"}):
            (kind, bounds), log = next(iter(value.items())), "loguniform" in value
            ok = (
                spec.rank == 0
                and isinstance(bounds, list)
                and len(bounds) == 2
                and all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
                and bounds[0] < bounds[1]
                and (not log or bounds[0] > 0)
            )
            if not ok:
                raise ConfigError(
                    f"{where}.{kind}: expected [lo, hi] with lo < hi"
                    + (" and lo > 0" if log else "")
                    + ("" if spec.rank == 0 else " (ranges are for scalar fields only)")
                )
            for b in bounds:
                _check_scalar(f"{where}.{kind}", spec, float(b))
            out[name] = Range(float(bounds[0]), float(bounds[1]), log)
        elif isinstance(value, dict):
            out[name] = _check_grid(where, spec, value)
        else:
            raise ConfigError(
                f"{where}: expected a list of values, {{ grid = [...] }}, "
                "{ linspace = [a, b, n] }, { uniform = [a, b] } or { loguniform = [a, b] }"
            )
    return out


# --------------------------------------------------------------------------- field checks


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _what(spec: Spec) -> str:
    """Human description of an element's expected type and range."""
    if spec.type is bool:
        return "true or false"
    if spec.type is str:
        if spec.choices:
            return "one of " + ", ".join(f'"{c}"' for c in spec.choices)
        return "a string"
    noun = "an integer" if spec.type is int else "a number"
    parts = []
    if spec.lo is not None:
        parts.append(f"{'>' if spec.lo_open else '>='} {spec.lo:g}")
    if spec.hi is not None:
        parts.append(f"{'<' if spec.hi_open else '<='} {spec.hi:g}")
    return noun + (" " + " and ".join(parts) if parts else "")


def _check_scalar(key: str, spec: Spec, value: Any) -> Any:
    if spec.type is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
        return value
    if spec.type is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected {_what(spec)}, got {_show(value)}")
        if spec.choices and value not in spec.choices:
            raise ConfigError(f"{key}: expected {_what(spec)}, got {_show(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected {_what(spec)}, got {_show(value)}")
    if spec.type is int and not isinstance(value, int):
        raise ConfigError(f"{key}: expected {_what(spec)}, got {_show(value)}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value}")
    bad_lo = spec.lo is not None and (value <= spec.lo if spec.lo_open else value < spec.lo)
    bad_hi = spec.hi is not None and (value >= spec.hi if spec.hi_open else value > spec.hi)
    if bad_lo or bad_hi:
        raise ConfigError(f"{key}: expected {_what(spec)}, got {value:g}")
    return spec.type(value)


def _check_static(key: str, spec: Spec, value: Any) -> Any:
    if spec.type is not str and spec.choices and isinstance(value, str):
        if value not in spec.choices:  # a number, or one of a few words ("all")
            words = " or ".join(f'"{c}"' for c in spec.choices)
            raise ConfigError(f"{key}: expected {_what(spec)} or {words}, got {_show(value)}")
        return value
    if spec.rank == 0:
        return _check_scalar(key, spec, value)
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of {_what(spec)}s, got {_show(value)}")
    return tuple(_check_scalar(f"{key}[{i}]", spec, v) for i, v in enumerate(value))


def _depth(value: Any) -> int:
    d = 0
    while isinstance(value, list):
        if not value:
            return d + 1
        value = value[0]
        d += 1
    return d


def _check_elements(key: str, spec: Spec, value: Any) -> Any:
    """Check every number in a (nested) list; return it as nested tuples."""
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{key}: expected a non-empty list")
        return tuple(_check_elements(f"{key}[{i}]", spec, v) for i, v in enumerate(value))
    if isinstance(value, dict):
        raise ConfigError(f"{key}: expected {_what(spec)}, got a table")
    return float(_check_scalar(key, spec, value))


@dataclass(frozen=True)
class Grid:
    """A grid spec of a dynamic field: the values one axis of the pool grid takes."""

    values: tuple

    def to_toml(self) -> dict:
        return {"grid": _listify(self.values)}


def _check_dynamic(key: str, spec: Spec, value: Any) -> Any:
    if value is None:  # only reachable from Python callers; TOML has no null
        if spec.optional:
            return None
        raise ConfigError(f"{key}: expected {_what(spec)}, got nothing")
    if isinstance(value, dict):
        return _check_grid(key, spec, value)
    d = _depth(value)
    if d == spec.rank or (spec.broadcast and d == 0) or d == spec.rank + 1:
        checked = _check_elements(key, spec, value)
        _check_rectangular(key, checked)
        return checked
    want = ["a number", "a list", "a list of lists"][spec.rank]
    raise ConfigError(
        f"{key}: expected {want} ({_what(spec)}), or one per pool, or a grid spec; "
        f"got {_show(value)}"
    )


def _check_rectangular(key: str, value: Any) -> None:
    if isinstance(value, tuple):
        try:
            np.asarray(value, dtype=float)
        except ValueError:
            raise ConfigError(f"{key}: rows have different lengths") from None


def _check_grid(key: str, spec: Spec, table: dict) -> Grid:
    if set(table) == {"grid"}:
        values = table["grid"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{key}.grid: expected a non-empty list of values")
        items = []
        for i, v in enumerate(values):
            d = _depth(v)
            if not (d == spec.rank or (spec.broadcast and d == 0)):
                raise ConfigError(f"{key}.grid[{i}]: expected one pool's value, got {_show(v)}")
            items.append(_check_elements(f"{key}.grid[{i}]", spec, v))
        return Grid(tuple(items))
    if set(table) == {"linspace"}:
        v = table["linspace"]
        ok = (
            isinstance(v, list)
            and len(v) == 3
            and isinstance(v[2], int)
            and not isinstance(v[2], bool)
            and v[2] >= 1
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v[:2])
        )
        if not ok or spec.rank != 0:
            raise ConfigError(
                f"{key}.linspace: expected [start, stop, count] with an integer count >= 1"
                + ("" if spec.rank == 0 else " (linspace is for scalar fields only)")
            )
        pts = np.linspace(float(v[0]), float(v[1]), v[2])
        return Grid(tuple(_check_scalar(f"{key}.linspace", spec, float(x)) for x in pts))
    raise ConfigError(
        f"{key}: expected a grid spec {{ grid = [...] }} or {{ linspace = [start, stop, count] }}"
        f", got keys {sorted(table)}"
    )


# --------------------------------------------------------------------------- cross checks


def _expected_length(cfg: Config, spec: Spec) -> int | None:
    if spec.length == "risky":
        return cfg.num_risky
    if spec.length == "assets":
        return cfg.num_assets
    return None


def _check_cross(cfg: Config) -> None:
    m, s, o = cfg.market, cfg.simulation, cfg.output
    if not m.assets:
        raise ConfigError("market.assets: expected at least one risky asset")
    names = cfg.asset_names
    if any(not a.strip() for a in names):
        raise ConfigError("market.assets: asset names must be non-empty")
    if len(set(names)) != len(names):
        raise ConfigError(f"market.assets: asset names must be unique, got {list(names)}")

    combos = 1
    for sec_name, cls in SECTIONS.items():
        section = getattr(cfg, sec_name)
        for key, spec in specs(cls).items():
            if spec.kind != "dynamic":
                continue
            value = getattr(section, key)
            if value is None:
                continue
            per_pool = _per_pool_values(f"{sec_name}.{key}", spec, value, s.num_pools)
            for i, v in enumerate(per_pool):
                where = f"{sec_name}.{key}" + (f" (pool {i})" if len(per_pool) > 1 else "")
                _check_shape(cfg, where, spec, v)
            if isinstance(value, Grid):
                combos *= len(value.values)
    if s.num_pools % combos:
        raise ConfigError(
            f"simulation.num_pools: expected a multiple of the {combos} grid combinations, "
            f"got {s.num_pools}"
        )
    _check_blocks(cfg)
    sw = cfg.sweep
    if sw.params and sw.draws == 0 and any(isinstance(v, Range) for v in sw.params.values()):
        raise ConfigError("sweep.params: uniform/loguniform ranges need sweep.draws > 0")
    if cfg.hedge.enabled and cfg.hedge.every > s.num_steps:
        raise ConfigError(
            f"hedge.every: expected at most simulation.num_steps = {s.num_steps}, "
            f"got {cfg.hedge.every}"
        )
    if cfg.pool.mode == "pdlp" and not m.numeraire:
        raise ConfigError(
            'market.numeraire: pool.mode = "pdlp" needs a numéraire (margin and '
            "fees are paid in it)"
        )
    lev_max = min(float(np.min(v)) for v in _values(cfg, "market", "max_leverage"))
    arb_lev = max(float(np.max(v)) for v in _values(cfg, "market", "arb_leverage"))
    if arb_lev > lev_max:
        raise ConfigError(
            f"market.arb_leverage: expected at most market.max_leverage = "
            f"{lev_max:g}, got {arb_lev:g}"
        )
    p = cfg.paths
    if isinstance(s.devices, int) and s.devices > 1 and s.num_pools % s.devices:
        raise ConfigError(
            f"simulation.devices: expected a divisor of num_pools = {s.num_pools}, got {s.devices}"
        )
    if p.antithetic and s.num_pools % 2:
        raise ConfigError(
            f"simulation.num_pools: antithetic pairs need an even number, got {s.num_pools}"
        )
    replay_time(p.replay_start)  # a malformed date fails even where it is ignored
    if p.antithetic and p.model == "bootstrap" and p.replay_start:
        raise ConfigError(
            "paths.antithetic: not defined for a replay (paths.replay_start: every pool has "
            "the data's path); set false"
        )
    if p.antithetic and p.model == "bootstrap":
        raise ConfigError('paths.antithetic: not defined for model = "bootstrap"; set false')
    if p.model == "bootstrap" and not p.data:
        raise ConfigError('paths.data: model = "bootstrap" needs a CSV file or folder of CSVs')
    if p.data and not Path(p.data).exists():
        raise ConfigError(f"paths.data: {p.data}: no such file or folder")
    if p.model == "garch":  # check every pool: grids and per-pool lists combine
        values, _ = resolve_dynamic(cfg)
        total = values["paths"]["garch_alpha"] + values["paths"]["garch_beta"]
        if np.any(total >= 1.0):
            i = int(np.argmax(np.max(total, axis=1)))
            raise ConfigError(
                f"paths.garch_alpha: expected garch_alpha + garch_beta < 1, got "
                f"{np.max(total[i]):g} for pool {i}"
            )
    lam_dt = max(float(np.max(v)) for v in _values(cfg, "paths", "jump_intensity"))
    if lam_dt * cfg.dt > 1.0:
        raise ConfigError(
            f"paths.jump_intensity: expected at most steps_per_year = {s.steps_per_year:g} "
            f"jumps per year (one per step on average), got {lam_dt:g}"
        )
    crash = max(float(np.max(v)) for v in _values(cfg, "paths", "crash_intensity"))
    if crash * cfg.dt > 1.0:
        raise ConfigError(
            f"paths.crash_intensity: expected at most {s.steps_per_year:g} per year, got {crash:g}"
        )
    if s.num_steps < 2:  # one return has no variance: every Sharpe ratio would be NaN
        raise ConfigError(
            f"simulation.num_steps: expected at least 2 (a Sharpe ratio needs two returns), "
            f"got {s.num_steps}"
        )
    chunk = s.chunk_length or s.num_steps
    if chunk > s.num_steps:
        raise ConfigError(
            f"simulation.chunk_length: expected at most num_steps = {s.num_steps}, got {chunk}"
        )
    if o.record_every:
        if chunk % o.record_every or s.num_steps % o.record_every:
            raise ConfigError(
                f"output.record_every: expected a divisor of simulation.chunk_length ({chunk}) "
                f"and num_steps ({s.num_steps}), got {o.record_every}"
            )


def _check_shape(cfg: Config, key: str, spec: Spec, value: Any) -> None:
    arr = np.asarray(value, dtype=float)
    n = _expected_length(cfg, spec)
    if spec.rank == 1 and arr.ndim == 1 and n is not None and arr.shape[0] != n:
        raise ConfigError(
            f"{key}: expected {n} values (one per "
            f"{'risky asset' if spec.length == 'risky' else 'asset, numéraire last'}), "
            f"got {arr.shape[0]}"
        )
    if spec.rank == 2:
        if arr.ndim != 2 or arr.shape != (n, n):
            raise ConfigError(f"{key}: expected a {n}x{n} matrix, got shape {arr.shape}")
        if not np.allclose(arr, arr.T, atol=1e-9):
            raise ConfigError(f"{key}: expected a symmetric matrix")
        if not np.allclose(np.diag(arr), 1.0, atol=1e-9):
            raise ConfigError(f"{key}: expected ones on the diagonal of a correlation matrix")
        eig = np.linalg.eigvalsh(arr)
        if eig.min() <= 1e-8:
            raise ConfigError(
                f"{key}: expected a positive definite matrix, smallest eigenvalue is "
                f"{eig.min():.3g}"
            )
    if key.startswith("pool.target_weights"):
        if abs(arr.sum() - 1.0) > 1e-6:
            raise ConfigError(f"{key}: expected weights that sum to 1, got sum {arr.sum():.6g}")


def _values(cfg: Config, section: str, key: str) -> list:
    """The distinct values a dynamic field takes across pools (for cross checks)."""
    spec = specs(SECTIONS[section])[key]
    value = getattr(getattr(cfg, section), key)
    return _per_pool_values(f"{section}.{key}", spec, value, cfg.simulation.num_pools)


def _per_pool_values(key: str, spec: Spec, value: Any, num_pools: int) -> list:
    """List of the distinct values (grid) or every pool's value (per-pool list)."""
    if isinstance(value, Grid):
        return list(value.values)
    d = _depth(_listify(value))
    if d == spec.rank + 1:
        if len(value) != num_pools:
            raise ConfigError(
                f"{key}: a per-pool list needs simulation.num_pools = {num_pools} entries, "
                f"got {len(value)}"
            )
        return list(value)
    return [value]


def _listify(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_listify(v) for v in value]
    return value


# --------------------------------------------------------------------------- dynamic params


def resolve_dynamic(cfg: Config) -> tuple[dict[str, dict[str, np.ndarray]], list[dict]]:
    """Every dynamic field as a per-pool NumPy array, and each pool's grid combination.

    **Returns:** `(values, combos)`: `values[section][key]` has shape `(num_pools, *shape)`
    (shape `()`, `(n,)` or `(n, n)` by the field's rank); `combos` has one dict per grid
    combination, mapping `"section.key"` to its value (a single empty dict without grids).
    Pool `i` belongs to combination `i // (num_pools // len(combos))`.
    """
    num_pools = cfg.simulation.num_pools
    grids = []
    for sec_name, cls in SECTIONS.items():
        for key, spec in specs(cls).items():
            value = getattr(getattr(cfg, sec_name), key)
            if spec.kind == "dynamic" and isinstance(value, Grid):
                grids.append((sec_name, key, value.values))
    combos = [
        {f"{s}.{k}": v for (s, k, _), v in zip(grids, choice, strict=True)}
        for choice in itertools.product(*(g[2] for g in grids))
    ] or [{}]
    reps = num_pools // len(combos)
    out: dict[str, dict[str, np.ndarray]] = {}
    for sec_name, cls in SECTIONS.items():
        section = getattr(cfg, sec_name)
        for key, spec in specs(cls).items():
            if spec.kind != "dynamic":
                continue
            value = getattr(section, key)
            shape = _field_shape(cfg, spec)
            if isinstance(value, Grid):
                rows = [
                    np.broadcast_to(np.asarray(c[f"{sec_name}.{key}"], float), shape)
                    for c in combos
                    for _ in range(reps)
                ]
                arr = np.stack(rows)
            elif value is None:
                arr = np.broadcast_to(_default_value(cfg, key, shape), (num_pools, *shape))
            elif _depth(_listify(value)) == spec.rank + 1:
                arr = np.stack([np.broadcast_to(np.asarray(v, float), shape) for v in value])
            else:
                arr = np.broadcast_to(np.asarray(value, float), (num_pools, *shape))
            out.setdefault(sec_name, {})[key] = np.array(arr, dtype=float)
    return out, combos


def _field_shape(cfg: Config, spec: Spec) -> tuple[int, ...]:
    n = _expected_length(cfg, spec)
    return () if spec.rank == 0 else (n,) * spec.rank


def _default_value(cfg: Config, key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key == "correlation":
        return np.eye(shape[0])
    if key == "target_weights":
        return np.full(shape, 1.0 / shape[0])
    raise AssertionError(key)


# --------------------------------------------------------------------------- export


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as a plain TOML-ready dict (grids as `{grid = [...]}` tables)."""
    out: dict[str, Any] = {"name": cfg.name}
    if cfg.description:
        out["description"] = cfg.description
    for sec_name in SECTIONS:
        section = getattr(cfg, sec_name)
        table = {}
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            if v is None:
                continue
            if isinstance(v, dict):  # [sweep] params
                v = {k: x.to_toml() for k, x in v.items()}
            table[f.name] = v.to_toml() if isinstance(v, Grid) else _listify(v)
        out[sec_name] = table
    if cfg.pools:
        out["pools"] = [b.to_toml() for b in cfg.pools]
    return out


def config_hash(cfg: Config) -> str:
    """SHA-256 (first 16 hex digits) of everything that affects results (not `[output]`)."""
    d = config_to_dict(cfg)
    d.pop("output", None)
    d.pop("name", None)
    d.pop("description", None)
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
