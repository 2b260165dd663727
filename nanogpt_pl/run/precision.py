"""Mixed precision fitted to the GPU a run trains on: bf16 where it has bf16 tensor cores, fp16 where not.

Configs ask for ``bf16-mixed``. On a GPU before Ampere (compute capability below 8.0: V100, T4,
RTX 20xx) PyTorch only emulates bf16: no tensor cores, and attention falls back to SDPA's slow math
kernel. ``torch.cuda.is_bf16_supported()`` counts that emulation as support (its
``including_emulation=False`` asks the right question, but of the current device only), so the
question is put here to the capability of the device the trainer will use.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Optional

import torch
from lightning.fabric.accelerators.cuda import num_cuda_devices
from lightning.pytorch.utilities import rank_zero_info

from nanogpt_pl.errors import UsageError

BF16_CAPABILITY = (8, 0)  # Ampere: the first tensor cores with bf16
FP16_PRECISIONS = ("16-mixed", "16")  # the precisions Lightning runs with a gradient scaler


def cuda_device_index(accelerator: Any, devices: Any) -> Optional[int]:
    """The CUDA device a run with these trainer settings trains on (the first, with several); None off CUDA.

    Lightning reads ``devices`` as a count from device 0 when it is an int or a plain number string
    (``2``, ``"2"``, ``-1``, ``"auto"``), and as device indices when it is a list or a string with a
    comma (``[1]``, ``"1,"``, ``"1,3"``). A machine's GPUs are assumed alike: the first decides.
    """
    # Lightning's count asks NVML where it can and never initializes CUDA here, in the launching
    # process, so the processes ddp_fork / ddp_notebook fork from it can still use CUDA.
    if str(accelerator) not in ("auto", "gpu", "cuda") or num_cuda_devices() == 0:
        return None
    if isinstance(devices, str):
        text = devices.strip()
        if "," not in text:
            return 0  # "auto", "-1", "2": a count of devices, from 0
        devices = [int(index) for index in text.split(",") if index.strip()]
    if isinstance(devices, (list, tuple)) and devices:
        return int(devices[0])
    return 0


def describe_device(index: int) -> tuple[str, tuple[int, int]]:
    """The name and compute capability of CUDA device ``index``, without initializing CUDA here.

    Asking torch directly would initialize CUDA in the launching process, and every process that
    ``ddp_fork`` / ``ddp_notebook`` then forks from it fails ("Cannot re-initialize CUDA in forked
    subprocess"). So unless CUDA is already initialized here, a short-lived child process asks: one
    torch import (about 1.5 s on the development machine), once per run, only for bf16-mixed on CUDA.
    """
    if torch.cuda.is_initialized():
        return torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)
    script = (
        "import torch; i = %d; print(*torch.cuda.get_device_capability(i), torch.cuda.get_device_name(i))" % int(index)
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    if result.returncode:
        reason = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise UsageError(f"cannot read the compute capability of cuda:{index} ({reason}).")
    major, minor, name = result.stdout.strip().split(" ", 2)
    return name, (int(major), int(minor))


def has_bf16_tensor_cores(index: int) -> bool:
    if torch.version.hip is not None:  # ROCm: torch reports bf16 on the AMD GPUs it supports
        return True
    return describe_device(index)[1] >= BF16_CAPABILITY


def fit_to_device(trainer: Any, model: Any) -> None:
    """Adjust a parsed config (its ``trainer`` and ``model`` namespaces) to the GPU it will run on.

    ``bf16-mixed`` becomes ``16-mixed`` on a GPU without bf16 tensor cores. And under fp16 (asked for
    or switched to), Lightning refuses to clip gradients with a fused optimizer, because the fused
    step unscales the gradients itself, after clipping would have seen them scaled: such an
    optimizer runs with ``foreach`` instead, the same update in a few more kernels. One line says
    each change. The price of that path: the gradient scaler reads its inf/NaN verdict back to the
    host before every step (to skip a step whose gradients overflowed), one host sync per step that
    the fused optimizer, which takes the verdict on the device, avoids. Only GPUs without bf16 tensor
    cores (before Ampere) with clipping on get there; bf16 runs have no scaler at all.
    """
    if str(trainer.precision) == "bf16-mixed":
        index = cuda_device_index(trainer.accelerator, trainer.devices)
        if index is not None and not has_bf16_tensor_cores(index):
            name, (major, minor) = describe_device(index)
            rank_zero_info(
                f"precision: {name} (cuda:{index}, compute capability {major}.{minor}) has no bf16 tensor "
                "cores: training in 16-mixed (fp16 with a gradient scaler) instead of the config's bf16-mixed."
            )
            trainer.precision = "16-mixed"
    init_args = getattr(getattr(model, "optimizer", None), "init_args", None)
    if (
        str(trainer.precision) in FP16_PRECISIONS
        and trainer.get("gradient_clip_val")
        and init_args is not None
        and init_args.get("fused")
    ):
        init_args.fused = False
        if "foreach" in init_args:
            init_args.foreach = True
        name = str(model.optimizer.class_path).rsplit(".", 1)[-1]
        rank_zero_info(
            f"optimizer: {name} with fused=true cannot clip gradients under {trainer.precision}'s gradient "
            "scaler: using foreach=true instead (the same update)."
        )
