"""What running the pools in fixed blocks costs: `simulate(pool_block=B)` against one block.

    JAX_PLATFORMS=cpu python benchmarks/pool_block.py [--pools N] [--steps T] [--out F.json]

`simulate` runs the pools in blocks of `pool_block` pools through one compiled program
(default 128 on a CPU), so that a pool's results do not depend on the batch size on any CPU
(see `pdlpjax.simulate.simulate`), the blocks of a chunk on a thread per core. The
baseline, in the same process, is `pool_block = 0`:
the whole batch as one program, as before blocks. Throughput's matched scenario
(`benchmarks/throughput.py`: 5 risky assets + USDC, K = 16, hourly), `--pools` pools,
`--steps` steps in chunks of 24. Each block size is compiled first (its compile seconds
reported apart), then timed `--repeats` times, the block sizes alternating so that a change
of load on a shared machine hits them alike; the best time counts. Also reported: the
wall time of a 7-pool run (padded to one block) against its unpadded baseline, the price a
small run pays. Writes `benchmarks/results/pool_block_cpu.json`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

import pdlpjax as P
from pdlpjax.config import config_from_dict

HERE = Path(__file__).resolve().parent


def _throughput():
    spec = importlib.util.spec_from_file_location("throughput", HERE / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["throughput"] = mod
    spec.loader.exec_module(mod)
    return mod


def best_run_seconds(args: tuple, steps: int, block: int, repeats: int) -> list[float]:
    """Run seconds (compile excluded) of `repeats` runs of one block size."""
    out = []
    for _ in range(repeats):
        res = P.simulate(*args, seed=0, num_steps=steps, chunk_length=24, pool_block=block)
        out.append(res.run_seconds)
    return out


def main(argv: list[str] | None = None) -> int:
    """Time the block sizes and write the JSON; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pools", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 128, 256, 1024, 0])
    ap.add_argument("--out", default=str(HERE / "results" / "pool_block_cpu.json"))
    a = ap.parse_args(argv)
    tp = _throughput()

    def args_for(pools: int) -> tuple:
        cfg = config_from_dict(tp.scenario(False, pools, a.steps))
        return P.make_params(cfg), P.make_model(cfg), P.make_spec(cfg)

    args = args_for(a.pools)
    compile_s = {}
    for b in a.blocks:  # compile each program once (a one-chunk run)
        res = P.simulate(*args, seed=0, num_steps=24, chunk_length=24, pool_block=b)
        compile_s[b] = res.compile_seconds
    times: dict[int, list[float]] = {b: [] for b in a.blocks}
    for _ in range(a.repeats):
        for b in a.blocks:
            times[b] += best_run_seconds(args, a.steps, b, 1)
    base = min(times[0]) if 0 in times else None
    rows = []
    for b in a.blocks:
        best = min(times[b])
        rows.append(
            {
                "pool_block": b,
                "compile_seconds": compile_s[b],
                "run_seconds": times[b],
                "best_run_seconds": best,
                "pool_steps_per_second": a.pools * a.steps / best,
                "speed_vs_one_block": None if base is None else base / best,
            }
        )
        print(
            f"pool_block {b:>5}: compile {compile_s[b]:5.1f} s  best run {best:6.2f} s  "
            f"{a.pools * a.steps / best:9.3g} pool-steps/s"
            + ("" if base is None else f"  {base / best:4.2f}x one block"),
            flush=True,
        )
    small = args_for(7)
    small_wall = {}
    for b in (P.simulate.__globals__["POOL_BLOCK"], 0):
        P.simulate(*small, seed=0, num_steps=24, chunk_length=24, pool_block=b)  # compile
        t0 = time.perf_counter()
        P.simulate(*small, seed=0, num_steps=a.steps, chunk_length=24, pool_block=b)
        small_wall[str(b)] = time.perf_counter() - t0
    print(f"7 pools, {a.steps} steps, wall: {small_wall}", flush=True)
    result = {
        "benchmark": "pool_block",
        "date": dt.date.today().isoformat(),
        "machine": tp.machine(),
        "versions": tp.versions(),
        "backend": jax.default_backend(),
        "scenario": "throughput matched (5 risky + USDC, K = 16, hourly), float32",
        "pools": a.pools,
        "steps": a.steps,
        "chunk_length": 24,
        "repeats": a.repeats,
        "rows": rows,
        "seven_pools_wall_seconds": small_wall,
        "mean_total_return_check": float(
            np.nanmean(P.simulate(*args, seed=0, num_steps=24).metrics["total_return"])
        ),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
