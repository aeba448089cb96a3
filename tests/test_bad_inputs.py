"""The bad-input corpus: every file in `tests/bad_inputs/` fails cleanly.

Each case is a TOML config (`<name>.toml`, or `<name>/config.toml` beside the CSV data it
names) whose first line is `# expect: <text>`. Running it must exit with status 2 and print
exactly one line, `error: ...` containing that text, with no traceback, before anything
compiles. Relative paths in a case are relative to the corpus folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlpjax import cli

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
CASES = sorted([*CORPUS.glob("*.toml"), *CORPUS.glob("*/config.toml")])


def test_corpus_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=lambda p: str(p.relative_to(CORPUS)))
def test_bad_input_fails_with_one_line(case, capsys, monkeypatch, tmp_path):
    first = case.read_text(errors="replace").splitlines()[0]
    assert first.startswith("# expect: "), f"{case}: first line must be '# expect: ...'"
    expected = first.removeprefix("# expect: ")
    monkeypatch.chdir(CORPUS)
    argv = ["run", str(case), "--quiet"]
    if "output.dir" not in expected:
        argv += ["--out", str(tmp_path / "run")]
    rc = cli.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, captured.err
    assert "Traceback" not in captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_csv_with_byte_order_mark_is_accepted(tmp_path):
    """Spreadsheets write UTF-8 CSVs with a byte-order mark; it is not part of the header."""
    from pdlpjax import load_closes

    rows = "".join(f"2024-01-{d:02d},{100 + d}.5\r\n" for d in range(1, 8))
    (tmp_path / "BTCUSDT_1d.csv").write_bytes(("\ufefftimestamp,close\r\n" + rows).encode())
    closes = load_closes(tmp_path, ["BTC"])
    assert closes.prices.shape == (7, 1) and closes.prices[0, 0] == 101.5
