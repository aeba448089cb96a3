"""Gradient calibration with optax: fit declared dynamic params to maximise an LP objective.

`pdlpjax calibrate CONFIG` reads `[calibrate]`: the free params (each a dynamic scalar key
with a transform that keeps it in range: value = lo + (hi − lo)·sigmoid(θ), lo + softplus(θ)
or θ), the objective (Sharpe, mean-variance certainty equivalent or CVaR-penalised return of
the hedged LP or the plain LP, per pool, averaged over pools), the optimiser and its steps.
Each training step simulates `batch_pools` fresh markets per problem (or a fixed set) and
differentiates the whole simulation pathwise (`jax.grad` through `lax.scan` of the step,
rematerialised per step with `jax.checkpoint`). Every grid combination of the config is an
independent problem; all are fitted in one compiled program, vmapped over pools.

Exact mode only, for now: parameters that act through discrete events of the pool (the fee
moves trade acceptance, liquidations, arbitrage thresholds) get the pathwise gradient, which
ignores the jumps those events make, so it is biased; the hedge's params (`hedge.damping`,
`hedge.risk_aversion`, `hedge.penalty`, `hedge.cost`) do not change the pool's path at all,
and their gradients are exact. The hedge period is a count, not differentiable.

Outputs: `calibration.csv` (step, problem, loss, each param, gradient norm, validation
score), `summary.json` (fitted params per problem with their validation score and 95%
interval, before and after), `calibration.png` (objective on the training batches and on the
validation pools, and each param's trajectory), `config.toml`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import sys
import time
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tomli_w
from jaxtyping import Array, Float

from . import _io
from .config import (
    SECTIONS,
    Config,
    ConfigError,
    FreeParam,
    Grid,
    config_hash,
    config_to_dict,
    resolve_dynamic,
    specs,
)
from .metrics import ReturnStats, finalize_stats, mean_ci

__all__ = [
    "CalibrationError",
    "to_value",
    "from_value",
    "objective_value",
    "make_optimizer",
    "clip_rows",
    "fit",
    "calibrate_config",
]


class CalibrationError(RuntimeError):
    """The optimisation broke (a NaN gradient); one line naming the param and step."""


def to_value(theta: Float[Array, "*b"], p: FreeParam) -> Float[Array, "*b"]:
    """The param's value from its unconstrained coordinate θ: inside its bounds (in float32
    it can round onto a bound once |θ| is large: sigmoid(θ) is 1 for θ ≥ 16.7)."""
    if p.transform == "sigmoid":
        return p.lo + (p.hi - p.lo) * jax.nn.sigmoid(theta)
    if p.transform == "softplus":
        return p.lo + jax.nn.softplus(theta)
    return theta


def from_value(value: float, p: FreeParam) -> float:
    """θ such that `to_value(θ, p) == value` (the value must lie inside the bounds)."""
    if p.transform == "sigmoid":
        u = (value - p.lo) / (p.hi - p.lo)
        return float(np.log(u) - np.log1p(-u))
    if p.transform == "softplus":
        x = value - p.lo
        return float(x + np.log(-np.expm1(-x)))  # inverse softplus, stable for large x
    return float(value)


def objective_value(
    stats: ReturnStats,
    kind: str,
    steps_per_year: float,
    ce_risk_aversion: float = 2.0,
    cvar_weight: float = 1.0,
) -> Float[Array, "*b"]:
    """The objective to maximise, per pool (batched stats welcome).

    `sharpe`: annualised Sharpe (0 where the vol is 0); `certainty_equivalent`: annualised
    mean − (ce_risk_aversion/2)·annualised variance; `cvar`: (mean per step + cvar_weight ·
    mean of the worst 5% of step returns) × steps per year.
    """
    m = finalize_stats(stats, steps_per_year)
    if kind == "sharpe":
        vol = m["ann_vol"]
        return jnp.where(vol > 0, m["ann_mean"] / jnp.where(vol > 0, vol, 1.0), 0.0)
    if kind == "certainty_equivalent":
        return m["ann_mean"] - 0.5 * ce_risk_aversion * m["ann_vol"] ** 2
    if kind == "cvar":
        return m["ann_mean"] + cvar_weight * m["cvar_5"] * steps_per_year
    raise ValueError(f"unknown objective {kind!r}")


def clip_rows(max_norm: float) -> optax.GradientTransformation:
    """Clip each row of a (problems, params) update to norm `max_norm`: unlike
    `optax.clip_by_global_norm`, one problem's gradient never rescales another's."""

    def clip(updates, params=None):
        norms = jnp.sqrt(jnp.sum(updates**2, axis=-1, keepdims=True))
        tiny = jnp.finfo(updates.dtype).tiny
        return updates * jnp.minimum(1.0, max_norm / jnp.maximum(norms, tiny))

    return optax.stateless(clip)


def make_optimizer(name: str, learning_rate: float, clip_norm: float = 0.0):
    """An optax optimiser by name ("adam", "adamw", "sgd"), optionally after clipping each
    problem's gradient norm (`clip_rows`). Adam's and SGD's updates are elementwise, so the
    problems of a (problems, params) θ stay independent."""
    base = {"adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd}[name](learning_rate)
    return optax.chain(clip_rows(clip_norm), base) if clip_norm > 0 else base


def fit(
    loss_and_grad: Callable,
    theta0: Array,
    optimizer: optax.GradientTransformation,
    steps: int,
    callback: Callable[[int, Array, Array, Array], None] | None = None,
) -> Array:
    """Minimise with optax: `loss_and_grad(θ, step) -> (loss, grad)`; `callback(step, θ,
    loss, grad)` sees every step (before the update). **Returns:** the final θ."""
    theta, state = theta0, optimizer.init(theta0)
    for s in range(steps):
        loss, grad = loss_and_grad(theta, s)
        if callback is not None:
            callback(s, theta, loss, grad)
        updates, state = optimizer.update(grad, state, theta)
        theta = optax.apply_updates(theta, updates)
    return theta


def _pool_stats(params, model, spec, keys, flips, num_steps: int, target: str):
    """Every pool's final return statistics, by a differentiable scan over the steps."""
    from .simulate import _draw, init_state, step

    def one(p, k, f):
        s = init_state(p, model, spec)

        @jax.checkpoint  # recompute a step's internals on the backward pass, not store them
        def body(s, _):
            return step(s, p, model, spec, _draw(model, spec, k, f, s.t)), None

        s, _ = jax.lax.scan(body, s, None, length=num_steps)
        return s.hedge.stats if target == "hedged_lp" else s.stats

    return jax.vmap(one)(params, keys, flips)


def _inject(params, free: dict[str, FreeParam], theta: Array, problem: np.ndarray):
    """Params with each free key set to its value for each pool's problem."""
    for j, (name, p) in enumerate(free.items()):
        sec, key = name.split(".")
        value = to_value(theta[:, j], p)[problem]
        leaf = getattr(getattr(params, sec), key)
        params = eqx.tree_at(
            lambda q, sec=sec, key=key: getattr(getattr(q, sec), key),
            params,
            value.astype(leaf.dtype),
        )
    return params


def _problems(cfg: Config, pools_each: int) -> tuple[Config, list[dict]]:
    """The config with `pools_each` pools per grid combination, and the combinations."""
    count = 1
    for sec in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, sec)):
            value = getattr(getattr(cfg, sec), f.name)
            if isinstance(value, Grid) and specs(SECTIONS[sec])[f.name].kind == "dynamic":
                count *= len(value.values)
    sim = dataclasses.replace(cfg.simulation, num_pools=count * pools_each)
    run = dataclasses.replace(cfg, simulation=sim)
    return run, resolve_dynamic(run)[1]


def calibrate_config(
    cfg: Config, out_dir: str | Path | None = None, *, quiet: bool = False
) -> Path:
    """Fit `cfg`'s `[calibrate]` params and write the results folder; return its path."""
    if cfg.simulation.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    from .build import make_model, make_params, make_spec
    from .results import prepare_out_dir, versions
    from .sanity import config_warnings, emit
    from .simulate import pool_keys

    cal = cfg.calibrate
    if not cal.params:
        raise ConfigError('calibrate.params: name at least one free param, e.g. "hedge.damping"')
    if cal.target == "hedged_lp" and not cfg.hedge.enabled:
        raise ConfigError('calibrate.target: "hedged_lp" needs hedge.enabled = true')
    free = dict(cal.params)
    if "hedge.damping" in free and cfg.hedge.damping_rule != "fixed":
        raise ConfigError(
            f'calibrate.params."hedge.damping": the damping rule "{cfg.hedge.damping_rule}" '
            'sets γ itself; fit it with hedge.damping_rule = "fixed"'
        )
    train_cfg, combos = _problems(cfg, cal.batch_pools)
    val_cfg, _ = _problems(cfg, cal.validation_pools)
    for name in free:  # a free key cannot also be a grid axis
        if any(name in c for c in combos):
            raise ConfigError(f"calibrate.params.{name}: is also a grid axis of the config")
    n_prob, steps = len(combos), cfg.simulation.num_steps
    model, spec = make_model(cfg), make_spec(train_cfg)
    if cfg.pools:  # one (params, spec) per block; the objective averages over the blocks
        from .build import make_block

        train = [make_block(train_cfg, b) for b in range(len(cfg.pools))]
        val = [make_block(val_cfg, b) for b in range(len(cfg.pools))]
    else:
        train, val = [(make_params(train_cfg), spec)], [(make_params(val_cfg), spec)]
    prob_train = np.arange(n_prob * cal.batch_pools) // cal.batch_pools
    prob_val = np.arange(n_prob * cal.validation_pools) // cal.validation_pools
    out = prepare_out_dir(cfg, out_dir)
    _io.write_text(out / "config.toml", tomli_w.dumps(config_to_dict(cfg)))
    notes = config_warnings(cfg)
    emit(notes)

    def scores(theta, blocks, problem, keys, flips):
        """Each pool's objective, averaged over the blocks of `[[pools]]` (one block else)."""
        total = 0.0
        for params, block_spec in blocks:
            stats = _pool_stats(
                _inject(params, free, theta, problem),
                model,
                block_spec,
                keys,
                flips,
                steps,
                cal.target,
            )
            total = total + objective_value(
                stats, cal.objective, spec.steps_per_year, cal.ce_risk_aversion, cal.cvar_weight
            )
        return total / len(blocks)

    def loss(theta, keys, flips):
        obj = scores(theta, train, prob_train, keys, flips)
        per_problem = jax.ops.segment_sum(obj, jnp.asarray(prob_train), n_prob) / cal.batch_pools
        return -jnp.sum(per_problem), -per_problem

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    val_fn = jax.jit(lambda th, k, f: scores(th, val, prob_val, k, f))
    replicate = np.arange(n_prob * cal.batch_pools) % cal.batch_pools
    # Validation markets: a root of their own, the same for every problem (paired).
    vkeys, vflips = pool_keys(
        cfg.simulation.seed + 1_000_003,
        n_prob * cal.validation_pools,
        spec.antithetic,
        np.arange(n_prob * cal.validation_pools) % cal.validation_pools,
    )
    names = list(free)
    theta0 = jnp.asarray(
        np.tile([from_value(p.init, p) for p in free.values()], (n_prob, 1)),
        jnp.dtype(cfg.simulation.dtype),
    )
    rows: list[list] = []
    history: list[dict] = []
    t0 = time.perf_counter()

    def validate(theta) -> list[dict]:
        v = np.asarray(val_fn(theta, vkeys, vflips))
        return [mean_ci(v[prob_val == i]) for i in range(n_prob)]

    initial_val = validate(theta0)

    def loss_and_grad(theta, s):
        index = replicate + (s * cal.batch_pools if cal.fresh_paths else 0)
        keys, flips = pool_keys(cfg.simulation.seed, len(replicate), spec.antithetic, index)
        (total, per_problem), grad = grad_fn(theta, keys, flips)
        g = np.asarray(grad)
        if not np.all(np.isfinite(g)):
            i, j = map(int, np.argwhere(~np.isfinite(g))[0])
            raise CalibrationError(
                f"calibrate: the gradient of {names[j]} is not finite at step {s} "
                f"(problem {i}, value {float(to_value(theta[i, j], free[names[j]])):.6g})"
            )
        history.append({"step": s, "per_problem": np.asarray(per_problem), "grad": g})
        return total, grad

    def record(s, theta, loss_value, grad):
        values = np.asarray(
            jnp.stack([to_value(theta[:, j], p) for j, p in enumerate(free.values())], axis=1)
        )
        per_problem = history[-1]["per_problem"]
        norms = np.sqrt(np.sum(np.asarray(grad) ** 2, axis=1))
        val = validate(theta) if s % cal.validate_every == 0 else None
        for i in range(n_prob):
            rows.append(
                [
                    s,
                    i,
                    f"{per_problem[i]:.8g}",
                    *(f"{x:.8g}" for x in values[i]),
                    f"{norms[i]:.6g}",
                    "" if val is None else f"{val[i]['mean']:.8g}",
                ]
            )
        if not quiet and (s % cal.validate_every == 0 or s == cal.steps - 1):
            shown = ", ".join(f"{n}={values[0, j]:.4g}" for j, n in enumerate(names))
            print(
                f"[{cfg.name}] step {s + 1}/{cal.steps}  loss {float(loss_value):.5g}  "
                f"{shown}{' ...' if n_prob > 1 else ''}  {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    if not quiet:
        print(f"[{cfg.name}] compiling…", file=sys.stderr, flush=True)
    theta = fit(
        loss_and_grad,
        theta0,
        make_optimizer(cal.optimizer, cal.learning_rate, cal.clip_norm),
        cal.steps,
        record,
    )
    final_val = validate(theta)
    fitted = np.asarray(
        jnp.stack([to_value(theta[:, j], p) for j, p in enumerate(free.values())], axis=1)
    )
    header = ["step", "problem", "loss", *names, "grad_norm", "validation"]
    for i in range(n_prob):  # the fitted values after the last update
        fit_row = [cal.steps, i, "", *(f"{x:.8g}" for x in fitted[i])]
        rows.append([*fit_row, "", f"{final_val[i]['mean']:.8g}"])
    _io.write_csv(out / "calibration.csv", header, rows)
    summary = {
        "name": cfg.name,
        "objective": cal.objective,
        "target": cal.target,
        "problems": [
            {
                "grid": {k: _plain(v) for k, v in combos[i].items()},
                "fitted": {n: float(fitted[i, j]) for j, n in enumerate(names)},
                "initial": {n: free[n].init for n in names},
                "validation": final_val[i],
                "validation_initial": initial_val[i],
            }
            for i in range(n_prob)
        ],
        "steps": cal.steps,
        "batch_pools": cal.batch_pools,
        "validation_pools": cal.validation_pools,
        "simulation_steps": steps,
        "wall_seconds": time.perf_counter() - t0,
        "config_hash": config_hash(cfg),
        "versions": versions(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "warnings": notes,
    }
    _io.write_json(out / "summary.json", summary)
    if cfg.output.plots:
        _plots(out, cfg, rows, names, n_prob, combos)
    if not quiet:
        v = final_val[0]
        shown = ", ".join(f"{n}={fitted[0, j]:.4g}" for j, n in enumerate(names))
        lo, hi = v["ci95"]
        print(
            f"[{cfg.name}] fitted {shown}; validation {cal.objective} {v['mean']:.4g} "
            f"[{lo:.4g}, {hi:.4g}] (was {initial_val[0]['mean']:.4g}); results in {out}",
            file=sys.stderr,
        )
    return out


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, tuple | list) else float(v)


def _objective_label(cfg: Config) -> str:
    """The calibration objective with its unit, for a y-axis."""
    cal = cfg.calibrate
    who = "hedged LP" if cal.target == "hedged_lp" else "LP"
    if cal.objective == "sharpe":
        return f"{who} Sharpe (annualised)"
    if cal.objective == "certainty_equivalent":
        return f"{who} certainty equivalent (return per year)"
    return f"{who} mean + {cal.cvar_weight:g}·CVaR5% (per year)"


def _plots(
    out: Path, cfg: Config, rows: list, names: list[str], n_prob: int, combos: list | None = None
) -> None:
    """calibration.png: the objective per problem (training batches as a line, held-out
    validation as markers) and each free param's trajectory, against the optimiser step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from .plots import axis_label

    spy = cfg.simulation.steps_per_year
    cal = cfg.calibrate
    ncol = 1 + len(names)
    fig, axes = plt.subplots(
        1, ncol, figsize=(4.6 * ncol, 3.9), layout="constrained", squeeze=False
    )
    axes = axes[0]
    handles = [
        Line2D([], [], color="0.3", lw=1, label=f"training ({cal.batch_pools} pools/step)"),
        Line2D(
            [],
            [],
            color="0.3",
            lw=1,
            ls="--",
            marker="o",
            ms=4,
            label=f"validation ({cal.validation_pools} held-out pools)",
        ),
    ]
    for i in range(n_prob):
        color = f"C{i % 10}"
        label = f"problem {i}"
        if combos and combos[i]:
            label = ", ".join(f"{k}={_short(v)}" for k, v in combos[i].items())
        mine = [r for r in rows if r[1] == i]
        train = [r for r in mine if r[2] != ""]
        x = [r[0] for r in train]
        # The training loss is −objective on the step's batch: plot the objective itself.
        axes[0].plot(x, [-float(r[2]) for r in train], lw=1, color=color, alpha=0.7)
        val = [r for r in mine if r[-1] != ""]
        axes[0].plot(
            [r[0] for r in val],
            [float(r[-1]) for r in val],
            ls="--",
            marker="o",
            ms=4,
            lw=1,
            color=color,
        )
        handles.append(Line2D([], [], color=color, lw=2, label=label))
        for j in range(len(names)):
            # the params at each step and, at step = steps, the fitted values
            axes[1 + j].plot(
                [r[0] for r in mine], [float(r[3 + j]) for r in mine], lw=1, color=color
            )
    axes[0].set_title("objective (higher is better)", fontsize=9)
    axes[0].set_ylabel(_objective_label(cfg))
    axes[0].legend(handles=handles[: 2 + min(n_prob, 6)], fontsize=7, loc="best")
    for j, n in enumerate(names):
        axes[1 + j].set_title(n, fontsize=9)
        axes[1 + j].set_ylabel(axis_label(n, spy))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    problems = f"{n_prob} problem{'s' if n_prob > 1 else ''}"
    fig.suptitle(f"{cfg.name}: maximising {_objective_label(cfg)}, {problems}", fontsize=10)
    _io.save_figure(out / "calibration.png", fig)
    plt.close(fig)


def _short(v) -> str:
    return " ".join(f"{x:.3g}" for x in np.ravel(v)) if isinstance(v, list | tuple) else f"{v:.3g}"
