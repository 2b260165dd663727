"""Mixed precision follows the GPU a run will use; on a CPU the GPUs are faked."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch
from lightning.pytorch.plugins.precision.amp import _optimizer_handles_unscaling

from conftest import REPO, SHAKESPEARE
from nanogpt_pl.run import precision
from nanogpt_pl.cli import GPTCLI, cli

# Two unlike GPUs, so a test can tell which one was asked about.
GPUS = {0: ("NVIDIA A100-SXM4-80GB", (8, 0)), 1: ("Tesla V100-SXM2-16GB", (7, 0))}


@pytest.fixture
def fake_gpus(monkeypatch):
    """CUDA present with the GPUS above, as the child process that reads a device sees them (in this
    process, asking torch would initialize CUDA: forked DDP processes could not use it then);
    returns the lines the precision module says."""

    def child(command, **kwargs):
        index = int(re.search(r"i = (\d+)", command[-1]).group(1))
        name, (major, minor) = GPUS[index]
        return subprocess.CompletedProcess(command, 0, stdout=f"{major} {minor} {name}\n", stderr="")

    def initializes_cuda(*args, **kwargs):
        raise AssertionError("CUDA initialized in the launching process")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(precision, "num_cuda_devices", lambda: len(GPUS))
    monkeypatch.setattr(precision.subprocess, "run", child)
    monkeypatch.setattr(torch.cuda, "get_device_name", initializes_cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", initializes_cuda)
    monkeypatch.setattr(torch.version, "hip", None)
    said: list[str] = []
    monkeypatch.setattr(precision, "rank_zero_info", said.append)
    return said


@pytest.mark.parametrize(
    ("devices", "index"),
    [("auto", 0), (1, 0), (2, 0), (-1, 0), ("2", 0), ("1,", 1), ("1, 0", 1), ([1], 1), ([0, 1], 0), ("-1", 0)],
)
def test_the_device_index_is_read_as_lightning_reads_devices(fake_gpus, devices, index):
    assert precision.cuda_device_index("auto", devices) == index
    assert precision.cuda_device_index("gpu", devices) == index


def test_no_cuda_index_off_cuda(fake_gpus, monkeypatch):
    assert precision.cuda_device_index("cpu", "auto") is None
    monkeypatch.setattr(precision, "num_cuda_devices", lambda: 0)
    assert precision.cuda_device_index("auto", "auto") is None


def parsed(*args: str):
    """A config as the CLI parses and adjusts it, without building the (CUDA) trainer."""
    original = GPTCLI.instantiate_classes
    GPTCLI.instantiate_classes = lambda self: None
    try:
        return cli(["--data.data_path", str(SHAKESPEARE), *args], run=False).config
    finally:
        GPTCLI.instantiate_classes = original


@pytest.mark.parametrize(("devices", "expected"), [("1", "bf16-mixed"), ("1,", "16-mixed"), ("[1]", "16-mixed")])
def test_v7_gets_fp16_only_on_a_gpu_without_bf16_tensor_cores(fake_gpus, devices, expected):
    config = parsed("--config", str(REPO / "configs" / "v7.yaml"), "--trainer.devices", devices)
    assert config.trainer.precision == expected
    if expected == "16-mixed":
        (line,) = fake_gpus
        assert "Tesla V100-SXM2-16GB (cuda:1, compute capability 7.0)" in line and "16-mixed" in line
    else:
        assert fake_gpus == []
    assert config.model.optimizer.init_args.fused is True  # v7 does not clip: fused stays


def test_a_clipping_config_under_fp16_gets_an_optimizer_lightning_accepts(fake_gpus):
    config = parsed(
        "--config", str(REPO / "configs" / "v7_cpu.yaml"),
        "--trainer.precision", "bf16-mixed", "--trainer.devices", "1,",
    )
    assert config.trainer.precision == "16-mixed"
    init_args = config.model.optimizer.init_args
    assert (init_args.fused, init_args.foreach) == (False, True)
    assert len(fake_gpus) == 2 and "foreach=true" in fake_gpus[1]
    # Lightning's own test before it refuses to clip under the gradient scaler.
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], **init_args.as_dict())
    assert not _optimizer_handles_unscaling(optimizer)


def test_precision_is_untouched_on_a_gpu_with_bf16_and_on_rocm(fake_gpus, monkeypatch):
    config = parsed("--config", str(REPO / "configs" / "v7_cpu.yaml"), "--trainer.precision", "bf16-mixed")
    assert config.trainer.precision == "bf16-mixed" and config.model.optimizer.init_args.fused is True
    monkeypatch.setattr(torch.version, "hip", "6.2")
    config = parsed("--config", str(REPO / "configs" / "v7.yaml"), "--trainer.devices", "1,")
    assert config.trainer.precision == "bf16-mixed" and fake_gpus == []
