"""The persistent XLA compilation cache the command line turns on.

Most of a short run is compiling (the quickstart: about 7 s of 9), and the same config
compiles the same programs every time. `pdlpjax run|sweep|calibrate|stress` therefore keep
compiled programs in the user's cache folder and load them on the next run: a program
loaded from the cache is the executable that was stored, so results are unchanged (JAX keys
entries by the program, the JAX/XLA versions, the flags and the backend).

Where: `$PDLPJAX_CACHE` if set (`off`, `0` or `none` switch it off), else JAX's own
`JAX_COMPILATION_CACHE_DIR` if set, else `$XDG_CACHE_HOME/pdlpjax/xla` (default
`~/.cache/pdlpjax/xla`). The Python API leaves JAX's settings alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["cache_dir", "enable_compilation_cache"]

_OFF = {"off", "0", "none", "false", "no"}


def cache_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """The cache folder the environment asks for (None: no cache). Pure: reads `env`."""
    env = os.environ if env is None else env
    choice = env.get("PDLPJAX_CACHE")
    if choice is not None:
        return None if choice.strip().lower() in _OFF or not choice.strip() else Path(choice)
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(env["JAX_COMPILATION_CACHE_DIR"])
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".cache")
    return Path(base) / "pdlpjax" / "xla"


def enable_compilation_cache(env: Mapping[str, str] | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at `cache_dir(env)`; returns the folder, or
    None when the cache is off or the folder cannot be created (then nothing is cached and
    the run goes on)."""
    path = cache_dir(env)
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    import jax  # after the folder check: `pdlpjax keys` and errors need no JAX

    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX's default (1 s) skips the init and metrics programs (0.2-0.4 s each).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return path
