"""MFU's denominator: dense peaks matched against the names real GPUs report, faked on a CPU."""

from __future__ import annotations

import pytest
import torch

from nanogpt_pl import gpu_peaks


@pytest.mark.parametrize(("name", "gpu", "bf16"), [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.5), ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5), ("NVIDIA H200", "H200 SXM", 989.5),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0), ("NVIDIA A100-PCIE-40GB", "A100", 312.0),
    ("NVIDIA A10G", "A10G", 70.0), ("NVIDIA L4", "L4", 121.0), ("NVIDIA L40S", "L40S", 362.05),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2), ("NVIDIA GeForce RTX 3090", "RTX 3090", 71.0),
])
def test_real_device_names_find_their_dense_peak(name, gpu, bf16):
    peak = gpu_peaks.find_peak(name)
    assert (peak.gpu, peak.tflops["bf16"]) == (gpu, bf16)
    assert peak.tflops["fp32"] <= peak.tflops["tf32"] <= peak.tflops["bf16"]


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 3090 Ti", "NVIDIA A100-SXM4-40GB MIG 1g.5gb", "Tesla T4"])
def test_other_parts_are_not_taken_for_a_listed_gpu(name):
    assert gpu_peaks.find_peak(name) is None


def test_available_flops_on_a_faked_gpu_and_off_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 NVL")
    flops, note = gpu_peaks.available_flops(torch.device("cuda", 0), torch.bfloat16)
    assert flops == 835.5e12 and "NVIDIA H100 NVL" in note and "dense bf16" in note
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB MIG 1g.5gb")
    assert gpu_peaks.available_flops(torch.device("cuda", 0), torch.bfloat16)[0] is None
    assert gpu_peaks.available_flops(torch.device("cpu"), torch.bfloat16) == (None, None)
