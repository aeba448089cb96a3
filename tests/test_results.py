"""Results-folder contract: identity failures are loud, pdlp outputs exist, README is true."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import pdlpjax as P
from pdlpjax import cli
from pdlpjax.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.toml"
SMALL = [
    "simulation.num_pools=4",
    "simulation.num_steps=48",
    "simulation.chunk_length=24",
    "output.record_every=24",
]


def test_identity_violation_exits_3_with_a_diagnostic(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "run",
        str(QUICKSTART),
        "--out",
        str(out),
        "--quiet",
        *sum((["--set", s] for s in [*SMALL, "simulation.identity_tolerance=1e-12"]), []),
    ]
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3
    assert len(err) == 1 and err[0].startswith("error: pool ")
    assert "step 0" in err[0] and "accounting identity" in err[0]
    diag = json.loads(next(out.glob("diagnostic_pool*.json")).read_text())
    assert diag["step"] == 0 and int(diag["code"]) & 8
    assert not (out / "summary.json").exists()


def test_pdlp_run_reports_pool_figures(tmp_path):
    cfg = P.load_config(QUICKSTART, SMALL)
    out = P.run_config(cfg, tmp_path / "run", quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "utilisation",
        "open_interest",
        "fee_income",
        "fee_apr",
        "liquidations",
        "bad_debt",
        "funding_paid",
        "identity_error",
    ):
        assert key in summary["metrics"], key
    assert summary["metrics"]["utilisation"]["mean"] > 0
    assert summary["identity"]["max"] <= cfg.simulation.identity_tolerance
    assert (out / "utilisation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (out / "pools.csv").read_text().splitlines()[0].split(",")
    assert "fee_apr" in header and "market.open_rate.BTC" in header


def test_passive_mode_writes_no_pool_figures(tmp_path):
    cfg = P.load_config(QUICKSTART, [*SMALL, "pool.mode=passive"])
    out = P.run_config(cfg, tmp_path / "run", quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    assert "fee_apr" not in summary["metrics"]
    assert not (out / "utilisation.png").exists()


def test_readme_documents_every_config_key():
    readme = (ROOT / "README.md").read_text()
    for name, cls in SECTIONS.items():
        assert f"**`[{name}]`**" in readme, name
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in readme, f"{name}.{f.name}"


@pytest.mark.parametrize("line", [0, 1])
def test_readme_opens_with_the_two_commands(line):
    readme = (ROOT / "README.md").read_text().splitlines()
    block = readme[readme.index("```bash") + 1 : readme.index("```bash") + 3]
    assert "python3.11 -m venv .venv" in block[line]
    assert ("pdlpjax run configs/quickstart.toml", "pytest")[line] in block[line]
