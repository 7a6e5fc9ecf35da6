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
        '[registry]\nurl = "sqlite:///registry.db"\n[auth]\nopen = true\n'
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


def test_index_one_source_and_list_sources_with_their_health(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(fixture_files()[0], tmp_path / name / "one.dcm")
    (tmp_path / "gateway.toml").write_text(
        '[registry]\nurl = "sqlite:///registry.db"\n[auth]\nopen = true\n'
        '[[sources]]\nname = "a"\nkind = "filesystem"\npath = "a"\n'
        '[[sources]]\nname = "b"\nkind = "filesystem"\npath = "b"\n'
        '[[sources]]\nname = "gone"\nkind = "dicomweb"\nurl = "http://127.0.0.1:9/dicom-web"\n'
        "connect_timeout = 1\n"
    )
    result = run("index", "--config", "gateway.toml", "--source", "b", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "b: 1 files seen, 1 indexed" in result.stdout and "a:" not in result.stdout
    listing = run("sources", "--config", "gateway.toml", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert "never" in lines["a"]
    assert lines["b"].split()[-4:] == ["1", "0", "0", "ok"]  # instances, failures, conflicts, health
    assert "unreachable" in lines["gone"]


def test_index_of_an_unknown_source_names_it(tmp_path):
    (tmp_path / "gateway.toml").write_text('[registry]\nurl = "sqlite:///registry.db"\n[auth]\nopen = true\n')
    result = run("index", "--config", "gateway.toml", "--source", "nope", cwd=tmp_path)
    assert result.returncode == 2
    assert "no source named 'nope'" in result.stderr
