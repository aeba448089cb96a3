"""Load closes of real markets from CSV and align assets on common dates.

Accepted shapes (those of `../shared/data/`, or a user's own files of the same shape):
- a folder with one CSV per asset, named `<ASSET>...csv` (e.g. `BTCUSDT_1d.csv`), each with a
  time column (`timestamp`, `date`, `time` or `datetime`: ISO dates or date-times, or Unix
  epoch seconds / milliseconds) and a `close` column; extra columns are ignored;
- one CSV holding several assets in long form, with a `ticker` (or `symbol`) column;
- one CSV in wide form: a time column and one column per asset, named by the asset.

Every file is checked: the columns exist, times parse, are strictly increasing (no
duplicates), closes are finite and positive. A failure raises `DataError` naming the file.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError

__all__ = [
    "DataError",
    "Closes",
    "load_closes",
    "log_returns",
    "infer_steps_per_year",
    "check_gaps",
    "replay_row",
]

TIME_COLUMNS = ("timestamp", "date", "time", "datetime", "open_time")
TICKER_COLUMNS = ("ticker", "symbol")


class DataError(ConfigError):
    """A data file is missing, malformed, or does not hold what the config asks for."""


@dataclass(frozen=True)
class Closes:
    """Aligned closes: `times` (T,) as datetime64[s], `prices` (T, n), `assets` names."""

    times: np.ndarray
    prices: np.ndarray
    assets: tuple[str, ...]
    # (T - 1,) True where the return from row t to t + 1 spans an allowed hole (`check_gaps`):
    # `log_returns` drops those returns. None: no such hole.
    holes: np.ndarray | None = None


def _parse_times(values: list[str], where: str, lines: list[int]) -> np.ndarray:
    values = [v.strip() for v in values]
    for v, line in zip(values, lines, strict=True):
        if not v:
            raise DataError(f"{where}: empty time at line {line}")
    try:
        nums = np.asarray(values, dtype=float)
    except ValueError:
        nums = None
    if nums is not None:
        if not np.all(np.isfinite(nums)):
            bad = int(np.argmax(~np.isfinite(nums)))
            raise DataError(f"{where}: time {values[bad]!r} at line {lines[bad]} is not a time")
        if np.all((nums >= 19000101) & (nums <= 21001231) & (nums == np.round(nums))):
            # YYYYMMDD integers, not epoch seconds (which would all fall in 1970).
            text = [f"{int(x):08d}" for x in nums]
            values = [f"{t[:4]}-{t[4:6]}-{t[6:]}" for t in text]
        else:
            # Epoch: milliseconds when past ~1973 in ms (> 1e11), else seconds.
            scale = 1000.0 if np.max(np.abs(nums)) > 1e11 else 1.0
            return (nums / scale).astype("int64").astype("datetime64[s]")
    try:
        return np.asarray(
            [v.strip().replace(" ", "T").rstrip("Z") for v in values], dtype="datetime64[s]"
        )
    except ValueError as err:
        raise DataError(f"{where}: time column does not parse as dates ({err})") from None


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header (lower case) and data rows; each row ends with its line number in the file."""
    try:
        # utf-8-sig: spreadsheets start a UTF-8 CSV with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = [[*r, i + 1] for i, r in enumerate(csv.reader(fh))]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    rows = [r for r in rows if any(str(c).strip() for c in r[:-1])]
    if len(rows) < 3:
        raise DataError(f"{path}: expected a header and at least two rows")
    header = [h.strip().lower() for h in rows[0][:-1]]
    if len(header) == 1:
        for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars")):
            if sep in header[0]:
                raise DataError(
                    f"{path}: columns are separated by {name} ({sep!r}); expected a "
                    "comma-separated file"
                )
    body = rows[1:]
    for r in body:
        if [c.strip().lower() for c in r[:-1]] == header:
            raise DataError(f"{path}: line {r[-1]} repeats the header")
    short = [r for r in body if len(r) - 1 < len(header)]
    if short:
        raise DataError(f"{path}: line {short[0][-1]} has fewer columns than the header")
    return header, body


def _column(header: list[str], names: tuple[str, ...], path: Path, what: str) -> int:
    for n in names:
        if n in header:
            return header.index(n)
    raise DataError(f"{path}: missing {what} column (expected one of {', '.join(names)})")


def _series(path: Path, rows: list[list], t: int, c: int) -> tuple:
    lines = [r[-1] for r in rows]
    times = _parse_times([r[t] for r in rows], str(path), lines)
    closes_raw = [r[c].strip() for r in rows]
    try:
        closes = np.asarray(closes_raw, dtype=float)
    except ValueError:
        bad = next(i for i, v in enumerate(closes_raw) if not _is_number(v))
        raise DataError(
            f"{path}: expected a number as close, got {closes_raw[bad]!r} at line {lines[bad]}"
        ) from None
    if not np.all(np.isfinite(closes)) or np.any(closes <= 0):
        bad = int(np.argmax(~np.isfinite(closes) | (closes <= 0)))
        raise DataError(
            f"{path}: expected positive closes, got {closes_raw[bad]} at line {lines[bad]}"
        )
    if np.any(np.isnat(times)):
        bad = int(np.argmax(np.isnat(times)))
        raise DataError(f"{path}: time at line {lines[bad]} does not parse")
    diffs = np.diff(times).astype("int64")
    if np.any(diffs == 0):
        raise DataError(f"{path}: duplicate time {times[1:][diffs == 0][0]}")
    if np.any(diffs < 0):
        raise DataError(f"{path}: times are not sorted (at {times[1:][diffs < 0][0]})")
    return times, closes


def _load_file(path: Path, ticker: str | None = None) -> tuple:
    header, rows = _read_rows(path)
    t = _column(header, TIME_COLUMNS, path, "time")
    c = _column(header, ("close",), path, "close")
    if ticker is not None:
        k = _column(header, TICKER_COLUMNS, path, "ticker")
        rows = [r for r in rows if _matches(r[k].strip(), ticker)]
        if len(rows) < 2:
            raise DataError(f"{path}: no rows for asset {ticker}")
    return _series(path, rows, t, c)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _matches(name: str, asset: str) -> bool:
    """`BTCUSDT`, `BTC-USD`, `BTC_1d`, `btc` all name the asset `BTC`."""
    name, asset = name.upper(), asset.upper()
    if name == asset:
        return True
    rest = name[len(asset) :] if name.startswith(asset) else None
    return rest is not None and (rest[0] in "_-." or rest.startswith(("USDT", "USDC", "USD")))


def _find_asset_file(folder: Path, asset: str) -> Path:
    hits = sorted(p for p in folder.glob("*.csv") if _matches(p.stem, asset))
    if not hits:
        raise DataError(f"{folder}: no CSV for asset {asset} (expected a file named {asset}*.csv)")
    if len(hits) > 1:
        raise DataError(
            f"{folder}: several CSVs match asset {asset}: {', '.join(p.name for p in hits)}"
        )
    return hits[0]


def load_closes(
    source: str | Path,
    assets: tuple[str, ...] | list[str],
    *,
    max_gap: float = 6.0,
    allow_gaps: bool = False,
) -> Closes:
    """Closes of `assets` from `source` (folder or CSV), inner-joined on common times.

    A hole between common times longer than `max_gap` times their median spacing raises
    `DataError` naming its dates, or with `allow_gaps` is marked so that `log_returns`
    drops the return across it (`check_gaps`).

    **Returns:** `Closes` with `prices` of shape `(T, len(assets))`, rows in time order.
    """
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    series = []
    if source.is_dir():
        for a in assets:
            series.append(_load_file(_find_asset_file(source, a)))
    else:
        header, _ = _read_rows(source)
        if any(h in header for h in TICKER_COLUMNS):
            series = [_load_file(source, ticker=a) for a in assets]
        else:
            series = _load_wide(source, assets)
    common = series[0][0]
    for times, _ in series[1:]:
        common = np.intersect1d(common, times)
    if len(common) < 3:
        raise DataError(f"{source}: assets {list(assets)} share fewer than 3 common times")
    prices = np.stack([c[np.searchsorted(t, common)] for t, c in series], axis=1)
    closes = Closes(times=common, prices=prices, assets=tuple(assets))
    holes = check_gaps(closes, source, [t for t, _ in series], max_gap, allow_gaps)
    return closes if holes is None else dataclasses.replace(closes, holes=holes)


def check_gaps(
    closes: Closes, source: Path, asset_times: list, max_gap: float, allow_gaps: bool
) -> np.ndarray | None:
    """Holes in the common times longer than `max_gap` × their median spacing.

    The return across such a hole would enter the bootstrap as one step (a 30-day hole in
    hourly data is one "hourly" return of about 20σ). Without `allow_gaps` the largest
    raises `DataError` with its dates and the assets with no row inside it; with it, returns
    a (T - 1,) mask of the returns to drop (None when there is no hole).
    """
    diffs = np.diff(closes.times).astype("int64")
    spacing = float(np.median(diffs))
    holes = diffs > max_gap * spacing
    if not np.any(holes):
        return None
    if allow_gaps:
        return holes
    i = int(np.argmax(diffs))
    start, end = closes.times[i], closes.times[i + 1]
    missing = [
        a
        for a, t in zip(closes.assets, asset_times, strict=True)
        if not np.any((t > start) & (t < end))
    ]
    who = f"no row for {', '.join(missing)}" if missing else "no common row"
    raise DataError(
        f"{source}: {int(np.sum(holes))} hole(s) in the data longer than paths.max_gap = "
        f"{max_gap:g} times its spacing of {_duration(spacing)}; the largest, {start} to {end} "
        f"({_duration(float(diffs[i]))}, {who}), would be one step of the bootstrap; set "
        "paths.allow_gaps = true to drop such returns, or raise paths.max_gap"
    )


def replay_row(closes: Closes, start: np.datetime64, num_steps: int, source) -> int:
    """The row of the first common time at or after `start`: a replay of `num_steps` steps
    uses the returns from that row's close to the close `num_steps` rows later.

    Raises `DataError` naming the key when `start` is outside the data's span, when fewer than
    `num_steps` returns follow it, or when the window crosses a hole (`closes.holes`, from
    `load_closes(..., allow_gaps=True)`): replayed as one step it would misstate time, dropped
    it would misstate prices.
    """
    times = closes.times
    first, last = _when(times[0], times), _when(times[-1], times)
    if start < times[0] or start > times[-1]:
        raise DataError(
            f"paths.replay_start: {_when(start, times)} is outside the span of {source} "
            f"({', '.join(closes.assets)}: {first} .. {last}); expected a date in that span"
        )
    row = int(np.searchsorted(times, start, side="left"))
    left = len(times) - 1 - row
    if num_steps > left:
        raise DataError(
            f"simulation.num_steps: expected at most {left}, the returns left in {source} after "
            f"paths.replay_start = {_when(start, times)} (its last time is {last}), "
            f"got {num_steps}"
        )
    if closes.holes is not None and np.any(closes.holes[row : row + num_steps]):
        i = row + int(np.argmax(closes.holes[row : row + num_steps]))
        gap = float((times[i + 1] - times[i]).astype("int64"))
        raise DataError(
            f"paths.replay_start: the replay from {_when(times[row], times)} for {num_steps} "
            f"steps crosses a hole in {source} from {_when(times[i], times)} to "
            f"{_when(times[i + 1], times)} ({_duration(gap)}, longer than paths.max_gap times "
            "the data's spacing); choose another start or fewer steps, or raise paths.max_gap "
            "to replay the hole as one step"
        )
    return row


def _when(t: np.datetime64, times: np.ndarray) -> str:
    """`t` as "YYYY-MM-DD" when every data time is a midnight (daily data), else with HH:MM."""
    daily = np.all(times.astype("datetime64[D]") == times)
    return str(np.datetime_as_string(t, unit="D" if daily else "m")).replace("T", " ")


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400.0), ("hours", 3600.0), ("minutes", 60.0)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def _load_wide(path: Path, assets: tuple[str, ...] | list[str]) -> list:
    header, rows = _read_rows(path)
    t = _column(header, TIME_COLUMNS, path, "time")
    out = []
    for a in assets:
        k = _column(header, (a.lower(),), path, f"'{a}'")
        out.append(_series(path, rows, t, k))
    return out


def log_returns(closes: Closes) -> np.ndarray:
    """Log returns between consecutive common times, shape `(T - 1, n)`, less the returns
    across allowed holes (`closes.holes`): the series either side of a hole are joined."""
    r = np.diff(np.log(closes.prices), axis=0)
    return r if closes.holes is None else r[~closes.holes]


def infer_steps_per_year(closes: Closes) -> float:
    """Steps per year implied by the median spacing of the times (crypto: 365-day year)."""
    step = float(np.median(np.diff(closes.times).astype("int64")))
    return 365.0 * 86400.0 / step
