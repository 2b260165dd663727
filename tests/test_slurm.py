"""Under SLURM, the warning signal before the time limit stops the run through the same path as
SIGTERM: one last.ckpt, then ``scontrol requeue``; the requeued job continues from it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from test_checkpointing import finish, popen_fit, small_v7, wait_for

JOB = "4242"


def slurm_job(tmp_path: Path, monkeypatch) -> Path:
    """SLURM's variables for a one-task job, and a fake ``scontrol`` on PATH that logs its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    scontrol.chmod(0o755)
    log = tmp_path / "scontrol.log"
    for name, value in {
        "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "nanogpt", "SLURM_JOB_ID": JOB, "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SCONTROL_LOG": str(log),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_the_requeue_signal_saves_last_once_requeues_and_auto_continues(small_text, tmp_path, monkeypatch):
    log = slurm_job(tmp_path, monkeypatch)
    last = tmp_path / "tb_logs/v7/version_0/checkpoints/last.ckpt"
    proc = popen_fit(small_v7(small_text, "--ckpt_path", "auto", steps=100_000), tmp_path)
    wait_for(last.exists, proc, poll=0.01)  # the first estimate's checkpoints are written
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=USR1@90` sends
    err = finish(proc, tmp_path)
    assert proc.returncode == 1, err[-3000:]
    stopped = torch.load(last, weights_only=True)["global_step"]
    assert f"stopped at step {stopped}; saved" in err and f"requeued SLURM job {JOB}" in err, err[-3000:]
    assert log.read_text() == f"requeue {JOB}\n"  # once, by the one process, after the checkpoint
    assert not list(tmp_path.rglob("hpc_ckpt_*")), "Lightning's own SLURM checkpoint is not written"

    # The requeued job runs the same command: it continues the run from that checkpoint.
    proc = popen_fit(small_v7(small_text, "--ckpt_path", "auto", steps=stopped + 5), tmp_path)
    err = finish(proc, tmp_path)
    assert proc.returncode == 0, err[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == stopped + 5
    assert not (tmp_path / "tb_logs/v7/version_1").exists()
    assert log.read_text() == f"requeue {JOB}\n"


def test_without_requeue_the_warning_signal_still_stops_and_saves(small_text, tmp_path, monkeypatch):
    log = slurm_job(tmp_path, monkeypatch)
    last = tmp_path / "tb_logs/v7/version_0/checkpoints/last.ckpt"
    no_requeue = ["--trainer.plugins+=lightning.fabric.plugins.environments.SLURMEnvironment",
                  "--trainer.plugins.auto_requeue", "false"]  # as the README says to turn requeueing off
    proc = popen_fit(small_v7(small_text, *no_requeue, steps=100_000), tmp_path)
    wait_for(last.exists, proc, poll=0.01)
    proc.send_signal(signal.SIGUSR1)
    err = finish(proc, tmp_path)
    assert proc.returncode == 1, err[-3000:]
    assert "received SIGUSR1: stopping" in err and "requeueing is off" in err, err[-3000:]
    assert f"stopped at step {torch.load(last, weights_only=True)['global_step']}; saved" in err
    assert not log.exists()  # never requeued


def test_an_array_task_without_its_task_id_requeues_the_job(tmp_path, monkeypatch, capsys):
    from nanogpt_pl.run.stop import _requeue_slurm_job

    log = slurm_job(tmp_path, monkeypatch)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "9000")  # SLURM_ARRAY_TASK_ID missing
    _requeue_slurm_job(saved=True)
    assert log.read_text() == f"requeue {JOB}\n" and f"requeued SLURM job {JOB}" in capsys.readouterr().err
