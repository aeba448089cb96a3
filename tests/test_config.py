"""Config loading, validation and the `pdlpjax run` command line.

Bad configs must fail before anything compiles with one line naming the key; the CLI turns that
into `error: ...` on stderr and exit status 2. Good configs resolve to per-pool arrays and run
end to end into a complete results folder.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tomli_w

import pdlpjax
from pdlpjax.cli import main
from pdlpjax.config import config_to_dict

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Shrinks quickstart to a run that compiles and finishes in seconds.
SMALL = (
    "simulation.num_pools=8",
    "simulation.num_steps=48",
    "simulation.chunk_length=24",
    "output.record_every=24",
)

# A small valid config (defaults elsewhere) that TOML-text cases extend.
BASE = """\
[market]
assets = ["BTC", "ETH"]
numeraire = "USDC"
initial_prices = [50000.0, 3000.0]

[simulation]
num_pools = 8
num_steps = 48
chunk_length = 24
"""


def _config_file(tmp_path: Path, text: str | None) -> Path:
    """`text` written to a TOML file, or the quickstart config when `text` is None."""
    if text is None:
        return QUICKSTART
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `pdlpjax` in-process; return (exit status, stdout, stderr)."""
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse errors exit
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _run_args(config: Path, overrides: tuple[str, ...] | list[str], out: Path) -> list[str]:
    args = ["run", str(config), "--out", str(out), "--quiet"]
    for item in overrides:
        args += ["--set", item]
    return args


def _assert_one_line_error(rc: int, err: str, expected: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith("error: ")
    assert expected in lines[0]


# --------------------------------------------------------------------------- bad configs


# (TOML text or None for quickstart, --set overrides, expected substring of the message)
BAD_CONFIGS = [
    pytest.param("[market\nassets = 1\n", (), "malformed TOML", id="malformed-toml"),
    pytest.param(BASE + "x = = 1\n", (), "malformed TOML", id="malformed-toml-value"),
    pytest.param(BASE + "[foo]\nx = 1\n", (), "unknown section [foo]", id="unknown-section"),
    pytest.param(None, ("paths.vol=0.5",), "paths.vol: unknown key", id="unknown-key"),
    pytest.param(
        "colour = 1\n" + BASE, (), "colour: unknown top-level key", id="unknown-top-level-key"
    ),
    pytest.param("market = 1\n", (), "[market]: expected a table", id="section-not-table"),
    pytest.param(None, ('paths.vols="high"',), "paths.vols", id="string-for-number"),
    pytest.param(None, ("simulation.num_pools=8.0",), "simulation.num_pools", id="float-for-int"),
    pytest.param(None, ("simulation.num_pools=true",), "simulation.num_pools", id="bool-for-int"),
    pytest.param(None, ("paths.antithetic=1",), "paths.antithetic", id="number-for-bool"),
    pytest.param(None, ("output.plots=0",), "output.plots", id="number-for-bool-output"),
    pytest.param(None, ("name=5",), "name: expected a string", id="number-for-name"),
    pytest.param(BASE + "[paths]\nvols = nan\n", (), "paths.vols", id="nan-scalar"),
    pytest.param(BASE + "[paths]\nvols = [0.5, nan]\n", (), "paths.vols[1]", id="nan-in-vector"),
    pytest.param(BASE + "[pool]\ninitial_value = inf\n", (), "pool.initial_value", id="inf"),
    pytest.param(
        BASE + "[simulation]\n", (), "malformed TOML", id="duplicate-table"
    ),  # TOML forbids redefining a table
    pytest.param(
        BASE.replace("[simulation]", "[simulation]\nsteps_per_year = -inf"),
        (),
        "simulation.steps_per_year",
        id="negative-inf",
    ),
    pytest.param(None, ("paths.vols=[0.5,-0.1,0.5]",), "paths.vols[1]", id="negative-vol"),
    pytest.param(None, ("paths.vols=11.0",), "paths.vols", id="vol-above-range"),
    pytest.param(None, ("market.initial_prices=0",), "market.initial_prices", id="zero-price"),
    pytest.param(
        None, ("simulation.steps_per_year=0",), "simulation.steps_per_year", id="zero-spy"
    ),
    pytest.param(None, ("simulation.seed=-1",), "simulation.seed", id="negative-seed"),
    pytest.param(None, ("simulation.dtype=float16",), "simulation.dtype", id="bad-dtype"),
    pytest.param(None, ("paths.jump_intensity=1e9",), "paths.jump_intensity", id="jump-rate"),
    pytest.param(
        None,
        ("paths.correlation=[[1.0,0.5,0.1],[0.4,1.0,0.1],[0.1,0.1,1.0]]",),
        "paths.correlation: expected a symmetric matrix",
        id="corr-not-symmetric",
    ),
    pytest.param(
        None,
        ("paths.correlation=[[1.0,0.99,0.0],[0.99,1.0,0.99],[0.0,0.99,1.0]]",),
        "paths.correlation: expected a positive definite matrix",
        id="corr-not-pd",
    ),
    pytest.param(
        None,
        ("paths.correlation=[[1.0,0.5],[0.5,1.0]]",),
        "paths.correlation: expected a 3x3 matrix",
        id="corr-wrong-shape",
    ),
    pytest.param(
        None,
        ("paths.correlation=[1.0,0.5,0.1]",),
        "paths.correlation",
        id="corr-vector",
    ),
    pytest.param(
        None,
        ("paths.correlation=[[0.9,0.5,0.1],[0.5,1.0,0.1],[0.1,0.1,1.0]]",),
        "paths.correlation: expected ones on the diagonal",
        id="corr-diagonal",
    ),
    pytest.param(
        None,
        ("paths.correlation=[[1.0,1.5,0.1],[1.5,1.0,0.1],[0.1,0.1,1.0]]",),
        "paths.correlation[0][1]",
        id="corr-out-of-range",
    ),
    pytest.param(
        None,
        ("pool.target_weights=[0.25,0.25,0.25,0.3]",),
        "pool.target_weights: expected weights that sum to 1",
        id="weights-sum",
    ),
    pytest.param(
        None,
        ("pool.target_weights=[0.5,0.5]",),
        "pool.target_weights: expected 4 values",
        id="weights-length",
    ),
    pytest.param(
        None,
        ("pool.target_weights=[0.5,0.5,0.5,-0.5]",),
        "pool.target_weights[3]",
        id="weights-negative",
    ),
    pytest.param(
        None, ("paths.vols=[0.5,0.6]",), "paths.vols: expected 3 values", id="vector-length"
    ),
    pytest.param(None, ("paths.vols=[]",), "paths.vols", id="empty-vector"),
    pytest.param(
        None,
        ("paths.vols=[[0.5,0.6,0.7],[0.5,0.6]]", "simulation.num_pools=2"),
        "paths.vols",
        id="ragged-per-pool",
    ),
    pytest.param(None, ("simulation.num_pools=0",), "simulation.num_pools", id="zero-pools"),
    pytest.param(
        None,
        ("pool.initial_value=[1.0e6,2.0e6]",),
        "pool.initial_value: a per-pool list needs simulation.num_pools = 256",
        id="per-pool-count",
    ),
    pytest.param(
        None,
        ("paths.vols=[[0.5,0.6,0.7],[0.5,0.6,0.7],[0.5,0.6,0.7]]", "simulation.num_pools=4"),
        "paths.vols: a per-pool list needs simulation.num_pools = 4",
        id="per-pool-vector-count",
    ),
    pytest.param(
        None,
        ("pool.initial_value={grid=[1.0,2.0,3.0]}", "simulation.num_pools=8"),
        "simulation.num_pools: expected a multiple of the 3 grid combinations",
        id="grid-not-dividing",
    ),
    pytest.param(
        None,
        ("pool.initial_value={grid=[1.0,2.0]}", "paths.vols={grid=[0.5,0.6,0.7]}"),
        "simulation.num_pools: expected a multiple of the 6 grid combinations",
        id="grid-product-not-dividing",
    ),
    pytest.param(
        None, ("pool.initial_value={range=[1.0,2.0]}",), "pool.initial_value", id="grid-bad-key"
    ),
    pytest.param(None, ("paths.vols={grid=[]}",), "paths.vols.grid", id="grid-empty"),
    pytest.param(
        None,
        ("pool.initial_value={linspace=[1.0,2.0]}",),
        "pool.initial_value.linspace",
        id="linspace-two-numbers",
    ),
    pytest.param(
        None,
        ("pool.initial_value={linspace=[1.0,2.0,2.5]}",),
        "pool.initial_value.linspace",
        id="linspace-float-count",
    ),
    pytest.param(
        None,
        ("pool.initial_value={linspace=[0.0,2.0,3]}",),
        "pool.initial_value.linspace",
        id="linspace-out-of-range",
    ),
    pytest.param(
        None,
        ("paths.correlation={linspace=[0.0,1.0,3]}",),
        "paths.correlation.linspace",
        id="linspace-on-matrix",
    ),
    pytest.param(
        None, ("paths.vols={grid=[[0.5,0.6]]}",), "paths.vols: expected 3 values", id="grid-item"
    ),
    pytest.param(
        None,
        ("paths.model=garch", "paths.garch_alpha=0.2", "paths.garch_beta=0.8"),
        "paths.garch_alpha: expected garch_alpha + garch_beta < 1",
        id="garch-stationarity",
    ),
    pytest.param(
        None,
        ("paths.model=garch", "paths.garch_alpha={grid=[0.05,0.15]}", "simulation.num_pools=8"),
        "paths.garch_alpha: expected garch_alpha + garch_beta < 1",
        id="garch-grid-vs-scalar",
    ),
    pytest.param(
        None,
        (
            *SMALL,
            "paths.model=garch",
            "paths.garch_alpha={grid=[0.01,0.5]}",
            "paths.garch_beta={grid=[0.9,0.3]}",
        ),
        "paths.garch_alpha: expected garch_alpha + garch_beta < 1",
        id="garch-two-grids",
    ),
    pytest.param(None, ("paths.model=heston",), "paths.model", id="unknown-model"),
    pytest.param(None, ("paths.model=bootstrap",), "paths.data", id="bootstrap-without-data"),
    pytest.param(
        None, ("paths.data=no/such/folder",), "paths.data: no/such/folder", id="data-missing"
    ),
    pytest.param(
        None,
        ("paths.data=no\nwhere",),
        "paths.data",
        id="data-missing-newline",
    ),
    pytest.param(
        None,
        ("paths.antithetic=true", "simulation.num_pools=7"),
        "simulation.num_pools: antithetic pairs need an even number",
        id="antithetic-odd",
    ),
    pytest.param(
        None,
        ("output.record_every=25",),
        "output.record_every",
        id="record-every-not-dividing",
    ),
    pytest.param(
        None,
        ("simulation.chunk_length=1000",),
        "simulation.chunk_length: expected at most num_steps",
        id="chunk-too-long",
    ),
    pytest.param(None, ("market.assets=[]",), "market.assets", id="no-assets"),
    pytest.param(
        None, ('market.assets=["BTC","BTC","SOL"]',), "market.assets", id="duplicate-assets"
    ),
    pytest.param(
        BASE + '[paths]\n"vo\\nls" = 0.5\n',
        (),
        "unknown key",
        id="key-with-newline",
    ),
    pytest.param(None, ("simulation.num_pools",), "--set", id="set-without-equals"),
    pytest.param(None, ("num_pools=8",), "--set", id="set-without-section"),
    pytest.param(None, ("a.b.c=1",), "--set", id="set-three-parts"),
    pytest.param(None, ("foo.bar=1",), "unknown section [foo]", id="set-unknown-section"),
    pytest.param(
        None, ("simulation.pools=8",), "simulation.pools: unknown key", id="set-unknown-key"
    ),
]


@pytest.mark.parametrize(("text", "overrides", "expected"), BAD_CONFIGS)
def test_bad_config_raises_one_line(tmp_path, text, overrides, expected):
    path = _config_file(tmp_path, text)
    with pytest.raises(pdlpjax.ConfigError) as info:
        pdlpjax.load_config(path, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert expected in msg


@pytest.mark.parametrize(("text", "overrides", "expected"), BAD_CONFIGS)
def test_bad_config_cli_exits_2(tmp_path, capsys, text, overrides, expected):
    path = _config_file(tmp_path, text)
    out = tmp_path / "out"
    try:  # an accepted config would make the CLI compile and run a whole simulation
        pdlpjax.load_config(path, list(overrides))
    except pdlpjax.ConfigError:
        pass
    else:
        pytest.fail("load_config accepted the config; the CLI would run it")
    rc, stdout, err = _cli(_run_args(path, overrides, out), capsys)
    _assert_one_line_error(rc, err, expected)
    assert stdout == ""
    assert not out.exists(), "a config error must stop the run before the results folder"


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    with pytest.raises(pdlpjax.ConfigError, match="config file not found"):
        pdlpjax.load_config(missing)
    rc, _, err = _cli(["run", str(missing)], capsys)
    _assert_one_line_error(rc, err, "nope.toml")


def test_config_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    rc, _, err = _cli(["run", str(path)], capsys)
    _assert_one_line_error(rc, err, "latin1.toml")


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([], id="no-command"),
        pytest.param(["run"], id="no-config"),
        pytest.param(["fly", "x.toml"], id="unknown-command"),
        pytest.param(["run", str(QUICKSTART), "--bogus"], id="unknown-option"),
    ],
)
def test_cli_usage_errors_one_line(capsys, argv):
    rc, _, err = _cli(argv, capsys)
    _assert_one_line_error(rc, err, "")


def test_weights_length_message_reads_well():
    with pytest.raises(pdlpjax.ConfigError) as info:
        pdlpjax.load_config(QUICKSTART, ["pool.target_weights=[0.5,0.5]"])
    assert "assets asset" not in str(info.value)


# --------------------------------------------------------------------------- bad data / output


def _daily(n: int = 30, start: float = 100.0) -> list[tuple[str, str]]:
    days = np.arange(np.datetime64("2024-01-01"), np.datetime64("2024-01-01") + n)
    return [(str(d), f"{start * (1.0 + 0.01 * i):.4f}") for i, d in enumerate(days)]


def _bootstrap_config(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "boot.toml"
    path.write_text(
        f"""\
[market]
assets = ["BTC", "ETH"]
initial_prices = [50000.0, 3000.0]

[paths]
model = "bootstrap"
data = "{data.as_posix()}"

[simulation]
num_pools = 4
num_steps = 8
steps_per_year = 365
"""
    )
    return path


def _data_folder(tmp_path: Path, btc_text: str) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "BTCUSDT_1d.csv").write_text(btc_text)
    (folder / "ETHUSDT_1d.csv").write_text(_csv_text(_daily(start=3000.0)))
    return folder


def _csv_text(rows: list[tuple[str, str]], header: str = "timestamp,close") -> str:
    return header + "\n" + "".join(f"{t},{c}\n" for t, c in rows)


BAD_CSVS = [
    pytest.param(
        _csv_text(_daily(), header="timestamp,open"), "missing close column", id="no-close-column"
    ),
    pytest.param(
        _csv_text([(t, c) if i != 5 else (t, "-3") for i, (t, c) in enumerate(_daily())]),
        "expected positive closes",
        id="negative-close",
    ),
    pytest.param(
        _csv_text([(t, c) if i != 5 else (t, "abc") for i, (t, c) in enumerate(_daily())]),
        "expected a number as close, got 'abc' at line 7",
        id="text-close",
    ),
    pytest.param(_csv_text(_daily()[:3] + _daily()[2:]), "duplicate time", id="duplicate-time"),
    pytest.param(
        _csv_text([(t, c) if i != 5 else ("yesterday", c) for i, (t, c) in enumerate(_daily())]),
        "does not parse",
        id="bad-time",
    ),
    pytest.param(
        _csv_text([(t, c) if i != 5 else (t, "nan") for i, (t, c) in enumerate(_daily())]),
        "got nan at line 7",
        id="nan-close-message",
    ),
    pytest.param(
        _csv_text([(t, c) if i != 5 else ("", c) for i, (t, c) in enumerate(_daily())]),
        "empty time at line 7",
        id="empty-time",
    ),
    pytest.param(
        _csv_text(
            [
                (str(1704067200 + 86400 * i) if i != 5 else "nan", c)
                for i, (_, c) in enumerate(_daily())
            ]
        ),
        "'nan' at line 7 is not a time",
        id="nan-epoch-time",
    ),
]


@pytest.mark.parametrize(("btc_text", "expected"), BAD_CSVS)
def test_bad_csv_cli_one_line_naming_file(tmp_path, capsys, btc_text, expected):
    folder = _data_folder(tmp_path, btc_text)
    config = _bootstrap_config(tmp_path, folder)
    cfg = pdlpjax.load_config(config)  # the config itself is fine; the data is read at run
    assert cfg.paths.model == "bootstrap"
    rc, stdout, err = _cli(["run", str(config), "--out", str(tmp_path / "out"), "--quiet"], capsys)
    _assert_one_line_error(rc, err, expected)
    assert "BTCUSDT_1d.csv" in err
    assert stdout == ""


def test_bad_csv_load_closes_raises_data_error(tmp_path):
    folder = _data_folder(tmp_path, _csv_text(_daily(), header="timestamp,open"))
    with pytest.raises(pdlpjax.DataError) as info:
        pdlpjax.load_closes(folder, ["BTC", "ETH"])
    msg = str(info.value)
    assert "\n" not in msg
    assert "BTCUSDT_1d.csv" in msg and "close" in msg


def test_bootstrap_data_spacing_mismatch(tmp_path, capsys):
    folder = _data_folder(tmp_path, _csv_text(_daily()))
    config = _bootstrap_config(tmp_path, folder)
    args = ["run", str(config), "--out", str(tmp_path / "out"), "--quiet"]
    rc, _, err = _cli([*args, "--set", "simulation.steps_per_year=8760"], capsys)
    _assert_one_line_error(rc, err, "simulation.steps_per_year")


def test_output_dir_not_writable(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = blocker / "run"
    rc, stdout, err = _cli(_run_args(QUICKSTART, SMALL, out), capsys)
    _assert_one_line_error(rc, err, "output.dir")
    assert str(out) in err
    assert stdout == ""


def test_output_dir_from_config_not_writable(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    rc, _, err = _cli(
        ["run", str(QUICKSTART), "--quiet", "--set", f'output.dir="{blocker.as_posix()}/x"'],
        capsys,
    )
    _assert_one_line_error(rc, err, "output.dir")


# --------------------------------------------------------------------------- good configs


def test_overrides_parse_toml_values():
    cfg = pdlpjax.load_config(
        QUICKSTART,
        [
            "paths.vols=[0.5,0.6,0.7]",
            "simulation.num_pools=8",
            "paths.model=jump",
            'market.numeraire="USDT"',
            "simulation.steps_per_year=365",
            "pool.rebalance=true",
            "name=my-run",
            " simulation.seed = 7 ",
        ],
    )
    assert cfg.paths.vols == (0.5, 0.6, 0.7)
    assert cfg.simulation.num_pools == 8 and isinstance(cfg.simulation.num_pools, int)
    assert cfg.paths.model == "jump"
    assert cfg.market.numeraire == "USDT"
    assert cfg.simulation.steps_per_year == 365.0
    assert isinstance(cfg.simulation.steps_per_year, float)
    assert cfg.pool.rebalance is True
    assert cfg.name == "my-run"
    assert cfg.simulation.seed == 7
    # untouched keys keep the file's values
    assert cfg.market.assets == ("BTC", "ETH", "SOL")
    assert cfg.simulation.num_steps == 720


def test_name_defaults_to_file_stem(tmp_path):
    path = tmp_path / "my_experiment.toml"
    path.write_text(BASE)
    assert pdlpjax.load_config(path).name == "my_experiment"


def test_last_override_wins():
    cfg = pdlpjax.load_config(QUICKSTART, ["simulation.seed=1", "simulation.seed=2"])
    assert cfg.simulation.seed == 2


def test_resolve_shared_values_broadcast():
    cfg = pdlpjax.load_config(QUICKSTART, ["simulation.num_pools=4"])
    values, combos = pdlpjax.resolve_dynamic(cfg)
    assert combos == [{}]
    vols = values["paths"]["vols"]
    assert vols.shape == (4, 3)
    np.testing.assert_array_equal(vols, np.tile([0.585, 0.788, 1.156], (4, 1)))
    assert values["paths"]["correlation"].shape == (4, 3, 3)
    assert values["pool"]["target_weights"].shape == (4, 4)
    assert values["pool"]["initial_value"].shape == (4,)
    # a scalar stands for a constant vector
    cfg = pdlpjax.load_config(QUICKSTART, ["simulation.num_pools=4", "paths.vols=0.5"])
    np.testing.assert_array_equal(pdlpjax.resolve_dynamic(cfg)[0]["paths"]["vols"], 0.5)


def test_resolve_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(BASE)
    values, _ = pdlpjax.resolve_dynamic(pdlpjax.load_config(path))
    np.testing.assert_array_equal(
        values["paths"]["correlation"], np.broadcast_to(np.eye(2), (8, 2, 2))
    )
    np.testing.assert_allclose(values["pool"]["target_weights"], 1.0 / 3.0)


def test_resolve_per_pool_lists():
    vols = [[0.1 * (i + 1), 0.2, 0.3] for i in range(4)]
    cfg = pdlpjax.load_config(
        QUICKSTART,
        [
            "simulation.num_pools=4",
            f"paths.vols={vols}",
            "pool.initial_value=[1.0, 2.0, 3.0, 4.0]",
        ],
    )
    values, combos = pdlpjax.resolve_dynamic(cfg)
    assert combos == [{}]
    np.testing.assert_array_equal(values["paths"]["vols"], np.asarray(vols))
    np.testing.assert_array_equal(values["pool"]["initial_value"], [1.0, 2.0, 3.0, 4.0])


def test_resolve_grids_split_pools_into_contiguous_blocks(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(
        """\
[market]
assets = ["BTC", "ETH"]
initial_prices = [50000.0, 3000.0]

[paths]
vols = { grid = [[0.5, 0.6], [0.7, 0.8]] }
drifts = [[0.0, 0.1], [0.0, 0.2], [0.0, 0.3], [0.0, 0.4],
          [0.0, 0.5], [0.0, 0.6], [0.0, 0.7], [0.0, 0.8]]

[pool]
initial_value = { grid = [1.0, 2.0] }

[simulation]
num_pools = 8
"""
    )
    cfg = pdlpjax.load_config(path)
    values, combos = pdlpjax.resolve_dynamic(cfg)
    # Cartesian product in section order (paths before pool), later grids varying fastest
    assert [c["paths.vols"] for c in combos] == [(0.5, 0.6), (0.5, 0.6), (0.7, 0.8), (0.7, 0.8)]
    assert [c["pool.initial_value"] for c in combos] == [1.0, 2.0, 1.0, 2.0]
    vols = values["paths"]["vols"]
    assert vols.shape == (8, 2)
    np.testing.assert_array_equal(vols, [[0.5, 0.6]] * 4 + [[0.7, 0.8]] * 4)
    np.testing.assert_array_equal(values["pool"]["initial_value"], [1, 1, 2, 2, 1, 1, 2, 2])
    # a per-pool list is kept pool by pool, independent of the grid
    np.testing.assert_array_equal(values["paths"]["drifts"][:, 1], np.arange(1, 9) / 10)
    # pool i belongs to combination i // (num_pools // len(combos))
    for i in range(8):
        combo = combos[i // 2]
        np.testing.assert_array_equal(vols[i], combo["paths.vols"])
        assert values["pool"]["initial_value"][i] == combo["pool.initial_value"]


def test_resolve_scalar_grid_on_vector_field_broadcasts():
    cfg = pdlpjax.load_config(
        QUICKSTART, ["simulation.num_pools=4", "paths.vols={grid=[0.5, 0.9]}"]
    )
    values, combos = pdlpjax.resolve_dynamic(cfg)
    assert combos == [{"paths.vols": 0.5}, {"paths.vols": 0.9}]
    np.testing.assert_array_equal(values["paths"]["vols"], [[0.5] * 3] * 2 + [[0.9] * 3] * 2)


def test_resolve_linspace_grid():
    cfg = pdlpjax.load_config(
        QUICKSTART, ["simulation.num_pools=10", "paths.crash_intensity={linspace=[0.0, 2.0, 5]}"]
    )
    values, combos = pdlpjax.resolve_dynamic(cfg)
    assert [c["paths.crash_intensity"] for c in combos] == [0.0, 0.5, 1.0, 1.5, 2.0]
    np.testing.assert_array_equal(
        values["paths"]["crash_intensity"], np.repeat([0.0, 0.5, 1.0, 1.5, 2.0], 2)
    )


def _round_trip(cfg, tmp_path: Path):
    path = tmp_path / "round_trip.toml"
    path.write_text(tomli_w.dumps(config_to_dict(cfg)))
    return pdlpjax.load_config(path)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param((), id="quickstart"),
        pytest.param(
            (
                "simulation.num_pools=12",
                "paths.vols={grid=[[0.5,0.6,0.7],[0.8,0.9,1.0]]}",
                "pool.initial_value={linspace=[1.0e5, 1.0e6, 3]}",
                "paths.model=jump",
                "paths.crash_intensity=[" + ",".join(str(float(i)) for i in range(12)) + "]",
            ),
            id="grids-and-per-pool",
        ),
    ],
)
def test_round_trip_keeps_hash(tmp_path, overrides):
    cfg = pdlpjax.load_config(QUICKSTART, list(overrides))
    again = _round_trip(cfg, tmp_path)
    assert pdlpjax.config_hash(again) == pdlpjax.config_hash(cfg)
    assert config_to_dict(again) == config_to_dict(cfg)
    a, ca = pdlpjax.resolve_dynamic(cfg)
    b, cb = pdlpjax.resolve_dynamic(again)
    assert ca == cb
    for sec in a:
        for key in a[sec]:
            np.testing.assert_array_equal(a[sec][key], b[sec][key])


def test_hash_tracks_results_not_output():
    base = pdlpjax.config_hash(pdlpjax.load_config(QUICKSTART))
    assert pdlpjax.config_hash(pdlpjax.load_config(QUICKSTART, ["output.record_every=0"])) == base
    assert pdlpjax.config_hash(pdlpjax.load_config(QUICKSTART, ["name=other"])) == base
    assert pdlpjax.config_hash(pdlpjax.load_config(QUICKSTART, ["simulation.seed=1"])) != base
    assert pdlpjax.config_hash(pdlpjax.load_config(QUICKSTART, ["paths.vols=0.5"])) != base


# --------------------------------------------------------------------------- end to end


def _read_pools_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", str(QUICKSTART), "--out", str(out)]
    for item in SMALL:
        args += ["--set", item]
    rc, stdout, err = _cli(args, capsys)
    assert rc == 0, err
    assert "Traceback" not in err
    assert stdout.strip() == str(out)

    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "pools",
        "steps",
        "seed",
        "wall_seconds",
        "compile_seconds",
        "versions",
        "config_hash",
        "metrics",
    ):
        assert key in summary, key
    assert summary["pools"] == 8
    assert summary["steps"] == 48
    assert summary["seed"] == 0
    assert summary["wall_seconds"] > 0 and summary["compile_seconds"] >= 0
    assert {"jax", "numpy", "python", "pdlpjax"} <= set(summary["versions"])
    sharpe = summary["metrics"]["sharpe"]
    assert np.isfinite(sharpe["mean"])
    lo, hi = sharpe["ci95"]
    assert lo <= sharpe["mean"] <= hi
    assert "groups" not in summary

    cfg = pdlpjax.load_config(QUICKSTART, list(SMALL))
    assert summary["config_hash"] == pdlpjax.config_hash(cfg)
    written = pdlpjax.load_config(out / "config.toml")
    assert pdlpjax.config_hash(written) == summary["config_hash"]
    assert written.simulation.num_pools == 8 and written.output.record_every == 24

    rows = _read_pools_csv(out / "pools.csv")
    assert len(rows) == 8
    assert [int(r["pool"]) for r in rows] == list(range(8))
    assert all(r["group"] == "0" for r in rows)
    assert "sharpe" in rows[0] and "paths.vols.BTC" in rows[0]
    assert len((out / "pools.csv").read_text().splitlines()) == 9

    for png in ("fan_chart.png", "sharpe_hist.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png

    with np.load(out / "record.npz") as rec:
        np.testing.assert_array_equal(rec["steps"], [24, 48])
        assert rec["share_price"].shape == (8, 2)
        assert rec["prices"].shape[:2] == (8, 2)

    # no temporary files left behind by the atomic writes
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_run_grid_writes_groups(tmp_path, capsys):
    out = tmp_path / "grid"
    overrides = [*SMALL, "paths.vols={grid=[0.3, 0.9]}", "pool.rebalance=true"]
    rc, _, err = _cli(_run_args(QUICKSTART, overrides, out), capsys)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    groups = summary["groups"]
    assert len(groups) == 2
    assert [g["params"] for g in groups] == [{"paths.vols": 0.3}, {"paths.vols": 0.9}]
    for g in groups:
        assert g["metrics"]["sharpe"]["n"] <= 4
        assert set(g["metrics"]) == set(summary["metrics"])
    rows = _read_pools_csv(out / "pools.csv")
    assert [r["group"] for r in rows] == ["0"] * 4 + ["1"] * 4
    assert [float(r["paths.vols.SOL"]) for r in rows] == [0.3] * 4 + [0.9] * 4
    again = pdlpjax.load_config(out / "config.toml")
    assert pdlpjax.config_hash(again) == summary["config_hash"]
    assert len(pdlpjax.resolve_dynamic(again)[1]) == 2
