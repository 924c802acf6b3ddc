"""benchmarks/gpu_check.py runs to the end on CPU (what it does on a GPU, short of the device itself)."""

import subprocess
import sys

from conftest import REPO


def test_the_gpu_check_runs_on_cpu_and_says_what_it_skipped(tmp_path):
    args = ["--model", "scratch_cnn", "--size", "32", "--images", "64", "--batch", "8", "--no-compile"]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled", "HOME": str(tmp_path)},
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    runs = [line.split()[0] for line in out.splitlines() if line.startswith("cpu-")]
    assert runs == ["cpu-off", "cpu-bf16", "cpu-fp16"]
    for line in out.splitlines():
        if line.startswith("cpu-"):  # images/s of head, last:1, all and the trunk store: all measured
            assert all(float(v) > 0 for v in line.split()[1:5]), line
    assert out.count(" ok") == 3 and "CUDA against CPU: skipped, no CUDA device" in out
    assert "T4-class GPU (bf16 emulated) gets fp16" in out and out.rstrip().endswith("all checks passed")
