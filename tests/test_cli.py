"""The command line: flags, subcommands, messages and the checks made before compiling.

Nothing here compiles: runners are replaced by stubs where a check must stop a run before it.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import re
from pathlib import Path

import pytest

import pdlpjax
from pdlpjax import _memory, cli, results
from pdlpjax.config import SECTIONS, ConfigError, config_from_dict, key_rows, load_config

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def no_compile(monkeypatch):
    """Runners that fail the test if a check let the run through."""

    def fail(*args, **kwargs):
        raise AssertionError("the run was not refused before compiling")

    monkeypatch.setattr(cli, "run_config", fail)
    monkeypatch.setattr(pdlpjax.sweep, "run_sweep", fail)
    monkeypatch.setattr(pdlpjax.calibrate, "calibrate_config", fail)


@pytest.fixture
def stub_run(monkeypatch):
    calls = []

    def run(cfg, out, quiet=False, resume=False):
        calls.append(out)
        return out

    monkeypatch.setattr(cli, "run_config", run)
    return calls


# --------------------------------------------------------------------------- discoverability


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"pdlpjax {importlib.metadata.version('pdlpjax')}"


def test_keys_lists_every_field(capsys):
    assert cli.main(["keys"]) == 0
    out = capsys.readouterr().out
    for r in key_rows():
        assert re.search(rf"^  {r['key']} +{re.escape(r['kind'])}, default ", out, re.M), r
    for name in SECTIONS:
        assert f"[{name}]" in out
    assert cli.main(["keys", "hedge"]) == 0
    out = capsys.readouterr().out
    assert "[hedge]" in out and "[market]" not in out
    assert "risk_aversion" in out and "range [0, ∞)" in out
    assert cli.main(["keys", "bogus"]) == 2
    assert "unknown section 'bogus'" in _error_line(capsys)


def _readme_tables() -> dict[str, list[dict[str, str]]]:
    text = (ROOT / "README.md").read_text()
    ref = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    tables: dict[str, list[dict[str, str]]] = {}
    section = None
    for line in ref.splitlines():
        m = re.fullmatch(r"\*\*`\[(\w+)\]`\*\*", line)
        if m:
            section = tables.setdefault(m.group(1), [])
            continue
        if section is None or not line.startswith("| `"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        key, kind, default, range_, meaning = cells
        section.append(
            {
                "key": key.strip("`"),
                "kind": kind,
                "default": default.strip("`"),
                "range": range_,
                "meaning": meaning,
            }
        )
    return tables


def test_readme_tables_match_the_metadata():
    """Every README key exists with the same kind, default, range and meaning, and every
    field is in the README. Regenerate the tables from `config.key_rows` when this fails."""
    tables = _readme_tables()
    assert list(tables) == list(SECTIONS)
    for name in SECTIONS:
        expected = [{k: v for k, v in r.items() if k != "section"} for r in key_rows(name)]
        assert tables[name] == expected, name


@pytest.mark.parametrize(
    "command, example",
    [
        ("run", "configs/quickstart.toml"),
        ("sweep", "configs/hedged_sharpe.toml"),
        ("calibrate", "configs/calibrate_hedge.toml"),
    ],
)
def test_help_cites_an_example_config(command, example, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "-h"])
    out = capsys.readouterr().out
    assert example in out
    assert (ROOT / example).is_file()
    section = {"run": None, "sweep": "sweep", "calibrate": "calibrate"}[command]
    if section:
        assert f"[{section}]" in out
        assert f"[{section}.params]" in (ROOT / example).read_text()
    assert "--overwrite" in out
    assert ("--resume" in out) == (command != "calibrate")


def test_calibrate_does_not_offer_resume(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["calibrate", "--resume", str(tmp_path)])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --resume" in _error_line(capsys)


# --------------------------------------------------------------------------- results folders


def test_out_folder_with_files_is_refused(capsys, tmp_path, no_compile):
    out = tmp_path / "old"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert cli.main(["run", QUICKSTART, "--out", str(out), "--quiet"]) == 2
    line = _error_line(capsys)
    assert f"--out: {out} already holds files" in line and "--overwrite" in line
    assert (out / "summary.json").read_text() == "{}"
    args = ["run", QUICKSTART, "--set", f"output.dir={out}", "--quiet"]
    assert cli.main(args) == 2
    assert "output.dir:" in _error_line(capsys)


def test_overwrite_and_empty_folders_are_accepted(capsys, tmp_path, stub_run):
    out = tmp_path / "old"
    out.mkdir()
    assert cli.main(["run", QUICKSTART, "--out", str(out), "--quiet"]) == 0  # empty
    (out / "summary.json").write_text("{}")
    assert cli.main(["run", QUICKSTART, "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert stub_run == [str(out), str(out)]


def test_default_folder_is_never_shared(tmp_path, monkeypatch):
    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(results._dt, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(QUICKSTART)
    first = results.prepare_out_dir(cfg)
    (first / "summary.json").write_text("{}")
    second = results.prepare_out_dir(cfg)
    assert first == Path("runs/quickstart-20260102-030405")
    assert second == Path("runs/quickstart-20260102-030405-2")


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "", ".", "..", " x", "a\nb", "a:b"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ConfigError, match=r"^name: .* cannot name a results folder"):
        config_from_dict({"name": name, "simulation": {"num_pools": 4}})


def test_safe_names_are_accepted():
    for name in ["quickstart", "my run 2", "fee-1e-5_x.y", "café"]:
        assert config_from_dict({"name": name}).name == name


# --------------------------------------------------------------------------- memory


@pytest.fixture
def sixteen_gb(monkeypatch):
    """The memory checks see 16 GB available, whatever this machine has."""
    monkeypatch.setattr(_memory, "available_bytes", lambda: 16 * 10**9)


def test_twenty_million_pools_are_refused_before_compiling(
    capsys, tmp_path, no_compile, sixteen_gb
):
    args = ["run", QUICKSTART, "--set", "simulation.num_pools=20000000", "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "run")]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: memory: this run needs about ")
    assert "available" in line and "simulation.num_pools" in line
    assert not (tmp_path / "run").exists()


def test_sweep_and_calibrate_memory_is_checked(capsys, tmp_path, no_compile, sixteen_gb):
    sweep = [
        "sweep",
        str(ROOT / "configs" / "hedged_sharpe.toml"),
        "--set",
        "sweep.replicates=2000000",
        "--set",
        "sweep.batch_pools=200000000",
    ]
    assert cli.main([*sweep, "--quiet", "--out", str(tmp_path / "s")]) == 2
    assert "memory: this sweep needs about" in _error_line(capsys)
    cal = [
        "calibrate",
        str(ROOT / "configs" / "calibrate_hedge.toml"),
        "--set",
        "calibrate.batch_pools=100000",
        "--set",
        "simulation.num_steps=8760",
    ]
    assert cli.main([*cal, "--quiet", "--out", str(tmp_path / "c")]) == 2
    line = _error_line(capsys)
    assert "memory: this calibrate needs about" in line and "gradient" in line


def test_memory_estimate_parts():
    cfg = load_config(QUICKSTART, ["hedge.enabled=true", "output.record_every=24"])
    parts = _memory.estimate_bytes(cfg, "run")
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    plain = _memory.estimate_bytes(load_config(QUICKSTART), "run")
    assert parts["state"] > 1.5 * plain["state"]  # the hedge's covariance window
    assert parts["record"] > 0
    # Linear in pools; a sweep is sized by its batch, not its total.
    double = _memory.estimate_bytes(load_config(QUICKSTART, ["simulation.num_pools=512"]))
    assert double["state"] == pytest.approx(2 * plain["state"])
    sweep = load_config(str(ROOT / "configs" / "hedged_sharpe.toml"))
    small = load_config(str(ROOT / "configs" / "hedged_sharpe.toml"), ["sweep.batch_pools=256"])
    assert (
        _memory.estimate_bytes(small, "sweep")["state"]
        < _memory.estimate_bytes(sweep, "sweep")["state"]
    )
    assert _memory.available_bytes() is None or _memory.available_bytes() > 0
    # Padded to whole blocks of pools: 1 pool costs as much state as POOL_BLOCK.
    one = _memory.estimate_bytes(load_config(QUICKSTART, ["simulation.num_pools=1"]))
    assert one["state"] == pytest.approx(plain["state"] / 2)
    with pytest.raises(ConfigError, match="more than the 0.5 GB available"):
        _memory.check_memory(cfg, "run", available=500_000_000)
    _memory.check_memory(cfg, "run", available=10**12)


# --------------------------------------------------------------------------- messages


def test_config_path_that_is_a_folder(capsys, tmp_path):
    assert cli.main(["run", str(tmp_path)]) == 2
    assert "is a folder, not a config file" in _error_line(capsys)
    (tmp_path / "config.toml").write_text("")
    assert cli.main(["run", str(tmp_path)]) == 2
    assert f"did you mean {tmp_path / 'config.toml'}" in _error_line(capsys)


@pytest.mark.parametrize("name", ["schur_damping", "calibrate_gamma", "claims_twm"])
def test_experiment_config_names_its_script(name, capsys, no_compile):
    path = f"configs/{name}.toml"
    for command in ("run", "sweep", "calibrate"):
        assert cli.main([command, str(ROOT / path)]) == 2
        line = _error_line(capsys)
        assert f"is read by experiments/{name}.py, not pdlpjax {command}" in line


def test_experiment_config_recognised_by_its_sections(capsys, tmp_path, no_compile):
    path = tmp_path / "mine.toml"
    path.write_text("seed = 1\n[fit]\nsteps = 3\n")
    assert cli.main(["run", str(path)]) == 2
    assert "is read by experiments/calibrate_gamma.py" in _error_line(capsys)


def test_sweep_and_calibrate_name_the_section_they_need(capsys, no_compile):
    assert cli.main(["sweep", QUICKSTART]) == 2
    line = _error_line(capsys)
    assert "needs [sweep] params" in line and "configs/hedged_sharpe.toml" in line
    hedged = str(ROOT / "configs" / "hedged_sharpe.toml")
    assert cli.main(["calibrate", hedged]) == 2
    line = _error_line(capsys)
    assert "needs [calibrate] params" in line and "configs/calibrate_hedge.toml" in line
    assert f"it has [sweep] params: pdlpjax sweep {hedged}" in line
    cal = str(ROOT / "configs" / "calibrate_hedge.toml")
    assert cli.main(["sweep", cal]) == 2
    assert f"it has [calibrate] params: pdlpjax calibrate {cal}" in _error_line(capsys)


def test_run_notes_the_sections_it_ignores(capsys, tmp_path, stub_run):
    fee = str(ROOT / "configs" / "calibrate_fee.toml")
    assert cli.main(["run", fee, "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "note: pdlpjax run ignores [sweep] and [calibrate]" in err


def test_runs_started_together_get_their_own_folders(tmp_path, monkeypatch):
    """The default folder is claimed by creating it, so 8 runs in the same second (threads
    racing) get 8 folders."""
    import threading

    from pdlpjax.results import prepare_out_dir

    monkeypatch.chdir(tmp_path)
    cfg = load_config(QUICKSTART)
    outs, barrier = [], threading.Barrier(8)

    def one():
        barrier.wait()
        outs.append(prepare_out_dir(cfg))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({str(o) for o in outs}) == 8


def test_compilation_cache_folder_follows_the_environment(tmp_path):
    """`PDLPJAX_CACHE` (a folder, or off), else JAX's own variable, else the user's cache."""
    from pdlpjax._cache import cache_dir

    assert cache_dir({"PDLPJAX_CACHE": str(tmp_path)}) == tmp_path
    for off in ("off", "0", "None", " "):
        assert cache_dir({"PDLPJAX_CACHE": off, "JAX_COMPILATION_CACHE_DIR": "/x"}) is None
    assert cache_dir({"JAX_COMPILATION_CACHE_DIR": "/x", "HOME": "/h"}) == Path("/x")
    assert cache_dir({"XDG_CACHE_HOME": "/c", "HOME": "/h"}) == Path("/c/pdlpjax/xla")
    assert cache_dir({"HOME": "/h"}) == Path("/h/.cache/pdlpjax/xla")


def test_enable_compilation_cache_sets_jax_and_survives_an_unwritable_folder(tmp_path):
    import jax

    from pdlpjax._cache import enable_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        assert enable_compilation_cache({"PDLPJAX_CACHE": "off"}) is None
        blocker = tmp_path / "file"
        blocker.write_text("")
        assert enable_compilation_cache({"PDLPJAX_CACHE": str(blocker / "sub")}) is None
        assert jax.config.jax_compilation_cache_dir == before
        got = enable_compilation_cache({"PDLPJAX_CACHE": str(tmp_path / "xla")})
        assert got == tmp_path / "xla" and got.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(got)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_progress_says_compiling_before_the_first_compile(capsys):
    from pdlpjax.results import _progress

    show = _progress("demo")
    assert capsys.readouterr().err == "[demo] compiling…\n"
    show(10, 20, 1.0, 5.0)
    assert "step 10/20" in capsys.readouterr().err
