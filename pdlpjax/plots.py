"""PNG plots for results folders (matplotlib, Agg backend: no display needed).

Every public function writes one PNG and returns None; each draws through a private
`_draw_*` function that returns the matplotlib Figure (tests inspect its labels). Axis labels
carry units: `axis_label` names a config key with its unit, with "per step" made concrete by
`step_length` (8760 steps a year: 1 h).
"""

from __future__ import annotations

import math
import textwrap
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from ._io import save_figure  # noqa: E402

__all__ = [
    "fan_chart",
    "histogram",
    "utilisation_chart",
    "heatmap",
    "attribution_chart",
    "sharpe_pair",
    "step_length",
    "axis_label",
    "readable",
]

SHARE_PRICE_LABEL = "LP share price (numéraire per share)"
_GAIN, _LOSS, _TOTAL = "#2a9d4f", "#d1495b", "#3d5a80"

# Units of the dynamic config keys; "{step}" becomes the step length (`step_length`).
_UNITS = {
    "market.initial_prices": "numéraire",
    "market.funding_kappa": "per step = {step}",
    "market.funding_cap": "per step = {step}",
    "market.open_rate": "fraction of pool value per step = {step}",
    "market.mean_holding": "steps of {step}",
    "market.leverage": "×",
    "market.leverage_vol": "sd of log leverage",
    "market.leverage_spread": "w, fraction of the mean margin",
    "market.max_leverage": "×",
    "market.fee_elasticity": "per unit of annualised fee",
    "market.momentum": "log demand per sd of last return",
    "market.noise_vol": "sd of log demand",
    "market.arb_leverage": "×",
    "paths.drifts": "annualised",
    "paths.vols": "annualised",
    "paths.jump_intensity": "per year",
    "paths.jump_mean": "log size",
    "paths.jump_vol": "sd of log size",
    "paths.crash_intensity": "per year",
    "paths.crash_mean": "log size",
    "paths.crash_vol": "sd of log size",
    "paths.block_length": "steps of {step}",
    "pool.initial_value": "numéraire",
    "pool.target_weights": "fraction of value",
    "pool.fee": "per step = {step}",
    "pool.max_utilisation": "fraction of reserve",
    "pool.lp_flow_drift": "fraction of AUM per year",
    "pool.lp_flow_vol": "fraction of AUM per √year",
    "pool.discount_base": "fraction",
    "pool.discount_tax": "fraction",
    "pool.discount_temperature": "weight units",
    "pool.twm_mu": "fraction of AUM",
    "pool.twm_capital": "fraction of AUM",
    "pool.twm_cost": "fraction of AUM",
    "pool.swap_fee": "fraction",
    "hedge.risk_aversion": "γ_r, dimensionless",
    "hedge.penalty": "value units",
    "hedge.cost": "per unit of notional traded",
    "hedge.ewma_halflife": "steps of {step}",
    "hedge.damping": "Schur fraction γ",
    "hedge.every": "steps of {step}",
}


def step_length(steps_per_year: float) -> str:
    """One simulation step in words: 8760 a year → "1 h", 365 → "1 day", else "1/N year"."""
    for n, words in ((8760, "1 h"), (365, "1 day"), (52, "1 week"), (12, "1 month")):
        if math.isclose(float(steps_per_year), n, rel_tol=1e-9):
            return words
    return f"1/{float(steps_per_year):g} year"


def axis_label(key: str, steps_per_year: float = 8760.0) -> str:
    """A config key ("pool.fee") with its unit: "pool.fee (per step = 1 h)"; a key without a
    known unit is returned as it is."""
    unit = _UNITS.get(key)
    if unit is None:  # fall back on the key's documentation
        try:
            from .config import SECTIONS, specs

            sec, name = key.split(".", 1)
            doc = specs(SECTIONS[sec])[name].doc
        except (KeyError, ValueError):
            doc = ""
        if "per step" in doc:
            unit = "per step = {step}"
        elif "in steps" in doc:
            unit = "steps of {step}"
        elif "annualised" in doc:
            unit = "annualised"
    if unit is None:
        return key
    return f"{key} ({unit.format(step=step_length(steps_per_year))})"


def readable(name: str) -> str:
    """A metric or term name for people: underscores to spaces ("bad_debt" → "bad debt")."""
    return str(name).replace("_", " ")


def _save(path: str | Path, fig) -> None:
    save_figure(path, fig)
    plt.close(fig)


def _quantiles(values: np.ndarray, qs: list[float]) -> np.ndarray:
    with warnings.catch_warnings():  # an all-NaN column (every pool masked) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(np.asarray(values, float), qs, axis=0)


# --------------------------------------------------------------------------- fan chart


def _draw_fan(
    times: np.ndarray,
    values: np.ndarray,
    title: str,
    ylabel: str = SHARE_PRICE_LABEL,
    *,
    overlay: list[tuple[np.ndarray, np.ndarray, str]] | None = None,
    xlabel: str = "days",
):
    fig, ax = plt.subplots(figsize=(7, 4))
    q = _quantiles(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    ax.fill_between(times, q[0], q[4], alpha=0.2, color="C0", label="5–95%")
    ax.fill_between(times, q[1], q[3], alpha=0.4, color="C0", label="25–75%")
    ax.plot(times, q[2], color="C0", lw=1.5, label="median")
    for k, (t, v, label) in enumerate(overlay or []):
        med = _quantiles(v, [0.5])[0]
        ax.plot(t, med, color=f"C{k + 1}", lw=1.5, ls="--", label=f"{label} (median)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def fan_chart(
    path: str | Path,
    times: np.ndarray,
    values: np.ndarray,
    title: str,
    ylabel: str = SHARE_PRICE_LABEL,
    *,
    overlay: list[tuple[np.ndarray, np.ndarray, str]] | None = None,
    xlabel: str = "days",
) -> None:
    """Quantile bands (5–95%, 25–75%) and median of `values` (pools, k) over `times` (k,).

    `overlay`: extra median lines, each `(times (k',), values (pools, k'), label)`, e.g. the
    hedged LP's wealth per share over the unhedged fan; dashed, in their own colours.
    """
    _save(path, _draw_fan(times, values, title, ylabel, overlay=overlay, xlabel=xlabel))


# --------------------------------------------------------------------------- histogram


def histogram(path: str | Path, x: np.ndarray, title: str, xlabel: str) -> None:
    """Histogram of the finite values of `x` (pools,), with its mean marked; y: pool count."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    fig, ax = plt.subplots(figsize=(6, 4))
    if x.size:
        ax.hist(x, bins=min(60, max(10, x.size // 20)), color="C1", alpha=0.8)
        ax.axvline(x.mean(), color="k", lw=1, ls="--", label=f"mean {x.mean():.3g}")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pools (count)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _save(path, fig)


# --------------------------------------------------------------------------- utilisation


def utilisation_chart(
    path: str | Path,
    times: np.ndarray,
    utilisation: np.ndarray,
    open_interest: np.ndarray,
    title: str,
    *,
    xlabel: str = "days",
) -> None:
    """Median and 5–95% band over pools of utilisation and open interest (pools, k), both
    fractions of the pool's reserve value pᵀR, over `times` (k,)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for ax, x, label in [
        (axes[0], utilisation, "utilisation (lent / pᵀR, fraction)"),
        (axes[1], open_interest, "open interest / pᵀR (fraction)"),
    ]:
        q = _quantiles(x, [0.05, 0.5, 0.95])
        ax.fill_between(times, q[0], q[2], alpha=0.25, color="C2", label="5–95%")
        ax.plot(times, q[1], color="C2", lw=1.5, label="median")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    _save(path, fig)


# --------------------------------------------------------------------------- heatmap


def _draw_heatmap(
    values: np.ndarray,
    xs: list,
    ys: list,
    xlabel: str,
    ylabel: str,
    title: str,
    cbar: str = "hedged − unhedged Sharpe (annualised)",
    *,
    marks: np.ndarray | None = None,
    note: str | None = None,
):
    values = np.asarray(values, float)
    marked = np.zeros(values.shape, bool) if marks is None else np.asarray(marks, bool)
    if marked.shape != values.shape:
        raise ValueError(f"heatmap: marks has shape {marked.shape}, values {values.shape}")
    width = 1.2 * len(xs) + 3
    fig, ax = plt.subplots(figsize=(width, 0.6 * len(ys) + 2.8), layout="constrained")
    finite = values[np.isfinite(values)]
    lim = float(np.max(np.abs(finite))) if finite.size else 1.0
    lim = lim if lim > 0 else 1.0
    im = ax.imshow(values, cmap="RdBu", vmin=-lim, vmax=lim, origin="lower", aspect="auto")
    ax.set_xticks(range(len(xs)), [f"{x:.3g}" for x in xs])
    ax.set_yticks(range(len(ys)), [f"{y:.3g}" for y in ys])
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            dark = np.isfinite(v) and abs(v) > 0.6 * lim
            text = "–" if not np.isfinite(v) else f"{v:.2f}" + ("*" if marked[i, j] else "")
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="white" if dark else "black",
                fontweight="bold" if marked[i, j] else "normal",
            )
            if marked[i, j]:
                edge = "w" if dark else "k"
                ax.add_patch(
                    Rectangle((j - 0.46, i - 0.44), 0.92, 0.88, fill=False, lw=1.2, ec=edge)
                )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    lines = [textwrap.fill(note, int(width * 15))] if note else []
    if marks is not None:
        lines.append("* bold, boxed: 95% interval excludes 0")
    if lines:
        fig.suptitle(title, fontsize=10)
        ax.set_title("\n".join(lines), fontsize=7.5, color="0.25")
    else:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=cbar)
    return fig


def heatmap(
    path: str | Path,
    values: np.ndarray,
    xs: list,
    ys: list,
    xlabel: str,
    ylabel: str,
    title: str,
    cbar: str = "hedged − unhedged Sharpe (annualised)",
    *,
    marks: np.ndarray | None = None,
    note: str | None = None,
) -> None:
    """A (len(ys), len(xs)) table as a diverging heatmap centred on 0, each cell labelled.

    `marks` (same shape, bool): cells to flag, e.g. whose paired 95% interval excludes 0;
    their labels get a bold "*" and a box, and a caption says so. `note`: a subtitle under the
    title, e.g. what each cell averages over. NaN cells read "–".
    """
    _save(
        path,
        _draw_heatmap(values, xs, ys, xlabel, ylabel, title, cbar, marks=marks, note=note),
    )


# --------------------------------------------------------------------------- attribution


def _pct_text(v: float) -> str:
    if not np.isfinite(v):
        return "n/a"
    return f"{v:+.2f}%" if abs(v) >= 0.01 or v == 0 else f"{v:+.1e}%"


def _draw_attribution(
    terms: dict[str, tuple[float, float, float]],
    total: tuple[float, float, float],
    title: str,
    unit: str = "% of initial LP value",
):
    names = list(terms)
    est = np.array([[float(x) for x in terms[n]] for n in names], float).reshape(-1, 3) * 100
    tot = np.array([float(x) for x in total], float) * 100
    mean = np.nan_to_num(est[:, 0])
    ends = np.cumsum(mean)
    starts = ends - mean
    n = len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * (n + 1) + 2.5), 4.6), layout="constrained")
    x = np.arange(n + 1)
    colors = [_GAIN if m >= 0 else _LOSS for m in mean] + [_TOTAL]
    bottoms = np.append(starts, 0.0)
    heights = np.append(mean, np.nan_to_num(tot[0]))
    ax.bar(x, heights, bottom=bottoms, color=colors, width=0.6, edgecolor="k", lw=0.5)
    # A term's interval, placed where its bar ends: the running sum's uncertainty is not
    # shown (the terms are correlated), only each term's own.
    tops = np.append(ends, np.nan_to_num(tot[0]))
    lo = np.append(starts + est[:, 1], tot[1])
    hi = np.append(starts + est[:, 2], tot[2])
    ok = np.isfinite(lo) & np.isfinite(hi)
    if ok.any():
        ax.errorbar(
            x[ok],
            tops[ok],
            yerr=[np.maximum(tops[ok] - lo[ok], 0), np.maximum(hi[ok] - tops[ok], 0)],
            fmt="none",
            ecolor="k",
            capsize=3,
            lw=1,
        )
    for k in range(n):  # connectors from one bar's end to the next bar's start
        ax.plot([k + 0.3, k + 0.7], [ends[k], ends[k]], color="0.5", lw=0.8, ls=":")
    ax.axhline(0, color="k", lw=0.8)
    # Value labels beyond the bar's end and its error bar.
    span = np.nanmax(np.abs(np.concatenate([tops, bottoms, lo[ok], hi[ok], [0.0]])))
    pad = 0.02 * (span if span > 0 else 1.0)
    shown = np.append(est[:, 0], tot[0])
    for k in range(n + 1):
        up = heights[k] >= 0
        reach = hi[k] if up else lo[k]
        edge = bottoms[k] + heights[k]
        if np.isfinite(reach):
            edge = max(edge, reach) if up else min(edge, reach)
        ax.text(
            x[k],
            edge + (pad if up else -pad),
            _pct_text(shown[k]),
            ha="center",
            va="bottom" if up else "top",
            fontsize=8,
            fontweight="bold" if k == n else "normal",
        )
    if span == 0:
        ax.set_ylim(-1, 1)
    else:
        ax.margins(y=0.15)
    ax.set_xticks(x, [readable(s) for s in names] + ["total"])
    if n + 1 > 5:
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    handles = [
        Patch(color=_GAIN, label="gain"),
        Patch(color=_LOSS, label="loss"),
        Patch(color=_TOTAL, label="total"),
    ]
    if ok.any():
        handles.append(Line2D([], [], color="k", marker="_", ms=8, lw=1, label="95% interval"))
    residual = tot[0] - (ends[-1] if n else 0.0)
    if np.isfinite(residual) and abs(residual) > 1e-3 * max(1.0, abs(tot[0])):
        summed = _pct_text(ends[-1] if n else 0.0)
        label = f"terms sum to {summed}\n(residual {_pct_text(residual)})"
        handles.append(Patch(color="none", label=label))
    ax.legend(handles=handles, fontsize=8, loc="best")
    return fig


def attribution_chart(
    path: str | Path,
    terms: dict[str, tuple[float, float, float]],
    total: tuple[float, float, float],
    title: str,
    unit: str = "% of initial LP value",
) -> None:
    """A waterfall of an LP's P&L attribution.

    `terms`: name → (mean, ci_lo, ci_hi), each a signed fraction of the initial value (gains
    positive), in the order to draw; the bars cumulate from 0, and each carries its own 95%
    interval as an error bar at its end. `total`: (mean, ci_lo, ci_hi), the final bar from 0.
    Values are drawn in percent (`unit` is the y-label); gains green, losses red, the total
    blue. Names print with spaces for underscores. NaN intervals draw no error bar; a gap
    between the terms' sum and the total is stated as a residual.
    """
    _save(path, _draw_attribution(terms, total, title, unit))


# --------------------------------------------------------------------------- Sharpe pairs


def _draw_sharpe_pair(unhedged: np.ndarray, hedged: np.ndarray, title: str):
    from .metrics import mean_ci

    u, h = np.asarray(unhedged, float).ravel(), np.asarray(hedged, float).ravel()
    if u.shape != h.shape:
        raise ValueError(f"sharpe_pair: {u.size} unhedged and {h.size} hedged values")
    ok = np.isfinite(u) & np.isfinite(h)
    u, h = u[ok], h[ok]
    fig, ax = plt.subplots(figsize=(5.6, 5.2), layout="constrained")
    if u.size:
        lo = float(min(u.min(), h.min()))
        hi = float(max(u.max(), h.max()))
        pad = 0.05 * (hi - lo) if hi > lo else 0.5
        lo, hi = lo - pad, hi + pad
        above = h > u
        size = 14 if u.size <= 500 else 6
        ax.scatter(u[above], h[above], s=size, alpha=0.6, color=_GAIN, lw=0, label="hedged higher")
        ax.scatter(
            u[~above], h[~above], s=size, alpha=0.6, color=_LOSS, lw=0, label="hedged not higher"
        )
        ax.plot([lo, hi], [lo, hi], color="k", lw=1, ls="--", label="y = x")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        d = mean_ci(h - u)
        dlo, dhi = d["ci95"]
        text = (
            f"{u.size} pools\n"
            f"above y = x: {100 * above.mean():.1f}%\n"
            f"mean hedged − unhedged: {d['mean']:+.3g}\n"
            f"95% interval [{dlo:+.3g}, {dhi:+.3g}]"
        )
    else:
        text = "no pool with both Sharpe ratios finite"
    ax.text(
        0.03,
        0.97,
        text,
        transform=ax.transAxes,
        va="top",
        fontsize=8,
        bbox={"boxstyle": "round", "fc": "white", "ec": "0.6", "alpha": 0.9},
    )
    if u.size:
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("unhedged LP Sharpe (annualised)")
    ax.set_ylabel("hedged LP Sharpe (annualised)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def sharpe_pair(path: str | Path, unhedged: np.ndarray, hedged: np.ndarray, title: str) -> None:
    """Per pool, the hedged LP's annualised Sharpe against the unhedged one's (both (pools,)),
    with the line y = x; a text box gives the share of pools above it and the mean
    hedged − unhedged difference with its paired 95% interval. Pools with either value
    non-finite are left out."""
    _save(path, _draw_sharpe_pair(unhedged, hedged, title))
