"""notebooks/kaggle_train.ipynb as a Kaggle user runs it, in a real Jupyter kernel (ipykernel, this lane's Python):
its parameters cell pointed at the read-only demo competition and the lane's wheel, every cell executed by nbclient.
The notebook's pip install is a no-op here (the wheel is installed; --no-index, as with internet off)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

BIN = Path(sys.executable).parent  # as in conftest.py
WHEEL = Path(os.environ.get("AGEGENDER_WHEEL", ""))  # the wheel the lane built and installed
SLUG = "age-gender-demo"  # kaggle_root's competition
NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "kaggle_train.ipynb"
PARAMETERS = ("INPUT", "WORKING", "PACKAGE", "WHEELS", "CONFIG", "OVERRIDES", "RESUME_FROM")
FAST = ["data.img_size=32", "models.0.phases.0.epochs=2", "models.1.phases.0.epochs=1", "models.1.phases.2.epochs=1"]


def parameters_cell(nb) -> nbformat.NotebookNode:
    return next(c for c in nb.cells if c.cell_type == "code")


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder under root: its mode and its content's digest."""
    return {
        str(p.relative_to(root)): (p.stat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "")
        for p in sorted(root.rglob("*"))
    }


def execute(
    kaggle_root: Path, name: str, overrides: list[str], resume_from: str = ""
) -> tuple[Path, nbformat.NotebookNode]:
    """The notebook with its parameters replaced, run in a fresh folder under working/ (other tests share it)."""
    assert WHEEL.is_file(), f"AGEGENDER_WHEEL={WHEEL}: not the wheel tests/lanes/run.sh built"
    working = kaggle_root / "working" / name
    working.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = {
        "INPUT": str(kaggle_root / "input" / SLUG),
        "WORKING": str(working),
        "PACKAGE": "agegender[train]",
        "WHEELS": str(WHEEL.parent),
        "CONFIG": "demo",
        "OVERRIDES": overrides,
        "RESUME_FROM": resume_from,
    }
    parameters_cell(nb).source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    # the kernel: ipykernel's python3 spec, started with this Python; its PATH finds this venv's commands first
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "WANDB_MODE": "disabled"}
    env["PIP_NO_INDEX"] = "1"  # nothing is fetched: the install must be satisfied by what the lane installed
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(working)}})
    try:
        client.execute(env=env)
    finally:
        nbformat.write(nb, working / "executed.ipynb")  # what the kernel printed, for a failure's post-mortem
    return working, nb


def text_of(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_committed_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    cell = parameters_cell(nb)
    values: dict = {}
    exec(cell.source, values)  # assignments only
    assert set(PARAMETERS) <= set(values), cell.source
    assert values["INPUT"].startswith("/kaggle/input/") and values["WORKING"] == "/kaggle/working"
    assert values["CONFIG"] == "utkface_gpu" and values["OVERRIDES"] == [] and values["WHEELS"] == ""
    assert values["RESUME_FROM"] == ""
    assert values["PACKAGE"].startswith("agegender[train]")
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, c.source
    assert any(c.cell_type == "markdown" and "GPU T4 x2" in c.source for c in nb.cells)


def test_notebook_writes_the_submission(kaggle_root):
    comp = kaggle_root / "input" / SLUG
    before = snapshot(comp)
    working, nb = execute(kaggle_root, "train-notebook", FAST)
    out = text_of(nb)
    assert f"$ {BIN / 'agegender'} run demo data.root={comp}" in out, out  # this venv's command
    assert "submission: submissions/demo-" in out and "CV score" in out, out
    sub = pd.read_csv(working / "submission.csv")
    sample = pd.read_csv(comp / "sample_submission.csv")
    assert list(sub.columns) == list(sample.columns)
    assert sub["id"].tolist() == sample["id"].tolist()
    assert sub.notna().all().all()
    assert snapshot(comp) == before  # the competition's files untouched


def test_a_failing_run_stops_the_notebook_with_its_message(kaggle_root):
    with pytest.raises(CellExecutionError) as e:
        execute(kaggle_root, "failing-notebook", ["data.img_size=abc"])
    assert "data.img_size: expected int, got 'abc'" in str(e.value)
    assert not (kaggle_root / "working" / "failing-notebook" / "submission.csv").exists()


def test_a_run_longer_than_a_session_goes_on_from_its_output(kaggle_root):
    """The budget runs out in the first session: the notebook ends without a submission, saying how to go on; the
    second session, RESUME_FROM the first one's output, takes its folds over and writes the submission."""
    first, nb = execute(kaggle_root, "first-session", [*FAST, "budget=0.01s"])
    out = text_of(nb)
    assert "stopped: the budget of 0s is used up" in out and "run it in a new session with RESUME_FROM" in out, out
    assert not (first / "submission.csv").exists() and list(first.glob("runs/demo/*/fold0/last.pt"))
    second, nb = execute(kaggle_root, "second-session", FAST, resume_from=str(first))
    out = text_of(nb)
    assert "resume_from: took over 0 trained fold(s) and 1 unfinished one(s)" in out, out
    assert (second / "submission.csv").is_file()
