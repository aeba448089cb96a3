"""Session settings shared by every test worker and the subprocesses the tests start.

One persistent XLA compilation cache (`.pytest_cache/jax-compilation`, ignored by git): most
of the suite's time is compiling, and many files compile the same programs (the pools run in
blocks of `POOL_BLOCK`, so a program's shape rarely depends on a test's pool count). A
program loaded from the cache is the executable that was stored, so results are unchanged;
JAX keys entries by the program, the JAX/XLA versions, the flags and the backend. Set
`JAX_COMPILATION_CACHE_DIR` to use another folder.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compilation"),
)
# Compiles shorter than this are not worth a file write and read.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# LLVM at -O2 rather than XLA's default -O3: the quickstart's chunk program compiles in 5.4 s
# instead of 7.3 s (glp discount: 9.5 s instead of 11.6 s) and runs as fast, with the same
# results (XLA's CPU backend does not use fast-math, so both levels keep IEEE arithmetic).
# Most of the suite's time is compiling. Subprocesses inherit it; users get XLA's default.
TEST_XLA_FLAG = "--xla_backend_optimization_level=2"
if TEST_XLA_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAG}".strip()

import jax  # noqa: E402  (after the environment: subprocesses inherit it, jax reads it)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
