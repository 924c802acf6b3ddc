"""Whether the installed torch can run on a CUDA GPU at all: its kernels are built for a list of compute
capabilities (torch.cuda.get_arch_list()), and a GPU outside it fails at its first kernel (e.g. a P100, compute
capability 6.0, under torch 2.8+ default builds, which have no Pascal kernels). Shared by training and the torch
bundles, so that either refuses such a GPU in one line before anything is written."""

from __future__ import annotations

import re

import torch

from ..core.errors import PipelineError

_ARCH = re.compile(r"(sm|compute)_(\d+)(\d)([a-z]?)$")  # sm_75, sm_120, sm_90a, compute_90 (PTX)


def kernels_cover(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a GPU of compute capability `capability` runs a torch built for `arch_list`: an sm_XY cubin runs on
    capability X.Y and later minors of major X (an sm_XYa one on X.Y only); compute_XY PTX is JIT-compiled for
    any capability from X.Y on."""
    for entry in arch_list:
        m = _ARCH.match(entry)
        if not m:
            continue
        kind, built, suffix = m[1], (int(m[2]), int(m[3])), m[4]
        if suffix == "a":  # arch-specific features: that exact capability only
            ok = built == capability
        elif kind == "sm":
            ok = built[0] == capability[0] and built[1] <= capability[1]
        else:
            ok = built <= capability
        if ok:
            return True
    return False


def check_gpu(device: torch.device | str, cpu_instead: str = "") -> None:
    """Refuse, in one line, a CUDA `device` the installed torch has no kernels for (kernels_cover); `cpu_instead`
    names the setting that runs on the CPU instead. Nothing to do for a CPU device or without CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = tuple(torch.cuda.get_device_capability(index))
    arch_list = torch.cuda.get_arch_list()
    if kernels_cover(capability, arch_list):
        return
    cc = f"{capability[0]}.{capability[1]}"
    built = " ".join(arch_list) or "no GPU architectures"
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    or_cpu = f", or run on the CPU with {cpu_instead}" if cpu_instead else ""
    raise PipelineError(
        f"GPU {index} ({torch.cuda.get_device_name(index)}, compute capability {cc}) has no kernels in the installed "
        f'torch {torch.__version__}{cuda} (built for {built}): on Kaggle choose the accelerator "GPU T4 x2"; '
        f"elsewhere install a torch built for sm_{capability[0]}{capability[1]} (an older release or a source "
        f"build){or_cpu}"
    )
