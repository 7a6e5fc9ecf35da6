"""The conventions of STYLE.md that a machine can check: lint, types, module size, public names."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import gateway
from tests.conftest import ROOT


def test_ruff_finds_nothing():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "gateway", "tests", "bench", "fixtures"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "gateway"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_modules_stay_small():
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in (ROOT / "gateway").rglob("*.py")}
    assert {str(p): n for p, n in sizes.items() if n > 800} == {}


def test_every_module_declares_its_public_names():
    for module in pkgutil.walk_packages(gateway.__path__, "gateway."):
        if module.ispkg or module.name.endswith("__main__"):
            continue
        imported = importlib.import_module(module.name)
        assert hasattr(imported, "__all__"), module.name
        for name in imported.__all__:
            assert hasattr(imported, name), f"{module.name}.__all__ names missing {name}"
