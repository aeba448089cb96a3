"""The simulation: one pure, unbatched step; `lax.scan` over time in chunks; `vmap` over pools.

Randomness: pool i's key is `fold_in(root, i)` (with antithetic pairs, `fold_in(root, i // 2)`
and odd pools mirror their draws); step t's noise is `model.noise(fold_in(pool_key, t))`. So a
pool's path depends only on (seed, pool index, t): not on how many pools run with it nor on
the chunk length. `rollout_from_noise` takes injected draws instead.

Compiled chunk programs are cached by the shapes, dtypes and static fields of their inputs,
so a new value of any dynamic param never recompiles (`trace_count()` tells, for tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .metrics import ReturnStats, finalize_stats, init_stats, update_stats
from .paths import AbstractPathModel, PathParams
from .pool import MarketParams, PoolParams, PoolState, init_pool, share_price

__all__ = [
    "Params",
    "SimSpec",
    "SimState",
    "Record",
    "SimResult",
    "init_state",
    "step",
    "rollout",
    "rollout_from_noise",
    "pool_keys",
    "simulate",
    "trace_count",
]


class Params(eqx.Module):
    """All dynamic params of one pool (or, batched, of all pools with a leading axis)."""

    market: MarketParams
    paths: PathParams
    pool: PoolParams


class SimSpec(eqx.Module):
    """Static settings of the step: they fix shapes and control flow (changing one recompiles)."""

    has_numeraire: bool = eqx.field(static=True)
    rebalance: bool = eqx.field(static=True)
    steps_per_year: float = eqx.field(static=True)
    num_worst: int = eqx.field(static=True)
    record_every: int = eqx.field(static=True, default=0)
    antithetic: bool = eqx.field(static=True, default=False)


class SimState(eqx.Module):
    """Evolving state of one pool."""

    t: Int[Array, ""]  # steps taken
    pool: PoolState
    path: Any  # the path model's own state
    stats: ReturnStats


class Record(eqx.Module):
    """A thinned record (every `record_every` steps): LP share price, prices, reserves."""

    share_price: Float[Array, "*k"]
    prices: Float[Array, "*k n"]
    reserves: Float[Array, "*k n"]


def init_state(params: Params, model: AbstractPathModel, spec: SimSpec) -> SimState:
    """State at t = 0 of one pool."""
    pool = init_pool(params.market, params.pool, spec.has_numeraire)
    return SimState(
        t=jnp.asarray(0, jnp.int32),
        pool=pool,
        path=model.init(params.paths),
        stats=init_stats(share_price(pool), spec.num_worst),
    )


def step(
    state: SimState, params: Params, model: AbstractPathModel, spec: SimSpec, noise: Any
) -> SimState:
    """Advance one pool by one step with the given draws.

    1. Oracle: prices move by the path model's log returns (numéraire fixed at 1).
    2. Passive LP portfolio: reserves held, or reset to the target weights (`rebalance`).
    3. LP share price return folded into the online statistics.
    """
    path_state, log_ret = model.step(state.path, params.paths, noise)
    growth = jnp.exp(log_ret)
    if spec.has_numeraire:
        growth = jnp.concatenate([growth, jnp.ones((1,), growth.dtype)])
    prices = state.pool.prices * growth
    reserves = state.pool.reserves
    if spec.rebalance:
        value = jnp.sum(prices * reserves)
        reserves = params.pool.target_weights * value / prices
    pool = PoolState(prices=prices, reserves=reserves, supply=state.pool.supply)
    stats = update_stats(state.stats, share_price(pool))
    return SimState(t=state.t + 1, pool=pool, path=path_state, stats=stats)


def _draw(
    model: AbstractPathModel,
    spec: SimSpec,
    key: PRNGKeyArray,
    flip: Bool[Array, ""],
    t: Int[Array, ""],
) -> Any:
    noise = model.noise(jr.fold_in(key, t))
    if spec.antithetic:
        mirrored = model.antithetic(noise)
        noise = jtu.tree_map(lambda a, b: jnp.where(flip, b, a), noise, mirrored)
    return noise


def _record(state: SimState) -> Record:
    return Record(share_price(state.pool), state.pool.prices, state.pool.reserves)


def _scan(f: Callable, init: Any, length: int) -> tuple[Any, Any]:
    """`lax.scan(f, init, None, length)`, but a one-trip loop stays a loop.

    XLA inlines a loop of one trip and may then fuse the step with its surroundings, which
    changes float rounding by an ulp; with two trips (the second discarded) one step rounds
    exactly as it does inside a longer chunk, so results do not depend on the chunk length.
    """
    if length != 1:
        return lax.scan(f, init, None, length=length)

    def guarded(carry: Any, i: Int[Array, ""]) -> tuple[Any, Any]:
        new, y = f(carry, None)
        return jtu.tree_map(lambda a, b: jnp.where(i == 0, a, b), new, carry), y

    final, ys = lax.scan(guarded, init, jnp.arange(2))
    return final, jtu.tree_map(lambda y: y[:1], ys)


def rollout(
    state: SimState,
    params: Params,
    model: AbstractPathModel,
    spec: SimSpec,
    key: PRNGKeyArray,
    flip: Bool[Array, ""],
    num_steps: int,
) -> tuple[SimState, Record | None]:
    """Run one pool `num_steps` steps from `state`, drawing noise from `key` and `state.t`.

    **Returns:** `(state, record)`; `record` has leading axis `num_steps // record_every`
    (None when `spec.record_every` is 0).
    """

    def one(s: SimState, _: None) -> tuple[SimState, None]:
        return step(s, params, model, spec, _draw(model, spec, key, flip, s.t)), None

    if not spec.record_every:
        state, _ = _scan(one, state, num_steps)
        return state, None

    def block(s: SimState, _: None) -> tuple[SimState, Record]:
        s, _ = _scan(one, s, spec.record_every)
        return s, _record(s)

    return _scan(block, state, num_steps // spec.record_every)


def rollout_from_noise(
    state: SimState, params: Params, model: AbstractPathModel, spec: SimSpec, noise: Any
) -> tuple[SimState, Record]:
    """Run one pool over injected draws (a noise pytree with a leading time axis).

    **Returns:** `(state, record)` with a record of every step.
    """

    def one(s: SimState, n: Any) -> tuple[SimState, Record]:
        s = step(s, params, model, spec, n)
        return s, _record(s)

    return lax.scan(one, state, noise)


def pool_keys(seed: int, num_pools: int, antithetic: bool = False):
    """Per-pool keys `fold_in(key(seed), i)` and the antithetic flags, shapes `(num_pools,)`."""
    idx = np.arange(num_pools)
    base = idx // 2 if antithetic else idx
    root = jr.key(seed)
    keys = jax.vmap(lambda i: jr.fold_in(root, i))(jnp.asarray(base, jnp.uint32))
    flips = jnp.asarray((idx % 2 == 1) & antithetic)
    return keys, flips


# --------------------------------------------------------------------------- batched driver

_TRACES = {"count": 0}


def trace_count() -> int:
    """How many times the batched chunk function has been traced (tests use it)."""
    return _TRACES["count"]


def _chunk(state, params, model, keys, flips, *, spec: SimSpec, length: int):
    _TRACES["count"] += 1

    def one_pool(s, p, k, f):
        return rollout(s, p, model, spec, k, f, length)

    return jax.vmap(one_pool)(state, params, keys, flips)


def _init_batched(params, model, *, spec: SimSpec):
    return jax.vmap(lambda p: init_state(p, model, spec))(params)


_COMPILED: dict = {}


def _signature(args) -> tuple:
    leaves, treedef = jtu.tree_flatten(args)
    return treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves)


def _compiled(fn: Callable, args: tuple, **static: Any) -> tuple[Callable, float]:
    """AOT-compile `fn(*args, **static)` once per input signature; return it and the seconds
    spent compiling now (0 when cached)."""
    key = (fn.__name__, _signature(args), tuple(sorted(static.items())))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    exe = jax.jit(fn, static_argnames=tuple(static)).lower(*args, **static).compile()
    _COMPILED[key] = exe
    return exe, time.perf_counter() - t0


@dataclass
class SimResult:
    """What `simulate` returns: final batched state, per-pool metrics, record, timings."""

    state: SimState
    metrics: dict[str, np.ndarray]
    record: Record | None
    compile_seconds: float
    run_seconds: float
    chunk_seconds: list[float] = field(default_factory=list)


def simulate(
    params: Params,
    model: AbstractPathModel,
    spec: SimSpec,
    *,
    seed: int,
    num_steps: int,
    chunk_length: int = 0,
    progress: Callable[[int, int, float, float], None] | None = None,
) -> SimResult:
    """Simulate every pool of `params` (leaves with a leading pool axis) for `num_steps`.

    The horizon runs in chunks of `chunk_length` steps (0: one chunk); `progress(done, total,
    run_seconds, compile_seconds)` is called after each. Compilation is timed apart from running.
    """
    num_pools = jtu.tree_leaves(params)[0].shape[0]
    keys, flips = pool_keys(seed, num_pools, spec.antithetic)
    chunk_length = chunk_length or num_steps
    init_fn, compile_s = _compiled(_init_batched, (params, model), spec=spec)
    state = init_fn(params, model)
    records, chunk_seconds = [], []
    t_run = 0.0
    done = 0
    while done < num_steps:
        length = min(chunk_length, num_steps - done)
        fn, c = _compiled(_chunk, (state, params, model, keys, flips), spec=spec, length=length)
        compile_s += c
        t0 = time.perf_counter()
        state, rec = fn(state, params, model, keys, flips)
        jax.block_until_ready(state)
        dt = time.perf_counter() - t0
        t_run += dt
        chunk_seconds.append(dt)
        if rec is not None:
            records.append(jtu.tree_map(np.asarray, rec))
        done += length
        if progress is not None:
            progress(done, num_steps, t_run, compile_s)
    metrics = {
        k: np.asarray(v) for k, v in finalize_stats(state.stats, spec.steps_per_year).items()
    }
    record = None
    if records:
        record = jtu.tree_map(lambda *xs: np.concatenate(xs, axis=1), *records)
    return SimResult(state, metrics, record, compile_s, t_run, chunk_seconds)
