"""pdlpjax: a JAX Monte Carlo engine for Perpetual Demand Lending Pools.

The public API is what this module exports; submodules are documented but may change.
"""

from importlib.metadata import PackageNotFoundError, version

from .arbitrage import (
    ArbResult,
    Claim34,
    ClaimCheck,
    claim_3_1_bound,
    claim_3_2_bound,
    claim_3_3_bound,
    claim_3_4,
    create_arbitrage,
    redeem_arbitrage,
    swap_arbitrage_oracle,
    swap_arbitrage_uniswap,
)
from .build import make_model, make_params, make_spec
from .config import Config, ConfigError, config_hash, load_config, resolve_dynamic
from .data import Closes, DataError, load_closes, log_returns
from .discount import (
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
from .hedge import (
    CovState,
    HedgeParams,
    HedgeState,
    ewma_covariance,
    hedge_metrics,
    init_cov_state,
    mean_variance_hedge,
    oas_shrinkage,
    pool_delta,
    price_change_cov,
    rolling_covariance,
    update_cov_state,
)
from .market import Book, MarketParams
from .metrics import ReturnStats, finalize_stats, init_stats, mean_ci, update_stats
from .paths import GBM, AbstractPathModel, Bootstrap, Garch, MertonJump, PathParams
from .pool import Accounts, PoolParams, PoolState, pool_value, weights
from .results import run_config
from .simulate import (
    Params,
    Record,
    SimResult,
    SimSpec,
    SimState,
    StepNoise,
    aum,
    draw_noise,
    init_state,
    lp_share_price,
    pool_keys,
    rollout,
    rollout_from_noise,
    simulate,
    step,
)
from .sweep import paired_difference, run_sweep, sweep_config

try:
    __version__ = version("pdlpjax")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

__all__ = [
    "ArbResult",
    "Claim34",
    "ClaimCheck",
    "claim_3_1_bound",
    "claim_3_2_bound",
    "claim_3_3_bound",
    "claim_3_4",
    "create_arbitrage",
    "redeem_arbitrage",
    "swap_arbitrage_oracle",
    "swap_arbitrage_uniswap",
    "burn_fee_bps",
    "discount_subgradient",
    "glp_discount",
    "glp_discount_axiomatic",
    "glp_discount_smooth",
    "gmx_discount",
    "gmx_fee_bps",
    "gmx_fee_bps_smooth",
    "mint_fee_bps",
    "quadratic_surrogate",
    "swap_fee_bps",
    "Accounts",
    "Book",
    "StepNoise",
    "aum",
    "draw_noise",
    "lp_share_price",
    "AbstractPathModel",
    "Bootstrap",
    "Closes",
    "Config",
    "ConfigError",
    "DataError",
    "GBM",
    "Garch",
    "MarketParams",
    "MertonJump",
    "Params",
    "PathParams",
    "PoolParams",
    "PoolState",
    "Record",
    "ReturnStats",
    "SimResult",
    "SimSpec",
    "SimState",
    "config_hash",
    "finalize_stats",
    "init_state",
    "init_stats",
    "load_closes",
    "load_config",
    "log_returns",
    "make_model",
    "make_params",
    "make_spec",
    "mean_ci",
    "pool_keys",
    "pool_value",
    "resolve_dynamic",
    "rollout",
    "rollout_from_noise",
    "run_config",
    "simulate",
    "step",
    "update_stats",
    "weights",
    "CovState",
    "HedgeParams",
    "HedgeState",
    "ewma_covariance",
    "hedge_metrics",
    "init_cov_state",
    "mean_variance_hedge",
    "oas_shrinkage",
    "pool_delta",
    "price_change_cov",
    "rolling_covariance",
    "update_cov_state",
    "paired_difference",
    "run_sweep",
    "sweep_config",
]
