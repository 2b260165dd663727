"""Dense peak FLOP/s of common NVIDIA GPUs: the denominator of MFU.

Lightning's own table (``lightning.fabric.utilities.throughput.get_available_flops``) misses names
real cards report ("NVIDIA H200", "NVIDIA L40S" is read as an L4), gives some peaks with 2:4
sparsity (H200, H100 NVL) and GeForce peaks without tensor cores. MFU compares a dense model with
dense hardware, so the figures here are the datasheets' dense ones (half the starred "with
sparsity" figure where a sheet gives only that), in TFLOP/s. fp16 and bf16 are the tensor-core
rates with fp32 accumulation, as mixed precision runs them. GPUs missing here fall back to
Lightning's table.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

import torch
from lightning.fabric.utilities.throughput import get_available_flops


class Peak(NamedTuple):
    gpu: str  # the table's name, e.g. "H100 SXM"
    tflops: dict[str, float]  # dense TFLOP/s by "bf16", "fp16", "tf32", "fp32"
    source: str


def _peak(gpu: str, bf16: float, tf32: float, fp32: float, source: str) -> Peak:
    return Peak(gpu, {"bf16": bf16, "fp16": bf16, "tf32": tf32, "fp32": fp32}, source)


NVIDIA = "www.nvidia.com/"
H100_SHEET = "NVIDIA H100 datasheet, resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
H200_SHEET = "NVIDIA H200 datasheet, nvdam.widen.net/s/nb5zzzsjdf/hpc-datasheet-sc23-h200-datasheet-3002446"
A100_SHEET = NVIDIA + "content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
A10_SHEET = NVIDIA + "content/dam/en-zz/Solutions/Data-Center/a10/pdf/a10-datasheet.pdf"
ADA_PAPER = "images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf"
GA102_PAPER = NVIDIA + "content/PDF/nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf"

# (name tokens that identify the GPU, its peak); the first entry whose tokens all appear in the
# reported name wins, so a variant comes before its chip's default. Each comment quotes the
# source's figures (* = with sparsity, halved here).
PEAKS: list[tuple[frozenset[str], Peak]] = [
    # BF16 1,671*, TF32 835*, FP32 60
    (frozenset({"h200", "nvl"}), _peak("H200 NVL", 835.5, 417.5, 60.0, H200_SHEET)),
    # BF16 1,979*, TF32 989*, FP32 67; the SXM part reports itself as "NVIDIA H200"
    (frozenset({"h200"}), _peak("H200 SXM", 989.5, 494.5, 67.0, H200_SHEET)),
    # BF16 1,671*, TF32 835*, FP32 60
    (frozenset({"h100", "nvl"}), _peak("H100 NVL", 835.5, 417.5, 60.0, H100_SHEET)),
    # the sheet's 2022 edition: BF16 1,513*, TF32 756*, FP32 51; the PCIe card carries HBM2e
    (frozenset({"h100", "pcie"}), _peak("H100 PCIe", 756.5, 378.0, 51.0, H100_SHEET + " (2022 edition)")),
    (frozenset({"h100", "hbm2e"}), _peak("H100 PCIe", 756.5, 378.0, 51.0, H100_SHEET + " (2022 edition)")),
    # BF16 1,979*, TF32 989*, FP32 67; the SXM part reports itself as "NVIDIA H100 80GB HBM3"
    (frozenset({"h100"}), _peak("H100 SXM", 989.5, 494.5, 67.0, H100_SHEET)),
    # BF16 312 (624*), TF32 156 (312*), FP32 19.5: 40 and 80 GB, SXM4 and PCIe alike
    (frozenset({"a100"}), _peak("A100", 312.0, 156.0, 19.5, "NVIDIA A100 datasheet, " + A100_SHEET)),
    # BF16 362.05 (733*), TF32 183 (366*), FP32 91.6
    (frozenset({"l40s"}), _peak("L40S", 362.05, 183.0, 91.6, "NVIDIA L40S datasheet, " + NVIDIA + "en-us/data-center/l40s/")),
    # BF16 181.05 (362.1*), TF32 90.5 (181*), FP32 90.5
    (frozenset({"l40"}), _peak("L40", 181.05, 90.5, 90.5, "NVIDIA L40 datasheet, " + NVIDIA + "en-us/data-center/l40/")),
    # BF16 242*, TF32 120*, FP32 30.3
    (frozenset({"l4"}), _peak("L4", 121.0, 60.0, 30.3, "NVIDIA L4 datasheet, " + NVIDIA + "en-us/data-center/l4/")),
    # AWS's A10G has no NVIDIA sheet: 80 SMs at 1.71 GHz with GeForce-rate tensor cores (half the
    # A10's rate per SM): BF16 70, TF32 35, FP32 35 (Lightning uses the A10's sheet, BF16 125)
    (frozenset({"a10g"}), _peak("A10G", 70.0, 35.0, 35.0, "baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/")),
    # BF16 125 (250*), TF32 62.5 (125*), FP32 31.2
    (frozenset({"a10"}), _peak("A10", 125.0, 62.5, 31.2, "NVIDIA A10 datasheet, " + A10_SHEET)),
    # appendix: BF16 with FP32 accumulate 165.2 (330.4*), TF32 82.6 (165.2*), FP32 82.6
    (frozenset({"rtx", "4090"}), _peak("RTX 4090", 165.2, 82.6, 82.6, "NVIDIA Ada architecture whitepaper, " + ADA_PAPER)),
    # appendix: BF16 with FP32 accumulate 71 (142*), TF32 35.6 (71*), FP32 35.6
    (frozenset({"rtx", "3090"}), _peak("RTX 3090", 71.0, 35.6, 35.6, "NVIDIA GA102 whitepaper, " + GA102_PAPER)),
]
# Tokens of names whose peak differs from the entry they would otherwise match: a GeForce "Ti",
# "Super", "D" or laptop part, or a MIG slice (a fraction of the GPU: its peak is not the card's).
OTHER_PARTS = frozenset({"ti", "super", "d", "laptop", "mobile", "max", "mig"})


def name_tokens(device_name: str) -> frozenset[str]:
    """``"NVIDIA A100-SXM4-80GB"`` -> {"nvidia", "a100", "sxm4", "80gb"}."""
    return frozenset(re.split(r"[^a-z0-9]+", device_name.lower())) - {""}


def find_peak(device_name: str) -> Optional[Peak]:
    tokens = name_tokens(device_name)
    if tokens & OTHER_PARTS:
        return None
    return next((peak for needed, peak in PEAKS if needed <= tokens), None)


def dtype_key(dtype: torch.dtype) -> Optional[str]:
    """The table's column for a compute dtype; float32 matmuls use TF32 unless asked to stay exact."""
    if dtype is torch.float32:
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)


def available_flops(device: torch.device, dtype: torch.dtype) -> tuple[Optional[float], Optional[str]]:
    """A device's dense peak FLOP/s at ``dtype`` and one line saying which peak that is (None off CUDA).

    None as the peak where none is known: then there is no MFU, and the line says why.
    """
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    key = dtype_key(dtype)
    peak = find_peak(name)
    if peak is not None and key is not None:
        flops = peak.tflops[key] * 1e12
        return flops, f"MFU of {name} against the {peak.gpu}'s dense {key} peak, {flops / 1e12:g} TFLOP/s ({peak.source})"
    if "mig" in name_tokens(name):  # Lightning would give the whole card's peak
        return None, f"no MFU: {name} is a MIG slice, a fraction of the GPU whose peak FLOP/s is not the card's"
    flops = get_available_flops(device, dtype)
    if flops:
        return float(flops), f"MFU of {name} against Lightning's peak for it at {dtype}, {flops / 1e12:g} TFLOP/s"
    return None, f"no MFU: no peak FLOP/s known for {name} at {dtype} (nanogpt_pl/gpu_peaks.py lists the known ones)"
