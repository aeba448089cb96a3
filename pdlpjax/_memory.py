"""A conservative estimate of a run's peak memory, checked before anything compiles.

The per-pool sizes are exact: the state (the hedge's covariance window included), the params
and one record row are traced with `jax.eval_shape` for a few pools, nothing allocated. The
factors that turn them into a peak were measured (peak resident memory, `ru_maxrss`, of
`pdlpjax run` on the quickstart at 8,192-131,072 pools, with and without the hedge, on a
2-core x86 CPU, JAX 0.10, float32: 4.2 states per pool at most) and rounded up. The step's
vmapped temporaries hold a few copies of the state; the record is held on the device per
chunk (in and out of the loop) and on the host (the chunks, their concatenation, the file
written): 5.8 copies measured at 32,768 pools × 96 rows; reverse mode keeps one
state per step and training pool (the scan is rematerialised per step,
`calibrate._pool_stats`). `BASE` covers the Python process, JAX and the compile.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import jax
import jax.tree_util as jtu

from .build import make_params, make_spec
from .config import SECTIONS, Config, ConfigError, Grid, _depth, _listify, specs
from .paths import GBM
from .simulate import POOL_BLOCK, _init_batched, _record

__all__ = ["estimate_bytes", "available_bytes", "check_memory"]

BASE = 1.0e9  # process + JAX + compile, bytes (measured 0.55-0.8 GB)
STATE_COPIES = 6.0  # peak per pool / state bytes per pool in a chunk (measured 3.2-4.2)
RECORD_COPIES = 8.0  # device buffers, host chunks, their concatenation, the file (measured 5.8)
GRAD_COPIES = 2.0  # reverse mode: carry saved per step, plus its cotangent


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jtu.tree_leaves(tree))


def _combos(cfg: Config) -> int:
    count = 1
    for sec, cls in SECTIONS.items():
        for name, spec in specs(cls).items():
            value = getattr(getattr(cfg, sec), name)
            if isinstance(value, Grid) and spec.kind == "dynamic":
                count *= len(value.values)
    return count


def _per_pool(cfg: Config) -> dict[str, float]:
    """Bytes per pool of the state, the params and one record row (traced, not allocated)."""
    with jax.enable_x64(cfg.simulation.dtype == "float64"):
        return _traced_sizes(cfg)


def _traced_sizes(cfg: Config) -> dict[str, float]:
    n = _combos(cfg)
    small = cfg
    if cfg.simulation.num_pools != n and not _has_per_pool_lists(cfg):
        small = dataclasses.replace(
            cfg, simulation=dataclasses.replace(cfg.simulation, num_pools=n)
        )
    pools = small.simulation.num_pools
    params, spec = make_params(small), make_spec(small)
    # The path model's own state does not depend on the data: trace with a GBM of the same
    # size instead of reading the bootstrap's files.
    model = GBM(cfg.num_risky, cfg.dt, cfg.simulation.dtype)
    state = jax.eval_shape(lambda p: _init_batched(p, model, spec=spec), params)
    record = jax.eval_shape(lambda s: jax.vmap(lambda x: _record(x, spec))(s), state)
    return {
        "state": _nbytes(state) / pools,
        "params": _nbytes(params) / pools,
        "record": _nbytes(record) / pools,
    }


def _has_per_pool_lists(cfg: Config) -> bool:
    for sec, cls in SECTIONS.items():
        for name, spec in specs(cls).items():
            value = getattr(getattr(cfg, sec), name)
            if spec.kind == "dynamic" and _depth(_listify(value)) > spec.rank:
                return True
    return False


def estimate_bytes(cfg: Config, command: str = "run") -> dict[str, float]:
    """Estimated peak bytes of `pdlpjax <command>` on `cfg`, by part, with `total`.

    `run`: every pool at once. `sweep`: one batch of `sweep.batch_pools` (the params of every
    pool are built at once). `calibrate`: the training pools of every problem under reverse
    mode, one state per step, plus the validation pools.
    """
    size = _per_pool(cfg)
    steps = cfg.simulation.num_steps
    pools = cfg.simulation.num_pools
    parts: dict[str, float] = {"base": BASE}
    if command == "sweep":
        combos = _sweep_combos(cfg)
        total_pools = combos * cfg.sweep.replicates
        pools = min(cfg.sweep.batch_pools, total_pools)
        parts["params"] = size["params"] * total_pools
    elif command == "calibrate":
        problems = _combos(cfg)
        train = problems * cfg.calibrate.batch_pools
        pools = problems * cfg.calibrate.validation_pools
        parts["params"] = size["params"] * (train + pools)
        parts["gradient"] = GRAD_COPIES * size["state"] * train * steps
    else:
        parts["params"] = size["params"] * pools
    if command != "calibrate":  # `simulate` pads the pools to whole blocks
        pools = -(-pools // POOL_BLOCK) * POOL_BLOCK
    parts["state"] = STATE_COPIES * size["state"] * pools
    every = cfg.output.record_every
    if every and command != "calibrate":
        parts["record"] = RECORD_COPIES * size["record"] * pools * (steps // every)
    blocks = max(1, len(cfg.pools))
    if command == "calibrate" and blocks > 1:  # every block of the objective at once
        for k in ("params", "state", "gradient"):
            parts[k] *= blocks
    parts["total"] = sum(parts.values())
    return parts


def _sweep_combos(cfg: Config) -> int:
    """Combinations of a sweep (times any grid of the config), without building its params."""
    sw = cfg.sweep
    swept = sw.draws or math.prod(len(g.values) for g in (sw.params or {}).values())
    return swept * _combos(cfg)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """Memory this process's cgroup may still use (containers, Slurm), or None if unlimited."""
    pairs = (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    )
    for limit_file, usage_file in pairs:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # v1 writes a huge number for "no limit"
            return max(int(limit) - usage, 0)
    return None


def available_bytes() -> int | None:
    """Memory a run may still take: the smaller of `MemAvailable` of /proc/meminfo (else the
    free physical pages) and the room left under a cgroup limit; None when neither is known."""
    known = [x for x in (_meminfo_available(), _cgroup_room()) if x is not None]
    return min(known) if known else None


def _gb(x: float) -> str:
    return f"{x / 1e9:.3g} GB"


def check_memory(cfg: Config, command: str = "run", available: int | None = None) -> None:
    """Raise `ConfigError` when the estimated peak exceeds the available memory (when known)."""
    available = available_bytes() if available is None else available
    if available is None:
        return
    parts = estimate_bytes(cfg, command)
    if parts["total"] <= available:
        return
    big = max((k for k in parts if k not in ("total", "base")), key=parts.get)
    hint = {
        "state": "fewer pools (simulation.num_pools"
        + (", or sweep.batch_pools)" if command == "sweep" else ")"),
        "params": "fewer pools (simulation.num_pools)",
        "record": "a larger output.record_every (or 0), or fewer pools (simulation.num_pools)",
        "gradient": "fewer calibrate.batch_pools or simulation.num_steps",
    }[big]
    raise ConfigError(
        f"memory: this {command} needs about {_gb(parts['total'])} (largest part: {big}, "
        f"{_gb(parts[big])}), more than the {_gb(available)} available; use {hint}"
    )
