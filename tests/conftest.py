import os
from pathlib import Path

import pytest

from pipeline.demo import make_demo

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small synthetic competition in the Kaggle layout, shared by the tests (read-only)."""
    return make_demo(tmp_path_factory.mktemp("demo") / "comp", n_train=90, n_test=24, size=48, seed=1)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder so that runs/, folds/ and submissions/ are the test's own."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
