"""The layering of pipeline/ (docs/ARCHITECTURE.md), as import-linter checks it from pyproject.toml's contracts:
lower layers never import higher ones, no cycles, the serving side needs nothing from training, core and data no
torch, and the torch-free runtime of an ONNX bundle imports none of the training stack."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )


def test_every_contract_is_kept():
    r = lint_imports(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout and "5 kept" in r.stdout, r.stdout


def test_an_upward_import_and_a_cycle_break_the_contracts(tmp_path):
    """The contracts see lazy imports inside functions too, and name what broke them."""
    shutil.copytree(REPO / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    files = tmp_path / "pipeline" / "core" / "files.py"
    files.write_text(files.read_text() + "\n\ndef _upward():\n    from ..training import train  # noqa: F401\n")
    bundle = tmp_path / "pipeline" / "serving" / "bundle.py"
    bundle.write_text(bundle.read_text() + "\n\ndef _cycle():\n    from . import export  # noqa: F401\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0
    assert "each layer imports only from the layers below it BROKEN" in r.stdout, r.stdout
    assert "core and data import no torch BROKEN" in r.stdout  # through training
    assert "no import cycles: within each layer, sibling modules import one way only BROKEN" in r.stdout
    assert "need only requirements-serve.txt BROKEN" in r.stdout  # bundle -> export -> torch
