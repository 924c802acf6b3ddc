"""Torch bundles: each fold's safetensors weights in the network they were trained in, run by TTAFold.
load_bundle here loads either kind of bundle; pipeline.serving.bundle alone (torch-free) loads ONNX bundles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from ..core.config import ModelConfig
from ..core.errors import BundleError
from ..core.layout import BundleInfo, BundleModel
from ..models.backbones import create_model
from ..models.gpu import check_gpu
from ..models.tta import TTAFold
from ..serving import bundle


def torch_runners(
    model: BundleModel, info: BundleInfo, files: dict[str, bytes], path: Path, device: str
) -> list[bundle.FoldRunner]:
    """One bundle.FoldRunner per fold of a bundle.json model entry, on `device` (auto: CUDA when there is one)."""
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    check_gpu(dev, cpu_instead="--device cpu")  # a GPU this torch has no kernels for: one line
    mcfg = ModelConfig.from_inference_spec(model.spec)
    runners = []
    for f in model.folds:
        try:
            state = load_safetensors(files[f.file])
            net = create_model(mcfg, load_weights=False)
            net.load_state_dict(state)
        except (SafetensorError, RuntimeError, ValueError) as e:
            raise BundleError(f"{path}: {f.file} does not hold {model.name}'s weights ({str(e)[:200]})") from None
        fold = TTAFold(net, info.tta, f.age_mean, f.age_std).eval().to(dev)
        fold = fold.to(memory_format=torch.channels_last)

        @torch.inference_mode()
        def run(x: np.ndarray, fold=fold) -> tuple[np.ndarray, np.ndarray]:
            age, prob = fold(torch.from_numpy(x).to(dev))
            return age.cpu().numpy(), prob.cpu().numpy()

        runners.append(run)
    return runners


def load_bundle(path: str | Path, device: str = "auto", threads: int = 0, parallel_folds: bool = True) -> bundle.Bundle:
    """A torch or an ONNX bundle -> a ready predictor (pipeline.serving.bundle.load_bundle, with torch_runners)."""
    return bundle.load_bundle(path, device, threads, parallel_folds, torch_runners=torch_runners)
