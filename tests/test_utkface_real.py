"""Opt-in checks on the real UTKFace folder (UTKFACE=1); skipped cleanly when it is absent."""

import os

import numpy as np
import pytest
from conftest import REPO

from pipeline.core.config import load_config
from pipeline.data.cache import decode_image
from pipeline.data.competition import load_competition

ROOT = REPO.parent / "shared" / "data" / "utkface"
pytestmark = [
    pytest.mark.utkface,
    pytest.mark.skipif(os.environ.get("UTKFACE") != "1", reason="opt-in: set UTKFACE=1"),
    pytest.mark.skipif(not ROOT.is_dir(), reason=f"{ROOT} is absent"),
]


def test_utkface_folder_parses_with_its_three_bad_names(tmp_path):
    cfg = load_config(None, [f"data.root={ROOT}", f"data.cache_dir={tmp_path}"])
    comp = load_competition(cfg)
    assert len(comp.train) + len(comp.skipped) == 21351
    assert len(comp.skipped) == 3 and all("does not parse" in why for _, why in comp.skipped)
    assert comp.train.age.between(1, 116).all() and set(comp.train.gender) == {0, 1}
    assert set(comp.train.group) == {0, 1, 2, 3, 4}


def test_utkface_images_decode_to_rgb(tmp_path):
    for path in sorted(ROOT.glob("*.jpg"))[:20]:
        img = decode_image(str(path), 96)
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8 and img.std() > 5
