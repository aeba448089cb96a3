"""PNG plots for results folders (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ._io import save_figure  # noqa: E402

__all__ = ["fan_chart", "histogram", "utilisation_chart", "heatmap"]


def fan_chart(
    path: str | Path,
    times: np.ndarray,
    values: np.ndarray,
    title: str,
    ylabel: str = "LP share price",
) -> None:
    """Quantile bands (5–95%, 25–75%) and median of `values` (pools, k) over `times` (k,)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    q = np.nanquantile(values, [0.05, 0.25, 0.5, 0.75, 0.95], axis=0)
    ax.fill_between(times, q[0], q[4], alpha=0.2, color="C0", label="5–95%")
    ax.fill_between(times, q[1], q[3], alpha=0.4, color="C0", label="25–75%")
    ax.plot(times, q[2], color="C0", lw=1.5, label="median")
    ax.set_xlabel("days")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    save_figure(path, fig)
    plt.close(fig)


def histogram(path: str | Path, x: np.ndarray, title: str, xlabel: str) -> None:
    """Histogram of the finite values of `x`, with its mean marked."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    fig, ax = plt.subplots(figsize=(6, 4))
    if x.size:
        ax.hist(x, bins=min(60, max(10, x.size // 20)), color="C1", alpha=0.8)
        ax.axvline(x.mean(), color="k", lw=1, ls="--", label=f"mean {x.mean():.3g}")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pools")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    save_figure(path, fig)
    plt.close(fig)


def utilisation_chart(
    path: str | Path,
    times: np.ndarray,
    utilisation: np.ndarray,
    open_interest: np.ndarray,
    title: str,
) -> None:
    """Median and 5–95% band over pools of utilisation and open interest (pools, k)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for ax, x, label in [
        (axes[0], utilisation, "utilisation (lent / pᵀR)"),
        (axes[1], open_interest, "open interest / pᵀR"),
    ]:
        q = np.nanquantile(x, [0.05, 0.5, 0.95], axis=0)
        ax.fill_between(times, q[0], q[2], alpha=0.25, color="C2", label="5–95%")
        ax.plot(times, q[1], color="C2", lw=1.5, label="median")
        ax.set_xlabel("days")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.suptitle(title)
    save_figure(path, fig)
    plt.close(fig)


def heatmap(
    path: str | Path,
    values: np.ndarray,
    xs: list,
    ys: list,
    xlabel: str,
    ylabel: str,
    title: str,
    cbar: str = "hedged − unhedged Sharpe",
) -> None:
    """A (len(ys), len(xs)) table as a diverging heatmap centred on 0, each cell labelled."""
    values = np.asarray(values, float)
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 3, 0.6 * len(ys) + 2.5))
    finite = values[np.isfinite(values)]
    lim = float(np.max(np.abs(finite))) if finite.size else 1.0
    im = ax.imshow(values, cmap="RdBu", vmin=-lim, vmax=lim, origin="lower", aspect="auto")
    ax.set_xticks(range(len(xs)), [f"{x:.3g}" for x in xs])
    ax.set_yticks(range(len(ys)), [f"{y:.3g}" for y in ys])
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=cbar)
    save_figure(path, fig)
    plt.close(fig)
