import json

import numpy as np
import pandas as pd

from pipeline.inference.report import age_bin, write_report


def test_age_bins_come_from_the_config_and_the_last_is_open_ended():
    ages = pd.Series([0.0, 9.5, 10, 29, 30, 116], name="age_true")
    bins = age_bin(ages, [0, 10, 30])
    assert list(bins.cat.categories) == ["0-9", "10-29", "30+"]
    assert bins.astype(str).tolist() == ["0-9", "0-9", "10-29", "10-29", "30+", "30+"]
    assert age_bin(ages, [0, 18]).astype(str).tolist() == ["0-17"] * 3 + ["18+"] * 3


def _figures(coverage: float, groups: bool) -> dict:
    cell = {"rows": 10, "coverage": coverage, "width": 12.5}
    out = {
        "rows": 20,
        "coverage": coverage,
        "width": 12.5,
        "by_age": {"0-12": cell, "13-17": cell, "18-29": cell},
        "by_gender": {"gender 0": cell, "gender 1": cell},
        "min_age": {
            "threshold": 18.0, "yes_among_under": 0.0641, "no_among_over": None, "unsure": 0.25, "under": 8, "over": 12,
        },
        "gender": {
            "ece_before": 0.0811, "ece_after": 0.0233, "log_loss_before": 0.1725, "log_loss_after": 0.1683,
            "reliability_before": [[0.1, 0.2, 10], [0.8, 0.7, 10]],
            "reliability_after": [[0.15, 0.2, 10], [0.75, 0.7, 10]],
        },
    }  # fmt: skip
    if groups:
        out["by_group"] = {"0": cell, "2": cell}
    return out


def _run_folder(exp, calibration: dict | None):
    """A finished blend's run folder: oof_blend.csv and blend.json (with `calibration`, or without the key)."""
    from pipeline.core.layout import OOF_BLEND, BlendFile

    exp.mkdir()
    rng = np.random.default_rng(0)
    age = rng.uniform(1, 80, 40).round()
    oof = pd.DataFrame(
        {
            "id": [f"{i}" for i in range(40)],
            "age_true": age,
            "age:m": age + rng.normal(0, 4, 40),
            "age_blend": age + rng.normal(0, 3, 40),
            "gender_true": np.arange(40) % 2,
            "prob_blend": rng.uniform(0, 1, 40),
            "group": np.arange(40) % 5,
        }
    )
    oof.to_csv(exp / OOF_BLEND, index=False)
    scores = {"score": 0.5, "mae": 5.0, "rmse": 6.0, "accuracy": 0.8, "f1": 0.8}
    table = {name: {"threshold": 0.5, **scores} for name in ("m", "blend")}
    BlendFile(
        40, "score", 0.5, 0.51, scores, None, table, {"m": scores, "blend": scores}, 0.5, {"m": 1.0}, {"m": 1.0}, None,
        calibration=calibration,
    ).write(exp)  # fmt: skip


def test_report_shows_the_calibrated_answers(tmp_path):
    calibration = {
        "level": 0.9,
        "age": {"edges": [0, 13, 30], "low": [0, 8, 20], "high": [12, 30, 70]},
        "gender": {"method": "temperature", "a": 0.8, "b": 0.0},
        "chosen_by": {"none": 0.1725, "temperature": 0.1683, "platt": 0.1684, "isotonic": 0.1690},
        "oof": _figures(0.9012, groups=True),
        "holdout": _figures(0.8771, groups=True),
    }
    _run_folder(exp := tmp_path / "exp", calibration)
    page = write_report(exp, ["m"], 2, "score", [0, 18, 60]).read_text()
    section = page[page.index("<h2>Calibrated answers</h2>") :]
    assert "level 0.9" in section and "(3 bins)" in section and "temperature (a=0.800, b=0.000)" in section
    assert "temperature 0.1683" in section and "isotonic 0.1690" in section
    assert "<th>held out coverage</th>" in section and "<td>0.877</td>" in section and "<td>0.901</td>" in section
    assert "<th>age 13-17</th>" in section and "<th>gender 1</th>" in section and "<th>Asian</th>" in section
    assert "<th>White</th>" in section and "<th>0</th>" not in section  # race names, not codes
    assert "At least 18?" in section and "yes among under 18 (the costly error)" in section
    assert "<td>0.064</td>" in section and "<td>–</td>" in section and "<td>8</td>" in section  # None: a dash
    assert "<td>0.0811</td>" in section and "<td>0.0233</td>" in section
    png = exp / "plots" / "reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and page.count("data:image/png;base64,") == 6


def test_report_without_calibration_leaves_the_section_out(tmp_path):
    _run_folder(exp := tmp_path / "exp", None)
    assert "calibration" not in json.loads((exp / "blend.json").read_text())  # as an earlier version wrote it
    page = write_report(exp, ["m"], 2, "score", [0, 18, 60]).read_text()
    assert "Calibrated answers" not in page and "By race" in page
    assert not (exp / "plots" / "reliability.png").exists() and page.count("data:image/png;base64,") == 5
