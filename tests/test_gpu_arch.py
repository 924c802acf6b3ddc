"""A GPU the installed torch has no kernels for (a P100, compute capability 6.0, under torch 2.8+ builds) is refused in
one line before anything is written; the GPU's capability and torch's arch list are simulated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_config

from pipeline.core.errors import PipelineError
from pipeline.models.gpu import check_gpu, kernels_cover
from pipeline.orchestration.cli import main

# torch 2.8+ default CUDA 12.8/12.9 builds and CUDA 13 builds: no Pascal (sm_60/sm_61) kernels
NO_PASCAL = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def simulate(monkeypatch, capability: tuple[int, int], arch_list: list[str], name: str = "Tesla P100-PCIE-16GB"):
    """torch sees one CUDA GPU of `capability` named `name`, and was built for `arch_list`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch_list))


def test_a_p100_under_a_torch_without_pascal_kernels_is_one_line_that_says_what_to_do(monkeypatch):
    simulate(monkeypatch, (6, 0), NO_PASCAL)
    with pytest.raises(PipelineError) as e:
        check_gpu("cuda")
    msg = str(e.value)
    assert "\n" not in msg
    assert "GPU 0 (Tesla P100-PCIE-16GB, compute capability 6.0)" in msg
    assert f"torch {torch.__version__}" in msg and "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120" in msg
    assert 'on Kaggle choose the accelerator "GPU T4 x2"' in msg and "built for sm_60" in msg


def test_a_t4_runs_the_same_torch(monkeypatch):
    simulate(monkeypatch, (7, 5), NO_PASCAL, name="Tesla T4")
    check_gpu("cuda")
    check_gpu(torch.device("cuda", 0))


def test_a_capability_covered_only_by_ptx_is_jit_compiled(monkeypatch):
    simulate(monkeypatch, (8, 9), ["sm_75", "sm_80", "compute_86"], name="NVIDIA L4")
    check_gpu("cuda")
    assert kernels_cover((6, 1), ["sm_75", "compute_60"]) and not kernels_cover((6, 0), ["compute_61"])


def test_an_sm_cubin_runs_on_later_minors_of_its_major_only(monkeypatch):
    simulate(monkeypatch, (8, 6), ["sm_80"], name="NVIDIA A10")
    check_gpu("cuda")
    assert not kernels_cover((9, 0), ["sm_80", "sm_86"]) and not kernels_cover((7, 0), ["sm_75"])
    assert kernels_cover((12, 0), ["sm_120"]) and not kernels_cover((10, 3), ["sm_100a"])  # sm_XYa: X.Y only


def test_nothing_is_asked_of_a_cpu_device_or_a_machine_without_cuda(monkeypatch):
    def no(*args, **kwargs):
        raise AssertionError("a CPU-only machine must not query CUDA devices")

    for name in ("current_device", "get_device_capability", "get_device_name", "get_arch_list"):
        monkeypatch.setattr(torch.cuda, name, no)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_gpu("cuda")
    check_gpu("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", no)
    check_gpu(torch.device("cpu"))


@pytest.mark.parametrize("stage", ["run", "train", "predict"])
def test_the_run_refuses_it_in_one_line_and_writes_nothing(stage, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "cfg.yaml", data={"root": "demo", "img_size": 32})  # demo data: written by a run
    before = sorted(p.name for p in tmp_path.iterdir())
    simulate(monkeypatch, (6, 0), NO_PASCAL)
    assert main([stage, str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: GPU 0 (Tesla P100-PCIE-16GB, compute capability 6.0)") and err.count("\n") == 1
    assert "GPU T4 x2" in err and "train.device=cpu" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before == ["cfg.yaml"]  # no runs/, folds/, submissions/


def test_train_device_cpu_runs_on_such_a_machine_without_asking(monkeypatch):
    from pipeline.core.config import Config, TrainConfig
    from pipeline.training.job import check_device, pick_device

    simulate(monkeypatch, (6, 0), NO_PASCAL)
    cfg = Config(train=TrainConfig(device="cpu"))
    check_device(cfg)
    assert pick_device(cfg).type == "cpu"
    with pytest.raises(PipelineError, match="compute capability 6.0"):
        pick_device(Config(train=TrainConfig(device="auto")))  # a Ray worker or Tune trial checks its own GPU


def test_a_torch_bundle_on_such_a_gpu_is_refused_before_loading(monkeypatch):
    from pipeline.exporting.torch_runtime import torch_runners

    simulate(monkeypatch, (6, 1), NO_PASCAL, name="NVIDIA GeForce GTX 1080")
    with pytest.raises(
        PipelineError, match=r"GTX 1080, compute capability 6\.1\).*or run on the CPU with --device cpu"
    ):
        torch_runners({}, {}, {}, Path("bundle"), "auto")
