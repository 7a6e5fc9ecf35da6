"""The command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import fixture_files


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_index_prints_a_summary_and_counts_bad_files(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    for path in fixture_files()[:3]:
        shutil.copy(path, archive / path.name)
    (archive / "junk.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "gateway.toml").write_text(
        '[registry]\nurl = "sqlite:///registry.db"\n'
        '[[sources]]\nname = "archive"\nkind = "filesystem"\npath = "archive"\n'
    )
    result = run("index", "--config", "gateway.toml", "--workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "archive: 4 files seen, 3 indexed, 0 unchanged, 1 failed" in result.stdout
    assert "junk.bin not indexed: not a DICOM file" in result.stderr
    again = run("index", "--config", "gateway.toml", cwd=tmp_path)
    assert "0 indexed, 4 unchanged, 0 failed" in again.stdout


def test_bad_config_is_one_line_and_exit_code_2(tmp_path):
    (tmp_path / "gateway.toml").write_text("[server]\nport = 'eighty'\n")
    result = run("serve", "--config", "gateway.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "gateway: server.port: expected int, got str 'eighty'"
