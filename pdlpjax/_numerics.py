"""Batch-invariant reductions.

XLA may sum an axis in a different order depending on the shape of the whole array, so a
`jnp.sum` inside a vmapped step can round differently for a pool run alone and the same
pool run among 64. `fixed_sum` adds in a fixed pairwise order with elementwise operations
only, so each pool's result is bitwise independent of the batch size.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array


def fixed_sum(x: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """Sum over `axis` (an int, a tuple of ints, or None for all) in a fixed pairwise order."""
    if axis is None:
        axis = tuple(range(x.ndim))
    if isinstance(axis, tuple):
        for a in sorted((a % x.ndim for a in axis), reverse=True):
            x = fixed_sum(x, a)
        return x
    x = jnp.moveaxis(x, axis, 0)
    if x.shape[0] == 0:
        return jnp.zeros(x.shape[1:], x.dtype)
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        paired = x[:half] + x[half : 2 * half]
        x = jnp.concatenate([paired, x[2 * half :]]) if x.shape[0] % 2 else paired
    return x[0]
