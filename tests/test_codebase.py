"""The conventions of STYLE.md that a machine can check: lint, types, module size, public names."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
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


# The layers, bottom first (README, "Architecture"). A module may import its own layer and the
# ones below, never one above: value types and errors know nothing of the gateway; the codecs know
# DICOM bytes, not where they come from; sources know the codecs, not the index; the registry's
# harvest reads sources through their contract; access decides over the index; the HTTP layer
# speaks for all of them; composition and the command line wire it together.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("gateway", "gateway.types", "gateway.errors", "gateway.redact", "gateway.dburl", "gateway.config"),
    ("gateway.codec", "gateway.fhir"),  # DICOM and FHIR formats, without I/O
    ("gateway.stream",),
    ("gateway.registry",),
    ("gateway.access",),
    ("gateway.notify",),  # subscriptions: deliver what the feed says to whom the policy allows
    ("gateway.dicomweb", "gateway.api", "gateway.viewer", "gateway.urls"),
    (
        "gateway.app",
        "gateway.service",
        "gateway.cli",
        "gateway.backup",
        "gateway.__main__",
        "gateway.prefetch",  # the announcer's new studies warming their priors on the sources
    ),
)


def layer_of(module: str) -> int:
    """The layer of a gateway module: the one naming its longest package prefix."""
    best, rank = "", -1
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, rank = name, index
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS"
    return rank


def gateway_imports(path) -> list[tuple[int, str]]:
    """(line, module) of every gateway import in a file, lazy and type-checking ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gateway":
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "gateway"]
    return found


def test_layers_import_only_downward():
    upward = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mine = layer_of(module)
        for line, target in gateway_imports(path):
            # "from gateway.stream import framemap" names a module; "from gateway.x import Name" a
            # member of gateway.x: either way the longest known prefix decides the layer.
            if layer_of(target) > mine:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert upward == []


def test_the_layer_check_sees_an_upward_import():
    assert layer_of("gateway.stream.folder") < layer_of("gateway.registry.store")
    assert layer_of("gateway.types") == 0 and layer_of("gateway") == 0
    assert layer_of("gateway.app") == len(LAYERS) - 1
    assert layer_of("gateway.codec.framemap.Packed") == 1


# isinstance(x, SomeSource) or hasattr(source, ...): what the contract's capabilities replace.
SOURCE_CLASSES = re.compile(r"isinstance\([^)]*\b[A-Z]\w*Source\b|hasattr\(\s*\w*(source|Source)\b")


def test_no_dispatch_on_source_classes():
    """Sources are used through their contract and its declared capabilities, never by asking
    which class an object is or which attributes it happens to have."""
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "gateway").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if SOURCE_CLASSES.search(line)
    ]
    assert found == []
