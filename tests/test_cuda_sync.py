"""On a GPU, a training step that does not log never makes the host wait for the device."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import REPO
from nanogpt_pl import data
from nanogpt_pl.cli import cli
from nanogpt_pl.terminal import TrainingBar

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

START, END, STEPS = 4, 14, 16  # the checked stretch: after warm-up, before the final estimate


class SyncsAreErrors(Callback):
    """Every host-device sync from the sampling of step START + 1 to the end of step END - 1 raises.

    Switched at the start of a batch, so each checked step's whole path is inside: the dataloader
    and the block sampler, all callbacks and module hooks, forward, backward, the optimizer, and
    Lightning's bookkeeping after the step.
    """

    def __init__(self) -> None:
        self.checked: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == START:
            torch.cuda.set_sync_debug_mode("error")
        elif batch_idx == END:
            torch.cuda.set_sync_debug_mode("default")
        if START <= batch_idx < END:
            self.checked.append(batch_idx)

    def on_exception(self, trainer, pl_module, exception) -> None:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("text_on_device", [True, False], ids=["text-on-device", "pinned-host-copies"])
def test_non_logging_steps_do_not_sync(text_on_device, small_text, tmp_path, monkeypatch):
    if not text_on_device:  # as for a corpus larger than the device's memory
        monkeypatch.setattr(data, "DEVICE_SHARE", 0.0)
    monkeypatch.chdir(tmp_path)
    run = cli([  # run=False: the trainer is built, not run, so no subcommand
        "--config", str(REPO / "configs" / "v7.yaml"), "--data.data_path", str(small_text),
        "--model.config.n_embd", "64", "--model.config.n_head", "2", "--model.config.n_layer", "2",
        "--data.block_size", "32", "--data.batch_size", "8", "--data.eval_iters", "2",
        "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", str(STEPS),
        "--trainer.log_every_n_steps", "50", "--trainer.accelerator", "gpu", "--trainer.devices", "1",
    ], run=False)
    for callback in run.trainer.callbacks:  # the bar reads the loss when it redraws; not within the stretch
        if isinstance(callback, TrainingBar):
            callback.refresh_seconds = 3600
    check = SyncsAreErrors()
    run.trainer.callbacks.insert(0, check)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert check.checked == list(range(START, END))
    assert run.trainer.global_step == STEPS
    generator_device = run.datamodule._generators["train"].device.type
    assert generator_device == ("cuda" if text_on_device else "cpu")
