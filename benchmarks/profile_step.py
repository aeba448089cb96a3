"""Where a step's time goes: a `jax.profiler` trace mapped onto the lines of `simulate.step`.

    JAX_PLATFORMS=cpu python benchmarks/profile_step.py [--pools N] [--quick] [--out F.json]

On the throughput benchmark's scenarios (`throughput.scenario`: *matched* and *full*) it

1. times one chunk of `simulate` (compiled once), then traces a second run with
   `jax.profiler` and reads the time of every XLA operation (fusion, copy, loop) it ran;
2. attributes each operation to the line of `simulate.step` that produced it, through the
   stack frames XLA keeps in the compiled HLO (a fusion's time is split evenly over the
   operations fused into it, so shares are approximate). Work outside `step` (the draws,
   the loop) is "outside step";
3. runs three ablations in the same process, each an A/B with alternating repeats (best of
   `--repeats`, the machine is shared):
   - *draws*: the real draws against constant ones, to see what drawing costs in the loop;
   - *cohorts*: K = 4, 8, 16, 64 buckets per market and side (`market.cohorts`), fitted as
     cost = fixed + per-bucket × K;
   - *devices*: one device against the pool axis sharded over 2 host devices (a child
     process with `--xla_force_host_platform_device_count=2`).

Writes the figures to `benchmarks/results/profile_<platform>.json` and prints the tables.
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime as dt
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import pdlpjax as P
from pdlpjax.config import config_from_dict

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import throughput as T  # noqa: E402  (the benchmark's scenario and machine description)

SIM = sys.modules["pdlpjax.simulate"]  # the module (the package exports its function)
STEP_SOURCE = Path(SIM.__file__).read_text().splitlines()


def _setup(raw: dict):
    cfg = config_from_dict(raw)
    return (P.make_params(cfg), P.make_model(cfg), P.make_spec(cfg)), cfg


def best_seconds(args: tuple, steps: int, repeats: int, **kw) -> float:
    """Best-of-`repeats` run seconds of `steps` steps in one chunk (compiled beforehand)."""
    P.simulate(*args, seed=0, num_steps=steps, chunk_length=steps, **kw)
    return min(
        P.simulate(*args, seed=0, num_steps=steps, chunk_length=steps, **kw).run_seconds
        for _ in range(repeats)
    )


# --------------------------------------------------------------------------- HLO frames


class HloFrames:
    """The stack-frame tables of a compiled HLO module's text, and its instructions.

    XLA keeps, per instruction, `stack_frame_id`: frames are (file, function, line) with a
    parent (the tables' `parent_frame_id` counts from 1, 0 meaning none).
    """

    def __init__(self, text: str) -> None:
        tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
        section = None
        for line in text.splitlines():
            if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                section = line
            elif section and re.match(r"^\d+ ", line):
                key, rest = line.split(" ", 1)
                tables[section][int(key)] = rest
            elif line.strip():
                section = None
        self.files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
        self.functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
        self.locations = {k: _fields(v) for k, v in tables["FileLocations"].items()}
        self.frames = {k: _fields(v) for k, v in tables["StackFrames"].items()}
        # computation name -> stack frames of its instructions; instruction -> (calls, frame)
        self.computations: dict[str, list[int]] = {}
        self.instructions: dict[str, tuple[str | None, int | None]] = {}
        current = None
        for line in text.splitlines():
            head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
            if head:
                current = head.group(1)
                self.computations[current] = []
                continue
            inst = re.match(r"^\s+(?:ROOT )?%(\S+) = ", line)
            if inst and current:
                frame = re.search(r"stack_frame_id=(\d+)", line)
                calls = re.search(r"calls=%([^,\s}]+)", line)
                fid = int(frame.group(1)) if frame else None
                self.instructions[inst.group(1)] = (calls.group(1) if calls else None, fid)
                if fid:
                    self.computations[current].append(fid)

    def step_line(self, frame_id: int) -> int | None:
        """The line of `simulate.step` in this frame's call chain (None: not under step)."""
        seen = set()
        line = None
        while frame_id and frame_id not in seen:
            seen.add(frame_id)
            frame = self.frames.get(frame_id)
            if frame is None:
                break
            loc = self.locations[frame["file_location_id"]]
            if self.functions.get(loc["function_name_id"]) == "step" and self.files.get(
                loc["file_name_id"], ""
            ).endswith("simulate.py"):
                line = loc["line"]  # keep walking: the outermost `step` frame wins
            frame_id = frame["parent_frame_id"] - 1
        return line

    def frames_of(self, name: str) -> list[int]:
        """Stack frames of an executed operation: those of the ops fused into it."""
        calls, fid = self.instructions.get(name, (None, None))
        if calls and self.computations.get(calls):
            return self.computations[calls]
        return [fid] if fid else []


def _fields(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}


def op_times(trace_dir: str) -> dict[str, float]:
    """Microseconds per XLA operation name, summed over the trace (every thread)."""
    path = max(
        glob.glob(f"{trace_dir}/plugins/profile/*/perfetto_trace.json.gz"), key=os.path.getmtime
    )
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    skip = ("$", "Thunk", "Pjit", "ThreadpoolListener", "end: ")
    times: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(skip):
            times[e["name"]] += float(e.get("dur", 0.0))
    return dict(times)


def profile(raw: dict, steps: int, repeats: int) -> dict:
    """Run seconds, then the traced run's operation times attributed to lines of `step`."""
    args, cfg = _setup(raw)
    pools = cfg.simulation.num_pools
    seconds = best_seconds(args, steps, repeats)
    hlo = [exe.as_text() for key, exe in SIM._COMPILED.items() if key[0] == "_chunk"][-1]
    frames = HloFrames(hlo)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            P.simulate(*args, seed=0, num_steps=steps, chunk_length=steps)
        times = op_times(tmp)
    by_line: dict[int | None, float] = collections.Counter()
    for name, us in times.items():
        fids = frames.frames_of(name)
        if not fids:
            by_line[None] += us
            continue
        for fid in fids:
            by_line[frames.step_line(fid)] += us / len(fids)
    total = sum(by_line.values())
    if not total or by_line.get(None, 0.0) == total:
        raise RuntimeError(
            "no traced operation maps to a line of simulate.step: this JAX's profiler trace or "
            "HLO stack frames differ from what this script reads"
        )
    rows = [
        {
            "line": line,
            "source": STEP_SOURCE[line - 1].strip() if line else "outside step (draws, loop)",
            "share": us / total,
        }
        for line, us in sorted(by_line.items(), key=lambda kv: -kv[1])
    ]
    return {
        "scenario": raw["name"],
        "pools": pools,
        "steps": steps,
        "seconds_per_pool_step": seconds / (pools * steps),
        "distinct_operations": len(times),
        "traced_cpu_seconds_per_step": total / 1e6 / steps,
        "lines": rows,
    }


# --------------------------------------------------------------------------- ablations


def _constant_draws(model, spec, key, flip, t):
    """Draws that cost nothing: every draw 0.5, plus 1e-9·t so that XLA cannot fold the step
    into constants. The step runs the same operations whatever the draws (no branch depends
    on them), so only the drawing is left out."""
    shapes = jax.eval_shape(SIM.draw_noise, model, spec, key, t)
    wiggle = 1e-9 * t.astype(model.dtype)
    return jtu.tree_map(lambda x: jnp.full(x.shape, 0.5, x.dtype) + wiggle, shapes)


def ablate_draws(raw: dict, steps: int, repeats: int) -> dict:
    """Run seconds with the real draws against constant ones, alternating."""
    args, cfg = _setup(raw)
    pools = cfg.simulation.num_pools
    real_draw, cache = SIM._draw, SIM._COMPILED
    best = {"real": float("inf"), "constant": float("inf")}
    caches = {name: {} for name in best}  # one compiled program per variant, kept apart
    try:
        for _ in range(repeats):
            for name, fn in (("real", real_draw), ("constant", _constant_draws)):
                SIM._draw, SIM._COMPILED = fn, caches[name]
                best[name] = min(best[name], best_seconds(args, steps, 1))
    finally:
        SIM._draw, SIM._COMPILED = real_draw, cache
    per = {k: v / (pools * steps) for k, v in best.items()}
    return {
        "seconds_per_pool_step": per,
        "draw_share_of_step": 1.0 - per["constant"] / per["real"],
    }


def ablate_cohorts(raw: dict, steps: int, repeats: int, cohorts=(4, 8, 16, 64)) -> dict:
    """Run seconds per pool-step against K (buckets per market and side), and the
    least-squares fit fixed + slope·K."""
    per = {}
    for k in cohorts:
        r = copy.deepcopy(raw)
        r["market"]["cohorts"] = k
        args, cfg = _setup(r)
        per[k] = best_seconds(args, steps, repeats) / (cfg.simulation.num_pools * steps)
    ks = np.array(cohorts, float)
    ys = [per[k] for k in cohorts]
    slope, fixed = np.polyfit(ks, ys, 1)
    out = {
        "seconds_per_pool_step": {str(k): v for k, v in per.items()},
        "fit_fixed_seconds": float(fixed),
        "fit_per_cohort_seconds": float(slope),
        "book_share_at_16": float(slope * 16 / (fixed + slope * 16)),
    }
    if len(cohorts) >= 4:
        # The merge of a full book compares every pair of the K buckets and the crowd, so a
        # term in K² may show: fixed + linear·K + quadratic·K².
        quad, lin, const = np.polyfit(ks, ys, 2)
        out["fit_quadratic_seconds"] = {
            "fixed": float(const),
            "per_bucket": float(lin),
            "per_bucket_squared": float(quad),
        }
    return out


def ablate_devices(pools: int, steps: int, repeats: int) -> dict:
    """One device against 2 host devices, in a child process (the device count is fixed when
    JAX starts)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, __file__, "--child-devices", str(pools), str(steps), str(repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child_devices(pools: int, steps: int, repeats: int) -> None:
    args, _ = _setup(T.scenario(False, pools, steps))
    best = {1: float("inf"), 2: float("inf")}
    for _ in range(repeats):
        for n in best:
            best[n] = min(best[n], best_seconds(args, steps, 1, num_devices=n))
    per = {str(n): s / (pools * steps) for n, s in best.items()}
    print(json.dumps({"seconds_per_pool_step": per, "speedup_2_over_1": best[1] / best[2]}))


# --------------------------------------------------------------------------- main


def _print(result: dict) -> None:
    for prof in result["profiles"]:
        print(
            f"\n{prof['scenario']}: {prof['pools']} pools, "
            f"{1e6 * prof['seconds_per_pool_step']:.2f} µs per pool-step"
        )
        for row in prof["lines"][:15]:
            print(f"  {100 * row['share']:5.1f}%  {row['line'] or '':>4}  {row['source'][:76]}")
    d, c, v = result["draws"], result["cohorts"], result["devices"]
    print(
        f"\ndraws: {100 * d['draw_share_of_step']:.0f}% of the step "
        f"(real {1e6 * d['seconds_per_pool_step']['real']:.2f} µs, constant "
        f"{1e6 * d['seconds_per_pool_step']['constant']:.2f} µs)"
    )
    print(
        f"cohorts: {1e6 * c['fit_fixed_seconds']:.2f} µs fixed + "
        f"{1e9 * c['fit_per_cohort_seconds']:.0f} ns per bucket K; the book is "
        f"{100 * c['book_share_at_16']:.0f}% of the step at K = 16"
    )
    if "fit_quadratic_seconds" in c:
        q = c["fit_quadratic_seconds"]
        print(
            f"cohorts, quadratic fit: {1e6 * q['fixed']:.2f} µs + {1e9 * q['per_bucket']:.0f} ns"
            f" × K + {1e9 * q['per_bucket_squared']:.2f} ns × K²"
        )
    if "speedup_2_over_1" in v:
        print(f"devices: 2 host devices / 1 = {v['speedup_2_over_1']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    """Command line: profile, ablate, write the JSON, print the tables."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child-devices"]:
        _child_devices(*map(int, argv[1:4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pools", type=int, default=1024, help="pools (default 1024)")
    ap.add_argument("--steps", type=int, default=72, help="steps per timed run (default 72)")
    ap.add_argument("--repeats", type=int, default=4, help="A/B repeats (default 4)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 pools, 24 steps")
    ap.add_argument("--out", type=Path, default=None, help="JSON path")
    args = ap.parse_args(argv)
    if args.quick:
        args.pools, args.steps, args.repeats = 64, 24, 1
    out = args.out or HERE / "results" / (
        f"profile_{jax.default_backend()}" + ("-quick" if args.quick else "") + ".json"
    )
    t0 = time.perf_counter()
    load = os.getloadavg()
    matched = T.scenario(False, args.pools, args.steps)
    full = T.scenario(True, args.pools, args.steps)
    result = {
        "date": dt.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/profile_step.py", *argv]),
        "machine": T.machine(),
        "device": str(jax.devices()[0]),
        "versions": T.versions(),
        "profiles": [profile(raw, args.steps, args.repeats) for raw in (matched, full)],
        "draws": ablate_draws(matched, args.steps, args.repeats),
        "cohorts": ablate_cohorts(matched, args.steps, args.repeats),
        "devices": (
            ablate_devices(args.pools, args.steps, args.repeats)
            if jax.default_backend() == "cpu"
            else {"skipped": "not on CPU"}
        ),
    }
    result["machine"]["load_average_1_5_15_min"] = {
        "start": list(load),
        "end": list(os.getloadavg()),
    }
    result["wall_seconds"] = time.perf_counter() - t0
    T._atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    _print(result)
    print(f"\nwrote {out} ({result['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
