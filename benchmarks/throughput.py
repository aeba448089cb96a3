"""Throughput of pdlpjax against a vectorised NumPy baseline and a per-pool Python loop.

    JAX_PLATFORMS=cpu python benchmarks/throughput.py [--quick] [--max-pools N] [--out F.json]
        [--previous PATH]

The standard scenario: 5 risky crypto assets + USDC, K = 16 cohorts, hourly steps, 720 steps
(30 days), the GLP discount (`pool.discount = "glp"`) and a delta hedge every 24 steps (when
`pdlpjax.config` has a `[hedge]` section). The *matched* scenario is the same without the
discount and the hedge: exactly what the baselines implement, so only there are the ratios
like for like. In one run it measures, per pool count (64 … 16,384):

- pdlpjax (`simulate`: jit + vmap over pools, a dynamic-trip `fori_loop` over time), full and
  matched scenario. Each is run twice: a warm-up run of one chunk compiles the chunk program
  (its compile seconds are reported), then the timed run of the whole horizon reuses it;
- `benchmarks/numpy_vectorised.py` (NumPy over a leading pool axis, float64) on the matched
  scenario, fewer steps;
- pdlpjax's matched scenario at K = 8 buckets as well (`market.cohorts = 8`);
- with `--previous PATH`, the matched scenario on the pdlpjax at PATH (a checkout of an
  earlier commit, e.g. a `git worktree` of the engine before the crowd-bucket book), in a
  subprocess that imports PATH's `pdlpjax` and runs this file with `--worker`: same
  scenario, pool count, steps and timing method, and the ratio new / previous;
- once, `tests/reference.py`'s per-pool loop (one Python object per bucket) on 4 pools.
The baselines get their draws from JAX's `draw_noise`, timed apart and not counted in their
step time; pdlpjax draws its own inside the step, and that is counted in its run time.

Figures: pool-steps per second, compile seconds, the batched SimState's bytes, peak RSS
delta, bytes of state touched per pool-step (estimated as 2 × state bytes per pool: the
step reads and writes every leaf of the state once) and the implied bandwidth against a
NumPy memcpy measured in the same run; scaling checks (per-pool cost and memory against pool
count, memory and compile time against the number of steps). Writes a JSON and a log-log PNG
(pool-steps/s against pools) to `benchmarks/results/`, and prints a table as it goes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.tree_util as jtu
import numpy as np

import pdlpjax as P
from pdlpjax import config as pconfig
from pdlpjax.config import config_from_dict

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

POOL_COUNTS = (64, 256, 1024, 4096, 16384)
QUICK_POOL_COUNTS = (64, 256)
GOAL_POOLS = 4096  # the pool count at which the goals (≥10× NumPy, ≥1000× loop) are judged
H200_BANDWIDTH = 4.8e12  # B/s, nominal HBM3e bandwidth of one NVIDIA H200

ASSETS = ["BTC", "ETH", "SOL", "BNB", "XRP"]
# BTC/ETH/SOL vols and correlations as in configs/quickstart.toml (Binance daily closes
# 2020-09 .. 2026-01); BNB and XRP are set to typical crypto values (vol 65-90%, correlation
# 0.5-0.65 with the rest). The matrix is positive definite (smallest eigenvalue 0.18).
CORRELATION = [
    [1.0, 0.809, 0.588, 0.65, 0.55],
    [0.809, 1.0, 0.655, 0.65, 0.55],
    [0.588, 0.655, 1.0, 0.55, 0.5],
    [0.65, 0.65, 0.55, 1.0, 0.5],
    [0.55, 0.55, 0.5, 0.5, 1.0],
]


def _load(name: str, path: Path):
    """Import a module from a file (benchmarks/ and tests/ are not packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


nv = _load("numpy_vectorised", HERE / "numpy_vectorised.py")
ref = _load("reference", ROOT / "tests" / "reference.py")


# --------------------------------------------------------------------------- scenario


def hedge_available() -> bool:
    """Whether this pdlpjax has a `[hedge]` config section (being added concurrently)."""
    return "hedge" in getattr(pconfig, "SECTIONS", {})


def scenario(
    full: bool, num_pools: int, num_steps: int, dtype: str = "float32", cohorts: int = 16
) -> dict:
    """The standard scenario as a raw config dict; `full=False` is the matched scenario
    (no discount, no hedge: what the baselines implement).

    It sets only keys that the engine before the crowd-bucket book (240ee2c) has as well
    (`market.leverage_spread` stays at its default), so `--previous` runs the same dict.
    """
    raw = {
        "name": "throughput-" + ("full" if full else "matched"),
        "market": {
            "assets": ASSETS,
            "numeraire": "USDC",
            "initial_prices": [93888.85, 3242.13, 139.44, 900.0, 2.1],
            "cohorts": cohorts,
            "open_rate": [0.0008, 0.0005, 0.002, 0.001, 0.001],
            "mean_holding": 48.0,
            "leverage": 5.0,
            "leverage_vol": 0.5,
            "max_leverage": 20.0,
            "funding_kappa": 1.0e-4,
            "funding_cap": 1.0e-3,
            "arb_leverage": 3.0,
        },
        "paths": {
            "model": "gbm",
            "drifts": 0.0,
            "vols": [0.585, 0.788, 1.156, 0.65, 0.9],
            "correlation": CORRELATION,
        },
        "pool": {
            "mode": "pdlp",
            "initial_value": 1.0e6,
            "target_weights": [0.2, 0.15, 0.15, 0.1, 0.1, 0.3],
            "fee": 5.0e-5,
            "max_utilisation": 0.9,
            "lp_flow_vol": 0.5,
            "discount": "glp" if full else "none",
        },
        "simulation": {
            "num_pools": num_pools,
            "num_steps": num_steps,
            "steps_per_year": 8760.0,
            "dtype": dtype,
            "progress": False,
            "seed": 0,
        },
    }
    if full and hedge_available():
        raw["hedge"] = {"enabled": True, "every": 24}
    return raw


def chunk_for(num_steps: int) -> int:
    """Chunk length of the timed runs: the warm-up run is one chunk, so keep it short."""
    return next((c for c in (72, 24) if num_steps % c == 0 and c < num_steps), num_steps)


# --------------------------------------------------------------------------- measuring


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRss:
    """Peak resident memory of the block above the RSS at its start, in bytes.

    Resets the kernel's high-water mark (`/proc/self/clear_refs` ← 5, Linux ≥ 4.0) so each
    block has its own peak; where that fails, the lifetime peak (`VmHWM`, or
    `getrusage().ru_maxrss`) is used and `reset` is False (a lower block then reads 0).
    """

    def __enter__(self) -> PeakRss:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.start = (_status_kb("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        hwm = _status_kb("VmHWM")
        if hwm is None:
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        self.peak = hwm * 1024
        self.delta = max(self.peak - self.start, 0)


def tree_nbytes(tree: Any) -> int:
    """Bytes of every array leaf of a pytree."""
    return int(sum(np.asarray(x).nbytes for x in jtu.tree_leaves(tree)))


def memcpy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> dict:
    """Best-of-`repeats` NumPy copy of `nbytes` (read + write = 2 × nbytes moved per copy).

    One NumPy thread: the peak a single core streams, the reference the step's bandwidth is
    judged against on CPU.
    """
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return {"bytes_per_second": 2 * nbytes / best, "array_bytes": nbytes, "seconds": best}


def time_pdlpjax(raw: dict, x64: bool = False, chunk: int | None = None) -> dict:
    """Compile (warm-up run of one chunk), then the timed run of the whole horizon."""
    cfg = config_from_dict(raw)
    steps = cfg.simulation.num_steps
    chunk = chunk or chunk_for(steps)
    with jax.enable_x64(True) if x64 else contextlib.nullcontext():
        params, model, spec = P.make_params(cfg), P.make_model(cfg), P.make_spec(cfg)
        warm = P.simulate(params, model, spec, seed=0, num_steps=chunk, chunk_length=chunk)
        compile_s, warm_s = warm.compile_seconds, warm.run_seconds
        del warm  # free its state before the measured run
        with PeakRss() as mem:
            res = P.simulate(params, model, spec, seed=0, num_steps=steps, chunk_length=chunk)
        pools = cfg.simulation.num_pools
        state_bytes = tree_nbytes(res.state)
        out = {
            "pools": pools,
            "steps": steps,
            "chunk_length": chunk,
            "dtype": "float64" if x64 else cfg.simulation.dtype,
            "compile_seconds": compile_s,
            "recompile_seconds_second_run": res.compile_seconds,
            "warmup_run_seconds": warm_s,
            "run_seconds": res.run_seconds,
            "pool_steps_per_second": pools * steps / res.run_seconds,
            "seconds_per_pool_step": res.run_seconds / (pools * steps),
            "state_bytes": state_bytes,
            "state_bytes_per_pool": state_bytes / pools,
            "params_bytes_per_pool": tree_nbytes(params) / pools,
            "peak_rss_delta_bytes": mem.delta,
            "peak_rss_reset": mem.reset,
            "masked_pools": int(len(res.masked)),
            "mean_total_return": float(np.nanmean(res.metrics["total_return"])),
        }
        stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
        if stats and "peak_bytes_in_use" in stats:
            out["device_peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
    return out


def _params64(raw: dict):
    """The scenario's params built in float64 for the float64 baselines.

    Not the float32 params widened: float32 target weights do not sum to 1 exactly, so LP
    deposits would add ~1e-7 of their value from nowhere and blur the identity check.
    """
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    raw["simulation"]["dtype"] = "float64"
    with jax.enable_x64(True):
        return jtu.tree_map(np.asarray, P.make_params(config_from_dict(raw)))


def _noise_fn(model, spec):
    """All pools' draws of step t, jitted once per pool count."""
    return jax.jit(jax.vmap(lambda k, t: P.draw_noise(model, spec, k, t), in_axes=(0, None)))


def time_numpy(raw: dict) -> dict:
    """The vectorised NumPy step on the matched scenario; draws timed apart."""
    cfg = config_from_dict(raw)
    pools, steps = cfg.simulation.num_pools, cfg.simulation.num_steps
    model, spec = P.make_model(cfg), P.make_spec(cfg)
    keys, _ = P.pool_keys(0, pools)
    draw = _noise_fn(model, spec)
    jax.block_until_ready(draw(keys, 0))  # compile the draws outside the timings
    nspec, nprm = (
        nv.spec_from_pdlpjax(spec, cfg.paths.model),
        nv.params_from_pdlpjax(_params64(raw)),
    )
    t_noise = t_step = 0.0
    with PeakRss() as mem:
        st = nv.init_state(nspec, nprm)
        for t in range(steps):
            t0 = time.perf_counter()
            noise = nv.noise_from_pdlpjax(draw(keys, t))  # includes the device→NumPy copy
            t1 = time.perf_counter()
            st = nv.step(st, nprm, nspec, noise)
            t_step += time.perf_counter() - t1
            t_noise += t1 - t0
    state_bytes = nv.state_nbytes(st)
    return {
        "pools": pools,
        "steps": steps,
        "dtype": "float64",
        "run_seconds": t_step,
        "noise_seconds": t_noise,
        "pool_steps_per_second": pools * steps / t_step,
        "seconds_per_pool_step": t_step / (pools * steps),
        "noise_seconds_per_pool_step": t_noise / (pools * steps),
        "state_bytes": state_bytes,
        "state_bytes_per_pool": state_bytes / pools,
        "peak_rss_delta_bytes": mem.delta,
        "peak_rss_reset": mem.reset,
        "max_identity_error": float(np.max(st.accounts["identity_error"])),
    }


def time_python_loop(raw: dict) -> tuple[dict, dict]:
    """`tests/reference.py`'s per-pool step (one object per cohort) over the pools in turn.

    Also runs the NumPy baseline on the same pools and draws and reports how far the two
    end apart (both float64; they should agree to ~1e-9).
    """
    cfg = config_from_dict(raw)
    pools, steps = cfg.simulation.num_pools, cfg.simulation.num_steps
    model, spec = P.make_model(cfg), P.make_spec(cfg)
    keys, _ = P.pool_keys(0, pools)
    draw = _noise_fn(model, spec)
    rspec = ref.RefSpec(spec.num_risky, spec.num_cohorts, spec.steps_per_year, cfg.paths.model)
    params = _params64(raw)
    rparams = [
        ref.params_from_pdlpjax(jtu.tree_map(lambda x, i=i: x[i], params)) for i in range(pools)
    ]
    states = [ref.init_ref_state(rspec, p) for p in rparams]
    nspec, nprm = nv.spec_from_pdlpjax(spec, cfg.paths.model), nv.params_from_pdlpjax(params)
    nst = nv.init_state(nspec, nprm)
    jax.block_until_ready(draw(keys, 0))
    t_noise = t_step = 0.0
    for t in range(steps):
        t0 = time.perf_counter()
        noise = jtu.tree_map(np.asarray, draw(keys, t))
        per_pool = [
            ref.noise_from_pdlpjax(jtu.tree_map(lambda x, i=i: x[i], noise)) for i in range(pools)
        ]
        t1 = time.perf_counter()
        for i in range(pools):
            states[i] = ref.step(states[i], rparams[i], rspec, per_pool[i])
        t_step += time.perf_counter() - t1
        t_noise += t1 - t0
        nst = nv.step(nst, nprm, nspec, nv.noise_from_pdlpjax(noise))
    loop_reserves = np.stack([s.reserves for s in states])
    rel = np.abs(loop_reserves - nst.reserves) / np.maximum(np.abs(nst.reserves), 1e-30)
    timing = {
        "pools": pools,
        "steps": steps,
        "dtype": "float64",
        "run_seconds": t_step,
        "noise_seconds": t_noise,
        "pool_steps_per_second": pools * steps / t_step,
        "seconds_per_pool_step": t_step / (pools * steps),
        "noise_seconds_per_pool_step": t_noise / (pools * steps),
    }
    check = {
        "pools": pools,
        "steps": steps,
        "max_relative_reserve_difference": float(rel.max()),
        "opened": float(np.sum(nst.accounts["opened"])),
        "liquidations": float(np.sum(nst.accounts["liquidations"])),
    }
    return timing, check


# --------------------------------------------------------------------------- previous engine

WORKER_TAG = "@@throughput-worker "  # prefix of the worker's answer lines on its stdout


def worker() -> int:
    """`--worker`: time the matched scenario for each request read from stdin.

    Each request is a JSON line `{"pools": P, "steps": T, "cohorts": K}`; the answer is one
    line `WORKER_TAG + JSON` of `time_pdlpjax`'s figures. The first line says which
    `pdlpjax` this process imported. It uses only what both engines share: `config_from_dict`,
    `make_params` / `make_model` / `make_spec`, `simulate` and `SimResult`'s `state`,
    `metrics`, `masked`, `compile_seconds` and `run_seconds`.
    """
    import jaxlib

    hello = {
        "pdlpjax_file": str(Path(P.__file__).resolve()),
        "pdlpjax": P.__version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
    }
    print(WORKER_TAG + json.dumps(hello), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        raw = scenario(False, req["pools"], req["steps"], cohorts=req.get("cohorts", 16))
        print(WORKER_TAG + json.dumps(time_pdlpjax(raw)), flush=True)
    return 0


class PreviousEngine:
    """This file's `--worker` in a subprocess that imports the `pdlpjax` at `path`.

    `PYTHONPATH=path` puts `path/pdlpjax` ahead of the editable install of this checkout (its
    `.pth` entry comes after `PYTHONPATH`); the script's own folder is `benchmarks/`, not a
    repository root, so it cannot shadow it. The worker reports `pdlpjax.__file__`, and this
    refuses to go on unless it lies under `path`. One process serves every pool count, so
    it compiles its chunk program once, as the main process does.
    """

    def __init__(self, path: Path):
        self.path = path.resolve()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.path), *filter(None, [env.get("PYTHONPATH")])]
        )
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            cwd=self.path,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self._answer()
        imported = Path(self.info["pdlpjax_file"])
        if not imported.is_relative_to(self.path):
            self.close()
            raise RuntimeError(f"--previous {path}: the worker imported {imported}")
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.info["commit"] = subprocess.run(
                ["git", "-C", str(self.path), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        self.info["path"] = str(self.path)

    def _answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(WORKER_TAG):
                return json.loads(line[len(WORKER_TAG) :])
            sys.stdout.write(line)  # anything else the worker printed
        raise RuntimeError(f"the --previous worker ended (exit code {self.proc.wait()})")

    def time_matched(self, pools: int, steps: int) -> dict:
        """The matched scenario at `pools` × `steps` on the previous engine."""
        self.proc.stdin.write(json.dumps({"pools": pools, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        """End the worker (closing its stdin ends its loop)."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class LoadSampler:
    """The 1-minute load average every `every` seconds while the block runs (a thread)."""

    def __init__(self, every: float = 30.0):
        import threading

        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        """Min, mean and max of the samples, and the samples."""
        x = self.samples
        return {
            "every_seconds": self.every,
            "min": min(x),
            "mean": sum(x) / len(x),
            "max": max(x),
            "samples": x,
        }


# --------------------------------------------------------------------------- reporting


def machine() -> dict:
    """CPU model, cores, memory and the OS, as far as this machine tells."""
    model = platform.processor()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    mem = _status_kb_file("/proc/meminfo", "MemTotal")
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "memory_bytes": mem * 1024 if mem else None,
        "platform": platform.platform(),
        "note": "shared machine: other jobs may run on the same cores, so timings are noisy",
    }


def _status_kb_file(path: str, field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def versions() -> dict:
    """Versions of Python and of the libraries timed."""
    import jaxlib

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "pdlpjax": P.__version__,
    }


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file 0600; give it the usual mode (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def plot(result: dict, path: Path) -> None:
    """Pool-steps/s against pool count, log-log, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = result["pool_counts"]
    series = [
        (
            "pdlpjax_full",
            "pdlpjax, full (GLP discount" + (" + hedge)" if result["hedge"]["enabled"] else ")"),
            "C0",
            "-",
        ),
        ("pdlpjax_matched", "pdlpjax, matched (K = 16)", "C1", "-"),
        ("pdlpjax_matched_k8", "pdlpjax, matched, K = 8", "C1", ":"),
        ("previous_matched", "previous engine, matched (K = 16)", "C4", "-."),
        ("numpy_vectorised", "NumPy vectorised, matched (float64)", "C2", "-"),
    ]
    for key, label, color, style in series:
        pts = [(r["pools"], r[key]["pool_steps_per_second"]) for r in rows if key in r]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, style, marker="o", color=color, label=label)
    loop = result["python_loop"]
    xs = [loop["pools"], max(r["pools"] for r in rows)]
    ax.plot(
        xs,
        [loop["pool_steps_per_second"]] * 2,
        "--",
        marker="o",
        color="C3",
        label=f"per-pool Python loop, matched (measured at {loop['pools']} pools)",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("pools")
    ax.set_ylabel("pool-steps per second")
    m = result["machine"]
    ax.set_title(
        f"{result['device']['platform']}: {m['cpu_model']} ({m['cpu_count']} cores)", fontsize=10
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _fmt_row(impl: str, r: dict) -> str:
    compile_s = r.get("compile_seconds")
    return (
        f"{impl:<18}{r['pools']:>7}{r['steps']:>6}"
        f"{'' if compile_s is None else f'{compile_s:8.1f}':>9}"
        f"{r['run_seconds']:>9.2f}{r['pool_steps_per_second']:>12.3g}"
        f"{r.get('state_bytes', 0) / 2**20:>10.2f}{r.get('peak_rss_delta_bytes', 0) / 2**20:>10.1f}"
    )


HEADER = (
    f"{'implementation':<18}{'pools':>7}{'steps':>6}{'compile':>9}{'run s':>9}"
    f"{'poolstep/s':>12}{'state MB':>10}{'RSS MB':>10}"
)


# --------------------------------------------------------------------------- main


def run(
    pool_counts: list[int],
    steps: int,
    numpy_steps: int,
    loop_pools: int,
    loop_steps: int,
    scaling_steps: tuple[int, int],
    previous: Path | None = None,
) -> dict:
    """Every measurement; returns the JSON-ready result. `previous`: the root of another
    checkout whose pdlpjax also runs the matched scenario (see `PreviousEngine`)."""
    backend = jax.default_backend()
    devices = jax.devices()
    if backend == "gpu":
        peak = {"bytes_per_second": H200_BANDWIDTH, "source": "NVIDIA H200 nominal HBM3e"}
    else:
        peak = memcpy_bandwidth()
        peak["source"] = "NumPy memcpy measured in this run (one thread; 2 × bytes per copy)"
    print(
        f"device {backend}: {devices}; hedge section: {hedge_available()}; "
        f"peak bandwidth {peak['bytes_per_second']:.3g} B/s ({peak['source']})",
        flush=True,
    )
    print(HEADER, flush=True)

    loop, check = time_python_loop(scenario(False, loop_pools, loop_steps, "float32"))
    print(_fmt_row("python_loop", loop), flush=True)

    prev = PreviousEngine(previous) if previous is not None else None
    if prev is not None:
        print(
            f"previous engine: {prev.info['pdlpjax_file']} (commit {prev.info.get('commit')})",
            flush=True,
        )
    rows = []
    try:
        for pools in pool_counts:
            rows.append(_measure_pools(pools, steps, numpy_steps, prev))
    finally:
        if prev is not None:
            prev.close()

    # Derived figures: ratios on the matched scenario, bytes touched and bandwidth.
    for row in rows:
        for key in ("pdlpjax_matched", "pdlpjax_full", "numpy_vectorised"):
            r = row[key]
            r["bytes_touched_per_pool_step"] = 2 * r["state_bytes_per_pool"]
            r["implied_bandwidth_bytes_per_second"] = (
                r["bytes_touched_per_pool_step"] * r["pool_steps_per_second"]
            )
            r["fraction_of_peak_bandwidth"] = (
                r["implied_bandwidth_bytes_per_second"] / peak["bytes_per_second"]
            )
        jm = row["pdlpjax_matched"]["pool_steps_per_second"]
        row["pool_steps_per_second_k8"] = row["pdlpjax_matched_k8"]["pool_steps_per_second"]
        row["ratio_k8_over_k16"] = row["pool_steps_per_second_k8"] / jm
        if prev is not None:
            row["previous_pool_steps_per_second"] = row["previous_matched"]["pool_steps_per_second"]
            row["ratio_over_previous"] = jm / row["previous_pool_steps_per_second"]
            row["ratio_k8_over_previous"] = (
                row["pool_steps_per_second_k8"] / row["previous_pool_steps_per_second"]
            )
        row["ratio_pdlpjax_over_numpy_vectorised"] = (
            jm / row["numpy_vectorised"]["pool_steps_per_second"]
        )
        row["ratio_pdlpjax_over_python_loop"] = jm / loop["pool_steps_per_second"]
        row["ratio_full_over_matched_cost"] = jm / row["pdlpjax_full"]["pool_steps_per_second"]

    # A precision-matched ratio: pdlpjax in float64 like the NumPy baseline, at the goal
    # pool count (or the largest run), fewer steps (the per-pool-step rate is what counts).
    goal = max((p for p in pool_counts if p <= GOAL_POOLS), default=pool_counts[-1])
    f64_steps = max(scaling_steps[0], 24)
    f64 = time_pdlpjax(scenario(False, goal, f64_steps, "float64"), x64=True)
    print(_fmt_row("pdlpjax_match_f64", f64), flush=True)
    goal_row = next(r for r in rows if r["pools"] == goal)
    f64["ratio_over_numpy_vectorised"] = (
        f64["pool_steps_per_second"] / goal_row["numpy_vectorised"]["pool_steps_per_second"]
    )
    f64["ratio_over_python_loop"] = f64["pool_steps_per_second"] / loop["pool_steps_per_second"]

    scaling = scaling_checks(rows, scaling_steps)
    goals = {
        "pools": goal,
        "pdlpjax_over_numpy_vectorised": goal_row["ratio_pdlpjax_over_numpy_vectorised"],
        "pdlpjax_over_python_loop": goal_row["ratio_pdlpjax_over_python_loop"],
        "target_over_numpy_vectorised": 10.0,
        "target_over_python_loop": 1000.0,
        "float64_pdlpjax_over_numpy_vectorised": f64["ratio_over_numpy_vectorised"],
    }
    goals["met_numpy"] = goals["pdlpjax_over_numpy_vectorised"] >= 10.0
    goals["met_python_loop"] = goals["pdlpjax_over_python_loop"] >= 1000.0
    largest = rows[-1]
    extra: dict[str, Any] = {}
    if prev is not None:
        goals["pdlpjax_over_previous"] = largest["ratio_over_previous"]
        goals["previous_pools"] = largest["pools"]
        goals["target_over_previous"] = 3.0
        goals["met_previous"] = largest["ratio_over_previous"] >= 3.0
        extra = {
            "ratio_over_previous": largest["ratio_over_previous"],
            "ratio_over_previous_pools": largest["pools"],
            "previous": {
                **prev.info,
                "scenario": "matched (the same config dict; the previous engine has no "
                "market.leverage_spread, this one uses its default)",
                "method": "the same time_pdlpjax in a subprocess (this file with --worker, "
                "PYTHONPATH=path), one process for all pool counts, timed right after this "
                "engine's matched run at the same pool count",
            },
        }
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "device": {"platform": backend, "devices": [str(d) for d in devices]},
        "versions": versions(),
        "hedge": {
            "enabled": hedge_available(),
            "note": (
                "[hedge] enabled = true, every = 24 in the full scenario"
                if hedge_available()
                else "pdlpjax.config.SECTIONS has no 'hedge' section yet: the full scenario "
                "ran without a hedge (GLP discount only)"
            ),
        },
        "scenario": {
            "full": _describe(scenario(True, 0, steps)),
            "matched": _describe(scenario(False, 0, steps)),
            "pool_counts": pool_counts,
            "num_steps": steps,
            "numpy_steps": numpy_steps,
            "python_loop": {"pools": loop_pools, "steps": loop_steps},
        },
        "method": {
            "pdlpjax": "pdlpjax.simulate (jit + vmap over pools, fori_loop over the steps of a "
            "chunk); float32 (the default). Warm-up run of one chunk (compiles, reported as "
            "compile_seconds), then a timed run of all steps reusing the compiled chunk; "
            "run_seconds excludes compilation. Draws are generated inside the step and count "
            "in its run time.",
            "numpy_vectorised": "benchmarks/numpy_vectorised.py, float64, matched scenario; "
            "draws precomputed per step by JAX's draw_noise (vmapped over pools) and converted "
            "to NumPy, timed apart (noise_seconds) and not counted in run_seconds.",
            "python_loop": "tests/reference.py's step, one Bucket object per slot, pools "
            "in turn (the way agent-based simulators are written); draws as for NumPy, not "
            "counted. Its cost per pool-step does not depend on the pool count, so it is "
            "measured once and the ratios at every pool count use it.",
            "ratios": "on the matched scenario: pdlpjax (float32) pool-steps/s over the "
            "baseline's; goals.float64_pdlpjax_over_numpy_vectorised is the same with pdlpjax "
            "in float64 as well.",
            "state_bytes": "sum of nbytes of every leaf of the batched SimState after the run",
            "bytes_touched_per_pool_step": "estimate 2 × state bytes per pool: one step reads "
            "and writes each state leaf once (params, draws and intermediates not counted, so "
            "a lower bound on traffic, and an upper bound on what memory sees when the state "
            "fits in cache)",
            "peak_rss_delta_bytes": "peak resident set (VmHWM, reset before the block through "
            "/proc/self/clear_refs) minus the RSS at the start of the block",
            "peak_bandwidth": peak,
        },
        **extra,
        "baseline_check": check,
        "python_loop": loop,
        "pool_counts": rows,
        "pdlpjax_matched_float64": f64,
        "scaling": scaling,
        "goals": goals,
    }


def _measure_pools(
    pools: int, steps: int, numpy_steps: int, prev: PreviousEngine | None
) -> dict[str, Any]:
    """One pool count: pdlpjax matched (K = 16), the previous engine's matched right after
    it, pdlpjax matched at K = 8, pdlpjax full, NumPy."""
    row: dict[str, Any] = {"pools": pools}
    row["pdlpjax_matched"] = time_pdlpjax(scenario(False, pools, steps))
    print(_fmt_row("pdlpjax_matched", row["pdlpjax_matched"]), flush=True)
    if prev is not None:
        row["previous_matched"] = prev.time_matched(pools, steps)
        print(_fmt_row("previous_matched", row["previous_matched"]), flush=True)
    row["pdlpjax_matched_k8"] = time_pdlpjax(scenario(False, pools, steps, cohorts=8))
    print(_fmt_row("pdlpjax_matched_k8", row["pdlpjax_matched_k8"]), flush=True)
    row["pdlpjax_full"] = time_pdlpjax(scenario(True, pools, steps))
    print(_fmt_row("pdlpjax_full", row["pdlpjax_full"]), flush=True)
    row["numpy_vectorised"] = time_numpy(scenario(False, pools, numpy_steps))
    print(_fmt_row("numpy_vectorised", row["numpy_vectorised"]), flush=True)
    return row


def _describe(raw: dict) -> dict:
    """A scenario's config without the pool count (that varies by row)."""
    raw["simulation"] = {k: v for k, v in raw["simulation"].items() if k != "num_pools"}
    return raw


def scaling_checks(rows: list[dict], steps: tuple[int, int]) -> dict:
    """Per-pool cost and memory against pool count; memory and compile time against steps."""
    base = rows[0]
    per_pool = {
        key: [
            {
                "pools": r["pools"],
                "seconds_per_pool_step": r[key]["seconds_per_pool_step"],
                "relative_to_smallest": r[key]["seconds_per_pool_step"]
                / base[key]["seconds_per_pool_step"],
            }
            for r in rows
        ]
        for key in ("pdlpjax_matched", "pdlpjax_full", "numpy_vectorised")
    }
    memory = {
        key: [
            {
                "pools": r["pools"],
                "state_bytes": r[key]["state_bytes"],
                "state_bytes_per_pool": r[key]["state_bytes_per_pool"],
                "peak_rss_delta_bytes": r[key]["peak_rss_delta_bytes"],
                "peak_rss_delta_per_pool": r[key]["peak_rss_delta_bytes"] / r["pools"],
            }
            for r in rows
        ]
        for key in ("pdlpjax_matched", "pdlpjax_full", "numpy_vectorised")
    }
    per_pool_bytes = [m["state_bytes_per_pool"] for m in memory["pdlpjax_full"]]
    # Memory and compile time against the horizon: one chunk of the whole horizon each, so
    # each compiles anew (the chunk length is a static argument of the compiled program).
    by_steps = []
    for n in steps:
        r = time_pdlpjax(scenario(True, 64, n), chunk=n)
        print(_fmt_row(f"full_T{n}_onechunk", r), flush=True)
        by_steps.append(r)
    short, long = by_steps
    return {
        "per_pool_cost_vs_pools": per_pool,
        "memory_vs_pools": memory,
        "state_bytes_linear_in_pools": bool(np.ptp(per_pool_bytes) == 0),
        "vs_num_steps": {
            "pools": 64,
            "runs": [
                {
                    "steps": r["steps"],
                    "compile_seconds": r["compile_seconds"],
                    "run_seconds": r["run_seconds"],
                    "state_bytes": r["state_bytes"],
                    "peak_rss_delta_bytes": r["peak_rss_delta_bytes"],
                }
                for r in by_steps
            ],
            "state_bytes_ratio": long["state_bytes"] / short["state_bytes"],
            # 0 s: the shorter horizon reused a program compiled earlier in the run (horizons
            # whose CVaR buffers round to the same length share one), so no ratio.
            "compile_seconds_ratio": (
                long["compile_seconds"] / short["compile_seconds"]
                if short["compile_seconds"] > 0
                else None
            ),
            "note": "the only state that grows with the horizon is the exact 5% CVaR buffer "
            "(ceil(0.05 × steps) floats per pool and return series: stats.worst_losses, and "
            "hedge.stats.worst_losses with the hedge); time is a loop with a dynamic trip "
            "count, so the compiled program does not grow with the steps",
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: run the benchmark, write the JSON and the PNG, print a table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 and 256 pools, 48 steps")
    ap.add_argument("--max-pools", type=int, default=None, help="largest pool count to run")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/<platform>[-quick].json)",
    )
    ap.add_argument(
        "--previous",
        type=Path,
        default=None,
        metavar="PATH",
        help="root of another checkout (e.g. a git worktree of an earlier commit) whose "
        "pdlpjax also runs the matched scenario, in a subprocess, for a new/previous ratio",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker()
    if args.previous is not None and not (args.previous / "pdlpjax").is_dir():
        ap.error(f"--previous {args.previous}: no pdlpjax/ there")
    counts = list(QUICK_POOL_COUNTS if args.quick else POOL_COUNTS)
    if args.max_pools is not None:
        counts = [p for p in counts if p <= args.max_pools] or [min(args.max_pools, counts[0])]
    if args.quick:
        setting = dict(
            steps=48, numpy_steps=12, loop_pools=2, loop_steps=12, scaling_steps=(48, 192)
        )
    else:
        setting = dict(
            steps=720, numpy_steps=48, loop_pools=4, loop_steps=24, scaling_steps=(240, 960)
        )
    out = args.out or HERE / "results" / (
        jax.default_backend() + ("-quick" if args.quick else "") + ".json"
    )
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    with LoadSampler() as load:
        result = run(counts, **setting, previous=args.previous)
    result["wall_seconds"] = time.perf_counter() - t0
    # Other jobs share this machine's cores: the load says how contended the timings were.
    # (The benchmark itself adds about 1 to the load while it runs.)
    result["machine"]["load_average_1_5_15_min"] = {
        "start": list(load_before),
        "end": list(os.getloadavg()),
    }
    result["machine"]["load_average_1_min_during_run"] = load.summary()
    result["command"] = " ".join(["python", "benchmarks/throughput.py", *sys.argv[1:]])
    _atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    plot(result, out.with_suffix(".png"))
    g = result["goals"]
    print(
        f"at {g['pools']} pools: pdlpjax/numpy {g['pdlpjax_over_numpy_vectorised']:.1f}x "
        f"(goal 10x: {'met' if g['met_numpy'] else 'NOT met'}), pdlpjax/python loop "
        f"{g['pdlpjax_over_python_loop']:.0f}x (goal 1000x: "
        f"{'met' if g['met_python_loop'] else 'NOT met'}); wall {result['wall_seconds']:.0f} s"
    )
    if "pdlpjax_over_previous" in g:
        print(
            f"at {g['previous_pools']} pools: new/previous engine "
            f"{g['pdlpjax_over_previous']:.2f}x (goal 3x: "
            f"{'met' if g['met_previous'] else 'NOT met'})"
        )
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
