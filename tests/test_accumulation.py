"""Gradient accumulation counts optimizer steps: estimates, the logged and shown loss, stops."""

from __future__ import annotations

import signal

import pytest
from lightning.pytorch.callbacks import Callback

from nanogpt_pl.cli import cli, main
from nanogpt_pl.terminal import TrainingBar
from test_checkpointing import SignalAt, assert_same_run, scalars, small_v7

STEPS = 12


def accumulated(data, *extra):
    return small_v7(
        data, "--data.batch_size", "16", "--trainer.accumulate_grad_batches", "2",
        "--trainer.val_check_interval", "4", *extra, steps=STEPS,
    )


class BatchLosses(Callback):
    """Each batch's own loss: Lightning's outputs hold it divided by accumulate_grad_batches."""

    def __init__(self) -> None:
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item() * trainer.accumulate_grad_batches)


def test_accumulation_counts_optimizer_steps_shows_the_step_loss_and_resumes_exactly(
    small_text, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    # One batch of 32 per step (and log_every_n_steps 0: nothing logged per step, no division by it).
    (tmp_path / "single").mkdir()
    monkeypatch.chdir(tmp_path / "single")
    main(["fit", *small_v7(
        small_text, "--data.batch_size", "32", "--trainer.val_check_interval", "4",
        "--trainer.log_every_n_steps", "0", steps=STEPS,
    )])
    single = scalars(tmp_path / "single/tb_logs/v7/version_0")
    assert "train/loss" not in single

    # Two batches of 16 per step, with the bar redrawn at every step.
    monkeypatch.chdir(tmp_path)
    run = cli(accumulated(small_text, "--trainer.enable_progress_bar", "true"), run=False)
    bar = next(c for c in run.trainer.callbacks if isinstance(c, TrainingBar))
    bar.refresh_seconds = 0.0
    losses = BatchLosses()
    run.trainer.callbacks.append(losses)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    expected = scalars(tmp_path / "tb_logs/v7/version_0")
    # Estimates at the same optimizer steps as without accumulation; one loss per optimizer step.
    assert sorted(expected["val/loss"]) == sorted(single["val/loss"]) == [4, 8, 12]
    assert sorted(expected["train/loss"]) == list(range(STEPS))
    assert len(losses.losses) == 2 * STEPS
    # The step's loss is the mean of its two batches' losses, in the log and on the bar.
    for step, value in expected["train/loss"].items():
        assert value == pytest.approx(sum(losses.losses[2 * step:2 * step + 2]) / 2, rel=1e-6)
    assert bar._loss_value == pytest.approx(sum(losses.losses[-2:]) / 2, rel=1e-6)

    # A SIGTERM at the end of step 7 (after its stop decision) stops the run at the end of step 8,
    # never between its two batches; resumed, the run is the uninterrupted one.
    run_dir = tmp_path / "stopped"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    run = cli(accumulated(small_text), run=False)
    run.trainer.callbacks.append(SignalAt(signal.SIGTERM, 7, during_estimate=False))
    with pytest.raises(SystemExit):
        run.trainer.fit(run.model, datamodule=run.datamodule)
    assert "stopped at step 8; saved" in capsys.readouterr().err
    main(["fit", *accumulated(small_text), "--ckpt_path", "last"])
    assert_same_run(scalars(run_dir / "tb_logs/v7/version_0"), expected)
