import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core.config import ModelConfig
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import competition_score, evaluate
from pipeline.data.test_set import validate_submission
from pipeline.inference.blend import age_weights, best_threshold, gender_weights
from pipeline.models.backbones import create_model
from pipeline.models.tta import TTA_SHIFT, TTAFold, apply_tta
from pipeline.training.evaluation import AgeUnits, predict_arrays
from pipeline.training.job import Inference


def test_tta_averages_the_flipped_view():
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="scratch_cnn"), load_weights=False).eval()
    with torch.no_grad():  # make the outputs depend visibly on the input
        model.age_head.weight.mul_(1000)
        model.gender_head.weight.mul_(1000)
    images = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    rows = np.array([4, 0, 2])
    x = torch.from_numpy(images[rows]).permute(0, 3, 1, 2)
    mirrored = np.stack([cv2.flip(im, 1) for im in images[rows]])  # flipped left-right, independently of torch
    x_mirrored = torch.from_numpy(mirrored).permute(0, 3, 1, 2)
    assert torch.equal(apply_tta(x, "hflip"), x_mirrored) and torch.equal(apply_tta(x, "none"), x)
    with torch.no_grad():
        a0, g0 = model(x)
        a1, g1 = model(x_mirrored)
    cpu = dict(device=torch.device("cpu"), precision=None, workers=0)
    how = Inference(batch_size=2, tta=("none", "hflip"), **cpu)
    age, prob = predict_arrays(model, images, rows, how, AgeUnits(30.0, 10.0))
    assert np.allclose(age, ((a0 + a1) / 2).numpy() * 10 + 30, rtol=1e-4, atol=1e-3)
    assert np.allclose(prob, ((torch.sigmoid(g0) + torch.sigmoid(g1)) / 2).numpy(), rtol=1e-4, atol=1e-4)
    age_plain, _ = predict_arrays(
        model, images, rows, Inference(batch_size=4, tta=("none",), **cpu), AgeUnits(30.0, 10.0)
    )
    assert np.allclose(age_plain, a0.numpy() * 10 + 30, rtol=1e-4, atol=1e-3) and not np.allclose(age_plain, age)


def test_zoom_and_shift_views_resample_like_opencv_and_the_bundle_runs_the_same_views():
    images = np.random.default_rng(1).integers(0, 255, (3, 40, 40, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    zoomed = np.stack([cv2.resize(im[2:38, 2:38], (40, 40), interpolation=cv2.INTER_LINEAR) for im in images])
    diff = apply_tta(x, "zoom").permute(0, 2, 3, 1).int() - torch.from_numpy(zoomed).int()
    assert apply_tta(x, "zoom").dtype == torch.uint8 and diff.abs().max() <= 1  # OpenCV rounds its own way
    assert torch.equal(apply_tta(x, "zoom_hflip"), apply_tta(x.flip(3), "zoom"))
    left, right = apply_tta(x, "shift_left"), apply_tta(x, "shift_right")
    s = round(40 * TTA_SHIFT)
    assert torch.equal(left[..., : 40 - s], x[..., s:]) and torch.equal(
        left[..., 40 - s :], x[..., -1:].expand(-1, -1, -1, s)
    )
    assert torch.equal(right[..., s:], x[..., : 40 - s]) and torch.equal(
        right[..., :s], x[..., :1].expand(-1, -1, -1, s)
    )

    torch.manual_seed(0)
    model = create_model(ModelConfig(name="scratch_cnn"), load_weights=False).eval()
    views = ["none", "zoom", "shift_left", "zoom_hflip"]
    how = Inference(batch_size=2, tta=tuple(views), device=torch.device("cpu"), precision=None, workers=0)
    age, prob = predict_arrays(model, images, np.arange(3), how, AgeUnits(30.0, 10.0))
    with torch.no_grad():
        bundle_age, bundle_prob = TTAFold(model, views, 30.0, 10.0)(torch.from_numpy(images))
    assert np.allclose(age, bundle_age.numpy(), atol=1e-4) and np.allclose(prob, bundle_prob.numpy(), atol=1e-6)


def test_blend_recovers_a_known_mix():
    rng = np.random.default_rng(0)
    n = 4000
    a, b, c = (rng.normal(40, 15, n) for _ in range(3))
    y = 0.6 * a + 0.4 * b  # c is useless
    w = age_weights(np.column_stack([a, b, c]), y)
    assert np.allclose(w, [0.6, 0.4, 0.0], atol=0.01) and w.min() >= 0 and abs(w.sum() - 1) < 1e-9

    truth = rng.integers(0, 2, n)
    good = np.clip(truth * 0.7 + 0.15 + rng.normal(0, 0.1, n), 0.01, 0.99)
    noise = rng.uniform(0.01, 0.99, n)
    wg = gender_weights(np.column_stack([noise, good]), truth)
    assert wg[1] > 0.9


def test_threshold_maximises_macro_f1():
    y = np.array([0] * 50 + [1] * 50)
    prob = np.concatenate([np.linspace(0.0, 0.6, 50), np.linspace(0.65, 1.0, 50)])
    t = best_threshold(prob, y)
    assert 0.6 < t <= 0.65 and evaluate(np.zeros(100), np.zeros(100), y, prob, t)["f1"] == 1.0


def test_competition_score():
    assert competition_score(0.0, 1.0) == 1.0
    assert competition_score(45.0, 1.0) == 0.0
    assert competition_score(6.0, 0.9) == pytest.approx(2 * 0.8 * 0.9 / 1.7)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.iloc[:-1], "missing"),
        (lambda s: pd.concat([s, s.iloc[:1]]), "4 rows for 3 expected"),
        (lambda s: s.iloc[[1, 0, 2]], "order"),
        (lambda s: s.assign(age=[np.nan, 1.0, 2.0]), "non-finite"),
        (lambda s: s.assign(gender=[0, 2, 1]), "0/1"),
        (lambda s: s.assign(id=["a", "b", "zzz"]), "not in the test set"),
    ],
)
def test_submission_validation(change, message):
    sub = pd.DataFrame({"id": ["a", "b", "c"], "age": [1.0, 2.0, 3.0], "gender": [0, 1, 1]})
    validate_submission(sub, ["a", "b", "c"], "id", "age", "gender")
    with pytest.raises(PipelineError, match=message):
        validate_submission(change(sub), ["a", "b", "c"], "id", "age", "gender")
